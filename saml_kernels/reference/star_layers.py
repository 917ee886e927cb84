"""Plain-PyTorch twins of ``nn.StarLinear`` and ``nn.PartitionedNorm``, written the way public STAR code writes them
(a loop over scenarios on the whole batch, rows picked with ``torch.where``). Same constructor arguments (less
``backend``) and parameter names as the accelerated layers, so their state_dicts interchange."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .._args import size_arg
from .layers import _ACT
from .partitioned_norm import partitioned_norm_reference


class RefStarLinear(nn.Module):
    """Reference StarLinear: y_b = act(x_b (W_{s_b} * W_shared) + b_{s_b} + b_shared), every scenario's product
    on the full batch (M x the needed FLOPs, as public code). Parameters ``shared_weight [K, N]``,
    ``shared_bias [N]``, ``weight [M, K, N]``, ``bias [M, N]``."""

    def __init__(self, in_features: int, out_features: int, num_branches: int, bias: bool = True,
                 activation: Optional[str] = None, *, device=None, dtype=None):
        super().__init__()
        who = type(self).__name__
        K, N, M = (size_arg(who, n, v) for n, v in (("in_features", in_features), ("out_features", out_features),
                                                    ("num_branches", num_branches)))
        if activation not in _ACT:
            raise ValueError(f"{who}: activation must be one of {tuple(_ACT)}, got {activation!r}")
        self.in_features, self.out_features, self.num_branches, self.activation = K, N, M, activation
        fk = dict(device=device, dtype=dtype)
        self.shared_weight = nn.Parameter(torch.empty(K, N, **fk))
        self.weight = nn.Parameter(torch.empty(M, K, N, **fk))
        self.shared_bias = nn.Parameter(torch.empty(N, **fk)) if bias else None
        self.bias = nn.Parameter(torch.empty(M, N, **fk)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.shared_weight, -bound, bound)
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.uniform_(self.shared_bias, -bound, bound)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        out = None
        for m in range(self.num_branches):
            z = x @ (self.weight[m] * self.shared_weight)
            if self.bias is not None:
                z = z + (self.bias[m] + self.shared_bias)
            out = z if out is None else torch.where((scenario == m).unsqueeze(1), z, out)
        return _ACT[self.activation](out)


class RefPartitionedNorm(nn.Module):
    """Reference PartitionedNorm (``partitioned_norm_reference``: a masked loop over scenarios). Parameters
    ``weight [N]``, ``bias [N]``, ``scenario_weight [M, N]``, ``scenario_bias [M, N]``; buffers ``running_mean``,
    ``running_var [M, N]``."""

    def __init__(self, num_features: int, num_scenarios: int, eps: float = 1e-5, momentum: float = 0.1,
                 track_running_stats: bool = True, *, device=None, dtype=None):
        super().__init__()
        who = type(self).__name__
        N, M = size_arg(who, "num_features", num_features), size_arg(who, "num_scenarios", num_scenarios)
        self.num_features, self.num_scenarios, self.eps, self.momentum = N, M, float(eps), float(momentum)
        fk = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(N, **fk))
        self.bias = nn.Parameter(torch.zeros(N, **fk))
        self.scenario_weight = nn.Parameter(torch.ones(M, N, **fk))
        self.scenario_bias = nn.Parameter(torch.zeros(M, N, **fk))
        self.track_running_stats = bool(track_running_stats)
        stat = dict(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        self.register_buffer("running_mean", torch.zeros(M, N, **stat) if track_running_stats else None)
        self.register_buffer("running_var", torch.ones(M, N, **stat) if track_running_stats else None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
        for p in (self.weight, self.scenario_weight):
            nn.init.ones_(p)
        for p in (self.bias, self.scenario_bias):
            nn.init.zeros_(p)

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        return partitioned_norm_reference(x, scenario, self.weight, self.bias, self.scenario_weight,
                                          self.scenario_bias, running_mean=self.running_mean,
                                          running_var=self.running_var, training=self.training,
                                          momentum=self.momentum, eps=self.eps)
