"""Thin wrapper: `python benchmarks/bench_ops.py [bertfast bench flags]` runs the ops suite of
`bertfast bench` (bertfast/bench/ holds the one harness; see its --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout

from bertfast.bench import cli_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli_main("bench", ["--suite", "ops", "--prefix", "bench_ops", *sys.argv[1:]]))
