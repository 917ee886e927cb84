"""Plain-PyTorch M-branch linear layer: the oracle of the tests and the eager baseline of the benchmarks.

Two entry points:
- ``mbranch_linear_reference``: the public signature of ``saml_kernels.mbranch_linear``, differentiable through
  ordinary autograd (scenario gradient masking by ``torch.where(mask, y, y.detach())``);
- ``KERNELS``: the ``reference`` backend's kernel table (``grouped_forward_kernel`` ... with the arguments and
  results of ``torch.ops.saml_C.mbl_*``, see csrc/registry.cpp).

Math (W [M, K, N], Wa [M, Ka, N], bias [M, N], s_b the scenario of sample b):

    z[m, b] = x_b W_m + aux_b Wa_m + bias_m        (x_b = x[b] shared, or x[m, b] per branch)
    route "all": y[m, b] = act(z[m, b])  -> [M, B, N]
    route "own": y[b]    = act(z[s_b, b]) -> [B, N]
"""
from __future__ import annotations

import torch

from .._codes import ACTIVATIONS, LEAKY_RELU_SLOPE
from ..ops._activation import GELU, LEAKY_RELU, NONE, RELU, SILU, activation_backward, needs_preactivation  # noqa: F401

LEAKY_SLOPE = LEAKY_RELU_SLOPE


def activate(z: torch.Tensor, code: int) -> torch.Tensor:
    """act(z) for an activation code (0 none, 1 relu, 2 leaky_relu(0.01), 3 exact-erf gelu, 4 silu)."""
    if code == NONE:
        return z
    if code == RELU:
        return torch.relu(z)
    if code == LEAKY_RELU:
        return torch.nn.functional.leaky_relu(z, LEAKY_RELU_SLOPE)
    if code == GELU:
        return torch.nn.functional.gelu(z)
    if code == SILU:
        return torch.nn.functional.silu(z)
    raise ValueError(f"unknown activation code {code}")


# ------------------------------------------------------------------------------------------------ public

def _all_branches(x, weight, bias, aux, aux_weight):
    """z [M, B, N] for every branch: x [B, K] broadcasts against weight [M, K, N], x [M, B, K] is batched."""
    z = torch.matmul(x, weight)
    if aux is not None:
        z = z + torch.matmul(aux, aux_weight)
    if bias is not None:
        z = z + bias.unsqueeze(1)
    return z


def mbranch_linear_reference(x, weight, bias, scenario, *, route="own", activation=None, grad_mask="own",
                             aux=None, aux_weight=None):
    """Differentiable reference of ``saml_kernels.mbranch_linear`` (no argument validation).

    Args:
        x: [B, K] shared by all branches, or [M, B, K] one input per branch.
        weight: [M, K, N]; bias: [M, N] or None; aux: [B, Ka] or None; aux_weight: [M, Ka, N] or None.
        scenario: [B] int32/int64 in [0, M).
        route: "all" -> y [M, B, N] (every branch), "own" -> y [B, N] (y[b] = branch s_b's output).
        grad_mask (route "all"): "own" -> the gradient of y[m, b] reaches nothing unless m == s_b;
            "params" -> W/bias/Wa of branch m only from scenario-m samples, x/aux from every branch;
            "none" -> ordinary dense gradients. Route "own" is masked by construction.
        activation: None | "relu" | "leaky_relu" | "gelu" | "silu".

    Computes every branch on the whole batch (M times the FLOPs of route "own"): simple, obviously correct.
    """
    act = ACTIVATIONS[activation]
    s = scenario.long()
    B = s.shape[0]
    M = weight.shape[0]
    ar = torch.arange(B, device=s.device)
    if route == "own":
        return activate(_all_branches(x, weight, bias, aux, aux_weight), act)[s, ar]
    y = activate(_all_branches(x, weight, bias, aux, aux_weight), act)
    if grad_mask == "none":
        return y
    mask = (torch.arange(M, device=s.device).unsqueeze(1) == s.unsqueeze(0)).unsqueeze(-1)  # [M, B, 1]
    if grad_mask == "own":
        return torch.where(mask, y, y.detach())
    if grad_mask == "params":
        # Off-own entries: the same values, but differentiable only w.r.t. the inputs (x, aux).
        detach = (lambda t: None if t is None else t.detach())
        y_inputs_only = activate(_all_branches(x, weight.detach(), detach(bias), aux, detach(aux_weight)), act)
        return torch.where(mask, y, y_inputs_only)
    raise ValueError(f"unknown grad_mask {grad_mask!r}")


# ------------------------------------------------------------------------------------------------ kernels

def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _groups(scenario, M):
    """Row indices of each scenario (host loop; the reference backend may synchronise)."""
    s = scenario.long()
    return [(m, (s == m).nonzero().squeeze(1)) for m in range(M)]


def grouped_forward_kernel(x, weight, bias, aux, aux_weight, scenario, activation):
    """Contract of ``saml_C.mbl_grouped_forward``: (y [B, N], z [B, N] for gelu/silu else empty)."""
    acc = _acc(x.dtype)
    B, M, N = x.shape[0], weight.shape[0], weight.shape[2]
    z = torch.zeros(B, N, dtype=acc, device=x.device)
    for m, rows in _groups(scenario, M):
        if rows.numel() == 0:
            continue
        zm = x[rows].to(acc) @ weight[m].to(acc)
        if aux is not None:
            zm = zm + aux[rows].to(acc) @ aux_weight[m].to(acc)
        if bias is not None:
            zm = zm + bias[m].to(acc)
        z[rows] = zm
    if needs_preactivation(activation):
        # act of the rounded z, as the C++ kernel computes it (the backward sees the same z).
        zt = z.to(x.dtype)
        return activate(zt, activation), zt
    return activate(z, activation).to(x.dtype), x.new_empty(0)


def all_forward_kernel(x, weight, bias, aux, aux_weight, activation):
    """Contract of ``saml_C.mbl_all_forward``: (y [M, B, N], z or empty).

    Layout: for a shared x [B, K], y is the [M, B, N] view (strides (N, M*N, 1)) of the [B, M*N] output of one
    GEMM against the packed weights [K, M*N]; for a per-branch x [M, B, K], y is contiguous."""
    acc = _acc(x.dtype)
    M, K, N = weight.shape
    if x.dim() == 2:
        B = x.shape[0]
        z = x.to(acc) @ weight.to(acc).permute(1, 0, 2).reshape(K, M * N)
        if aux is not None:
            z = z + aux.to(acc) @ aux_weight.to(acc).permute(1, 0, 2).reshape(-1, M * N)
        if bias is not None:
            z = z + bias.to(acc).reshape(M * N)
        z = z.view(B, M, N).permute(1, 0, 2)
    else:
        z = torch.bmm(x.to(acc), weight.to(acc))
        if aux is not None:
            z = z + torch.matmul(aux.to(acc), aux_weight.to(acc))
        if bias is not None:
            z = z + bias.to(acc).unsqueeze(1)
    if needs_preactivation(activation):
        zt = z.to(x.dtype)
        return activate(zt, activation), zt
    return activate(z, activation).to(x.dtype), x.new_empty(0)


def grouped_backward_kernel(dz, x, weight, aux, aux_weight, scenario, need_dx, need_dweight, need_dbias,
                            need_daux, need_daux_weight):
    """Contract of ``saml_C.mbl_grouped_backward``: (dx, dW, db, daux, dWa), empty where not needed."""
    acc = _acc(x.dtype)
    M, K, N = weight.shape
    B = x.shape[0]
    dev = x.device
    dx = torch.zeros(B, K, dtype=acc, device=dev) if need_dx else None
    dW = torch.zeros(M, K, N, dtype=acc, device=dev) if need_dweight else None
    db = torch.zeros(M, N, dtype=acc, device=dev) if need_dbias else None
    Ka = aux.shape[1] if aux is not None else 0
    daux = torch.zeros(B, Ka, dtype=acc, device=dev) if (need_daux and aux is not None) else None
    dWa = torch.zeros(M, Ka, N, dtype=acc, device=dev) if (need_daux_weight and aux is not None) else None
    for m, rows in _groups(scenario, M):
        if rows.numel() == 0:
            continue
        dzm = dz[rows].to(acc)
        if dx is not None:
            dx[rows] = dzm @ weight[m].to(acc).t()
        if dW is not None:
            dW[m] = x[rows].to(acc).t() @ dzm
        if db is not None:
            db[m] = dzm.sum(0)
        if daux is not None:
            daux[rows] = dzm @ aux_weight[m].to(acc).t()
        if dWa is not None:
            dWa[m] = aux[rows].to(acc).t() @ dzm
    return tuple(x.new_empty(0) if t is None else t.to(x.dtype) for t in (dx, dW, db, daux, dWa))


def grouped_backward_act_kernel(dy, saved, x, weight, aux, aux_weight, scenario, activation, need_dx, need_dweight,
                                need_dbias, need_daux, need_daux_weight):
    """Contract of ``saml_C.mbl_grouped_backward_act``: the own-rows backward with the activation backward (codes
    0-2) and the own-row pick of a [M, B, *] dy / saved / x folded in; dx has x's shape (zero off the own rows).
    An out-of-range scenario (unchecked input) picks a clamped row: grouped_backward_kernel leaves it out."""
    s = scenario.long().clamp(0, max(weight.shape[0] - 1, 0))
    ar = torch.arange(s.numel(), device=s.device)
    if dy.dim() == 3:
        dy = dy[s, ar]
    if saved.dim() == 3:  # with a [M, B, N] dy, or the branch outputs [M, B, N] for a [B, N] dy
        saved = saved[s, ar]
    dz = activation_backward(dy, saved, activation)
    x_own = x[s, ar] if x.dim() == 3 else x
    dx, dW, db, daux, dWa = grouped_backward_kernel(dz, x_own, weight, aux, aux_weight, scenario, need_dx,
                                                    need_dweight, need_dbias, need_daux, need_daux_weight)
    if need_dx and x.dim() == 3:
        full = x.new_zeros(x.shape)
        full[s, ar] = dx
        dx = full
    return dx, dW, db, daux, dWa


KERNELS = {"mbranch_linear": {"grouped_forward": grouped_forward_kernel, "all_forward": all_forward_kernel,
                              "grouped_backward": grouped_backward_kernel,
                              "grouped_backward_act": grouped_backward_act_kernel}}
