"""The package's layout rules, checked: every import (module-level and inside functions alike) goes
down the floors of LEVELS, no import cycles between modules, `import bertfast` stays cheap, kernel
files import only shared `_` helpers (never another op's file), and a module over ~500 lines says
in its docstring why it is one file."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"bertfast": os.path.join(ROOT, "bertfast"), "bertfast.kernels": os.path.join(ROOT, "kernels")}
LONG = 550  # "about 500 lines"

# The floors of the house (docs/architecture.md): a module may import its own unit and anything on
# a lower floor, never a higher one. A unit is a subpackage or a top-level module of bertfast, or a
# module named on its own (a package's command layer sits with the commands).
LEVELS = {
    # the ground floor: raw Triton kernels and their launchers; leaf helpers that import nothing of
    # ours (the --help formatter, all-or-nothing file writes)
    "kernels": 0, "_help": 0, "_io": 0, "_lazy": 0,
    # which implementation serves a call (and the C++/CUDA build wrappers); the encoder boundary's
    # unpad/pad index math, which the ops and the model share
    "dispatch": 1, "padding": 1,
    # the fused ops: reference, registered op, public function
    "ops": 2,
    # the model and what it is fed and checked with
    "models": 3, "tokenizer": 3, "data": 3, "testing": 3,
    # what runs the model
    "graphs": 4, "tasks": 4, "embed_shards": 4, "train": 4, "classic": 4, "hf_accelerate": 4,
    # the commands and the benchmark harness
    "bench": 5, "cli": 5, "__main__": 5, "_info": 5, "verify": 5, "tasks.commands": 5,
}


def _modules(packages=None):
    """{module name: path} of every .py file of bertfast/ and kernels/ (installed as bertfast.kernels)."""
    out = {}
    for pkg, base in (packages or PACKAGES).items():
        for dirpath, dirs, files in os.walk(base):
            # bertfast/kernels is the link to kernels/, walked as its own package
            dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and not (pkg == "bertfast" and d == "kernels"
                                                                                and dirpath == base)]
            rel = os.path.relpath(dirpath, base)
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                    out[name] = os.path.join(dirpath, f)
    return out


def _unit(module: str) -> str:
    """'bertfast.ops.attention' -> 'ops', 'bertfast.tasks.commands' -> 'tasks.commands' (named in
    LEVELS on its own); the kernels (installed as bertfast.kernels) -> 'kernels'."""
    parts = module.split(".")
    for i in range(len(parts), 2, -1):
        if ".".join(parts[1:i]) in LEVELS:
            return ".".join(parts[1:i])
    return parts[1] if len(parts) > 1 else parts[0]


def _imported(name, path, known, node):
    """The project's modules one Import/ImportFrom node of module `name` (file `path`) names."""
    is_pkg = path.endswith("__init__.py")
    base = name if is_pkg else name.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        found = [a.name for a in node.names]
    else:
        if node.level:
            parts = base.split(".")
            parent = ".".join(parts[:len(parts) - node.level + 1])
            mod = f"{parent}.{node.module}" if node.module else parent
        else:
            mod = node.module or ""
        found = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from pkg import submodule`
    out = set()
    for mod in found:
        parts = mod.split(".")
        for i in range(len(parts), 0, -1):  # the longest prefix that is one of our modules
            cand = ".".join(parts[:i])
            if cand in known:
                if cand != name:
                    out.add(cand)
                break
    return out


def upward_imports(mods: dict, levels: dict = LEVELS) -> list:
    """Every import, module-level or inside a function, that goes up a floor: (module, line,
    imported module, its unit's level > the importer's). The root package `bertfast` (its lazy
    __init__) is everyone's; a unit missing from `levels` is reported as such."""
    bad = []
    for name, path in sorted(mods.items()):
        unit = _unit(name)
        if name == "bertfast":
            continue
        if unit not in levels:
            bad.append((name, 0, "<not in LEVELS>", unit))
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for dep in _imported(name, path, mods, node):
                dep_unit = _unit(dep)
                if dep == "bertfast" or dep_unit == unit:
                    continue
                if dep_unit not in levels or levels[dep_unit] > levels[unit]:
                    bad.append((name, node.lineno, dep, f"{dep_unit} (floor {levels.get(dep_unit)}) above "
                                                         f"{unit} (floor {levels[unit]})"))
    return bad


def test_every_import_goes_down_the_floors():
    """kernels -> nothing of ours; dispatch -> kernels; ops -> dispatch/kernels/padding; models ->
    ops; graphs/tasks/train/classic -> models; bench/cli on top: function-level imports included."""
    bad = upward_imports(_modules())
    assert not bad, "imports against the floors of LEVELS:\n" + "\n".join(
        f"  {m}:{line} imports {dep}: {why}" for m, line, dep, why in bad)


def test_the_kernels_import_nothing_of_bertfast():
    """The ground floor: no kernel module imports anything of bertfast, not even inside a function
    (also not by the absolute name `bertfast...`)."""
    mods = _modules()
    for name, path in mods.items():
        if _unit(name) != "kernels":
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for dep in _imported(name, path, mods, node):
                    assert _unit(dep) == "kernels", f"{name}:{node.lineno} imports {dep}"


@pytest.mark.parametrize("plant", [
    ("kernels/bias_gelu.py", "from bertfast.ops import _common", "a kernel importing an op"),
    ("kernels/_launch.py", "    from bertfast import dispatch", "a function-level import in a kernel helper"),
    ("bertfast/dispatch/core.py", "    from ..ops import attention", "dispatch calling up into ops"),
    ("bertfast/ops/bias_gelu.py", "    from ..models import bert", "an op importing the model"),
    ("bertfast/models/bert.py", "    from .. import graphs", "the model importing what runs it"),
    ("bertfast/train/pretrain.py", "    from ..cli import COMMANDS", "train importing the command router"),
])
def test_a_planted_upward_import_is_caught(tmp_path, plant):
    """The checker fails on an upward import planted in a copy of the tree (inside a function where
    the planted line is indented), and the copy without it passes."""
    import shutil

    rel, line, what = plant
    copy = {}
    for pkg, base in PACKAGES.items():
        dst = tmp_path / pkg.replace(".", "_")
        shutil.copytree(base, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "kernels"))
        copy[pkg] = str(dst)
    target = os.path.join(copy["bertfast.kernels" if rel.startswith("kernels/") else "bertfast"],
                          rel.split("/", 1)[1])
    mods = _modules(copy)
    assert upward_imports(mods) == [], "the unplanted copy must pass"
    text = open(target, encoding="utf-8").read()
    planted = f"\n\ndef _planted():\n{line}\n" if line.startswith(" ") else f"{line}\n" + text
    with open(target, "w", encoding="utf-8") as fh:
        fh.write(text + planted if line.startswith(" ") else planted)
    bad = upward_imports(_modules(copy))
    assert bad, f"{what}: not caught"
    assert any(m == _module_of(rel) for m, _, _, _ in bad), (what, bad)


def _module_of(rel: str) -> str:
    path = rel[:-3].replace("/", ".")
    return "bertfast." + path if not path.startswith("bertfast.") else path


def _top_level_imports(name, path, known):
    """Modules of this project imported when `name` is imported: the import statements that run at
    module level (also inside top-level if/try blocks), not those inside functions."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    is_pkg = path.endswith("__init__.py")
    base = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                visit(getattr(node, "finalbody", []))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    parent = ".".join(parts[:len(parts) - node.level + 1])
                    mod = f"{parent}.{node.module}" if node.module else parent
                else:
                    mod = node.module
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`

    visit(tree.body)
    # importing a.b.c imports a and a.b first; keep only this project's modules
    deps = set()
    for mod in found:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            cand = ".".join(parts[:i])
            if cand in known and cand != name:
                deps.add(cand)
    # a package's own __init__ is imported before its submodules: not an edge of the cycle check
    return {d for d in deps if not name.startswith(d + ".")}


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _top_level_imports(m, p, mods) for m, p in mods.items()}
    state, stack = {}, []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_kernel_files_import_no_other_op():
    """kernels/<op>.py may import the shared helpers (kernels/_*.py), never another op's file."""
    mods = _modules()
    for name, path in mods.items():
        if not name.startswith("bertfast.kernels.") or name.rsplit(".", 1)[1].startswith("_"):
            continue
        for dep in _top_level_imports(name, path, mods):
            if dep.startswith("bertfast.kernels."):
                assert dep.rsplit(".", 1)[1].startswith("_"), f"{name} imports {dep}: move what it needs to a _ helper"


def test_every_module_imports_in_reverse_order():
    """Every module imports in a fresh process, in reverse order (leaves first: a module that only
    worked because a sibling happened to be imported before it fails here); `import bertfast`
    imports neither triton nor torch."""
    names = sorted(m for m in _modules() if m not in ("bertfast.__main__", "bertfast.bench.__main__"))
    code = (
        "import sys, importlib\n"
        "import bertfast\n"
        "assert 'triton' not in sys.modules and 'torch' not in sys.modules, 'import bertfast must stay cheap'\n"
        f"for name in {list(reversed(names))!r}:\n"
        "    importlib.import_module(name)\n"
        "print('ok', len(sys.modules))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


def test_long_modules_say_why():
    """A module over ~500 lines states in its docstring why it is one file ("Why one file ...")."""
    for name, path in _modules().items():
        text = open(path, encoding="utf-8").read()
        if text.count("\n") > LONG:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "why one file" in doc.lower(), f"{name} has {text.count(chr(10))} lines: split it or say why"


# `from X import _name` across files: a leading underscore says "this file's own", so another file
# reaching for it couples the two behind the reader's back. Helper modules whose own name starts
# with `_` (`_io`, `_engine`, `_help`, kernels/_launch ...) exist to be imported by their package and
# are fine to import from, as is a `_` module itself. Any other exception is listed here,
# (importer, source module, name): reason.
PRIVATE_IMPORT_EXCEPTIONS: dict = {}


def private_imports(mods: dict, exceptions: dict = PRIVATE_IMPORT_EXCEPTIONS) -> list:
    """Every `from X import _name` (module-level or inside a function) where X is another of the
    project's modules whose own name does not start with `_` and `_name` is not itself a `_`
    module: (importer, line, X, name)."""
    bad = []
    for name, path in sorted(mods.items()):
        is_pkg = path.endswith("__init__.py")
        base = name if is_pkg else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = base.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                src = f"{parent}.{node.module}" if node.module else parent
            else:
                src = node.module or ""
            if src not in mods or src == name or src.rsplit(".", 1)[-1].startswith("_"):
                continue
            for alias in node.names:
                n = alias.name
                if not n.startswith("_") or n.startswith("__") or f"{src}.{n}" in mods:
                    continue
                if (name, src, n) not in exceptions:
                    bad.append((name, node.lineno, src, n))
    return bad


def test_no_private_name_is_imported_from_another_file():
    bad = private_imports(_modules())
    assert not bad, "private names imported from another file (make them public where they belong, or list the " \
                    "exception with its reason in PRIVATE_IMPORT_EXCEPTIONS):\n" + "\n".join(
        f"  {m}:{line} imports {n} from {src}" for m, line, src, n in bad)


@pytest.mark.parametrize("rel, line, caught", [
    ("bench/graphs.py", "    from ..train.pretrain import _pretraining_losses",
     ("bertfast.train.pretrain", "_pretraining_losses")),
    ("tasks/embedding.py", "from bertfast.tokenizer import _word_counts", ("bertfast.tokenizer", "_word_counts")),
    ("dispatch/cuda.py", "    from .cpp import _load_library", ("bertfast.dispatch.cpp", "_load_library")),
    # allowed: a name of a `_` helper module, and a `_` module itself
    ("train/finetune.py", "    from .._io import atomic_folder as _atomic", None),
    ("bench/host.py", "    from ..models import _engine", None),
])
def test_a_planted_private_import_is_caught(tmp_path, rel, line, caught):
    """The checker fails on a private name imported from another file (relative, absolute, inside a
    function), and the unplanted copy passes; importing from a `_` helper module stays allowed."""
    import shutil

    dst = tmp_path / "bertfast"
    shutil.copytree(PACKAGES["bertfast"], dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    packages = {"bertfast": str(dst), "bertfast.kernels": PACKAGES["bertfast.kernels"]}
    assert private_imports(_modules(packages)) == [], "the unplanted copy must pass"
    target = dst / rel
    text = target.read_text(encoding="utf-8")
    target.write_text(text + f"\n\ndef _planted():\n{line}\n" if line.startswith(" ") else f"{line}\n" + text,
                      encoding="utf-8")
    bad = [(m, src, n) for m, _, src, n in private_imports(_modules(packages))]
    assert bad == ([(_module_of("bertfast/" + rel), *caught)] if caught else []), bad
