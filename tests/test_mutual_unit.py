"""mutual_unit: every backend against the float64 reference (values, attention, gradients, stop-gradient),
edge cases (B = 0, M = 1, odd N, strided h, zero own vector), gradcheck, opcheck, torch.compile, bad input."""
from __future__ import annotations

import math

import pytest
import torch

import saml_kernels
from saml_kernels.ops import mutual_unit as mu_mod

from conftest import device_backends, interp_covering, tolerance
from oracles import mutual_oracle

PAIRS = device_backends("mutual_unit")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(M=3, B=9, N=7, dtype=torch.float32, device="cpu", idx_dtype=torch.int64):
    h = torch.randn(M, B, N, dtype=torch.float64).to(device=device, dtype=dtype)
    s = torch.randint(0, M, (B,)).to(device=device, dtype=idx_dtype)
    return h, s


def oracle(h, s, **kw):
    """float64 reference on the (already rounded) inputs: out [B, N] and attn [B, M] in float64."""
    return mutual_oracle(h.detach().double(), s, return_attention=True, **kw)


def check_forward(h, s, backend, dtype, **kw):
    out, attn = saml_kernels.mutual_unit(h, s, return_attention=True, backend=backend, **kw)
    ro, ra = oracle(h, s, **kw)
    assert out.dtype == h.dtype and out.shape == ro.shape
    assert attn.dtype == torch.float32 and attn.shape == ra.shape
    torch.testing.assert_close(out.double(), ro, **tolerance(dtype))
    # attn is float32 whatever h is
    torch.testing.assert_close(attn.double(), ra, **tolerance(torch.float32 if dtype == torch.float64 else dtype))
    return out


# ------------------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("device,backend,similarity,temperature,dtype",
                         interp_covering(PAIRS, ["cosine", "dot"], [0.25, 1.0, 4.0], DTYPES))
def test_forward_matrix(device, backend, similarity, temperature, dtype):
    h, s = make(dtype=dtype, device=device)
    check_forward(h, s, backend, dtype, temperature=temperature, similarity=similarity)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("M,B,N", [(1, 5, 4), (2, 1, 1), (4, 13, 3), (3, 6, 33), (5, 40, 64)])
def test_shapes_and_index_dtypes(device, backend, idx_dtype, M, B, N):
    h, s = make(M, B, N, device=device, idx_dtype=idx_dtype)
    out = check_forward(h, s, backend, torch.float32, similarity="cosine", temperature=0.5)
    if M == 1:  # a single scenario: the attention is 1 and the output is the own branch
        torch.testing.assert_close(out, h[0])


@pytest.mark.parametrize("device,backend", PAIRS)
def test_float64(device, backend):
    h, s = make(dtype=torch.float64, device=device)
    check_forward(h, s, backend, torch.float64, similarity="cosine", temperature=0.7)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_batch_zero(device, backend):
    h = torch.randn(3, 0, 5, device=device, requires_grad=True)
    s = torch.zeros(0, dtype=torch.int64, device=device)
    out, attn = saml_kernels.mutual_unit(h, s, return_attention=True, backend=backend)
    assert out.shape == (0, 5) and attn.shape == (0, 3)
    out.sum().backward()
    assert h.grad.shape == h.shape


@pytest.mark.parametrize("device,backend", PAIRS)
def test_strided_h(device, backend):
    """The all-route layout ([M, B, N] view of [B, M, N]) and a non-contiguous last dim give the same result."""
    M, B, N = 3, 8, 6
    base = torch.randn(B, M, N, device=device)
    h = base.permute(1, 0, 2)
    s = torch.randint(0, M, (B,), device=device)
    out = check_forward(h, s, backend, torch.float32)
    wide = torch.randn(M, B, 2 * N, device=device)[..., ::2]
    check_forward(wide, s, backend, torch.float32, similarity="dot")
    torch.testing.assert_close(out, saml_kernels.mutual_unit(h.contiguous(), s, backend=backend))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_zero_own_vector(device, backend, similarity):
    """A sample whose own branch output is all zeros (e.g. relu dead): the cosine eps path, finite everywhere."""
    h, s = make(M=3, B=6, N=5, device=device)
    h[s[0].long(), 0] = 0
    h[:, 1] = 0  # every branch zero for sample 1
    h.requires_grad_()
    out = check_forward(h, s, backend, torch.float32, similarity=similarity)
    assert torch.isfinite(out).all()
    g = torch.randn_like(out)
    (dh,) = torch.autograd.grad(out, h, g)
    assert torch.isfinite(dh).all()
    hr = h.detach().double().requires_grad_()
    (dr,) = torch.autograd.grad(mutual_oracle(hr, s, similarity=similarity), hr, g.double())
    # the cosine gradient at a zero own vector is ~1/eps (the function is steep there): compare relatively
    torch.testing.assert_close(dh.double(), dr, rtol=1e-4, atol=1e-4 * float(dr.abs().max()))


# ------------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + DTYPES[1:])
def test_gradients(device, backend, similarity, dtype):
    h, s = make(M=4, B=11, N=9, dtype=dtype, device=device)
    h.requires_grad_()
    out = saml_kernels.mutual_unit(h, s, temperature=0.6, similarity=similarity, backend=backend)
    g = torch.randn(out.shape, dtype=torch.float64).to(device=device, dtype=dtype)
    (dh,) = torch.autograd.grad(out, h, g)
    hr = h.detach().double().requires_grad_()
    (dr,) = torch.autograd.grad(mutual_oracle(hr, s, temperature=0.6, similarity=similarity), hr, g.double())
    tol = tolerance(dtype)
    if dtype in (torch.float16, torch.bfloat16):  # dh is rounded to dtype after float32 arithmetic
        tol = dict(atol=4 * tol["atol"], rtol=4 * tol["rtol"])
    torch.testing.assert_close(dh.double(), dr, **tol)
    # stop-gradient: only own entries h[s_b, b] carry gradient, the others are exactly zero
    own = torch.zeros(h.shape[:2], dtype=torch.bool, device=device)
    own[s.long(), torch.arange(h.shape[1], device=device)] = True
    assert (dh[~own] == 0).all()


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_gradcheck(device, backend, similarity):
    """gradcheck w.r.t. the own entries h[s_b, b] (the other branches are stop-gradient by definition, so a
    finite difference through them would measure a gradient the op deliberately does not have)."""
    h, s = make(M=3, B=4, N=3, dtype=torch.float64, device=device)
    pos = (s.long(), torch.arange(4, device=device))
    own = h[pos].clone().requires_grad_()

    def fn(own):
        return saml_kernels.mutual_unit(h.index_put(pos, own), s, temperature=0.8, similarity=similarity,
                                        backend=backend)

    assert torch.autograd.gradcheck(fn, (own,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_opcheck(device, backend):
    h, s = make(M=3, B=5, N=4, device=device)
    h.requires_grad_()
    args = (h, s, 0.7, 0, True, backend)
    torch.library.opcheck(torch.ops.saml_kernels.mutual_unit.default, args)
    out, attn = torch.ops.saml_kernels.mutual_unit(*args)
    bargs = (torch.randn_like(out), h.detach(), s, attn.detach(), 0.7, 1, backend)
    torch.library.opcheck(torch.ops.saml_kernels.mutual_unit_backward.default, bargs)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    h, s = make(M=3, B=6, N=5, device=device)

    def f(h, s):
        return saml_kernels.mutual_unit(h * 2, s, temperature=0.5, backend=backend).pow(2).sum()

    he, hc = h.clone().requires_grad_(), h.clone().requires_grad_()
    ye = f(he, s)
    yc = torch.compile(f, fullgraph=True, backend="aot_eager")(hc, s)
    torch.testing.assert_close(yc, ye)
    ye.backward()
    yc.backward()
    torch.testing.assert_close(hc.grad, he.grad)


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("device,backend", PAIRS)
def test_bad_input(device, backend):
    h, s = make(M=3, B=4, N=5, device=device)
    f = lambda **kw: saml_kernels.mutual_unit(kw.pop("h", h), kw.pop("s", s), backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="h must have 3"):
        f(h=h[0])
    with pytest.raises(TypeError, match="h must have dtype"):
        f(h=h.long())
    with pytest.raises(TypeError, match="scenario must have dtype"):
        f(s=s.float())
    with pytest.raises(ValueError, match="scenario must have B = 4"):
        f(s=s[:3])
    bad = s.clone()
    bad[2] = 3
    with pytest.raises(IndexError, match=r"scenario\[2\] = 3 is out of range \[0, 3\)"):
        f(s=bad)
    bad[2] = -1
    with pytest.raises(IndexError, match=r"scenario\[2\] = -1"):
        f(s=bad)
    for t in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            f(temperature=t)
    for t in ("1", None, True):
        with pytest.raises(TypeError, match="temperature"):
            f(temperature=t)
    with pytest.raises(ValueError, match="similarity must be one of"):
        f(similarity="euclid")
    with pytest.raises(ValueError, match="at least one branch"):
        f(h=h[:0], s=s)
    with pytest.raises(ValueError, match="on meta"):
        f(s=s.to("meta"))
    with pytest.raises(ValueError, match="unknown backend"):
        saml_kernels.mutual_unit(h, s, backend="fortran")


# ------------------------------------------------------------------------------------------------ large magnitudes

def _plain64(h, s, temperature=1.0):
    """Independent float64 oracle of the cosine mutual unit, the definition as written (no scaling: float64 holds
    |h|^2 up to |h| ~ 1e154), with the stop-gradient of the non-own branches."""
    M, B, N = h.shape
    own_mask = (torch.arange(M, device=h.device).view(M, 1) == s.long().view(1, B)).unsqueeze(-1)
    h = torch.where(own_mask, h, h.detach())
    own = h[s.long(), torch.arange(B, device=h.device)]
    sim = (h * own).sum(-1) / (h.norm(dim=-1).clamp_min(1e-8) * own.norm(dim=-1).clamp_min(1e-8))
    a = torch.softmax(sim / temperature, 0)
    return (a.unsqueeze(-1) * h).sum(0)


def _close_per_row(x, ref, rtol, what):
    """x ~ ref row by row relative to the row's largest |ref| (rows differ by up to 60 orders of magnitude)."""
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    torch.testing.assert_close(x.double() / scale, ref / scale, rtol=rtol, atol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("scale", [1e25, 1e28, 1e30])
@pytest.mark.parametrize("N", [5, 300])
def test_cosine_large_magnitude_fp32(device, backend, scale, N):
    """Regression: |h|^2 overflowed float32 for |h| > ~1.8e19 (cos = inf/inf = NaN). The cosine is scale-invariant,
    so fp32 h ~ 1e25..1e30 must give the float64 result, forward and backward (N = 300: the multi-tile paths)."""
    g0 = torch.Generator().manual_seed(int(math.log10(scale)) + N)
    h = (torch.randn(3, 6, N, generator=g0, dtype=torch.float64) * scale).float()
    s = torch.tensor([0, 1, 2, 1, 0, 2])
    g = torch.randn(6, N, generator=g0)
    hd = h.to(device).requires_grad_()
    out = saml_kernels.mutual_unit(hd, s.to(device), backend=backend)
    (dh,) = torch.autograd.grad(out, hd, g.to(device))
    hr = h.double().requires_grad_()
    ref = _plain64(hr, s)
    (dr,) = torch.autograd.grad(ref, hr, g.double())
    assert torch.isfinite(out).all() and torch.isfinite(dh).all()
    _close_per_row(out.cpu(), ref.detach(), 1e-5, "out")
    _close_per_row(dh.cpu().flatten(0, 1), dr.flatten(0, 1), 1e-4, "grad")
    # the single-element case of the bug report: the true answer is the input itself
    one = saml_kernels.mutual_unit(torch.full((1, 1, 1), 1e30, device=device), torch.tensor([0], device=device),
                                   backend=backend)
    assert abs(one.item() / 1e30 - 1) < 1e-6, one.item()


@pytest.mark.parametrize("device,backend", PAIRS)
def test_cosine_mixed_huge_and_tiny_rows(device, backend):
    """Rows of 1e30, 1e25, 1, 1e-25, 1e-30 and 0 side by side (per branch and per sample): finite, equal to the
    float64 definition, eps semantics kept for the tiny and zero rows. A zero / tiny own next to a 1e25 branch has
    a gradient ~1e33 (|g| |h_m| / eps; NaN before the fix): finite. (Next to branches >= ~1e29 that true gradient
    is >= 1e37, at float32's limit, and may overflow. Known limit: a tiny own and another tiny (< eps) branch next to
    a >= ~1e20 branch overflow an intermediate e / eps^2 in the backward, giving inf instead of ~1e33.)"""
    g0 = torch.Generator().manual_seed(7)
    N = 7
    mags = torch.tensor([[1e30, 1e30, 1e-30, 1.0, 0.0, 1e25, 1e-30, 1e30],     # branch 0
                         [1e-30, 1e20, 1e-30, 1e-25, 1e25, 1.0, 1.0, 0.0],      # branch 1
                         [0.0, 1e30, 1e-30, 1e25, 1e20, 1e-25, 1e25, 1e-30]],  # branch 2
                        dtype=torch.float64)
    s = torch.tensor([0, 1, 2, 2, 0, 0, 0, 0])   # sample 4: zero own, sample 6: own 1e-30, next to 1e25 branches
    h = (torch.randn(3, 8, N, generator=g0, dtype=torch.float64) * mags.unsqueeze(-1)).float()
    g = torch.randn(8, N, generator=g0)
    hd = h.to(device).requires_grad_()
    out = saml_kernels.mutual_unit(hd, s.to(device), backend=backend)
    (dh,) = torch.autograd.grad(out, hd, g.to(device))
    hr = h.double().requires_grad_()
    ref = _plain64(hr, s)
    (dr,) = torch.autograd.grad(ref, hr, g.double())
    assert torch.isfinite(out).all() and torch.isfinite(dh).all()
    _close_per_row(out.cpu(), ref.detach(), 1e-5, "out")
    own = dh.cpu()[s, torch.arange(8)]
    _close_per_row(own, dr[s, torch.arange(8)], 1e-4, "grad own")


@pytest.mark.parametrize("device,backend", device_backends("mutual_linear"))
@pytest.mark.parametrize("N", [5, 40])
def test_mutual_linear_cosine_large_magnitude_fp32(device, backend, N):
    """The fused mutual_linear kernels at h ~ 1e30 (x scaled; relu keeps the scale): forward and backward."""
    g0 = torch.Generator().manual_seed(N)
    x = (torch.randn(5, 6, generator=g0, dtype=torch.float64) * 1e30).float()
    w = (torch.randn(3, 6, N, generator=g0, dtype=torch.float64) / 6 ** 0.5).float()
    s = torch.tensor([0, 1, 2, 1, 0])
    g = torch.randn(5, N, generator=g0)
    xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    out = saml_kernels.mutual_linear(xd, wd, None, s.to(device), activation="relu", backend=backend)
    dx, dw = torch.autograd.grad(out, (xd, wd), g.to(device))
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    hr = torch.relu(torch.einsum("bk,mkn->mbn", xr, wr))
    # mutual_linear's gradient semantics: only the own branch output carries gradient (to x and to W_m)
    ref = _plain64(hr, s)
    rdx, rdw = torch.autograd.grad(ref, (xr, wr), g.double())
    for t in (out, dx, dw):
        assert torch.isfinite(t).all()
    _close_per_row(out.cpu(), ref.detach(), 1e-5, "out")
    _close_per_row(dx.cpu(), rdx, 1e-4, "grad x")
    _close_per_row(dw.cpu().flatten(0, 1), rdw.flatten(0, 1), 1e-4, "grad weight")


@pytest.mark.parametrize("temperature", [0.7, 0.3, 0.6, 3.7, 1.0, 1e-3, 1e30])
def test_triton_temperature_reaches_float64_kernels_exactly(temperature):
    """Triton passes a Python float kernel argument as float32: 1/0.7 would carry a 6e-8 relative error into every
    float64 softmax on the GPU (the interpreter keeps the Python float, so only a GPU run would show it). The
    launchers pass 1/T as a float32 (hi, lo) pair that the kernels add in their accumulator dtype."""
    pytest.importorskip("triton")
    import numpy as np

    from saml_kernels.triton import mutual_unit as tmu

    hi, lo = tmu._inv_temperature(temperature)
    assert float(np.float32(hi)) == hi and float(np.float32(lo)) == lo      # both are float32 values
    inv = 1.0 / temperature
    assert abs((hi + lo) - inv) <= 2.0 ** -44 * abs(inv)
    assert float(np.float32(hi + lo)) == hi                                 # float32 kernels see exactly hi
    for k in (tmu._mutual_fwd_kernel, tmu._mutual_bwd_kernel, tmu._mutual_linear_fwd_kernel,
              tmu._mutual_linear_bwd_kernel):
        assert "inv_t" not in k.arg_names and {"inv_t_hi", "inv_t_lo"} <= set(k.arg_names), k.arg_names
