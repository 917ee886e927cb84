"""``saml_kernels::scenario_embedding_bag``: fused global + scenario embedding-bag gather, with autograd.

Math (bag (f, b) = ``indices[offsets[f*B+b] : offsets[f*B+b+1]]``, feature-major, ids local to feature f):

    global_out[b, f]   = pool_{i in bag(f,b)} w_i * G[feature_rows[f] + id_i]
    scenario_out[b, j] = pool_{i in bag(f_j,b)} w_i * S[scenario[b], feature_scenario_rows[f_j] + local(id_i)]

where f_j is the j-th scenario-aware feature, pool is sum / mean (empty bag -> 0) / none (fixed length L),
w_i the per-sample weights (1 without them); local(id) = id, or hash(id) mod Rs_f for a feature given fewer
scenario rows Rs_f than ids (hashed scenario tables, ops/scenario_hash.py). Gradients: dG and dS by the transposed gather (rows of S[s] only
from samples of scenario s), dw_i = <grad_out[b, f], G[row_i]> (+ the scenario term for aware features).

Kernel table (``saml_kernels._backend.kernels(OP, backend)``; signatures of the C++ operators in
csrc/registry.cpp): ``forward`` (``seb_forward``) and ``backward_rows`` (``seb_backward_rows``) on every backend;
optional ``backward_dense`` (``seb_backward_dense``: dense gradients written in place, no host read) and
``backward_update`` (``seb_backward_update_``: the fused optimizer step, ops/embedding_optimizer.py), None where a
backend lacks them (the op then builds the dense gradients / applies the update from ``backward_rows``).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _backend
from .._codes import POOLING
from . import _checks, _eager
from .scenario_hash import MAX_HASHED_ROWS

OP = "scenario_embedding_bag"
BOUNDS = {"off": 0, "zero": 1, "error": 2}

_backend.define_op(OP, kernels=("forward", "backward_rows"), optional=("backward_dense", "backward_update"))
_backend.register_python_kernels(OP, "scenario_embedding_bag")
_backend.register_aten_kernels(OP, {"forward": "seb_forward", "backward_rows": "seb_backward_rows",
                                    "backward_dense": "seb_backward_dense", "backward_update": "seb_backward_update_"})
_warned_zero = False


# ------------------------------------------------------------------------------------------------ checks

def _explain_offsets(indices, offsets, num_features, pooling, bag_len):
    """Raises the detailed error for bad offsets (the slow path, after a flag said so)."""
    nnz = indices.numel()
    diffs = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0:
        raise ValueError(f"{OP}: offsets[0] must be 0, got {int(offsets[0])}")
    if int(offsets[-1]) != nnz:
        raise ValueError(f"{OP}: offsets[-1] must equal indices.numel() = {nnz}, got {int(offsets[-1])}")
    if diffs.numel() and bool((diffs < 0).any()):
        k = int((diffs < 0).nonzero()[0, 0])
        raise ValueError(f"{OP}: offsets must be non-decreasing, but offsets[{k + 1}] = {int(offsets[k + 1])} "
                         f"< offsets[{k}] = {int(offsets[k])}")
    if pooling == POOLING["none"] and diffs.numel() and bool((diffs != bag_len).any()):
        k = int((diffs != bag_len).nonzero()[0, 0])
        B = diffs.numel() // num_features
        raise ValueError(f"{OP}: pooling='none' needs every bag of length {bag_len}, but bag (feature {k // B}, "
                         f"sample {k % B}) has length {int(diffs[k])}")


def _check_values(indices, offsets, scenario, num_scenarios, num_features, pooling, bag_len):
    """Runtime value checks by tensor reductions: offsets monotone from 0 to nnz, fixed bag length for "none",
    scenario ids in range (unless checked already in this block, see ``_checks.op_scenario``).

    Returns (offsets, scenario) for the kernels: the inputs themselves once checked (eager mode), or safe
    stand-ins while the flags wait to be read (deferred / capture-safe modes, see ops/_checks.py): offsets
    from 0 to nnz, clamped and made non-decreasing (canonical ``arange * L`` for "none"), scenario ids clamped.
    Cost: a few reductions; the host sync follows the check mode. (The CPU kernel checks the same in its own
    pass: the op uses that one there, see ``_forward_op``.)"""
    nnz = indices.numel()
    flags = [offsets[0] != 0, offsets[-1] != nnz]
    diffs = offsets[1:] - offsets[:-1]
    if diffs.numel():
        flags.append((diffs < 0).any())
        if pooling == POOLING["none"]:
            flags.append((diffs != bag_len).any())
    if _checks.check_mode() == "eager":  # one read of every flag; the inputs are known good after it
        if scenario.numel() and _checks.checked(scenario, "scenario", num_scenarios) is None:
            flags.append(((scenario < 0) | (scenario >= num_scenarios)).any())
        if bool(torch.stack(flags).any()):
            _explain_offsets(indices, offsets, num_features, pooling, bag_len)
            _checks.scenario_range(OP, scenario, num_scenarios)
        return offsets, scenario
    if _checks.check_value(torch.stack(flags).any(),
                           lambda given=offsets: _explain_offsets(indices, given, num_features, pooling, bag_len),
                           f"{OP}: bad offsets"):
        if pooling == POOLING["none"]:
            offsets = torch.arange(offsets.numel(), dtype=offsets.dtype, device=offsets.device) * bag_len
        else:
            if offsets.numel() == 1:  # no bags: nothing is read
                offsets = offsets.new_zeros(1)
            else:
                inner = torch.cummax(offsets[1:-1].clamp(0, nnz), 0).values
                offsets = torch.cat([offsets.new_zeros(1), inner, offsets.new_full((1,), nnz)])
    return offsets, _checks.scenario_range(OP, scenario, num_scenarios)


def _explain_kernel(bad, indices, offsets, scenario, num_scenarios, feature_rows, pooling, bag_len, bounds_check):
    """The CPU kernel's verdict ``bad`` (-1: offsets or scenario ids failed, > 0: that many invalid ids) as the
    op's error (or the "zero" mode's warning). Runs only when the verdict is not 0."""
    nbad = int(bad)
    if nbad < 0:
        _explain_offsets(indices, offsets, feature_rows.numel() - 1, pooling, bag_len)
        _checks._raise_scenario(OP, scenario, num_scenarios)
        raise AssertionError(f"{OP}: the CPU kernel rejected offsets/scenario that the Python checks accept")
    if nbad > 0:
        _report_bad_ids(indices, offsets, feature_rows, bounds_check)


def _report_bad_ids(indices, offsets, feature_rows, mode):
    """Names the first invalid id (error mode) or warns once (zero mode). Runs only when the kernel saw one."""
    global _warned_zero
    F = feature_rows.numel() - 1
    B = (offsets.numel() - 1) // F
    ids = indices.long()
    lengths = (offsets[1:] - offsets[:-1]).long()
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths, output_size=ids.numel())
    feat = bag // max(B, 1)
    sizes = (feature_rows[1:] - feature_rows[:-1]).to(ids.device)
    bad = ((ids < 0) | (ids >= sizes[feat])).nonzero()
    if bad.numel() == 0:
        return
    pos = int(bad[0, 0])
    f = int(feat[pos])
    rows = int(sizes[f])
    msg = (f"{OP}: indices[{pos}] = {int(indices[pos])} is out of range for feature {f} (sample {int(bag[pos]) % B}), "
           f"which has {rows} rows (valid ids 0..{rows - 1}); {bad.shape[0]} invalid id(s) in all")
    if mode == BOUNDS["error"]:
        raise IndexError(msg)
    if not _warned_zero:
        _warned_zero = True
        warnings.warn(msg + "; bounds_check='zero' maps them to zero vectors with no gradient (warned once)",
                      RuntimeWarning, stacklevel=4)


# ------------------------------------------------------------------------------------------------ custom ops

@_eager.custom_op("saml_kernels::scenario_embedding_bag", mutates_args=())
def _forward_op(indices: Tensor, offsets: Tensor, scenario: Tensor, global_weight: Tensor, scenario_weight: Tensor,
                feature_rows: Tensor, feature_scenario_rows: Tensor, aware_slot: Tensor,
                per_sample_weights: Optional[Tensor], pooling: int, bag_len: int, num_aware: int,
                bounds_check: int, sparse: bool, backend: str) -> tuple[Tensor, Tensor]:
    num_features = feature_rows.numel() - 1
    M = scenario_weight.shape[0]
    fwd = _backend.kernels(OP, backend).forward
    check = bounds_check != BOUNDS["off"]
    mode = _checks.check_mode()
    if check and backend == "cpu" and mode != "capture_safe":
        # The one check site on the CPU: the kernel validates offsets, scenario ids and ids in its own pass
        # (tensor reductions cost more than the gather on small batches) and gathers nothing when offsets or
        # scenario ids fail (bad = -1), so it needs no stand-ins. Its verdict is read at once in eager mode (a
        # CPU read is free) and with the block's other flags in a deferred block.
        g, s, bad = fwd(indices, offsets, scenario, global_weight, scenario_weight, feature_rows,
                        feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len, True, num_aware)
        explain = functools.partial(_explain_kernel, bad, indices, offsets, scenario, M, feature_rows, pooling,
                                    bag_len, bounds_check)
        if mode == "eager":
            if int(bad):
                explain()
        else:
            _checks.check_value(bad.reshape(()) != 0, explain, f"{OP}: bad offsets, scenario ids or ids")
        return g, s
    # Elsewhere (a GPU, the other backends, capture-safe mode): tensor reductions on the device, one host sync
    # per call in eager mode on a GPU (none inside a model's deferred block or in capture-safe mode), the kernels
    # on safe stand-ins meanwhile. In capture-safe mode the public entry (``prepare_args``) made the stand-ins
    # already (the backward must see them too), and they are trusted here.
    block = _checks.deferred_checks() if indices.device.type != "cpu" else contextlib.nullcontext()
    with block:
        offsets_k, scenario_k = offsets, scenario
        if check and _checks.checked(offsets, "offsets") is None:
            offsets_k, scenario_k = _check_values(indices, offsets, scenario, M, num_features, pooling, bag_len)
        g, s, bad = fwd(indices, offsets_k, scenario_k, global_weight, scenario_weight, feature_rows,
                        feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len, check, num_aware)
        if check and not (bounds_check == BOUNDS["zero"] and _checks.check_mode() == "capture_safe"):
            # ("zero" maps a bad id to a zero vector by contract, not an error: capture-safe mode, which cannot
            # warn without a sync, counts nothing for it and trains the valid rows, as the other modes do)
            _checks.check_value(bad.sum() > 0, lambda: _report_bad_ids(indices, offsets, feature_rows, bounds_check),
                                f"{OP}: id out of its feature's range")
    return g, s


def _out_shapes(offsets, global_weight, feature_rows, pooling, bag_len, num_aware):
    F = feature_rows.shape[0] - 1
    B = (offsets.shape[0] - 1) // F
    D = global_weight.shape[1]
    if pooling == POOLING["none"]:
        return (B, F, bag_len, D), (B, num_aware, bag_len, D)
    return (B, F, D), (B, num_aware, D)


@_forward_op.register_fake
def _(indices, offsets, scenario, global_weight, scenario_weight, feature_rows, feature_scenario_rows, aware_slot,
      per_sample_weights, pooling, bag_len, num_aware, bounds_check, sparse, backend):
    gs, ss = _out_shapes(offsets, global_weight, feature_rows, pooling, bag_len, num_aware)
    return global_weight.new_empty(gs), scenario_weight.new_empty(ss)


@_eager.custom_op("saml_kernels::scenario_embedding_bag_backward", mutates_args=())
def _backward_op(grad_global: Tensor, grad_scenario: Tensor, indices: Tensor, offsets: Tensor, scenario: Tensor,
                 global_weight: Tensor, scenario_weight: Tensor, feature_rows: Tensor, feature_scenario_rows: Tensor,
                 aware_slot: Tensor, per_sample_weights: Optional[Tensor], pooling: int, bag_len: int,
                 need_psw_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Dense gradients (dG [R, D], dS [M, Rs, D], dw [nnz] or empty) from the deduplicated rows."""
    k = _backend.kernels(OP, backend)
    if k.backward_dense is not None:  # written in place by the kernel, with no host read (CUDA-graph safe)
        return k.backward_dense(grad_global.contiguous(), grad_scenario.contiguous(), indices, offsets, scenario,
                                global_weight, scenario_weight, feature_rows, feature_scenario_rows, aware_slot,
                                per_sample_weights, pooling, bag_len, need_psw_grad)
    grows, gvals, srows, svals, gpsw = k.backward_rows(grad_global.contiguous(), grad_scenario.contiguous(), indices, offsets,
                                           scenario, global_weight, scenario_weight, feature_rows,
                                           feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len,
                                           need_psw_grad)
    dg = torch.zeros_like(global_weight, memory_format=torch.contiguous_format)
    dg.index_copy_(0, grows, gvals.to(dg.dtype))
    ds = torch.zeros_like(scenario_weight, memory_format=torch.contiguous_format)
    ds.view(-1, ds.shape[-1]).index_copy_(0, srows, svals.to(ds.dtype))
    return dg, ds, gpsw


@_backward_op.register_fake
def _(grad_global, grad_scenario, indices, offsets, scenario, global_weight, scenario_weight, feature_rows,
      feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len, need_psw_grad, backend):
    n = indices.shape[0] if (need_psw_grad and per_sample_weights is not None) else 0
    return (torch.empty_like(global_weight, memory_format=torch.contiguous_format),
            torch.empty_like(scenario_weight, memory_format=torch.contiguous_format),
            global_weight.new_empty(n))


def _sparse_grads(ctx, grad_global, grad_scenario, need_psw_grad):
    """torch sparse COO gradients (coalesced), as nn.Embedding(sparse=True) gives."""
    (indices, offsets, scenario, gw, sw, fr, fsr, slot, psw) = ctx.saved_tensors
    bwd = _backend.kernels(OP, ctx.backend).backward_rows
    grows, gvals, srows, svals, gpsw = bwd(grad_global.contiguous(), grad_scenario.contiguous(), indices, offsets,
                                           scenario, gw, sw, fr, fsr, slot, psw, ctx.pooling, ctx.bag_len,
                                           need_psw_grad)
    D = gw.shape[1]
    M, Rs = sw.shape[0], sw.shape[1]
    # The kernels' rows are unique, sorted and in range (the sparse invariants), so torch's check is skipped by
    # explicit choice (which also keeps torch's "invariant checks are implicitly disabled" warning away).
    coo = dict(is_coalesced=True, check_invariants=False)
    dg = torch.sparse_coo_tensor(grows.unsqueeze(0), gvals.to(gw.dtype), (gw.shape[0], D), **coo)
    s_idx = srows.new_empty(2, srows.numel())  # (m, r) of each row m * Rs + r, written in place (no stack copy)
    torch.div(srows, max(Rs, 1), rounding_mode="floor", out=s_idx[0])
    torch.sub(srows, s_idx[0], alpha=max(Rs, 1), out=s_idx[1])
    ds = torch.sparse_coo_tensor(s_idx, svals.to(sw.dtype), (M, Rs, D), **coo)
    return dg, ds, gpsw


def _setup_context(ctx, inputs, output):
    (indices, offsets, scenario, gw, sw, fr, fsr, slot, psw, pooling, bag_len, num_aware, bounds, sparse,
     backend) = inputs
    ctx.save_for_backward(indices, offsets, scenario, gw, sw, fr, fsr, slot, psw)
    ctx.pooling, ctx.bag_len, ctx.sparse, ctx.backend = pooling, bag_len, sparse, backend


def _backward(ctx, grad_global, grad_scenario):
    need_psw = ctx.needs_input_grad[8]
    if ctx.sparse:
        dg, ds, gpsw = _sparse_grads(ctx, grad_global, grad_scenario, need_psw)
    else:
        (indices, offsets, scenario, gw, sw, fr, fsr, slot, psw) = ctx.saved_tensors
        dg, ds, gpsw = _backward_op(grad_global, grad_scenario, indices, offsets, scenario, gw, sw, fr, fsr, slot,
                                    psw, ctx.pooling, ctx.bag_len, need_psw, ctx.backend)
    return (None, None, None, dg if ctx.needs_input_grad[3] else None, ds if ctx.needs_input_grad[4] else None,
            None, None, None, gpsw if need_psw else None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public API

@functools.lru_cache(maxsize=64)
def _layout_cached(fr: tuple, fsr: tuple, device: torch.device):
    F = len(fr) - 1
    slot, j = [], 0
    for f in range(F):
        if fsr[f + 1] > fsr[f]:
            slot.append(j)
            j += 1
        else:
            slot.append(-1)
    mk = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    return mk(list(fr)), mk(list(fsr)), mk(slot), j


def _as_tuple(name, rows) -> tuple:
    if isinstance(rows, torch.Tensor):
        if rows.dim() != 1 or rows.dtype not in _checks.INDEX_DTYPES:
            raise TypeError(f"{OP}: {name} must be a 1-D int32/int64 tensor or a sequence of ints, "
                            f"got {rows.dtype} of shape {tuple(rows.shape)}")
        return tuple(int(v) for v in rows.tolist())
    try:
        return tuple(int(v) for v in rows)
    except (TypeError, ValueError):
        raise TypeError(f"{OP}: {name} must be a 1-D int tensor or a sequence of ints, got {rows!r}") from None


def table_layout(feature_rows, feature_scenario_rows, num_rows: int, num_scenario_rows: int, device):
    """Validated (feature_rows, feature_scenario_rows, aware_slot) device tensors and the number of aware features.

    An aware feature f's scenario range has Rs_f rows with 1 <= Rs_f <= Rg_f (its global rows); Rs_f < Rg_f makes
    its scenario tables hashed: id -> ``feature_scenario_rows[f] + hash(id) mod Rs_f`` (ops/scenario_hash.py)."""
    key = None
    if type(feature_rows) is tuple and type(feature_scenario_rows) is tuple:  # a layer's: validated once
        key = (feature_rows, feature_scenario_rows, num_rows, num_scenario_rows)
        known = _VALID_LAYOUTS.get(key)
        if known is not None:
            return _layout_tensors(*known, device)
    fr = _as_tuple("feature_rows", feature_rows)
    fsr = _as_tuple("feature_scenario_rows", feature_scenario_rows)
    if len(fr) < 2:
        raise ValueError(f"{OP}: feature_rows must have F+1 >= 2 entries (at least one feature), got {len(fr)}")
    if len(fsr) != len(fr):
        raise ValueError(f"{OP}: feature_scenario_rows must have F+1 = {len(fr)} entries like feature_rows, got {len(fsr)}")
    for name, rows, limit in (("feature_rows", fr, num_rows), ("feature_scenario_rows", fsr, num_scenario_rows)):
        if rows[0] < 0:
            raise ValueError(f"{OP}: {name}[0] must be >= 0, got {rows[0]}")
        for f in range(len(rows) - 1):
            if rows[f + 1] < rows[f]:
                raise ValueError(f"{OP}: {name} must be non-decreasing, but {name}[{f + 1}] = {rows[f + 1]} < "
                                 f"{name}[{f}] = {rows[f]}")
        if rows[-1] > limit:
            raise ValueError(f"{OP}: {name}[-1] = {rows[-1]} exceeds the table's {limit} rows")
    for f in range(len(fr) - 1):
        gs, ss = fr[f + 1] - fr[f], fsr[f + 1] - fsr[f]
        if ss > gs or (ss and ss < gs and ss >= MAX_HASHED_ROWS):
            raise ValueError(f"{OP}: feature_scenario_rows gives feature {f} {ss} scenario rows but feature_rows "
                             f"gives it {gs} global rows; an aware feature's scenario range must have at most its "
                             f"global size (fewer: hashed rows, fewer than 2^32)")
    if key is not None:
        if len(_VALID_LAYOUTS) >= 256:
            _VALID_LAYOUTS.clear()
        _VALID_LAYOUTS[key] = (fr, fsr)  # equal keys (2 == 2.0 == True) convert to the same ints
    return _layout_tensors(fr, fsr, device)


# (feature_rows, feature_scenario_rows, num_rows, num_scenario_rows) tuples that passed table_layout's checks ->
# their int tuples: a layer calls with the same tuples every step, so they are validated once
_VALID_LAYOUTS: dict = {}


def _layout_tensors(fr: tuple, fsr: tuple, device):
    if torch.compiler.is_compiling() or (_get_current_dispatch_mode() is not None and _tracing_with_fake_tensors()):
        # a trace (torch.compile, torch.export) makes fake tensors here: never cache them for later eager calls
        return _layout_cached.__wrapped__(fr, fsr, _checks.device_key(device))
    return _layout_cached(fr, fsr, _checks.device_key(device))  # "cuda" = the current device, cached as such


def _tracing_with_fake_tensors() -> bool:
    try:
        from torch._guards import detect_fake_mode
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return detect_fake_mode() is not None


def scenario_embedding_bag(indices: Tensor, offsets: Tensor, scenario: Tensor, global_weight: Tensor,
                           scenario_weight: Tensor, feature_rows, feature_scenario_rows, *, pooling: str = "sum",
                           per_sample_weights: Optional[Tensor] = None, bounds_check: str = "error",
                           sparse: bool = False, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Scenario-aware embedding bag: one fused pass gathers the global and the scenario tables.

    Args:
        indices: [nnz] int32/int64 ids, local to their feature (0 <= id < rows of the feature).
        offsets: [F*B + 1], same dtype as indices; bag (f, b) = indices[offsets[f*B+b] : offsets[f*B+b+1]].
        scenario: [B] int32/int64 scenario id of each sample, in [0, M).
        global_weight: [R, D] float32/float16/bfloat16 (float64 for gradcheck).
        scenario_weight: [M, Rs, D], same dtype and D.
        feature_rows: F+1 cumulative global row starts (tensor or sequence of ints).
        feature_scenario_rows: F+1 cumulative scenario row starts; an empty range = feature not aware; a range
            shorter than the feature's global one hashes its ids onto it (ops/scenario_hash.py).
        pooling: "sum" | "mean" (empty bag -> zeros) | "none" (all bags length L).
        per_sample_weights: [nnz] weights, pooling "sum" only; receives a gradient.
        bounds_check: "error" (raise naming feature, position, value) | "zero" (invalid id -> zero vector, no
            gradient, warns once) | "off" (trust the input).
        sparse: gradients of the tables as torch sparse COO tensors (eager mode).
        backend: "reference" | "cpu" | "triton" | "cuda" | None (see saml_kernels.use_backend).

    Returns:
        (global_out [B, F, D], scenario_out [B, Fs, D]) in the table dtype ([B, F, L, D], [B, Fs, L, D] for
        pooling "none"), accumulated in float32.
    """
    return _forward_op(*prepare_args(indices, offsets, scenario, global_weight, scenario_weight, feature_rows,
                                     feature_scenario_rows, pooling=pooling, per_sample_weights=per_sample_weights,
                                     bounds_check=bounds_check, sparse=sparse, backend=backend))


def check_bag_layout(op: str, indices: Tensor, offsets: Tensor, scenario: Tensor, per_sample_weights, pooling: str,
                     num_features: int) -> int:
    """The bag layout's size checks shared by the float and 8-bit ops: offsets [F*B + 1] (F = ``num_features``),
    scenario [B], per_sample_weights [nnz] only with pooling "sum". Returns B; ValueError naming ``op`` otherwise."""
    F = num_features
    if offsets.numel() < 1 or (offsets.numel() - 1) % F:
        raise ValueError(f"{op}: offsets must have F*B + 1 entries with F = {F} features, got {offsets.numel()}")
    B = (offsets.numel() - 1) // F
    if scenario.numel() != B:
        raise ValueError(f"{op}: scenario must have B = {B} entries (offsets imply F = {F} features x B samples), "
                         f"got {scenario.numel()}")
    if per_sample_weights is not None:
        if pooling != "sum":
            raise ValueError(f"{op}: per_sample_weights need pooling='sum', got pooling={pooling!r}")
        if per_sample_weights.numel() != indices.numel():
            raise ValueError(f"{op}: per_sample_weights must have one weight per index ({indices.numel()}), "
                             f"got {per_sample_weights.numel()}")
    return B


def prepare_args(indices, offsets, scenario, global_weight, scenario_weight, feature_rows, feature_scenario_rows, *,
                 pooling="sum", per_sample_weights=None, bounds_check="error", sparse=False, backend=None) -> tuple:
    """Validates the public arguments and returns the argument tuple of ``torch.ops.saml_kernels.
    scenario_embedding_bag`` (also used by layers that call the custom op themselves, e.g. the fused optimizer)."""
    _checks.tensor(OP, "indices", indices, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.tensor(OP, "offsets", offsets, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.tensor(OP, "scenario", scenario, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.tensor(OP, "global_weight", global_weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(OP, "scenario_weight", scenario_weight, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(OP, "per_sample_weights", per_sample_weights, ndim=1, dtypes=_checks.FLOAT_DTYPES, optional=True)
    _checks.same_device(OP, indices=indices, offsets=offsets, scenario=scenario, global_weight=global_weight,
                        scenario_weight=scenario_weight, per_sample_weights=per_sample_weights)
    _checks.choice(OP, "pooling", pooling, POOLING)
    _checks.choice(OP, "bounds_check", bounds_check, BOUNDS)
    if offsets.dtype != indices.dtype:
        raise TypeError(f"{OP}: offsets must have the dtype of indices ({indices.dtype}), got {offsets.dtype}")
    if scenario_weight.dtype != global_weight.dtype:
        raise TypeError(f"{OP}: scenario_weight dtype {scenario_weight.dtype} differs from global_weight dtype "
                        f"{global_weight.dtype}")
    D = global_weight.shape[1]
    if scenario_weight.shape[2] != D:
        raise ValueError(f"{OP}: scenario_weight embedding dim {scenario_weight.shape[2]} differs from global_weight's {D}")
    if scenario_weight.shape[0] < 1:
        raise ValueError(f"{OP}: scenario_weight must hold at least one scenario table, got shape "
                         f"{tuple(scenario_weight.shape)}")
    if not isinstance(sparse, bool):
        raise TypeError(f"{OP}: sparse must be a bool, got {sparse!r}")
    fr, fsr, slot, num_aware = table_layout(feature_rows, feature_scenario_rows, global_weight.shape[0],
                                            scenario_weight.shape[1], indices.device)
    F = fr.numel() - 1
    B = check_bag_layout(OP, indices, offsets, scenario, per_sample_weights, pooling, F)
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.to(global_weight.dtype).contiguous()
    bag_len = 0
    if pooling == "none" and F * B:
        if indices.numel() % (F * B):
            raise ValueError(f"{OP}: pooling='none' needs all F*B = {F * B} bags of one length, but nnz = "
                             f"{indices.numel()} is not a multiple")
        bag_len = indices.numel() // (F * B)
    be = _backend.resolve(OP, indices.device.type, backend)
    if bounds_check != "off" and _checks.check_mode() == "capture_safe":
        # The check site of capture-safe mode: the backward runs on the saved inputs too, so they must be the
        # safe stand-ins (recorded as checked: the op trusts them and only counts bad ids).
        offsets, scenario = _check_values(indices, offsets, scenario, scenario_weight.shape[0], F, POOLING[pooling],
                                          bag_len)
        _checks.mark_checked(offsets, "offsets")
    return (indices.contiguous(), offsets.contiguous(), scenario.contiguous(), global_weight.contiguous(),
            scenario_weight.contiguous(), fr, fsr, slot, per_sample_weights, POOLING[pooling], bag_len, num_aware,
            BOUNDS[bounds_check], sparse, be)
