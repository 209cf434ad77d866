"""`pytest benchmarks/ --benchmark-only` from a source checkout that is not pip-installed:
put the repository root on sys.path so `import bertfast` finds this tree."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
