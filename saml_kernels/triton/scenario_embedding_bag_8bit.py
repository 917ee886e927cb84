"""Triton kernel of ``scenario_embedding_bag_8bit`` (the contract of ``ops/scenario_embedding_bag_8bit.py``'s
kernels: packed uint8 tables [R, D + 8] and [M, Rs, D + 8], float32 outputs, bad-id count).

Same schedule as the float forward (``scenario_embedding_bag.py``): a program owns BLOCK_B bags x BLOCK_D columns
and walks the bags' ids in lock-step. Per id i of bag (f, b), valid_i = 0 <= id_i < rows(f):

    row bytes  [q_0 .. q_{D-1} | scale f32 | bias f32]     (FBGEMM's fused 8-bit row-wise layout, W = D + 8)
    global_out[b, f]   += w_i * (scale_r * q_r + bias_r),  r = feature_rows[f] + id_i              (valid ids)
    scenario_out[b, j] += the same on row scenario[b] * Rs + feature_scenario_rows[f] + local(id_i)  (aware f)

(local: the id, or its hash mod Rs_f for a hashed feature; ``scenario_embedding_bag._scenario_local``)

in float32, / bag length for "mean", one row per position for "none". The scale and bias are assembled from
their four bytes each (little-endian, then a bitcast): with D % 4 != 0 they are not 4-byte aligned, and a GPU
float load from an unaligned address faults. Invalid ids, and samples with a scenario outside [0, M), read
nothing (zero vectors); with ``check`` the invalid ids are counted into ``bad_count``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._codes import POOLING
from . import AotSpec, kernel_signature, launch_device, torch_to_triton_ptr
from .scenario_embedding_bag import CONFIGS, _bag_tile, _scenario_local, _scenario_tile, pick_config

SUM, MEAN, NONE = POOLING["sum"], POOLING["mean"], POOLING["none"]
_MEAN: tl.constexpr = tl.constexpr(MEAN)
_NONE: tl.constexpr = tl.constexpr(NONE)
ROW_EXTRA = 8


@triton.jit
def _f32_at(q_ptr, byte, mask):
    """The little-endian float32 whose four bytes start at ``q_ptr + byte`` (any alignment); 0 where masked."""
    b0 = tl.load(q_ptr + byte, mask=mask, other=0).to(tl.uint32)
    b1 = tl.load(q_ptr + byte + 1, mask=mask, other=0).to(tl.uint32)
    b2 = tl.load(q_ptr + byte + 2, mask=mask, other=0).to(tl.uint32)
    b3 = tl.load(q_ptr + byte + 3, mask=mask, other=0).to(tl.uint32)
    return (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _row_values(q_ptr, row, d, ok, dmask, D, W):
    """[BLOCK_B, BLOCK_D] float32: scale * q + bias of ``row`` (int64 [BLOCK_B]) at columns ``d``; 0 where not ok."""
    base = row * W
    scale = _f32_at(q_ptr, base + D, ok)
    bias = _f32_at(q_ptr, base + D + 4, ok)
    m2 = ok[:, None] & dmask[None, :]
    q = tl.load(q_ptr + base[:, None] + d[None, :], mask=m2, other=0).to(tl.float32)
    return tl.where(m2, q * scale[:, None] + bias[:, None], 0.0)


@triton.jit
def _seb8_fwd_kernel(idx_ptr, off_ptr, scen_ptr, gq_ptr, sq_ptr, fr_ptr, fsr_ptr, slot_ptr, psw_ptr,
                     gout_ptr, sout_ptr, bad_ptr,
                     B, F, Fs, D, W, Rs, M, L, nbags,
                     POOL: tl.constexpr, HAS_PSW: tl.constexpr, HAS_AWARE: tl.constexpr, CHECK: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    # the float kernels' prologue (bag addressing, scenario rows): one definition for both
    bags, bmask, f, b, start, length, fbase, fsize = _bag_tile(off_ptr, fr_ptr, B, nbags, BLOCK_B)
    if HAS_AWARE:
        aware, slot, srow0, ssize = _scenario_tile(fsr_ptr, slot_ptr, scen_ptr, f, b, bmask, Rs, M)
        acc_s = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    acc_g = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    nbad = tl.zeros([BLOCK_B], tl.int64)
    if POOL == _NONE:
        nloop = L
    else:
        nloop = tl.max(length, axis=0)
    for j in range(0, nloop):
        m = bmask & (j < length)
        pos = start + j
        ids = tl.load(idx_ptr + pos, mask=m, other=0).to(tl.int64)
        ok = m & (ids >= 0) & (ids < fsize)
        if CHECK:
            nbad += (m & ((ids < 0) | (ids >= fsize))).to(tl.int64)
        gv = _row_values(gq_ptr, fbase + ids, d, ok, dmask, D, W)
        if HAS_PSW:
            w = tl.load(psw_ptr + pos, mask=ok, other=0.0).to(tl.float32)
            gv = gv * w[:, None]
        if HAS_AWARE:
            sv = _row_values(sq_ptr, srow0 + _scenario_local(ids, fsize, ssize), d, ok & aware, dmask, D, W)
            if HAS_PSW:
                sv = sv * w[:, None]
        if POOL == _NONE:
            orow = (b * F + f) * L + j
            tl.store(gout_ptr + orow[:, None] * D + d[None, :], gv, mask=bmask[:, None] & dmask[None, :])
            if HAS_AWARE:
                srow_o = (b * Fs + slot) * L + j
                tl.store(sout_ptr + srow_o[:, None] * D + d[None, :], sv, mask=aware[:, None] & dmask[None, :])
        else:
            acc_g += gv
            if HAS_AWARE:
                acc_s += sv
    if POOL != 2:
        if POOL == _MEAN:
            inv = 1.0 / tl.maximum(length, 1).to(tl.float32)
            acc_g = acc_g * inv[:, None]
        orow = b * F + f
        tl.store(gout_ptr + orow[:, None] * D + d[None, :], acc_g, mask=bmask[:, None] & dmask[None, :])
        if HAS_AWARE:
            if POOL == _MEAN:
                acc_s = acc_s * inv[:, None]
            srow_o = b * Fs + slot
            tl.store(sout_ptr + srow_o[:, None] * D + d[None, :], acc_s, mask=aware[:, None] & dmask[None, :])
    if CHECK:
        total = tl.sum(nbad, axis=0)
        if (pid_d == 0) & (total > 0):
            tl.atomic_add(bad_ptr, total)


def _stand_in(t, device, dtype):
    """``t``, or a 1-element zero tensor on ``device`` for an absent / empty operand the kernel never reads (a
    launch needs a real pointer on the launch device)."""
    return t if t is not None and t.numel() > 0 else torch.zeros(1, dtype=dtype, device=device)


def forward(indices, offsets, scenario, global_packed, scenario_packed, feature_rows, feature_scenario_rows,
            aware_slot, per_sample_weights, pooling, bag_len, check, num_aware=-1):
    """(global_out float32 [B, F, D], scenario_out float32 [B, Fs, D], bad_count int64 [1]); [B, F, L, D] /
    [B, Fs, L, D] for pooling "none". Packed tables [R, D + 8] / [M, Rs, D + 8] uint8, per_sample_weights
    float32 [nnz] or None, layout tensors int64 as for the float forward; ``num_aware`` = Fs (given by the op)."""
    ts = [t.contiguous() if t is not None else None for t in
          (indices, offsets, scenario, global_packed, scenario_packed, feature_rows, feature_scenario_rows,
           aware_slot, per_sample_weights)]
    (indices, offsets, scenario, global_packed, scenario_packed, feature_rows, feature_scenario_rows, aware_slot,
     psw) = ts
    dev = indices.device
    F = feature_rows.numel() - 1
    nbags = offsets.numel() - 1
    B = nbags // F if F else 0
    W = global_packed.shape[1]
    D = W - ROW_EXTRA
    M, Rs = scenario_packed.shape[0], scenario_packed.shape[1]
    Fs = int(num_aware) if num_aware >= 0 else int((aware_slot >= 0).sum())
    L = int(bag_len)
    gshape = (B, F, L, D) if pooling == NONE else (B, F, D)
    sshape = (B, Fs, L, D) if pooling == NONE else (B, Fs, D)
    gout = torch.empty(gshape, dtype=torch.float32, device=dev)
    sout = torch.zeros(sshape, dtype=torch.float32, device=dev)  # samples with a bad scenario id keep zeros
    bad = torch.zeros(1, dtype=torch.int64, device=dev)
    if nbags == 0 or D == 0:
        return gout.zero_(), sout, bad
    cfg = pick_config(D)
    grid = (triton.cdiv(nbags, cfg.block_b), triton.cdiv(D, cfg.block_d))
    with launch_device(indices):  # launch on the tensors' device, not the current one
        _seb8_fwd_kernel[grid](
            indices, offsets, scenario, _stand_in(global_packed, dev, torch.uint8),
            _stand_in(scenario_packed, dev, torch.uint8), feature_rows, feature_scenario_rows, aware_slot,
            _stand_in(psw, dev, torch.float32), gout, _stand_in(sout, dev, torch.float32), bad,
            B, F, Fs, D, W, Rs, M, L, nbags,
            POOL=int(pooling), HAS_PSW=psw is not None, HAS_AWARE=Fs > 0, CHECK=bool(check),
            BLOCK_B=cfg.block_b, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return gout, sout, bad


def aot_specs() -> list:
    """The forward in every block config (sum, int64 ids, psw, aware, check), each pooling mode and int32 ids on
    one config. Format: saml_kernels.triton.AotSpec."""
    p = torch_to_triton_ptr

    def fwd(cfg, pool, idt, psw, aware, check):
        sig = kernel_signature(_seb8_fwd_kernel, "*fp32", idx_ptr=p(idt), off_ptr=p(idt), scen_ptr=p(idt),
                               gq_ptr="*u8", sq_ptr="*u8", fr_ptr="*i64", fsr_ptr="*i64", slot_ptr="*i64",
                               bad_ptr="*i64")
        ce = dict(POOL=pool, HAS_PSW=psw, HAS_AWARE=aware, CHECK=check, BLOCK_B=cfg.block_b, BLOCK_D=cfg.block_d)
        name = (f"seb8_fwd[pool{pool},{str(idt)[6:]},psw{int(psw)},aware{int(aware)},check{int(check)},"
                f"B{cfg.block_b}xD{cfg.block_d}]")
        return AotSpec(name, _seb8_fwd_kernel, sig, ce, cfg.num_warps, cfg.num_stages)

    specs = [fwd(cfg, SUM, torch.int64, True, True, True) for cfg in CONFIGS]
    cfg = CONFIGS[1]
    specs += [fwd(cfg, MEAN, torch.int64, False, True, True), fwd(cfg, NONE, torch.int64, False, True, True),
              fwd(cfg, SUM, torch.int32, False, False, False)]
    return specs


KERNELS = {"scenario_embedding_bag_8bit": {"forward": forward}}
