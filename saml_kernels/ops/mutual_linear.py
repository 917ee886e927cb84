"""``saml_kernels::mutual_linear``: fused ``mutual_unit(mbranch_linear(..., route="all", grad_mask="own"))``.

Math (W [M, K, N], Wa [M, Ka, N], bias [M, N], s_b the scenario of sample b):

    h[m, b] = act(x_b W_m + aux_b Wa_m + bias_m)          for every branch m        (never stored, see below)
    out[b]  = mutual_unit(h, s)[b] = sum_m softmax_m(sim(h[s_b, b], h[m, b]) / T) h[m, b]

Forward: the backend's ``mutual_linear_forward`` never writes h [M, B, N] to memory (CPU: blocks of at most 128
rows whose M branch outputs go to a per-thread scratch block, blocking in csrc/cpu/mutual_unit.cpp; GPU: tiles in
registers/shared memory).

Backward (other branches stop-gradient, so every gradient goes through the own branch):
    dh_own = mutual backward (needs h[m, b] for all m),  dz_own = dh_own * act'(z[s_b, b]),
    then mbranch_linear's grouped backward: dW_m = X_m^T dZ_m over scenario-m rows, db_m, dWa_m, dx_b = dz_b W_{s_b}^T.
Where h comes from in the backward (``save_branch_outputs``):
- False (default, memory-lean): ``mutual_linear_backward`` recomputes the all-branch GEMM block by block
  (one extra GEMM of the forward's size); nothing of size M x B x N is ever allocated.
- True: the forward runs ``mbl_all_forward`` (h goes to memory, [M, B, N]) + ``mutual_forward`` and keeps h
  (and z[s_b, b] for gelu/silu) for the backward: no recompute GEMM, M*B*N elements more memory.
Choose True when M*B*N activations fit and speed matters; the default keeps the layer's memory independent of
M (measurements: benchmarks/results/bench_mutual_cpu2*.md, providers ``ours`` and ``ours_saved``).

Kernel table (``saml_kernels._backend.kernels(OP, backend)``; signatures of ``torch.ops.saml_C.
mutual_linear_forward`` / ``mutual_linear_backward`` in csrc/registry.cpp): ``forward`` -> (out, attn), and
``backward`` -> dz_own [B, N], the recompute backward. The saved path uses the tables of ``mbranch_linear``
(``all_forward``, ``grouped_backward``) and ``mutual_unit`` (``forward``, ``backward``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .._codes import ACTIVATIONS
from . import _checks, _eager
from . import mbranch_linear as _mbl
from . import mutual_unit as _mu
from ._activation import activation_backward, needs_preactivation
from ._layout import dense
from .mutual_unit import check_similarity, check_temperature

OP = "mutual_linear"

_backend.define_op(OP, kernels=("forward", "backward"))
_backend.register_python_kernels(OP, "mutual_unit")
_backend.register_aten_kernels(OP, {"forward": "mutual_linear_forward", "backward": "mutual_linear_backward"})


def _own_rows(t: Tensor, scenario: Tensor) -> Tensor:
    """t[s_b, b] for t [M, B, N] -> [B, N] (contiguous); s_b clamped into [0, M) (an unchecked out-of-range row
    has no gradient: docs/design.md section 5)."""
    return t[scenario.long().clamp(0, max(t.shape[0] - 1, 0)), torch.arange(t.shape[1], device=t.device)]


# ------------------------------------------------------------------------------------------------ custom ops

@_eager.custom_op("saml_kernels::mutual_linear", mutates_args=())
def _forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], aux: Optional[Tensor],
                aux_weight: Optional[Tensor], scenario: Tensor, activation: int, temperature: float, similarity: int,
                save_branch_outputs: bool, check: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out [B, N], attn [B, M] float32, saved_h, saved_z): saved_h is h [M, B, N] (the all-route layout) and
    saved_z is z[s_b, b] [B, N] (gelu/silu) with ``save_branch_outputs``, else empty."""
    if check:
        _checks.scenario_range(OP, scenario, weight.shape[0])
    empty = x.new_empty(0)
    if not save_branch_outputs:
        out, attn = _backend.kernels(OP, backend).forward(x, weight, bias, aux, aux_weight, scenario, activation,
                                                    temperature, similarity)
        return out, attn, empty, empty.clone()
    h, z = _backend.kernels(_mbl.OP, backend).all_forward(x, weight, bias, aux, aux_weight, activation)
    h = _mbl.all_layout(h, True)
    out, attn = _backend.kernels(_mu.OP, backend).forward(h, scenario, temperature, similarity)
    z_own = _own_rows(z, scenario) if needs_preactivation(activation) else empty.clone()
    return out, attn, h, z_own


@_forward_op.register_fake
def _(x, weight, bias, aux, aux_weight, scenario, activation, temperature, similarity, save_branch_outputs, check,
      backend):
    M, N = weight.shape[0], weight.shape[2]
    B = x.shape[0]
    out, attn = x.new_empty(B, N), x.new_empty(B, M, dtype=torch.float32)
    if not save_branch_outputs:
        return out, attn, x.new_empty(0), x.new_empty(0)
    h = x.new_empty(B, M, N).permute(1, 0, 2)
    z_own = x.new_empty(B, N) if needs_preactivation(activation) else x.new_empty(0)
    return out, attn, h, z_own


@_eager.custom_op("saml_kernels::mutual_linear_backward", mutates_args=())
def _backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], aux: Optional[Tensor],
                 aux_weight: Optional[Tensor], scenario: Tensor, attn: Tensor, saved_h: Tensor, saved_z: Tensor,
                 activation: int, temperature: float, similarity: int, saved: bool, need_dx: bool,
                 need_dweight: bool, need_dbias: bool, need_daux: bool, need_daux_weight: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW, db, daux, dWa), empty where not needed."""
    g = grad_out.contiguous()
    if saved:
        dh_own = _backend.kernels(_mu.OP, backend).backward(g, saved_h, scenario, attn, temperature, similarity)
        fused = _backend.kernels(_mbl.OP, backend).grouped_backward_act
        if fused is not None and activation in _mbl.FUSED_ACTS:
            # act'(h[s_b, b]) is applied while the kernel gathers each scenario's rows: no own-row copy of h
            return fused(dh_own, saved_h if activation != _mbl.NONE else saved_z, x, weight, aux, aux_weight,
                         scenario, activation, need_dx, need_dweight, need_dbias, need_daux, need_daux_weight)
        act_in = saved_z if needs_preactivation(activation) else _own_rows(saved_h, scenario)
        dz = activation_backward(dh_own, act_in, activation).contiguous()
    else:
        dz = _backend.kernels(OP, backend).backward(g, x, weight, bias, aux, aux_weight, scenario, attn, activation,
                                                    temperature, similarity)
    return _backend.kernels(_mbl.OP, backend).grouped_backward(dz, x, weight, aux, aux_weight, scenario, need_dx,
                                                               need_dweight, need_dbias, need_daux, need_daux_weight)


@_backward_op.register_fake
def _(grad_out, x, weight, bias, aux, aux_weight, scenario, attn, saved_h, saved_z, activation, temperature,
      similarity, saved, need_dx, need_dweight, need_dbias, need_daux, need_daux_weight, backend):
    need = (need_dx, need_dweight, need_dbias, need_daux and aux is not None, need_daux_weight and aux is not None)
    return tuple(x.new_empty(s) for s in _mbl._grad_shapes(x, weight, aux, aux_weight, need))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, aux, aux_weight, scenario, activation, temperature, similarity, save, check, backend) = inputs
    _, attn, saved_h, saved_z = output
    ctx.save_for_backward(x, weight, bias, aux, aux_weight, scenario, attn, saved_h, saved_z)
    ctx.activation, ctx.temperature, ctx.similarity, ctx.save, ctx.backend = (activation, temperature, similarity,
                                                                              save, backend)
    ctx.mark_non_differentiable(attn, saved_h, saved_z)


def _backward(ctx, grad_out, _g_attn, _g_h, _g_z):
    x, weight, bias, aux, aux_weight, scenario, attn, saved_h, saved_z = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dW, db, daux, dWa = _backward_op(grad_out, x, weight, bias, aux, aux_weight, scenario, attn, saved_h,
                                         saved_z, ctx.activation, ctx.temperature, ctx.similarity, ctx.save,
                                         need[0], need[1], need[2] and bias is not None, need[3], need[4],
                                         ctx.backend)
    keep = lambda t, n: t if n else None  # noqa: E731
    return (keep(dx, need[0]), keep(dW, need[1]), keep(db, need[2]), keep(daux, need[3]), keep(dWa, need[4]),
            None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public API

def mutual_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scenario: Tensor, *,
                  activation: Optional[str] = None, temperature: float = 1.0, similarity: str = "cosine",
                  aux: Optional[Tensor] = None, aux_weight: Optional[Tensor] = None,
                  save_branch_outputs: bool = False, return_attention: bool = False,
                  backend: Optional[str] = None, check_scenario: bool = True):
    """Fused all-branch linear layer + mutual unit (SAML mutual layer): ``out [B, N]``.

    Equals ``mutual_unit(mbranch_linear(x, weight, bias, scenario, route="all", grad_mask="own",
    activation=activation, aux=aux, aux_weight=aux_weight), scenario, temperature=..., similarity=...)``
    (values and gradients), without writing the [M, B, N] branch outputs to memory.

    Args:
        x: [B, K] (shared by the branches). weight: [M, K, N]. bias: [M, N] or None.
        scenario: [B] int32/int64 in [0, M).
        activation: None | "relu" | "leaky_relu" (0.01) | "gelu" (exact) | "silu".
        temperature: softmax temperature > 0. similarity: "cosine" | "dot" (see ``mutual_unit``).
        aux: [B, Ka] second operand with aux_weight [M, Ka, N] (``[x ; aux] @ [W ; Wa]`` without the concat).
        save_branch_outputs: False (default) recomputes the branch outputs in the backward (no M x B x N
            tensor at all); True keeps h [M, B, N] from the forward (faster backward, M*B*N more memory).
        return_attention: also return the attention [B, M] (float32, not differentiable).
        backend: "reference" | "cpu" | "triton" | "cuda" | None (see saml_kernels.use_backend).
        check_scenario: raise IndexError for a scenario outside [0, M) (one reduction + one host sync).

    All tensors share one floating dtype (float32/float16/bfloat16/float64); float32 arithmetic inside
    (float64 for float64). Gradients: branch m's parameters only from scenario-m samples; x and aux only
    through the own branch (the other branches are stop-gradient for each sample).
    """
    _mbl._validate(x, weight, bias, scenario, "all", activation, "own", aux, aux_weight)
    if x.dim() != 2:
        raise ValueError(f"{OP}: x must be [B, K] (shared by the branches), got shape {tuple(x.shape)}")
    t = check_temperature(OP, temperature)
    sim = check_similarity(OP, similarity)
    if not isinstance(save_branch_outputs, bool):
        raise TypeError(f"{OP}: save_branch_outputs must be a bool, got {save_branch_outputs!r}")
    be = _backend.resolve(OP, x.device.type, backend)
    c = dense  # .contiguous() without a B != 1 guard under torch.export (ops/_layout.py)
    scenario, check = _checks.op_scenario(OP, scenario.contiguous(), weight.shape[0], check_scenario)
    out, attn, _, _ = _forward_op(c(x), weight.contiguous(), c(bias), c(aux), c(aux_weight),
                                  scenario, ACTIVATIONS[activation], t, sim, save_branch_outputs, check, be)
    return (out, attn) if return_attention else out
