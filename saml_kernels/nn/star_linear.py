"""``StarLinear``: STAR's star-topology fully connected layer on the grouped GEMM (docs/design.md section 9)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _backend
from .._args import size_arg
from ..ops.mbranch_linear import ACTIVATIONS, mbranch_linear


class StarLinear(nn.Module):
    """One linear layer per scenario whose weight is the scenario's own weight times a shared one:

        y_b = act(x_b (W_{s_b} * W_shared) + b_{s_b} + b_shared)        (* elementwise)

    Each row goes through its own scenario only (the grouped GEMM of ``mbranch_linear`` route "own", rows in any
    order). The effective weights W_eff = W_m * W_shared [M, K, N] and biases are formed in autograd (M K N values,
    small next to B K N), so the backward is the grouped GEMM's dW_eff (rows of scenario m only) followed by
    dW_m = dW_eff_m * W_shared and dW_shared = sum_m dW_eff_m * W_m: no [M, B, N] intermediate. W_shared and
    b_shared learn from every sample, W_m and b_m only from scenario m's samples.

    Args:
        in_features: K. out_features: N. num_branches: M. bias: learn b_m and b_shared.
        activation: None | "relu" | "leaky_relu" | "gelu" | "silu" (fused into the GEMM).
        backend: forced backend of the GEMM (None: automatic). device, dtype: factory arguments.

    Parameters (STAR's names): ``shared_weight [K, N]``, ``shared_bias [N]``, ``weight [M, K, N]``, ``bias [M, N]``.
    Initialisation: the shared part as ``nn.Linear(K, N)`` (U(-1/sqrt(K), 1/sqrt(K))), the scenario weights 1 and
    scenario biases 0, so every scenario starts from the shared layer.

    forward(x [B, K], scenario [B] int32/int64) -> [B, N].
    """

    def __init__(self, in_features: int, out_features: int, num_branches: int, bias: bool = True,
                 activation: Optional[str] = None, *, device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        who = type(self).__name__
        K, N, M = (size_arg(who, n, v) for n, v in (("in_features", in_features), ("out_features", out_features),
                                                    ("num_branches", num_branches)))
        if activation not in ACTIVATIONS:
            raise ValueError(f"{who}: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if backend is not None:
            _backend.check_name(backend, f"{who}(backend=...)")
        self.in_features, self.out_features, self.num_branches = K, N, M
        self.activation, self.backend = activation, backend
        fk = dict(device=device, dtype=dtype)
        self.shared_weight = nn.Parameter(torch.empty(K, N, **fk))
        self.weight = nn.Parameter(torch.empty(M, K, N, **fk))
        if bias:
            self.shared_bias = nn.Parameter(torch.empty(N, **fk))
            self.bias = nn.Parameter(torch.empty(M, N, **fk))
        else:
            self.register_parameter("shared_bias", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Shared part as nn.Linear(K, N); scenario weights 1, scenario biases 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.shared_weight, -bound, bound)
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.uniform_(self.shared_bias, -bound, bound)
            nn.init.zeros_(self.bias)

    def effective_parameters(self) -> tuple[Tensor, Optional[Tensor]]:
        """(W_m * W_shared [M, K, N], b_m + b_shared [M, N] or None), differentiable."""
        b = None if self.bias is None else self.bias + self.shared_bias
        return self.weight * self.shared_weight, b

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        w, b = self.effective_parameters()
        return mbranch_linear(x, w, b, scenario, route="own", activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, num_branches={self.num_branches}, "
             f"bias={self.bias is not None}, activation={self.activation!r}")
        return s + (f", backend={self.backend!r}" if self.backend else "")
