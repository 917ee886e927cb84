"""``saml_kernels::mbranch_linear``: the M-branch linear layer (routes "own"/"all", scenario gradient masking).

Kernel table (``saml_kernels._backend.kernels(OP, backend)``; signatures of ``torch.ops.saml_C.mbl_*`` in
csrc/registry.cpp): ``grouped_forward``, ``all_forward``, ``grouped_backward`` on every backend, and the optional
``grouped_backward_act`` (``mbl_grouped_backward_act``): the own-rows backward with the row pick of a [M, B, N]
dy / saved / [M, B, K] x and the relu / leaky_relu derivative folded into the gather (dx then [M, B, K], zero
off the own rows). A backend without it (None in its table) gets the unfused path.

Layout: ``all_forward`` with a shared x [B, K] returns y (and z) as the [M, B, N] *view* with strides
(N, M*N, 1) of a contiguous [B, M*N] buffer, the output of ONE GEMM x @ Wp against the packed weights
Wp [K, M*N] (Wp[k, m*N + n] = W[m, k, n]); with a per-branch x [M, B, K] they are contiguous [M, B, N]. The
custom op restores this layout (one copy) if a backend returns another one, because the fake (meta)
implementation promises it to torch.compile. Consumers of h (mutual unit) must honour strides.

z (the pre-activation) is returned only for gelu/silu (the backward needs it); relu/leaky_relu recover act'(z)
from y. The activation backward (dz = dy * act'(z)) of the unfused paths is done in PyTorch
(ops/_activation.py), the same for every backend.

Math (W [M, K, N], Wa [M, Ka, N], bias [M, N], s_b the scenario of sample b):

    z[m, b] = x_b W_m + aux_b Wa_m + bias_m     (x_b = x[b] shared, or x[m, b] per branch)
    route "all": y = act(z) [M, B, N];  route "own": y[b] = act(z[s_b, b]) [B, N]

Backward (dz = dy * act'(z)):
- route "own": grouped_backward on the rows of each scenario: dW_m = X_m^T dZ_m, db_m = sum dZ_m,
  dx_b = dz_b W_{s_b}^T (and the same for aux / Wa).
- route "all", grad_mask "own": only dz_own[b] = dz[s_b, b] matters: gathered, then the same grouped
  backward (per-branch x: x_own[b] = x[s_b, b], dx scattered back). No dense M x B x N gradient GEMM.
- grad_mask "params": dW/db/dWa as for "own"; dx = sum_m dz[m] W_m^T as one GEMM against the packed
  weights (shared x) or a bmm (per-branch x).
- grad_mask "none": dense gradients (one GEMM for dW with a shared x, bmm otherwise).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .._codes import ACTIVATIONS
from . import _autocast, _checks, _eager
from ._layout import dense
from ._activation import LEAKY_RELU, NONE, RELU, activation_backward, needs_preactivation

OP = "mbranch_linear"
ROUTES = ("own", "all")
GRAD_MASKS = {"own": 0, "params": 1, "none": 2}

_backend.define_op(OP, kernels=("grouped_forward", "all_forward", "grouped_backward"),
                   optional=("grouped_backward_act",))
_backend.register_python_kernels(OP, "mbranch_linear")
_backend.register_aten_kernels(OP, {"grouped_forward": "mbl_grouped_forward", "all_forward": "mbl_all_forward",
                                    "grouped_backward": "mbl_grouped_backward",
                                    "grouped_backward_act": "mbl_grouped_backward_act"})


FUSED_ACTS = (NONE, RELU, LEAKY_RELU)  # activation backwards the fused kernel applies itself


def all_layout(t: Tensor, shared: bool) -> Tensor:
    """``t`` [M, B, N] in the layout the all-route contract promises (see the module docstring)."""
    if not shared:
        return t.contiguous()
    M, B, N = t.shape
    if t.stride() == (N, M * N, 1) or t.numel() == 0:
        return t
    return t.permute(1, 0, 2).contiguous().permute(1, 0, 2)


def _empty_all(x: Tensor, M: int, N: int) -> Tensor:
    B = x.shape[-2]
    if x.dim() == 2:
        return x.new_empty(B, M, N).permute(1, 0, 2)
    return x.new_empty(M, B, N)


# ------------------------------------------------------------------------------------------------ forward ops

@_eager.custom_op("saml_kernels::mbranch_linear_own", mutates_args=())
def _own_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], aux: Optional[Tensor], aux_weight: Optional[Tensor],
            scenario: Tensor, activation: int, check: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(y [B, N], z [B, N] for gelu/silu else empty): each row through its own scenario's branch."""
    if check:
        _checks.scenario_range(OP, scenario, weight.shape[0])
    y, z = _backend.kernels(OP, backend).grouped_forward(x, weight, bias, aux, aux_weight, scenario, activation)
    return y, z


@_own_op.register_fake
def _(x, weight, bias, aux, aux_weight, scenario, activation, check, backend):
    y = x.new_empty(x.shape[0], weight.shape[2])
    return y, (torch.empty_like(y) if needs_preactivation(activation) else x.new_empty(0))


@_eager.custom_op("saml_kernels::mbranch_linear_all", mutates_args=())
def _all_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], aux: Optional[Tensor], aux_weight: Optional[Tensor],
            scenario: Tensor, activation: int, grad_mask: int, check: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(y [M, B, N], z or empty): every row through every branch (scenario/grad_mask serve the backward)."""
    if check:
        _checks.scenario_range(OP, scenario, weight.shape[0])
    y, z = _backend.kernels(OP, backend).all_forward(x, weight, bias, aux, aux_weight, activation)
    shared = x.dim() == 2
    y = all_layout(y, shared)
    z = all_layout(z, shared) if needs_preactivation(activation) else z
    return y, z


@_all_op.register_fake
def _(x, weight, bias, aux, aux_weight, scenario, activation, grad_mask, check, backend):
    M, N = weight.shape[0], weight.shape[2]
    y = _empty_all(x, M, N)
    return y, (_empty_all(x, M, N) if needs_preactivation(activation) else x.new_empty(0))


# ------------------------------------------------------------------------------------------------ backward ops

def _grad_shapes(x, weight, aux, aux_weight, need):
    """Shapes of (dx, dW, db, daux, dWa); (0,) for a gradient not needed."""
    M, K, N = weight.shape
    shapes = [tuple(x.shape), (M, K, N), (M, N),
              tuple(aux.shape) if aux is not None else (0,),
              tuple(aux_weight.shape) if aux_weight is not None else (0,)]
    return [s if n else (0,) for s, n in zip(shapes, need)]


@_eager.custom_op("saml_kernels::mbranch_linear_own_backward", mutates_args=())
def _own_backward_op(dy: Tensor, saved: Tensor, x: Tensor, weight: Tensor, aux: Optional[Tensor],
                     aux_weight: Optional[Tensor], scenario: Tensor, activation: int, need_dx: bool,
                     need_dweight: bool, need_dbias: bool, need_daux: bool, need_daux_weight: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    k = _backend.kernels(OP, backend)
    need = (need_dx, need_dweight, need_dbias, need_daux, need_daux_weight)
    if k.grouped_backward_act is not None and activation in FUSED_ACTS:
        return _distinct(k.grouped_backward_act(dy, saved, x, weight, aux, aux_weight, scenario, activation, *need))
    dz = activation_backward(dy, saved, activation).contiguous()
    return _distinct(k.grouped_backward(dz, x, weight, aux, aux_weight, scenario, *need))


@_own_backward_op.register_fake
def _(dy, saved, x, weight, aux, aux_weight, scenario, activation, need_dx, need_dweight, need_dbias, need_daux,
      need_daux_weight, backend):
    need = (need_dx, need_dweight, need_dbias, need_daux and aux is not None, need_daux_weight and aux is not None)
    return tuple(x.new_empty(s) for s in _grad_shapes(x, weight, aux, aux_weight, need))


def _distinct(grads) -> tuple:
    """Fresh tensors for the empty (not needed) gradients: a custom op's outputs must not alias each other."""
    return tuple(g.new_empty(0) if g.numel() == 0 and g.dim() == 1 else g for g in grads)


def _packed(w: Tensor) -> Tensor:
    """[M, K, N] -> [K, M*N] (Wp[k, m*N + n] = W[m, k, n])."""
    M, K, N = w.shape
    return w.permute(1, 0, 2).reshape(K, M * N)


def _dense_input_grads(dz, x, weight, aux_weight, need_dx, need_daux):
    """dx = sum_m dz[m] W_m^T (one GEMM against the packed weights for a shared x, a bmm per branch), same for aux."""
    M, B, N = dz.shape
    dzp = dz.permute(1, 0, 2).reshape(B, M * N) if (x.dim() == 2 or need_daux) else None  # free in the all layout
    dx = daux = None
    if need_dx:
        dx = dzp @ _packed(weight).t() if x.dim() == 2 else torch.bmm(dz, weight.transpose(1, 2))
    if need_daux:
        daux = dzp @ _packed(aux_weight).t()
    return dx, daux


@_eager.custom_op("saml_kernels::mbranch_linear_all_backward", mutates_args=())
def _all_backward_op(dy: Tensor, saved: Tensor, x: Tensor, weight: Tensor, aux: Optional[Tensor],
                     aux_weight: Optional[Tensor], scenario: Tensor, activation: int, grad_mask: int, need_dx: bool,
                     need_dweight: bool, need_dbias: bool, need_daux: bool, need_daux_weight: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    M, K, N = weight.shape
    B = x.shape[-2]
    has_aux = aux is not None
    need_daux, need_daux_weight = need_daux and has_aux, need_daux_weight and has_aux
    empty = x.new_empty(0)
    # clamped for the gathers below; an unchecked out-of-range row gets no gradient because the grouped kernels
    # (given the original scenario) zero its dx / daux and leave it out of dW / db (docs/design.md section 5)
    s = scenario.long().clamp(0, max(M - 1, 0))
    ar = torch.arange(B, device=x.device)
    shared = x.dim() == 2
    k = _backend.kernels(OP, backend)
    grouped = k.grouped_backward
    fused = k.grouped_backward_act
    if grad_mask == GRAD_MASKS["own"] and fused is not None:
        # The kernel picks dy[s_b, b] (and x[s_b, b]) and applies act' while it gathers the rows by scenario.
        if activation in FUSED_ACTS:
            out = fused(dy, saved, x, weight, aux, aux_weight, scenario, activation, need_dx, need_dweight,
                        need_dbias, need_daux, need_daux_weight)
        else:
            dz = activation_backward(dy[s, ar], saved[s, ar], activation)
            out = fused(dz, dz.new_empty(0), x, weight, aux, aux_weight, scenario, NONE, need_dx, need_dweight,
                        need_dbias, need_daux, need_daux_weight)
        return _distinct(out)
    if grad_mask == GRAD_MASKS["own"]:
        # Only the own branch of each row carries gradient: gather it, run the grouped backward.
        dy_own = dy[s, ar]
        saved_own = saved[s, ar] if saved.dim() == 3 else saved
        dz = activation_backward(dy_own, saved_own, activation).contiguous()
        x_own = x if shared else x[s, ar]
        dx, dW, db, daux, dWa = grouped(dz, x_own.contiguous(), weight, aux, aux_weight, scenario, need_dx,
                                        need_dweight, need_dbias, need_daux, need_daux_weight)
        if need_dx and not shared:
            full = x.new_zeros(x.shape)
            full[s, ar] = dx
            dx = full
        return _distinct((dx, dW, db, daux, dWa))
    dz = activation_backward(dy, saved, activation)  # [M, B, N], keeps dy's layout
    if grad_mask == GRAD_MASKS["params"]:
        # Parameters from own rows only (grouped); inputs from every branch (dense).
        if fused is not None:
            _, dW, db, _, dWa = fused(dz, dz.new_empty(0), x, weight, aux, aux_weight, scenario, NONE, False,
                                      need_dweight, need_dbias, False, need_daux_weight)
        else:
            dz_own = dz[s, ar].contiguous()
            x_own = x if shared else x[s, ar]
            _, dW, db, _, dWa = grouped(dz_own, x_own.contiguous(), weight, aux, aux_weight, scenario, False,
                                        need_dweight, need_dbias, False, need_daux_weight)
    else:
        # Dense: dW_m = x_m^T dz_m (one GEMM x^T [K, B] @ dz [B, M*N] for a shared x), db_m = sum_b dz_m.
        dW = db = dWa = empty
        if need_dweight:
            if shared:
                dW = (x.t() @ dz.permute(1, 0, 2).reshape(B, M * N)).view(K, M, N).permute(1, 0, 2).contiguous()
            else:
                dW = torch.bmm(x.transpose(1, 2), dz)
        if need_dbias:
            db = dz.sum(1)
        if need_daux_weight:
            Ka = aux.shape[1]
            dWa = (aux.t() @ dz.permute(1, 0, 2).reshape(B, M * N)).view(Ka, M, N).permute(1, 0, 2).contiguous()
    dx, daux = _dense_input_grads(dz, x, weight, aux_weight, need_dx, need_daux)
    return _distinct((empty if dx is None else dx, dW, db, empty if daux is None else daux, dWa))


@_all_backward_op.register_fake
def _(dy, saved, x, weight, aux, aux_weight, scenario, activation, grad_mask, need_dx, need_dweight, need_dbias,
      need_daux, need_daux_weight, backend):
    need = (need_dx, need_dweight, need_dbias, need_daux and aux is not None, need_daux_weight and aux is not None)
    return tuple(x.new_empty(s) for s in _grad_shapes(x, weight, aux, aux_weight, need))


# ------------------------------------------------------------------------------------------------ autograd

def _saved_activation(y, z, activation):
    """What the activation backward needs: z for gelu/silu, y for relu/leaky_relu, nothing otherwise."""
    if needs_preactivation(activation):
        return z
    if activation in (RELU, LEAKY_RELU):
        return y
    return y.new_empty(0)


def _setup_own(ctx, inputs, output):
    x, weight, bias, aux, aux_weight, scenario, activation, check, backend = inputs
    y, z = output
    ctx.save_for_backward(x, weight, aux, aux_weight, scenario, _saved_activation(y, z, activation))
    ctx.activation, ctx.backend = activation, backend


def _backward_own(ctx, dy, _dz):
    x, weight, aux, aux_weight, scenario, saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dW, db, daux, dWa = _own_backward_op(dy.contiguous(), saved, x, weight, aux, aux_weight, scenario,
                                             ctx.activation, need[0], need[1], need[2], need[3], need[4], ctx.backend)
    keep = lambda t, n: t if n else None  # noqa: E731
    return (keep(dx, need[0]), keep(dW, need[1]), keep(db, need[2]), keep(daux, need[3]), keep(dWa, need[4]),
            None, None, None, None)


def _setup_all(ctx, inputs, output):
    x, weight, bias, aux, aux_weight, scenario, activation, grad_mask, check, backend = inputs
    y, z = output
    ctx.save_for_backward(x, weight, aux, aux_weight, scenario, _saved_activation(y, z, activation))
    ctx.activation, ctx.grad_mask, ctx.backend = activation, grad_mask, backend


def _backward_all(ctx, dy, _dz):
    x, weight, aux, aux_weight, scenario, saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dW, db, daux, dWa = _all_backward_op(dy, saved, x, weight, aux, aux_weight, scenario, ctx.activation,
                                             ctx.grad_mask, need[0], need[1], need[2], need[3], need[4], ctx.backend)
    keep = lambda t, n: t if n else None  # noqa: E731
    return (keep(dx, need[0]), keep(dW, need[1]), keep(db, need[2]), keep(daux, need[3]), keep(dWa, need[4]),
            None, None, None, None, None)


_own_op.register_autograd(_backward_own, setup_context=_setup_own)
_all_op.register_autograd(_backward_all, setup_context=_setup_all)


# ------------------------------------------------------------------------------------------------ public API

def _validate(x, weight, bias, scenario, route, activation, grad_mask, aux, aux_weight):
    _checks.tensor(OP, "x", x, ndim=(2, 3), dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(OP, "weight", weight, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(OP, "bias", bias, ndim=2, dtypes=_checks.FLOAT_DTYPES, optional=True)
    _checks.tensor(OP, "scenario", scenario, ndim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.tensor(OP, "aux", aux, ndim=2, dtypes=_checks.FLOAT_DTYPES, optional=True)
    _checks.tensor(OP, "aux_weight", aux_weight, ndim=3, dtypes=_checks.FLOAT_DTYPES, optional=True)
    _checks.same_device(OP, x=x, weight=weight, bias=bias, scenario=scenario, aux=aux, aux_weight=aux_weight)
    if route not in ROUTES:
        raise ValueError(f"{OP}: route must be one of {ROUTES}, got {route!r}")
    _checks.choice(OP, "grad_mask", grad_mask, GRAD_MASKS)
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    # under torch.autocast the op casts them all to the autocast dtype first (ops/_autocast.py)
    mixed_ok = _autocast.will_cast(x.device.type, x, weight, bias, aux, aux_weight)
    for name, t in (("weight", weight), ("bias", bias), ("aux", aux), ("aux_weight", aux_weight)):
        if t is not None and t.dtype != x.dtype and not mixed_ok:
            raise TypeError(f"{OP}: {name} dtype {t.dtype} differs from x dtype {x.dtype}; all must share one dtype")
    M, K, N = weight.shape
    if M < 1:
        raise ValueError(f"{OP}: weight must hold at least one branch, got shape {tuple(weight.shape)}")
    if x.shape[-1] != K:
        raise ValueError(f"{OP}: x has {x.shape[-1]} features but weight [M, K, N] = {tuple(weight.shape)} expects K = {K}")
    if x.dim() == 3 and x.shape[0] != M:
        raise ValueError(f"{OP}: per-branch x [M, B, K] has {x.shape[0]} branches but weight has M = {M}")
    B = x.shape[-2]
    if scenario.shape[0] != B:
        raise ValueError(f"{OP}: scenario must have B = {B} entries (one per row of x), got {scenario.shape[0]}")
    if bias is not None and tuple(bias.shape) != (M, N):
        raise ValueError(f"{OP}: bias must be [M, N] = [{M}, {N}], got {tuple(bias.shape)}")
    if (aux is None) != (aux_weight is None):
        raise ValueError(f"{OP}: aux and aux_weight must be given together (got aux "
                         f"{'None' if aux is None else 'tensor'}, aux_weight {'None' if aux_weight is None else 'tensor'})")
    if aux is not None:
        if aux.shape[0] != B:
            raise ValueError(f"{OP}: aux must have B = {B} rows, got shape {tuple(aux.shape)}")
        if tuple(aux_weight.shape) != (M, aux.shape[1], N):
            raise ValueError(f"{OP}: aux_weight must be [M, Ka, N] = [{M}, {aux.shape[1]}, {N}], got "
                             f"{tuple(aux_weight.shape)}")


def mbranch_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scenario: Tensor, *, route: str = "own",
                   activation: Optional[str] = None, grad_mask: str = "own", aux: Optional[Tensor] = None,
                   aux_weight: Optional[Tensor] = None, backend: Optional[str] = None,
                   check_scenario: bool = True) -> Tensor:
    """M-branch linear layer with scenario routing and scenario gradient masking.

    z[m, b] = x_b W_m + aux_b Wa_m + bias_m  (x_b = x[b] for a shared x, x[m, b] for a per-branch x), y = act(z).

    Args:
        x: [B, K] shared by the branches, or [M, B, K] one input per branch.
        weight: [M, K, N]. bias: [M, N] or None. scenario: [B] int32/int64 in [0, M).
        route: "own" -> y [B, N], y[b] = act(z[s_b, b]) (grouped GEMM by scenario, rows in any order);
            "all" -> y [M, B, N] (for a shared x a strided view of a [B, M, N] buffer).
        activation: None | "relu" | "leaky_relu" (slope 0.01) | "gelu" (exact erf) | "silu", fused.
        grad_mask (route "all"): "own" -> y[m, b] passes gradient only if m == s_b (to x_b, aux_b and branch
            s_b's parameters); "params" -> branch m's parameters from scenario-m samples only, x/aux from every
            branch; "none" -> dense gradients. Route "own" is masked by construction (grad_mask is ignored).
        aux: [B, Ka] second operand with aux_weight [M, Ka, N] ([x ; aux] @ [W ; Wa] without the concat).
        backend: "reference" | "cpu" | "triton" | "cuda" | None (see saml_kernels.use_backend).
        check_scenario: raise IndexError for a scenario outside [0, M) (one reduction + one host sync).

    All tensors share one floating dtype (float32/float16/bfloat16/float64); GEMMs accumulate in float32
    (float64 for float64); float32 products are exact unless torch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``), as torch.matmul.
    """
    _validate(x, weight, bias, scenario, route, activation, grad_mask, aux, aux_weight)
    be = _backend.resolve(OP, x.device.type, backend)
    act = ACTIVATIONS[activation]
    c = dense  # .contiguous() without a B != 1 guard under torch.export (ops/_layout.py)
    scenario, check = _checks.op_scenario(OP, scenario.contiguous(), weight.shape[0], check_scenario)
    if route == "own":
        if x.dim() == 3:
            # Each row needs only its own branch's input (checked first: the gather would fail less clearly).
            if check and not torch.compiler.is_compiling():
                _checks.scenario_range(OP, scenario, weight.shape[0])
                check = False
            x = x[scenario.long().clamp(0, max(weight.shape[0] - 1, 0)), torch.arange(x.shape[1], device=x.device)]
        y, _ = _own_op(c(x), weight.contiguous(), c(bias), c(aux), c(aux_weight), scenario, act, check, be)
        return y
    y, _ = _all_op(c(x), weight.contiguous(), c(bias), c(aux), c(aux_weight), scenario, act,
                   GRAD_MASKS[grad_mask], check, be)
    return y
