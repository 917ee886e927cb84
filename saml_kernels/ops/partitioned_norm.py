"""``saml_kernels::partitioned_norm``: STAR's partitioned (scenario-wise) normalisation over a mixed batch.

Math (x [B, N], s_b the scenario of row b, R_m its rows, n_m = |R_m|; see saml_kernels/reference/partitioned_norm.py):

    mean_m, var_m = mean and biased variance of x over R_m          (segmented reduction, no sort needed)
    y_b = (x_b - mean_{s_b}) rsqrt(var_{s_b} + eps) (gamma * gamma_{s_b}) + (beta + beta_{s_b})

Rows may come in any order. The per-scenario scale gamma * gamma_m and shift beta + beta_m ([M, N], tiny) are formed
in autograd, so the kernels see one scale and one shift per scenario and return dscale, dshift; autograd turns
them into dgamma = sum_m dscale_m gamma_m, dgamma_m = dscale_m gamma, dbeta = sum_m dshift_m, dbeta_m = dshift_m.

Edge cases (defined, tested): a scenario with one row has var 0, its row normalises to 0 and y = shift, dx = 0;
a scenario with no row has no statistics and its running statistics are not updated; an empty batch gives an
empty y. Running statistics ([M, N], float32, updated in place when training, without a host sync):
running_mean_m <- (1 - momentum) running_mean_m + momentum mean_m for n_m >= 1, running_var_m likewise with the
unbiased variance var_m n_m / (n_m - 1) for n_m >= 2. In eval (training=False) they replace the batch statistics.
Under ``deferred_checks()`` / ``capture_safe_checks()`` (a model's forward) the update is masked on the device by
the value checks not read yet (this op's and every earlier layer's), so a bad input leaves them unchanged.

Kernel contract (csrc/registry.cpp, one table per backend, ``kernels(backend)``):
    pn_stats(x, scenario, M) -> (mean [M, N], var [M, N] acc dtype, count [M] int64)
    pn_forward(x, scenario, mean, rstd, scale, shift) -> y [B, N]
    pn_backward(dy, x, scenario, mean, rstd, scale, count, batch_stats) -> (dx, dscale [M, N], dshift [M, N])
The accumulation dtype is float32 (float64 for float64 x); mean/rstd are passed in it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _autocast, _checks, _eager

OP = "partitioned_norm"

# "cuda" runs the Triton kernels: a segmented reduction plus two elementwise passes gain nothing from a second,
# hand-written CUDA implementation, and registering it keeps ``backend="cuda"`` models (STAR) working on a GPU.
_backend.define_op(OP, kernels=("stats", "forward", "backward"))
_backend.register_python_kernels(OP, "partitioned_norm")
_backend.register_aten_kernels(OP, {"stats": "pn_stats", "forward": "pn_forward", "backward": "pn_backward"},
                               backends=("cpu",))
_backend.register_alias(OP, "cuda", "triton")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the statistics: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernels(backend: str):
    """Kernel table of one backend: ``stats``, ``forward``, ``backward`` (signatures of ``torch.ops.saml_C.pn_*``);
    the "cuda" backend is the Triton table (no CUDA C++ kernel)."""
    return _backend.kernels(OP, backend)


# ------------------------------------------------------------------------------------------------ custom ops

@_eager.custom_op("saml_kernels::partitioned_norm_stats", mutates_args=())
def _stats_op(x: Tensor, scenario: Tensor, num_scenarios: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    mean, var, count = kernels(backend).stats(x, scenario, num_scenarios)
    return mean, var, count


@_stats_op.register_fake
def _(x, scenario, num_scenarios, backend):
    acc = acc_dtype(x.dtype)
    N = x.shape[1]
    return (x.new_empty(num_scenarios, N, dtype=acc), x.new_empty(num_scenarios, N, dtype=acc),
            x.new_empty(num_scenarios, dtype=torch.int64))


@_eager.custom_op("saml_kernels::partitioned_norm", mutates_args=())
def _forward_op(x: Tensor, scenario: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, shift: Tensor,
                count: Tensor, batch_stats: bool, backend: str) -> Tensor:
    """y [B, N]; count and batch_stats serve the backward (whether mean/rstd depend on x)."""
    return kernels(backend).forward(x, scenario, mean, rstd, scale, shift)


@_forward_op.register_fake
def _(x, scenario, mean, rstd, scale, shift, count, batch_stats, backend):
    return torch.empty_like(x)


@_eager.custom_op("saml_kernels::partitioned_norm_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, scenario: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, count: Tensor,
                 batch_stats: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dx, dscale, dshift = kernels(backend).backward(dy, x, scenario, mean, rstd, scale, count, batch_stats)
    return dx, dscale, dshift


@_backward_op.register_fake
def _(dy, x, scenario, mean, rstd, scale, count, batch_stats, backend):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


def _setup(ctx, inputs, output):
    x, scenario, mean, rstd, scale, shift, count, batch_stats, backend = inputs
    ctx.save_for_backward(x, scenario, mean, rstd, scale, count)
    ctx.batch_stats, ctx.backend = batch_stats, backend


def _backward(ctx, dy):
    x, scenario, mean, rstd, scale, count = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not (need[0] or need[4] or need[5]):
        return (None,) * 9
    dx, dscale, dshift = _backward_op(dy.contiguous(), x, scenario, mean, rstd, scale, count, ctx.batch_stats,
                                      ctx.backend)
    # mean / rstd are inputs of the custom op but their dependence on x is already in dx (batch statistics)
    return (dx if need[0] else None, None, None, None, dscale if need[4] else None, dshift if need[5] else None,
            None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------ public API

def _validate(x, scenario, weight, bias, scenario_weight, scenario_bias, running_mean, running_var, momentum, eps):
    _checks.tensor(OP, "x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(OP, "scenario", scenario, ndim=1, dtypes=_checks.INDEX_DTYPES)
    for name, t, nd in (("weight", weight, 1), ("bias", bias, 1), ("scenario_weight", scenario_weight, 2),
                        ("scenario_bias", scenario_bias, 2)):
        _checks.tensor(OP, name, t, ndim=nd, dtypes=_checks.FLOAT_DTYPES)
        # under autocast the op promotes x, scale and shift to their widest dtype (ops/_autocast.py)
        if t.dtype != x.dtype and not _autocast.will_cast(x.device.type, x, t):
            raise TypeError(f"{OP}: {name} dtype {t.dtype} differs from x dtype {x.dtype}; all must share one dtype "
                            f"(mixed float32 / float16 / bfloat16 are accepted under torch.autocast)")
    _checks.tensor(OP, "running_mean", running_mean, ndim=2, dtypes=(torch.float32, torch.float64), optional=True)
    _checks.tensor(OP, "running_var", running_var, ndim=2, dtypes=(torch.float32, torch.float64), optional=True)
    _checks.same_device(OP, x=x, scenario=scenario, weight=weight, bias=bias, scenario_weight=scenario_weight,
                        scenario_bias=scenario_bias, running_mean=running_mean, running_var=running_var)
    B, N = x.shape
    M = scenario_weight.shape[0]
    if M < 1:
        raise ValueError(f"{OP}: scenario_weight must hold at least one scenario, got shape "
                         f"{tuple(scenario_weight.shape)}")
    if scenario.shape[0] != B:
        raise ValueError(f"{OP}: scenario must have B = {B} entries (one per row of x), got {scenario.shape[0]}")
    for name, t, shape in (("weight", weight, (N,)), ("bias", bias, (N,)), ("scenario_weight", scenario_weight, (M, N)),
                           ("scenario_bias", scenario_bias, (M, N)), ("running_mean", running_mean, (M, N)),
                           ("running_var", running_var, (M, N))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{OP}: {name} must be {list(shape)} (x is [B, N] = {list(x.shape)}, M = {M}), got "
                             f"{list(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP}: running_mean and running_var must be given together")
    for name, v in (("momentum", momentum), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{OP}: {name} must be a float, got {v!r} ({type(v).__name__})")
        if not math.isfinite(v):
            raise ValueError(f"{OP}: {name} must be finite, got {v!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{OP}: momentum must be in [0, 1], got {momentum!r}")
    if not eps > 0:
        raise ValueError(f"{OP}: eps must be > 0, got {eps!r}")


def _no_bad_input_yet(device: torch.device) -> Optional[Tensor]:
    """0-dim bool tensor on ``device``, True while no value check whose flag is not read yet has failed: in a
    deferred block the flags pending so far (this op's scenario check and every earlier layer's, e.g. the
    embedding ids that produced x), in the capture-safe mode no error counted since the last ``raise_errors``.
    None in eager mode (every check so far has passed or raised). No host sync."""
    if torch.compiler.is_compiling():
        return None
    mode = _checks.check_mode()
    if mode == "capture_safe":
        return _checks.error_total(device) == 0
    if mode != "deferred":
        return None
    flags = [f.reshape(()) for f, _ in _checks._stack()[-1][1].pending if f.device == device]
    return ~torch.stack(flags).any() if flags else None


@torch.no_grad()
def _update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: Tensor,
                    momentum: float, inputs_good: Optional[Tensor]) -> None:
    """In place, no host sync: scenarios with >= 1 row update the mean, >= 2 rows the (unbiased) variance; with
    ``inputs_good`` (a pending check's verdict, see ``_no_bad_input_yet``) nothing moves unless it is True, so a
    bad input that raises when its deferred check is read has not touched the running statistics."""
    n = count.to(var.dtype).unsqueeze(1)
    has_mean = (count >= 1).unsqueeze(1)
    has_var = (count >= 2).unsqueeze(1)
    if inputs_good is not None:
        has_mean, has_var = has_mean & inputs_good, has_var & inputs_good
    unbiased = var * n / (n - 1).clamp_min(1)
    running_mean.copy_(torch.where(has_mean, running_mean + momentum * (mean.to(running_mean.dtype) - running_mean),
                                   running_mean))
    running_var.copy_(torch.where(has_var, running_var + momentum * (unbiased.to(running_var.dtype) - running_var),
                                  running_var))


def partitioned_norm(x: Tensor, scenario: Tensor, weight: Tensor, bias: Tensor, scenario_weight: Tensor,
                     scenario_bias: Tensor, *, running_mean: Optional[Tensor] = None,
                     running_var: Optional[Tensor] = None, training: bool = True, momentum: float = 0.1,
                     eps: float = 1e-5, backend: Optional[str] = None, check_scenario: bool = True) -> Tensor:
    """Partitioned normalisation: batch norm with statistics per scenario within a mixed batch.

    y_b = (x_b - mean_{s_b}) rsqrt(var_{s_b} + eps) (weight * scenario_weight_{s_b}) + bias + scenario_bias_{s_b}

    Args:
        x: [B, N] float32/float16/bfloat16/float64, rows of any scenarios in any order.
        scenario: [B] int32/int64 in [0, M).
        weight, bias: [N] (gamma, beta, shared). scenario_weight, scenario_bias: [M, N] (gamma_m, beta_m).
        running_mean, running_var: [M, N] float32/float64 buffers or None. ``training``: batch statistics, and
            the buffers (if given) updated in place with ``momentum``; otherwise the buffers' statistics (batch
            statistics when there are none). See the module docstring for scenarios with 0 or 1 rows.
        eps: > 0, added to the variance. backend: "reference" | "cpu" | "triton" | None.
        check_scenario: raise IndexError for a scenario outside [0, M).

    Returns y [B, N] in x's dtype; statistics in float32 (float64 for float64 x). Under ``torch.autocast`` x and the
    parameters may mix float32 / float16 / bfloat16: y is then computed in, and returned in, the widest of their
    dtypes (the ``promote`` policy of ``saml_kernels.ops._autocast``).
    """
    _validate(x, scenario, weight, bias, scenario_weight, scenario_bias, running_mean, running_var, momentum, eps)
    be = _backend.resolve(OP, x.device.type, backend)
    M = scenario_weight.shape[0]
    x = x.contiguous()
    scenario = scenario.contiguous()
    if check_scenario:  # (its custom ops take no check: the one site is here, also for a traced graph)
        scenario = _checks.scenario_range(OP, scenario, M)
    scale = (weight * scenario_weight).contiguous()
    shift = (bias + scenario_bias).contiguous()
    batch_stats = bool(training) or running_mean is None
    if batch_stats:
        # detached: the statistics' dependence on x is part of the backward kernel's dx
        mean, var, count = _stats_op(x.detach(), scenario, M, be)
        if training and running_mean is not None:
            _update_running(running_mean, running_var, mean, var, count, float(momentum),
                            _no_bad_input_yet(x.device))
    else:
        acc = acc_dtype(x.dtype)
        mean, var = running_mean.detach().to(acc), running_var.detach().to(acc)
        count = torch.zeros(M, dtype=torch.int64, device=x.device)
    rstd = torch.rsqrt(var + eps)
    return _forward_op(x, scenario, mean.contiguous(), rstd.contiguous(), scale, shift, count, batch_stats, be)
