"""The --help formatter every `bertfast` command shares (a leaf: imports nothing of bertfast)."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every command's --help: each option's default after its help, unless there is none to show
    (required options, unset optionals, off switches). In descriptions and epilogs, an indented
    line (a data format, an example) is kept as written; other lines are wrapped."""

    def _get_help_string(self, action):
        d = action.default
        shown = not (action.required or d in (None, False, [], "") or d == argparse.SUPPRESS)
        if not shown or "%(default)" in (action.help or "") or "(default:" in (action.help or ""):
            return action.help  # nothing to show, or the help already says it
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        return "\n".join(indent + line if line[:1].isspace() or not line.strip()
                         else argparse.HelpFormatter._fill_text(self, line, width, indent)
                         for line in text.splitlines())
