"""`bertfast.info()` / `bertfast info`: versions, devices, and which backend serves each op, and why."""
from __future__ import annotations

import importlib
import os
import platform
import sys


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception as e:  # noqa: BLE001
        return f"not available ({type(e).__name__})"


def info(print_: bool = True) -> dict:
    """A dict (and a printed report) of versions, devices and the backend serving each op."""
    import torch

    from . import __version__, dispatch, ops

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    d = {
        "bertfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
               f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}",
        "cuda": (f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})" if torch.cuda.is_available()
                 else "no CUDA device"),
        "BERTFAST_BACKEND": os.environ.get("BERTFAST_BACKEND", "auto"),
        "BERTFAST_STRICT": os.environ.get("BERTFAST_STRICT", "0"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "backends": {},
    }
    for op in ops.OPS:
        for dev in devices:
            name, why = dispatch.explain(op, dev)
            d["backends"][f"{op}@{dev}"] = {"backend": name, "why": why}
    # after the table: explaining the CPU rows loads (or builds) the extension, so its state is final
    try:
        from .dispatch import cpp

        d["cpp_extension"] = cpp.status()
    except Exception as e:  # noqa: BLE001
        d["cpp_extension"] = f"unavailable ({type(e).__name__}: {e})"
    try:
        from .dispatch import cuda

        d["cuda_extension"] = cuda.status()
    except Exception as e:  # noqa: BLE001
        d["cuda_extension"] = f"unavailable ({type(e).__name__}: {e})"
    try:
        from .dispatch import routing

        d["routing_tables"] = {t.name: (f"{os.path.basename(t.path)}: "
                                        + (f"measured on {routing._src(t.source)}" if t.source else "no measurement")
                                        + f", default {t.default}")
                               for t in {id(t): t for t in routing.tables().values()}.values()}
    except Exception as e:  # noqa: BLE001 - a broken table file is reported, not fatal here
        d["routing_tables"] = f"unreadable ({type(e).__name__}: {e})"
    if print_:
        print(format_report(d))
    return d


def format_report(d: dict) -> str:
    """info()'s dict as aligned text: one `name  value` line each (a table's rows indented under
    its name, an extension's status on one line), then the op@device table."""
    rows = {k: v for k, v in d.items() if k != "backends"}
    width = max(len(k) for k in rows)
    lines = []
    for k, v in rows.items():
        if isinstance(v, dict) and "state" not in v:  # a table: its rows aligned under the name
            inner = max((len(str(n)) for n in v), default=0)
            entries = [f"{str(n):<{inner}}  {x}" for n, x in v.items()] or ["(none)"]
            lines += [f"{k if i == 0 else '':<{width}}  {e}" for i, e in enumerate(entries)]
        else:
            lines.append(f"{k:<{width}}  {_status_row(v)}")
    table = d.get("backends", {})
    if table:
        w_op = max(len("op@device"), *(len(k) for k in table))
        w_be = max(len("backend"), *(len(str(v["backend"])) for v in table.values()))
        lines += ["", f"{'op@device':<{w_op}}  {'backend':<{w_be}}  why"]
        lines += [f"{k:<{w_op}}  {str(v['backend']):<{w_be}}  {v['why']}" for k, v in table.items()]
    return "\n".join(lines)


def _status_row(st) -> str:
    """One readable line for an extension's status dict (state, instruction set or architecture,
    build time, where, why), the value itself for anything else."""
    if not isinstance(st, dict):
        return str(st)
    parts = [st.get("state") or "?"]
    for key in ("capability", "arch"):
        if st.get(key):
            parts.append(str(st[key]))
    if st.get("build_seconds") is not None:
        parts.append(f"built in {st['build_seconds']} s")
    if st.get("path"):
        parts.append(str(st["path"]))
    if st.get("reason"):
        parts.append(str(st["reason"]))
    return ", ".join(parts)


def cli_main(cmd, argv) -> int:
    import argparse
    import json
    import warnings

    ap = argparse.ArgumentParser(prog="bertfast info", description=__doc__)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # info reports the fallbacks itself
        if args.json:
            print(json.dumps(info(print_=False), indent=2, default=str))
        else:
            info()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main("info", sys.argv[1:]))
