"""CPU micro-benchmarks of the fused ops as a pytest-benchmark suite.

    pytest benchmarks/ --benchmark-only                       # run, print the table
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # keep .benchmarks/<machine>/NNNN_*.json
    pytest benchmarks/ --benchmark-only --benchmark-compare   # compare with the last saved run
    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:case   # bertfast vs eager side by side

Not collected by the main `pytest` run (pyproject's testpaths = ["tests"]). Each op is timed
forward and forward+backward at the ops suite's target shapes (8192 tokens x {384, 768, 1024}, fp32 and
bf16; BERTFAST_BENCH_QUICK=1 shrinks them to 2048 x 768 fp32) for the bertfast op (whatever
backend serves it here: `extra_info["backend"]`) and its eager `_ref`; the inputs rotate
through several sets, as in `bertfast bench`. `bertfast bench --suite ops` adds
torch.compile, the copy-bandwidth ceiling and the ratios. Threads: BERTFAST_BENCH_THREADS
(default auto, as `bertfast bench --threads auto`).
"""
import os

import pytest
import torch

from bertfast.bench import cli as bench_cli
from bertfast.bench import common, timing
from bertfast.bench import ops as bench

QUICK = os.environ.get("BERTFAST_BENCH_QUICK", "0") == "1"
TOKENS = 2048 if QUICK else 8192
HIDDEN = [768] if QUICK else [384, 768, 1024]
DTYPES = ["fp32"] if QUICK else ["fp32", "bf16"]
CPU = torch.device("cpu")
# as `bertfast bench`: all cores, or 1 thread when other processes already fill them
THREADS = bench_cli.set_threads(os.environ.get("BERTFAST_BENCH_THREADS", "auto"))


def _rotating_call(op, impl, tokens, hidden, dtype, backward):
    fast, ref = bench.op_fns(op)
    fn = fast if impl == "bertfast" else ref
    gen = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(timing.n_input_sets(int(bench.op_bytes(op, tokens, hidden, dtype, False)), CPU)):
        args, diff = bench.op_inputs(op, tokens, hidden, dtype, CPU, gen, backward)
        dout = None
        if backward:
            shape = (tokens // 128, 128, hidden) if op == "embedding_layernorm" else (tokens, hidden)
            dout = torch.randn(shape, generator=gen).to(dtype)
        sets.append((args, diff, dout))
    return timing.Rotate(bench.op_call(fn, backward), sets)


@pytest.mark.parametrize("impl", ["bertfast", "eager_ref"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", common.NORM_OPS)
def test_op(benchmark, op, dtype, hidden, pass_, impl):
    dt = common.DTYPES[dtype]
    backward = pass_ == "fwd+bwd"
    call = _rotating_call(op, impl, TOKENS, hidden, dt, backward)
    call()  # first call outside the timing: extension load, backend probe
    nbytes = bench.op_bytes(op, TOKENS, hidden, dt, backward)
    benchmark.group = f"{op} {pass_} {TOKENS}x{hidden} {dtype}"
    benchmark.extra_info.update(bytes=nbytes, threads=torch.get_num_threads(), threads_choice=THREADS,
                                backend=common.served_by(op, CPU) if impl == "bertfast" else "eager _ref")
    benchmark.pedantic(call, rounds=15 if not QUICK else 5, iterations=1, warmup_rounds=2)
    benchmark.extra_info["gbps_median"] = nbytes / benchmark.stats.stats.median / 1e9
