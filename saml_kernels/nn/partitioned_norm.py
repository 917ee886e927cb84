"""``PartitionedNorm``: STAR's scenario-wise batch normalisation (docs/design.md section 9)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _backend
from .._args import size_arg
from ..ops.partitioned_norm import partitioned_norm


def check_norm_args(who: str, eps, momentum) -> tuple[float, float]:
    """(eps, momentum) as floats; eps > 0 finite, momentum in [0, 1] (TypeError / ValueError naming the value)."""
    out = []
    for name, v, ok, want in (("eps", eps, lambda f: 0 < f < float("inf"), "> 0 and finite"),
                              ("momentum", momentum, lambda f: 0 <= f <= 1, "in [0, 1]")):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{who}: {name} must be a float {want}, got {v!r} ({type(v).__name__})")
        if not ok(float(v)):
            raise ValueError(f"{who}: {name} must be {want}, got {v!r}")
        out.append(float(v))
    return out[0], out[1]


class PartitionedNorm(nn.Module):
    """Batch normalisation with statistics per scenario within a mixed batch (STAR's partitioned normalisation):

        y_b = (x_b - mean_{s_b}) / sqrt(var_{s_b} + eps) * (gamma * gamma_{s_b}) + (beta + beta_{s_b})

    Training: mean / biased var over the batch rows of each scenario (one segmented-reduction kernel, rows in any
    order), running statistics updated per scenario with ``momentum`` (as ``nn.BatchNorm1d``; unbiased variance).
    Eval: the running statistics. A scenario with one row in the batch normalises it to 0 (y = shift) and updates
    only its running mean; a scenario with no row keeps its running statistics.

    Args:
        num_features: N. num_scenarios: M. eps: added to the variance. momentum: of the running statistics.
        track_running_stats: keep running statistics (else batch statistics in eval too).
        backend: forced backend of the op. device, dtype: factory arguments.

    Parameters: ``weight [N]`` (gamma, 1), ``bias [N]`` (beta, 0), ``scenario_weight [M, N]`` (gamma_m, 1),
    ``scenario_bias [M, N]`` (beta_m, 0). Buffers: ``running_mean [M, N]`` (0), ``running_var [M, N]`` (1), float32
    (float64 for a float64 module).

    forward(x [B, N], scenario [B] int32/int64) -> [B, N].
    """

    def __init__(self, num_features: int, num_scenarios: int, eps: float = 1e-5, momentum: float = 0.1,
                 track_running_stats: bool = True, *, device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        who = type(self).__name__
        N, M = size_arg(who, "num_features", num_features), size_arg(who, "num_scenarios", num_scenarios)
        self.eps, self.momentum = check_norm_args(who, eps, momentum)
        if backend is not None:
            _backend.check_name(backend, f"{who}(backend=...)")
        self.num_features, self.num_scenarios, self.backend = N, M, backend
        fk = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(N, **fk))
        self.bias = nn.Parameter(torch.empty(N, **fk))
        self.scenario_weight = nn.Parameter(torch.empty(M, N, **fk))
        self.scenario_bias = nn.Parameter(torch.empty(M, N, **fk))
        self.track_running_stats = bool(track_running_stats)
        stat = dict(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(M, N, **stat))
            self.register_buffer("running_var", torch.ones(M, N, **stat))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.reset_running_stats()
        for p in (self.weight, self.scenario_weight):
            nn.init.ones_(p)
        for p in (self.bias, self.scenario_bias):
            nn.init.zeros_(p)

    def forward(self, x: Tensor, scenario: Tensor) -> Tensor:
        return partitioned_norm(x, scenario, self.weight, self.bias, self.scenario_weight, self.scenario_bias,
                                running_mean=self.running_mean, running_var=self.running_var,
                                training=self.training, momentum=self.momentum, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, num_scenarios={self.num_scenarios}, eps={self.eps}, momentum={self.momentum}, "
             f"track_running_stats={self.track_running_stats}")
        return s + (f", backend={self.backend!r}" if self.backend else "")
