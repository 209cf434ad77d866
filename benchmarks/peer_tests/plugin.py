"""pytest plugin: every transformers model a test builds goes through bertfast.accelerate().

Loaded with `-p plugin` (benchmarks/peer_tests on sys.path) by run.sh for the accelerated run. It wraps
transformers.PreTrainedModel.post_init (a model built from a config is accelerated once built) and
from_pretrained (a loaded one after loading), and counts, per test, the encoder calls bertfast served
and those it handed back to transformers (with the reason). PEER_REPORT names the JSON file written
at the end: per test its outcome, calls served and calls handed back by reason."""
from __future__ import annotations

import collections
import json
import os

_current = {"served": 0, "back": collections.Counter(), "refused": collections.Counter()}
_results = {}


def _accelerate(model):
    from bertfast import hf_accelerate

    try:
        hf_accelerate.accelerate(model)
    except (TypeError, ValueError) as e:  # no encoder of a served type, or a decoder configuration
        _current["refused"][str(e).split(";")[0][:120]] += 1


def _observe(module, reason):
    if reason is None:
        _current["served"] += 1
    else:
        _current["back"][reason] += 1


def pytest_configure(config):
    import transformers
    from bertfast import hf_accelerate

    hf_accelerate.call_observers.append(_observe)
    post_init = transformers.PreTrainedModel.post_init

    def accelerated_post_init(self, *a, **k):
        out = post_init(self, *a, **k)
        _accelerate(self)
        return out

    transformers.PreTrainedModel.post_init = accelerated_post_init
    from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__

    def accelerated_from_pretrained(cls, *a, **k):
        out = from_pretrained(cls, *a, **k)
        model = out[0] if isinstance(out, tuple) else out
        _accelerate(model)
        return out

    transformers.PreTrainedModel.from_pretrained = classmethod(accelerated_from_pretrained)


def pytest_runtest_setup(item):
    _current["served"] = 0
    _current["back"] = collections.Counter()
    _current["refused"] = collections.Counter()


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _results[report.nodeid] = {"outcome": report.outcome, "served": _current["served"],
                                   "handed_back": dict(_current["back"]), "refused": dict(_current["refused"])}


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PEER_REPORT")
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_results, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
