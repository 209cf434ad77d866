"""Triton kernels of bertfast, importable only as `bertfast.kernels`.

The folder sits at the repository root (the project's layout) and reaches the package through
the link `bertfast/kernels -> ../kernels`, so a checkout, an editable install and a wheel all
import it as `bertfast.kernels`. Importing this package imports triton.

With a checkout's root on sys.path (`python -m ...` or `python -c` run from the root) this
folder would also be found as a top-level module `kernels`: a name that belongs to Hugging
Face's package, which transformers imports. The guard below steps aside in that case: the
import goes on to whatever `kernels` comes next on sys.path, or fails as if this folder were
not there.
"""
if __name__ == "kernels":
    def _step_aside(name, init_file):
        import importlib
        import os
        import sys

        root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
        saved = sys.path[:]
        sys.path[:] = [p for p in saved if os.path.realpath(p or os.getcwd()) != root]
        del sys.modules[name]
        try:
            importlib.import_module(name)  # leaves the other package in sys.modules[name]
        finally:
            sys.path[:] = saved

    _step_aside(__name__, __file__)
