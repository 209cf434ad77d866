"""Pre-training (MLM + NSP) and fine-tuning loops, single process or DDP through torchrun.

Modules: runtime (optimizer, schedule, ranks/devices, RNG state, metrics log, checkpoints),
pretrain (the MLM + NSP loop and its parser), finetune (task data formats beside the
fine-tuning loop and its parser), cli (`bertfast pretrain|finetune`). Imports go
runtime <- pretrain, finetune <- cli.

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

from .cli import cli_main
from .finetune import (NLI_LABELS, TASKS, build_features, collate_features, evaluate_finetune, finetune,
                       finetune_parser, label_set, read_records)
from .pretrain import evaluate_pretraining, pretrain, pretrain_parser
from .runtime import (MetricsLog, Runtime, build_optimizer, parameter_groups, read_metrics,
                      warmup_linear_schedule)

__all__ = ["MetricsLog", "NLI_LABELS", "Runtime", "TASKS", "build_features", "build_optimizer", "cli_main",
           "collate_features", "evaluate_finetune", "evaluate_pretraining", "finetune", "finetune_parser",
           "label_set", "parameter_groups", "pretrain", "pretrain_parser", "read_metrics", "read_records",
           "warmup_linear_schedule"]
