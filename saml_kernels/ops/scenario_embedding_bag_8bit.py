"""``saml_kernels::scenario_embedding_bag_8bit``: the scenario-aware embedding bag on 8-bit row-wise tables
(inference only: no autograd, no fused update).

Table layout (FBGEMM's fused 8-bit row-wise format, ``torch.ops.quantized.embedding_bag_byte_prepack``): every
row of a [R, D] float table becomes D + 8 bytes, ``[q_0 .. q_{D-1} | scale (float32) | bias (float32)]``, the two
floats little-endian and unaligned when D % 4 != 0, with

    bias = min_j x_j,  scale = (max_j x_j - min_j x_j) / 255,  q_j = round((x_j - bias) * 255 / (range + 1e-8))

computed in float32 (FBGEMM's ``FloatToFused8BitRowwiseQuantizedSBFloat``), and read back as

    v_j = scale * q_j + bias          so |v_j - x_j| <= scale / 2 (+ float32 rounding).

A scenario table [M, Rs, D] is M * Rs such rows, [M, Rs, D + 8].

The op computes exactly what ``scenario_embedding_bag`` computes on the dequantised tables (same bags, pooling
sum / mean / none, per-sample weights, bounds handling and input checks with the same messages), in float32:

    global_out[b, f]   = pool_{i in bag(f,b)} w_i * deq(Gq)[feature_rows[f] + id_i]                      [B, F, D]
    scenario_out[b, j] = pool_{i in bag(f_j,b)} w_i * deq(Sq)[scenario[b], feature_scenario_rows[f_j] + local(id_i)]

Kernels (``saml_kernels._backend.kernels(OP, backend).forward``, the ``seb_forward`` contract with packed tables:
``(global_out, scenario_out, bad_count int64 [1])``): ``cpu`` = the C++ operator ``saml_C::seb_forward_8bit``
(csrc/cpu/scenario_embedding_bag_8bit.cpp: the row ids built in one pass per block of samples and feature, the
rows gathered by FBGEMM's JIT 8-bit EmbeddingSpMDM straight into the [B, F, D] outputs; csrc/registry.cpp has the
contract); ``triton`` / ``cuda`` = ``saml_kernels/triton/scenario_embedding_bag_8bit.py``; ``reference`` =
``saml_kernels/reference/scenario_embedding_bag_8bit.py`` (dequantise the tables, then the float reference kernel).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .._codes import POOLING
from . import _checks, _eager
from . import scenario_embedding_bag as _seb

OP = "scenario_embedding_bag_8bit"
#: bytes a row carries beside its D codes: float32 scale, float32 bias
ROW_EXTRA = 8
#: table dtypes quantize_rows accepts (the upcast to float32 is exact for all three)
QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)

SUM, MEAN, NONE = POOLING["sum"], POOLING["mean"], POOLING["none"]


# ------------------------------------------------------------------------------------------------ layout

def quantize_rows(weight: Tensor, who: str = "quantize_rows") -> Tensor:
    """The fused 8-bit row-wise form of ``weight`` [..., D] (float32 / float16 / bfloat16): uint8 [..., D + 8] on
    ``weight``'s device (quantised on the CPU by FBGEMM's prepack; see the module docstring for the formula).
    Raises TypeError for another dtype and ValueError for a non-finite value (naming the row)."""
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dtype not in QUANTIZABLE:
        got = weight.dtype if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"{who}: 8-bit row-wise tables are made from float32 / float16 / bfloat16 tables, got "
                        f"{got} (a float64 table: convert it with .float() first)")
    if weight.dim() < 2 or weight.shape[-1] < 1:
        raise ValueError(f"{who}: a table must be [..., D] with D >= 1, got shape {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1, weight.shape[-1]).to("cpu", torch.float32).contiguous()
    finite = torch.isfinite(flat).all(1)
    if not bool(finite.all()):
        r = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{who}: row {r} of the table holds a non-finite value; an 8-bit row needs finite values")
    packed = torch.ops.quantized.embedding_bag_byte_prepack(flat) if flat.shape[0] else \
        torch.empty(0, flat.shape[1] + ROW_EXTRA, dtype=torch.uint8)
    return packed.reshape(*weight.shape[:-1], weight.shape[-1] + ROW_EXTRA).to(weight.device)


def scale_bias(packed: Tensor) -> tuple[Tensor, Tensor]:
    """(scale [...], bias [...]) float32 of packed rows [..., D + 8]."""
    tail = packed[..., -ROW_EXTRA:].contiguous().view(torch.float32)
    return tail[..., 0], tail[..., 1]


def dequantize_rows(packed: Tensor) -> Tensor:
    """float32 [..., D] of packed rows [..., D + 8]: v = scale * q + bias (two float32 roundings)."""
    scale, bias = scale_bias(packed)
    return packed[..., :-ROW_EXTRA].to(torch.float32) * scale.unsqueeze(-1) + bias.unsqueeze(-1)


# ------------------------------------------------------------------------------------------------ kernels

_backend.define_op(OP, kernels=("forward",))
# reference (saml_kernels/reference/scenario_embedding_bag_8bit.py) and triton (saml_kernels/triton/...)
_backend.register_python_kernels(OP, "scenario_embedding_bag_8bit")
_backend.register_aten_kernels(OP, {"forward": "seb_forward_8bit"}, backends=("cpu",))
# No CUDA C++ kernel: a backend="cuda" model gets the Triton kernel (an alias, as partitioned_norm's)
_backend.register_alias(OP, "cuda", "triton")


# ------------------------------------------------------------------------------------------------ custom op

@_eager.custom_op("saml_kernels::scenario_embedding_bag_8bit", mutates_args=())
def _forward_op(indices: Tensor, offsets: Tensor, scenario: Tensor, global_packed: Tensor, scenario_packed: Tensor,
                feature_rows: Tensor, feature_scenario_rows: Tensor, aware_slot: Tensor,
                per_sample_weights: Optional[Tensor], pooling: int, bag_len: int, num_aware: int,
                bounds_check: int, backend: str) -> tuple[Tensor, Tensor]:
    F = feature_rows.numel() - 1
    M = scenario_packed.shape[0]
    fwd = _backend.kernels(OP, backend).forward
    check = bounds_check != _seb.BOUNDS["off"]
    if check and backend == "cpu" and _checks.check_mode() != "capture_safe":
        # The float op's CPU check site: the C++ kernel validates offsets, scenario ids and ids in its own pass and
        # gathers nothing when offsets or scenario ids fail (bad = -1); its verdict is read at once (a CPU read is
        # free, in a deferred block too) and explained with the float op's messages.
        g, s, bad = fwd(indices, offsets, scenario, global_packed, scenario_packed, feature_rows,
                        feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len, True, num_aware)
        if int(bad):
            _seb._explain_kernel(bad, indices, offsets, scenario, M, feature_rows, pooling, bag_len, bounds_check)
        return g, s
    # Elsewhere (the Triton / reference kernels, capture-safe mode): the float op's checks and messages by tensor
    # reductions, on the device: one host read per call on a GPU (deferred inside a model's forward), immediate on
    # the CPU (a host read costs nothing there: outside capture-safe mode the flags are read at once, in a deferred
    # block too, so no safe stand-ins are built)
    now = indices.device.type == "cpu" and _checks.check_mode() != "capture_safe"
    block = _checks.deferred_checks() if indices.device.type != "cpu" else contextlib.nullcontext()
    with block:
        offsets_k, scenario_k = offsets, scenario
        if check and now:
            _check_now(indices, offsets, scenario, M, F, pooling, bag_len)
        elif check:
            offsets_k, scenario_k = _seb._check_values(indices, offsets, scenario, M, F, pooling, bag_len)
        g, s, bad = fwd(indices, offsets_k, scenario_k, global_packed, scenario_packed, feature_rows,
                        feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len, check, num_aware)
        if check and now:
            if int(bad):
                _seb._report_bad_ids(indices, offsets, feature_rows, bounds_check)
        elif check and not (bounds_check == _seb.BOUNDS["zero"] and _checks.check_mode() == "capture_safe"):
            _checks.check_value(bad.sum() > 0,
                                lambda: _seb._report_bad_ids(indices, offsets, feature_rows, bounds_check),
                                f"{_seb.OP}: id out of its feature's range")
    return g, s


def _check_now(indices, offsets, scenario, M, F, pooling, bag_len):
    """The float op's offsets and scenario checks with their messages, read at once (one flag read)."""
    nnz = indices.numel()
    diffs = offsets[1:] - offsets[:-1]
    flags = [offsets[0] != 0, offsets[-1] != nnz]
    if diffs.numel():
        flags.append((diffs < 0).any())
        if pooling == NONE:
            flags.append((diffs != bag_len).any())
    if scenario.numel():
        flags.append(((scenario < 0) | (scenario >= M)).any())
    if bool(torch.stack(flags).any()):
        _seb._explain_offsets(indices, offsets, F, pooling, bag_len)
        _checks._raise_scenario(_seb.OP, scenario, M)


@_forward_op.register_fake
def _(indices, offsets, scenario, global_packed, scenario_packed, feature_rows, feature_scenario_rows, aware_slot,
      per_sample_weights, pooling, bag_len, num_aware, bounds_check, backend):
    F = feature_rows.shape[0] - 1
    B = (offsets.shape[0] - 1) // F
    D = global_packed.shape[1] - ROW_EXTRA
    if pooling == NONE:
        gs, ss = (B, F, bag_len, D), (B, num_aware, bag_len, D)
    else:
        gs, ss = (B, F, D), (B, num_aware, D)
    return global_packed.new_empty(gs, dtype=torch.float32), global_packed.new_empty(ss, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ public API

def scenario_embedding_bag_8bit(indices: Tensor, offsets: Tensor, scenario: Tensor, global_packed: Tensor,
                                scenario_packed: Tensor, feature_rows, feature_scenario_rows, *, pooling: str = "sum",
                                per_sample_weights: Optional[Tensor] = None, bounds_check: str = "error",
                                backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """``scenario_embedding_bag`` on 8-bit row-wise tables (see the module docstring for the layout).

    Args:
        indices, offsets, scenario, feature_rows, feature_scenario_rows, pooling, bounds_check, backend: as
            ``saml_kernels.scenario_embedding_bag``.
        global_packed: [R, D + 8] uint8 (``quantize_rows`` of the [R, D] global table).
        scenario_packed: [M, Rs, D + 8] uint8.
        per_sample_weights: [nnz] float (any float dtype; used in float32), pooling "sum" only.

    Returns:
        (global_out [B, F, D], scenario_out [B, Fs, D]) float32 ([B, F, L, D], [B, Fs, L, D] for "none"):
        the float op on ``dequantize_rows`` of the tables, up to float32 rounding. No gradients.
    """
    return _forward_op(*prepare_args(indices, offsets, scenario, global_packed, scenario_packed, feature_rows,
                                     feature_scenario_rows, pooling=pooling, per_sample_weights=per_sample_weights,
                                     bounds_check=bounds_check, backend=backend))


def prepare_args(indices, offsets, scenario, global_packed, scenario_packed, feature_rows, feature_scenario_rows, *,
                 pooling="sum", per_sample_weights=None, bounds_check="error", backend=None) -> tuple:
    """Validates the public arguments (the float op's checks and messages, packed tables instead of float ones)
    and returns the argument tuple of ``torch.ops.saml_kernels.scenario_embedding_bag_8bit``."""
    op = _seb.OP
    _checks.tensor(op, "indices", indices, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.tensor(op, "offsets", offsets, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.tensor(op, "scenario", scenario, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.tensor(OP, "global_packed", global_packed, ndim=2, dtypes=(torch.uint8,))
    _checks.tensor(OP, "scenario_packed", scenario_packed, ndim=3, dtypes=(torch.uint8,))
    _checks.tensor(op, "per_sample_weights", per_sample_weights, ndim=1, dtypes=_checks.FLOAT_DTYPES, optional=True)
    _checks.same_device(op, indices=indices, offsets=offsets, scenario=scenario, global_packed=global_packed,
                        scenario_packed=scenario_packed, per_sample_weights=per_sample_weights)
    _checks.choice(op, "pooling", pooling, POOLING)
    _checks.choice(op, "bounds_check", bounds_check, _seb.BOUNDS)
    if offsets.dtype != indices.dtype:
        raise TypeError(f"{op}: offsets must have the dtype of indices ({indices.dtype}), got {offsets.dtype}")
    W = global_packed.shape[1]
    if W <= ROW_EXTRA:
        raise ValueError(f"{OP}: global_packed rows must hold D >= 1 codes + {ROW_EXTRA} bytes, got width {W}")
    if scenario_packed.shape[2] != W:
        raise ValueError(f"{OP}: scenario_packed row width {scenario_packed.shape[2]} differs from global_packed's {W}")
    if scenario_packed.shape[0] < 1:
        raise ValueError(f"{OP}: scenario_packed must hold at least one scenario table, got shape "
                         f"{tuple(scenario_packed.shape)}")
    fr, fsr, slot, num_aware = _seb.table_layout(feature_rows, feature_scenario_rows, global_packed.shape[0],
                                                 scenario_packed.shape[1], indices.device)
    F = fr.numel() - 1
    B = _seb.check_bag_layout(op, indices, offsets, scenario, per_sample_weights, pooling, F)
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.detach().to(torch.float32).contiguous()
    bag_len = 0
    if pooling == "none" and F * B:
        if indices.numel() % (F * B):
            raise ValueError(f"{op}: pooling='none' needs all F*B = {F * B} bags of one length, but nnz = "
                             f"{indices.numel()} is not a multiple")
        bag_len = indices.numel() // (F * B)
    be = _backend.resolve(OP, indices.device.type, backend)
    return (indices.contiguous(), offsets.contiguous(), scenario.contiguous(), global_packed.contiguous(),
            scenario_packed.contiguous(), fr, fsr, slot, per_sample_weights, POOLING[pooling], bag_len, num_aware,
            _seb.BOUNDS[bounds_check], be)
