"""The baselines a run promised and did not measure, named where a reader looks first.

Two sources:

- the packages the suites' baselines import (a suite lists them in BASELINE_PACKAGES), checked
  once before any case runs. A package that is not installed is a note: it is an optional extra
  (a bare GPU box has no transformers) and the comparison is simply absent. A package that is
  installed but fails to import is an error: the comparison was promised and a fresh
  environment broke it (a name clash, a release that needs a newer dependency), so the run
  measures what it can, names the failure at the top of the terminal table and of bench.md, and
  `bertfast bench` exits non-zero.
- the variants skipped while the run went on (a baseline that failed to set up here, a time
  budget used up), one line per variant and reason with how many cases it missed. Variants left
  out when the cases were planned (a flag such as --skip or --compile, a CUDA-only baseline on a
  CPU) are not listed: that is the plan, not a loss.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, Iterable, List

from . import suites
from .common import COPY

# package name -> (module to import, an attribute whose lookup imports what the baselines use:
# transformers imports its model code lazily, so a bare `import transformers` can succeed and the
# first model class still fail)
PACKAGES: Dict[str, tuple] = {
    "transformers": ("transformers", "BertModel"),
    "sentence-transformers": ("sentence_transformers", "SentenceTransformer"),
}

NOT_INSTALLED = "not installed"
IMPORT_ERROR = "import error"


def _why(e: BaseException) -> str:
    """The exception in one line, its message's lines joined: transformers puts the cause of a
    failed lazy import on the second line ('Failed to import ... because of:\\n<the cause>')."""
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    return f"{type(e).__name__}: {text}"[:400]


def probe(package: str) -> tuple:
    """(status, reason) of one package: ("ok", None), (NOT_INSTALLED, why) or (IMPORT_ERROR, why)."""
    module, attr = PACKAGES[package]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:  # a parent package that fails, a broken sys.modules entry
        return IMPORT_ERROR, _why(e)
    if spec is None:
        return NOT_INSTALLED, f"{package} is not installed (pip install {package}, or the 'bench' extra)"
    try:
        getattr(importlib.import_module(module), attr)
    except Exception as e:  # noqa: BLE001 - whatever breaks the import is the reason to report
        return IMPORT_ERROR, _why(e)
    return "ok", None


def check_packages(suite_names: Iterable[str]) -> List[dict]:
    """One entry per package the named suites' baselines need: package, suites, status, reason."""
    needs: Dict[str, List[str]] = {}
    for s in suite_names:
        for pkg in getattr(suites.get(s), "BASELINE_PACKAGES", ()):
            needs.setdefault(pkg, []).append(s)
    out = []
    for pkg, used_by in needs.items():
        status, why = probe(pkg)
        out.append({"package": pkg, "suites": used_by, "status": status, "reason": why})
    return out


def import_errors(meta: dict) -> List[dict]:
    return [p for p in meta.get("baseline_packages", []) if p["status"] == IMPORT_ERROR]


def _chosen(why: str) -> bool:
    """A variant left out on purpose (a flag, --quick's plan), in results written before variants
    were marked "planned"."""
    return why.startswith("not run:")


def not_measured(results: List[dict], meta: dict) -> List[str]:
    """Lines naming every promised baseline that was not measured, and why; [] when none."""
    lines = []
    for p in meta.get("baseline_packages", []):
        if p["status"] == "ok":
            continue
        tag = "ERROR, " if p["status"] == IMPORT_ERROR else ""
        lines.append(f"{p['package']} ({tag}{p['status']}; used by the {', '.join(p['suites'])} suite"
                     f"{'s' if len(p['suites']) > 1 else ''}): {p['reason']}")
    groups: Dict[tuple, int] = {}
    for r in results:
        for vname, v in r["variants"].items():
            why = str(v.get("reason", ""))
            if vname == COPY or v.get("status") not in ("skipped", "error") or v.get("planned") or _chosen(why):
                continue
            groups[(r["suite"], vname, why)] = groups.get((r["suite"], vname, why), 0) + 1
    for (suite, vname, why), n in groups.items():
        total = sum(1 for r in results if r["suite"] == suite and vname in r["variants"])
        lines.append(f"{suite} {vname}: not measured in {n} of {total} case{'s' * (total > 1)}: {why}")
    return lines
