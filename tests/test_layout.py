"""The package's layout rules, checked: no import cycles between modules, `import bertfast`
stays cheap, kernel files import only shared `_` helpers (never another op's file), and a
module over ~500 lines says in its docstring why it is one file."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"bertfast": os.path.join(ROOT, "bertfast"), "bertfast.kernels": os.path.join(ROOT, "kernels")}
LONG = 550  # "about 500 lines"


def _modules():
    """{module name: path} of every .py file of bertfast/ and kernels/ (installed as bertfast.kernels)."""
    out = {}
    for pkg, base in PACKAGES.items():
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            rel = os.path.relpath(dirpath, base)
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                    out[name] = os.path.join(dirpath, f)
    return out


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
