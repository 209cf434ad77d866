"""`bertfast pretrain` and `bertfast finetune`: parse, run, print the last metrics as JSON.

The arguments are parsed before anything heavy is imported: a mistyped option is answered at
once, not after torch has loaded."""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from .args import finetune_parser, pretrain_parser


def cli_main(cmd: str, argv: Sequence[str]) -> int:
    parser = {"pretrain": pretrain_parser, "finetune": finetune_parser}.get(cmd)
    if parser is None:
        print(f"bertfast: train handles pretrain and finetune, not {cmd!r}", file=sys.stderr)
        return 2
    args = parser().parse_args(list(argv))

    from .._io import json_safe
    from ..data import CorpusError
    from ..tasks import truncation_notes

    if cmd == "pretrain":
        from .pretrain import pretrain as run
    else:
        from .finetune import finetune as run
    try:
        with truncation_notes(cmd):
            result = run(args)
    except (CorpusError, ValueError, OSError, RuntimeError, FloatingPointError) as e:
        print(f"bertfast {cmd}: error: {e}", file=sys.stderr)
        return 1
    if result and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(json_safe(result), allow_nan=False))  # standard JSON: a NaN prints as null
    return 0
