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
