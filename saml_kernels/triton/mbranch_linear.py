"""Triton kernels of the M-branch linear layer: grouped (own route) forward/backward and all-branch forward.

Kernel contracts (csrc/registry.cpp; shapes: x [B,K], weight [M,K,N], bias [M,N], aux [B,Ka], aux_weight
[M,Ka,N], scenario [B] int32/int64, activation codes of saml_kernels/_codes.py):

    grouped_forward:  z[b] = x[b] W[s_b] + aux[b] Wa[s_b] + bias[s_b];  y = act(z)           -> (y [B,N], z or [])
    all_forward:      z[m,b] = x[b] W[m] + aux[b] Wa[m] + bias[m]   (x [M,B,K]: x[m,b])    -> (y [M,B,N], z or [])
    grouped_backward: dW[m] = X_m^T dZ_m, db[m] = sum_b dZ_m, dWa[m] = Aux_m^T dZ_m,
                      dx[b] = dz[b] W[s_b]^T, daux[b] = dz[b] Wa[s_b]^T                     -> (dx, dW, db, daux, dWa)

z is returned only for gelu/silu (their backward needs the pre-activation).

Precision (the accumulator dtype ACC and the dot precision PREC are constexprs, one kernel for every dtype):
- ACC = float64 for float64 operands, float32 otherwise; every ``tl.dot`` passes ``out_dtype=acc.dtype``
  explicitly: triton <= 3.6 defaults ``out_dtype`` to float32 and rejects a float64 accumulator at compile time,
  triton 3.8 infers it from ``acc``. float64 dots lower to fp64
  DMMA / FMA (``mma.sync ... .f64`` in the PTX), never through float32.
- PREC = :func:`saml_kernels.triton.dot_input_precision`: "ieee" (exact fp32 products) for float32 unless torch
  allows TF32 for matmuls (``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision``), then
  "tf32", so results follow torch's own matmul policy; "ieee" for every other dtype.
- The epilogue stays in ACC: Python scalars take the tensor's dtype, ``tl.math.erf`` / ``tl.exp`` on float64 lower
  to libdevice's double functions (``__nv_erf``; its one cvt.rn.f32.f64 + ex2.approx is libdevice's own range
  step, 2 ulp accurate per the CUDA math documentation).

Grouped GEMM for unsorted rows, with no host synchronisation:
1. on the device, ``torch.sort(scenario, stable=True)`` gives the permutation ``perm`` (rows grouped by scenario,
   original order inside a scenario) and ``torch.searchsorted`` the segment offsets ``seg [M+1]``;
2. one launch over a fixed upper bound of row tiles, ``cdiv(B, BLOCK_M) + M`` (sum_m cdiv(c_m, BLOCK_M) never
   exceeds it); each program reads ``seg`` and finds its own (scenario, tile) by a prefix sum over the per-scenario
   tile counts (``tl.cumsum`` on M values), so the schedule is computed on the device and stays valid for every
   autotuned BLOCK_M. Programs past the last tile do no work;
3. the program gathers its rows through ``perm`` inside the kernel (x is never copied), runs the K loop over
   x W[s] and then a second K loop over aux Wa[s] into the same accumulator (the concat is never built), and
   applies bias and activation in the epilogue before scattering the rows back.
The weight gradient is deterministic: one program per (scenario, K tile, N tile) output tile loops over that
scenario's rows (gathered through ``perm``) and owns its tile; no atomics.

Block sizes: autotuned (timed once per key: N, K, K2 and the dtypes), with separate autotuners for the forward and
for dx / daux (W read transposed); under ``torch.use_deterministic_algorithms(True)`` nothing is timed and
:func:`fixed_mm_config` / :func:`fixed_wg_config` choose from the shapes (``saml_kernels.triton.launch_config``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _backend
from .._codes import ACTIVATIONS, LEAKY_RELU_SLOPE
from ..ops._activation import NEEDS_PREACTIVATION as _NEEDS_Z
from . import AotSpec, dot_input_precision, kernel_signature, launch, on_tensor_device

__all__ = ["grouped_forward", "all_forward", "grouped_backward", "aot_specs", "KERNELS"]

ACT_NONE, ACT_RELU, ACT_LEAKY, ACT_GELU, ACT_SILU = (ACTIVATIONS[n] for n in ("none", "relu", "leaky_relu", "gelu",
                                                                              "silu"))
# The same codes as constexprs for the jit functions (a jit function reads only constexpr globals).
_RELU: tl.constexpr = tl.constexpr(ACT_RELU)
_LEAKY: tl.constexpr = tl.constexpr(ACT_LEAKY)
_GELU: tl.constexpr = tl.constexpr(ACT_GELU)
_SILU: tl.constexpr = tl.constexpr(ACT_SILU)
_SLOPE: tl.constexpr = tl.constexpr(LEAKY_RELU_SLOPE)


# ------------------------------------------------------------------------------------------------ jit helpers

@triton.jit
def _activate(z, ACT: tl.constexpr):
    """act(z) elementwise, in the accumulator precision (float64 stays float64 throughout)."""
    if ACT == _RELU:
        z = tl.where(z < 0, 0.0, z)        # keeps NaN, as torch.relu (tl.maximum would return 0)
    elif ACT == _LEAKY:
        z = tl.where(z > 0, z, z * _SLOPE)  # a Python scalar takes z's dtype (a double for fp64)
    elif ACT == _GELU:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == _SILU:
        z = z / (1.0 + tl.exp(-z))
    return z


# The interpreter (numpy) has no bfloat16 matmul: its tl.dot on bf16 operands multiplies raw bit patterns. Under
# TRITON_INTERPRET only, bf16 tiles are upcast to fp32 before the dot (exact: bf16 products are exact in fp32).
# On a GPU this constexpr is False and the generated code is unchanged (bf16 tensor-core dots).
_INTERP_UPCAST_BF16 = tl.constexpr(_backend.triton_interpret())


@triton.jit
def _mm_rows(acc, a_ptr, rows, rmask, stride_ar, stride_ak, w_ptr, stride_wk, stride_wn, cols, cmask, K,
             BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """acc += A[rows, :K] @ W[:K, cols]; rows are arbitrary (gathered) int64 row ids, masked rows read 0.

    acc [BM, BN] is float32, or float64 for float64 operands (its dtype is passed as out_dtype, see the module
    docstring); PREC is the tl.dot input_precision chosen by the launcher."""
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        a = tl.load(a_ptr + rows[:, None] * stride_ar + kk[None, :] * stride_ak,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if _INTERP_UPCAST_BF16:
            if a.dtype == tl.bfloat16:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PREC, out_dtype=acc.dtype)
    return acc


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def _grouped_mm_kernel(a_ptr, w_ptr, bias_ptr, a2_ptr, w2_ptr, y_ptr, z_ptr, perm_ptr, seg_ptr,
                       M, N, K, K2,
                       stride_ar, stride_ak, stride_wm, stride_wk, stride_wn, stride_bm, stride_bn,
                       stride_a2r, stride_a2k, stride_w2m, stride_w2k, stride_w2n, stride_yr, stride_yn,
                       HAS_BIAS: tl.constexpr, HAS_AUX: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
                       MP: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[r] = act(A[r] W[s_r] + A2[r] W2[s_r] + bias[s_r]) for rows grouped by scenario (perm, seg).

    Program (pid_t, pid_n): pid_t indexes the device-computed list of per-scenario row tiles."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    # --- tile schedule from the segment offsets (M values; padded to MP lanes)
    sc = tl.arange(0, MP)
    smask = sc < M
    lo = tl.load(seg_ptr + sc, mask=smask, other=0)
    hi = tl.load(seg_ptr + sc + 1, mask=smask, other=0)
    cnt = hi - lo
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    sid = tl.sum((tile_end <= pid_t).to(tl.int32), 0)          # == M for programs past the last tile
    is_mine = sc == sid
    tile0 = tl.sum(tl.where(is_mine, tile_end - tiles, 0), 0)
    seg_lo = tl.sum(tl.where(is_mine, lo, 0), 0)
    seg_n = tl.sum(tl.where(is_mine, cnt, 0), 0)                # 0 past the last tile: everything masked
    sid = tl.minimum(sid, M - 1).to(tl.int64)
    local = (pid_t - tile0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = local < seg_n
    rows = tl.load(perm_ptr + seg_lo + local, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    k_run = tl.where(seg_n > 0, K, 0)                           # idle programs skip the K loops
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32)
    acc = _mm_rows(acc, a_ptr, rows, rmask, stride_ar, stride_ak, w_ptr + sid * stride_wm, stride_wk, stride_wn,
                   cols, cmask, k_run, BLOCK_K, PREC)
    if HAS_AUX:
        k2_run = tl.where(seg_n > 0, K2, 0)
        acc = _mm_rows(acc, a2_ptr, rows, rmask, stride_a2r, stride_a2k, w2_ptr + sid * stride_w2m, stride_w2k,
                       stride_w2n, cols, cmask, k2_run, BLOCK_K, PREC)
    if HAS_BIAS:
        b = tl.load(bias_ptr + sid * stride_bm + cols * stride_bn, mask=cmask, other=0.0)
        acc += b[None, :].to(acc.dtype)
    omask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * stride_yr + cols[None, :] * stride_yn
    if STORE_Z:
        tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=omask)
    tl.store(y_ptr + offs, _activate(acc, ACT).to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _all_mm_kernel(x_ptr, w_ptr, bias_ptr, a2_ptr, w2_ptr, y_ptr, z_ptr,
                   M, B, N, K, K2,
                   stride_xm, stride_xb, stride_xk, stride_wm, stride_wk, stride_wn, stride_bm, stride_bn,
                   stride_a2b, stride_a2k, stride_w2m, stride_w2k, stride_w2n, stride_ym, stride_yb, stride_yn,
                   HAS_BIAS: tl.constexpr, HAS_AUX: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, b] = act(x[(m,) b] W[m] + aux[b] Wa[m] + bias[m]) over the [B, M*N] output as one launch.

    Programs are ordered (row tile, branch, column tile) with the column index fastest, so the M*cdiv(N, BLOCK_N)
    programs that read one x row tile (shared x: stride_xm == 0) run back to back and hit it in L2."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_row = M * n_tiles
    pid_b = pid // per_row
    rest = pid % per_row
    m = (rest // n_tiles).to(tl.int64)
    pid_n = rest % n_tiles
    rows = (pid_b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < B
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32)
    acc = _mm_rows(acc, x_ptr + m * stride_xm, rows, rmask, stride_xb, stride_xk, w_ptr + m * stride_wm,
                   stride_wk, stride_wn, cols, cmask, K, BLOCK_K, PREC)
    if HAS_AUX:
        acc = _mm_rows(acc, a2_ptr, rows, rmask, stride_a2b, stride_a2k, w2_ptr + m * stride_w2m, stride_w2k,
                       stride_w2n, cols, cmask, K2, BLOCK_K, PREC)
    if HAS_BIAS:
        b = tl.load(bias_ptr + m * stride_bm + cols * stride_bn, mask=cmask, other=0.0)
        acc += b[None, :].to(acc.dtype)
    omask = rmask[:, None] & cmask[None, :]
    offs = m * stride_ym + rows[:, None] * stride_yb + cols[None, :] * stride_yn
    if STORE_Z:
        tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=omask)
    tl.store(y_ptr + offs, _activate(acc, ACT).to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _grouped_wgrad_kernel(a_ptr, g_ptr, dw_ptr, db_ptr, perm_ptr, seg_ptr,
                          K, N, stride_ar, stride_ak, stride_gr, stride_gn,
                          stride_dwm, stride_dwk, stride_dwn, stride_dbm, stride_dbn,
                          HAS_DB: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """dW[m, ktile, ntile] = sum over rows r of scenario m of A[r, ktile]^T G[r, ntile] (and db[m] = sum G[r]).

    One program owns one output tile and reduces the scenario's rows in a fixed order: deterministic."""
    m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = kk < K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    lo = tl.load(seg_ptr + m)
    hi = tl.load(seg_ptr + m + 1)
    acc_dt = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=acc_dt)
    dbacc = tl.zeros((BLOCK_N,), dtype=acc_dt)
    for r0 in range(lo, hi, BLOCK_R):
        idx = r0 + tl.arange(0, BLOCK_R)
        rmask = idx < hi
        rows = tl.load(perm_ptr + idx, mask=rmask, other=0).to(tl.int64)
        at = tl.load(a_ptr + rows[None, :] * stride_ar + kk[:, None] * stride_ak,
                     mask=kmask[:, None] & rmask[None, :], other=0.0)          # [BLOCK_K, BLOCK_R] = A^T tile
        g = tl.load(g_ptr + rows[:, None] * stride_gr + cols[None, :] * stride_gn,
                    mask=rmask[:, None] & cmask[None, :], other=0.0)          # [BLOCK_R, BLOCK_N]
        if _INTERP_UPCAST_BF16:
            if at.dtype == tl.bfloat16:
                at = at.to(tl.float32)
                g = g.to(tl.float32)
        acc = tl.dot(at, g, acc, input_precision=PREC, out_dtype=acc.dtype)
        if HAS_DB:
            dbacc += tl.sum(g.to(acc_dt), 0)
    tl.store(dw_ptr + m * stride_dwm + kk[:, None] * stride_dwk + cols[None, :] * stride_dwn,
             acc.to(dw_ptr.dtype.element_ty), mask=kmask[:, None] & cmask[None, :])
    if HAS_DB:
        tl.store(db_ptr + m * stride_dbm + cols * stride_dbn, dbacc.to(db_ptr.dtype.element_ty),
                 mask=cmask & (pid_k == 0))


# ------------------------------------------------------------------------------------------------ configs
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); small explicit lists, all within sm_80 shared memory for
# fp32 operands (128x32 + 32x128 fp32 x 3 stages = 96 KiB).
_MM_CONFIGS = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3)]
# (BLOCK_K, BLOCK_N, BLOCK_R, num_warps, num_stages) for the weight gradient.
_WG_CONFIGS = [(64, 64, 64, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3)]
# Under TRITON_INTERPRET (CPU, ~ms per program) one tiny configuration, no autotuning.
_INTERP_MM = (16, 16, 16, 1, 1)
_INTERP_WG = (16, 16, 16, 1, 1)


def _mm_cfg(c):
    return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1], "BLOCK_K": c[2]}, num_warps=c[3], num_stages=c[4])


def _wg_cfg(c):
    return triton.Config({"BLOCK_K": c[0], "BLOCK_N": c[1], "BLOCK_R": c[2]}, num_warps=c[3], num_stages=c[4])


def fixed_mm_config(N: int, K: int) -> tuple:
    """The grouped / all-branch GEMM config under deterministic algorithms (no timing): a function of the output
    width N and the reduction length K only, the shapes of the autotune key. 128-row tiles; 128 columns when the
    output is wider than 64, else 64 (a narrower tile wastes no lanes on padding). A choice from the autotuned
    list, not a measured optimum (no device run has timed it)."""
    return _MM_CONFIGS[0] if N > 64 else _MM_CONFIGS[1]


def fixed_wg_config(K: int, N: int) -> tuple:
    """The weight-gradient config under deterministic algorithms: 128-wide K / N tiles where the weight has at
    least 128 rows / columns, else 64, from the autotuned list (not a measured optimum)."""
    want = (128 if K >= 128 else 64, 128 if N >= 128 else 64)
    return next(c for c in _WG_CONFIGS if c[:2] == want)


# Separate autotuners (so separate caches) for the forward and for dx / daux: the dx GEMM of one layer can have
# the forward's key (N, K, K2, dtypes) of another while it reads W transposed (other strides, another best tile).
_grouped_mm_tuned = triton.autotune([_mm_cfg(c) for c in _MM_CONFIGS], key=["N", "K", "K2"])(_grouped_mm_kernel)
_grouped_dx_tuned = triton.autotune([_mm_cfg(c) for c in _MM_CONFIGS], key=["N", "K", "K2"])(_grouped_mm_kernel)
_all_mm_tuned = triton.autotune([_mm_cfg(c) for c in _MM_CONFIGS], key=["M", "N", "K", "K2"])(_all_mm_kernel)
_wgrad_tuned = triton.autotune([_wg_cfg(c) for c in _WG_CONFIGS], key=["K", "N"])(_grouped_wgrad_kernel)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def sort_by_scenario(scenario: torch.Tensor, num_scenarios: int):
    """(perm int64 [B], seg int64 [M+1]) on scenario's device without a host sync.

    perm lists the rows scenario by scenario (stable: original order inside a scenario); rows of scenario m are
    perm[seg[m]:seg[m+1]]."""
    sorted_s, perm = torch.sort(scenario, stable=True)
    bounds = torch.arange(num_scenarios + 1, device=scenario.device, dtype=sorted_s.dtype)
    seg = torch.searchsorted(sorted_s, bounds)
    return perm, seg


def _zsize(activation: int) -> bool:
    return activation in _NEEDS_Z


def _grouped_mm(a, w, bias, a2, w2, perm, seg, y, z, activation, w_k_dim=1, w_n_dim=2, tuned=_grouped_mm_tuned):
    """Launches _grouped_mm_kernel: y[r] = act(a[r] @ w[s_r] (+ a2[r] @ w2[s_r]) (+ bias[s_r])).

    ``w_k_dim``/``w_n_dim`` pick which weight dimension is reduced, so W^T is a stride swap (backward, which
    passes its own autotuner ``tuned``)."""
    M = w.shape[0]
    B, K = a.shape
    N = y.shape[1]
    K2 = a2.shape[1] if a2 is not None else 0
    dummy = y
    b_ = bias if bias is not None else dummy
    a2_ = a2 if a2 is not None else dummy
    w2_ = w2 if w2 is not None else dummy
    z_ = z if z is not None else dummy
    w2s = (w2.stride(0), w2.stride(w_k_dim), w2.stride(w_n_dim)) if w2 is not None else (0, 0, 0)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]) + M, triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    launch(tuned, _grouped_mm_kernel, grid,
           (a, w, b_, a2_, w2_, y, z_, perm, seg, M, N, K, K2,
            a.stride(0), a.stride(1), w.stride(0), w.stride(w_k_dim), w.stride(w_n_dim),
            bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
            a2.stride(0) if a2 is not None else 0, a2.stride(1) if a2 is not None else 0, *w2s,
            y.stride(0), y.stride(1)),
           dict(HAS_BIAS=bias is not None, HAS_AUX=a2 is not None, ACT=activation, STORE_Z=z is not None,
                MP=_pow2(max(M, 2)), PREC=dot_input_precision(a.dtype)),
           interp=_mm_cfg(_INTERP_MM), fixed=_mm_cfg(fixed_mm_config(N, K)))


# ------------------------------------------------------------------------------------------------ launchers

@on_tensor_device
def grouped_forward(x, weight, bias, aux, aux_weight, scenario, activation: int):
    """Own route: y[b] = act(x[b] W[s_b] + aux[b] Wa[s_b] + bias[s_b]) for rows in any order.

    x [B,K], weight [M,K,N], bias [M,N]?, aux [B,Ka]?, aux_weight [M,Ka,N]?, scenario [B] int32/int64.
    Returns (y [B,N], z [B,N] for gelu/silu else an empty tensor); both in x's dtype."""
    B = x.shape[0]
    M, _, N = weight.shape
    # zeros: the rows of an unchecked out-of-range scenario are in no segment and keep them (docs/design.md 5)
    y = torch.zeros((B, N), device=x.device, dtype=x.dtype)
    z = torch.zeros((B, N), device=x.device, dtype=x.dtype) if _zsize(activation) else None
    if B > 0 and N > 0:
        perm, seg = sort_by_scenario(scenario, M)
        _grouped_mm(x, weight, bias, aux, aux_weight, perm, seg, y, z, activation)
    return y, (z if z is not None else x.new_empty(0))


@on_tensor_device
def all_forward(x, weight, bias, aux, aux_weight, activation: int):
    """All route: y[m, b] = act(x[b] W[m] + aux[b] Wa[m] + bias[m]); x [B,K] shared or [M,B,K] per branch.

    One launch over the [B, M*N] output (branch-major programs inside each row tile). Returns
    (y [M,B,N], z [M,B,N] for gelu/silu else an empty tensor); with a shared x both are [M,B,N] views of
    [B,M,N] buffers (strides (N, M*N, 1)), as the contract asks."""
    M, K, N = weight.shape
    per_branch = x.dim() == 3
    B = x.shape[-2]
    # Shared x: y is the [M, B, N] view (strides (N, M*N, 1)) of a [B, M*N] buffer, the layout of one GEMM
    # against the packed [K, M*N] weights (the contract); per-branch x: contiguous [M, B, N].
    def out():
        if per_branch:
            return torch.empty((M, B, N), device=x.device, dtype=x.dtype)
        return torch.empty((B, M, N), device=x.device, dtype=x.dtype).permute(1, 0, 2)

    y = out()
    z = out() if _zsize(activation) else None
    if B > 0 and N > 0 and M > 0:
        K2 = aux.shape[1] if aux is not None else 0
        dummy = y
        xs = (x.stride(0), x.stride(1), x.stride(2)) if per_branch else (0, x.stride(0), x.stride(1))
        w2s = (aux_weight.stride(0), aux_weight.stride(1), aux_weight.stride(2)) if aux is not None else (0, 0, 0)
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]) * M * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        launch(_all_mm_tuned, _all_mm_kernel, grid,
               (x, weight, bias if bias is not None else dummy, aux if aux is not None else dummy,
                aux_weight if aux is not None else dummy, y, z if z is not None else dummy,
                M, B, N, K, K2, *xs, weight.stride(0), weight.stride(1), weight.stride(2),
                bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
                aux.stride(0) if aux is not None else 0, aux.stride(1) if aux is not None else 0, *w2s,
                y.stride(0), y.stride(1), y.stride(2)),
               dict(HAS_BIAS=bias is not None, HAS_AUX=aux is not None, ACT=activation, STORE_Z=z is not None,
                    PREC=dot_input_precision(x.dtype)),
               interp=_mm_cfg(_INTERP_MM), fixed=_mm_cfg(fixed_mm_config(N, K)))
    return y, (z if z is not None else x.new_empty(0))


def _wgrad(a, dz, perm, seg, dw, db):
    """dw[m] = A_m^T dZ_m (db[m] = column sums of dZ_m) for every m, deterministic."""
    M, K, N = dw.shape
    grid = lambda meta: (M, triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    launch(_wgrad_tuned, _grouped_wgrad_kernel, grid,
           (a, dz, dw, db if db is not None else dw, perm, seg, K, N,
            a.stride(0), a.stride(1), dz.stride(0), dz.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
            db.stride(0) if db is not None else 0, db.stride(1) if db is not None else 0),
           dict(HAS_DB=db is not None, PREC=dot_input_precision(a.dtype)),
           interp=_wg_cfg(_INTERP_WG), fixed=_wg_cfg(fixed_wg_config(K, N)))


@on_tensor_device
def grouped_backward(dz, x, weight, aux, aux_weight, scenario, need_dx: bool, need_dweight: bool,
                     need_dbias: bool, need_daux: bool, need_daux_weight: bool):
    """Backward of the own route given dz = dL/dz [B,N] (activation already differentiated by the caller).

    dx[b] = dz[b] W[s_b]^T, daux[b] = dz[b] Wa[s_b]^T (grouped GEMMs with the weight transposed by strides);
    dW[m] = X_m^T dZ_m, db[m] = sum_{b in m} dz[b], dWa[m] = Aux_m^T dZ_m (zero for an empty scenario).
    Returns (dx [B,K], dW [M,K,N], db [M,N], daux [B,Ka], dWa [M,Ka,N]); outputs not asked for are empty."""
    B, N = dz.shape
    M, K, _ = weight.shape
    empty = dz.new_empty(0)
    need_daux = need_daux and aux is not None                # no aux operand: nothing to differentiate
    need_daux_weight = need_daux_weight and aux is not None
    # dx / daux zeros: see grouped_forward (out-of-range rows are in no segment)
    dx = torch.zeros((B, K), device=dz.device, dtype=x.dtype) if need_dx else None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dweight else None
    db = torch.empty((M, N), device=dz.device, dtype=weight.dtype) if need_dbias else None
    daux = torch.zeros((B, aux.shape[1]), device=dz.device, dtype=aux.dtype) if need_daux else None
    dwa = torch.empty_like(aux_weight, memory_format=torch.contiguous_format) if need_daux_weight else None
    if B == 0 or N == 0:
        # No rows (or no outputs): parameter gradients are zero, row gradients are empty / zero-width.
        for t in (dw, db, dwa):
            if t is not None:
                t.zero_()
        if dx is not None:
            dx.zero_()
        if daux is not None:
            daux.zero_()
    else:
        perm, seg = sort_by_scenario(scenario, M)
        if dx is not None and K > 0:
            _grouped_mm(dz, weight, None, None, None, perm, seg, dx, None, ACT_NONE, w_k_dim=2, w_n_dim=1,
                        tuned=_grouped_dx_tuned)
        if daux is not None and aux.shape[1] > 0:
            _grouped_mm(dz, aux_weight, None, None, None, perm, seg, daux, None, ACT_NONE, w_k_dim=2, w_n_dim=1,
                        tuned=_grouped_dx_tuned)
        if dw is not None or db is not None:
            if dw is not None and K > 0:
                _wgrad(x, dz, perm, seg, dw, db)
            elif db is not None:
                db.copy_(_segment_sum(dz, perm, seg, M))
        if dwa is not None and aux.shape[1] > 0:
            _wgrad(aux, dz, perm, seg, dwa, None)
    # distinct empty tensors for the outputs not asked for (custom ops forbid aliased outputs)
    return tuple(t if t is not None else empty.new_empty(0) for t in (dx, dw, db, daux, dwa))


def _segment_sum(dz, perm, seg, M):
    """db[m] = sum of dz over scenario m's rows, when no dW kernel runs to fuse it into (rare path)."""
    acc = torch.float64 if dz.dtype == torch.float64 else torch.float32
    csum = torch.cat([dz.new_zeros((1, dz.shape[1]), dtype=acc), dz.index_select(0, perm).to(acc).cumsum(0)])
    return csum[seg[1:]] - csum[seg[:-1]]


# ------------------------------------------------------------------------------------------------ AOT specs

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def aot_specs() -> list:
    """Every kernel x autotune config x code-changing constexpr variant, for sm_80/sm_90 AOT compilation.

    float32 is compiled with both dot precisions ("ieee", "tf32": which one runs follows torch's matmul setting);
    float64 (fp64 accumulator, libdevice erf) with every config, as the autotuner may pick any of them."""
    specs = []
    for dt, dts in _DT.items():
        p = "*" + dts
        precs = ("ieee", "tf32") if dt == torch.float32 else ("ieee",)
        for prec in precs:
            for c in _MM_CONFIGS:
                blocks = {"BLOCK_M": c[0], "BLOCK_N": c[1], "BLOCK_K": c[2]}
                # the superset variant (bias, aux, gelu, z) for every config; the other activations on one
                variants = [(True, ACT_GELU, True)]
                if c == _MM_CONFIGS[0] and prec == "ieee":
                    variants += [(False, a, a in _NEEDS_Z) for a in (ACT_NONE, ACT_RELU, ACT_LEAKY, ACT_SILU)]
                for has_aux, act, store_z in variants:
                    tag = f"{dts},{prec},{c[0]}x{c[1]}x{c[2]},w{c[3]},aux{int(has_aux)},act{act}"
                    const = dict(HAS_BIAS=True, HAS_AUX=has_aux, ACT=act, STORE_Z=store_z, PREC=prec, **blocks)
                    sig = kernel_signature(_grouped_mm_kernel, p, perm_ptr="*i64", seg_ptr="*i64")
                    specs.append(AotSpec(f"mbl_grouped_mm[{tag}]", _grouped_mm_kernel, sig, {**const, "MP": 4},
                                         c[3], c[4]))
                    sig = kernel_signature(_all_mm_kernel, p)
                    specs.append(AotSpec(f"mbl_all_mm[{tag}]", _all_mm_kernel, sig, const, c[3], c[4]))
            for c in _WG_CONFIGS:
                for has_db in (True,):
                    const = dict(HAS_DB=has_db, PREC=prec, BLOCK_K=c[0], BLOCK_N=c[1], BLOCK_R=c[2])
                    sig = kernel_signature(_grouped_wgrad_kernel, p, perm_ptr="*i64", seg_ptr="*i64")
                    specs.append(AotSpec(f"mbl_wgrad[{dts},{prec},{c[0]}x{c[1]}x{c[2]},w{c[3]},db{int(has_db)}]",
                                         _grouped_wgrad_kernel, sig, const, c[3], c[4]))
    return specs


KERNELS = {"mbranch_linear": {"grouped_forward": grouped_forward, "all_forward": all_forward,
                              "grouped_backward": grouped_backward}}
