"""Hashed scenario tables: an aware feature f with Rs_f < Rg_f scenario rows maps id to scenario
row ``feature_scenario_rows[f] + hash(id) mod Rs_f`` (ops/scenario_hash.py, csrc/include/saml_common.h).

The oracle is a float64 loop with the pure-Python hash of tests/oracles.py (``py_hash``: Python ints, no
torch), so it shares no code with the package. Small Rs_f (1, 3, 7) make many ids collide: colliding ids must share one row, their
gradients sum into it and the fused optimizer updates it once per step. Triton runs on CPU tensors only under
``TRITON_INTERPRET=1`` (params marked ``triton_interp``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import saml_kernels
from conftest import device_backends, tolerance
from oracles import id_hash as py_hash  # the float64 oracles' pure-Python hash (no torch, no package)
from oracles import scenario_local as py_local
from saml_kernels import serving
from saml_kernels.data import make_synthetic
from saml_kernels.nn import SAML, SAMLConfig, ScenarioEmbedding, TrainingOptimizer
from saml_kernels.ops import scenario_hash as sh
from saml_kernels.reference.layers import RefScenarioEmbedding

OP = "scenario_embedding_bag"
PAIRS = device_backends(OP)


# ------------------------------------------------------------------------------------------------ the hash

def id_sweep() -> list:
    ids = list(range(0, 300)) + [2 ** k + d for k in range(8, 63) for d in (-1, 0, 1)] + [2 ** 63 - 1]
    g = torch.Generator().manual_seed(5)
    ids += torch.randint(0, 2 ** 62, (200,), generator=g).tolist()
    return ids


def test_hash_twins_agree_on_int32_and_int64_ids():
    """torch twin = pure-Python formula = the C++ ``saml::seb_scenario_local`` (CPU build), for ids up to 2^63 - 1;
    int32 ids give the same rows as their int64 values."""
    ids = id_sweep()
    t = torch.tensor(ids, dtype=torch.int64)
    assert sh.id_hash(t).tolist() == [py_hash(i) for i in ids]
    for srows in (1, 3, 7, 65521, 2 ** 32 - 1):
        want = [py_hash(i) % srows for i in ids]
        assert sh.scenario_local(t, 2 ** 63 - 1, srows).tolist() == want
        assert torch.ops.saml_C.seb_scenario_local(t, 2 ** 63 - 1, srows).tolist() == want
        small, r32 = t[t < 2 ** 31], min(srows, 2 ** 31 - 1)
        for dt in (torch.int32, torch.int64):
            got = torch.ops.saml_C.seb_scenario_local(small.to(dt), 2 ** 31, r32)
            assert got.tolist() == [py_hash(i) % r32 for i in small.tolist()]
    # Rs_f == Rg_f: the id itself
    assert torch.equal(torch.ops.saml_C.seb_scenario_local(t, 2 ** 63 - 1, 2 ** 63 - 1), t)


@pytest.mark.triton_interp
def test_hash_triton_twin():
    pytest.importorskip("triton")
    from saml_kernels.triton import scenario_embedding_bag as tseb
    if not saml_kernels._backend.triton_interpret():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    t = torch.tensor(id_sweep(), dtype=torch.int64)
    for srows in (1, 7, 65521, 2 ** 32 - 1):
        assert torch.equal(tseb.scenario_local_rows(t, 2 ** 63 - 1, srows), sh.scenario_local(t, 2 ** 63 - 1, srows))
    small = t[t < 2 ** 31]
    assert torch.equal(tseb.scenario_local_rows(small.to(torch.int32), 2 ** 31, 7), sh.scenario_local(small, 2 ** 31, 7))


# ------------------------------------------------------------------------------------------------ the op

# features: (ids Rg_f, aware, scenario rows Rs_f): hashed to 3, not aware, hashed to 1, unhashed, hashed to 7
FEATURES = [(40, True, 3), (9, False, 0), (25, True, 1), (6, True, 6), (50, True, 7)]


def layout(features=FEATURES):
    fr, fsr = [0], [0]
    for rows, aware, srows in features:
        fr.append(fr[-1] + rows)
        fsr.append(fsr[-1] + (srows if aware else 0))
    return fr, fsr


def make(B=6, M=3, D=5, dtype=torch.float32, idx_dtype=torch.int64, pooling="sum", psw=False, device="cpu", L=2):
    F = len(FEATURES)
    fr, fsr = layout()
    lengths = torch.full((F * B,), L) if pooling == "none" else torch.randint(0, 5, (F * B,))
    offsets = torch.zeros(F * B + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    ids = torch.cat([torch.randint(0, FEATURES[f][0], (int(lengths[f * B:(f + 1) * B].sum()),)) for f in range(F)])
    w = (torch.rand(ids.numel(), dtype=dtype) * 2 - 0.5).to(device) if psw else None
    return dict(indices=ids.to(idx_dtype).to(device), offsets=offsets.to(idx_dtype).to(device),
                scenario=torch.randint(0, M, (B,)).to(device), G=torch.randn(fr[-1], D, dtype=dtype, device=device),
                S=torch.randn(M, fsr[-1], D, dtype=dtype, device=device), fr=fr, fsr=fsr, psw=w)


def oracle(inp, pooling, G, S, psw):
    """float64 loop: scenario row = fsr[f] + py_local(id) (Python ints)."""
    idx, off, sc = inp["indices"].tolist(), inp["offsets"].tolist(), inp["scenario"].tolist()
    fr, fsr = inp["fr"], inp["fsr"]
    F, D = len(fr) - 1, G.shape[1]
    B = (len(off) - 1) // F
    gout, sout = [], []
    for b in range(B):
        grow, srow = [], []
        for f in range(F):
            rows, srows = fr[f + 1] - fr[f], fsr[f + 1] - fsr[f]
            gv, sv = [], []
            for i in range(off[f * B + b], off[f * B + b + 1]):
                w = psw[i] if psw is not None else 1.0
                gv.append(G[fr[f] + idx[i]] * w)
                if srows:
                    sv.append(S[sc[b], fsr[f] + py_local(idx[i], rows, srows)] * w)
            red = (lambda v: torch.stack(v)) if pooling == "none" else (
                lambda v: (torch.stack(v).sum(0) / (len(v) if pooling == "mean" else 1)) if v else G.new_zeros(D))
            grow.append(red(gv))
            if srows:
                srow.append(red(sv))
        gout.append(torch.stack(grow))
        sout.append(torch.stack(srow))
    return torch.stack(gout), torch.stack(sout)


def run(inp, backend, pooling, G, S, psw, sparse=False):
    return saml_kernels.scenario_embedding_bag(inp["indices"], inp["offsets"], inp["scenario"], G, S, inp["fr"],
                                               inp["fsr"], pooling=pooling, per_sample_weights=psw, sparse=sparse,
                                               backend=backend)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling,psw,sparse", [("sum", False, False), ("mean", False, True), ("sum", True, False),
                                                ("none", False, False)])
@pytest.mark.parametrize("dtype,idx_dtype", [(torch.float32, torch.int64), (torch.float64, torch.int32)])
def test_forward_and_gradients_vs_float64_oracle(device, backend, pooling, psw, sparse, dtype, idx_dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton kernels take float32 / 16-bit tables")
    inp = make(dtype=dtype, idx_dtype=idx_dtype, pooling=pooling, psw=psw, device=device)
    G = inp["G"].clone().requires_grad_()
    S = inp["S"].clone().requires_grad_()
    w = inp["psw"].clone().requires_grad_() if psw else None
    g, s = run(inp, backend, pooling, G, S, w, sparse)
    G64 = inp["G"].double().cpu().requires_grad_()
    S64 = inp["S"].double().cpu().requires_grad_()
    w64 = inp["psw"].double().cpu().requires_grad_() if psw else None
    eg, es = oracle(inp, pooling, G64, S64, w64)
    tol = tolerance(dtype)
    torch.testing.assert_close(g.double().cpu(), eg, **tol)
    torch.testing.assert_close(s.double().cpu(), es, **tol)
    rg, rs = torch.randn_like(eg), torch.randn_like(es)
    ((g.double().cpu() * rg).sum() + (s.double().cpu() * rs).sum()).backward()
    ((eg * rg).sum() + (es * rs).sum()).backward()
    tol = {k: v * 4 for k, v in tol.items()}
    dG = G.grad.to_dense() if G.grad.is_sparse else G.grad
    dS = S.grad.to_dense() if S.grad.is_sparse else S.grad
    torch.testing.assert_close(dG.double().cpu(), G64.grad, **tol)
    torch.testing.assert_close(dS.double().cpu(), S64.grad, **tol)
    if psw:
        torch.testing.assert_close(w.grad.double().cpu(), w64.grad, **tol)
    # collisions really happened: feature 2 (one scenario row) saw several distinct ids
    B, off = inp["scenario"].numel(), inp["offsets"].tolist()
    assert len(set(inp["indices"][off[2 * B]:off[3 * B]].tolist())) > 1


@pytest.mark.parametrize("device,backend", PAIRS)
def test_unhashed_layout_is_bitwise_the_plain_one(device, backend):
    """scenario_rows = num_embeddings for every aware feature: the same state_dict shapes and bitwise the same
    outputs and gradients as the layer without the option."""
    feats = [("a", 30, True), ("b", 8, False), ("c", 12, True)]
    torch.manual_seed(0)
    plain = ScenarioEmbedding(feats, 3, 4, backend=backend, device=device)
    same = ScenarioEmbedding(feats, 3, 4, backend=backend, device=device, scenario_rows={"a": 30, "c": 12})
    same.load_state_dict(plain.state_dict())
    assert same.feature_scenario_rows == plain.feature_scenario_rows
    B = 5
    lengths = torch.randint(0, 4, (3 * B,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
    ids = torch.cat([torch.randint(0, n, (int(lengths[f * B:(f + 1) * B].sum()),))
                     for f, (_, n, _) in enumerate(feats)]).to(device)
    sc = torch.randint(0, 3, (B,), device=device)
    outs = []
    for layer in (plain, same):
        g, s = layer(ids, offsets, sc)
        (g.square().sum() + s.sum()).backward()
        outs.append((g, s, layer.global_weight.grad, layer.scenario_weight.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_update_with_collisions_equals_the_unfused_step(device, backend, optimizer, dtype):
    """The fused step on hashed tables = the optimizer applied to the summed gradient of every row (colliding ids
    summed first, one Adagrad state update per row), computed here from plain gradients."""
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton kernels take float32 / 16-bit tables")
    feats = [("a", 40, True), ("b", 9, False), ("c", 25, True)]
    rows = {"a": 3, "c": 1}
    lr, eps = 0.1, 1e-3
    torch.manual_seed(1)
    fused = ScenarioEmbedding(feats, 2, 4, optimizer=optimizer, lr=lr, eps=eps, backend=backend, device=device,
                              dtype=dtype, scenario_rows=rows)
    plain = ScenarioEmbedding(feats, 2, 4, backend=backend, device=device, dtype=dtype, scenario_rows=rows)
    plain.load_state_dict(fused.state_dict(), strict=False)
    if optimizer == "rowwise_adagrad":  # start from a non-zero state
        fused.global_state.uniform_(0, 1)
        fused.scenario_state.uniform_(0, 1)
    gstate0 = fused.global_state.clone() if fused.global_state is not None else None
    sstate0 = fused.scenario_state.clone() if fused.scenario_state is not None else None
    B = 8
    lengths = torch.randint(1, 4, (3 * B,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
    ids = torch.cat([torch.randint(0, n, (int(lengths[f * B:(f + 1) * B].sum()),))
                     for f, (_, n, _) in enumerate(feats)]).to(device)
    sc = torch.randint(0, 2, (B,), device=device)
    up = [torch.randn(B, 3, 4, dtype=dtype, device=device), torch.randn(B, 2, 4, dtype=dtype, device=device)]
    g, s = plain(ids, offsets, sc)
    ((g * up[0]).sum() + (s * up[1]).sum()).backward()
    g2, s2 = fused(ids, offsets, sc)
    assert torch.equal(g, g2) and torch.equal(s, s2)
    ((g2 * up[0]).sum() + (s2 * up[1]).sum()).backward()
    assert fused.scenario_weight.grad is None
    for w0, grad, new, st0, st in ((plain.global_weight, plain.global_weight.grad, fused.global_weight, gstate0,
                                    fused.global_state),
                                   (plain.scenario_weight, plain.scenario_weight.grad, fused.scenario_weight, sstate0,
                                    fused.scenario_state)):
        w0, grad = w0.detach().reshape(-1, 4), grad.reshape(-1, 4)
        touched = grad.abs().sum(1) > 0
        if optimizer == "sgd":
            want = w0 - lr * grad
        else:
            st_new = st0.reshape(-1) + torch.where(touched, grad.square().mean(1).float(), torch.zeros(()))
            want = w0 - (lr / (st_new.to(dtype).sqrt() + eps)).unsqueeze(1) * grad
            torch.testing.assert_close(st.reshape(-1), st_new, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(new.detach().reshape(-1, 4), torch.where(touched[:, None], want, w0),
                                   **tolerance(dtype))
    # colliding ids: the 1-row feature "c" has one scenario row per scenario, touched by several ids
    assert int(torch.unique(ids[int(offsets[2 * B]):]).numel()) > 1


@pytest.mark.parametrize("device,backend", PAIRS)
def test_int32_and_int64_ids_give_the_same_bits(device, backend):
    inp = make(device=device)
    outs = []
    for dt in (torch.int32, torch.int64):
        outs.append(saml_kernels.scenario_embedding_bag(inp["indices"].to(dt), inp["offsets"].to(dt), inp["scenario"],
                                                        inp["G"], inp["S"], inp["fr"], inp["fsr"], backend=backend))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("device,backend", device_backends("scenario_embedding_bag_8bit"))
@pytest.mark.parametrize("pooling,L", [("sum", 0), ("mean", 0), ("sum", 1), ("none", 2)])
def test_8bit_lookup_on_hashed_tables(device, backend, pooling, L):
    """The 8-bit serving op (the C++ kernel on the CPU: ids hashed by saml_common.h's seb_scenario_local; Triton;
    reference) on a hashed layout = the float64 oracle on the dequantised tables. L = 1: one-hot bags."""
    from saml_kernels.ops import scenario_embedding_bag_8bit as q8
    inp = make(pooling="none" if L else pooling, L=max(L, 1))
    Gq, Sq = q8.quantize_rows(inp["G"]), q8.quantize_rows(inp["S"])
    psw = torch.rand(inp["indices"].numel()) if pooling == "sum" and not L else None
    got = q8.scenario_embedding_bag_8bit(inp["indices"].to(device), inp["offsets"].to(device),
                                         inp["scenario"].to(device), Gq.to(device), Sq.to(device), inp["fr"],
                                         inp["fsr"], pooling=pooling, backend=backend,
                                         per_sample_weights=psw.to(device) if psw is not None else None)
    want = oracle(inp, pooling, q8.dequantize_rows(Gq).double(), q8.dequantize_rows(Sq).double(),
                  psw.double() if psw is not None else None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b, atol=2e-6, rtol=2e-6)


# ------------------------------------------------------------------------------------------------ layers, model

def test_layer_layout_and_reference_twin():
    feats = [("a", 100, True), ("b", 9, False), ("c", 25, True)]
    layer = ScenarioEmbedding(feats, 4, 3, optimizer="rowwise_adagrad", scenario_rows={"a": 16})
    ref = RefScenarioEmbedding(feats, 4, 3, optimizer="rowwise_adagrad", scenario_rows={"a": 16})
    assert layer.feature_scenario_rows == (0, 16, 16, 41) == tuple(ref.feature_scenario_rows)
    assert layer.scenario_weight.shape == (4, 41, 3) and layer.scenario_state.shape == (4, 41)
    assert layer.global_weight.shape == (134, 3)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert "hashed_scenario_rows={'a': 16}" in repr(layer)
    ref.load_state_dict(layer.state_dict())
    ids = torch.tensor([5, 99, 37, 2, 3, 8, 24, 1])
    offsets = torch.tensor([0, 2, 3, 4, 6, 7, 8])
    sc = torch.tensor([1, 3])
    for a, b in zip(layer(ids, offsets, sc), ref(ids, offsets, sc)):
        torch.testing.assert_close(a, b)


DATA = make_synthetic(200, num_users=60, num_items=80, num_categories=7, num_contexts=5, num_segments=6,
                      num_tags=11, seq_len=5, seed=4)


@pytest.fixture(scope="module")
def hashed_model():
    torch.manual_seed(0)
    aware = [f.name for f in DATA.features if f.scenario_aware]
    rows = {aware[0]: 4, DATA.sequence.name: 5}
    cfg = SAMLConfig.from_data(DATA, embedding_dim=8, attention_dim=4, aux_hidden=(12,), branch_hidden=(10,),
                               scenario_rows=rows)
    model = SAML(cfg)
    opt = TrainingOptimizer(model, lr=1e-2)
    losses = []
    for k in range(4):
        opt.zero_grad()
        loss = model.loss(DATA.batch(np.arange(32 * k, 32 * k + 32)))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), rows, losses


def test_saml_model_with_hashed_tables_trains_and_exports(hashed_model):
    model, rows, losses = hashed_model
    assert all(np.isfinite(losses))
    name = next(iter(rows))
    f = model.embedding.feature_names.index(name)
    fsr = model.embedding.feature_scenario_rows
    assert fsr[f + 1] - fsr[f] == 4
    assert model.sequence_embedding.scenario_weight.shape[1] == 5
    batch = DATA.batch(np.arange(100, 120))
    with torch.no_grad():
        want = model(*batch.inputs())
    for table_dtype, tol in ((None, 1e-5), ("uint8", 0.05)):
        fn = serving.served_module(serving.export_saml(model, DATA.batch(np.arange(8)), table_dtype=table_dtype))
        with torch.no_grad():
            got = fn(*batch.inputs())
        torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("rows,match", [
    ({"a": 0}, r"feature 'a'.*\[1, num_embeddings = 30\].*got 0"),
    ({"a": 31}, r"feature 'a'.*got 31"),
    ({"a": 2.0}, r"feature 'a'.*got 2.0"),
    ({"a": True}, r"feature 'a'.*got True"),
    ({"a": "4"}, r"feature 'a'.*got '4'"),
    ({"b": 4}, r"feature 'b'.*not scenario-aware"),
    ({"zz": 4}, r"'zz'.*not one of"),
    ([("a", 4)], r"mapping"),
])
def test_bad_scenario_rows_raise_at_construction(rows, match):
    feats = [("a", 30, True), ("b", 8, False)]
    for cls in (ScenarioEmbedding, RefScenarioEmbedding):
        with pytest.raises(ValueError, match=match):
            cls(feats, 2, 4, scenario_rows=rows)
    aware = [f.name for f in DATA.features if f.scenario_aware]
    with pytest.raises(ValueError, match="SAMLConfig.*feature"):
        SAMLConfig.from_data(DATA, scenario_rows={aware[0]: 0})


def test_op_rejects_a_scenario_range_larger_than_the_ids():
    with pytest.raises(ValueError, match="feature 0 6 scenario rows.*5 global rows"):
        saml_kernels.scenario_embedding_bag(torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([0]),
                                            torch.zeros(5, 2), torch.zeros(1, 6, 2), [0, 5], [0, 6])


# ------------------------------------------------------------------------------------------------ TorchRec

def test_torchrec_adapter_feeds_hashed_ids_to_the_scenario_tables():
    """The TorchRec form of a hashed layer: f__scenario tables of M * Rs_f rows, ids remapped to
    scenario * Rs_f + hash(id) mod Rs_f: lookups and table gradients equal the fused op's."""
    T = pytest.importorskip("saml_kernels.torchrec", exc_type=ImportError)
    feats = [("a", 40, True, "sum"), ("b", 9, False, "sum"), ("c", 25, True, "sum")]
    emb = ScenarioEmbedding(feats, 3, 4, scenario_rows={"a": 3, "c": 7})
    tr = T.TorchRecScenarioEmbedding(emb)
    assert tr.table_rows == {"a": 40, "b": 9, "c": 25, "a__scenario": 9, "c__scenario": 21}
    B = 6
    lengths = torch.randint(0, 4, (3 * B,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.cat([torch.randint(0, n, (int(lengths[f * B:(f + 1) * B].sum()),))
                     for f, (_, n, _, _) in enumerate(feats)])
    sc = torch.randint(0, 3, (B,))
    out, ref = tr(ids, offsets, sc), emb(ids, offsets, sc)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-6)
    gy = [torch.randn_like(o) for o in out]
    torch.autograd.backward(out, gy)
    torch.autograd.backward(ref, gy)
    grad_layer = ScenarioEmbedding(feats, 3, 4, scenario_rows={"a": 3, "c": 7})
    with torch.no_grad():
        grad_layer.global_weight.copy_(emb.global_weight.grad)
        grad_layer.scenario_weight.copy_(emb.scenario_weight.grad)
    want = T.table_weights(grad_layer)
    got = {n.split(".")[-2]: p.grad for n, p in tr.ebc.named_parameters()}
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    gw, sw = tr.scenario_embedding_weights()
    assert torch.equal(sw, emb.scenario_weight.detach()) and torch.equal(gw, emb.global_weight.detach())
