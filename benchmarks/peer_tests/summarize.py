"""Compare transformers' model tests plain vs accelerated (run.sh's output folder).

    python benchmarks/peer_tests/summarize.py OUT_DIR [--markdown]

Per model_type: tests executed (passed or failed, not skipped), failures of each run, the tests that
fail only accelerated (and only plain), the share of executed tests in which bertfast served at
least one encoder call, and the encoder calls served vs handed back to transformers, by reason."""
from __future__ import annotations

import argparse
import collections
import json
import os
import xml.etree.ElementTree as ET


def outcomes(path):
    """test id -> 'passed' | 'failed' | 'skipped' from a junit XML (subtests: failed if any failed)."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        now = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        if out.get(name) != "failed":
            out[name] = now if not (out.get(name) == "passed" and now == "skipped") else "passed"
    return out


def summarize(folder, model_type):
    plain_xml = os.path.join(folder, f"{model_type}-plain.xml")
    acc_xml = os.path.join(folder, f"{model_type}-accelerated.xml")
    if not (os.path.exists(plain_xml) and os.path.exists(acc_xml)):
        return None
    plain, acc = outcomes(plain_xml), outcomes(acc_xml)
    with open(os.path.join(folder, f"{model_type}-accelerated.json")) as f:
        calls = {k.split("::", 1)[1].replace("::", "::"): v for k, v in json.load(f).items()}
    executed = [t for t, o in acc.items() if o != "skipped"]
    by_short = {t.rsplit(".", 1)[-1]: v for t, v in calls.items()}
    served_tests = [t for t in executed if by_short.get(t.rsplit(".", 1)[-1], {}).get("served", 0) > 0]
    served = sum(v["served"] for v in calls.values())
    back = collections.Counter()
    for v in calls.values():
        back.update(v["handed_back"])
    return {
        "executed": len(executed),
        "failed_plain": sorted(t for t, o in plain.items() if o == "failed"),
        "failed_accelerated": sorted(t for t, o in acc.items() if o == "failed"),
        "only_accelerated": sorted(t for t, o in acc.items() if o == "failed" and plain.get(t) != "failed"),
        "only_plain": sorted(t for t, o in plain.items() if o == "failed" and acc.get(t) != "failed"),
        "tests_served": len(served_tests),
        "calls_served": served,
        "calls_handed_back": dict(back.most_common()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    args = ap.parse_args()
    total = collections.Counter()
    for mt in ("bert", "roberta", "distilbert", "electra"):
        s = summarize(args.folder, mt)
        if s is None:
            print(f"{mt}: no plain and accelerated runs in {args.folder}")
            continue
        share = s["tests_served"] / max(s["executed"], 1)
        print(f"{mt}: executed {s['executed']}, failed plain {len(s['failed_plain'])}, accelerated "
              f"{len(s['failed_accelerated'])}; served in {s['tests_served']} ({share:.0%}); calls served "
              f"{s['calls_served']}, handed back {sum(s['calls_handed_back'].values())}")
        for t in s["only_accelerated"]:
            print(f"   fails only accelerated: {t.split('::')[-1]}")
        for t in s["only_plain"]:
            print(f"   fails only plain: {t.split('::')[-1]}")
        print(f"   handed back: {s['calls_handed_back']}")
        total.update(executed=s["executed"], served=s["tests_served"], calls=s["calls_served"],
                     back=sum(s["calls_handed_back"].values()))
    if total["executed"]:
        print(f"all: {total['served']} of {total['executed']} executed tests served "
              f"({total['served'] / total['executed']:.0%}); calls served {total['calls']}, handed back {total['back']}")


if __name__ == "__main__":
    main()
