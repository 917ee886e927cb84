"""Plain-PyTorch twins of the ``saml_kernels.nn`` layers, written the way public multi-scenario code writes them
(a loop over scenarios on the full batch, rows picked with ``torch.where``; the HMoE stop-gradient by
``torch.where(own, y, y.detach())``). Each twin takes the constructor arguments of its kernel layer (same names,
same order; the kernel-only options such as ``backend=`` are the kernel layer's alone) and holds the same parameter
names, so a state_dict moves between them unchanged. They are the layers of ``REFERENCE_LAYERS``, from which
:class:`saml_kernels.reference.SAMLReference` is built.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .._args import size_arg  # noqa: F401  (re-exported)
from .._codes import ACTIVATIONS, SIMILARITIES
from .mutual_unit import mutual_unit_reference
from ..ops.scenario_hash import check_scenario_rows
from .scenario_embedding_bag import scenario_embedding_bag_reference

_ACT = {None: lambda z: z, "none": lambda z: z, "relu": torch.relu,
        "leaky_relu": lambda z: nn.functional.leaky_relu(z, 0.01), "gelu": nn.functional.gelu,
        "silu": nn.functional.silu}
ROUTES = ("own", "all")
GRAD_MASKS = ("own", "params", "none")
OPTIMIZERS = (None, "rowwise_adagrad")


def _choice(who: str, name: str, value, allowed) -> None:
    if not isinstance(value, (str, type(None))) or value not in allowed:
        raise ValueError(f"{who}: {name} must be one of {tuple(allowed)}, got {value!r}")


def feature_layout(features: Sequence, num_scenarios: int, scenario_rows: Optional[dict] = None) -> tuple[list, list]:
    """(feature_rows [F+1], feature_scenario_rows [F+1]) cumulative row starts of the global / scenario tables;
    ``scenario_rows`` (name -> Rs_f, checked) gives hashed features fewer scenario rows than ids."""
    scenario_rows = scenario_rows or {}
    fr, fsr = [0], [0]
    for f in features:
        n, aware = int(f[1]), bool(f[2])
        fr.append(fr[-1] + n)
        fsr.append(fsr[-1] + (scenario_rows.get(f[0], n) if aware else 0))
    return fr, fsr


class RefScenarioEmbedding(nn.Module):
    """Reference ScenarioEmbedding: ``global_weight [R, D]``, ``scenario_weight [M, Rs, D]``.

    features: (name, num_embeddings, scenario_aware, pooling) tuples, one pooling for all of them.
    optimizer: None | "rowwise_adagrad": the latter registers the row-wise Adagrad states of
    ``nn.ScenarioEmbedding(optimizer="rowwise_adagrad")`` (float32 buffers ``global_state [R]``,
    ``scenario_state [M, Rs]``, same names, so state_dicts match); the update is not fused here:
    ``saml_kernels.training.TrainingOptimizer`` applies it after the backward, on these buffers.
    scenario_rows: hashed scenario tables (aware feature name -> Rs_f rows), as ``nn.ScenarioEmbedding``.
    forward(indices, offsets, scenario) -> (E_g [B, F, D], E_s [B, Fs, D]) ([B, F, L, D] for pooling "none")."""

    def __init__(self, features: Sequence, num_scenarios: int, embedding_dim: int, *,
                 optimizer: Optional[str] = None, device=None, dtype=None, scenario_rows=None):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"RefScenarioEmbedding: optimizer must be one of {OPTIMIZERS} (the reference fuses no "
                             f"update; TrainingOptimizer applies row-wise Adagrad after the backward), got "
                             f"{optimizer!r}")
        self.features = [tuple(f) for f in features]
        pools = {f[3] if len(f) > 3 else "sum" for f in self.features}
        if len(pools) != 1:
            raise ValueError(f"RefScenarioEmbedding: one pooling for all features, got {sorted(pools)}")
        self.pooling = pools.pop()
        self.num_scenarios, self.embedding_dim = num_scenarios, embedding_dim
        self.scenario_rows = check_scenario_rows("RefScenarioEmbedding", self.features, scenario_rows)
        self.feature_rows, self.feature_scenario_rows = feature_layout(self.features, num_scenarios,
                                                                       self.scenario_rows)
        fk = dict(device=device, dtype=dtype)
        self.global_weight = nn.Parameter(torch.empty(self.feature_rows[-1], embedding_dim, **fk))
        self.scenario_weight = nn.Parameter(torch.empty(num_scenarios, self.feature_scenario_rows[-1],
                                                        embedding_dim, **fk))
        self.optimizer = optimizer
        if optimizer == "rowwise_adagrad":
            self.register_buffer("global_state", torch.zeros(self.feature_rows[-1], device=device,
                                                             dtype=torch.float32))
            self.register_buffer("scenario_state", torch.zeros(num_scenarios, self.feature_scenario_rows[-1],
                                                               device=device, dtype=torch.float32))
        else:
            self.global_state = self.scenario_state = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.embedding_dim)  # as nn.ScenarioEmbedding
        nn.init.uniform_(self.global_weight, -bound, bound)
        nn.init.uniform_(self.scenario_weight, -bound, bound)
        for buf in (self.global_state, self.scenario_state):
            if buf is not None:
                buf.zero_()

    def forward(self, indices: Tensor, offsets: Tensor, scenario: Tensor):
        return scenario_embedding_bag_reference(indices, offsets, scenario, self.global_weight, self.scenario_weight,
                                                self.feature_rows, self.feature_scenario_rows, pooling=self.pooling)


class RefMultiBranchLinear(nn.Module):
    """Reference MultiBranchLinear: ``weight [M, K, N]``, ``bias [M, N]``, ``aux_weight [M, Ka, N]``.

    z_m = x_m W_m + aux Wa_m + bias_m for every branch m on the full batch (x [B, K] shared or [M, B, K]);
    route "own": y_b = act(z_{s_b, b}) [B, N], picked with torch.where (M x the needed FLOPs, as public code);
    route "all": y [M, B, N]; grad_mask "own" detaches y[m, b] for m != s_b, "params" stops only the weight
    gradient of other scenarios' samples, "none" leaves autograd dense."""

    def __init__(self, in_features: int, out_features: int, num_branches: int, aux_features: int = 0,
                 bias: bool = True, activation: Optional[str] = None, route: str = "own", grad_mask: str = "own",
                 *, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        who = type(self).__name__
        K, N, M = (size_arg(who, n, v) for n, v in (("in_features", in_features), ("out_features", out_features),
                                                    ("num_branches", num_branches)))
        Ka = size_arg(who, "aux_features", aux_features, minimum=0)
        _choice(who, "route", route, ROUTES)
        _choice(who, "grad_mask", grad_mask, GRAD_MASKS)
        _choice(who, "activation", activation, ACTIVATIONS)
        self.in_features, self.out_features, self.num_branches, self.aux_features = K, N, M, Ka
        self.activation, self.route, self.grad_mask = activation, route, grad_mask
        self.weight = nn.Parameter(torch.empty(M, K, N, **fk))
        self.bias = nn.Parameter(torch.empty(M, N, **fk)) if bias else None
        self.aux_weight = nn.Parameter(torch.empty(M, Ka, N, **fk)) if Ka else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's init per branch, fan-in = K + Ka (the branch sees [x ; aux])
        bound = 1.0 / math.sqrt(max(self.in_features + self.aux_features, 1))
        for p in (self.weight, self.bias, self.aux_weight):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)

    def _branch(self, m, x, aux, weight=None, aux_weight=None):
        w = self.weight if weight is None else weight
        wa = self.aux_weight if aux_weight is None else aux_weight
        xm = x[m] if x.dim() == 3 else x
        z = xm @ w[m]
        if aux is not None:
            z = z + aux @ wa[m]
        if self.bias is not None:
            z = z + self.bias[m]
        return z

    def forward(self, x: Tensor, scenario: Tensor, aux: Optional[Tensor] = None) -> Tensor:
        if (aux is None) != (self.aux_weight is None):
            raise ValueError(f"{type(self).__name__}: aux_features={self.aux_features}, so aux must be "
                             f"{'given' if self.aux_weight is not None else 'None'}")
        act = _ACT[self.activation]
        if self.route == "own":
            out = None
            for m in range(self.num_branches):
                z = self._branch(m, x, aux)
                out = z if out is None else torch.where((scenario == m).unsqueeze(1), z, out)
            return act(out)
        z = torch.stack([self._branch(m, x, aux) for m in range(self.num_branches)])
        own = (torch.arange(self.num_branches, device=z.device).view(-1, 1) == scenario.view(1, -1)).unsqueeze(-1)
        if self.grad_mask == "own":
            z = torch.where(own, z, z.detach())
        elif self.grad_mask == "params":
            wd = self.weight.detach()
            wad = None if self.aux_weight is None else self.aux_weight.detach()
            zx = torch.stack([self._branch(m, x, aux, wd, wad) for m in range(self.num_branches)])
            z = torch.where(own, z, zx)
        return act(z)


class RefMutualUnit(RefMultiBranchLinear):
    """Reference MutualUnit: every branch on the full batch (other branches stop-gradient), then the mutual mix
    own = h[s]; a = softmax_m(sim(own, h[m]) / temperature); out = sum_m a[m] h[m]  -> [B, N].

    forward(x [B, K] shared or [M, B, K] one input per branch, scenario [B], aux [B, Ka] or None) -> [B, N]."""

    def __init__(self, in_features: int, out_features: int, num_branches: int, aux_features: int = 0,
                 activation: Optional[str] = "relu", temperature: float = 1.0, similarity: str = "cosine",
                 bias: bool = True, *, device=None, dtype=None):
        super().__init__(in_features, out_features, num_branches, aux_features, bias, activation, "all", "own",
                         device=device, dtype=dtype)
        _choice(type(self).__name__, "similarity", similarity, SIMILARITIES)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"{type(self).__name__}: temperature must be a positive finite float, got {temperature!r}")
        if not 0 < temperature < math.inf:
            raise ValueError(f"{type(self).__name__}: temperature must be a positive finite float, got {temperature!r}")
        self.temperature, self.similarity = float(temperature), similarity

    def forward(self, x: Tensor, scenario: Tensor, aux: Optional[Tensor] = None) -> Tensor:
        h = super().forward(x, scenario, aux)
        return mutual_unit_reference(h, scenario, temperature=self.temperature, similarity=self.similarity)
