"""``saml_kernels::mutual_unit``: the SAML mutual unit on all-branch outputs, with autograd.

Kernel table (``saml_kernels._backend.kernels(OP, backend)``; signatures of ``torch.ops.saml_C.mutual_forward``
/ ``mutual_backward`` in csrc/registry.cpp): ``forward`` and ``backward``. Both accept h with any strides on
dims 0 and 1 as long as stride(2) == 1 (the all-route output of mbranch_linear is the [M, B, N] view of a
[B, M, N] buffer; no copy is made).

Math (h [M, B, N], s_b the scenario of sample b, own = h[s_b, b]):

    sim[m, b] = <own, h[m,b]> / (max(|own|, 1e-8) max(|h[m,b]|, 1e-8))   ("cosine")  or  <own, h[m,b]> / sqrt(N)  ("dot")
    a[b] = softmax_m(sim[:, b] / temperature),   out[b] = sum_m a[b, m] h[m, b]

Backward: h[m, b] for m != s_b is stop-gradient (docs/design.md section 1, item 6), so dh is zero except dh[s_b, b]:
with g = dL/dout[b], u_m = <g, h[m,b]>, e_m = a_m (u_m - <g, out[b]>),
    dh[s_b, b] = a_s g + (1/T) sum_m c_m e_m d sim_m / d own,   c_m = 1 + [m == s_b]
(own is both arguments of sim_s); for cosine d sim_m / d own = h_m / (n_own n_m) - [|own| > eps] sim_m own / n_own^2,
for dot h_m / sqrt(N).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .._codes import SIMILARITIES
from . import _checks, _eager

OP = "mutual_unit"
SIMILARITY = SIMILARITIES

_backend.define_op(OP, kernels=("forward", "backward"))
_backend.register_python_kernels(OP, "mutual_unit")
_backend.register_aten_kernels(OP, {"forward": "mutual_forward", "backward": "mutual_backward"})


def check_temperature(op: str, temperature) -> float:
    """temperature as a float; raises for a non-number, a non-finite value or a value <= 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a positive finite float, got {temperature!r}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{op}: temperature must be a positive finite float, got {temperature!r}")
    return t


def check_similarity(op: str, similarity) -> int:
    if not isinstance(similarity, str) or similarity not in SIMILARITY:
        raise ValueError(f"{op}: similarity must be one of {tuple(SIMILARITY)}, got {similarity!r}")
    return SIMILARITY[similarity]


def scatter_own(dh_own: Tensor, scenario: Tensor, like: Tensor) -> Tensor:
    """dh [M, B, N] (layout of ``like``), zero except dh[s_b, b] = dh_own[b]. An unchecked out-of-range s_b has a
    zero dh_own row (docs/design.md section 5): it is written to a clamped, in-range slot (still zero)."""
    dh = torch.zeros_like(like)
    B = dh_own.shape[0]
    dh[scenario.long().clamp(0, max(dh.shape[0] - 1, 0)), torch.arange(B, device=dh.device)] = dh_own.to(dh.dtype)
    return dh


# ------------------------------------------------------------------------------------------------ custom ops

@_eager.custom_op("saml_kernels::mutual_unit", mutates_args=())
def _forward_op(h: Tensor, scenario: Tensor, temperature: float, similarity: int, check: bool,
                backend: str) -> tuple[Tensor, Tensor]:
    """(out [B, N] h.dtype, attn [B, M] float32)."""
    if check:
        _checks.scenario_range(OP, scenario, h.shape[0])
    out, attn = _backend.kernels(OP, backend).forward(h, scenario, temperature, similarity)
    return out, attn


@_forward_op.register_fake
def _(h, scenario, temperature, similarity, check, backend):
    M, B, N = h.shape
    return h.new_empty(B, N), h.new_empty(B, M, dtype=torch.float32)


@_eager.custom_op("saml_kernels::mutual_unit_backward", mutates_args=())
def _backward_op(grad_out: Tensor, h: Tensor, scenario: Tensor, attn: Tensor, temperature: float, similarity: int,
                 backend: str) -> Tensor:
    """dh [M, B, N] in h's layout: zero except dh[s_b, b] (the other branches are stop-gradient)."""
    dh_own = _backend.kernels(OP, backend).backward(grad_out.contiguous(), h, scenario, attn, temperature, similarity)
    return scatter_own(dh_own, scenario, h)


@_backward_op.register_fake
def _(grad_out, h, scenario, attn, temperature, similarity, backend):
    return torch.empty_like(h)


def _setup_context(ctx, inputs, output):
    h, scenario, temperature, similarity, check, backend = inputs
    _, attn = output
    ctx.save_for_backward(h, scenario, attn)
    ctx.temperature, ctx.similarity, ctx.backend = temperature, similarity, backend
    ctx.mark_non_differentiable(attn)


def _backward(ctx, grad_out, _grad_attn):
    h, scenario, attn = ctx.saved_tensors
    dh = None
    if ctx.needs_input_grad[0]:
        dh = _backward_op(grad_out, h, scenario, attn, ctx.temperature, ctx.similarity, ctx.backend)
    return dh, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public API

def mutual_unit(h: Tensor, scenario: Tensor, *, temperature: float = 1.0, similarity: str = "cosine",
                return_attention: bool = False, backend: Optional[str] = None, check_scenario: bool = True):
    """SAML mutual unit: mixes every branch's output of a sample by its similarity to the sample's own branch.

    Args:
        h: [M, B, N] float32/float16/bfloat16/float64, the outputs of all M branches (e.g.
            ``mbranch_linear(..., route="all", grad_mask="own")``); any strides with contiguous rows are used
            as they are.
        scenario: [B] int32/int64 in [0, M); own = h[scenario[b], b].
        temperature: softmax temperature T > 0 (finite).
        similarity: "cosine" (<a,b> / (max(|a|,1e-8) max(|b|,1e-8))) | "dot" (<a,b> / sqrt(N)).
        return_attention: also return the attention a [B, M] (float32, not differentiable).
        backend: "reference" | "cpu" | "triton" | "cuda" | None (see saml_kernels.use_backend).
        check_scenario: raise IndexError for a scenario outside [0, M) (one reduction + one host sync).

    Returns:
        out [B, N] in h's dtype, out[b] = sum_m softmax_m(sim[m, b] / T) h[m, b] (float32 arithmetic);
        (out, attn) with ``return_attention``. Gradient only to h[s_b, b] (other branches stop-gradient).
    """
    _checks.tensor(OP, "h", h, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(OP, "scenario", scenario, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.same_device(OP, h=h, scenario=scenario)
    t = check_temperature(OP, temperature)
    sim = check_similarity(OP, similarity)
    M, B, N = h.shape
    if M < 1:
        raise ValueError(f"{OP}: h must hold at least one branch, got shape {tuple(h.shape)}")
    if scenario.shape[0] != B:
        raise ValueError(f"{OP}: scenario must have B = {B} entries (h is [M, B, N] = {list(h.shape)}), "
                         f"got {scenario.shape[0]}")
    be = _backend.resolve(OP, h.device.type, backend)
    if h.stride(2) != 1:
        h = h.contiguous()
    scenario, check = _checks.op_scenario(OP, scenario.contiguous(), h.shape[0], check_scenario)
    out, attn = _forward_op(h, scenario, t, sim, check, be)
    return (out, attn) if return_attention else out
