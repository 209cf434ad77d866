"""Lazy public names for a package: `from bertfast.x import name` imports name's module on first
use, so importing the package stays cheap (no torch) and argument errors can answer before torch.

    __getattr__, __dir__ = lazy_exports(__name__, {"embed": "embedding", ...})

A table value is the submodule (relative to the package, or absolute with a dot in it) whose
attribute of that name is exported, or the module itself when it has no such attribute. The value is
kept in the package's namespace after the first use, so the import happens once.
"""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, table: dict):
    """(__getattr__, __dir__) for the module `package` exporting the names of `table` lazily."""

    def __getattr__(name):
        mod = table.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        m = importlib.import_module(mod if "." in mod else f"{package}.{mod}")
        value = getattr(m, name, m)  # a function or class of the module, else the module itself
        pkg = sys.modules[package]
        setattr(pkg, name, value)
        short = m.__name__.rpartition(".")[2]
        if short != name and table.get(short) == mod and hasattr(m, short):
            # importing a submodule binds it to the package under its own name, hiding the export
            # of that name (train.finetune the function, not the module): put the export back
            setattr(pkg, short, getattr(m, short))
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
