"""`bertfast bench`: one harness for the op, attention and encoder benchmarks.

Every figure is a ratio measured side by side in the same process: bertfast against eager
`<op>_ref`, `torch.compile(<op>_ref)`, the SDPA backends (attention) and Hugging Face
`transformers` (encoder), each only where it runs; a baseline that cannot run here is kept
in the results as "skipped" with the reason.

Timing: warm-up (which also absorbs torch.compile's compilation), then many repeats; we
report the median and the inter-quartile range. Inputs rotate through several sets whose
total size exceeds the last-level cache, so a repeat never finds its inputs still cached
from the previous one. GPU: `triton.testing.do_bench` (CUDA events, L2 flushed between
calls; a plain CUDA-event loop when triton is absent). CPU: `torch.utils.benchmark.Timer`.

Ceilings measured in the same run: device copy bandwidth (bytes read + written) and a large
matmul's FLOP/s, so memory-bound figures are also a fraction of copy bandwidth and
compute-bound ones a fraction of the matmul rate.

    bertfast bench [--suite ops,attention,encoder] [--device cpu|cuda] [--dtype fp32,bf16]
                   [--quick] [--out DIR] [--repeats N] [--tokens 8192] [--hidden 384,768]
                   [--sizes 128,256,512] [--threads N] [--compile all|some|none]

Modules, one concern each (imports run down this list, never up):

    common        variant names, dtype names, SuiteOptions, error reasons, compile/backend helpers
    environment   versions, git commit, CPU and cache facts recorded with every run
    timing        CPU Timer blocks (interleaved across variants), CUDA events, input rotation,
                  CUDA-graph replays of a variant
    ceilings      copy bandwidth and matmul rate measured in the same run
    runner        Case (one point, several variants) and Runner (set up, time, figures, speedups)
    ops, attention, encoder
                  the suites: each builds its Cases from SuiteOptions (see suites.py for the contract)
    suites        the registry: `--suite NAME` -> module; adding a suite is one module and one line there
    report        console table, markdown, PNG plots, JSON
    cli           flags, defaults, time budgets, the driver loop, --render
"""
from __future__ import annotations


def __getattr__(name):
    # `bertfast.bench.run(...)` etc. without importing the harness at package import
    if name in ("run", "cli_main", "build_parser", "render"):
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'bertfast.bench' has no attribute {name!r}")
