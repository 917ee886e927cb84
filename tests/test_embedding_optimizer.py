"""Fused optimizer in the backward (saml_kernels.ops.embedding_optimizer.backward_update) against the unfused
path: the gradient from the public op (dense autograd gradients) and the same update written here in PyTorch.

    SGD:               W <- W - lr * dW
    row-wise Adagrad:  state <- state + mean_d(dW^2);  W <- W - lr * dW / (sqrt(state) + eps)

(on untouched rows dW = 0, so the dense formulas leave them unchanged, as the fused update must).
"""
from __future__ import annotations

import pytest
import torch

import saml_kernels
from saml_kernels.nn import ScenarioEmbedding
from saml_kernels.ops import embedding_optimizer as eo
from saml_kernels.ops import scenario_embedding_bag as seb

from conftest import device_backends

OP = seb.OP
TOL = dict(atol=2e-5, rtol=2e-5)


def make_case(device, itype=torch.int64, B=24, D=8, M=3, sizes=(5, 7, 4), aware=(1, 0, 1), max_len=4):
    """Small tables and many ids, so rows repeat within the batch (duplicates must be summed first)."""
    F = len(sizes)
    fr = [0] + torch.tensor(sizes).cumsum(0).tolist()
    fsr = [0]
    for s, a in zip(sizes, aware):
        fsr.append(fsr[-1] + (s if a else 0))
    lens = torch.randint(0, max_len + 1, (F * B,))
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    feat = torch.repeat_interleave(torch.arange(F * B) // B, lens)
    idx = (torch.rand(int(off[-1])) * torch.tensor(sizes)[feat]).long()
    keys = feat * 1000 + idx
    return dict(has_duplicates=keys.unique().numel() < keys.numel(), indices=idx.to(itype).to(device), offsets=off.to(itype).to(device),
                scenario=torch.randint(0, M, (B,), device=device), fr=fr, fsr=fsr,
                gw=torch.randn(fr[-1], D, device=device), sw=torch.randn(M, fsr[-1], D, device=device))


def unfused(c, backend, pooling, psw, gg, gs):
    """(dG, dS) by the public op's ordinary autograd (dense gradients)."""
    gw = c["gw"].clone().requires_grad_()
    sw = c["sw"].clone().requires_grad_()
    g, s = saml_kernels.scenario_embedding_bag(c["indices"], c["offsets"], c["scenario"], gw, sw, c["fr"], c["fsr"],
                                               pooling=pooling, per_sample_weights=psw, backend=backend)
    torch.autograd.backward([g, s], [gg, gs])
    return gw.grad, sw.grad


def fused(c, backend, pooling, psw, gg, gs, optimizer, lr, eps, gw, sw, gst=None, sst=None):
    fr, fsr, slot, _ = seb.table_layout(c["fr"], c["fsr"], gw.shape[0], sw.shape[1], gw.device)
    pw = None if psw is None else psw.to(gw.dtype).contiguous()
    eo.backward_update(backend, gg, gs, c["indices"], c["offsets"], c["scenario"], gw, sw, fr, fsr, slot, pw,
                       seb.POOLING[pooling], 0, gst, sst, optimizer, eo.make_hparams(lr, eps, device=gw.device))


@pytest.mark.parametrize("device,backend", device_backends(OP))
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("pooling,use_psw", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
def test_fused_update_matches_unfused(device, backend, optimizer, pooling, use_psw, itype):
    c = make_case(device, itype)
    nnz = c["indices"].numel()
    psw = torch.randn(nnz, device=device) if use_psw else None
    B, F, Fs, D = c["scenario"].numel(), 3, 2, c["gw"].shape[1]
    gg, gs = torch.randn(B, F, D, device=device), torch.randn(B, Fs, D, device=device)
    lr, eps = 0.1, 1e-3
    dG, dS = unfused(c, backend, pooling, psw, gg, gs)
    # duplicates really occur in this batch (otherwise the test could not catch an unsummed update)
    assert c["has_duplicates"]
    gw, sw = c["gw"].clone(), c["sw"].clone()
    if optimizer == "sgd":
        fused(c, backend, pooling, psw, gg, gs, optimizer, lr, eps, gw, sw)
        torch.testing.assert_close(gw, c["gw"] - lr * dG, **TOL)
        torch.testing.assert_close(sw, c["sw"] - lr * dS, **TOL)
    else:
        gst0 = torch.rand(gw.shape[0], device=device)
        sst0 = torch.rand(sw.shape[0] * sw.shape[1], device=device)
        gst, sst = gst0.clone(), sst0.clone()
        fused(c, backend, pooling, psw, gg, gs, optimizer, lr, eps, gw, sw, gst, sst)
        eg = gst0 + dG.pow(2).mean(-1)
        es = sst0 + dS.reshape(-1, D).pow(2).mean(-1)
        torch.testing.assert_close(gst, eg, **TOL)
        torch.testing.assert_close(sst, es, **TOL)
        torch.testing.assert_close(gw, c["gw"] - lr * dG / (eg.sqrt() + eps).unsqueeze(1), **TOL)
        torch.testing.assert_close(sw, c["sw"] - lr * dS / (es.sqrt() + eps).view(sw.shape[0], -1, 1), **TOL)
    # rows never touched stay bitwise unchanged
    untouched = (dG == 0).all(1)
    assert torch.equal(gw[untouched], c["gw"][untouched])


@pytest.mark.parametrize("device,backend", device_backends(OP))
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_fused_update_deterministic(device, backend, optimizer):
    """Bitwise repeatable in deterministic mode (and, on the cpu backend, for any thread count)."""
    c = make_case(device, B=64, sizes=(6, 40), aware=(1, 1), max_len=6)
    B, D = c["scenario"].numel(), c["gw"].shape[1]
    gg, gs = torch.randn(B, 2, D, device=device), torch.randn(B, 2, D, device=device)
    results = []
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for threads in ((1, 2, 2) if backend == "cpu" else (old_threads, old_threads)):
            torch.set_num_threads(threads)
            gw, sw = c["gw"].clone(), c["sw"].clone()
            gst = torch.zeros(gw.shape[0], device=device)
            sst = torch.zeros(sw.shape[0] * sw.shape[1], device=device)
            for _ in range(2):
                fused(c, backend, "sum", None, gg, gs, optimizer, 0.05, 1e-6, gw, sw, gst, sst)
            results.append((gw, sw, gst, sst))
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
    for r in results[1:]:
        for x, y in zip(r, results[0]):
            assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fused_update_cpu_low_and_double_precision(dtype):
    """Other table dtypes: same update (fp32 accumulation; float64 in float64)."""
    from saml_kernels import _ext
    if not _ext.has_cpu_ext():
        pytest.skip("C++ extension not built")
    c = make_case("cpu")
    c["gw"], c["sw"] = c["gw"].to(dtype), c["sw"].to(dtype)
    B, D = c["scenario"].numel(), c["gw"].shape[1]
    gg, gs = torch.randn(B, 3, D, dtype=dtype), torch.randn(B, 2, D, dtype=dtype)
    dG, dS = unfused(c, "reference", "sum", None, gg, gs)
    gw, sw = c["gw"].clone(), c["sw"].clone()
    fused(c, "cpu", "sum", None, gg, gs, "sgd", 0.1, 0.0, gw, sw)
    tol = {torch.float64: dict(atol=1e-12, rtol=1e-12)}.get(dtype, dict(atol=3e-2, rtol=3e-2))
    torch.testing.assert_close(gw.double(), (c["gw"].double() - 0.1 * dG.double()), **tol)
    torch.testing.assert_close(sw.double(), (c["sw"].double() - 0.1 * dS.double()), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer,wd", [("sgd", 0.0), ("sgd", 0.03), ("rowwise_adagrad", 0.0)])
@pytest.mark.parametrize("D", [8, 21])
def test_fused_update_cpu_low_precision_rounds_once(dtype, optimizer, wd, D):
    """With stochastic rounding off, a 16-bit table's update is the float32 update of the same values, rounded
    once (to nearest even) into the table: bitwise what a float32 table started from those values gets, then
    converted (float16 rows take the 8-lane F16C loops where the CPU has them; D = 21 adds a scalar tail). The
    default, stochastic rounding: tests/test_stochastic_rounding.py."""
    from saml_kernels import _ext
    if not _ext.has_cpu_ext():
        pytest.skip("C++ extension not built")
    c = make_case("cpu", D=D)
    gw16, sw16 = c["gw"].to(dtype), c["sw"].to(dtype)
    B, D = c["scenario"].numel(), c["gw"].shape[1]
    gg, gs = torch.randn(B, 3, D).to(dtype), torch.randn(B, 2, D).to(dtype)
    fr, fsr, slot, _ = seb.table_layout(c["fr"], c["fsr"], gw16.shape[0], sw16.shape[1], "cpu")
    adagrad = optimizer == "rowwise_adagrad"
    gst0, sst0 = torch.rand(gw16.shape[0]), torch.rand(sw16.shape[0], sw16.shape[1])
    out = {}
    for name, cast in (("low", lambda t: t.clone()), ("f32", lambda t: t.float())):
        gw, sw = cast(gw16), cast(sw16)
        gst, sst = (gst0.clone(), sst0.clone()) if adagrad else (None, None)
        eo.backward_update("cpu", cast(gg), cast(gs), c["indices"], c["offsets"], c["scenario"], gw, sw, fr, fsr,
                           slot, None, seb.POOLING["sum"], 0, gst, sst, optimizer,
                           eo.make_hparams(0.1, 1e-6, weight_decay=wd, device="cpu", stochastic_rounding=False))
        out[name] = (gw, sw, gst, sst)
    assert not torch.equal(out["low"][0], gw16), "the update changed nothing"
    assert torch.equal(out["low"][0], out["f32"][0].to(dtype))
    assert torch.equal(out["low"][1], out["f32"][1].to(dtype))
    if adagrad:
        assert torch.equal(out["low"][2], out["f32"][2]) and torch.equal(out["low"][3], out["f32"][3])


def test_bad_arguments():
    c = make_case("cpu")
    B, D = c["scenario"].numel(), c["gw"].shape[1]
    gg, gs = torch.zeros(B, 3, D), torch.zeros(B, 2, D)
    with pytest.raises(ValueError, match="optimizer"):
        fused(c, "reference", "sum", None, gg, gs, "adam", 0.1, 0.0, c["gw"].clone(), c["sw"].clone())
    with pytest.raises(ValueError, match="global_state"):
        fused(c, "reference", "sum", None, gg, gs, "rowwise_adagrad", 0.1, 0.0, c["gw"].clone(), c["sw"].clone())
    with pytest.raises(ValueError, match="contiguous"):
        fused(c, "reference", "sum", None, gg, gs, "sgd", 0.1, 0.0, c["gw"].t().contiguous().t(), c["sw"].clone())


# ------------------------------------------------------------------ the functional op scenario_embedding_bag_fused

@pytest.mark.parametrize("device,backend", device_backends(OP))
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_fused_op_forward_and_update(device, backend, optimizer):
    """Forward: bitwise the public op's. Backward: the update of ``backward_update`` on the upstream gradients
    (bitwise), the step word advanced by one, the backward pass recorded, no gradient produced."""
    c = make_case(device)
    B, D = c["scenario"].numel(), c["gw"].shape[1]
    gg, gs = torch.randn(B, 3, D, device=device), torch.randn(B, 2, D, device=device)
    adagrad = optimizer == "rowwise_adagrad"
    st = lambda n: torch.rand(n, device=device) if adagrad else None  # noqa: E731
    gst, sst = st(c["gw"].shape[0]), st(c["sw"].shape[0] * c["sw"].shape[1])
    gw, sw = c["gw"].clone(), c["sw"].clone()
    gw_exp, sw_exp = c["gw"].clone(), c["sw"].clone()
    gst_exp, sst_exp = (gst.clone(), sst.clone()) if adagrad else (None, None)
    fused(c, backend, "sum", None, gg, gs, optimizer, 0.1, 1e-3, gw_exp, sw_exp, gst_exp, sst_exp)
    hp, passes = eo.make_hparams(0.1, 1e-3, device=device), set()
    g, s = eo.scenario_embedding_bag_fused(
        c["indices"], c["offsets"], c["scenario"], gw, sw, c["fr"], c["fsr"], optimizer=optimizer, hparams=hp,
        global_state=gst, scenario_state=sst, backend=backend, backward_passes=passes)
    g0, s0 = saml_kernels.scenario_embedding_bag(c["indices"], c["offsets"], c["scenario"], c["gw"], c["sw"],
                                                 c["fr"], c["fsr"], backend=backend)
    assert torch.equal(g, g0) and torch.equal(s, s0) and g.requires_grad
    assert torch.equal(gw, c["gw"])  # nothing updated before the backward
    torch.autograd.backward([g, s], [gg, gs])
    assert torch.equal(gw, gw_exp) and torch.equal(sw, sw_exp)
    if adagrad:
        assert torch.equal(gst, gst_exp) and torch.equal(sst, sst_exp)
    assert int(hp[eo.HPARAMS.index("step")]) == 1 and len(passes) == 1
    assert gw.grad is None and sw.grad is None


def test_fused_op_skips_nonfinite_and_frozen_tables():
    c = make_case("cpu")
    B, D = c["scenario"].numel(), c["gw"].shape[1]
    gw, sw, bad = c["gw"].clone(), c["sw"].clone(), torch.zeros((), dtype=torch.int64)
    kw = dict(optimizer="sgd", hparams=eo.make_hparams(0.1, 1e-3), nonfinite_steps=bad)
    g, s = eo.scenario_embedding_bag_fused(c["indices"], c["offsets"], c["scenario"], gw, sw, c["fr"], c["fsr"], **kw)
    torch.autograd.backward([g, s], [torch.full((B, 3, D), float("nan")), torch.zeros(B, 2, D)])
    assert int(bad) == 1 and torch.equal(gw, c["gw"]) and torch.equal(sw, c["sw"])
    g, s = eo.scenario_embedding_bag_fused(c["indices"], c["offsets"], c["scenario"], gw, sw, c["fr"], c["fsr"],
                                           update=(False, True), **kw)
    (g.sum() + s.sum()).backward()
    assert int(bad) == 1 and torch.equal(gw, c["gw"]) and not torch.equal(sw, c["sw"])


def test_fused_op_bad_arguments_write_nothing():
    c = make_case("cpu")
    gw, sw = c["gw"].clone(), c["sw"].clone()
    args = (c["indices"], c["offsets"], c["scenario"], gw, sw, c["fr"], c["fsr"])
    kw = dict(optimizer="sgd", hparams=eo.make_hparams(0.1, 1e-3))
    with pytest.raises(ValueError, match="per_sample_weights get no gradient"):
        eo.scenario_embedding_bag_fused(*args, per_sample_weights=torch.ones(c["indices"].numel(),
                                                                             requires_grad=True), **kw)
    with pytest.raises(ValueError, match="global_weight must be contiguous"):
        eo.scenario_embedding_bag_fused(*args[:3], gw.t().contiguous().t(), *args[4:], **kw)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        eo.scenario_embedding_bag_fused(*args, optimizer="adam", hparams=kw["hparams"])
    assert torch.equal(gw, c["gw"]) and torch.equal(sw, c["sw"])
# ------------------------------------------------------------------------- the ScenarioEmbedding layer's fused update

FEATURES = [("user", 7, True, "sum"), ("item", 9, False, "sum"), ("cat", 5, True, "sum")]


def batch(layer, B=6, max_bag=3, seed=None):
    device = layer.global_weight.device
    F = layer.num_features
    lengths = torch.randint(0, max_bag + 1, (F * B,))
    offsets = torch.zeros(F * B + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    ids = [torch.randint(0, f.num_embeddings, (int(lengths[k * B:(k + 1) * B].sum()),))
           for k, f in enumerate(layer.features)]
    return (torch.cat(ids).to(device), offsets.to(device), torch.randint(0, layer.num_scenarios, (B,), device=device))


def train(layer, batches, upstream):
    for (idx, off, sc), (ug, us) in zip(batches, upstream):
        g, s = layer(idx, off, sc)
        torch.autograd.backward([g, s], [ug, us])


def upstreams(layer, batches, D):
    out = []
    for idx, off, sc in batches:
        B = sc.numel()
        out.append((torch.randn(B, layer.num_features, D, device=sc.device),
                    torch.randn(B, layer.num_aware, D, device=sc.device)))
    return out


def twin(layer, **kw):
    """A layer with the same settings and a contiguous copy of ``layer``'s tables and states."""
    args = dict(optimizer=layer.optimizer, lr=layer.lr, eps=layer.eps, backend=layer.backend)
    args.update(kw)
    other = ScenarioEmbedding(FEATURES, layer.num_scenarios, layer.embedding_dim, **args)
    with torch.no_grad():
        other.global_weight.copy_(layer.global_weight)
        other.scenario_weight.copy_(layer.scenario_weight)
    return other


# ------------------------------------------------------------------------- the layer's fused update: non-contiguous tables

@pytest.mark.parametrize("device,backend", device_backends(OP))
def test_fused_adagrad_updates_a_column_slice_loaded_with_assign(device, backend):
    D = 8
    layer = ScenarioEmbedding(FEATURES, 3, D, optimizer="rowwise_adagrad", lr=0.1, backend=backend)
    pretrained = torch.randn(layer.global_weight.shape[0], 2 * D)
    sd = layer.state_dict()
    sd["global_weight"] = pretrained[:, :D]
    layer.load_state_dict(sd, assign=True)
    assert not layer.global_weight.is_contiguous()
    ref = twin(layer)  # same values, contiguous
    batches = [batch(layer) for _ in range(3)]
    ups = upstreams(layer, batches, D)
    before = layer.global_weight.detach().clone()
    train(layer, batches, ups)
    train(ref, batches, ups)
    assert not torch.equal(layer.global_weight, before), "the table never changed"
    torch.testing.assert_close(layer.global_weight, ref.global_weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.global_state, ref.global_state, rtol=0, atol=0)
    torch.testing.assert_close(layer.scenario_weight, ref.scenario_weight, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", device_backends(OP))
def test_fused_sgd_updates_a_transposed_parameter(device, backend):
    D = 4
    layer = ScenarioEmbedding(FEATURES, 2, D, optimizer="sgd", lr=0.5, backend=backend)
    R = layer.global_weight.shape[0]
    layer.global_weight = torch.nn.Parameter(torch.randn(D, R).t())
    ref = twin(layer)
    batches = [batch(layer) for _ in range(2)]
    ups = upstreams(layer, batches, D)
    train(layer, batches, ups)
    train(ref, batches, ups)
    torch.testing.assert_close(layer.global_weight, ref.global_weight, rtol=0, atol=0)


# ------------------------------------------------------------------------- the layer's fused update: frozen tables

@pytest.mark.parametrize("device,backend", device_backends(OP))
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_requires_grad_false_freezes_fused_tables(device, backend, optimizer):
    D = 4
    layer = ScenarioEmbedding(FEATURES, 3, D, optimizer=optimizer, lr=0.2, backend=backend)
    batches = [batch(layer) for _ in range(2)]
    ups = upstreams(layer, batches, D)
    snap = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.requires_grad_(False)
    for (idx, off, sc), (ug, us) in zip(batches, ups):
        g, s = layer(idx, off, sc)
        assert not g.requires_grad and not s.requires_grad
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, snap[k], rtol=0, atol=0, msg=f"{k} changed while frozen")

    # only the global table frozen: the scenario table trains exactly as in an unfrozen twin
    layer.scenario_weight.requires_grad_(True)
    ref = twin(layer)
    train(layer, batches, ups)
    train(ref, batches, ups)
    torch.testing.assert_close(layer.global_weight, snap["global_weight"], rtol=0, atol=0)
    torch.testing.assert_close(layer.scenario_weight, ref.scenario_weight, rtol=0, atol=0)
    assert not torch.equal(layer.scenario_weight, snap["scenario_weight"])
    if optimizer == "rowwise_adagrad":
        torch.testing.assert_close(layer.global_state, snap["global_state"], rtol=0, atol=0)
        torch.testing.assert_close(layer.scenario_state, ref.scenario_state, rtol=0, atol=0)


# ------------------------------------------------------------------------- the layer's fused update: lr schedule, weight decay, NaN

def test_lr_scheduler_drives_the_fused_optimizer():
    D = 4
    a = ScenarioEmbedding(FEATURES, 2, D, optimizer="rowwise_adagrad", lr=0.4)
    b, c = twin(a), twin(a)
    sched = torch.optim.lr_scheduler.StepLR(a.fused_optimizer, step_size=1, gamma=0.25)
    batches = [batch(a) for _ in range(2)]
    ups = upstreams(a, batches, D)
    for i, (bt, up) in enumerate(zip(batches, ups)):
        train(a, [bt], [up])
        a.fused_optimizer.step()
        sched.step()
        train(b, [bt], [up])
        b.lr = 0.4 * 0.25 ** (i + 1)
        train(c, [bt], [up])  # lr stays 0.4
    assert a.lr == pytest.approx(0.4 * 0.25 ** 2)
    torch.testing.assert_close(a.global_weight, b.global_weight, rtol=0, atol=0)
    assert not torch.allclose(a.global_weight, c.global_weight)
    # lr 0 leaves the tables unchanged: the kernels read the value set last
    a.lr = 0.0
    snap = a.global_weight.detach().clone()
    train(a, batches[:1], ups[:1])
    torch.testing.assert_close(a.global_weight, snap, rtol=0, atol=0)
    # the scheduler's state round-trips through the optimizer handle
    sd = a.fused_optimizer.state_dict()
    a.fused_optimizer.load_state_dict(sd)
    a.fused_optimizer.param_groups[0]["lr"] = 0.3
    assert a.lr == 0.3 and float(a._fused_hparams[0]) == 0.3


@pytest.mark.parametrize("device,backend", device_backends(OP))
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_weight_decay_matches_the_formula(device, backend, optimizer):
    """g' = g + wd * w on the touched rows; SGD w -= lr g'; Adagrad state += mean(g'^2), w -= lr g'/(sqrt(s)+eps)."""
    D, lr, eps, wd = 5, 0.3, 1e-3, 0.7
    layer = ScenarioEmbedding(FEATURES, 3, D, optimizer=optimizer, lr=lr, eps=eps, weight_decay=wd, backend=backend,
                              dtype=torch.float64)
    idx, off, sc = batch(layer, B=9)
    ug = torch.randn(9, 3, D, dtype=torch.float64)
    us = torch.randn(9, 2, D, dtype=torch.float64)
    # dense gradients from the plain op (float64), the update by the formula
    gw = layer.global_weight.detach().clone().requires_grad_()
    sw = layer.scenario_weight.detach().clone().requires_grad_()
    g, s = saml_kernels.scenario_embedding_bag(idx, off, sc, gw, sw, layer.feature_rows, layer.feature_scenario_rows,
                                               backend="reference")
    torch.autograd.backward([g, s], [ug, us])
    expected = []
    for w, grad in ((gw, gw.grad), (sw, sw.grad.reshape(-1, D))):
        w = w.detach().reshape(-1, D)
        touched = grad.abs().sum(1) > 0
        gp = grad + wd * w
        if optimizer == "sgd":
            new = w - lr * gp
        else:
            state = (gp * gp).mean(1).float().double()  # the row state is float32 by contract
            new = w - (lr / (state.sqrt() + eps)).unsqueeze(1) * gp
        expected.append(torch.where(touched.unsqueeze(1), new, w))
    assert bool((gw.grad.abs().sum(1) > 0).any())
    train(layer, [(idx, off, sc)], [(ug, us)])
    torch.testing.assert_close(layer.global_weight.detach(), expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.scenario_weight.detach().reshape(-1, D), expected[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", device_backends(OP))
def test_skip_nonfinite_leaves_tables_untouched(device, backend):
    D = 4
    layer = ScenarioEmbedding(FEATURES, 2, D, optimizer="rowwise_adagrad", skip_nonfinite=True, backend=backend)
    bt = batch(layer)
    (ug, us), = upstreams(layer, [bt], D)
    ug[0, 0, 0] = float("nan")
    snap = {k: v.clone() for k, v in layer.state_dict().items()}
    train(layer, [bt], [(ug, us)])
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, snap[k], rtol=0, atol=0, equal_nan=False)
    assert int(layer.nonfinite_steps) == 1
    # a finite step trains again
    (ug, us), = upstreams(layer, [bt], D)
    train(layer, [bt], [(ug, us)])
    assert not torch.equal(layer.global_weight, snap["global_weight"])
    assert int(layer.nonfinite_steps) == 1
    # without the option a NaN gradient reaches the touched rows, as with any optimizer (documented)
    plain = ScenarioEmbedding(FEATURES, 2, D, optimizer="sgd", backend=backend)
    ug.fill_(float("inf"))
    train(plain, [bt], [(ug, us)])
    assert not torch.isfinite(plain.global_weight).all()
