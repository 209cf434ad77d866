"""`bertfast pretrain` and `bertfast finetune`: parse, run, print the last metrics as JSON."""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence


from .._io import json_safe
from ..data import CorpusError
from ..tasks import truncation_notes
from .finetune import finetune, finetune_parser
from .pretrain import pretrain, pretrain_parser

def cli_main(cmd: str, argv: Sequence[str]) -> int:
    parser = {"pretrain": pretrain_parser, "finetune": finetune_parser}.get(cmd)
    if parser is None:
        print(f"bertfast: train handles pretrain and finetune, not {cmd!r}", file=sys.stderr)
        return 2
    args = parser().parse_args(list(argv))
    try:
        with truncation_notes(cmd):
            result = pretrain(args) if cmd == "pretrain" else finetune(args)
    except (CorpusError, ValueError, OSError, RuntimeError, FloatingPointError) as e:
        print(f"bertfast {cmd}: error: {e}", file=sys.stderr)
        return 1
    if result and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(json_safe(result), allow_nan=False))  # standard JSON: a NaN prints as null
    return 0
