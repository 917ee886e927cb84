"""``MultiBranchLinear``: M scenario branches of a linear layer, routed by scenario (docs/design.md section 1,
items 4 and 6)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _backend

from ..ops.mbranch_linear import ACTIVATIONS, GRAD_MASKS, ROUTES, mbranch_linear
from .._args import size_arg


class MultiBranchLinear(nn.Module):
    """One linear layer per scenario branch, ``y = act([x ; aux] @ [W_m ; Wa_m] + bias_m)``.

    Args:
        in_features: K. out_features: N. num_branches: M (one branch per scenario).
        aux_features: Ka, width of the optional second input (the auxiliary network's hidden layer); 0 = none.
        bias: learn bias [M, N]. activation: None | "relu" | "leaky_relu" | "gelu" | "silu" (fused).
        route: "own" (y [B, N], each sample through its own branch) | "all" (y [M, B, N]).
        grad_mask: "own" | "params" | "none" (route "all" only; see ``saml_kernels.mbranch_linear``).
        Sizes (K, N, M >= 1; Ka >= 0) take any integral value (int, numpy integer, 0-dim integer tensor), not
        bool: anything else raises TypeError / ValueError naming the argument and the value.

    Parameters: ``weight [M, K, N]``, ``bias [M, N]``, ``aux_weight [M, Ka, N]``. Each branch is initialised
    like ``nn.Linear(K + Ka, N)`` on the concatenated input: W, Wa and bias ~ U(-1/sqrt(K + Ka), 1/sqrt(K + Ka))
    (kaiming_uniform(a=sqrt(5)) of the branch's [N, K + Ka] weight; 1/sqrt(K) without aux).

    forward(x [B, K] or [M, B, K], scenario [B] int, aux [B, Ka] or None) -> [B, N] or [M, B, N].

    Twin: ``saml_kernels.reference.layers.RefMultiBranchLinear`` (the same arguments but ``backend``, the same
    parameters).
    """

    def __init__(self, in_features: int, out_features: int, num_branches: int, aux_features: int = 0,
                 bias: bool = True, activation: Optional[str] = None, route: str = "own", grad_mask: str = "own",
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        # sizes: any integral value (numpy ints, 0-dim int tensors), never bool; stored as Python ints
        sizes = {"in_features": in_features, "out_features": out_features, "num_branches": num_branches}
        in_features, out_features, num_branches = (size_arg("MultiBranchLinear", n, v) for n, v in sizes.items())
        aux_features = size_arg("MultiBranchLinear", "aux_features", aux_features, minimum=0)
        if route not in ROUTES:
            raise ValueError(f"MultiBranchLinear: route must be one of {ROUTES}, got {route!r}")
        if grad_mask not in GRAD_MASKS:
            raise ValueError(f"MultiBranchLinear: grad_mask must be one of {tuple(GRAD_MASKS)}, got {grad_mask!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MultiBranchLinear: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        f = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.num_branches = in_features, out_features, num_branches
        self.aux_features = aux_features
        if backend is not None:  # a bad name fails here, not at the first forward
            _backend.check_name(backend, "MultiBranchLinear(backend=...)")
        self.activation, self.route, self.grad_mask, self.backend = activation, route, grad_mask, backend
        self.weight = nn.Parameter(torch.empty(num_branches, in_features, out_features, **f))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_branches, out_features, **f))
        if aux_features:
            self.aux_weight = nn.Parameter(torch.empty(num_branches, aux_features, out_features, **f))
        else:
            self.register_parameter("aux_weight", None)
        if not bias:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear(K + Ka, N)'s initialisation for every branch: kaiming_uniform(a=sqrt(5)) on the branch's
        [N, K + Ka] weight is U(-1/sqrt(K + Ka), 1/sqrt(K + Ka)) for W and Wa alike; bias the same bound."""
        bound = 1.0 / math.sqrt(self.in_features + self.aux_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.aux_weight is not None:
            nn.init.uniform_(self.aux_weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, scenario: Tensor, aux: Optional[Tensor] = None) -> Tensor:
        if (aux is None) != (self.aux_weight is None):
            raise ValueError(f"MultiBranchLinear: aux_features={self.aux_features}, so aux must be "
                             f"{'given' if self.aux_weight is not None else 'None'}")
        return mbranch_linear(x, self.weight, self.bias, scenario, route=self.route, activation=self.activation,
                              grad_mask=self.grad_mask, aux=aux, aux_weight=self.aux_weight, backend=self.backend)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, num_branches={self.num_branches}"
             f", aux_features={self.aux_features}, bias={self.bias is not None}, activation={self.activation!r}"
             f", route={self.route!r}, grad_mask={self.grad_mask!r}")
        return s + (f", backend={self.backend!r}" if self.backend else "")
