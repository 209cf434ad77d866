"""Pre-training (MLM + NSP) and fine-tuning loops, single process or DDP through torchrun.

Modules: args (the two commands' parsers and the fine-tuning data formats, torch-free),
runtime (optimizer, schedule, ranks/devices, RNG state, metrics log, checkpoints), pretrain
(the MLM + NSP loop), finetune (task data loading and the fine-tuning loop), cli (`bertfast
pretrain|finetune`). Imports go args, runtime <- pretrain, finetune <- cli.

    bertfast pretrain --train corpus.txt --vocab-size 8000 --config tiny --max-steps 1000 \
        --batch-size 32 --seq-len 128 --out runs/tiny
    torchrun --nproc_per_node 2 -m bertfast pretrain ...        # DDP: gloo on CPU, nccl on GPU
    bertfast finetune --task cls --model runs/tiny --train train.jsonl --eval dev.jsonl --out runs/cls

Pre-training output folder:
    config.json, model.safetensors, tokenizer.json, vocab.txt, tokenizer_config.json  (final model;
        transformers' BertForPreTraining and bertfast's from_pretrained load it)
    metrics.jsonl              one JSON object per logged step (and per evaluation)
    checkpoints/step-N/        model + trainer_state.pt (optimizer, scheduler, RNG, data position)
    checkpoints/latest         name of the newest complete checkpoint (written atomically)

Exact resume: every source of randomness is either saved (optimizer/scheduler/RNG state) or
derived from (seed, step, shard) (dropout is reseeded per micro-batch, the data stream is a pure
function of its position), so `--resume` continues with the very losses an uninterrupted run makes.

Data sharding: the corpus is dealt into `--num-shards` shards (default: the world size); rank r
owns shards r, r+W, ...; micro-batch m of a rank reads owned shard m % len(owned). Hence one process
with --num-shards 2 --grad-accum 2 sees exactly the batches two DDP ranks with --grad-accum 1 see,
and ends with the same parameters.

Fine-tuning data formats: finetune.DATA_FORMATS, printed by `bertfast finetune --help`.
"""

from .._lazy import lazy_exports

# public name -> the module that defines it, loaded on first use: `bertfast pretrain --help` and
# argument errors (train.cli, train.args) answer before torch is imported
_LAZY = {
    "cli_main": "cli",
    **dict.fromkeys(("finetune_parser", "pretrain_parser", "DATA_FORMATS", "TASKS"), "args"),
    **dict.fromkeys(("NLI_LABELS", "build_features", "collate_features", "evaluate_finetune", "finetune", "label_set",
                     "read_records"), "finetune"),
    **dict.fromkeys(("evaluate_pretraining", "pretrain"), "pretrain"),
    **dict.fromkeys(("MetricsLog", "Runtime", "build_optimizer", "parameter_groups", "read_metrics",
                     "warmup_linear_schedule"), "runtime"),
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
