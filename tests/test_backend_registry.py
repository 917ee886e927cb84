"""The backend registry of saml_kernels/_backend.py: kernel tables, declared support, the preference table."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import saml_kernels  # noqa: F401  (registers every op)
from saml_kernels import _backend, info
from saml_kernels.nn import ScenarioEmbedding

OPS = ("scenario_embedding_bag", "mbranch_linear", "mutual_unit", "mutual_linear")


@pytest.fixture
def toy_op(monkeypatch):
    """A throw-away op "toy" with one required kernel "f" and one optional "g", removed after the test."""
    monkeypatch.setattr(_backend, "_OPS", dict(_backend._OPS))
    monkeypatch.setattr(_backend, "PREFERENCE", {d: dict(p) for d, p in _backend.PREFERENCE.items()})
    monkeypatch.setattr(_backend, "_warned", set())
    _backend.define_op("toy", kernels=("f",), optional=("g",))
    return "toy"


def test_every_op_is_registered_on_every_backend():
    assert {op: set(b) for op, b in _backend.registered_ops().items() if op in OPS} == {
        op: set(_backend.BACKENDS) for op in OPS}


@pytest.mark.parametrize("op", OPS)
def test_every_available_table_loads_with_its_required_kernels(op):
    spec = _backend._OPS[op]
    for backend in _backend.BACKENDS:
        if backend == "triton" and _backend._triton_import_error():
            continue
        if backend in ("cpu", "cuda") and _backend.why_unavailable(backend, backend, op) is not None:
            continue
        table = _backend.kernels(op, backend)
        assert all(callable(getattr(table, n)) for n in spec.required), (op, backend)
        assert all(getattr(table, n) is None or callable(getattr(table, n)) for n in spec.optional), (op, backend)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_preference_entries_name_registered_backends_and_end_with_the_reference(op, device):
    order = _backend.PREFERENCE[device][op]
    assert order[-1] == "reference" and len(set(order)) == len(order)
    assert set(order) <= set(_backend.registered_ops()[op])


def test_optional_kernel_missing_is_none_and_required_missing_raises(toy_op):
    f = lambda: "f"  # noqa: E731
    _backend.register_kernels(toy_op, "reference", lambda: {"f": f})
    _backend.register_kernels(toy_op, "cpu", lambda: {"g": f})
    table = _backend.kernels(toy_op, "reference")
    assert table.f is f and table.g is None
    with pytest.raises(_backend.BackendUnavailableError, match=r"cpu kernel table of toy lacks \['f'\]"):
        _backend.kernels(toy_op, "cpu")
    with pytest.raises(_backend.BackendUnavailableError, match="op toy has no cuda implementation"):
        _backend.kernels(toy_op, "cuda")
    assert _backend.why_unavailable("cuda", "cuda", toy_op) == "op toy has no cuda implementation"
    with pytest.raises(ValueError, match="define_op"):
        _backend.register_kernels("no_such_op", "reference", lambda: {})
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.register_kernels(toy_op, "tpu", lambda: {})


def test_one_table_per_backend_and_aliases_serve_another_backends_table(toy_op):
    """A second registration of an (op, backend) raises instead of silently replacing the first; a backend with no
    kernel of its own is an alias (``register_alias``: partitioned_norm's "cuda" is its Triton table), available
    where its own conditions and the served backend's both hold."""
    f = lambda: "f"  # noqa: E731
    _backend.register_kernels(toy_op, "triton", lambda: {"f": f}, why_not=lambda dev: "toy triton says no")
    with pytest.raises(ValueError, match="the triton backend of toy is registered already"):
        _backend.register_kernels(toy_op, "triton", lambda: {"f": len})
    _backend.register_alias(toy_op, "cuda", "triton")
    assert _backend.served_by(toy_op, "cuda") == "triton" and _backend.served_by(toy_op, "triton") == "triton"
    assert _backend.kernels(toy_op, "cuda").f is f
    assert "runs on CUDA tensors" in _backend.why_unavailable("cuda", "cpu", toy_op)
    if _backend.why_unavailable("cuda", "cuda") is None:  # the cuda backend itself could run: triton's reason
        assert _backend.why_unavailable("cuda", "cuda", toy_op) == "toy triton says no"
    with pytest.raises(ValueError, match="registered already"):
        _backend.register_alias(toy_op, "cuda", "reference")
    with pytest.raises(ValueError, match="another backend"):
        _backend.register_alias(toy_op, "reference", "reference")
    # the package's own alias: the registry, not a hand-written overwrite, says what partitioned_norm's cuda runs
    assert _backend.served_by("partitioned_norm", "cuda") == "triton"
    assert _backend.served_by("mbranch_linear", "cuda") == "cuda"


def test_table_is_loaded_once(toy_op):
    calls = []
    _backend.register_kernels(toy_op, "reference", lambda: calls.append(1) or {"f": len})
    assert _backend.kernels(toy_op, "reference") is _backend.kernels(toy_op, "reference")
    assert calls == [1]


def test_automatic_choice_follows_the_preference_and_names_the_reason_of_a_fallback(toy_op):
    _backend.register_kernels(toy_op, "reference", lambda: {"f": len})
    _backend.register_kernels(toy_op, "triton", lambda: {"f": len}, why_not=lambda dev: "toy says no")
    _backend.PREFERENCE["cpu"][toy_op] = ("reference",)
    assert _backend.auto_backend(toy_op, "cpu")[0] == "reference"
    _backend.PREFERENCE["cuda"][toy_op] = ("triton", "reference")
    with pytest.warns(RuntimeWarning, match="falling back to the reference backend because triton: .*toy says no"
                      if not _backend._triton_import_error() else "falling back to the reference backend"):
        assert _backend.auto_backend(toy_op, "cuda")[0] == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per (op, device)
        assert _backend.auto_backend(toy_op, "cuda")[0] == "reference"
    with pytest.raises(_backend.BackendUnavailableError, match="backend 'triton' .* cannot run here"):
        _backend.resolve(toy_op, "cuda", "triton")


def test_an_op_without_preference_entries_gets_the_default_order(toy_op):
    assert _backend.preference(toy_op, "cpu") == _backend.DEFAULT_PREFERENCE["cpu"]
    assert _backend.preference(toy_op, "xla") == ("reference",)


def test_info_reports_the_preference_order():
    text = info.report()
    for op in OPS:
        assert f"{op}:" in text
    assert "[preference cpu > reference]" in text and "[preference cuda > triton > reference]" in text


def _preference_comments() -> str:
    """The comment lines of saml_kernels/_backend.py from the PREFERENCE block's head to DEFAULT_PREFERENCE (a
    source scan: the comments are where each order cites its measurement)."""
    import inspect

    src = inspect.getsource(_backend)
    block = src[src.index("# Automatic choice"):src.index("DEFAULT_PREFERENCE =")]
    return "\n".join(line.split("#", 1)[1] for line in block.splitlines() if "#" in line)


def test_every_results_file_cited_by_preference_exists():
    """(Source scan.) Every results file PREFERENCE's comments cite, as benchmarks/results/<file> or by a bare
    results file name, exists; no wildcard stands for files not committed yet."""
    import pathlib
    import re

    root = pathlib.Path(_backend.__file__).resolve().parent.parent / "benchmarks" / "results"
    text = _preference_comments()
    cited = set(re.findall(r"benchmarks/results/([^\s,;:()]+)", text))
    cited |= set(re.findall(r"\b([\w*]+_(?:cpu\d*|h100|h200|gpu)[\w*.-]*\.(?:md|json|png))", text, re.IGNORECASE))
    cited = {c.rstrip(".") for c in cited if c.rstrip(".") not in ("", "*")}
    assert cited, "PREFERENCE's comments cite no results file"
    missing = sorted(c for c in cited if "*" in c or not (root / c).is_file())
    assert not missing, f"PREFERENCE cites results files that are not in benchmarks/results/: {missing}"


def test_the_cuda_order_says_it_is_unmeasured():
    """(Source scan.) No CUDA results file is committed, so the CUDA block must say the order is unmeasured and
    that the first device run (benchmarks/gpu_check.sh) decides; when a GPU results file lands this test names it."""
    import pathlib

    root = pathlib.Path(_backend.__file__).resolve().parent.parent / "benchmarks" / "results"
    gpu_files = sorted(p.name for p in root.iterdir() if any(t in p.name.lower() for t in ("_h100", "_h200", "_gpu")))
    text = _preference_comments()
    if not gpu_files:
        assert "UNMEASURED" in text and "benchmarks/gpu_check.sh" in text
    else:  # measured now: the comments must cite one of them
        assert any(f in text for f in gpu_files), f"GPU results exist ({gpu_files}) but PREFERENCE cites none"


# ------------------------------------------------------------------------------------------------ unknown names, env request

_FEATURES = [("user", 7, True, "sum"), ("item", 9, False, "sum"), ("cat", 5, True, "sum")]


def test_unknown_backend_names_raise_backend_unavailable():
    G, S = torch.randn(5, 2), torch.randn(1, 5, 2)
    args = (torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([0]), G, S, [0, 5], [0, 5])
    with pytest.raises(_backend.BackendUnavailableError, match="bogus"):
        saml_kernels.scenario_embedding_bag(*args, backend="bogus")
    with pytest.raises(_backend.BackendUnavailableError, match="bogus"):
        with saml_kernels.use_backend("bogus"):
            pass
    with pytest.raises(_backend.BackendUnavailableError, match="bogus"):
        ScenarioEmbedding(_FEATURES, 2, 4, backend="bogus")
    with pytest.raises(ValueError):  # still a ValueError for code written against earlier versions
        ScenarioEmbedding(_FEATURES, 2, 4, backend="bogus")
    from saml_kernels.nn import MultiBranchLinear, MutualUnit, ScenarioAttention

    for make in (lambda: MultiBranchLinear(3, 4, 2, backend="bogus"), lambda: MutualUnit(3, 4, 2, backend="bogus"),
                 lambda: ScenarioAttention(4, 4, 2, backend="bogus")):
        with pytest.raises(_backend.BackendUnavailableError, match="bogus"):
            make()


def test_info_honours_the_env_request():
    env = dict(os.environ, SAML_KERNELS_BACKEND="reference", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "saml_kernels.info"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "'reference' from SAML_KERNELS_BACKEND" in out
    assert "cpu   SAML_KERNELS_BACKEND -> reference" in out
    assert "cpu   automatic ->" not in out
