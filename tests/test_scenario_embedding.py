"""Tests of the layer ``saml_kernels.nn.ScenarioEmbedding``: shapes and values (against the float64 loop oracle of
test_scenario_embedding_bag), KeyedJaggedTensor input, state_dict, factory arguments, sparse gradients, and the
fused optimizers (sgd, rowwise_adagrad) against the unfused path (gradient + the same update in PyTorch)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from saml_kernels.nn import EmbeddingFeature, ScenarioEmbedding
from conftest import device_backends, tolerance
from test_scenario_embedding_bag import oracle

PAIRS = device_backends("scenario_embedding_bag")
TOL32 = tolerance(torch.float32)

FEATURES = [("user", 5, True, "sum"), ("item", 7, False, "sum"), ("cat", 3, True, "sum")]
MIXED = [("user", 5, True, "sum"), ("hist", 6, True, "mean"), ("item", 7, False, "mean"), ("cat", 3, True, "sum")]
SEQ = [("seq", 6, True, "none"), ("cate_seq", 4, False, "none")]


class FakeKJT:
    """The part of TorchRec's KeyedJaggedTensor the layer uses (feature-major values/offsets)."""

    def __init__(self, keys, values, offsets, weights=None):
        self._keys, self._values, self._offsets, self._weights = list(keys), values, offsets, weights

    def keys(self):
        return self._keys

    def values(self):
        return self._values

    def offsets(self):
        return self._offsets

    def weights_or_none(self):
        return self._weights


def batch(layer, B=4, max_bag=3, idx_dtype=torch.int64, psw=False):
    """Random jagged ids for every feature of ``layer`` (feature-major), scenario ids, optional weights; on the
    layer's device. Pooling "none" layers get bags of the fixed length ``max_bag``."""
    device = layer.global_weight.device
    F = layer.num_features
    if layer.features[0].pooling == "none":
        lengths = torch.full((F * B,), max_bag)
    else:
        lengths = torch.randint(0, max_bag + 1, (F * B,))
    offsets = torch.zeros(F * B + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    ids = [torch.randint(0, f.num_embeddings, (int(lengths[k * B:(k + 1) * B].sum()),))
           for k, f in enumerate(layer.features)]
    indices = torch.cat(ids)
    scenario = torch.randint(0, layer.num_scenarios, (B,))
    w = torch.rand(indices.numel(), device=device) if psw else None
    return indices.to(idx_dtype).to(device), offsets.to(idx_dtype).to(device), scenario.to(device), w


def layer_oracle(layer, indices, offsets, scenario, psw=None, G=None, S=None):
    """Per-feature oracle: each feature's pooling applied to its own columns."""
    G = layer.global_weight if G is None else G
    S = layer.scenario_weight if S is None else S
    fr, fsr = layer.feature_rows, layer.feature_scenario_rows
    out = {p: oracle(indices, offsets, scenario, G, S, fr, fsr, p, psw if p == "sum" else None)
           for p in {f.pooling for f in layer.features}}
    g = torch.stack([out[f.pooling][0][:, k] for k, f in enumerate(layer.features)], 1)
    aware = [f for f in layer.features if f.scenario_aware]
    s = torch.stack([out[f.pooling][1][:, j] for j, f in enumerate(aware)], 1) if aware else next(iter(out.values()))[1]
    return g, s


# ------------------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("features", [FEATURES, MIXED], ids=["sum", "mixed"])
def test_shapes_and_values(device, backend, features):
    layer = ScenarioEmbedding(features, num_scenarios=3, embedding_dim=6, backend=backend, device=device)
    idx, off, sc, _ = batch(layer)
    g, s = layer(idx, off, sc)
    assert g.shape == (4, len(features), 6) and s.shape == (4, layer.num_aware, 6)
    eg, es = layer_oracle(layer, idx, off, sc)
    torch.testing.assert_close(g.double(), eg, **TOL32)
    torch.testing.assert_close(s.double(), es, **TOL32)
    # gradients through the layer (mixed poolings run the op once per run; the runs' rows are disjoint)
    rg, rs = torch.randn_like(g), torch.randn_like(s)
    ((g * rg).sum() + (s * rs).sum()).backward()
    G64 = layer.global_weight.detach().double().requires_grad_()
    S64 = layer.scenario_weight.detach().double().requires_grad_()
    eg, es = layer_oracle(layer, idx, off, sc, G=G64, S=S64)
    ((eg * rg.double()).sum() + (es * rs.double()).sum()).backward()
    torch.testing.assert_close(layer.global_weight.grad.double(), G64.grad, **TOL32)
    torch.testing.assert_close(layer.scenario_weight.grad.double(), S64.grad, **TOL32)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_pooling_none_and_weights(device, backend):
    layer = ScenarioEmbedding([("a", 4, True, "none"), ("b", 3, False, "none")], 2, 5, backend=backend,
                              device=device)
    B, L = 3, 2
    idx = torch.stack([torch.randint(0, 4, (B * L,)), torch.randint(0, 3, (B * L,))]).reshape(-1).to(device)
    off = torch.arange(0, 2 * B * L + 1, L, device=device)
    sc = torch.randint(0, 2, (B,), device=device)
    g, s = layer(idx, off, sc)
    assert g.shape == (B, 2, L, 5) and s.shape == (B, 1, L, 5)
    eg, es = layer_oracle(layer, idx, off, sc)
    torch.testing.assert_close(g.double(), eg, **TOL32)
    torch.testing.assert_close(s.double(), es, **TOL32)
    # per-sample weights with sum pooling
    layer = ScenarioEmbedding(FEATURES, 3, 4, backend=backend, device=device)
    idx, off, sc, w = batch(layer, psw=True)
    g, s = layer(idx, off, sc, per_sample_weights=w)
    eg, es = layer_oracle(layer, idx, off, sc, psw=w)
    torch.testing.assert_close(g.double(), eg, **TOL32)
    torch.testing.assert_close(s.double(), es, **TOL32)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_kjt_input(device, backend):
    layer = ScenarioEmbedding(MIXED, 2, 4, backend=backend, device=device)
    idx, off, sc, w = batch(layer, psw=True)
    # KJT with int32 offsets beside int64 values, weights used for the sum-pooled features
    sum_layer = ScenarioEmbedding(FEATURES, 2, 4, backend=backend, device=device)
    i2, o2, s2, w2 = batch(sum_layer, psw=True)
    kjt = FakeKJT(sum_layer.feature_names, i2, o2.to(torch.int32), w2)
    torch.testing.assert_close(sum_layer(kjt, s2), sum_layer(i2, o2, s2, per_sample_weights=w2))
    torch.testing.assert_close(sum_layer(kjt, scenario=s2), sum_layer(i2, o2, s2, w2))
    kjt = FakeKJT(layer.feature_names, idx, off)
    torch.testing.assert_close(layer(kjt, sc), layer(idx, off, sc))
    # keys are matched by name (test_kjt_keys_matched_by_name below covers other orders and extra keys)
    with pytest.raises(ValueError, match="lack the layer's feature"):
        layer(FakeKJT(layer.feature_names[:-1], idx, off), sc)
    with pytest.raises(TypeError, match="scenario"):
        layer(kjt)


def test_torchrec_kjt_if_installed():
    torchrec = pytest.importorskip("torchrec")
    layer = ScenarioEmbedding(FEATURES, 2, 4)
    idx, off, sc, _ = batch(layer)
    lengths = off[1:] - off[:-1]
    kjt = torchrec.KeyedJaggedTensor(keys=layer.feature_names, values=idx, lengths=lengths)
    torch.testing.assert_close(layer(kjt, sc), layer(idx, off, sc))


# ------------------------------------------------------------------------------------------------ module API

def test_state_dict_round_trip():
    a = ScenarioEmbedding(FEATURES, 3, 4)
    assert set(a.state_dict()) == {"global_weight", "scenario_weight"}
    assert a.global_weight.shape == (15, 4) and a.scenario_weight.shape == (3, 8, 4)
    b = ScenarioEmbedding(FEATURES, 3, 4)
    assert not torch.equal(a.global_weight, b.global_weight)
    b.load_state_dict(a.state_dict())
    idx, off, sc, _ = batch(a)
    torch.testing.assert_close(a(idx, off, sc), b(idx, off, sc), rtol=0, atol=0)
    # a fused-optimizer layer loads the same parameters; its Adagrad states are in its state_dict
    c = ScenarioEmbedding(FEATURES, 3, 4, optimizer="rowwise_adagrad")
    assert set(c.state_dict()) == {"global_weight", "scenario_weight", "global_state", "scenario_state"}
    assert c.global_state.shape == (15,) and c.scenario_state.shape == (3, 8)
    assert c.global_state.dtype == torch.float32
    c.load_state_dict(a.state_dict(), strict=False)
    torch.testing.assert_close(c.eval()(idx, off, sc), a(idx, off, sc), rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_pages_tables(dtype):
    """huge_pages=True: 2 MiB-aligned tables, same values and outputs as ordinary tables, fused update in place."""
    from saml_kernels.nn.scenario_embedding import huge_page_empty
    t = huge_page_empty((3, 5, 7), torch.float64)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float64 and t.is_contiguous()
    assert t.data_ptr() % (2 << 20) == 0
    assert huge_page_empty((0, 4)).shape == (0, 4)
    a = ScenarioEmbedding(FEATURES, 3, 4, dtype=dtype)
    b = ScenarioEmbedding(FEATURES, 3, 4, dtype=dtype, huge_pages=True, optimizer="sgd", lr=0.1)
    assert b.huge_pages and b.global_weight.dtype == dtype and b.global_weight.data_ptr() % (2 << 20) == 0
    b.load_state_dict(a.state_dict())
    idx, off, sc, _ = batch(a)
    torch.testing.assert_close(a(idx, off, sc), b.eval()(idx, off, sc), rtol=0, atol=0)
    ptr, before = b.global_weight.data_ptr(), b.global_weight.detach().clone()
    g, s = b.train()(idx, off, sc)
    (g.float().sum() + s.float().sum()).backward()
    assert b.global_weight.data_ptr() == ptr and not torch.equal(b.global_weight, before)
    with pytest.raises(ValueError, match="huge_pages=True needs CPU tables"):
        ScenarioEmbedding(FEATURES, 3, 4, huge_pages=True, device="meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_factory_args_and_init(dtype):
    D = 16
    layer = ScenarioEmbedding(FEATURES, 2, D, dtype=dtype, device="cpu")
    for p in (layer.global_weight, layer.scenario_weight):
        assert p.dtype == dtype and p.device.type == "cpu"
        assert p.abs().max() <= 1 / math.sqrt(D)
        assert p.float().std() > 0.5 / math.sqrt(3 * D)  # U(-a, a) has std a / sqrt(3)
    idx, off, sc, _ = batch(layer)
    g, s = layer(idx, off, sc)
    assert g.dtype == dtype and s.dtype == dtype
    eg, es = layer_oracle(layer, idx, off, sc)
    torch.testing.assert_close(g.double(), eg, **tolerance(dtype))
    meta = ScenarioEmbedding(FEATURES, 2, D, dtype=dtype, device="meta", optimizer="rowwise_adagrad")
    assert meta.global_weight.is_meta and meta.global_state.is_meta
    layer.reset_parameters()
    assert layer.global_weight.abs().max() <= 1 / math.sqrt(D)


def test_extra_repr_and_names():
    layer = ScenarioEmbedding(MIXED, 3, 8, optimizer="rowwise_adagrad", lr=0.1)
    r = repr(layer)
    for part in ("num_features=4", "num_aware=3", "num_scenarios=3", "embedding_dim=8", "rows=21",
                 "optimizer='rowwise_adagrad'", "lr=0.1"):
        assert part in r, (part, r)
    assert layer.feature_names == ["user", "hist", "item", "cat"]
    assert layer.feature_rows == (0, 5, 11, 18, 21) and layer.feature_scenario_rows == (0, 5, 11, 11, 14)
    layer = ScenarioEmbedding([EmbeddingFeature("x", 3), {"name": "y", "num_embeddings": 2, "scenario_aware": True}],
                              1, 2)
    assert layer.num_aware == 1
    # NamedTuple specs (saml_kernels.data.FeatureSpec), objects with the fields, numpy integer sizes
    np = pytest.importorskip("numpy")
    from collections import namedtuple
    from types import SimpleNamespace
    Spec = namedtuple("Spec", "name num_embeddings scenario_aware pooling")
    layer = ScenarioEmbedding([Spec("a", np.int64(4), True, "mean"), SimpleNamespace(name="b", num_embeddings=3)],
                              2, 2)
    assert layer.feature_rows == (0, 4, 7) and layer.feature_scenario_rows == (0, 4, 4)
    assert [f.pooling for f in layer.features] == ["mean", "sum"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(features=[]), "at least one"),
    (dict(features=[("a", 0)]), "num_embeddings"),
    (dict(features=[("a", 2.5)]), "num_embeddings"),
    (dict(features=[("a", True)]), "num_embeddings"),
    (dict(features=[("a", 3), ("a", 4)]), "unique"),
    (dict(features=[("a", 3, False, "max")]), "pooling"),
    (dict(features=[("a", 3, False, "none"), ("b", 3)]), "none"),
    (dict(num_scenarios=0), "num_scenarios"),
    (dict(embedding_dim=0), "embedding_dim"),
    (dict(optimizer="adam"), "optimizer"),
    (dict(optimizer="sgd", sparse=True), "sparse"),
    (dict(optimizer="sgd", lr=-1.0), "lr"),
    (dict(bounds_check="maybe"), "bounds_check"),
])
def test_bad_constructor_args(kwargs, match):
    args = dict(features=FEATURES, num_scenarios=2, embedding_dim=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ScenarioEmbedding(args.pop("features"), args.pop("num_scenarios"), args.pop("embedding_dim"), **args)


def test_bad_forward_input():
    layer = ScenarioEmbedding(MIXED, 2, 4)
    idx, off, sc, _ = batch(layer)
    with pytest.raises(ValueError, match="offsets"):
        layer(idx, off[:-1], sc)
    with pytest.raises(TypeError, match="forward needs"):
        layer(idx, off)
    # mixed poolings slice the input per run: the ends of offsets are still checked
    with pytest.raises(ValueError, match=r"offsets\[0\]"):
        layer(idx, torch.cat([off[:1] + 1, off[1:]]), sc)
    with pytest.raises(ValueError, match=r"offsets\[-1\]"):
        layer(torch.cat([idx, idx[:1]]), off, sc)
    with pytest.raises(TypeError, match="indices"):
        layer(idx.float(), off, sc)
    bad = idx.clone()
    bad[-1] = 3  # feature "cat" has 3 rows
    if off[-2] < off[-1]:
        with pytest.raises(IndexError, match="feature"):
            layer(bad, off, sc)


# ------------------------------------------------------------------------------------------------ sparse

@pytest.mark.parametrize("device,backend", PAIRS)
def test_sparse_sgd_and_sparse_adam(device, backend):
    dense = ScenarioEmbedding(MIXED, 3, 4, backend=backend, device=device)
    sparse = ScenarioEmbedding(MIXED, 3, 4, backend=backend, sparse=True, device=device)
    sparse.load_state_dict(dense.state_dict())
    idx, off, sc, _ = batch(dense)
    g, s = dense(idx, off, sc)
    (g.pow(2).sum() + s.pow(2).sum()).backward()
    opt = torch.optim.SGD(sparse.parameters(), lr=0.5)
    g, s = sparse(idx, off, sc)
    (g.pow(2).sum() + s.pow(2).sum()).backward()
    assert sparse.global_weight.grad.is_sparse and sparse.scenario_weight.grad.is_sparse
    torch.testing.assert_close(sparse.global_weight.grad.to_dense(), dense.global_weight.grad)
    torch.testing.assert_close(sparse.scenario_weight.grad.to_dense(), dense.scenario_weight.grad)
    before = dense.global_weight.detach().clone()
    opt.step()
    torch.testing.assert_close(sparse.global_weight.detach(), before - 0.5 * dense.global_weight.grad)
    opt = torch.optim.SparseAdam(sparse.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        g, s = sparse(idx, off, sc)
        (g.pow(2).sum() + s.pow(2).sum()).backward()
        opt.step()
    assert torch.isfinite(sparse.global_weight).all()


# ------------------------------------------------------------------------------------------------ fused optimizers

def _unfused_step(layer, optimizer, lr, eps, gstate=None, sstate=None):
    """The update of the fused path written in PyTorch from the dense gradients (untouched rows have g = 0)."""
    with torch.no_grad():
        for w, st in ((layer.global_weight, gstate), (layer.scenario_weight, sstate)):
            g = w.grad.double()
            if optimizer == "sgd":
                w.copy_((w.double() - lr * g).to(w.dtype))
            else:
                st += (g * g).mean(-1).float()
                w.copy_((w.double() - lr * g / (st.double().sqrt() + eps).unsqueeze(-1)).to(w.dtype))
            w.grad = None


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("features", [FEATURES, MIXED, SEQ], ids=["sum", "mixed", "none"])
def test_fused_optimizer_matches_unfused(device, backend, optimizer, features):
    lr, eps = 0.3, 1e-6
    fused = ScenarioEmbedding(features, 3, 5, backend=backend, optimizer=optimizer, lr=lr, eps=eps, device=device)
    plain = ScenarioEmbedding(features, 3, 5, backend=backend, device=device)
    plain.load_state_dict(fused.state_dict(), strict=False)
    gstate = torch.zeros(plain.global_weight.shape[0], device=device)
    sstate = torch.zeros(plain.scenario_weight.shape[:2], device=device)
    start = fused.global_weight.detach().clone()
    use_psw = all(f.pooling == "sum" for f in fused.features)
    for step in range(3):
        # few rows and long bags: duplicated rows in a batch must be summed before the row's update
        idx, off, sc, w = batch(fused, B=5, max_bag=4, psw=use_psw)
        rg = None
        outs = []
        for layer in (fused, plain):
            g, s = layer(idx, off, sc, per_sample_weights=w)
            if rg is None:
                rg, rs = torch.randn_like(g), torch.randn_like(s)
            outs.append((g, s))
            ((g * rg).sum() + (s * rs).sum()).backward()
        torch.testing.assert_close(outs[0], outs[1], **TOL32)
        assert fused.global_weight.grad is None and fused.scenario_weight.grad is None, "fused path made a grad"
        _unfused_step(plain, optimizer, lr, eps, gstate, sstate)
        torch.testing.assert_close(fused.global_weight.detach(), plain.global_weight.detach(), **TOL32)
        torch.testing.assert_close(fused.scenario_weight.detach(), plain.scenario_weight.detach(), **TOL32)
        if optimizer == "rowwise_adagrad":
            torch.testing.assert_close(fused.global_state, gstate, **TOL32)
            torch.testing.assert_close(fused.scenario_state, sstate, **TOL32)
    assert not torch.equal(fused.global_weight.detach(), start)
    if optimizer == "rowwise_adagrad":
        sd = fused.state_dict()
        assert torch.equal(sd["global_state"], fused.global_state) and sd["scenario_state"].abs().sum() > 0


@pytest.mark.parametrize("device,backend", PAIRS)
def test_fused_masks_scenarios_updates_in_eval_and_skips_no_grad(device, backend):
    layer = ScenarioEmbedding(FEATURES, 3, 4, backend=backend, optimizer="sgd", lr=1.0, device=device)
    idx, off, _, _ = batch(layer, B=4)
    sc = torch.zeros(4, dtype=torch.long, device=device)  # every sample in scenario 0
    before = layer.scenario_weight.detach().clone()
    g, s = layer(idx, off, sc)
    (g.sum() + s.sum()).backward()
    assert torch.equal(layer.scenario_weight[1:], before[1:]), "other scenarios' tables were updated"
    assert not torch.equal(layer.scenario_weight[0], before[0])
    # eval mode: the fused update still runs (FBGEMM / TorchRec: every backward updates, whatever .training is)
    snap = layer.global_weight.detach().clone()
    layer.eval()
    g, s = layer(idx, off, sc)
    (g.sum() + s.sum()).backward()
    assert not torch.equal(layer.global_weight, snap) and layer.global_weight.grad is None
    # no_grad: plain forward, no update
    snap = layer.global_weight.detach().clone()
    layer.train()
    with torch.no_grad():
        layer(idx, off, sc)
    assert torch.equal(layer.global_weight, snap)
    with pytest.raises(ValueError, match="per_sample_weights"):
        layer(idx, off, sc, per_sample_weights=torch.rand(idx.numel(), device=device,
                                                                         requires_grad=True))


def test_fused_twice_before_backward():
    """Two forwards before one backward (e.g. two towers sharing the layer): both updates apply."""
    fused = ScenarioEmbedding(FEATURES, 2, 4, optimizer="sgd", lr=0.1)
    plain = ScenarioEmbedding(FEATURES, 2, 4)
    plain.load_state_dict(fused.state_dict())
    b1, b2 = batch(fused), batch(fused)
    for layer in (fused, plain):
        loss = sum(sum(o.pow(2).sum() for o in layer(*b[:3])) for b in (b1, b2))
        loss.backward()
    _unfused_step(plain, "sgd", 0.1, 0.0)
    torch.testing.assert_close(fused.global_weight.detach(), plain.global_weight.detach(), **TOL32)
    torch.testing.assert_close(fused.scenario_weight.detach(), plain.scenario_weight.detach(), **TOL32)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_low_precision_tables(device, backend, dtype):
    """``.to(dtype)`` converts the tables but keeps the Adagrad states float32; the fused step matches unfused."""
    fused = ScenarioEmbedding(FEATURES, 2, 4, backend=backend, optimizer="rowwise_adagrad", lr=0.1,
                              device=device).to(dtype)
    assert fused.global_weight.dtype == dtype and fused.global_state.dtype == torch.float32
    assert fused.scenario_state.dtype == torch.float32
    plain = ScenarioEmbedding(FEATURES, 2, 4, backend=backend, dtype=dtype, device=device)
    plain.load_state_dict(fused.state_dict(), strict=False)
    gstate, sstate = torch.zeros_like(fused.global_state), torch.zeros_like(fused.scenario_state)
    idx, off, sc, _ = batch(fused)
    for layer in (fused, plain):
        g, s = layer(idx, off, sc)
        (g.float().sum() + 2 * s.float().sum()).backward()
    _unfused_step(plain, "rowwise_adagrad", 0.1, 1e-8, gstate, sstate)
    tol = tolerance(dtype)
    torch.testing.assert_close(fused.global_weight.float(), plain.global_weight.float(), **tol)
    torch.testing.assert_close(fused.scenario_weight.float(), plain.scenario_weight.float(), **tol)
    torch.testing.assert_close(fused.global_state, gstate, **tol)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_layer_torch_compile(device, backend):
    """The layer (one pooling run, no fused optimizer) compiles with fullgraph=True, forward and backward."""
    torch._dynamo.reset()
    eager = ScenarioEmbedding(FEATURES, 2, 4, backend=backend, device=device)
    comp = ScenarioEmbedding(FEATURES, 2, 4, backend=backend, device=device)
    comp.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    idx, off, sc, _ = batch(eager)
    ye, yc = eager(idx, off, sc), compiled(idx, off, sc)
    torch.testing.assert_close(yc, ye)
    sum(t.pow(2).sum() for t in ye).backward()
    sum(t.pow(2).sum() for t in yc).backward()
    torch.testing.assert_close(comp.global_weight.grad, eager.global_weight.grad)
    torch.testing.assert_close(comp.scenario_weight.grad, eager.scenario_weight.grad)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_fused_bounds_zero_skips_bad_ids(device, backend, optimizer):
    """With bounds_check='zero' a bad id updates no row (not the next feature's first row either)."""
    fused = ScenarioEmbedding(FEATURES, 2, 4, backend=backend, optimizer=optimizer, lr=0.2, bounds_check="zero",
                              device=device)
    plain = ScenarioEmbedding(FEATURES, 2, 4, backend=backend, bounds_check="zero", device=device)
    plain.load_state_dict(fused.state_dict(), strict=False)
    B = 3
    while True:  # feature 0 needs an id to corrupt
        idx, off, sc, _ = batch(fused, B=B, max_bag=3)
        if int(off[B]) > 0:
            break
    idx[0] = 5  # feature "user" has 5 rows: one past its end is feature "item"'s row 0 (global row 5)
    idx[int(off[B]):int(off[2 * B])].clamp_(min=1)  # and no genuine id of "item" reads its row 0
    start = fused.global_weight.detach().clone()
    gstate = torch.zeros(fused.global_weight.shape[0], device=device)
    sstate = torch.zeros(fused.scenario_weight.shape[:2], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layer in (fused, plain):
            g, s = layer(idx, off, sc)
            (g.sum() + 3 * s.sum()).backward()
    assert torch.equal(fused.global_weight[5], start[5]), "the bad id updated the next feature's row"
    _unfused_step(plain, optimizer, 0.2, 1e-8, gstate, sstate)
    torch.testing.assert_close(fused.global_weight.detach(), plain.global_weight.detach(), **TOL32)
    torch.testing.assert_close(fused.scenario_weight.detach(), plain.scenario_weight.detach(), **TOL32)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_fused_deterministic(device, backend):
    """Under deterministic algorithms the fused Adagrad step is bitwise repeatable (duplicated rows included)."""
    base = ScenarioEmbedding(FEATURES, 2, 8, backend=backend, optimizer="rowwise_adagrad", device=device)
    idx, off, sc, w = batch(base, B=16, max_bag=6, psw=True)
    rg = torch.randn(16, 3, 8, device=device)
    det = torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(3):
            layer = ScenarioEmbedding(FEATURES, 2, 8, backend=backend, optimizer="rowwise_adagrad", device=device)
            layer.load_state_dict(base.state_dict())
            g, s = layer(idx, off, sc, per_sample_weights=w)
            ((g * rg).sum() + s.sum()).backward()
            results.append([t.detach().clone() for t in layer.state_dict().values()])
    finally:
        torch.use_deterministic_algorithms(det)
    for again in results[1:]:
        for a, b in zip(results[0], again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("optimizer", [None, "rowwise_adagrad"])
def test_reference_layer_twin(device, backend, optimizer):
    """docs/design.md section 3: the reference layer has the same parameter (and Adagrad buffer) names; a state_dict moves between
    them unchanged and both give the same outputs and gradients."""
    layers = pytest.importorskip("saml_kernels.reference.layers")
    ours = ScenarioEmbedding(FEATURES, 3, 4, backend=backend, device=device, optimizer=optimizer)
    ref = layers.RefScenarioEmbedding(FEATURES, 3, 4, device=device, optimizer=optimizer)
    assert set(ref.state_dict()) == set(ours.state_dict())
    ref.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())
    if optimizer is not None:  # a fused layer makes no gradient (in eval() too): compare its gradient twin
        plain = ScenarioEmbedding(FEATURES, 3, 4, backend=backend, device=device)
        plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith("_state")})
        ours = plain
    idx, off, sc, _ = batch(ours)
    yo, yr = ours(idx, off, sc), ref(idx, off, sc)
    torch.testing.assert_close(yo, yr, **TOL32)
    sum((t * t).sum() for t in yo).backward()
    sum((t * t).sum() for t in yr).backward()
    torch.testing.assert_close(ours.global_weight.grad, ref.global_weight.grad, **TOL32)
    torch.testing.assert_close(ours.scenario_weight.grad, ref.scenario_weight.grad, **TOL32)


# ------------------------------------------------------------------------------------------------ KJT keys by name

class KJT(FakeKJT):
    """FakeKJT that can also say it is variable-batch."""

    variable = False

    def variable_stride_per_key(self):
        return self.variable


def _kjt_from(layer, idx, off, order, extra=None, w=None):
    """A KJT holding the layer's features in ``order`` (plus an ``extra`` feature of random ids)."""
    F, B = layer.num_features, (off.numel() - 1) // layer.num_features
    names = layer.feature_names
    parts, lens, ws = [], [], []
    for name in order:
        if name == "extra":
            l = torch.randint(0, 3, (B,))
            parts.append(torch.randint(0, 1000, (int(l.sum()),)))
            lens.append(l)
            ws.append(torch.rand(int(l.sum())))
            continue
        f = names.index(name)
        a, b = int(off[f * B]), int(off[(f + 1) * B])
        parts.append(idx[a:b])
        lens.append(off[f * B + 1:(f + 1) * B + 1] - off[f * B:(f + 1) * B])
        ws.append(w[a:b] if w is not None else None)
    lengths = torch.cat(lens)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    weights = torch.cat(ws) if w is not None else None
    return KJT(order, torch.cat(parts), offsets, weights)


def test_kjt_keys_matched_by_name():
    layer = ScenarioEmbedding(FEATURES, 3, 4)
    idx, off, sc, _ = batch(layer, B=6)
    w = torch.rand(idx.numel())
    expected = layer(idx, off, sc, per_sample_weights=w)
    for order in (["cat", "user", "item"], ["item", "extra", "cat", "user"]):
        got = layer(_kjt_from(layer, idx, off, order, w=w), sc)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"lack the layer's feature\(s\) \['item'\]"):
        layer(_kjt_from(layer, idx, off, ["cat", "user"]), sc)
    kjt = _kjt_from(layer, idx, off, ["user", "item", "cat"])
    kjt.variable = True
    with pytest.raises(ValueError, match="variable-batch"):
        layer(kjt, sc)


# ------------------------------------------------------------------------------------------------ warnings

def test_sparse_gradients_emit_no_warning():
    layer = ScenarioEmbedding(FEATURES, 2, 4, sparse=True)
    idx, off, sc, _ = batch(layer, B=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g, s = layer(idx, off, sc)
        (g.sum() + s.sum()).backward()
        torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert layer.global_weight.grad.is_sparse
