"""Plain-PyTorch partitioned normalisation (STAR's scenario-wise batch norm): the float64 oracle of
``saml_kernels.partitioned_norm`` and the kernel table of its ``reference`` backend.

Math (x [B, N], s_b the scenario of row b, R_m = {b : s_b = m}, n_m = |R_m|):

    mean_m = (1 / n_m) sum_{b in R_m} x_b,    var_m = (1 / n_m) sum_{b in R_m} (x_b - mean_m)^2   (biased)
    y_b = (x_b - mean_{s_b}) * rsqrt(var_{s_b} + eps) * scale_{s_b} + shift_{s_b}
    scale_m = gamma * gamma_m,  shift_m = beta + beta_m

A scenario with one row has var 0, so its row normalises to 0 and y = shift. A scenario with no row has no
statistics (mean = var = 0 here; the running statistics are not updated for it). In eval the running statistics
replace the batch ones.

Backward with batch statistics (xhat = (x - mean) rstd, per scenario m over its rows):
    dscale_m = sum dy xhat,   dshift_m = sum dy,   dx = scale rstd (dy - (dshift_m + xhat dscale_m) / n_m)
with running statistics: dx = scale rstd dy.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the statistics: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def partitioned_norm_reference(x: Tensor, scenario: Tensor, weight: Tensor, bias: Tensor, scenario_weight: Tensor,
                               scenario_bias: Tensor, *, running_mean: Optional[Tensor] = None,
                               running_var: Optional[Tensor] = None, training: bool = True, momentum: float = 0.1,
                               eps: float = 1e-5) -> Tensor:
    """The oracle: a loop over scenarios on the whole batch (masks, no gather), differentiable by autograd, the
    statistics in float32 (float64 for float64). Running statistics are updated in place when ``training``:
    ``r = (1 - momentum) r + momentum batch`` for scenarios with >= 1 row (mean) / >= 2 rows (unbiased var).

    x [B, N]; scenario [B]; weight, bias [N]; scenario_weight, scenario_bias [M, N]; running_* [M, N] float32 or
    None (then batch statistics in eval too). Returns y [B, N] in x's dtype."""
    M = scenario_weight.shape[0]
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    scale = (weight * scenario_weight).to(acc)
    shift = (bias + scenario_bias).to(acc)
    use_batch = training or running_mean is None
    y = torch.zeros_like(xa)
    for m in range(M):
        mask = (scenario == m).unsqueeze(1)
        if use_batch:
            n = mask.sum().to(acc)
            mean = torch.where(mask, xa, 0).sum(0) / n.clamp_min(1)
            var = torch.where(mask, (xa - mean) ** 2, 0).sum(0) / n.clamp_min(1)
            if training and running_mean is not None:
                with torch.no_grad():  # no host read of n: torch.where on the count
                    rm, rv = running_mean[m], running_var[m]
                    rm.copy_(torch.where(n >= 1, rm + momentum * (mean.detach().to(rm.dtype) - rm), rm))
                    unbiased = var.detach() * n / (n - 1).clamp_min(1)
                    rv.copy_(torch.where(n >= 2, rv + momentum * (unbiased.to(rv.dtype) - rv), rv))
        else:
            mean, var = running_mean[m].to(acc), running_var[m].to(acc)
        y = torch.where(mask, (xa - mean) * torch.rsqrt(var + eps) * scale[m] + shift[m], y)
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------ kernel table
# The signatures of torch.ops.saml_C.pn_* (csrc/registry.cpp), in plain PyTorch (index_add, no loop over M).

def stats_kernel(x: Tensor, scenario: Tensor, num_scenarios: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [M, N], biased var [M, N] in the accumulation dtype, count [M] int64); 0 for empty scenarios."""
    acc = acc_dtype(x.dtype)
    s = scenario.long()
    xa = x.to(acc)
    count = torch.bincount(s, minlength=num_scenarios)[:num_scenarios] if s.numel() else \
        torch.zeros(num_scenarios, dtype=torch.int64, device=x.device)
    n = count.clamp_min(1).to(acc).unsqueeze(1)
    mean = xa.new_zeros(num_scenarios, x.shape[1]).index_add_(0, s, xa) / n
    var = xa.new_zeros(num_scenarios, x.shape[1]).index_add_(0, s, (xa - mean[s]) ** 2) / n
    return mean, var, count


def forward_kernel(x: Tensor, scenario: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """y [B, N] = (x - mean[s]) rstd[s] scale[s] + shift[s], in x's dtype."""
    s = scenario.long()
    acc = mean.dtype
    return ((x.to(acc) - mean[s]) * rstd[s] * scale[s].to(acc) + shift[s].to(acc)).to(x.dtype)


def backward_kernel(dy: Tensor, x: Tensor, scenario: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                    count: Tensor, batch_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [B, N] x dtype, dscale [M, N], dshift [M, N] in scale's dtype); see the module docstring."""
    s = scenario.long()
    acc = mean.dtype
    M = scale.shape[0]
    dya = dy.to(acc)
    xhat = (x.to(acc) - mean[s]) * rstd[s]
    dscale = dya.new_zeros(M, x.shape[1]).index_add_(0, s, dya * xhat)
    dshift = dya.new_zeros(M, x.shape[1]).index_add_(0, s, dya)
    g = scale.to(acc)[s] * rstd[s]
    if batch_stats:
        n = count.clamp_min(1).to(acc).unsqueeze(1)[s]
        dx = g * (dya - (dshift[s] + xhat * dscale[s]) / n)
    else:
        dx = g * dya
    return dx.to(x.dtype), dscale.to(scale.dtype), dshift.to(scale.dtype)


KERNELS = {"partitioned_norm": {"stats": stats_kernel, "forward": forward_kernel, "backward": backward_kernel}}
