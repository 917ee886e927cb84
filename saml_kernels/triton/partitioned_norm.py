"""Triton kernels of the partitioned (scenario-wise) normalisation (contract: csrc/registry.cpp, pn_*).

x [B, N] contiguous, rows of any scenarios in any order, s_b in [0, M); acc = float32 (float64 for float64 x):

    pn_stats(x, s, M)                          -> (mean, biased var [M, N] acc, count [M] int64)
    pn_forward(x, s, mean, rstd, scale, shift) -> y = (x - mean[s]) rstd[s] scale[s] + shift[s]
    pn_backward(dy, x, s, mean, rstd, scale, count, batch_stats) -> (dx, dscale, dshift)
        dscale[m] = sum dy xhat, dshift[m] = sum dy over the rows of m (xhat = (x - mean[s]) rstd[s]);
        dx = scale rstd (dy - (dshift + xhat dscale) / n) with batch statistics, scale rstd dy without.

Segmented sums: a program owns ROWS rows x BLOCK_N columns and writes one partial [M, BLOCK_N] sum per
scenario (a masked row sum per m: the block is re-read M times from cache, fine for the few scenarios of a
multi-scenario model); the partials [blocks, parts, M, N] are then added in block order by torch (deterministic,
no atomics). The variance is a second pass over x with the mean known (exact, no E[x^2] - E[x]^2 cancellation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import AotSpec, on_tensor_device

__all__ = ["pn_stats", "pn_forward", "pn_backward", "aot_specs"]

BLOCK_B = 32
ROWS = 512  # rows per partial sum (a multiple of BLOCK_B)

# MODE of the partial-sum kernel
SUM_X, SUM_SQ_DEV, SUM_GRADS = 0, 1, 2
# MODE of the row-wise kernel
APPLY, DX_BATCH, DX_RUNNING = 0, 1, 2


@triton.jit
def _pn_partial_kernel(x_ptr, g_ptr, s_ptr, mean_ptr, rstd_ptr, part_ptr, B, N, M, ROWS_PER: tl.constexpr,
                       MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    blk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    parts = 2 if MODE == 2 else 1
    ACC = mean_ptr.dtype.element_ty
    for m in range(M):
        acc0 = tl.zeros([BLOCK_N], dtype=ACC)
        acc1 = tl.zeros([BLOCK_N], dtype=ACC)
        for r0 in range(0, ROWS_PER, BLOCK_B):
            rows = blk * ROWS_PER + r0 + tl.arange(0, BLOCK_B)
            rmask = rows < B
            s = tl.load(s_ptr + rows, mask=rmask, other=-1).to(tl.int64)
            sel = (s == m)[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            x = tl.load(x_ptr + offs, mask=sel, other=0.0).to(ACC)
            if MODE == 0:
                acc0 += tl.sum(x, axis=0)
            else:
                mu = tl.load(mean_ptr + m * N + cols, mask=cmask, other=0.0)
                d = tl.where(sel, x - mu[None, :], 0.0)
                if MODE == 1:
                    acc0 += tl.sum(d * d, axis=0)
                else:
                    rs = tl.load(rstd_ptr + m * N + cols, mask=cmask, other=0.0)
                    g = tl.load(g_ptr + offs, mask=sel, other=0.0).to(ACC)
                    acc0 += tl.sum(g * d * rs[None, :], axis=0)
                    acc1 += tl.sum(g, axis=0)
        base = (blk.to(tl.int64) * parts * M + m) * N
        tl.store(part_ptr + base + cols, acc0, mask=cmask)
        if MODE == 2:
            tl.store(part_ptr + base + M * N + cols, acc1, mask=cmask)


@triton.jit
def _pn_rows_kernel(x_ptr, g_ptr, s_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, ds_ptr, dh_ptr, invn_ptr,
                    out_ptr, B, N, MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < B
    mask = rmask[:, None] & (cols < N)[None, :]
    ACC = mean_ptr.dtype.element_ty
    s = tl.load(s_ptr + rows, mask=rmask, other=0).to(tl.int64)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    soffs = s[:, None] * N + cols[None, :]
    rs = tl.load(rstd_ptr + soffs, mask=mask, other=0.0)
    sc = tl.load(scale_ptr + soffs, mask=mask, other=0.0).to(ACC)
    if MODE == 2:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        out = sc * rs * g
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        xhat = (x - tl.load(mean_ptr + soffs, mask=mask, other=0.0)) * rs
        if MODE == 0:
            out = xhat * sc + tl.load(shift_ptr + soffs, mask=mask, other=0.0).to(ACC)
        else:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
            ds = tl.load(ds_ptr + soffs, mask=mask, other=0.0)
            dh = tl.load(dh_ptr + soffs, mask=mask, other=0.0)
            inv_n = tl.load(invn_ptr + s, mask=rmask, other=0.0)
            out = sc * rs * (g - (dh + xhat * ds) * inv_n[:, None])
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _block_n(N: int) -> int:
    return max(16, min(128, triton.next_power_of_2(max(N, 1))))


def _acc(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segmented_sums(mode: int, x, g, scenario, mean, rstd, M: int) -> torch.Tensor:
    """[parts, M, N] acc sums (parts = 2 for SUM_GRADS, else 1)."""
    B, N = x.shape
    parts = 2 if mode == SUM_GRADS else 1
    nblk = triton.cdiv(B, ROWS)
    part = torch.empty((max(nblk, 1), parts, M, N), device=x.device, dtype=mean.dtype)
    if nblk == 0 or N == 0:
        return part.zero_()[0]
    BN = _block_n(N)
    _pn_partial_kernel[(nblk, triton.cdiv(N, BN))](x, g, scenario, mean, rstd, part, B, N, M, ROWS_PER=ROWS,
                                                   MODE=mode, BLOCK_B=BLOCK_B, BLOCK_N=BN, num_warps=4)
    out = part[0].clone()
    for k in range(1, nblk):  # fixed order: deterministic
        out += part[k]
    return out


def _counts(scenario, M: int) -> torch.Tensor:
    c = torch.zeros(M, dtype=torch.int64, device=scenario.device)
    return c.index_add_(0, scenario.long(), torch.ones_like(scenario, dtype=torch.int64))


@on_tensor_device
def pn_stats(x, scenario, num_scenarios: int):
    """(mean, biased var [M, N] acc, count [M] int64) of the rows of each scenario; 0 where a scenario has none."""
    M = num_scenarios
    N = x.shape[1]
    count = _counts(scenario, M)
    n = count.clamp_min(1).to(_acc(x.dtype)).unsqueeze(1)
    zero = torch.zeros((M, N), device=x.device, dtype=_acc(x.dtype))
    mean = _segmented_sums(SUM_X, x, x, scenario, zero, zero, M)[0] / n
    var = _segmented_sums(SUM_SQ_DEV, x, x, scenario, mean, zero, M)[0] / n
    return mean, var, count


def _rows(mode: int, x, g, scenario, mean, rstd, scale, shift, ds, dh, inv_n, out):
    B, N = x.shape
    if B == 0 or N == 0:
        return out
    BN = _block_n(N)
    _pn_rows_kernel[(triton.cdiv(B, BLOCK_B), triton.cdiv(N, BN))](
        x, g, scenario, mean, rstd, scale, shift, ds, dh, inv_n, out, B, N, MODE=mode, BLOCK_B=BLOCK_B,
        BLOCK_N=BN, num_warps=4)
    return out


@on_tensor_device
def pn_forward(x, scenario, mean, rstd, scale, shift):
    """y [B, N] = (x - mean[s]) rstd[s] scale[s] + shift[s] in x's dtype."""
    return _rows(APPLY, x, x, scenario, mean, rstd, scale, shift, mean, mean, mean, torch.empty_like(x))


@on_tensor_device
def pn_backward(dy, x, scenario, mean, rstd, scale, count, batch_stats: bool):
    """(dx [B, N], dscale, dshift [M, N] in scale's dtype)."""
    M = scale.shape[0]
    sums = _segmented_sums(SUM_GRADS, x, dy, scenario, mean, rstd, M)
    ds, dh = sums[0].contiguous(), sums[1].contiguous()
    inv_n = 1.0 / count.clamp_min(1).to(mean.dtype)
    dx = _rows(DX_BATCH if batch_stats else DX_RUNNING, x, dy, scenario, mean, rstd, scale, scale, ds, dh, inv_n,
               torch.empty_like(x))
    return dx, ds.to(scale.dtype, copy=True), dh.to(scale.dtype, copy=True)  # distinct outputs


def aot_specs() -> list:
    """Every kernel x mode x dtype (int64 scenario ids; int32 changes one load only), BLOCK_N 64."""
    specs = []
    for dt in ("fp32", "fp16", "bf16", "fp64"):
        p, acc = "*" + dt, "*fp64" if dt == "fp64" else "*fp32"
        for mode in (SUM_X, SUM_SQ_DEV, SUM_GRADS):
            const = dict(ROWS_PER=ROWS, MODE=mode, BLOCK_B=BLOCK_B, BLOCK_N=64)
            sig = dict(x_ptr=p, g_ptr=p, s_ptr="*i64", mean_ptr=acc, rstd_ptr=acc, part_ptr=acc, B="i32", N="i32",
                       M="i32", **{k: "constexpr" for k in const})
            specs.append(AotSpec(f"pn_partial[{dt},mode{mode}]", _pn_partial_kernel, sig, const, 4))
        for mode in (APPLY, DX_BATCH, DX_RUNNING):
            const = dict(MODE=mode, BLOCK_B=BLOCK_B, BLOCK_N=64)
            sig = dict(x_ptr=p, g_ptr=p, s_ptr="*i64", mean_ptr=acc, rstd_ptr=acc, scale_ptr=p, shift_ptr=p,
                       ds_ptr=acc, dh_ptr=acc, invn_ptr=acc, out_ptr=p, B="i32", N="i32",
                       **{k: "constexpr" for k in const})
            specs.append(AotSpec(f"pn_rows[{dt},mode{mode}]", _pn_rows_kernel, sig, const, 4))
    return specs


KERNELS = {"partitioned_norm": {"stats": pn_stats, "forward": pn_forward, "backward": pn_backward}}
