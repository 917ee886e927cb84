"""``HMoE``: the hybrid of implicit and explicit mixture-of-experts (Li et al., CIKM 2020, "Improving
Multi-Scenario Learning to Rank in E-commerce by Exploiting Task Relationships in the Label Space") on the
package's kernels, and the body it shares with its plain-PyTorch twin ``saml_kernels.reference.HMoEReference``
(docs/design.md section 9, which also lists where this model departs from the paper).

    x_0 = [E_g ; att_g ; dense]                         shared embeddings (every feature in the global table)
    e[k, b] = expert_k(x_0b)          [K, B, He]        K shared experts (MLPs), every sample through every
                                                        expert: one GEMM against the packed expert weights
    g[m, b] = softmax(x_0b Gx_m + gx_m)  [M, B, K]      implicit part (feature space): scenario m's gate over
    f[m, b] = sum_k g[m, b, k] e[k, b]   [M, B, He]     the experts (MMoE), one gate per scenario
    score[m, b] = tower_m(f[m, b])       [M, B]         scenario m's tower on its own mixture, every tower on
                                                        every sample (route "all")
    w_b = softmax(x_0b Gs_{s_b} + gs_{s_b})  [B, M]     explicit part (label space): the gate of the sample's
    logit_b = sum_m w_b[m] score[m, b]                  own scenario mixes all the scenarios' scores

Task-constrained back-propagation (the paper's stop-gradient): for sample b only its own scenario's path
(gate g[s_b], tower s_b) passes gradient back; the other scenarios' scores enter the mix as constants (route
"all" with ``grad_mask="own"`` on the expert gates and the towers: the rule of SAML's mutual unit). So scenario
m's expert gate, tower and score gate (route "own") learn from scenario m's samples only; the experts and the
embeddings learn from all. The prediction depends on the scenario through the score gate w (and, in training,
through which path carries gradient).

Parameter names (shared with the twin): inputs.*, experts.<l>.{weight, bias} ([K, k_l, n_l], one packed
branch per expert), expert_gates.{weight, bias} ([M, global_dim, K]), towers.{weight, bias},
tower_heads.{weight, bias}, score_gate.{weight, bias} ([M, global_dim, M]).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from .._args import size_arg
from ..config import FamilyConfig
from ._family import FamilyBody, unrouted

__all__ = ["HMoE", "HMoEConfig", "HMoEBody"]


@dataclasses.dataclass
class HMoEConfig(FamilyConfig):
    """HMoE's configuration: the input fields of ``FamilyConfig`` and

    num_experts: K, the shared experts; expert_hidden: the widths of each expert's MLP (relu after every layer,
    at least one layer; the last width is the experts' output He); tower_hidden: width of each scenario tower's
    hidden layer. ``HMoEConfig.from_data(data, **fields)`` reads the inputs from a ``saml_kernels.data.CTRData``."""

    num_experts: int = 4
    expert_hidden: tuple = (256,)
    tower_hidden: int = 128

    def __post_init__(self):
        self._check("HMoEConfig")
        self.num_experts = size_arg("HMoEConfig", "num_experts", self.num_experts)
        if not self.expert_hidden:
            raise ValueError("HMoEConfig: expert_hidden needs at least one layer width (the experts' output)")
        self.expert_hidden = tuple(size_arg("HMoEConfig", f"expert_hidden[{i}]", v)
                                   for i, v in enumerate(self.expert_hidden))
        self.tower_hidden = size_arg("HMoEConfig", "tower_hidden", self.tower_hidden)


def mix_experts(gate: Tensor, experts: Tensor) -> Tensor:
    """f[m, b] = sum_k gate[m, b, k] experts[k, b]: gate [M, B, K], experts [K, B, He] -> [M, B, He].

    One batched GEMM over the samples ([B, M, K] @ [B, K, He]); both inputs are views of B-major buffers when they
    come from the all-route GEMM, so the transposes are free."""
    return torch.bmm(gate.transpose(0, 1), experts.transpose(0, 1)).transpose(0, 1)


class HMoEBody(FamilyBody):
    """HMoE written once over a ``LayerSet`` (``multi_branch_linear``, ``scenario_embedding``, ``attention``). Use
    :class:`HMoE` or ``saml_kernels.reference.HMoEReference``.

    forward(indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None) -> logit [B];
    ``loss(batch)``: mean BCE (0 for B = 0). A bad input raises its named error before anything is updated (the
    checks of :class:`~saml_kernels.nn._family.FamilyBody`)."""

    config_type = HMoEConfig

    def __init__(self, config: HMoEConfig, layers, *, backend: Optional[str] = None,
                 embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 embedding_lr: float = 0.05, embedding_eps: float = 1e-8,
                 device=None, dtype=None, **embedding_options):
        super().__init__(config, layers, backend=backend, embedding_optimizer=embedding_optimizer,
                         embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device, dtype=dtype,
                         **embedding_options)
        c, kw = self.config, self.options
        M, K, D0 = c.num_scenarios, c.num_experts, c.global_dim
        mbl = layers.multi_branch_linear
        # experts: shared by every scenario, so their gradients are dense (grad_mask "none"); one branch each
        self.experts = nn.ModuleList()
        k = D0
        for n in c.expert_hidden:
            self.experts.append(mbl(in_features=k, out_features=n, num_branches=K, activation="relu", bias=True,
                                    route="all", grad_mask="none", **kw))
            k = n
        own = dict(bias=True, route="all", grad_mask="own", **kw)  # scenario m's path: scenario m's samples only
        self.expert_gates = mbl(in_features=D0, out_features=K, num_branches=M, activation=None, **own)
        self.towers = mbl(in_features=k, out_features=c.tower_hidden, num_branches=M, activation="relu", **own)
        self.tower_heads = mbl(in_features=c.tower_hidden, out_features=1, num_branches=M, activation=None, **own)
        self.score_gate = mbl(in_features=D0, out_features=M, num_branches=M, activation=None, bias=True,
                              route="own", **kw)
        self.dropout = nn.Dropout(c.dropout)

    def expert_outputs(self, x0: Tensor, scenario: Tensor) -> Tensor:
        """e [K, B, He]: every expert on every sample."""
        e, anyone = x0, unrouted(scenario)
        for layer in self.experts:
            e = self.dropout(layer(e, anyone))
        return e

    def tower_scores(self, x0: Tensor, scenario: Tensor) -> Tensor:
        """score [M, B]: scenario m's tower on its gate's mixture of the experts, for every sample (stop-gradient
        off the sample's own scenario)."""
        gate = torch.softmax(self.expert_gates(x0, scenario), dim=-1)  # [M, B, K]
        f = mix_experts(gate, self.expert_outputs(x0, scenario))  # [M, B, He]
        return self.tower_heads(self.towers(f, scenario), scenario).squeeze(-1)

    def _forward(self, x0: Tensor, scenario: Tensor) -> Tensor:
        w = torch.softmax(self.score_gate(x0, scenario), dim=1)  # [B, M]: the sample's own scenario's gate
        return (w * self.tower_scores(x0, scenario).t()).sum(1)


class HMoE(HMoEBody):
    """HMoE on the package's kernels (experts, expert gates and towers on the all-branch GEMM, the score gate on
    the grouped GEMM, fused embedding bags); see :class:`HMoEBody` and the module docstring.

    Args: config (:class:`HMoEConfig`); backend; embedding_optimizer None | "sgd" | "rowwise_adagrad" (fused into the
    embedding backward), embedding_lr, embedding_eps, embedding_weight_decay, embedding_skip_nonfinite, embedding_stochastic_rounding; device,
    dtype; embedding_dtype. All as :class:`~saml_kernels.nn.SAML`."""

    def __init__(self, config: HMoEConfig, *, backend: Optional[str] = None,
                 embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 embedding_lr: float = 0.05, embedding_eps: float = 1e-8,
                 embedding_weight_decay: float = 0.0, embedding_skip_nonfinite: bool = False, device=None,
                 dtype=None, embedding_dtype=None, embedding_stochastic_rounding: bool = True):
        from .layer_set import KERNEL_LAYERS

        super().__init__(config, KERNEL_LAYERS, backend=backend, embedding_optimizer=embedding_optimizer,
                         embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device, dtype=dtype,
                         embedding_weight_decay=embedding_weight_decay,
                         embedding_skip_nonfinite=embedding_skip_nonfinite, embedding_dtype=embedding_dtype,
                         embedding_stochastic_rounding=embedding_stochastic_rounding)
