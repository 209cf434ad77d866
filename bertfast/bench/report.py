"""Results out: the console table, the markdown report, the PNG plots and the JSON file."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import List, Optional


from . import suites
from .baselines import not_measured
from .common import COPY, SUBJECT, reason



def _decimals(x: float, digits: int) -> int:
    """Decimals that show `digits` significant digits of x in fixed notation (none for big x)."""
    if not math.isfinite(x) or x == 0:
        return 0
    return max(0, digits - 1 - math.floor(math.log10(abs(x))))


def num(x, digits: int = 3) -> str:
    """x with about `digits` significant digits, never in exponent notation: 1180, 42.3, 0.0123."""
    if x is None:
        return "-"
    return f"{x:.{_decimals(x, digits)}f}"


def ms_pm(median_ms: float, half_iqr_ms: float) -> str:
    """A time in ms with its spread at the same decimals: '1180 ± 120', '0.412 ± 0.031'
    (was '1.18e+03 ± 1.2e+02')."""
    d = _decimals(median_ms, 3)
    return f"{median_ms:.{d}f} ± {half_iqr_ms:.{d}f}"


def summary_rows(results: List[dict]):
    """(suite, case, bertfast ms, backend, figure, speedups...) per case, for the table and the markdown."""
    rows = []
    for r in results:
        s = r["variants"].get(SUBJECT, {})
        if s.get("status") == "ok":
            ms = ms_pm(s["median_ms"], s["iqr_ms"] / 2)
            if "frac_copy_bw_interleaved" in s:
                fig = f"{num(s['gbps'], 3)} GB/s ({100 * s['frac_copy_bw_interleaved']:.0f}% copy)"
            elif "frac_copy_bw" in s:
                fig = f"{num(s['gbps'], 3)} GB/s ({100 * s['frac_copy_bw']:.0f}% copy)"
            elif r["suite"] == "encoder" and "tokens_per_s" in s:
                fig = f"{num(s['tokens_per_s'], 4)} tok/s"
                if "frac_matmul" in s:
                    fig += f" ({100 * s['frac_matmul']:.0f}% mm)"
            elif "frac_matmul" in s:
                fig = f"{num(s['tflops'], 3)} TFLOP/s ({100 * s['frac_matmul']:.0f}% mm)"
            elif "tokens_per_s" in s:
                fig = f"{num(s['tokens_per_s'], 4)} tok/s"
            elif "host_us" in s:
                fig = f"{num(s['host_us'], 3)} host us/{r.get('host_unit', 'call').split()[-1]}"
            else:
                fig = ""
            if s.get("fill") is not None:
                fig += f" fill {s['fill']:.2f}"
            if "peak_memory_mb" in s:
                fig += f" peak {s['peak_memory_mb']:.0f} MB"
        else:
            ms, fig = s.get("status", "?"), s.get("reason", "")[:60]
        backend = s.get("backend", "")
        if isinstance(backend, dict):
            backend = ",".join(sorted({str(v).split(" ")[0] for v in backend.values()}))
        backend = str(backend).split(" ")[0]
        sp = {k: v for k, v in r.get("speedup", {}).items()}
        g = r["variants"].get(SUBJECT + "_graph", {})
        if suites.graphed(r["suite"]) and g.get("status") == "ok":
            bw = g.get("frac_copy_bw")
            fig += (f" | graphs: {num(g['median_ms'], 4)} ms" + (f" {100 * bw:.0f}% bw" if bw is not None else "")
                    + (f" {num(g['tflops'], 3)} TFLOP/s" if "tflops" in g else "")
                    + "".join(f" {k}={v:.2f}x" for k, v in r.get("speedup_graph", {}).items()))
        rows.append((r["suite"], r["name"], ms, backend, fig, sp))
    return rows


def print_table(results: List[dict], file=sys.stdout, meta: Optional[dict] = None):
    missing = not_measured(results, meta or {})
    if missing:
        print("\nNOT MEASURED (what this run set out to measure and could not, and why):", file=file)
        for line in missing:
            print(f"  - {line}", file=file)
    rows = summary_rows(results)
    if not rows:
        return
    print("\nspeedup = baseline time / bertfast time (>1: bertfast faster), medians, same run", file=file)
    suite = None
    for s, name, ms, backend, fig, sp in rows:
        if s != suite:
            suite = s
            print(f"\n[{s}]", file=file)
            print(f"{'case':<48} {'bertfast ms':>16} {'backend':>9}  figure / speedups", file=file)
        sps = "  ".join(f"{k}={v:.2f}x" for k, v in sp.items())
        print(f"{name:<48} {ms:>16} {backend:>9}  {fig}  {sps}", file=file)


def write_markdown(results: List[dict], meta: dict, path: str):
    env, ceil = meta["environment"], meta["ceilings"]
    lines = [f"# bertfast bench: {env.get('device')}", ""]
    missing = not_measured(results, meta)
    if missing:  # first, before the set-up: a comparison that is absent must not go unseen
        lines += ["**Not measured** (what this run set out to measure and could not, and why):", ""]
        lines += [f"- {m}" for m in missing] + [""]
    lines += [
             f"- date {env['date']}, commit `{env['git_commit']}`",
             f"- torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"threads {env['torch_threads']} of {env['cpu_count']} CPUs, load average at start "
             f"{env.get('hostname_load_avg')}",
             f"- command: `{meta['command']}`",
             f"- ceilings measured in this run: copy {num(ceil.get('copy_gbps', 0), 3)} GB/s (read + write), matmul "
             + ", ".join(f"{k} {num(v)} TFLOP/s" for k, v in ceil.get("matmul_tflops", {}).items()),
             "- times are medians (± half the inter-quartile range) over rotated input sets; "
             "speedup = baseline median / bertfast median, measured side by side in this run (>1: bertfast faster)",
             ""]
    for suite in suites.SUITES:
        rs = [r for r in results if r["suite"] == suite]
        if not rs:
            continue
        base_names = []
        for r in rs:
            for k in r["variants"]:
                if k not in (SUBJECT, COPY) and k not in base_names and not (
                        suites.graphed(suite) and k.endswith("_graph")):
                    base_names.append(k)
        lines += [f"## {suite}", "",
                  "| case | bertfast ms | served by | figure | " + " | ".join(f"vs {b}" for b in base_names) + " |",
                  "|---|---|---|---|" + "---|" * len(base_names)]
        for (s, name, ms, backend, fig, sp), r in zip(summary_rows(rs), rs):
            cells = []
            for b in base_names:
                v = r["variants"].get(b, {})
                if b in sp:
                    cells.append(f"{sp[b]:.2f}x")
                elif v.get("status") in ("skipped", "error"):
                    cells.append("skip")
                else:
                    cells.append("-")
            lines.append(f"| {name} | {ms} | {backend} | {fig} | " + " | ".join(cells) + " |")
        for r in rs:
            if r.get("speedup_graph"):
                lines += ["", f"- {r['name']}, bertfast as a CUDA graph: " + ", ".join(
                    f"{v:.2f}x vs {k}" for k, v in r["speedup_graph"].items())]
        lines += ["", "<details><summary>every variant (median ms ± IQR/2, or why skipped)</summary>", "",
                  "| case | variant | median ms | IQR ms | figure | note |", "|---|---|---|---|---|---|"]
        for r in rs:
            for vname, v in r["variants"].items():
                if v.get("status") == "ok":
                    fig = (f"{num(v['gbps'], 3)} GB/s" if "gbps" in v else
                           f"{num(v['tokens_per_s'], 4)} tok/s" if suite == "encoder" and "tokens_per_s" in v else
                           f"{num(v['tflops'], 3)} TFLOP/s" if "tflops" in v else "")
                    if "peak_memory_mb" in v:
                        fig += f", peak {v['peak_memory_mb']:.0f} MB"
                    lines.append(f"| {r['name']} | {vname} | {num(v['median_ms'], 4)} | {num(v['iqr_ms'], 2)} | "
                                 f"{fig} | first call {v.get('first_call_s', 0):.1f} s |")
                else:
                    reason = str(v.get("reason", "")).replace("|", "/")[:160]
                    lines.append(f"| {r['name']} | {vname} | {v.get('status')} | | | {reason} |")
        lines += ["", "</details>", ""]
    from .._io import write_text

    write_text(path, "\n".join(lines) + "\n")


def _legend_below(ax) -> None:
    """The legend under the axes' tick labels (the axis label goes on top as a title), never over
    the bars' ends; offset in points so that it clears the tick labels at any figure height."""
    from matplotlib.transforms import offset_copy

    label = ax.get_xlabel()
    ax.set_xlabel("")
    ax.set_title(label, fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    if not handles:  # e.g. a suite whose only variant that ran is bertfast: no baselines to name
        return
    ax.legend(handles, labels, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False,
              bbox_transform=offset_copy(ax.transAxes, fig=ax.figure, y=-18, units="points"),
              ncol=min(4, len(labels)))


def write_plots(results: List[dict], meta: dict, out_dir: str, prefix: str) -> List[str]:
    """One PNG per suite: left, bertfast's speedup over each baseline per case (log scale, 1x
    line); right, the absolute figure of every variant (fraction of copy bandwidth for the ops,
    TFLOP/s for attention, tokens/s for the encoder)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        print(f"bench: no plots ({reason(e)})", file=sys.stderr)
        return []
    paths = []
    env = meta["environment"]
    for suite in suites.SUITES:
        rs = [r for r in results if r["suite"] == suite and r["variants"].get(SUBJECT, {}).get("status") == "ok"]
        if not rs:
            continue
        key, label = suites.get(suite).PLOT_METRIC
        if suite == "ops" and any("frac_copy_bw_interleaved" in r["variants"][SUBJECT] for r in rs):
            key, label = "frac_copy_bw_interleaved", "fraction of copy bandwidth (copy of the same bytes, interleaved)"
        variants = []
        for r in rs:
            for k, v in r["variants"].items():
                if v.get("status") == "ok" and k not in variants:
                    variants.append(k)
        variants = [v for v in variants if v != COPY]
        bases = [v for v in variants if v != SUBJECT]
        palette = plt.get_cmap("tab10").colors
        color = {v: ("k" if v == SUBJECT else palette[i % len(palette)]) for i, v in enumerate(bases + [SUBJECT])}
        n = len(rs)
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(16, max(3.0, 0.45 * n + 1.8)), sharey=True)
        h = 0.8 / max(len(bases), 1)
        for j, b in enumerate(bases):
            ys = [i + (j - (len(bases) - 1) / 2) * h for i in range(n)]
            ax.barh(ys, [r["speedup"].get(b, float("nan")) for r in rs], height=h, label=f"vs {b}", color=color[b])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        times = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x")  # "2x", not "2 x 10^0"
        ax.xaxis.set_major_formatter(times)
        ax.xaxis.set_minor_formatter(times)
        ax.tick_params(axis="x", which="minor", labelsize=6)
        ax.set_yticks(range(n))
        ax.set_yticklabels([r["name"] for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speedup of bertfast (baseline time / bertfast time; >1 = bertfast faster)", fontsize=8)
        _legend_below(ax)
        h2 = 0.8 / max(len(variants), 1)
        for j, vname in enumerate(variants):
            ys = [i + (j - (len(variants) - 1) / 2) * h2 for i in range(n)]
            xs = [r["variants"].get(vname, {}).get(key, float("nan")) for r in rs]
            ax2.barh(ys, xs, height=h2, label=vname, color=color[vname])
        if suite == "ops":
            ax2.axvline(1.0, color="r", lw=0.8)
        ax2.set_xlabel(label, fontsize=8)
        _legend_below(ax2)
        fig.suptitle(f"bertfast {suite}: {env.get('device')} | torch {env['torch']} | {env['date'][:10]} | "
                     f"threads {env['torch_threads']}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}_{suite}.png")
        from .._io import atomic_file

        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")  # the legends below the axes included
        plt.close(fig)
        paths.append(path)
    return paths


def _jsonable(results):
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]


def save(results: List[dict], meta: dict, out_dir: str, prefix: str = "bench", plots: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{prefix}.json"), "markdown": os.path.join(out_dir, f"{prefix}.md")}
    from .._io import json_safe, write_text

    # all-or-nothing: a run killed mid-write still leaves the last complete file; standard JSON (no NaN)
    write_text(paths["json"], json.dumps(json_safe({**meta, "results": _jsonable(results)}), indent=1, default=str,
                                         allow_nan=False))
    write_markdown(results, meta, paths["markdown"])
    if plots:
        try:
            paths["plots"] = write_plots(results, meta, out_dir, prefix)
        except Exception as e:  # noqa: BLE001 - a plot must never cost the measurements (JSON, markdown)
            print(f"bench: plots not written ({reason(e)})", file=sys.stderr)
            paths["plots"] = []
    return paths


def render(path: str, plots: bool = True) -> dict:
    """The markdown table and plots of an earlier run's JSON, written beside it."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    results = data.pop("results")
    out_dir = os.path.dirname(os.path.abspath(path))
    prefix = os.path.splitext(os.path.basename(path))[0]
    md = os.path.join(out_dir, prefix + ".md")
    write_markdown(results, data, md)
    pngs = write_plots(results, data, out_dir, prefix) if plots else []
    print_table(results, meta=data)
    print(f"\nbench: rendered {md} and {len(pngs)} plot(s) from {path}")
    return {"results": results, "meta": data, "paths": {"json": path, "markdown": md, "plots": pngs}}



def merge(paths: List[str], out_dir: str, prefix: str = "bench", plots: bool = True) -> dict:
    """One JSON/markdown/plot set from several runs (e.g. one `bertfast bench` per suite with its own
    flags, as benchmarks/gpu_check.sh does): the results in order, the environment and ceilings of
    the first run, and every run's command, ceilings and elapsed time under "runs"."""
    runs, results = [], []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
        results += data.pop("results")
        runs.append({"file": os.path.basename(p), **{k: data.get(k) for k in ("command", "ceilings", "elapsed_s",
                                                                               "budget_s", "interrupted")}})
        if len(runs) == 1:
            meta = data
    if not runs:
        raise ValueError("merge: no JSON files given")
    meta = {**meta, "command": " ; ".join(r["command"] or "?" for r in runs), "runs": runs,
            "elapsed_s": round(sum(r["elapsed_s"] or 0 for r in runs), 1)}
    out = save(results, meta, out_dir, prefix, plots=plots)
    print(f"bench: merged {len(runs)} runs ({len(results)} cases) -> {out['json']}")
    return {"results": results, "meta": meta, "paths": out}
