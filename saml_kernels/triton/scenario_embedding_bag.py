"""Triton kernels of ``scenario_embedding_bag`` (same contract as ``torch.ops.saml_C.seb_forward`` /
``seb_backward_rows``; see csrc/registry.cpp and saml_kernels/reference/scenario_embedding_bag.py).

Forward, one kernel: a program owns a tile of BLOCK_B bags x BLOCK_D columns and walks the bags' ids in
lock-step (j = 0 .. max length in the tile), so BLOCK_B independent row gathers are in flight per step (memory
latency, not bandwidth, bounds an embedding gather). Per id i of bag (f, b) with weight w_i (1 without
per_sample_weights), local id r_i, valid_i = 0 <= r_i < rows(f):

    global_out[b, f]   += w_i * G[feature_rows[f] + r_i]                            (valid ids only)
    scenario_out[b, j] += w_i * S[scenario[b] * Rs + feature_scenario_rows[f] + local(r_i)]  (aware f, j = slot(f))

with local(r) = r, or hash(r) mod Rs_f when the feature has fewer scenario rows Rs_f than ids (hashed scenario
tables: ``_scenario_local``, the twin of saml_common.h's ``seb_scenario_local`` and ops/scenario_hash.py).

in float32 (float64 for float64 tables), divided by the bag length for "mean"; "none" stores each term at its
position. Row numbers are int64 before the multiply by D (tables over 2^31 elements). Invalid ids (and scenario
ids outside [0, M)) read nothing; with ``check`` the invalid ids are counted into ``bad_count`` (one atomic per
program that saw one).

Backward (deterministic, no float atomics):
1. ``_seb_bwd_keys_kernel`` writes two entries per id: key = global row (or R + flattened scenario row m*Rs+r;
   a sentinel for invalid / non-aware), the row of the incoming gradient it reads, and the scale
   (w_i / bag length); plus grad_psw_i = <dOut_g, G[row_i]> + <dOut_s, S[row_i]> (times 1/len for "mean").
2. ``torch.sort(stable=True)`` of the 2*nnz keys (stable: each row's terms are summed in id order, so the result
   is bitwise repeatable), ``unique_consecutive`` gives the segments.
3. ``_seb_segment_sum_kernel`` sums each segment's gradient rows in float32 and writes one row per unique key.
   When some row has more than PIECE entries (hot ids), segments are cut into pieces of <= PIECE entries,
   the pieces summed into float32 partials, and each segment sums its partials in order (still deterministic).
"""
from __future__ import annotations

import dataclasses
import weakref

import torch
import triton
import triton.language as tl

from .._codes import POOLING
from ..graphs import host_read
from . import AotSpec, kernel_signature, launch_device, torch_to_triton_ptr

SUM, MEAN, NONE = POOLING["sum"], POOLING["mean"], POOLING["none"]
# The same codes as constexprs for the jit functions (a jit function reads only constexpr globals).
_MEAN: tl.constexpr = tl.constexpr(MEAN)
_NONE: tl.constexpr = tl.constexpr(NONE)
# Sorts after every valid key (global rows < R, scenario rows < R + M * Rs).
SENTINEL: tl.constexpr = tl.constexpr(1 << 62)
# Longest run of entries one program sums in one pass; longer segments (hot rows) are split in two levels.
PIECE = 32


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration: BLOCK_B bags (or segments) x BLOCK_D columns per program."""

    block_b: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


# One config per column-block width; ~1-2K elements per program keeps 16-32 rows in flight per program and
# 8-16 elements per thread. Chosen by D (no run-time autotuning: reproducible and free under the interpreter).
CONFIGS = (
    Config(64, 16, 4),
    Config(32, 32, 4),
    Config(32, 64, 4),
    Config(16, 128, 4),
    Config(8, 256, 8),
)


def pick_config(D: int) -> Config:
    """The config whose BLOCK_D is the smallest power of two >= D (capped at 256; wider D uses several
    column blocks)."""
    bd = min(max(triton.next_power_of_2(max(D, 1)), 16), 256)
    return next(c for c in CONFIGS if c.block_d == bd)


# ------------------------------------------------------------------------------------------------ kernels

_M32: tl.constexpr = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _mul32(x, c: tl.constexpr):
    """(x * c) mod 2^32 for int64 x holding a uint32 value: 16-bit halves of c, so no int64 product overflows."""
    lo = (x * (c & 0xFFFF)) & _M32
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


@triton.jit
def _mix32(x):
    """murmur3's fmix32 on int64 values in [0, 2^32) (shifts of non-negative values are logical)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


@triton.jit
def _scenario_local(ids, fsize, ssize):
    """Scenario-local rows of int64 ids (valid: 0 <= id < fsize): the id when ssize == fsize, else
    mix(mix(lo32(id)) ^ hi32(id)) mod ssize (hashed scenario tables; ops/scenario_hash.py has the contract)."""
    h = _mix32(_mix32(ids & _M32) ^ ((ids >> 32) & _M32))
    return tl.where(ssize == fsize, ids, h % tl.maximum(ssize, 1))


@triton.jit
def _bag_tile(off_ptr, fr_ptr, B, nbags, BLOCK_B: tl.constexpr):
    """The prologue shared by the gathers (float forward, backward keys, 8-bit forward): this program's BLOCK_B
    bags (feature-major: bag = f * B + b) and their addressing, all int64. Returns (bags, bmask, f, b, start,
    length, fbase, fsize): bag ids, in-range mask, feature, sample, first id position, bag length, the feature's
    first global row and its number of rows (ids)."""
    bags = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = bags < nbags
    f = bags // B
    b = bags - f * B
    start = tl.load(off_ptr + bags, mask=bmask, other=0).to(tl.int64)
    length = tl.load(off_ptr + bags + 1, mask=bmask, other=0).to(tl.int64) - start
    fbase = tl.load(fr_ptr + f, mask=bmask, other=0)
    fsize = tl.load(fr_ptr + f + 1, mask=bmask, other=0) - fbase
    return bags, bmask, f, b, start, length, fbase, fsize


@triton.jit
def _scenario_tile(fsr_ptr, slot_ptr, scen_ptr, f, b, bmask, Rs, M):
    """The scenario half of the prologue: (aware, slot, srow0, ssize) of each bag: whether it reads a scenario
    table (aware feature and a scenario id in [0, M): a bad id, possible only unchecked, never reads another
    scenario's table), its output slot, the row of its scenario's feature range (scenario * Rs +
    feature_scenario_rows[f]) and the feature's scenario rows (fewer than fsize: hashed, ``_scenario_local``)."""
    sbase = tl.load(fsr_ptr + f, mask=bmask, other=0)
    ssize = tl.load(fsr_ptr + f + 1, mask=bmask, other=0) - sbase
    slot = tl.load(slot_ptr + f, mask=bmask, other=0)
    sc = tl.load(scen_ptr + b, mask=bmask, other=0).to(tl.int64)
    aware = (ssize > 0) & bmask & (sc >= 0) & (sc < M)
    return aware, slot, sc * Rs + sbase, ssize


@triton.jit
def _scenario_local_kernel(ids_ptr, out_ptr, n, rows, srows, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    ids = tl.load(ids_ptr + i, mask=m, other=0).to(tl.int64)
    tl.store(out_ptr + i, _scenario_local(ids, rows.to(tl.int64), srows.to(tl.int64)), mask=m)


def scenario_local_rows(ids: torch.Tensor, rows: int, scenario_rows: int) -> torch.Tensor:
    """The Triton twin of ``ops.scenario_hash.scenario_local`` on int32 / int64 ``ids`` (int64 out); for tests."""
    ids = ids.contiguous()
    out = torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
    if ids.numel():
        with _grid_device(ids):
            _scenario_local_kernel[(triton.cdiv(ids.numel(), 256),)](ids, out, ids.numel(), rows, scenario_rows,
                                                                     BLOCK=256)
    return out


@triton.jit
def _seb_fwd_kernel(idx_ptr, off_ptr, scen_ptr, gw_ptr, sw_ptr, fr_ptr, fsr_ptr, slot_ptr, psw_ptr,
                    gout_ptr, sout_ptr, bad_ptr,
                    B, F, Fs, D, Rs, M, L, nbags,
                    POOL: tl.constexpr, HAS_PSW: tl.constexpr, HAS_AWARE: tl.constexpr, CHECK: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    bags, bmask, f, b, start, length, fbase, fsize = _bag_tile(off_ptr, fr_ptr, B, nbags, BLOCK_B)
    if HAS_AWARE:
        aware, slot, srow0, ssize = _scenario_tile(fsr_ptr, slot_ptr, scen_ptr, f, b, bmask, Rs, M)
        acc_s = tl.zeros([BLOCK_B, BLOCK_D], ACC_DTYPE)
    acc_g = tl.zeros([BLOCK_B, BLOCK_D], ACC_DTYPE)
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
        gv = tl.load(gw_ptr + (fbase + ids)[:, None] * D + d[None, :], mask=ok[:, None] & dmask[None, :],
                     other=0.0).to(ACC_DTYPE)
        if HAS_PSW:
            w = tl.load(psw_ptr + pos, mask=ok, other=0.0).to(ACC_DTYPE)
            gv = gv * w[:, None]
        if HAS_AWARE:
            sok = ok & aware
            srow = srow0 + _scenario_local(ids, fsize, ssize)
            sv = tl.load(sw_ptr + srow[:, None] * D + d[None, :], mask=sok[:, None] & dmask[None, :],
                         other=0.0).to(ACC_DTYPE)
            if HAS_PSW:
                sv = sv * w[:, None]
        if POOL == _NONE:
            # Every (bag, j < L) position is written (zeros past a short bag), so the output has no holes.
            orow = (b * F + f) * L + j
            tl.store(gout_ptr + orow[:, None] * D + d[None, :], gv.to(gout_ptr.dtype.element_ty),
                     mask=bmask[:, None] & dmask[None, :])
            if HAS_AWARE:
                srow_o = (b * Fs + slot) * L + j
                tl.store(sout_ptr + srow_o[:, None] * D + d[None, :], sv.to(sout_ptr.dtype.element_ty),
                         mask=aware[:, None] & dmask[None, :])
        else:
            acc_g += gv
            if HAS_AWARE:
                acc_s += sv
    if POOL != 2:
        if POOL == _MEAN:
            inv = 1.0 / tl.maximum(length, 1).to(ACC_DTYPE)
            acc_g = acc_g * inv[:, None]
        orow = b * F + f
        tl.store(gout_ptr + orow[:, None] * D + d[None, :], acc_g.to(gout_ptr.dtype.element_ty),
                 mask=bmask[:, None] & dmask[None, :])
        if HAS_AWARE:
            if POOL == _MEAN:
                acc_s = acc_s * inv[:, None]
            srow_o = b * Fs + slot
            # Aware features of samples with a valid scenario; the others were zeroed by the caller.
            tl.store(sout_ptr + srow_o[:, None] * D + d[None, :], acc_s.to(sout_ptr.dtype.element_ty),
                     mask=aware[:, None] & dmask[None, :])
    if CHECK:
        total = tl.sum(nbad, axis=0)
        if (pid_d == 0) & (total > 0):
            tl.atomic_add(bad_ptr, total)


@triton.jit
def _seb_bwd_keys_kernel(idx_ptr, off_ptr, scen_ptr, fr_ptr, fsr_ptr, slot_ptr, psw_ptr,
                         gw_ptr, sw_ptr, gg_ptr, gs_ptr,
                         key_ptr, src_ptr, scale_ptr, gpsw_ptr,
                         B, F, Fs, D, Rs, M, L, R, nnz, nbags,
                         POOL: tl.constexpr, HAS_PSW: tl.constexpr, HAS_AWARE: tl.constexpr,
                         NEED_PSW: tl.constexpr, ACC_DTYPE: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    bags, bmask, f, b, start, length, fbase, fsize = _bag_tile(off_ptr, fr_ptr, B, nbags, BLOCK_B)
    aware, slot, srow0, ssize = _scenario_tile(fsr_ptr, slot_ptr, scen_ptr, f, b, bmask, Rs, M)
    inv = 1.0 / tl.maximum(length, 1).to(ACC_DTYPE)
    for j in range(0, tl.max(length, axis=0)):
        m = bmask & (j < length)
        pos = start + j
        ids = tl.load(idx_ptr + pos, mask=m, other=0).to(tl.int64)
        ok = m & (ids >= 0) & (ids < fsize)
        if POOL == _NONE:
            ok = ok & (j < L)  # "none" reads gradient row j of the bag: keep j < L even for unchecked offsets
        sok = ok & aware
        grow = fbase + ids
        srow = srow0 + _scenario_local(ids, fsize, ssize)  # the hashed row: colliding ids share one key
        if POOL == _NONE:
            gsrc = (b * F + f) * L + j
            ssrc = (b * Fs + slot) * L + j
        else:
            gsrc = b * F + f
            ssrc = b * Fs + slot
        tl.store(key_ptr + pos, tl.where(ok, grow, SENTINEL), mask=m)
        tl.store(key_ptr + nnz + pos, tl.where(sok, R + srow, SENTINEL), mask=m)
        tl.store(src_ptr + pos, gsrc, mask=m)
        tl.store(src_ptr + nnz + pos, ssrc, mask=m)
        scale = tl.full([BLOCK_B], 1.0, ACC_DTYPE)
        if HAS_PSW:
            scale = tl.load(psw_ptr + pos, mask=m, other=0.0).to(ACC_DTYPE)
        if POOL == _MEAN:
            scale = scale * inv
        tl.store(scale_ptr + pos, scale, mask=m)
        if NEED_PSW:
            # d out / d w_i = G[row_i] (times 1/len for mean): dot with the incoming gradient rows.
            dot = tl.zeros([BLOCK_B], ACC_DTYPE)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = d < D
                gv = tl.load(gw_ptr + grow[:, None] * D + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
                go = tl.load(gg_ptr + gsrc[:, None] * D + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
                acc = gv.to(ACC_DTYPE) * go.to(ACC_DTYPE)
                if HAS_AWARE:
                    sv = tl.load(sw_ptr + srow[:, None] * D + d[None, :], mask=sok[:, None] & dm[None, :],
                                 other=0.0)
                    so = tl.load(gs_ptr + ssrc[:, None] * D + d[None, :], mask=sok[:, None] & dm[None, :],
                                 other=0.0)
                    acc += sv.to(ACC_DTYPE) * so.to(ACC_DTYPE)
                dot += tl.sum(acc, axis=1)
            if POOL == _MEAN:
                dot = dot * inv
            tl.store(gpsw_ptr + pos, dot.to(gpsw_ptr.dtype.element_ty), mask=m)


@triton.jit
def _seb_segment_sum_kernel(perm_ptr, start_ptr, end_ptr, src_ptr, scale_ptr, gg_ptr, gs_ptr, out_ptr,
                            U, D, nnz,
                            DIRECT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_AWARE: tl.constexpr,
                            ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # Segment u = sorted entries start[u] .. end[u]. Entry k is e = perm[k]; e < nnz reads grad_global row
    # src[e], e >= nnz grad_scenario row src[e], times scale[e mod nnz]. DIRECT (second level of a split):
    # entry k is row k of gg (the first level's partial sums), unscaled.
    segs = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    smask = segs < U
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    s0 = tl.load(start_ptr + segs, mask=smask, other=0)
    n = tl.load(end_ptr + segs, mask=smask, other=0) - s0
    acc = tl.zeros([BLOCK_B, BLOCK_D], ACC_DTYPE)
    for j in range(0, tl.max(n, axis=0)):
        m = smask & (j < n)
        if DIRECT:
            g = tl.load(gg_ptr + (s0 + j)[:, None] * D + d[None, :], mask=m[:, None] & dmask[None, :],
                        other=0.0).to(ACC_DTYPE)
        else:
            e = tl.load(perm_ptr + s0 + j, mask=m, other=0)
            row = tl.load(src_ptr + e, mask=m, other=0)
            is_s = e >= nnz
            g = tl.load(gg_ptr + row[:, None] * D + d[None, :], mask=(m & (e < nnz))[:, None] & dmask[None, :],
                        other=0.0).to(ACC_DTYPE)
            if HAS_AWARE:
                g += tl.load(gs_ptr + row[:, None] * D + d[None, :], mask=(m & is_s)[:, None] & dmask[None, :],
                             other=0.0).to(ACC_DTYPE)
            if HAS_SCALE:
                g = g * tl.load(scale_ptr + tl.where(is_s, e - nnz, e), mask=m, other=0.0)[:, None]
        acc += g
    tl.store(out_ptr + segs[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=smask[:, None] & dmask[None, :])


# ------------------------------------------------------------------------------------------------ launchers

_num_aware_cache: dict = {}  # id(aware_slot) -> (weakref, _version, Fs)
_dummies: dict = {}


def _num_aware(aware_slot: torch.Tensor) -> int:
    """Fs = number of aware features = max(aware_slot) + 1. The layout tensors are cached per layout by the op
    module, so this host read (a sync on CUDA) happens once per layout, not once per call."""
    hit = _num_aware_cache.get(id(aware_slot))
    if hit is not None and hit[0]() is aware_slot and hit[1] == aware_slot._version:
        return hit[2]
    fs = int(aware_slot.max()) + 1 if aware_slot.numel() else 0
    key = id(aware_slot)
    _num_aware_cache[key] = (weakref.ref(aware_slot, lambda _r, k=key: _num_aware_cache.pop(k, None)),
                             aware_slot._version, fs)
    return fs


def _ptr(t, device, dtype=None):
    """``t`` itself, or (for an absent / empty operand the kernel never dereferences) a 1-element stand-in on
    ``device``, because a launcher must be handed a real pointer.

    ``device`` is required (the inputs' device): Triton refuses a CPU tensor in a GPU launch ("Pointer argument
    cannot be accessed from Triton (cpu tensor?)"), and under the interpreter every tensor is on the CPU, so a
    stand-in on the wrong device is invisible there (tests/test_triton_launch_devices.py guards it)."""
    if t is not None and t.numel() > 0:
        return t
    dev = torch.device(device)
    dtype = dtype if dtype is not None else (t.dtype if t is not None else torch.float32)
    key = (dev, dtype)
    if key not in _dummies:
        _dummies[key] = torch.zeros(1, dtype=dtype, device=dev)
    return _dummies[key]


def _contig(*ts):
    """The kernels index rows as row * D: every tensor must be contiguous (a no-op when it already is)."""
    return tuple(t.contiguous() if t is not None else None for t in ts)


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# Launch on the tensors' device (the helper every Triton launcher uses; matters with several GPUs).
_grid_device = launch_device


def forward(indices, offsets, scenario, global_weight, scenario_weight, feature_rows, feature_scenario_rows,
            aware_slot, per_sample_weights, pooling, bag_len, check, num_aware=-1):
    """``seb_forward`` contract: (global_out, scenario_out, bad_count int64 [1]).

    Shapes: indices [nnz], offsets [F*B+1] (same int dtype), scenario [B], global_weight [R, D],
    scenario_weight [M, Rs, D], feature_rows / feature_scenario_rows [F+1] int64, aware_slot [F] int64
    (slot of each aware feature, -1 otherwise), per_sample_weights [nnz] or None.
    Returns global_out [B, F, D] and scenario_out [B, Fs, D] ([B, F, L, D], [B, Fs, L, D] for pooling 2 = none)
    in the table dtype, and the number of invalid ids (0 unless ``check``).
    """
    (indices, offsets, scenario, global_weight, scenario_weight, feature_rows, feature_scenario_rows, aware_slot,
     per_sample_weights) = _contig(indices, offsets, scenario, global_weight, scenario_weight, feature_rows,
                                   feature_scenario_rows, aware_slot, per_sample_weights)
    F = feature_rows.numel() - 1
    nbags = offsets.numel() - 1
    B = nbags // F if F else 0
    D = global_weight.shape[1]
    M, Rs = scenario_weight.shape[0], scenario_weight.shape[1]
    Fs = int(num_aware) if num_aware >= 0 else _num_aware(aware_slot)  # given by the op: no host read
    L = int(bag_len)
    dev = indices.device
    gshape = (B, F, L, D) if pooling == NONE else (B, F, D)
    sshape = (B, Fs, L, D) if pooling == NONE else (B, Fs, D)
    gout = torch.empty(gshape, dtype=global_weight.dtype, device=dev)
    # Samples with a bad scenario id (possible only unchecked: the op validates scenario ids when it asks for
    # check) keep zeros in their scenario rows.
    sout = (torch.empty if check else torch.zeros)(sshape, dtype=scenario_weight.dtype, device=dev)
    bad = torch.zeros(1, dtype=torch.int64, device=dev)
    if nbags == 0 or D == 0:
        return gout.zero_(), sout, bad
    cfg = pick_config(D)
    grid = (triton.cdiv(nbags, cfg.block_b), triton.cdiv(D, cfg.block_d))
    with _grid_device(indices):
        _seb_fwd_kernel[grid](
            indices, offsets, scenario, _ptr(global_weight, dev), _ptr(scenario_weight, dev), feature_rows,
            feature_scenario_rows, aware_slot, _ptr(per_sample_weights, dev, global_weight.dtype),
            gout, _ptr(sout, dev), bad,
            B, F, Fs, D, Rs, M, L, nbags,
            POOL=int(pooling), HAS_PSW=per_sample_weights is not None, HAS_AWARE=Fs > 0, CHECK=bool(check),
            ACC_DTYPE=_acc_dtype(global_weight.dtype), BLOCK_B=cfg.block_b, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return gout, sout, bad


def sorted_segments(keys: torch.Tensor):
    """Stable sort of the entry keys and their segments: (unique keys [U], perm [n], seg [U+1]).

    perm lists entry numbers in key order (ties in entry order); segment u is perm[seg[u] : seg[u+1]]."""
    skeys, perm = torch.sort(keys, stable=True)
    uniq, counts = torch.unique_consecutive(skeys, return_counts=True)
    seg = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=keys.device)
    torch.cumsum(counts, 0, out=seg[1:])
    return uniq, perm, seg


def segment_sizes(uniq: torch.Tensor, seg: torch.Tensor, n_global: int, n_rows: int):
    """(ng, nall, longest) as Python ints, in ONE host read: the number of unique global rows (keys < n_global),
    of global + scenario rows (keys < n_rows; the rest is the sentinel) and the longest real segment."""
    host_read("the triton embedding backward reads its segment sizes on the host; use the cuda backend", uniq.device)
    counts = seg[1:] - seg[:-1]
    limit = torch.tensor([n_global, n_rows], dtype=torch.int64, device=uniq.device)
    longest = torch.where(uniq < limit[1], counts, 0).max().reshape(1) if uniq.numel() else limit[:1] * 0
    ng, nall, longest = torch.cat([torch.searchsorted(uniq, limit), longest]).tolist()
    return ng, nall, longest


def split_segments(seg: torch.Tensor, piece: int):
    """Cuts segments seg[u] .. seg[u+1] into pieces of at most ``piece`` entries, in order.

    Returns (pstart, pend) of every piece and (pfirst, pcum): segment u owns pieces pfirst[u] .. pcum[u]."""
    counts = seg[1:] - seg[:-1]
    npp = (counts + piece - 1) // piece
    pcum = torch.cumsum(npp, 0)
    pfirst = pcum - npp
    total = int(pcum[-1]) if pcum.numel() else 0
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=seg.device), npp, output_size=total)
    pstart = seg[owner] + (torch.arange(total, device=seg.device) - pfirst[owner]) * piece
    pend = torch.minimum(pstart + piece, seg[owner + 1])
    return pstart, pend, pfirst, pcum


def backward_rows(grad_global, grad_scenario, indices, offsets, scenario, global_weight, scenario_weight,
                  feature_rows, feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len,
                  need_psw_grad):
    """``seb_backward_rows`` contract: (global_rows [U] int64 sorted unique, global_vals [U, D],
    scenario_rows [Us] int64 (m * Rs + r) sorted unique, scenario_vals [Us, D], grad_psw [nnz] or empty).

    dG[row] = sum_{i: row_i = row} scale_i * dOut_g[bag_i (, j_i)], dS likewise over the ids of aware features
    of samples of scenario m; scale_i = w_i (/ bag length for mean). Deterministic (stable sort + segment sum).
    """
    (grad_global, grad_scenario, indices, offsets, scenario, global_weight, scenario_weight, feature_rows,
     feature_scenario_rows, aware_slot, per_sample_weights) = _contig(
        grad_global, grad_scenario, indices, offsets, scenario, global_weight, scenario_weight, feature_rows,
        feature_scenario_rows, aware_slot, per_sample_weights)
    F = feature_rows.numel() - 1
    nbags = offsets.numel() - 1
    B = nbags // F if F else 0
    D = global_weight.shape[1]
    R = global_weight.shape[0]
    M, Rs = scenario_weight.shape[0], scenario_weight.shape[1]
    Fs = grad_scenario.shape[1] if grad_scenario.dim() >= 2 else 0  # from the shape: no host read
    L = int(bag_len)
    nnz = indices.numel()
    dev = indices.device
    acc_t = torch.float64 if global_weight.dtype == torch.float64 else torch.float32
    need_psw = bool(need_psw_grad) and per_sample_weights is not None
    gpsw = torch.empty(nnz if need_psw else 0, dtype=(per_sample_weights.dtype if need_psw else global_weight.dtype),
                       device=dev)
    empty_rows = torch.empty(0, dtype=torch.int64, device=dev)
    if nnz == 0 or nbags == 0:
        return (empty_rows, global_weight.new_empty(0, D), empty_rows.clone(), scenario_weight.new_empty(0, D),
                gpsw)
    cfg = pick_config(D)
    # Pre-filled: an entry no bag covers (only with unchecked, malformed offsets) is dropped, never a bad row.
    keys = torch.full((2 * nnz,), SENTINEL.value, dtype=torch.int64, device=dev)
    src = torch.empty(2 * nnz, dtype=torch.int64, device=dev)
    scale = torch.empty(nnz, dtype=acc_t, device=dev)
    has_scale = per_sample_weights is not None or pooling == MEAN
    with _grid_device(indices):
        _seb_bwd_keys_kernel[(triton.cdiv(nbags, cfg.block_b),)](
            indices, offsets, scenario, feature_rows, feature_scenario_rows, aware_slot,
            _ptr(per_sample_weights, dev, global_weight.dtype), _ptr(global_weight, dev),
            _ptr(scenario_weight, dev), _ptr(grad_global, dev), _ptr(grad_scenario, dev, scenario_weight.dtype),
            keys, src, scale, _ptr(gpsw, dev, global_weight.dtype),
            B, F, Fs, D, Rs, M, L, R, nnz, nbags,
            POOL=int(pooling), HAS_PSW=per_sample_weights is not None, HAS_AWARE=Fs > 0, NEED_PSW=need_psw,
            ACC_DTYPE=_acc_dtype(global_weight.dtype), BLOCK_B=cfg.block_b, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        uniq, perm, seg = sorted_segments(keys)
        ng, nall, longest = segment_sizes(uniq, seg, R, R + M * Rs)
        vals = torch.empty(nall, D, dtype=global_weight.dtype, device=dev)
        if nall and D:
            acc_dt = _acc_dtype(global_weight.dtype)
            grid_d = triton.cdiv(D, cfg.block_d)
            kw = dict(HAS_SCALE=has_scale, HAS_AWARE=Fs > 0, ACC_DTYPE=acc_dt, BLOCK_B=cfg.block_b,
                      BLOCK_D=cfg.block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            gg_p, gs_p = _ptr(grad_global, dev), _ptr(grad_scenario, dev, scenario_weight.dtype)
            if longest <= PIECE:
                _seb_segment_sum_kernel[(triton.cdiv(nall, cfg.block_b), grid_d)](
                    perm, seg, seg[1:], src, scale, gg_p, gs_p, vals, nall, D, nnz, DIRECT=False, **kw)
            else:
                # Hot rows (Zipf ids): a program's time is its longest segment, so segments are cut into pieces
                # of <= PIECE entries, summed (level 1), then each segment sums its pieces in order (level 2).
                pstart, pend, pfirst, pcum = split_segments(seg[:nall + 1], PIECE)
                npieces = pstart.numel()
                part = torch.empty(npieces, D, dtype=scale.dtype, device=dev)
                _seb_segment_sum_kernel[(triton.cdiv(npieces, cfg.block_b), grid_d)](
                    perm, pstart, pend, src, scale, gg_p, gs_p, part, npieces, D, nnz, DIRECT=False, **kw)
                _seb_segment_sum_kernel[(triton.cdiv(nall, cfg.block_b), grid_d)](
                    perm, pfirst, pcum, src, scale, part, part, vals, nall, D, nnz, DIRECT=True, **kw)
    return (uniq[:ng], vals[:ng], uniq[ng:nall] - R, vals[ng:nall].to(scenario_weight.dtype), gpsw)


# ------------------------------------------------------------------------------------------------ AOT specs

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def aot_specs() -> list:
    """Every kernel of this module in every config (fp32 / int64, each pooling mode, all options on), plus
    each table dtype x index dtype on one config. Format: saml_kernels.triton.AotSpec."""
    specs = []
    p = torch_to_triton_ptr

    def fwd(cfg, pool, wdt, idt, psw, aware, check):
        sig = kernel_signature(_seb_fwd_kernel, p(wdt), idx_ptr=p(idt), off_ptr=p(idt), scen_ptr=p(idt), fr_ptr="*i64",
                               fsr_ptr="*i64", slot_ptr="*i64", bad_ptr="*i64")
        ce = dict(POOL=pool, HAS_PSW=psw, HAS_AWARE=aware, CHECK=check, ACC_DTYPE=_acc_dtype(wdt),
                  BLOCK_B=cfg.block_b, BLOCK_D=cfg.block_d)
        name = f"seb_fwd[pool{pool},{str(wdt)[6:]},{str(idt)[6:]},psw{int(psw)},aware{int(aware)},B{cfg.block_b}xD{cfg.block_d}]"
        return AotSpec(name, _seb_fwd_kernel, sig, ce, cfg.num_warps, cfg.num_stages)

    def keys(cfg, pool, wdt, idt, psw, need):
        sig = kernel_signature(_seb_bwd_keys_kernel, p(wdt), idx_ptr=p(idt), off_ptr=p(idt), scen_ptr=p(idt),
                               fr_ptr="*i64", fsr_ptr="*i64", slot_ptr="*i64", key_ptr="*i64", src_ptr="*i64",
                               scale_ptr=p(torch.float64 if wdt == torch.float64 else torch.float32))
        ce = dict(POOL=pool, HAS_PSW=psw, HAS_AWARE=True, NEED_PSW=need, ACC_DTYPE=_acc_dtype(wdt),
                  BLOCK_B=cfg.block_b, BLOCK_D=cfg.block_d)
        name = f"seb_bwd_keys[pool{pool},{str(wdt)[6:]},{str(idt)[6:]},psw{int(psw)},B{cfg.block_b}xD{cfg.block_d}]"
        return AotSpec(name, _seb_bwd_keys_kernel, sig, ce, cfg.num_warps, cfg.num_stages)

    def seg(cfg, wdt, has_scale, direct=False):
        acc = torch.float64 if wdt == torch.float64 else torch.float32
        gdt = acc if direct else wdt
        sig = kernel_signature(_seb_segment_sum_kernel, p(gdt), perm_ptr="*i64", start_ptr="*i64", end_ptr="*i64",
                               src_ptr="*i64", scale_ptr=p(acc), out_ptr=p(wdt))
        ce = dict(DIRECT=direct, HAS_SCALE=has_scale, HAS_AWARE=True, ACC_DTYPE=_acc_dtype(wdt),
                  BLOCK_B=cfg.block_b, BLOCK_D=cfg.block_d)
        name = (f"seb_segment_sum[{str(wdt)[6:]},scale{int(has_scale)},direct{int(direct)},"
                f"B{cfg.block_b}xD{cfg.block_d}]")
        return AotSpec(name, _seb_segment_sum_kernel, sig, ce, cfg.num_warps, cfg.num_stages)

    def aligned(spec):
        """The variant the JIT builds for 16-byte aligned tensors and D % 16 == 0 (vector loads/stores)."""
        div = tuple(n for n, t in spec.signature.items() if t.startswith("*")) + ("D",)
        return dataclasses.replace(spec, name=spec.name + "[aligned]", divisible_by_16=div)

    f32, i64 = torch.float32, torch.int64
    for cfg in CONFIGS:
        specs.append(aligned(fwd(cfg, SUM, f32, i64, False, True, True)))
        specs.append(aligned(seg(cfg, f32, False)))
        for pool in (SUM, MEAN, NONE):
            specs.append(fwd(cfg, pool, f32, i64, pool == SUM, True, True))
            specs.append(keys(cfg, pool, f32, i64, pool == SUM, pool == SUM))
        specs.append(fwd(cfg, SUM, f32, i64, False, False, False))
        specs.append(seg(cfg, f32, True))
        specs.append(seg(cfg, f32, False))
        specs.append(seg(cfg, f32, True, direct=True))
    cfg = CONFIGS[1]
    for wdt in _FLOATS[1:]:
        for idt in (torch.int32, torch.int64):
            specs.append(fwd(cfg, SUM, wdt, idt, True, True, True))
            specs.append(keys(cfg, SUM, wdt, idt, True, True))
        specs.append(seg(cfg, wdt, True))
        specs.append(seg(cfg, wdt, True, direct=True))
    specs.append(fwd(cfg, SUM, f32, torch.int32, True, True, True))
    return specs


KERNELS = {"scenario_embedding_bag": {"forward": forward, "backward_rows": backward_rows}}
