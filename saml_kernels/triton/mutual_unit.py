"""Triton kernels of the mutual unit and of the fused mutual_linear forward.

Contracts (csrc/registry.cpp), for h [M,B,N], scenario s [B], own = h[s_b, b]:

    sim[m,b] = <own, h[m,b]> / (max(|own|,1e-8) max(|h[m,b]|,1e-8))   (cosine)
             = <own, h[m,b]> / sqrt(N)                                  (dot)
    a[b] = softmax_m(sim[:, b] / T);  out[b] = sum_m a[b,m] h[m,b]

    mutual_forward(h, s, T, sim)                   -> (out [B,N] h.dtype, attn [B,M] float32)
    mutual_backward(g, h, s, attn, T, sim)         -> dh_own [B,N]: the gradient w.r.t. own (other branches are
                                                      stop-gradient; own is also the s_b-th term of h). The
                                                      softmax weights are recomputed from h (M values per row,
                                                      free next to the pass over h), so float64 stays exact.
    mutual_linear_forward(x, W, bias, aux, Wa, s, act, T, sim) -> (out, attn) with h[m,b] = act(x W_m + aux Wa_m
                                                      + bias_m) computed in registers, never written to memory.

Backward math (o = own, g = grad_out, u_m = <g, h_m>, c_m = a_m (u_m - sum_j a_j u_j) / T, n_o = max(|o|, eps),
n_m = max(|h_m|, eps), I = [|o| > eps]):
    dot:    do = a_s g + sum_m c_m h_m / sqrt(N) + c_s o / sqrt(N)
    cosine: do = a_s g + sum_m c_m h_m / (n_o n_m) - (sum_m c_m sim_m) I o / (n_o |o|)
                 + c_s (o / n_o^2 - sim_s I o / (n_o |o|))
(the c_s terms come from own being both arguments of sim_s; for cosine they vanish when |o| > eps).

Overflow: |h|^2 overflows float32 for |h| > ~1.8e19. The cosine therefore runs on rows scaled by an exact power of
two r_m (``_inv_scale``, from the exponent bits of max|h_m|; 1 for max|h_m| < 2): dots <o r_o, h_m r_m>, norms
|h_m r_m|^2, eps r_m in the clamp, the same value with the same eps semantics. Gradient coefficients take one r
factor at a time after the O(|h|) factor c (r_o r_m underflows at |h| = 1e30). Rows longer than one tile get an
extra pass for max|h_m| (cosine only).

Precision: the mutual kernels compute in float32 (float64 for float64 h); 1/T reaches them as a float32 pair
(hi, lo) summed in that dtype (``_inv_temperature``: Triton passes a Python float as float32, whose 6e-8 relative
error float64 would otherwise carry). The fused GEMMs use ``dot_input_precision`` like mbranch_linear (exact fp32 unless torch
allows TF32); the fused path is float32/half only, float64 runs all_forward (fp64 dots) + the mutual kernels.

Layout: one program per BLOCK_B rows holds a [MP, BLOCK_B, BLOCK_N] register tile (all M branches, MP = M
rounded up to a power of two); rows longer than BLOCK_N are handled by two passes over N tiles (dot products
and norms first, then the mix), so any N works. Reductions run in a fixed order: deterministic.

The fused mutual_linear forward keeps all M branch tiles of a row block in registers, so it needs the whole
row: N <= 256 and MP * BLOCK_N <= 1024 (e.g. M <= 4 at N = 256, M <= 8 at N = 128). Larger shapes fall back
to the unfused pair all_forward + mutual_forward (h [M,B,N] is materialised then; documented, not silent in
the code: see ``fused_supported``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _backend
from .._codes import SIMILARITIES
from ..ops._activation import activation_backward, needs_preactivation
from . import AotSpec, dot_input_precision, kernel_signature, launch, on_tensor_device
from .mbranch_linear import _GELU, _LEAKY, _RELU, _SILU, _SLOPE, ACT_GELU, _activate, _mm_rows, _pow2, all_forward

__all__ = ["mutual_forward", "mutual_backward", "mutual_linear_forward", "mutual_linear_backward", "fused_supported",
           "aot_specs"]

EPS = 1e-8
COSINE = SIMILARITIES["cosine"]
_COSINE: tl.constexpr = tl.constexpr(COSINE)  # for the jit functions (they read only constexpr globals)
FUSED_MAX_N = 256
FUSED_MAX_MN = 1024
_ELEMS = 2048          # register-tile budget MP * BLOCK_B * BLOCK_N of the mutual kernels (4 warps: 16 values
                       # per thread per 3-D temporary; 8192 spilled kilobytes in the backward, seen with ptxas -v)


# ------------------------------------------------------------------------------------------------ jit helpers

@triton.jit
def _softmax_m(sim, valid_m, inv_t):
    """softmax over axis 0 (branches) of sim [MP, BB] / T; padded branches get weight 0."""
    logit = tl.where(valid_m, sim * inv_t, float("-inf"))
    mx = tl.max(logit, 0)
    mx = tl.where(mx > float("-inf"), mx, 0.0)            # padded rows (no valid branch) stay finite
    e = tl.where(valid_m, tl.exp(logit - mx[None, :]), 0.0)
    den = tl.sum(e, 0)
    return e / tl.where(den > 0, den, 1.0)[None, :]


@triton.jit
def _inv_scale(amax):
    """r [MP, BB]: a power of two with max|h_m| r < 4, from amax's exponent bits (integer ops, exact); 1 where
    amax < 2; non-finite amax gives 2^-126 (inf/NaN still end as NaN in the cosine)."""
    if amax.dtype == tl.float64:
        e = (amax.to(tl.int64, bitcast=True) >> 52) & 0x7FF
        f = tl.where(e > 1023, tl.maximum(2046 - e, 1), 1023)
        r = (f << 52).to(tl.float64, bitcast=True)
    else:
        e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        f = tl.where(e > 127, tl.maximum(254 - e, 1), 127)
        r = (f << 23).to(tl.float32, bitcast=True)
    return r


@triton.jit
def _row_scale(H, own_mask, SIM: tl.constexpr):
    """r [MP, BB] of a whole-row tile H [MP, BB, BN] (cosine); ones for dot (no scaling)."""
    if SIM == _COSINE:
        r = _inv_scale(tl.max(tl.abs(H), 2))
    else:
        r = tl.where(own_mask, 1.0, 1.0).to(H.dtype)
    return r


@triton.jit
def _tile_stats(H, r, own_mask):
    """(<o r_o, h_m r_m>, |h_m r_m|^2) [MP, BB] over one tile H [MP, BB, BN]."""
    Hs = H * r[:, :, None]
    own = tl.sum(tl.where(own_mask[:, :, None], Hs, 0.0), 0)
    return tl.sum(Hs * own[None, :, :], 2), tl.sum(Hs * Hs, 2)


@triton.jit
def _similarity(dots, norms, r, own_mask, N, SIM: tl.constexpr):
    """sim [MP, BB] from the scaled <own, h_m> and |h_m|^2 (own's norm is its own branch's entry)."""
    if SIM == _COSINE:
        nm = tl.maximum(tl.sqrt(norms), 1e-8 * r)
        no = tl.sum(tl.where(own_mask, nm, 0.0), 0)
        sim = dots / (nm * no[None, :])
    else:
        sim = dots / tl.sqrt(N.to(dots.dtype))
    return sim


@triton.jit
def _store_attn(attn_ptr, a, mi, rows, rmask, M, stride_ab, stride_am):
    tl.store(attn_ptr + rows[None, :] * stride_ab + mi[:, None] * stride_am, a,
             mask=(mi[:, None] < M) & rmask[None, :])


@triton.jit
def _grad_coefs(dots, norms, r, u, a, own_mask, N, inv_t, SIM: tl.constexpr):
    """(a_s [BB], coef_h [MP,BB], coef_o [BB], q [BB]) with d own = a_s g + sum_m coef_h[m] h_m + coef_o (own q)
    (module docstring: c_m = a_m (u_m - sum_j a_j u_j) / T, u_m = <g, h_m>)."""
    ubar = tl.sum(a * u, 0)
    c = a * (u - ubar[None, :]) * inv_t                                      # dL/dsim_m
    a_s = tl.sum(tl.where(own_mask, a, 0.0), 0)
    c_s = tl.sum(tl.where(own_mask, c, 0.0), 0)
    if SIM == _COSINE:
        # scaled quantities (module docstring "Overflow"): the true n_m is nm / r_m, so each true coefficient
        # carries r_o r_m or r_o^2, applied one factor at a time
        nm = tl.maximum(tl.sqrt(norms), 1e-8 * r)
        r_o = tl.sum(tl.where(own_mask, r, 0.0), 0)
        o_len = tl.sqrt(tl.sum(tl.where(own_mask, norms, 0.0), 0))
        big = o_len > 1e-8 * r_o
        no = tl.maximum(o_len, 1e-8 * r_o)
        sim = dots / (nm * no[None, :])
        lo = tl.minimum(r, r_o[None, :])                  # c = O(|h| / lo): lo first, the larger scale last
        coef_h = tl.where(own_mask, 0.0, ((c * lo) / (nm * no[None, :])) * tl.maximum(r, r_o[None, :]))
        sim_s = tl.sum(tl.where(own_mask, sim, 0.0), 0)
        # own row (its coef_h entry moved here): r_o^2 (2 c_s / n_o^2 - I (sum_m c_m sim_m + c_s sim_s) / (n_o |o|)),
        # applied as coef_o (own q), q = r_o / n_o, |own q| <= 1 (c_s / n_o^2 alone overflows at a zero own next
        # to huge branches: inf * 0 = NaN)
        tail = tl.where(big, -(tl.sum(c * sim, 0) + c_s * sim_s) / tl.where(big, o_len, 1.0), 0.0)
        coef_o = ((2.0 * c_s) / no + tail) * r_o
        q = (1.0 / no) * r_o
    else:
        rs = 1.0 / tl.sqrt(N.to(u.dtype))
        coef_h = c * rs
        coef_o = c_s * rs
        q = tl.where(a_s == a_s, 1.0, 1.0).to(u.dtype)
    return a_s, coef_h, coef_o, q


@triton.jit
def _activate_grad(z, ACT: tl.constexpr):
    """act'(z) (relu' = [z > 0], leaky 1 or 0.01, exact gelu Phi(z) + z phi(z), silu sig (1 + z (1 - sig)))."""
    if ACT == _RELU:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == _LEAKY:
        d = tl.where(z > 0, 1.0, _SLOPE)
    elif ACT == _GELU:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == _SILU:
        sg = 1.0 / (1.0 + tl.exp(-z))
        d = sg * (1.0 + z * (1.0 - sg))
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


@triton.jit
def _branch_tiles(x_ptr, w_ptr, bias_ptr, a2_ptr, w2_ptr, rows, rmask, cols, cmask, mi, s, M, K, K2,
                  stride_xb, stride_xk, stride_wm, stride_wk, stride_wn, stride_bm, stride_bn,
                  stride_a2b, stride_a2k, stride_w2m, stride_w2k, stride_w2n,
                  HAS_BIAS: tl.constexpr, HAS_AUX: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                  MP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """H [MP, BB, BN] = act(x W_m + aux Wa_m + bias_m) for every branch of a row block (float32, registers),
    and the own branch's pre-activation z[s_b, b] [BB, BN]."""
    H = tl.zeros((MP, BLOCK_B, BLOCK_N), dtype=tl.float32)
    z_own = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for m in range(0, M):
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        acc = _mm_rows(acc, x_ptr, rows, rmask, stride_xb, stride_xk, w_ptr + m * stride_wm, stride_wk, stride_wn,
                       cols, cmask, K, BLOCK_K, PREC)
        if HAS_AUX:
            acc = _mm_rows(acc, a2_ptr, rows, rmask, stride_a2b, stride_a2k, w2_ptr + m * stride_w2m, stride_w2k,
                           stride_w2n, cols, cmask, K2, BLOCK_K, PREC)
        if HAS_BIAS:
            b = tl.load(bias_ptr + m * stride_bm + cols * stride_bn, mask=cmask, other=0.0)
            acc += b[None, :].to(tl.float32)
        z_own = tl.where((s == m)[:, None], acc, z_own)
        hm = tl.where(cmask[None, :], _activate(acc, ACT), 0.0)   # kept in float32, never rounded
        H = tl.where((mi == m)[:, None, None], hm[None, :, :], H)
    return H, z_own


@triton.jit
def _row_scale_passes(base, stride_hn, valid_m, own_mask, N, ACC: tl.constexpr, SIM: tl.constexpr,
                      MP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """r [MP, BB] of rows longer than one tile: an extra pass for max|h_m| (cosine only; ones for dot)."""
    if SIM == _COSINE:
        amax = tl.zeros((MP, BLOCK_B), dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            H = tl.load(base + cols[None, None, :] * stride_hn, mask=valid_m[:, :, None] & (cols < N)[None, None, :],
                        other=0.0).to(ACC)
            amax = tl.maximum(amax, tl.max(tl.abs(H), 2))
        r = _inv_scale(amax)
    else:
        r = tl.where(own_mask, 1.0, 1.0).to(ACC)
    return r


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def _mutual_fwd_kernel(h_ptr, s_ptr, out_ptr, attn_ptr, M, B, N, inv_t_hi, inv_t_lo,
                       stride_hm, stride_hb, stride_hn, stride_ob, stride_on, stride_ab, stride_am,
                       SIM: tl.constexpr, MP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                       SINGLE: tl.constexpr):
    pid = tl.program_id(0)
    ACC = tl.float64 if h_ptr.dtype.element_ty == tl.float64 else tl.float32   # float32 accumulation (64 for 64)
    inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)                  # 1/T to ~48 bits (_inv_temperature)
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    mi = tl.arange(0, MP)
    s = tl.load(s_ptr + rows, mask=rmask, other=0)
    ok = (s >= 0) & (s < M)              # an unchecked out-of-range scenario: a zero row (out, attn, grad)
    own_mask = mi[:, None] == s[None, :]                                     # [MP, BB]
    valid_m = (mi[:, None] < M) & rmask[None, :]
    base = h_ptr + mi[:, None, None].to(tl.int64) * stride_hm + rows[None, :, None] * stride_hb
    if SINGLE:                                                               # the whole row is one tile
        cols = tl.arange(0, BLOCK_N)
        H = tl.load(base + cols[None, None, :] * stride_hn, mask=valid_m[:, :, None] & (cols < N)[None, None, :],
                    other=0.0).to(ACC)
        r = _row_scale(H, own_mask, SIM)
        dots, norms = _tile_stats(H, r, own_mask)
        a = _softmax_m(_similarity(dots, norms, r, own_mask, N, SIM), valid_m, inv_t)
        out = tl.where(ok[:, None], tl.sum(a[:, :, None] * H, 0), 0.0)
        tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :] * stride_on,
                 out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & (cols < N)[None, :])
    else:
        r = _row_scale_passes(base, stride_hn, valid_m, own_mask, N, ACC, SIM, MP, BLOCK_B, BLOCK_N)
        dots = tl.zeros((MP, BLOCK_B), dtype=ACC)
        norms = tl.zeros((MP, BLOCK_B), dtype=ACC)
        for n0 in range(0, N, BLOCK_N):                                      # pass 1: <own, h_m>, |h_m|^2
            cols = n0 + tl.arange(0, BLOCK_N)
            msk = valid_m[:, :, None] & (cols < N)[None, None, :]
            H = tl.load(base + cols[None, None, :] * stride_hn, mask=msk, other=0.0).to(ACC)
            d_t, n_t = _tile_stats(H, r, own_mask)
            dots += d_t
            norms += n_t
        a = _softmax_m(_similarity(dots, norms, r, own_mask, N, SIM), valid_m, inv_t)
        for n0 in range(0, N, BLOCK_N):                                      # pass 2: the mix
            cols = n0 + tl.arange(0, BLOCK_N)
            msk = valid_m[:, :, None] & (cols < N)[None, None, :]
            H = tl.load(base + cols[None, None, :] * stride_hn, mask=msk, other=0.0).to(ACC)
            out = tl.where(ok[:, None], tl.sum(a[:, :, None] * H, 0), 0.0)
            tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :] * stride_on,
                     out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & (cols < N)[None, :])
    _store_attn(attn_ptr, tl.where(ok[None, :], a, 0.0), mi, rows, rmask, M, stride_ab, stride_am)


@triton.jit
def _mutual_bwd_kernel(g_ptr, h_ptr, s_ptr, attn_ptr, dh_ptr, M, B, N, inv_t_hi, inv_t_lo,
                       stride_gb, stride_gn, stride_hm, stride_hb, stride_hn, stride_ab, stride_am,
                       stride_db, stride_dn,
                       SIM: tl.constexpr, MP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    ACC = tl.float64 if h_ptr.dtype.element_ty == tl.float64 else tl.float32   # float32 accumulation (64 for 64)
    inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)                  # 1/T to ~48 bits (_inv_temperature)
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    mi = tl.arange(0, MP)
    s = tl.load(s_ptr + rows, mask=rmask, other=0)
    ok = (s >= 0) & (s < M)              # an unchecked out-of-range scenario: a zero row (out, attn, grad)
    own_mask = mi[:, None] == s[None, :]
    valid_m = (mi[:, None] < M) & rmask[None, :]
    base = h_ptr + mi[:, None, None].to(tl.int64) * stride_hm + rows[None, :, None] * stride_hb
    r = _row_scale_passes(base, stride_hn, valid_m, own_mask, N, ACC, SIM, MP, BLOCK_B, BLOCK_N)
    dots = tl.zeros((MP, BLOCK_B), dtype=ACC)
    norms = tl.zeros((MP, BLOCK_B), dtype=ACC)
    u = tl.zeros((MP, BLOCK_B), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):                                          # pass 1: <o,h_m>, |h_m|^2, <g,h_m>
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < N
        H = tl.load(base + cols[None, None, :] * stride_hn, mask=valid_m[:, :, None] & cm[None, None, :],
                    other=0.0).to(ACC)
        g = tl.load(g_ptr + rows[:, None] * stride_gb + cols[None, :] * stride_gn,
                    mask=rmask[:, None] & cm[None, :], other=0.0).to(ACC)
        d_t, n_t = _tile_stats(H, r, own_mask)
        dots += d_t
        norms += n_t
        u += tl.sum(H * g[None, :, :], 2)
    # softmax weights recomputed from dots/norms (M values per row, free here) instead of read from the float32
    # attn: keeps float64 gradients exact; attn is accepted for the contract
    a = _softmax_m(_similarity(dots, norms, r, own_mask, N, SIM), valid_m, inv_t)
    a_s, coef_h, coef_o, q = _grad_coefs(dots, norms, r, u, a, own_mask, N, inv_t, SIM)
    for n0 in range(0, N, BLOCK_N):                                          # pass 2: write d own
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < N
        H = tl.load(base + cols[None, None, :] * stride_hn, mask=valid_m[:, :, None] & cm[None, None, :],
                    other=0.0).to(ACC)
        g = tl.load(g_ptr + rows[:, None] * stride_gb + cols[None, :] * stride_gn,
                    mask=rmask[:, None] & cm[None, :], other=0.0).to(ACC)
        own = tl.sum(tl.where(own_mask[:, :, None], H, 0.0), 0)
        d = a_s[:, None] * g + tl.sum(coef_h[:, :, None] * H, 0) + coef_o[:, None] * (own * q[:, None])
        d = tl.where(ok[:, None], d, 0.0)
        tl.store(dh_ptr + rows[:, None] * stride_db + cols[None, :] * stride_dn, d.to(dh_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cm[None, :])


@triton.jit
def _mutual_linear_fwd_kernel(x_ptr, w_ptr, bias_ptr, a2_ptr, w2_ptr, s_ptr, out_ptr, attn_ptr,
                              M, B, N, K, K2, inv_t_hi, inv_t_lo,
                              stride_xb, stride_xk, stride_wm, stride_wk, stride_wn, stride_bm, stride_bn,
                              stride_a2b, stride_a2k, stride_w2m, stride_w2k, stride_w2n,
                              stride_ob, stride_on, stride_ab, stride_am,
                              HAS_BIAS: tl.constexpr, HAS_AUX: tl.constexpr, ACT: tl.constexpr,
                              SIM: tl.constexpr, PREC: tl.constexpr, MP: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """For a block of rows: h_m = act(x W_m + aux Wa_m + bias_m) for every m into a [MP, BB, BN] register tile,
    then the mutual mix; only out [BB, N] and attn [BB, M] reach memory."""
    pid = tl.program_id(0)
    inv_t = inv_t_hi + inv_t_lo                                              # float32 kernel: == inv_t_hi
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    mi = tl.arange(0, MP)
    s = tl.load(s_ptr + rows, mask=rmask, other=0)
    ok = (s >= 0) & (s < M)              # an unchecked out-of-range scenario: a zero row (out, attn, grad)
    own_mask = mi[:, None] == s[None, :]
    valid_m = (mi[:, None] < M) & rmask[None, :]
    H, _ = _branch_tiles(x_ptr, w_ptr, bias_ptr, a2_ptr, w2_ptr, rows, rmask, cols, cmask, mi, s, M, K, K2,
                         stride_xb, stride_xk, stride_wm, stride_wk, stride_wn, stride_bm, stride_bn,
                         stride_a2b, stride_a2k, stride_w2m, stride_w2k, stride_w2n,
                         HAS_BIAS, HAS_AUX, ACT, PREC, MP, BLOCK_B, BLOCK_N, BLOCK_K)
    r = _row_scale(H, own_mask, SIM)
    dots, norms = _tile_stats(H, r, own_mask)
    a = _softmax_m(_similarity(dots, norms, r, own_mask, N, SIM), valid_m, inv_t)
    _store_attn(attn_ptr, tl.where(ok[None, :], a, 0.0), mi, rows, rmask, M, stride_ab, stride_am)
    out = tl.where(ok[:, None], tl.sum(a[:, :, None] * H, 0), 0.0)
    tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _mutual_linear_bwd_kernel(g_ptr, x_ptr, w_ptr, bias_ptr, a2_ptr, w2_ptr, s_ptr, attn_ptr, dz_ptr,
                              M, B, N, K, K2, inv_t_hi, inv_t_lo,
                              stride_gb, stride_gn, stride_xb, stride_xk, stride_wm, stride_wk, stride_wn,
                              stride_bm, stride_bn, stride_a2b, stride_a2k, stride_w2m, stride_w2k, stride_w2n,
                              stride_ab, stride_am, stride_db, stride_dn,
                              HAS_BIAS: tl.constexpr, HAS_AUX: tl.constexpr, ACT: tl.constexpr,
                              SIM: tl.constexpr, PREC: tl.constexpr, MP: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Recompute backward: h for all m in registers (as the forward), the mutual backward with attn from the
    forward, then dz_own = d own * act'(z[s_b, b]). Only dz_own [BB, N] reaches memory."""
    pid = tl.program_id(0)
    inv_t = inv_t_hi + inv_t_lo                                              # float32 kernel: == inv_t_hi
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    mi = tl.arange(0, MP)
    s = tl.load(s_ptr + rows, mask=rmask, other=0)
    ok = (s >= 0) & (s < M)              # an unchecked out-of-range scenario: a zero row (out, attn, grad)
    own_mask = mi[:, None] == s[None, :]
    valid_m = (mi[:, None] < M) & rmask[None, :]
    H, z_own = _branch_tiles(x_ptr, w_ptr, bias_ptr, a2_ptr, w2_ptr, rows, rmask, cols, cmask, mi, s, M, K, K2,
                             stride_xb, stride_xk, stride_wm, stride_wk, stride_wn, stride_bm, stride_bn,
                             stride_a2b, stride_a2k, stride_w2m, stride_w2k, stride_w2n,
                             HAS_BIAS, HAS_AUX, ACT, PREC, MP, BLOCK_B, BLOCK_N, BLOCK_K)
    omask = rmask[:, None] & cmask[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_gb + cols[None, :] * stride_gn, mask=omask, other=0.0).to(tl.float32)
    r = _row_scale(H, own_mask, SIM)
    dots, norms = _tile_stats(H, r, own_mask)
    a = _softmax_m(_similarity(dots, norms, r, own_mask, N, SIM), valid_m, inv_t)   # recomputed, as in _mutual_bwd
    a_s, coef_h, coef_o, q = _grad_coefs(dots, norms, r, tl.sum(H * g[None, :, :], 2), a, own_mask, N, inv_t, SIM)
    own = tl.sum(tl.where(own_mask[:, :, None], H, 0.0), 0)
    d = a_s[:, None] * g + tl.sum(coef_h[:, :, None] * H, 0) + coef_o[:, None] * (own * q[:, None])
    d = tl.where(ok[:, None], d * _activate_grad(z_own, ACT), 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_db + cols[None, :] * stride_dn, d.to(dz_ptr.dtype.element_ty), mask=omask)


# ------------------------------------------------------------------------------------------------ launchers

def _inv_temperature(temperature: float):
    """1/T as two float32 kernel arguments (hi, lo) with hi + lo = 1/T to ~48 bits.

    Triton passes a Python float to a kernel as float32: 1/0.7 would carry a 6e-8 relative error into every float64
    softmax (a device-only error: the interpreter keeps the Python float). The kernels add hi and lo in their
    accumulator dtype, so float64 gets 1/T to ~2^-48 and float32 gets hi (lo is below half an ulp of hi)."""
    inv = 1.0 / float(temperature)
    hi = torch.tensor(inv, dtype=torch.float32).item()         # round to nearest float32 (inf past its range)
    lo = torch.tensor(inv - hi, dtype=torch.float32).item() if math.isfinite(hi) else 0.0
    return hi, lo


def _mix_blocks(M: int, N: int):
    """(MP, BLOCK_B, BLOCK_N, num_warps) for the mutual kernels: the [MP, BB, BN] tile within _ELEMS."""
    MP = _pow2(max(M, 1))
    if _backend.triton_interpret():
        return MP, 4, 16, 1
    BN = min(_pow2(max(N, 16)), 256)
    while MP * BN > _ELEMS and BN > 32:
        BN //= 2
    BB = max(1, min(32, _ELEMS // (MP * BN)))
    return MP, BB, BN, 4


@on_tensor_device
def mutual_forward(h, scenario, temperature: float, similarity: int):
    """(out [B,N] h.dtype, attn [B,M] float32) of the mutual unit on h [M,B,N]; see the module docstring."""
    M, B, N = h.shape
    out = torch.empty((B, N), device=h.device, dtype=h.dtype)
    attn = torch.empty((B, M), device=h.device, dtype=torch.float32)
    if B == 0 or M == 0:
        return out, attn
    MP, BB, BN, nw = _mix_blocks(M, N)
    _mutual_fwd_kernel[(triton.cdiv(B, BB),)](
        h, scenario, out, attn, M, B, N, *_inv_temperature(temperature), h.stride(0), h.stride(1), h.stride(2),
        out.stride(0), out.stride(1), attn.stride(0), attn.stride(1),
        SIM=similarity, MP=MP, BLOCK_B=BB, BLOCK_N=BN, SINGLE=N <= BN, num_warps=nw)
    return out, attn


@on_tensor_device
def mutual_backward(grad_out, h, scenario, attn, temperature: float, similarity: int):
    """dh_own [B,N] (h.dtype): gradient w.r.t. own = h[s_b, b], the other branches held constant."""
    M, B, N = h.shape
    dh = torch.empty((B, N), device=h.device, dtype=h.dtype)
    if B == 0 or M == 0:
        return dh
    MP, BB, BN, nw = _mix_blocks(M, N)
    _mutual_bwd_kernel[(triton.cdiv(B, BB),)](
        grad_out, h, scenario, attn, dh, M, B, N, *_inv_temperature(temperature),
        grad_out.stride(0), grad_out.stride(1), h.stride(0), h.stride(1), h.stride(2),
        attn.stride(0), attn.stride(1), dh.stride(0), dh.stride(1),
        SIM=similarity, MP=MP, BLOCK_B=BB, BLOCK_N=BN, num_warps=nw)
    return dh


def fused_supported(M: int, N: int, dtype) -> bool:
    """Whether mutual_linear_forward runs the fused kernel (else all_forward + mutual_forward)."""
    BN = _pow2(max(N, 16))
    return N <= FUSED_MAX_N and _pow2(max(M, 1)) * BN <= FUSED_MAX_MN and dtype != torch.float64


# (BLOCK_K, num_warps, num_stages); BLOCK_B follows from the register budget (see _fused_blocks).
_FUSED_CONFIGS = [(32, 8, 2), (16, 8, 3), (32, 16, 2)]   # BLOCK_K 64 spilled for float32 (ptxas -v); 16 warps
# halve the per-thread share of the [MP, 16, BLOCK_N] register tile (255 registers and small spills at 8 warps)


def _fused_blocks(M: int, N: int):
    MP = _pow2(max(M, 1))
    BN = _pow2(max(N, 16))
    if _backend.triton_interpret():
        return MP, 16, BN
    BB = 16 if MP * BN > 256 else (32 if MP * BN > 128 else 64)
    return MP, BB, BN


def _cfg(c):
    return triton.Config({"BLOCK_K": c[0]}, num_warps=c[1], num_stages=c[2])


_fused_tuned = triton.autotune([_cfg(c) for c in _FUSED_CONFIGS], key=["M", "N", "K", "K2"])(
    _mutual_linear_fwd_kernel)
_fused_bwd_tuned = triton.autotune([_cfg(c) for c in _FUSED_CONFIGS], key=["M", "N", "K", "K2"])(
    _mutual_linear_bwd_kernel)


def _linear_args(x, weight, bias, aux, aux_weight, dummy):
    """Pointer/stride arguments shared by the fused kernels (x ... w2 pointers, then strides)."""
    ptrs = (x, weight, bias if bias is not None else dummy, aux if aux is not None else dummy,
            aux_weight if aux is not None else dummy)
    strides = (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
               bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
               aux.stride(0) if aux is not None else 0, aux.stride(1) if aux is not None else 0,
               *((aux_weight.stride(0), aux_weight.stride(1), aux_weight.stride(2)) if aux is not None
                 else (0, 0, 0)))
    return ptrs, strides


# Under deterministic algorithms (no timing, see saml_kernels.triton.launch_config): the first config, the one
# without spills for every (M, N) the fused path takes (a choice, not a measured optimum).
FIXED_FUSED_CONFIG = _FUSED_CONFIGS[0]
_INTERP_FUSED = (16, 1, 1)


def _launch_fused(plain, tuned, grid, args, kw):
    launch(tuned, plain, grid, args, kw, interp=_cfg(_INTERP_FUSED), fixed=_cfg(FIXED_FUSED_CONFIG))


@on_tensor_device
def mutual_linear_forward(x, weight, bias, aux, aux_weight, scenario, activation: int, temperature: float,
                          similarity: int):
    """(out [B,N] x.dtype, attn [B,M] float32) = mutual_unit(act(x W_m + aux Wa_m + bias_m) for all m).

    Fused (h never in memory) when ``fused_supported(M, N)``; else the unfused pair (h materialised)."""
    M, K, N = weight.shape
    B = x.shape[0]
    if not fused_supported(M, N, x.dtype):
        h, _ = all_forward(x, weight, bias, aux, aux_weight, activation)
        return mutual_forward(h, scenario, temperature, similarity)
    out = torch.empty((B, N), device=x.device, dtype=x.dtype)
    attn = torch.empty((B, M), device=x.device, dtype=torch.float32)
    if B == 0 or M == 0:
        return out, attn
    MP, BB, BN = _fused_blocks(M, N)
    K2 = aux.shape[1] if aux is not None else 0
    ptrs, strides = _linear_args(x, weight, bias, aux, aux_weight, out)
    args = (*ptrs, scenario, out, attn, M, B, N, K, K2, *_inv_temperature(temperature), *strides,
            out.stride(0), out.stride(1), attn.stride(0), attn.stride(1))
    kw = dict(HAS_BIAS=bias is not None, HAS_AUX=aux is not None, ACT=activation, SIM=similarity,
              PREC=dot_input_precision(x.dtype), MP=MP, BLOCK_B=BB, BLOCK_N=BN)
    _launch_fused(_mutual_linear_fwd_kernel, _fused_tuned, (triton.cdiv(B, BB),), args, kw)
    return out, attn


@on_tensor_device
def mutual_linear_backward(grad_out, x, weight, bias, aux, aux_weight, scenario, attn, activation: int,
                           temperature: float, similarity: int):
    """dz_own [B,N] (x.dtype) = dL/dz[s_b, b] of mutual_linear, recomputing h (never stored) from x.

    Fused: one kernel recomputes the row block's M branch tiles in registers (one extra GEMM of the forward's
    size), runs the mutual backward with the forward's attn and multiplies by act'(z_own). Outside the fused
    limits (``fused_supported``): all_forward (h, z in memory) + mutual_backward + act' in PyTorch."""
    M, K, N = weight.shape
    B = x.shape[0]
    if not fused_supported(M, N, x.dtype):
        h, z = all_forward(x, weight, bias, aux, aux_weight, activation)
        dh = mutual_backward(grad_out, h, scenario, attn, temperature, similarity)
        ar = torch.arange(B, device=x.device)
        # clamped: an out-of-range row's dh is zero (the unchecked-input contract), its saved row any in range
        saved = (z if needs_preactivation(activation) else h)[scenario.long().clamp(0, max(M - 1, 0)), ar]
        return activation_backward(dh, saved, activation).contiguous()
    dz = torch.empty((B, N), device=x.device, dtype=x.dtype)
    if B == 0 or M == 0:
        return dz.zero_()
    MP, BB, BN = _fused_blocks(M, N)
    K2 = aux.shape[1] if aux is not None else 0
    ptrs, strides = _linear_args(x, weight, bias, aux, aux_weight, dz)
    args = (grad_out, *ptrs, scenario, attn, dz, M, B, N, K, K2, *_inv_temperature(temperature),
            grad_out.stride(0), grad_out.stride(1), *strides, attn.stride(0), attn.stride(1),
            dz.stride(0), dz.stride(1))
    kw = dict(HAS_BIAS=bias is not None, HAS_AUX=aux is not None, ACT=activation, SIM=similarity,
              PREC=dot_input_precision(x.dtype), MP=MP, BLOCK_B=BB, BLOCK_N=BN)
    _launch_fused(_mutual_linear_bwd_kernel, _fused_bwd_tuned, (triton.cdiv(B, BB),), args, kw)
    return dz


# ------------------------------------------------------------------------------------------------ AOT specs

def aot_specs() -> list:
    """Each mutual kernel x block configuration x dtype (and each fused GEMM config) for AOT compilation.

    The block shapes of the mutual kernels follow from (M, N) (_mix_blocks): (4, 64) is the single-tile path,
    (8, 512) the two-pass path. Both similarity codes are compiled for float32, cosine for half types (the
    similarity changes a few scalar ops only). Kept small: these 3-D tile kernels take ~5-15 s each to compile."""
    specs = []
    dts = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    for dt, name in dts.items():
        p = "*" + name
        for sim in (tuple(SIMILARITIES.values()) if dt in (torch.float32, torch.float64) else (COSINE,)):
            for M, N in ((4, 64), (8, 512)):
                MP, BB, BN, nw = _mix_blocks(M, N)
                const = dict(SIM=sim, MP=MP, BLOCK_B=BB, BLOCK_N=BN, SINGLE=N <= BN)
                sig = kernel_signature(_mutual_fwd_kernel, p, s_ptr="*i64", attn_ptr="*fp32", inv_t_hi="fp32",
                                       inv_t_lo="fp32")
                specs.append(AotSpec(f"mutual_fwd[{name},sim{sim},M{M},N{N}]", _mutual_fwd_kernel, sig, const, nw))
                const = dict(SIM=sim, MP=MP, BLOCK_B=BB, BLOCK_N=BN)
                sig = kernel_signature(_mutual_bwd_kernel, p, s_ptr="*i64", attn_ptr="*fp32", inv_t_hi="fp32",
                                       inv_t_lo="fp32")
                specs.append(AotSpec(f"mutual_bwd[{name},sim{sim},M{M},N{N}]", _mutual_bwd_kernel, sig, const, nw))
        if dt == torch.float64:     # the fused kernels never run in float64 (fused_supported)
            continue
        # (shape, config, dot precision): float32 also with "tf32" (used when torch allows TF32 matmuls)
        shapes = [((4, 256), c, "ieee") for c in _FUSED_CONFIGS]
        if dt == torch.float32:
            shapes += [((4, 64), _FUSED_CONFIGS[0], "ieee")] + [((4, 256), c, "tf32") for c in _FUSED_CONFIGS]
        for (M, N), c, prec in shapes:
            MP, BB, BN = _fused_blocks(M, N)
            const = dict(HAS_BIAS=True, HAS_AUX=True, ACT=ACT_GELU, SIM=COSINE, PREC=prec, MP=MP, BLOCK_B=BB,
                         BLOCK_N=BN, BLOCK_K=c[0])
            scalars = dict(s_ptr="*i64", attn_ptr="*fp32", inv_t_hi="fp32", inv_t_lo="fp32")
            sig = kernel_signature(_mutual_linear_fwd_kernel, p, **scalars)
            specs.append(AotSpec(f"mutual_linear_fwd[{name},{prec},M{M},N{N},k{c[0]},w{c[1]}]",
                                 _mutual_linear_fwd_kernel, sig, const, c[1], c[2]))
            sig = kernel_signature(_mutual_linear_bwd_kernel, p, **scalars)
            specs.append(AotSpec(f"mutual_linear_bwd[{name},{prec},M{M},N{N},k{c[0]},w{c[1]}]",
                                 _mutual_linear_bwd_kernel, sig, const, c[1], c[2]))
    return specs


KERNELS = {"mutual_unit": {"forward": mutual_forward, "backward": mutual_backward},
           "mutual_linear": {"forward": mutual_linear_forward, "backward": mutual_linear_backward}}
