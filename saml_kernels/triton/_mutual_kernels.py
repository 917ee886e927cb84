"""Device code of the mutual unit and of the fused mutual_linear (Triton jit functions): the shared jit helpers
(softmax over the branches, the exact power-of-two row scale of the cosine, tile statistics, the similarity and
its gradient coefficients, the fused branch tiles and act') and the four kernels ``_mutual_fwd_kernel``,
``_mutual_bwd_kernel``, ``_mutual_linear_fwd_kernel``, ``_mutual_linear_bwd_kernel``.

The math, the overflow scaling, the precision and the tile layout are stated in ``saml_kernels/triton/
mutual_unit.py``'s module docstring; the launchers, block sizes, autotuning and AOT specs live there too (this
module launches nothing).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._codes import SIMILARITIES
from .mbranch_linear import _GELU, _LEAKY, _RELU, _SILU, _SLOPE, _activate, _mm_rows

_COSINE: tl.constexpr = tl.constexpr(SIMILARITIES["cosine"])  # the jit functions read only constexpr globals


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
