"""CUDA-graph capture blockers of the embedding layer (saml_kernels/graphs.py lists them), in the style of
tests/test_host_syncs.py: a host read is counted by patching torch.Tensor (``SyncCounter``); on a GPU each one is a
sync that a capture cannot contain.

- a KeyedJaggedTensor with the layer's keys in another order is reordered on the device: no host read in
  capture-safe mode, forward and backward, results bitwise equal to the same batch in the layer's order;
- what still reads the host (mixed pooling; a KJT with keys the layer has no feature for) calls ``graphs.host_read``
  first: inside a capture that raises a clear error (the capture state is mocked here: ``graphs._capturing``), a
  ``CapturedTrainingStep`` warm-up records it, and what is known statically (mixed pooling, the triton embedding
  backward) is refused by ``CapturedTrainingStep`` before anything runs (CUDA is mocked for that one test:
  ``torch.cuda.is_available`` and fake CUDA input tensors);
- a source scan (weaker than the behaviour tests, it only sees the spelling): every ``.tolist()`` / ``.item()`` in
  the layers (saml_kernels/nn), graphs.py, training.py and the Triton embedding launcher is preceded by
  ``host_read`` in its function.
"""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from saml_kernels import _backend, graphs
from saml_kernels.nn import ScenarioEmbedding

from conftest import SyncCounter
from test_scenario_embedding import FakeKJT

ROOT = pathlib.Path(__file__).resolve().parent.parent
FEATURES = [("user", 5, True, "sum"), ("item", 7, False, "sum"), ("cat", 3, True, "sum")]
MIXED = [("user", 5, True, "sum"), ("hist", 6, True, "mean"), ("cat", 3, True, "sum")]


def _batch(layer, B=6, dtype=torch.int64, empty_bag=True):
    F = layer.num_features
    lengths = torch.randint(0, 4, (F * B,))
    if empty_bag:
        lengths[B + 1] = 0
    off = torch.zeros(F * B + 1, dtype=torch.long)
    off[1:] = lengths.cumsum(0)
    idx = torch.cat([torch.randint(0, f.num_embeddings, (int(lengths[k * B:(k + 1) * B].sum()),))
                     for k, f in enumerate(layer.features)])
    return idx.to(dtype), off.to(dtype), torch.randint(0, layer.num_scenarios, (B,))


def _kjt(layer, idx, off, order, w=None, extra=False):
    """The batch as a KJT whose keys come in ``order`` (plus a key the layer lacks when ``extra``)."""
    B = (off.numel() - 1) // layer.num_features
    names = layer.feature_names
    parts, lens, ws = [], [], []
    for name in order:
        f = names.index(name)
        a, b = int(off[f * B]), int(off[(f + 1) * B])
        parts.append(idx[a:b])
        lens.append(off[f * B + 1:(f + 1) * B + 1] - off[f * B:(f + 1) * B])
        ws.append(w[a:b] if w is not None else None)
    if extra:
        ln = torch.full((B,), 2, dtype=off.dtype)
        parts.append(torch.zeros(2 * B, dtype=idx.dtype))
        lens.append(ln)
        ws.append(torch.ones(2 * B) if w is not None else None)
        order = [*order, "extra"]
    lengths = torch.cat(lens)
    offsets = torch.cat([torch.zeros(1, dtype=off.dtype), lengths.cumsum(0).to(off.dtype)])
    return FakeKJT(order, torch.cat(parts), offsets, torch.cat(ws) if w is not None else None)


@pytest.mark.parametrize("fused", [None, "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_kjt_in_another_key_order_reads_nothing_on_the_host(fused, dtype):
    import saml_kernels

    torch.manual_seed(0)
    layer = ScenarioEmbedding(FEATURES, 3, 4, optimizer=fused)
    twin = ScenarioEmbedding(FEATURES, 3, 4, optimizer=fused)
    twin.load_state_dict(layer.state_dict())
    idx, off, sc = _batch(layer, dtype=dtype)
    w = torch.rand(idx.numel())
    kjt = _kjt(layer, idx, off, ["cat", "user", "item"], w=w)

    def step(m, *inputs, **kw):
        g, s = m(*inputs, **kw)
        (g.square().sum() + s.sum()).backward()
        return g.detach(), s.detach()

    step(layer, kjt, sc)                                   # warm caches (layouts, the key order tensor)
    step(twin, idx, off, sc, per_sample_weights=w)
    with SyncCounter() as c, saml_kernels.capture_safe_checks():
        got = step(layer, kjt, sc)
    assert c.count == 0, f"{c.count} host read(s) for a KJT in another key order"
    exp = step(twin, idx, off, sc, per_sample_weights=w)
    for a, b in zip(got, exp):
        assert torch.equal(a, b)
    if fused is None:
        assert torch.equal(layer.global_weight.grad, twin.global_weight.grad)
        assert torch.equal(layer.scenario_weight.grad, twin.scenario_weight.grad)
    else:                                                  # the fused update ran on the same rows
        assert torch.equal(layer.global_weight, twin.global_weight)
        assert torch.equal(layer.scenario_weight, twin.scenario_weight)
    saml_kernels.raise_errors()


def test_permuted_kjt_with_malformed_offsets_reads_in_bounds():
    """Offsets that decrease (unchecked input) still gather inside the values; the op's check reports them."""
    layer = ScenarioEmbedding(FEATURES, 3, 4)
    idx, off, sc = _batch(layer)
    kjt = _kjt(layer, idx, off, ["item", "cat", "user"])
    kjt._offsets = kjt._offsets.clone()
    kjt._offsets[3] = kjt._offsets[-1] + 5                  # past the end, then back down
    with pytest.raises(ValueError, match="offsets"):
        layer(kjt, sc)


@pytest.fixture
def capturing(monkeypatch):
    """Mocks "a CUDA-graph capture is under way on this device" for the layer's host_read guard."""
    monkeypatch.setattr(graphs, "_capturing", lambda device: True)


def test_host_reads_are_refused_inside_a_capture(capturing):
    layer = ScenarioEmbedding(FEATURES, 3, 4)
    idx, off, sc = _batch(layer)
    layer(_kjt(layer, idx, off, ["item", "user", "cat"]), sc)     # permuted: no host read, no error
    extra = _kjt(layer, idx, off, ["item", "user", "cat"], extra=True)
    with SyncCounter() as c, pytest.raises(RuntimeError, match=r"keys the layer has no feature for \(\['extra'\]\)"
                                           r".*cannot contain this host read"):
        layer(extra, sc)
    assert c.count == 0, "the host read happened before the error"
    mixed = ScenarioEmbedding(MIXED, 3, 4)
    idx, off, sc = _batch(mixed)
    with SyncCounter() as c, pytest.raises(RuntimeError, match="mixed pooling.*cannot contain this host read"):
        mixed(idx, off, sc)
    assert c.count == 0


def test_triton_embedding_backward_refuses_inside_a_capture(capturing):
    pytest.importorskip("triton")
    from saml_kernels.triton import scenario_embedding_bag as tseb

    with SyncCounter() as c, pytest.raises(RuntimeError, match="triton embedding backward.*cannot contain"):
        tseb.segment_sizes(torch.tensor([0, 3, 9]), torch.tensor([0, 2, 3, 5]), 2, 5)
    assert c.count == 0


def test_warm_up_records_the_host_reads():
    layer = ScenarioEmbedding(FEATURES, 3, 4)
    idx, off, sc = _batch(layer)
    with graphs.record_host_reads() as reads:
        layer(_kjt(layer, idx, off, ["cat", "item", "user"]), sc)
        layer(idx, off, sc)
    assert reads == []
    with graphs.record_host_reads() as reads:
        layer(_kjt(layer, idx, off, ["cat", "item", "user"], extra=True), sc)
        layer(_kjt(layer, idx, off, ["cat", "item", "user"], extra=True), sc)
    assert len(reads) == 1 and "keys the layer has no feature for" in reads[0]


def test_static_blockers_are_named():
    assert ScenarioEmbedding(FEATURES, 3, 4).capture_blockers() == []
    model = torch.nn.ModuleDict({"emb": ScenarioEmbedding(MIXED, 3, 4), "head": torch.nn.Linear(4, 1)})
    found = graphs.capture_blockers(model)
    assert len(found) == 1 and found[0].startswith("emb: mixed pooling ['sum', 'mean', 'sum']")
    if _backend.why_unavailable("triton", "cpu", "scenario_embedding_bag") is None:   # TRITON_INTERPRET=1
        tri = ScenarioEmbedding(FEATURES, 3, 4, backend="triton")
        assert any("triton embedding backward" in f for f in tri.capture_blockers())
        tri.requires_grad_(False)                          # nothing trains: no backward, nothing blocks
        assert tri.capture_blockers() == []


def test_captured_training_step_refuses_before_anything_runs(monkeypatch):
    """A model with a static blocker is refused before the counters, the warm-up or the capture. CUDA is mocked:
    ``torch.cuda.is_available`` -> True and the example inputs are fake CUDA tensors (no data)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from saml_kernels.ops import _checks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_checks, "prepare_capture_safe", lambda d: pytest.fail("reached prepare_capture_safe"))
    model = torch.nn.ModuleDict({"emb": ScenarioEmbedding(MIXED, 3, 4)})
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = [torch.empty(8, dtype=torch.long, device="cuda:0"), torch.empty(13, dtype=torch.long, device="cuda:0")]
    with pytest.raises(ValueError, match=r"cannot be captured in a CUDA graph .*emb: mixed pooling"):
        graphs.CapturedTrainingStep(model, None, inputs, loss_fn=lambda m, *t: pytest.fail("ran a step"))


# ------------------------------------------------------------------------------------------------ source scan

# the layers, the training step and the graph module (the ops' own host reads are eager-mode error paths)
CAPTURE_PATH = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "saml_kernels" / "nn").glob("*.py")) + [
    "saml_kernels/graphs.py", "saml_kernels/training.py", "saml_kernels/triton/scenario_embedding_bag.py"]


@pytest.mark.parametrize("path", CAPTURE_PATH)
def test_every_host_read_on_the_capture_path_is_guarded(path):
    """(Source scan.) Each ``.tolist()`` / ``.item()`` call in these files follows a ``host_read(...)`` call in the
    same function, so a new one cannot slip onto the capture path unannounced."""
    tree = ast.parse((ROOT / path).read_text())
    bad = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
        guards = [n.lineno for n in calls if getattr(n.func, "id", getattr(n.func, "attr", None)) == "host_read"]
        for n in calls:
            if isinstance(n.func, ast.Attribute) and n.func.attr in ("tolist", "item") and n.func.attr != "host_read":
                if not any(g < n.lineno for g in guards):
                    bad.append(f"{path}:{n.lineno} ({fn.name}: .{n.func.attr}())")
    assert not bad, "host reads without a preceding graphs.host_read(...): " + ", ".join(bad)
