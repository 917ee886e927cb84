"""Layering: the package proper never imports ``saml_kernels.reference`` (the eager backend and the twins), and the
tests' float64 oracles (tests/oracles.py, tests/_kernel_oracles.py) import nothing from the package but its constants.

Only the reference twins themselves (saml_kernels/reference/), tests and benchmarks import it; the package
reaches it in two documented places only, both at run time and on request: ``saml_kernels.reference`` (the
lazy attribute of the package) and the ``reference`` backend's kernel tables (``_backend.register_python_kernels``
imports ``saml_kernels/reference/<op>.py`` the first time that backend serves an op)."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "saml_kernels"
ORACLE = "saml_kernels.reference"

# Modules of other work in progress that still import the oracle; each entry must fail (strict xfail), so the
# list is emptied as soon as the module is fixed.
PENDING: set = set()


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, source: str | None = None):
    """(import statement node, the absolute module names it may load) of every import in ``path`` (or in
    ``source`` placed at ``path``), at any depth (function-level imports included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        if targets:
            yield node, targets


def oracle_imports(path: pathlib.Path, source: str | None = None) -> list[str]:
    """Every import statement of ``path`` (or of ``source`` placed at ``path``) that names saml_kernels.reference,
    absolute or relative, as text."""
    found = []
    for node, targets in _imports(path, source):
        if any(t == ORACLE or t.startswith(ORACLE + ".") for t in targets):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _production_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if (PACKAGE / "reference") not in p.parents)


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=str(p.relative_to(ROOT)),
                  marks=[pytest.mark.xfail(strict=True, reason="still imports the oracle")]
                  if str(p.relative_to(ROOT)) in PENDING else [])
     for p in _production_files()])
def test_production_module_does_not_import_the_oracle(path):
    assert oracle_imports(path) == [], f"{path.relative_to(ROOT)} imports {ORACLE}"


def test_the_check_sees_every_spelling():
    """The checker itself: absolute, from-, relative and parent-relative imports of the oracle are all found."""
    pkg = PACKAGE / "ops"
    cases = {"import saml_kernels.reference.model": 1, "from saml_kernels import reference": 1,
             "from ..reference import mbranch_linear": 1, "from ..reference.layers import X": 1,
             "from .. import reference": 1, "from . import _checks": 0, "from ..ops import reference_free": 0,
             "import saml_kernels.ops": 0}
    for src, n in cases.items():
        assert len(oracle_imports(pkg / "_layering_probe.py", src)) == n, src


def test_running_the_ops_does_not_load_the_oracle():
    """Import the package and run every op on its automatic CPU backend: saml_kernels.reference stays unloaded
    (unless the automatic choice is the reference backend itself, i.e. the extension is not built)."""
    code = """
import sys, torch, saml_kernels
from saml_kernels import _backend
if any(_backend.auto_backend(op, "cpu")[0] == "reference" for op in _backend.registered_ops()):
    print("SKIP"); sys.exit(0)
s = torch.tensor([0, 1, 1])
x, w, b = torch.randn(3, 4), torch.randn(2, 4, 5, requires_grad=True), torch.randn(2, 5)
y = saml_kernels.mbranch_linear(x, w, b, s, activation="relu")
h = saml_kernels.mbranch_linear(x, w, b, s, route="all")
saml_kernels.mutual_unit(h, s).sum().backward()
saml_kernels.mutual_linear(x, w, b, s).sum().backward()
g, e = saml_kernels.scenario_embedding_bag(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 3]), s,
                                           torch.randn(4, 2), torch.randn(2, 4, 2), [0, 4], [0, 4])
print(sorted(m for m in sys.modules if m.startswith("saml_kernels.reference")))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    if out.strip() == "SKIP":
        pytest.skip("the C++ extension is not built: the automatic CPU backend is the reference")
    assert out.strip().splitlines()[-1] == "[]"


def test_op_modules_import_no_cycle():
    """The modules of saml_kernels/ops import each other along a DAG (any import, also inside a function): a cycle
    works only by import order (as _autocast <-> mbranch_linear once did). The package's __init__ is the one place
    that imports them all and then registers the autocast policies."""
    ops = PACKAGE / "ops"
    names = {_module_name(p): p for p in ops.glob("*.py") if p.name != "__init__.py"}
    graph = {m: sorted({t for _, ts in _imports(p) for t in ts if t in names and t != m}) for m, p in names.items()}
    state: dict = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for t in graph[m]:
            visit(t, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])
# ------------------------------------------------------------------------------------------------ the oracle

TESTS = ROOT / "tests"
ORACLE_MODULE = TESTS / "oracles.py"
#: the oracles and the adapters of the raw kernel signatures to oracles (the kernel tests judge by them)
ORACLE_MODULES = (ORACLE_MODULE, TESTS / "_kernel_oracles.py")


def _imported_modules(source: str) -> list[str]:
    """The module of every import statement of ``source`` (relative ones as '.<name>'); ``from a import b`` names
    ``a`` (so ``from saml_kernels import _codes`` counts as the package: spell the constants' module in full)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def oracle_module_violations(source: str, also: tuple = ()) -> list[str]:
    """Imports of the float64 oracle module that are not allowed: anything from saml_kernels except its constants
    (``saml_kernels._codes``), any relative import, and any test module (which might reach the package) but the
    ones named in ``also`` (the kernel adapters build on tests/oracles.py)."""
    allowed_roots = {"__future__", "math", "torch", "numpy", "typing", "dataclasses", "itertools", "functools",
                     *also}
    bad = []
    for name in _imported_modules(source):
        root = name.split(".")[0]
        if name.startswith("."):
            bad.append(name)
        elif root == "saml_kernels":
            if name != "saml_kernels._codes" and not name.startswith("saml_kernels._codes."):
                bad.append(name)
        elif root not in allowed_roots:
            bad.append(name)
    return bad


def test_the_oracle_imports_nothing_it_judges():
    """tests/oracles.py, the float64 oracle every backend (the reference one included) is judged by, imports no
    saml_kernels module but the constants (_codes), and no test helper; nor does tests/_kernel_oracles.py."""
    assert oracle_module_violations(ORACLE_MODULE.read_text()) == []
    assert oracle_module_violations(ORACLE_MODULES[1].read_text(), also=("oracles",)) == []


def test_the_oracle_check_sees_every_spelling():
    cases = {"import saml_kernels.reference": 1, "from saml_kernels.ops import _activation": 1,
             "from saml_kernels import nn": 1, "from saml_kernels._codes import POOLING": 0,
             "import torch.nn.functional as F": 0, "from conftest import tolerance": 1, "from . import x": 1,
             "import saml_kernels": 1}
    for src, n in cases.items():
        assert len(oracle_module_violations(src)) == n, src


def test_the_oracle_loads_no_package_module():
    """Importing the oracles in a fresh process loads no saml_kernels module at all."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import oracles, _kernel_oracles; "
            "print(sorted(m for m in sys.modules if m.startswith('saml_kernels')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
