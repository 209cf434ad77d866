"""`bertfast info` prints aligned text (never a Python dict), `bertfast verify` ends with a one-line summary."""
from bertfast import _info, verify


def test_info_report_is_aligned_text():
    d = {"bertfast": "0.1.0", "torch": "2.13.0+cpu",
         "cuda_extension": {"state": "not loaded", "reason": None, "build_seconds": None, "path": None, "arch": None},
         "routing_tables": {"attention": "attention.json: default triton", "layernorm_family": "no measurement"},
         "backends": {"attention@cpu": {"backend": "cpp", "why": "first choice"},
                      "bias_residual_layernorm@cpu": {"backend": "reference", "why": "cpp refused"}}}
    lines = _info.format_report(d).splitlines()
    assert lines[:5] == ["bertfast        0.1.0",
                         "torch           2.13.0+cpu",
                         "cuda_extension  not loaded",
                         "routing_tables  attention         attention.json: default triton",
                         "                layernorm_family  no measurement"]
    assert lines[6:] == ["op@device                    backend    why",
                         "attention@cpu                cpp        first choice",
                         "bias_residual_layernorm@cpu  reference  cpp refused"]


def test_bertfast_info_prints_no_dicts(capsys):
    from bertfast.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "'state'" not in out and "op@device" in out


def test_verify_ends_with_a_summary_line(capsys):
    rows = [("bias_gelu", "cpp", "cpu", "float32", "ok", "1e-7"), ("attention", "cpp", "cpu", "probe", "ok", "x"),
            ("bias_gelu", "triton", "cpu", "float32", "skip", "no triton"),
            ("gelu_layernorm", "cuda", "cuda", "float16", "FAIL", "2e-1")]
    assert verify.summary_line(rows) == ("verify: FAILED: 2 ok, 1 failed, 1 skipped (cpp, cuda against the reference "
                                         "on cpu, cuda)")
    assert verify.summary_line(rows[:2]).startswith("verify: all checks passed: 2 ok, 0 failed, 0 skipped")
    assert verify.verify_numerics(backends=("cpp",)) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verify: all checks passed:") and "cpp against the reference on cpu" in last
