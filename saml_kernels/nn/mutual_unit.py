"""``MutualUnit``: the SAML mutual layer (docs/design.md section 1, item 5): all branches of a linear layer mixed by the
mutual unit, the fused ``saml_kernels.mutual_linear`` for a shared input."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _backend

from ..ops.mbranch_linear import mbranch_linear
from ..ops.mutual_linear import ACTIVATIONS, mutual_linear
from ..ops.mutual_unit import SIMILARITY, check_temperature, mutual_unit
from .._args import size_arg
from .multi_branch_linear import MultiBranchLinear

#: ``MutualUnit(save_branch_outputs=None)`` keeps the branch outputs h [M, B, N] for the backward up to this many
#: elements (a small batch), and recomputes them above it
SAVE_AUTO_ELEMENTS = 1 << 16


class MutualUnit(nn.Module):
    """All M branches of a linear layer for every sample, mixed by the mutual unit:

        h[m, b] = act(x_{m,b} W_m + aux_b Wa_m + bias_m),  a[b] = softmax_m(sim(h[s_b, b], h[m, b]) / temperature),
        out[b]  = sum_m a[b, m] h[m, b]                                                    -> [B, N]

    with x_{m,b} = x[b] for a shared input x [B, K] and x[m, b] for a per-branch input x [M, B, K] (the output of
    a route-"all" layer below). Equals ``MultiBranchLinear(route="all", grad_mask="own")`` followed by
    ``saml_kernels.mutual_unit`` (same values and gradients: branch m's parameters learn only from scenario-m
    samples, and x_{m,b} only through the own branch m = s_b). A shared input runs the fused
    ``saml_kernels.mutual_linear`` (no [M, B, N] branch outputs in memory); a per-branch input runs that pair of
    ops (the [M, B, N] branch outputs are built).

    Args:
        in_features: K. out_features: N. num_branches: M. aux_features: Ka (0 = no aux input).
        activation: None | "relu" | "leaky_relu" | "gelu" | "silu". temperature: > 0.
        similarity: "cosine" | "dot". bias: learn bias [M, N].
        save_branch_outputs (shared input): False recomputes the branch outputs in the backward (no M x B x N
            memory, one more all-branch GEMM); True keeps them from the forward (a faster backward, M*B*N more
            memory; measured in benchmarks/results/bench_mutual_*.md, "ours_saved"). None (the default) keeps them
            when they are small, M*B*N <= ``SAVE_AUTO_ELEMENTS`` (2^16: e.g. M = 4, N = 256 up to B = 64), where
            the recompute's GEMM and weight packing cost more than the memory (at B = 64 about 0.1 ms of a 1 ms
            fused forward + backward on the 2-core CPU), and recomputes them otherwise.
        backend: force a backend (None = automatic).
        Sizes (K, N, M >= 1; Ka >= 0) take any integral value (int, numpy integer, 0-dim integer tensor), not
        bool: anything else raises TypeError / ValueError naming the argument and the value.

    Parameters have the names, shapes and initialisation of ``MultiBranchLinear`` (``weight [M, K, N]``,
    ``bias [M, N]``, ``aux_weight [M, Ka, N]``; each branch like ``nn.Linear(K + Ka, N)``), so a state_dict moves
    between the two unchanged.

    forward(x [B, K] or [M, B, K], scenario [B] int in [0, M), aux [B, Ka] or None) -> [B, N]. The op checks
    apply (a wrong shape, dtype or device, or a scenario outside [0, M), raises naming the argument).

    Twin: ``saml_kernels.reference.layers.RefMutualUnit`` (the same arguments but ``save_branch_outputs`` and
    ``backend``, the same parameters, both input forms).
    """

    def __init__(self, in_features: int, out_features: int, num_branches: int, aux_features: int = 0,
                 activation: Optional[str] = "relu", temperature: float = 1.0, similarity: str = "cosine",
                 bias: bool = True, device=None, dtype=None, save_branch_outputs: Optional[bool] = None,
                 backend: Optional[str] = None):
        super().__init__()
        # sizes: any integral value (numpy ints, 0-dim int tensors), never bool; stored as Python ints
        sizes = {"in_features": in_features, "out_features": out_features, "num_branches": num_branches}
        in_features, out_features, num_branches = (size_arg("MutualUnit", n, v) for n, v in sizes.items())
        aux_features = size_arg("MutualUnit", "aux_features", aux_features, minimum=0)
        if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
            raise ValueError(f"MutualUnit: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if not isinstance(similarity, str) or similarity not in SIMILARITY:
            raise ValueError(f"MutualUnit: similarity must be one of {tuple(SIMILARITY)}, got {similarity!r}")
        self.temperature = check_temperature("MutualUnit", temperature)
        f = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.num_branches = in_features, out_features, num_branches
        self.aux_features = aux_features
        self.activation, self.similarity = activation, similarity
        if backend is not None:  # a bad name fails here, not at the first forward
            _backend.check_name(backend, "MutualUnit(backend=...)")
        if save_branch_outputs is not None and not isinstance(save_branch_outputs, bool):
            raise TypeError(f"MutualUnit: save_branch_outputs must be None, True or False, got {save_branch_outputs!r}")
        self.save_branch_outputs, self.backend = save_branch_outputs, backend
        self.weight = nn.Parameter(torch.empty(num_branches, in_features, out_features, **f))
        # registration order = MultiBranchLinear's (weight, bias, aux_weight), so state_dicts list alike
        self.register_parameter("bias", nn.Parameter(torch.empty(num_branches, out_features, **f)) if bias else None)
        self.register_parameter("aux_weight", nn.Parameter(torch.empty(num_branches, aux_features, out_features, **f))
                                if aux_features else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MultiBranchLinear's initialisation (nn.Linear(K + Ka, N) per branch): U(-1/sqrt(K+Ka), 1/sqrt(K+Ka))."""
        MultiBranchLinear.reset_parameters(self)

    def forward(self, x: Tensor, scenario: Tensor, aux: Optional[Tensor] = None) -> Tensor:
        if (aux is None) != (self.aux_weight is None):
            raise ValueError(f"MutualUnit: aux_features={self.aux_features}, so aux must be "
                             f"{'given' if self.aux_weight is not None else 'None'}")
        if isinstance(x, Tensor) and x.dim() == 3:
            h = mbranch_linear(x, self.weight, self.bias, scenario, route="all", activation=self.activation,
                               grad_mask="own", aux=aux, aux_weight=self.aux_weight, backend=self.backend)
            return mutual_unit(h, scenario, temperature=self.temperature, similarity=self.similarity,
                               backend=self.backend)
        save = self.save_branch_outputs
        if save is None:
            # a symbolic batch (torch.export, dynamic shapes) recomputes: deciding would put a guard on B
            B = x.shape[0] if isinstance(x, Tensor) else None
            save = type(B) is int and self.num_branches * B * self.out_features <= SAVE_AUTO_ELEMENTS
        return mutual_linear(x, self.weight, self.bias, scenario, activation=self.activation,
                             temperature=self.temperature, similarity=self.similarity, aux=aux,
                             aux_weight=self.aux_weight, save_branch_outputs=bool(save), backend=self.backend)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, num_branches={self.num_branches}"
             f", aux_features={self.aux_features}, bias={self.bias is not None}, activation={self.activation!r}"
             f", temperature={self.temperature}, similarity={self.similarity!r}")
        if self.save_branch_outputs is not None:
            s += f", save_branch_outputs={self.save_branch_outputs}"
        return s + (f", backend={self.backend!r}" if self.backend else "")
