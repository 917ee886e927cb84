"""Kernel-contract tests of the GPU backends (triton, cuda) of mbranch_linear, mutual_unit and mutual_linear.

Each backend kernel (``grouped_forward``, ``all_forward``, ``grouped_backward``; ``mutual_forward``,
``mutual_backward``, ``mutual_linear_forward``, ``mutual_linear_backward``, signatures of csrc/registry.cpp) is
called on fresh random inputs and compared with the float64 oracles of tests/_kernel_oracles.py (adapters of the
kernel signatures to tests/oracles.py, independent of saml_kernels; backwards by autograd) on float64 copies. Pairs:
- (cpu, triton): the Triton kernels in the interpreter; run with
  ``TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -m triton_interp tests/test_mbranch_mutual_gpu.py``
  (tiny shapes M=3, B=7, K=5, N=6, interpreter blocks of 16; ~2 ms per program instance);
- (cuda, triton), (cuda, cuda): on a GPU (skipped on a machine without one).
Every output starts as NaN (CPU: torch.empty/empty_like patched to NaN-filled tensors for the call; CUDA: the
caching allocator is first filled with NaN), so an element a kernel forgot to write fails the test.
"""
from __future__ import annotations

import pytest
import torch

from saml_kernels import _backend
import _kernel_oracles as KO
from conftest import gpu_backends, interp_covering

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ACTS = [0, 1, 2, 3, 4]  # none, relu, leaky_relu, gelu, silu
# relative-norm error bounds against the float64 reference (float32 accumulation everywhere)
REL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


PAIRS = gpu_backends("mbranch_linear")


def mbl(backend):
    """(grouped_forward, all_forward, grouped_backward) of ``backend``: its table in the registry."""
    k = _backend.kernels("mbranch_linear", backend)
    return k.grouped_forward, k.all_forward, k.grouped_backward


def mu(backend):
    """(mutual_forward, mutual_backward, mutual_linear_forward, mutual_linear_backward) of ``backend``."""
    k, kl = _backend.kernels("mutual_unit", backend), _backend.kernels("mutual_linear", backend)
    return k.forward, k.backward, kl.forward, kl.backward


@pytest.fixture
def nan_outputs(monkeypatch):
    """Makes every fresh float output of the kernel start as NaN (see the module docstring)."""
    def run(device, fn, *args):
        if torch.device(device).type == "cuda":
            t = torch.full((1 << 24,), float("nan"), device=device)
            del t
            return fn(*args)
        real_empty, real_like = torch.empty, torch.empty_like

        def nan_fill(t):
            return t.fill_(float("nan")) if t.is_floating_point() else t

        with monkeypatch.context() as mp:
            mp.setattr(torch, "empty", lambda *a, **k: nan_fill(real_empty(*a, **k)))
            mp.setattr(torch, "empty_like", lambda *a, **k: nan_fill(real_like(*a, **k)))
            return fn(*args)

    return run


def close(out, ref, dtype, what):
    """No NaN, same shape, ||out - ref|| / ||ref|| within the dtype's bound, and elementwise agreement."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN (unwritten element?)"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if r.numel() == 0:
        return
    scale = max(float(r.norm()), 1e-30)
    err = float((o - r).norm()) / scale
    assert err <= REL[dtype], f"{what}: relative error {err:.3g} > {REL[dtype]:.1g}"
    tol = 8 * REL[dtype] * max(1.0, float(r.abs().max()))
    assert float((o - r).abs().max()) <= tol, f"{what}: max abs error {float((o - r).abs().max()):.3g} > {tol:.3g}"


def d64(t):
    return None if t is None else t.double()


def scen(device, B, M, idt=torch.int64, empty=1):
    """Unsorted scenario ids in [0, M) with scenario ``empty`` absent (an empty segment) and the others present."""
    present = [m for m in range(M) if m != empty]
    s = torch.tensor([present[i % len(present)] for i in range(B)])
    return s[torch.randperm(B)].to(device=device, dtype=idt)


def case(device, dtype, *, M=3, B=7, K=5, N=6, Ka=4, bias=True, aux=True, per_branch=False):
    r = lambda *shape: torch.randn(*shape).to(device=device, dtype=dtype)  # noqa: E731
    x = r(M, B, K) if per_branch else r(B, K)
    return dict(x=x, weight=r(M, K, N) * 0.5, bias=r(M, N) if bias else None, aux=r(B, Ka) if aux else None,
                aux_weight=r(M, Ka, N) * 0.5 if aux else None)


# ------------------------------------------------------------------------------------------------ mbranch_linear

@pytest.mark.parametrize("device,backend,dtype,act,bias,aux",
                         interp_covering(PAIRS, FLOATS, ACTS, [(True, True), (False, False), (True, False)]))
def test_grouped_forward(device, backend, dtype, act, bias, aux, nan_outputs):
    c = case(device, dtype, bias=bias, aux=aux)
    s = scen(device, 7, 3, idt=torch.int32 if act % 2 else torch.int64)
    fwd = mbl(backend)[0]
    y, z = nan_outputs(device, fwd, c["x"], c["weight"], c["bias"], c["aux"], c["aux_weight"], s, act)
    ry, rz = KO.mbl_grouped_forward(d64(c["x"]), d64(c["weight"]), d64(c["bias"]), d64(c["aux"]),
                                            d64(c["aux_weight"]), s, act)
    assert y.dtype == dtype
    close(y, ry, dtype, "y")
    if act in (3, 4):
        close(z, rz, dtype, "z")
    else:
        assert z.numel() == 0


@pytest.mark.parametrize("device,backend,dtype,act,per_branch,bias,aux",
                         interp_covering(PAIRS, FLOATS, ACTS, [False, True], [(True, True), (False, False)]))
def test_all_forward(device, backend, dtype, act, per_branch, bias, aux, nan_outputs):
    c = case(device, dtype, bias=bias, aux=aux, per_branch=per_branch)
    fwd = mbl(backend)[1]
    y, z = nan_outputs(device, fwd, c["x"], c["weight"], c["bias"], c["aux"], c["aux_weight"], act)
    ry, rz = KO.mbl_all_forward(d64(c["x"]), d64(c["weight"]), d64(c["bias"]), d64(c["aux"]),
                                        d64(c["aux_weight"]), act)
    M, B, N = 3, 7, 6
    close(y, ry, dtype, "y")
    if not per_branch:   # the contract's layout: [M,B,N] view of a [B, M*N] buffer
        assert y.stride() == (N, M * N, 1), y.stride()
    if act in (3, 4):
        close(z, rz, dtype, "z")
    else:
        assert z.numel() == 0


def _backward_refs(dz, c, s, flags):
    return KO.mbl_grouped_backward(d64(dz), d64(c["x"]), d64(c["weight"]), d64(c["aux"]),
                                           d64(c["aux_weight"]), s, *flags)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("aux", [True, False], ids=["aux", "noaux"])
@pytest.mark.parametrize("flags", [(True, True, True, True, True), (False, True, False, False, True),
                                   (True, False, True, True, False)], ids=["all", "dW_dWa", "dx_db_daux"])
def test_grouped_backward(device, backend, dtype, aux, flags, nan_outputs):
    c = case(device, dtype, aux=aux)
    s = scen(device, 7, 3)
    dz = torch.randn(7, 6).to(device=device, dtype=dtype)
    bwd = mbl(backend)[2]
    outs = nan_outputs(device, bwd, dz, c["x"], c["weight"], c["aux"], c["aux_weight"], s, *flags)
    refs = _backward_refs(dz, c, s, flags)
    names = ("dx", "dW", "db", "daux", "dWa")
    for name, need, o, r in zip(names, flags, outs, refs):
        if need and (aux or name not in ("daux", "dWa")):
            close(o, r, dtype, name)
        else:
            assert o.numel() == 0, f"{name} not asked for but returned {tuple(o.shape)}"
    # scenario 1 has no rows: its parameter gradients are exactly zero
    if flags[1]:
        assert torch.count_nonzero(outs[1][1]) == 0
    if flags[2]:
        assert torch.count_nonzero(outs[2][1]) == 0


@pytest.mark.parametrize("device,backend", PAIRS)
def test_grouped_noncontiguous_and_deterministic(device, backend, nan_outputs):
    """Transposed / strided views as inputs; two runs of the backward are bitwise equal."""
    dtype = torch.float32
    M, B, K, N, Ka = 3, 7, 5, 6, 4
    x = torch.randn(K, B).to(device=device, dtype=dtype).t()                   # strides (1, B)
    w = torch.randn(M, N, K).to(device=device, dtype=dtype).transpose(1, 2)    # [M, K, N] non-contiguous
    b = torch.randn(N, M).to(device=device, dtype=dtype).t()
    a = torch.randn(B, 2 * Ka).to(device=device, dtype=dtype)[:, ::2]
    wa = torch.randn(M, Ka, N).to(device=device, dtype=dtype)
    s = scen(device, B, M, empty=0)
    fwd, _, bwd = mbl(backend)
    y, _ = nan_outputs(device, fwd, x, w, b, a, wa, s, 1)
    ry, _ = KO.mbl_grouped_forward(d64(x), d64(w), d64(b), d64(a), d64(wa), s, 1)
    close(y, ry, dtype, "y")
    dz = torch.randn(2 * B, N).to(device=device, dtype=dtype)[::2]
    o1 = nan_outputs(device, bwd, dz, x, w, a, wa, s, True, True, True, True, True)
    o2 = bwd(dz, x, w, a, wa, s, True, True, True, True, True)
    refs = KO.mbl_grouped_backward(d64(dz), d64(x), d64(w), d64(a), d64(wa), s, True, True, True, True, True)
    for name, p, q, r in zip(("dx", "dW", "db", "daux", "dWa"), o1, o2, refs):
        close(p, r, dtype, name)
        assert torch.equal(p, q), f"{name}: two runs differ"


@pytest.mark.parametrize("device,backend", PAIRS)
def test_zero_rows(device, backend):
    """B = 0: empty outputs; parameter gradients are zero tensors of the parameter shape."""
    c = case(device, torch.float32, B=0)
    s = torch.zeros(0, dtype=torch.int64, device=device)
    fwd, allf, bwd = mbl(backend)
    y, z = fwd(c["x"], c["weight"], c["bias"], c["aux"], c["aux_weight"], s, 3)
    assert y.shape == (0, 6) and z.shape == (0, 6)
    y, _ = allf(c["x"], c["weight"], c["bias"], c["aux"], c["aux_weight"], 1)
    assert y.shape == (3, 0, 6)
    dz = torch.zeros(0, 6, device=device)
    dx, dw, db, da, dwa = bwd(dz, c["x"], c["weight"], c["aux"], c["aux_weight"], s, True, True, True, True, True)
    assert dx.shape == (0, 5) and da.shape == (0, 4)
    for t, like in ((dw, c["weight"]), (db, c["bias"]), (dwa, c["aux_weight"])):
        assert t.shape == like.shape and torch.count_nonzero(t) == 0


@pytest.mark.parametrize("device,backend", PAIRS)
def test_grouped_many_branches(device, backend, nan_outputs):
    """M = 5 (padded to 8 lanes in the Triton tile schedule), several row tiles per scenario, skewed mix."""
    M, B, K, N = 5, 40, 7, 19
    x = torch.randn(B, K, device=device)
    w = torch.randn(M, K, N, device=device)
    s = torch.tensor([0] * 28 + [3] * 7 + [4] * 5)[torch.randperm(B)].to(device)
    fwd, _, bwd = mbl(backend)
    y, _ = nan_outputs(device, fwd, x, w, None, None, None, s, 0)
    ry, _ = KO.mbl_grouped_forward(x.double(), w.double(), None, None, None, s, 0)
    close(y, ry, torch.float32, "y")
    dz = torch.randn(B, N, device=device)
    outs = nan_outputs(device, bwd, dz, x, w, None, None, s, True, True, True, False, False)
    refs = KO.mbl_grouped_backward(dz.double(), x.double(), w.double(), None, None, s, True, True, True,
                                           False, False)
    for name, o, r in zip(("dx", "dW", "db"), outs, refs):
        close(o, r, torch.float32, name)


# ------------------------------------------------------------------------------------------------ mutual unit

def _h(device, dtype, M, B, N, layout):
    if layout == "all_route":   # the [M,B,N] view of a [B,M,N] buffer (what mbl_all_forward returns)
        return torch.randn(B, M, N).to(device=device, dtype=dtype).permute(1, 0, 2)
    return torch.randn(M, B, N).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("similarity", [0, 1], ids=["cosine", "dot"])
@pytest.mark.parametrize("N,layout", [(6, "contiguous"), (37, "all_route")])
def test_mutual_forward_backward(device, backend, dtype, similarity, N, layout, nan_outputs):
    M, B, T = 3, 7, 0.7
    h = _h(device, dtype, M, B, N, layout)
    s = scen(device, B, M)
    fwd, bwd, _, _ = mu(backend)
    out, attn = nan_outputs(device, fwd, h, s, T, similarity)
    rout, rattn = KO.mutual_forward(h.double(), s, T, similarity)
    assert attn.dtype == torch.float32
    close(out, rout, dtype, "out")
    close(attn, rattn, torch.float32 if dtype == torch.float32 else dtype, "attn")
    g = torch.randn(B, N).to(device=device, dtype=dtype)
    d = nan_outputs(device, bwd, g, h, s, attn, T, similarity)
    rd = KO.mutual_backward(g.double(), h.double(), s, rattn.double(), T, similarity)
    close(d, rd, dtype, "dh_own")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_mutual_zero_own_and_many_branches(device, backend, nan_outputs):
    """An own row of zeros (cosine clamp active) and M = 5 branches."""
    M, B, N = 5, 6, 9
    h = torch.randn(M, B, N, device=device)
    s = torch.tensor([4, 0, 2, 2, 1, 3], device=device)
    h[s[0], 0] = 0.0
    fwd, bwd, _, _ = mu(backend)
    for sim in (0, 1):
        out, attn = nan_outputs(device, fwd, h, s, 1.3, sim)
        rout, rattn = KO.mutual_forward(h.double(), s, 1.3, sim)
        close(out, rout, torch.float32, "out")
        close(attn, rattn, torch.float32, "attn")
        g = torch.randn(B, N, device=device)
        d = nan_outputs(device, bwd, g, h, s, attn, 1.3, sim)
        close(d, KO.mutual_backward(g.double(), h.double(), s, rattn.double(), 1.3, sim),
              torch.float32, "dh_own")


@pytest.mark.parametrize("device,backend,dtype,act,similarity,bias,aux",
                         interp_covering(PAIRS, FLOATS, ACTS, [0, 1], [(True, True), (False, False)]))
def test_mutual_linear(device, backend, dtype, act, similarity, bias, aux, nan_outputs):
    c = case(device, dtype, bias=bias, aux=aux)
    s = scen(device, 7, 3, empty=2)
    T = 1.7
    _, _, lfwd, lbwd = mu(backend)
    args = (c["x"], c["weight"], c["bias"], c["aux"], c["aux_weight"], s)
    args64 = tuple(d64(t) for t in args[:5]) + (s,)
    out, attn = nan_outputs(device, lfwd, *args, act, T, similarity)
    rout, rattn = KO.mutual_linear_forward(*args64, act, T, similarity)
    close(out, rout, dtype, "out")
    close(attn, rattn, torch.float32 if dtype == torch.float32 else dtype, "attn")
    g = torch.randn(7, 6).to(device=device, dtype=dtype)
    dz = nan_outputs(device, lbwd, g, *args[:6], attn, act, T, similarity)
    rdz = KO.mutual_linear_backward(d64(g), *args64, rattn.double(), act, T, similarity)
    close(dz, rdz, dtype, "dz_own")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_mutual_zero_rows(device, backend):
    fwd, bwd, lfwd, lbwd = mu(backend)
    h = torch.randn(3, 0, 6, device=device)
    s = torch.zeros(0, dtype=torch.int64, device=device)
    out, attn = fwd(h, s, 1.0, 0)
    assert out.shape == (0, 6) and attn.shape == (0, 3)
    assert bwd(torch.zeros(0, 6, device=device), h, s, attn, 1.0, 0).shape == (0, 6)
    c = case(device, torch.float32, B=0)
    out, attn = lfwd(c["x"], c["weight"], c["bias"], c["aux"], c["aux_weight"], s, 1, 1.0, 0)
    assert out.shape == (0, 6) and attn.shape == (0, 3)
    dz = lbwd(torch.zeros(0, 6, device=device), c["x"], c["weight"], c["bias"], c["aux"], c["aux_weight"], s, attn,
              1, 1.0, 0)
    assert dz.shape == (0, 6)


# ------------------------------------------------------------------------------------------------ CUDA engine
# The sync-free tiled GEMM of the cuda backend (csrc/cuda/mbranch_common.cuh): several row / K / N tiles per
# scenario, every dtype, each engine (SAML_CUDA_GROUPED=auto: tensor cores for 16-bit types; simt: FMA tiles for
# all; cublas: the former per-scenario cuBLAS path with one host sync, kept for benchmarking); then the two
# GPU-truth properties: no host sync in the ops (sync-debug mode "error") and a forward + backward captured in a
# CUDA graph replays correctly on new inputs (new scenario mixes included).

HAS_CUDA_BACKEND = torch.cuda.is_available() and _backend.why_unavailable("cuda", "cuda", "mbranch_linear") is None
cuda_only = pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="needs a GPU and the CUDA kernels")
ALL_DTYPES = FLOATS + [torch.float64]
ENGINES = ["auto", "simt", "cublas"]


def _skewed_scenario(B, M, device, empty=1):
    """Unsorted ids: scenario 0 holds about 2/3 of the rows (several 64-row tiles), ``empty`` none, others a few."""
    big = (2 * B) // 3
    others = [m for m in range(1, M) if m != empty]
    s = torch.tensor([0] * big + [others[i % len(others)] for i in range(B - big)])
    return s[torch.randperm(B)].to(device)


@cuda_only
@pytest.mark.parametrize("engine", ENGINES, ids=[f"cuda-{e}" for e in ENGINES])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_engine_multi_tile(engine, dtype, monkeypatch, nan_outputs):
    monkeypatch.setenv("SAML_CUDA_GROUPED", engine)
    dev, M, B, K, N, Ka = "cuda", 5, 300, 70, 130, 33
    c = case(dev, dtype, M=M, B=B, K=K, N=N, Ka=Ka)
    s = _skewed_scenario(B, M, dev)
    fwd, allf, bwd = mbl("cuda")
    y, z = nan_outputs(dev, fwd, c["x"], c["weight"], c["bias"], c["aux"], c["aux_weight"], s, 3)
    ry, rz = KO.mbl_grouped_forward(d64(c["x"]), d64(c["weight"]), d64(c["bias"]), d64(c["aux"]),
                                            d64(c["aux_weight"]), s, 3)
    close(y, ry, dtype, "grouped y")
    close(z, rz, dtype, "grouped z")
    for per_branch in (False, True):
        cc = case(dev, dtype, M=M, B=B, K=K, N=N, Ka=Ka, per_branch=per_branch)
        y, z = nan_outputs(dev, allf, cc["x"], cc["weight"], cc["bias"], cc["aux"], cc["aux_weight"], 4)
        ry, rz = KO.mbl_all_forward(d64(cc["x"]), d64(cc["weight"]), d64(cc["bias"]), d64(cc["aux"]),
                                            d64(cc["aux_weight"]), 4)
        close(y, ry, dtype, f"all y (per_branch={per_branch})")
        close(z, rz, dtype, f"all z (per_branch={per_branch})")
        if not per_branch:
            assert y.stride() == (N, M * N, 1)
    dz = torch.randn(B, N).to(device=dev, dtype=dtype)
    flags = (True, True, True, True, True)
    outs = nan_outputs(dev, bwd, dz, c["x"], c["weight"], c["aux"], c["aux_weight"], s, *flags)
    refs = _backward_refs(dz, c, s, flags)
    for name, o, r in zip(("dx", "dW", "db", "daux", "dWa"), outs, refs):
        close(o, r, dtype, name)
    assert torch.count_nonzero(outs[1][1]) == 0 and torch.count_nonzero(outs[2][1]) == 0  # empty scenario 1
    again = bwd(dz, c["x"], c["weight"], c["aux"], c["aux_weight"], s, *flags)
    for name, p, q in zip(("dx", "dW", "db", "daux", "dWa"), outs, again):
        assert torch.equal(p, q), f"{name}: two runs differ (engine {engine})"
    # db without dW (a single K-tile column of CTAs) and dWa alone
    part = bwd(dz, c["x"], c["weight"], c["aux"], c["aux_weight"], s, False, False, True, False, True)
    close(part[2], refs[2], dtype, "db alone")
    close(part[4], refs[4], dtype, "dWa alone")
    if dtype != torch.float64:  # mutual_linear kernels (their contract covers the 16-bit types and float32)
        _, _, lfwd, lbwd = mu("cuda")
        args = (c["x"], c["weight"], c["bias"], c["aux"], c["aux_weight"], s)
        args64 = tuple(d64(t) for t in args[:5]) + (s,)
        out, attn = nan_outputs(dev, lfwd, *args, 2, 0.9, 0)
        rout, rattn = KO.mutual_linear_forward(*args64, 2, 0.9, 0)
        close(out, rout, dtype, "mutual_linear out")
        g = torch.randn(B, N).to(device=dev, dtype=dtype)
        dzo = nan_outputs(dev, lbwd, g, *args, attn, 2, 0.9, 0)
        close(dzo, KO.mutual_linear_backward(d64(g), *args64, rattn.double(), 2, 0.9, 0), dtype,
              "mutual_linear dz_own")


@cuda_only
@pytest.mark.parametrize("route", ["own", "all"], ids=["cuda-own", "cuda-all"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_16bit_preactivation_rounded_once(route, dtype, monkeypatch):
    """Regression (bf16 leaky_relu all-route mismatch on the H200): z = x W + aux Wa + bias is accumulated in float32
    and rounded ONCE. Here x W = 100.625 (10 significant bits: not a bfloat16 value, which has 8), aux Wa = -100.5,
    bias = 0, so z = 0.125 exactly. The former path rounded x W to bfloat16 (100.5) before adding aux Wa: z = 0,
    y = 0 and leaky_relu' = 0.01 instead of 1. (float16 holds 100.625 exactly: there it is a plain check.)"""
    monkeypatch.delenv("SAML_CUDA_GROUPED", raising=False)
    dev = "cuda"
    M, B = 2, 3
    x = torch.tensor([[1.0, 1.0]] * B, device=dev, dtype=dtype)
    w = torch.tensor([[100.5], [0.125]], device=dev).expand(M, 2, 1).contiguous().to(dtype)
    aux = torch.ones(B, 1, device=dev, dtype=dtype)
    wa = torch.full((M, 1, 1), -100.5, device=dev, dtype=dtype)
    bias = torch.zeros(M, 1, device=dev, dtype=dtype)
    s = torch.tensor([0, 1, 0], device=dev)
    fwd, allf, _ = mbl("cuda")
    for act in (1, 2):  # relu, leaky_relu
        y, _ = fwd(x, w, bias, aux, wa, s, act) if route == "own" else allf(x, w, bias, aux, wa, act)
        assert (y.float() == 0.125).all(), f"act {act}: {y.flatten().tolist()}"


def _leaves(c):
    return {n: (c[n].detach().clone().requires_grad_() if c[n] is not None else None)
            for n in ("x", "weight", "bias", "aux", "aux_weight")}


def _step(kind, L, s, gy, backend="cuda"):
    """One forward + backward of a public op (cuda backend) with check_scenario=False: (out, *grads)."""
    from saml_kernels.ops.mbranch_linear import mbranch_linear
    from saml_kernels.ops.mutual_linear import mutual_linear
    from saml_kernels.ops.mutual_unit import mutual_unit

    kw = dict(aux=L["aux"], aux_weight=L["aux_weight"], backend=backend, check_scenario=False)
    if kind == "own":
        y = mbranch_linear(L["x"], L["weight"], L["bias"], s, route="own", activation="gelu", **kw)
    elif kind.startswith("all-"):
        y = mbranch_linear(L["x"], L["weight"], L["bias"], s, route="all", activation="leaky_relu",
                           grad_mask=kind[4:], **kw)
    elif kind.startswith("mutual_linear"):
        y = mutual_linear(L["x"], L["weight"], L["bias"], s, activation="silu", temperature=0.8,
                          save_branch_outputs=kind.endswith("saved"), **kw)
    else:  # "all+mutual_unit": the SAML mutual layer unfused
        h = mbranch_linear(L["x"], L["weight"], L["bias"], s, route="all", activation="relu", grad_mask="own", **kw)
        y = mutual_unit(h, s, temperature=0.8, backend=backend, check_scenario=False)
    leaves = [t for t in L.values() if t is not None]
    grads = torch.autograd.grad(y, leaves, gy[: y.numel()].view(y.shape))
    return (y, *grads)


STEP_KINDS = ["own", "all-own", "all-params", "all-none", "mutual_linear", "mutual_linear-saved", "all+mutual_unit"]


@cuda_only
@pytest.mark.parametrize("kind", STEP_KINDS, ids=[f"cuda-{k}" for k in STEP_KINDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ops_never_sync(kind, dtype, monkeypatch):
    """Forward and backward of the op raise no host synchronisation (torch.cuda.set_sync_debug_mode("error"))."""
    monkeypatch.delenv("SAML_CUDA_GROUPED", raising=False)  # "cublas" is the one engine that syncs
    M, B, K, N, Ka = 4, 200, 40, 70, 12
    c = case("cuda", dtype, M=M, B=B, K=K, N=N, Ka=Ka)
    s = _skewed_scenario(B, M, "cuda")
    gy = torch.randn(M * B * N, device="cuda").to(dtype)
    _step(kind, _leaves(c), s, gy)  # warm-up: lazy initialisations (cuBLAS handles, module loads) outside the check
    torch.cuda.synchronize()
    L = _leaves(c)
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = _step(kind, L, s, gy)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for t in outs:
        assert torch.isfinite(t).all()


@cuda_only
@pytest.mark.parametrize("kind", STEP_KINDS, ids=[f"cuda-{k}" for k in STEP_KINDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_forward_backward(kind, dtype, monkeypatch):
    """Forward + backward captured once in a torch.cuda.CUDAGraph, replayed with new inputs (new values and new
    scenario mixes, one with every row in one scenario) copied into the static tensors: equals eager."""
    monkeypatch.delenv("SAML_CUDA_GROUPED", raising=False)
    M, B, K, N, Ka = 4, 200, 40, 70, 12
    c = case("cuda", dtype, M=M, B=B, K=K, N=N, Ka=Ka)
    L = _leaves(c)
    s = _skewed_scenario(B, M, "cuda")
    gy = torch.randn(M * B * N, device="cuda").to(dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            _step(kind, L, s, gy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(kind, L, s, gy)
    mixes = [_skewed_scenario(B, M, "cuda", empty=2), torch.full((B,), M - 1, device="cuda"),
             torch.randint(0, M, (B,), device="cuda")]
    for new_s in mixes:
        fresh = case("cuda", dtype, M=M, B=B, K=K, N=N, Ka=Ka)
        with torch.no_grad():
            for n, t in L.items():
                if t is not None:
                    t.copy_(fresh[n])
            s.copy_(new_s)
            gy.copy_(torch.randn(M * B * N, device="cuda").to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        eager = _step(kind, L, s, gy)
        for i, (g, e) in enumerate(zip(static_out, eager)):
            close(g, e, dtype, f"{kind} output {i} (graph replay vs eager)")
