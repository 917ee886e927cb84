"""Public-API tests of ``saml_kernels.scenario_embedding_bag`` on every (device, backend) pair available here.

The oracle is an independent float64 loop (``seb_loop_oracle`` of tests/oracles.py): one Python loop over bags and
ids that reads rows with plain indexing, so it is obviously correct and shares no code with the package (its
reference backend is one of the backends under test, not the oracle). Gradients of the oracle come from autograd through that loop.

Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` (params marked ``triton_interp``): shapes stay tiny.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import saml_kernels
from saml_kernels import _backend
from saml_kernels.ops import scenario_embedding_bag as seb_mod
from oracles import seb_loop_oracle
from conftest import device_backends, tolerance

OP = "scenario_embedding_bag"
PAIRS = device_backends(OP)
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------------------------ oracle

oracle = seb_loop_oracle  # tests/oracles.py (test_scenario_embedding.py imports it from here)


# ------------------------------------------------------------------------------------------------ inputs

def layout(rows, aware):
    """feature_rows / feature_scenario_rows for features with ``rows`` rows, aware where ``aware``."""
    fr, fsr = [0], [0]
    for r, a in zip(rows, aware):
        fr.append(fr[-1] + r)
        fsr.append(fsr[-1] + (r if a else 0))
    return fr, fsr


def make(B=4, rows=(5, 3, 7), aware=(True, False, True), M=3, D=8, dtype=torch.float32, idx_dtype=torch.int64,
         max_bag=3, pooling="sum", psw=False, device="cpu", empty_bags=True, bag_len=2, scenario=None):
    """Fresh random inputs; bag lengths in [0, max_bag] (some empty) or fixed ``bag_len`` for pooling "none"."""
    F = len(rows)
    fr, fsr = layout(rows, aware)
    if pooling == "none":
        lengths = torch.full((F * B,), bag_len, dtype=torch.long)
    else:
        lengths = torch.randint(0 if empty_bags else 1, max_bag + 1, (F * B,))
    offsets = torch.zeros(F * B + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    ids = [torch.randint(0, rows[f], (int(lengths[f * B:(f + 1) * B].sum()),)) for f in range(F)]
    indices = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    sc = torch.randint(0, M, (B,)) if scenario is None else torch.as_tensor(scenario)
    G = torch.randn(fr[-1], D, dtype=dtype)
    S = torch.randn(M, fsr[-1], D, dtype=dtype)
    w = torch.rand(indices.numel(), dtype=dtype) * 2 - 0.5 if psw else None
    to = dict(device=device)
    return dict(indices=indices.to(idx_dtype).to(**to), offsets=offsets.to(idx_dtype).to(**to),
                scenario=sc.to(idx_dtype).to(**to), G=G.to(**to), S=S.to(**to), fr=fr, fsr=fsr, psw=w if w is None
                else w.to(**to))


def run(inp, backend, pooling="sum", G=None, S=None, psw=None, **kw):
    return saml_kernels.scenario_embedding_bag(
        inp["indices"], inp["offsets"], inp["scenario"], inp["G"] if G is None else G, inp["S"] if S is None else S,
        inp["fr"], inp["fsr"], pooling=pooling, per_sample_weights=inp["psw"] if psw is None else psw,
        backend=backend, **kw)


def run_oracle(inp, pooling="sum", G=None, S=None, psw=None):
    return oracle(inp["indices"], inp["offsets"], inp["scenario"], inp["G"] if G is None else G,
                  inp["S"] if S is None else S, inp["fr"], inp["fsr"], pooling, inp["psw"] if psw is None else psw)


def check_forward(inp, backend, pooling="sum", tol_dtype=None):
    g, s = run(inp, backend, pooling)
    eg, es = run_oracle(inp, pooling)
    tol = tolerance(tol_dtype or inp["G"].dtype)
    assert g.dtype == inp["G"].dtype and s.dtype == inp["G"].dtype
    assert g.shape == eg.shape and s.shape == es.shape
    torch.testing.assert_close(g.double(), eg, **tol)
    torch.testing.assert_close(s.double(), es, **tol)
    return g, s


def check_grads(inp, backend, pooling="sum", sparse=False):
    """Gradients of G, S (and psw) for a random upstream gradient, against autograd through the oracle."""
    dt = inp["G"].dtype
    G = inp["G"].detach().clone().requires_grad_()
    S = inp["S"].detach().clone().requires_grad_()
    psw = inp["psw"].detach().clone().requires_grad_() if inp["psw"] is not None else None
    g, s = run(inp, backend, pooling, G=G, S=S, psw=psw, sparse=sparse)
    rg, rs = torch.randn_like(g, dtype=torch.float64), torch.randn_like(s, dtype=torch.float64)
    ((g.double() * rg).sum() + (s.double() * rs).sum()).backward()
    G64 = inp["G"].detach().double().requires_grad_()
    S64 = inp["S"].detach().double().requires_grad_()
    w64 = psw.detach().double().requires_grad_() if psw is not None else None
    eg, es = run_oracle(inp, pooling, G=G64, S=S64, psw=w64)
    loss = (eg * rg).sum() + (es * rs).sum()
    if loss.requires_grad:  # no id at all: the oracle's outputs do not depend on the tables
        loss.backward()
    for t in (G64, S64, w64):
        if t is not None and t.grad is None:
            t.grad = torch.zeros_like(t)
    tol = {k: v * 4 for k, v in tolerance(dt).items()}  # grads sum several products: a little more slack
    gG = G.grad.to_dense() if G.grad.is_sparse else G.grad
    gS = S.grad.to_dense() if S.grad.is_sparse else S.grad
    assert gG.dtype == dt and gS.dtype == dt
    torch.testing.assert_close(gG.double(), G64.grad, **tol)
    torch.testing.assert_close(gS.double(), S64.grad, **tol)
    if psw is not None:
        torch.testing.assert_close(psw.grad.double(), w64.grad, **tol)
    return G, S, psw


# ------------------------------------------------------------------------------------------------ forward matrix

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_forward_matrix(device, backend, pooling, dtype, idx_dtype):
    inp = make(B=3, D=5, dtype=dtype, idx_dtype=idx_dtype, pooling=pooling, device=device)
    check_forward(inp, backend, pooling)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_per_sample_weights(device, backend, dtype):
    inp = make(B=3, D=6, dtype=dtype, psw=True, device=device)
    check_forward(inp, backend, "sum")
    check_grads(inp, backend, "sum")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("wdtype", [torch.float64, torch.float16])
def test_per_sample_weights_other_dtype(device, backend, wdtype):
    """Weights in another float dtype than the table: used in the table dtype, gradient in their own dtype."""
    inp = make(B=3, D=4, psw=True, device=device)
    inp["psw"] = inp["psw"].to(wdtype)
    check_forward(inp, backend, "sum", tol_dtype=torch.float16 if wdtype == torch.float16 else None)
    w = inp["psw"].clone().requires_grad_()
    g, s = run(inp, backend, psw=w)
    (g.sum() + s.sum()).backward()
    assert w.grad.dtype == wdtype and w.grad.shape == w.shape
    w64 = inp["psw"].double().requires_grad_()
    eg, es = run_oracle(inp, psw=w64)
    (eg.sum() + es.sum()).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, **tolerance(torch.float16))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("D", [1, 3, 33])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_odd_dims(device, backend, D, pooling):
    inp = make(B=3, D=D, device=device, pooling=pooling)
    check_forward(inp, backend, pooling)


@pytest.mark.parametrize("device,backend", [p for p in PAIRS if not p.marks])  # too big for the interpreter
@pytest.mark.parametrize("D,dtype", [(64, torch.float32), (130, torch.float32), (72, torch.bfloat16),
                                     (40, torch.float16)])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_medium_shapes(device, backend, D, dtype, pooling):
    """Larger D (vector bodies + tails), long bags and many samples (parallel chunks) than the tiny cases."""
    inp = make(B=32, rows=(50, 7, 120), aware=(True, False, True), M=4, D=D, dtype=dtype, max_bag=10,
               pooling=pooling, psw=(pooling == "sum"), device=device)
    check_forward(inp, backend, pooling)
    check_grads(inp, backend, pooling)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("aware", [(False, False, False), (True, True, True), (False, True, False),
                                   (True, False, False)])
def test_aware_mixes(device, backend, aware):
    inp = make(B=3, aware=aware, device=device, psw=True)
    g, s = check_forward(inp, backend)
    assert s.shape == (3, sum(aware), 8)
    check_grads(inp, backend)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_single_feature_single_scenario(device, backend):
    inp = make(B=4, rows=(6,), aware=(True,), M=1, D=4, device=device)
    check_forward(inp, backend)
    check_grads(inp, backend)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
def test_batch_zero(device, backend, pooling):
    inp = make(B=0, device=device, pooling=pooling)
    g, s = check_forward(inp, backend, pooling)
    assert g.shape[0] == 0 and s.shape[0] == 0
    G = inp["G"].clone().requires_grad_()
    S = inp["S"].clone().requires_grad_()
    g, s = run(inp, backend, pooling, G=G, S=S)
    (g.sum() + s.sum()).backward()
    assert torch.count_nonzero(G.grad) == 0 and torch.count_nonzero(S.grad) == 0


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_all_bags_empty(device, backend, pooling):
    inp = make(B=3, max_bag=0, device=device, pooling=pooling)
    assert inp["indices"].numel() == 0
    # poison: free NaN blocks of the outputs' size first so an allocator that reuses them exposes unwritten outputs
    junk = [torch.full((3, 3, 8), float("nan"), device=device) for _ in range(4)]
    del junk
    g, s = run(inp, backend, pooling)
    assert torch.equal(g, torch.zeros_like(g)) and torch.equal(s, torch.zeros_like(s))
    G, S, _ = check_grads(inp, backend, pooling)
    assert torch.count_nonzero(G.grad) == 0 and torch.count_nonzero(S.grad) == 0


@pytest.mark.parametrize("device,backend", PAIRS)
def test_pooling_none_zero_length(device, backend):
    inp = make(B=3, pooling="none", bag_len=0, device=device)
    g, s = check_forward(inp, backend, "none")
    assert g.shape == (3, 3, 0, 8) and s.shape == (3, 2, 0, 8)
    check_grads(inp, backend, "none")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_empty_bags_are_exact_zeros(device, backend):
    inp = make(B=4, max_bag=2, device=device, pooling="mean")
    g, s = run(inp, backend, "mean")
    lengths = (inp["offsets"][1:] - inp["offsets"][:-1]).reshape(3, 4).t()  # [B, F]
    assert (lengths == 0).any(), "the random draw should contain empty bags"
    assert torch.count_nonzero(g[lengths == 0]) == 0
    assert not torch.isnan(g).any() and not torch.isnan(s).any()


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_contiguous_inputs(device, backend):
    inp = make(B=3, D=6, psw=True, device=device)
    R, Rs, M = inp["G"].shape[0], inp["S"].shape[1], inp["S"].shape[0]
    # transposed table and a strided slice of a wider table, both with the same values
    Gt = inp["G"].t().contiguous().t()
    Sbig = torch.randn(M, Rs, 12, device=device)
    Sbig[:, :, ::2] = inp["S"]
    Sv = Sbig[:, :, ::2]
    ibig = torch.zeros(2 * inp["indices"].numel(), dtype=inp["indices"].dtype, device=device)
    ibig[::2] = inp["indices"]
    iv = ibig[::2]
    wbig = torch.zeros(2 * inp["psw"].numel(), device=device)
    wbig[1::2] = inp["psw"]
    wv = wbig[1::2]
    obig = torch.zeros(3 * inp["offsets"].numel(), dtype=inp["offsets"].dtype, device=device)
    obig[2::3] = inp["offsets"]
    ov = obig[2::3]
    sv = inp["scenario"].repeat_interleave(2)[::2]
    assert not any(t.is_contiguous() for t in (Gt, Sv, iv, ov, sv, wv))
    nc = dict(inp, G=Gt, S=Sv, indices=iv, offsets=ov, scenario=sv, psw=wv)
    g, s = run(nc, backend)
    eg, es = run_oracle(inp)
    torch.testing.assert_close(g.double(), eg, **tolerance(torch.float32))
    torch.testing.assert_close(s.double(), es, **tolerance(torch.float32))
    # gradients flow back to the strided views
    Gl = inp["G"].t().contiguous().requires_grad_()
    g, s = run(nc, backend, G=Gl.t())
    (g.sum() + s.sum()).backward()
    G64 = inp["G"].double().requires_grad_()
    eg, es = run_oracle(inp, G=G64)
    (eg.sum() + es.sum()).backward()
    torch.testing.assert_close(Gl.grad.t().double(), G64.grad, **tolerance(torch.float32))


# ------------------------------------------------------------------------------------------------ backward

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_gradients(device, backend, pooling, dtype):
    inp = make(B=3, D=5, dtype=dtype, pooling=pooling, device=device)
    check_grads(inp, backend, pooling)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_gradients_repeated_ids(device, backend, idx_dtype):
    # few rows, long bags: many duplicates per row must be summed, per scenario separately
    inp = make(B=6, rows=(2, 3), aware=(True, True), M=2, D=4, max_bag=5, psw=True, idx_dtype=idx_dtype,
               device=device)
    check_grads(inp, backend)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_scenario_gradient_masking(device, backend):
    """Rows of scenario table s get exactly zero gradient from samples of other scenarios."""
    M = 3
    inp = make(B=6, M=M, D=4, device=device, empty_bags=False, scenario=[0, 1, 2, 0, 1, 2])
    for s_keep in range(M):
        S = inp["S"].clone().requires_grad_()
        g, s = run(inp, backend, S=S)
        keep = (inp["scenario"] == s_keep).to(s.dtype).view(-1, 1, 1)
        (s * keep * torch.randn_like(s)).sum().backward()
        others = [m for m in range(M) if m != s_keep]
        assert torch.count_nonzero(S.grad[others]) == 0, "another scenario's rows got gradient"
        assert torch.count_nonzero(S.grad[s_keep]) > 0
    # and the global-output gradient never reaches the scenario tables
    S = inp["S"].clone().requires_grad_()
    g, s = run(inp, backend, S=S)
    g.sum().backward()
    assert S.grad is None or torch.count_nonzero(S.grad) == 0


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
def test_sparse_gradients(device, backend, pooling):
    inp = make(B=4, D=4, device=device, pooling=pooling, psw=(pooling == "sum"))
    G, S, _ = check_grads(inp, backend, pooling, sparse=True)
    for t in (G.grad, S.grad):
        # AccumulateGrad re-wraps sparse grads without the coalesced flag; the content must still be coalesced
        assert t.is_sparse and torch.equal(t._indices(), t.coalesce()._indices())
    assert G.grad.shape == G.shape and S.grad.shape == S.shape
    # straight from the backward (no AccumulateGrad): flagged coalesced
    G2, S2 = inp["G"].clone().requires_grad_(), inp["S"].clone().requires_grad_()
    g, s = run(inp, backend, pooling, G=G2, S=S2, sparse=True)
    dG, dS = torch.autograd.grad(g.sum() + s.sum(), [G2, S2])
    assert dG.is_sparse and dG.is_coalesced() and dS.is_sparse and dS.is_coalesced()
    # only touched rows are listed
    assert G.grad._nnz() <= inp["indices"].numel()


@pytest.mark.parametrize("device,backend", PAIRS)
def test_sparse_optimizers(device, backend):
    inp = make(B=4, D=4, device=device)
    dense_G = inp["G"].clone().requires_grad_()
    dense_S = inp["S"].clone().requires_grad_()
    g, s = run(inp, backend, G=dense_G, S=dense_S)
    (g.pow(2).sum() + s.pow(2).sum()).backward()
    # SGD with sparse gradients equals SGD with dense gradients
    G = inp["G"].clone().requires_grad_()
    S = inp["S"].clone().requires_grad_()
    opt = torch.optim.SGD([G, S], lr=0.1)
    g, s = run(inp, backend, G=G, S=S, sparse=True)
    (g.pow(2).sum() + s.pow(2).sum()).backward()
    opt.step()
    torch.testing.assert_close(G.detach(), inp["G"] - 0.1 * dense_G.grad)
    torch.testing.assert_close(S.detach(), inp["S"] - 0.1 * dense_S.grad)
    # SparseAdam: two steps run, touched rows move, untouched rows stay
    G = inp["G"].clone().requires_grad_()
    S = inp["S"].clone().requires_grad_()
    opt = torch.optim.SparseAdam([G, S], lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        g, s = run(inp, backend, G=G, S=S, sparse=True)
        (g.pow(2).sum() + s.pow(2).sum()).backward()
        opt.step()
    touched = dense_G.grad.abs().sum(1) > 0
    assert torch.equal(G.detach()[~touched], inp["G"][~touched])
    assert (G.detach()[touched] != inp["G"][touched]).any(1).all()
    stouched = dense_S.grad.abs().sum(2) > 0
    assert torch.equal(S.detach()[~stouched], inp["S"][~stouched])


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
def test_gradcheck(device, backend, pooling):
    inp = make(B=2, rows=(3, 2), aware=(True, False), M=2, D=3, dtype=torch.float64, pooling=pooling,
               psw=(pooling == "sum"), device=device)
    G = inp["G"].clone().requires_grad_()
    S = inp["S"].clone().requires_grad_()
    args = [G, S] + ([inp["psw"].clone().requires_grad_()] if pooling == "sum" else [])

    def fn(G, S, *w):
        return run(inp, backend, pooling, G=G, S=S, psw=w[0] if w else None)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ torch.library

def _op_args(inp, backend, pooling="sum", bounds="error"):
    fr, fsr, slot, na = seb_mod.table_layout(inp["fr"], inp["fsr"], inp["G"].shape[0], inp["S"].shape[1],
                                             inp["indices"].device)
    F = len(inp["fr"]) - 1
    B = (inp["offsets"].numel() - 1) // F
    bag_len = inp["indices"].numel() // (F * B) if pooling == "none" and F * B else 0
    return (inp["indices"], inp["offsets"], inp["scenario"], inp["G"], inp["S"], fr, fsr, slot, inp["psw"],
            seb_mod.POOLING[pooling], bag_len, na, seb_mod.BOUNDS[bounds], False, backend)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling", ["sum", "none"])
def test_opcheck(device, backend, pooling):
    inp = make(B=3, D=4, device=device, pooling=pooling, psw=(pooling == "sum"))
    inp["G"].requires_grad_()
    inp["S"].requires_grad_()
    if inp["psw"] is not None:
        inp["psw"].requires_grad_()
    args = _op_args(inp, backend, pooling)
    torch.library.opcheck(torch.ops.saml_kernels.scenario_embedding_bag.default, args)
    g, s = torch.ops.saml_kernels.scenario_embedding_bag(*args)
    bargs = (torch.randn_like(g), torch.randn_like(s)) + args[:9] + (args[9], args[10], inp["psw"] is not None,
                                                                     backend)
    bargs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bargs)
    torch.library.opcheck(torch.ops.saml_kernels.scenario_embedding_bag_backward.default, bargs)


class _Pooled(torch.nn.Module):
    def __init__(self, inp, backend):
        super().__init__()
        self.G = torch.nn.Parameter(inp["G"].clone())
        self.S = torch.nn.Parameter(inp["S"].clone())
        self.fr, self.fsr, self.backend = inp["fr"], inp["fsr"], backend

    def forward(self, indices, offsets, scenario):
        g, s = saml_kernels.scenario_embedding_bag(indices, offsets, scenario, self.G, self.S, self.fr, self.fsr,
                                                   pooling="mean", backend=self.backend)
        return g.sum(1) * 2 + s.sum(1)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    inp = make(B=3, D=4, device=device)
    eager, compiled_mod = _Pooled(inp, backend), _Pooled(inp, backend)
    compiled = torch.compile(compiled_mod, fullgraph=True, backend="aot_eager")
    a = (inp["indices"], inp["offsets"], inp["scenario"])
    ye, yc = eager(*a), compiled(*a)
    torch.testing.assert_close(yc, ye)
    ye.pow(2).sum().backward()
    yc.pow(2).sum().backward()
    torch.testing.assert_close(compiled_mod.G.grad, eager.G.grad)
    torch.testing.assert_close(compiled_mod.S.grad, eager.S.grad)
    # another batch size: recompiles or runs dynamic, still equal
    inp2 = make(B=5, D=4, device=device)
    a = (inp2["indices"], inp2["offsets"], inp2["scenario"])
    torch.testing.assert_close(compiled(*a), eager(*a))


@pytest.mark.slow
def test_torch_compile_inductor():
    """The default (inductor) compiler on the automatic backend, forward + backward (~20 s of compiling)."""
    torch._dynamo.reset()
    inp = make(B=3, D=4)
    eager, compiled_mod = _Pooled(inp, None), _Pooled(inp, None)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    a = (inp["indices"], inp["offsets"], inp["scenario"])
    ye, yc = eager(*a), compiled(*a)
    torch.testing.assert_close(yc, ye)
    ye.pow(2).sum().backward()
    yc.pow(2).sum().backward()
    torch.testing.assert_close(compiled_mod.G.grad, eager.G.grad)
    torch.testing.assert_close(compiled_mod.S.grad, eager.S.grad)


# ------------------------------------------------------------------------------------------------ bounds_check

def _with_bad_id(device, value_of_rows=0, feature=0):
    """Inputs where one id of ``feature`` equals its row count + value_of_rows (one past the end by default)."""
    inp = make(B=3, rows=(4, 5, 6), aware=(True, True, True), D=4, device=device, empty_bags=False)
    B = 3
    pos = int(inp["offsets"][feature * B + 1])  # first id of bag (feature, sample 1)
    rows = inp["fr"][feature + 1] - inp["fr"][feature]
    inp["indices"][pos] = rows + value_of_rows
    return inp, pos, rows


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("bad", ["end", "far", "negative"])
def test_bounds_error(device, backend, bad):
    rows = 5  # feature 1
    inp, pos, rows = _with_bad_id(device, {"end": 0, "far": 7, "negative": -1 - rows}[bad], feature=1)
    bad = inp["indices"][pos].item() - rows
    before = inp["indices"].clone()
    with pytest.raises(IndexError) as ei:
        run(inp, backend)
    msg = str(ei.value)
    assert "feature 1" in msg and f"indices[{pos}]" in msg and f"= {rows + bad}" in msg
    assert torch.equal(inp["indices"], before)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_bounds_zero_mean(device, backend):
    """A bad id is a zero vector that still counts in its bag's length (as any other zero row would)."""
    inp, pos, rows = _with_bad_id(device, 0, feature=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g, s = run(inp, backend, "mean", bounds_check="zero")
    eg, es = run_oracle(inp, "mean")
    torch.testing.assert_close(g.double(), eg, **tolerance(torch.float32))
    torch.testing.assert_close(s.double(), es, **tolerance(torch.float32))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_bounds_zero(device, backend):
    seb_mod._warned_zero = False
    inp, pos, rows = _with_bad_id(device, 0, feature=0)  # one past feature 0's rows = feature 1's first row
    inp["psw"] = torch.rand(inp["indices"].numel(), device=device)
    with pytest.warns(RuntimeWarning, match="feature 0"):
        g, s = run(inp, backend, bounds_check="zero")
    eg, es = run_oracle(inp)  # the oracle maps invalid ids to zero, never to the next feature's row
    torch.testing.assert_close(g.double(), eg, **tolerance(torch.float32))
    torch.testing.assert_close(s.double(), es, **tolerance(torch.float32))
    # warns only once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(inp, backend, bounds_check="zero")
    # no gradient through the bad id: feature 1's row 0 only gets what its own ids give it
    G = inp["G"].clone().requires_grad_()
    S = inp["S"].clone().requires_grad_()
    w = inp["psw"].clone().requires_grad_()
    g, s = run(inp, backend, G=G, S=S, psw=w, bounds_check="zero")
    rg, rs = torch.randn_like(g), torch.randn_like(s)
    ((g * rg).sum() + (s * rs).sum()).backward()
    G64, S64, w64 = (t.double().requires_grad_() for t in (inp["G"], inp["S"], inp["psw"]))
    eg, es = run_oracle(inp, G=G64, S=S64, psw=w64)
    ((eg * rg.double()).sum() + (es * rs.double()).sum()).backward()
    torch.testing.assert_close(G.grad.double(), G64.grad, **tolerance(torch.float32))
    torch.testing.assert_close(S.grad.double(), S64.grad, **tolerance(torch.float32))
    torch.testing.assert_close(w.grad.double(), w64.grad, **tolerance(torch.float32))
    assert w.grad[pos] == 0


@pytest.mark.parametrize("device,backend", PAIRS)
def test_bounds_off_valid_input(device, backend):
    inp = make(B=3, device=device, psw=True)
    g, s = run(inp, backend, bounds_check="off")
    eg, es = run_oracle(inp)
    torch.testing.assert_close(g.double(), eg, **tolerance(torch.float32))
    torch.testing.assert_close(s.double(), es, **tolerance(torch.float32))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("bad", [3, 7, -1])
def test_scenario_out_of_range(device, backend, bad):
    inp = make(B=3, M=3, device=device)
    inp["scenario"][1] = bad
    with pytest.raises(IndexError, match=rf"scenario\[1\] = {bad}"):
        run(inp, backend)
    with pytest.raises(IndexError, match="scenario"):
        run(inp, backend, bounds_check="zero")


# ------------------------------------------------------------------------------------------------ determinism

def _fwd_bwd(inp, backend, sparse=False):
    G = inp["G"].clone().requires_grad_()
    S = inp["S"].clone().requires_grad_()
    w = inp["psw"].clone().requires_grad_()
    g, s = run(inp, backend, G=G, S=S, psw=w, sparse=sparse)
    (g * inp["rg"]).sum().backward(retain_graph=True)
    (s * inp["rs"]).sum().backward()
    dG = G.grad.to_dense() if G.grad.is_sparse else G.grad
    dS = S.grad.to_dense() if S.grad.is_sparse else S.grad
    return [g, s, dG, dS, w.grad]


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("sparse", [False, True])
def test_determinism(device, backend, sparse):
    inp = make(B=16, rows=(3, 4), aware=(True, True), M=2, D=16, max_bag=6, psw=True, device=device)
    g, s = run(inp, backend)
    inp["rg"], inp["rs"] = torch.randn_like(g), torch.randn_like(s)
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = _fwd_bwd(inp, backend, sparse)
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            again = _fwd_bwd(inp, backend, sparse)
            for a, b in zip(first, again):
                assert torch.equal(a, b), f"not bitwise repeatable with {n} thread(s)"
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


# ------------------------------------------------------------------------------------------------ backend choice

@pytest.fixture
def spy(monkeypatch):
    """Records the backend each kernel call used."""
    used = []
    real = _backend.kernels

    def fake(op, backend):
        if op == OP:
            used.append(backend)
            return real(op, "reference")  # only the choice is under test here, not the kernels
        return real(op, backend)

    monkeypatch.setattr(_backend, "kernels", fake)
    return used


def test_backend_precedence(monkeypatch, spy):
    inp = make(B=2)
    avail = _backend.available_backends("cpu", OP)
    auto = _backend.auto_backend(OP, "cpu")[0]
    other = "reference" if auto != "reference" else next((b for b in avail if b != "reference"), "reference")
    monkeypatch.delenv("SAML_KERNELS_BACKEND", raising=False)
    run(inp, None)
    order = _backend.preference(OP, "cpu")
    assert spy[-1] == auto == order[[b in avail for b in order].index(True)]
    monkeypatch.setenv("SAML_KERNELS_BACKEND", other)
    run(inp, None)
    assert spy[-1] == other
    with saml_kernels.use_backend(auto):
        run(inp, None)
        assert spy[-1] == auto  # context beats env
        run(inp, other)
        assert spy[-1] == other  # argument beats context
        with saml_kernels.use_backend(other):
            run(inp, None)
            assert spy[-1] == other  # innermost context wins
        run(inp, None)
        assert spy[-1] == auto
    run(inp, None)
    assert spy[-1] == other  # back to env


def test_backend_unknown_and_unavailable(monkeypatch):
    inp = make(B=2)
    monkeypatch.delenv("SAML_KERNELS_BACKEND", raising=False)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        run(inp, "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        with saml_kernels.use_backend("nope"):
            pass
    monkeypatch.setenv("SAML_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="SAML_KERNELS_BACKEND"):
        run(inp, None)
    monkeypatch.delenv("SAML_KERNELS_BACKEND")
    with pytest.raises(saml_kernels.BackendUnavailableError, match="cuda.*CUDA tensors"):
        run(inp, "cuda")
    if not _backend.triton_interpret():
        with pytest.raises(saml_kernels.BackendUnavailableError, match="triton.*TRITON_INTERPRET"):
            with saml_kernels.use_backend("triton"):
                run(inp, None)


# ------------------------------------------------------------------------------------------------ property test

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    _NONINTERP = [p for p in PAIRS if not p.marks]

    @pytest.mark.skipif(not _NONINTERP, reason="no non-interpreted backend")
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def test_property_random_shapes(data):
        device, backend = data.draw(st.sampled_from([p.values for p in _NONINTERP]))
        F = data.draw(st.integers(1, 3))
        rows = tuple(data.draw(st.lists(st.integers(1, 5), min_size=F, max_size=F)))
        aware = tuple(data.draw(st.lists(st.booleans(), min_size=F, max_size=F)))
        pooling = data.draw(st.sampled_from(["sum", "mean", "none"]))
        dtype = data.draw(st.sampled_from(FLOATS))
        inp = make(B=data.draw(st.integers(0, 4)), rows=rows, aware=aware, M=data.draw(st.integers(1, 3)),
                   D=data.draw(st.integers(1, 9)), dtype=dtype, max_bag=data.draw(st.integers(0, 4)),
                   idx_dtype=data.draw(st.sampled_from([torch.int32, torch.int64])), pooling=pooling,
                   bag_len=data.draw(st.integers(0, 3)), psw=(pooling == "sum" and data.draw(st.booleans())),
                   device=device)
        check_forward(inp, backend, pooling)
        if dtype == torch.float32:
            check_grads(inp, backend, pooling)
