"""The activations of the branch GEMMs as the ops' Python side uses them (codes in saml_kernels/_codes.py).

Every backend's forward applies ``act(z)`` inside its kernel; the backward of the activation,
``dz = dy * act'(z)``, is done here in PyTorch for the backends and paths that do not fuse it."""
from __future__ import annotations

import math

import torch

from .._codes import ACTIVATIONS, LEAKY_RELU_SLOPE

NONE, RELU, LEAKY_RELU, GELU, SILU = (ACTIVATIONS[n] for n in ("none", "relu", "leaky_relu", "gelu", "silu"))
#: activations whose backward needs the pre-activation z (relu/leaky_relu recover act'(z) from y = act(z))
NEEDS_PREACTIVATION = (GELU, SILU)


def needs_preactivation(code: int) -> bool:
    """Whether the backward of activation ``code`` needs z (gelu, silu); relu/leaky_relu recover act' from y."""
    return code in NEEDS_PREACTIVATION


def activation_backward(dy: torch.Tensor, saved: torch.Tensor, code: int) -> torch.Tensor:
    """dz = dy * act'(z), elementwise, same shape as dy.

    ``saved`` is y for relu/leaky_relu (sign(y) = sign(z); act'(0) = 0 for relu and the slope for leaky_relu, as
    torch), z for gelu (exact erf form: act'(z) = Phi(z) + z phi(z)) and silu (act'(z) = sig(z) (1 + z (1 -
    sig(z)))); unused for none. Computed in float32 (float64 for float64) and returned in dy's dtype."""
    if code == NONE:
        return dy
    if code == RELU:
        return torch.where(saved > 0, dy, torch.zeros((), dtype=dy.dtype, device=dy.device))
    if code == LEAKY_RELU:
        return torch.where(saved > 0, dy, dy * LEAKY_RELU_SLOPE)
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    z = saved.to(acc)
    if code == GELU:
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return (dy.to(acc) * (cdf + z * pdf)).to(dy.dtype)
    if code == SILU:
        sig = torch.sigmoid(z)
        return (dy.to(acc) * (sig * (1.0 + z * (1.0 - sig)))).to(dy.dtype)
    raise ValueError(f"unknown activation code {code}")
