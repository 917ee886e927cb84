"""``HMoE``: the hybrid mixture of scenario experts (Li et al., 2020) on the package's kernels, and the body it
shares with its plain-PyTorch twin ``saml_kernels.reference.HMoEReference`` (docs/design.md section 9).

    x_0 = [E_g ; att_g ; dense]                         shared embeddings (every feature in the global table)
    h = bottom(x_0)                                     shared MLP: dropout(relu(Linear)) per bottom_hidden width
    t[m, b] = relu(h_b T_m + c_m)                       every scenario tower on every sample: one GEMM against
    score[m, b] = t[m, b] u_m + d_m                     the packed tower weights (mbranch_linear route "all")
    g_b = softmax(h_b G + e)   [B, M]                   gate over the towers
    logit_b = sum_m g_b[m] score[m, b]

Stop-gradient: for sample b only its own tower (m = s_b) passes gradient back (to its parameters and to h_b);
the other towers' scores enter the mix as constants (``grad_mask="own"``: the rule of SAML's mutual unit). So a
tower learns from its own scenario's samples only, while the gate and the shared layers learn from all.

Parameter names (shared with the twin): inputs.*, bottom.<3 i>.{weight, bias}, towers.{weight, bias},
tower_heads.{weight, bias}, gate.{weight, bias}.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from .._args import size_arg
from ._family import FamilyBody, FamilyConfig

__all__ = ["HMoE", "HMoEConfig", "HMoEBody"]


@dataclasses.dataclass
class HMoEConfig(FamilyConfig):
    """HMoE's configuration: the input fields of ``FamilyConfig`` and

    bottom_hidden: widths of the shared bottom MLP (may be empty); tower_hidden: width of each scenario tower's
    hidden layer. ``HMoEConfig.from_data(data, **fields)`` reads the inputs from a ``saml_kernels.data.CTRData``."""

    bottom_hidden: tuple = (256,)
    tower_hidden: int = 128

    def __post_init__(self):
        self._check("HMoEConfig")
        self.bottom_hidden = tuple(size_arg("HMoEConfig", f"bottom_hidden[{i}]", v)
                                   for i, v in enumerate(self.bottom_hidden))
        self.tower_hidden = size_arg("HMoEConfig", "tower_hidden", self.tower_hidden)


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
                 device=None, dtype=None):
        super().__init__(config, layers, backend=backend, embedding_optimizer=embedding_optimizer,
                         embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device, dtype=dtype)
        c, kw = self.config, self.options
        fk = dict(device=device, dtype=dtype)
        M = c.num_scenarios
        mods, k = [], c.global_dim
        for n in c.bottom_hidden:
            mods += [nn.Linear(k, n, **fk), nn.ReLU(), nn.Dropout(c.dropout)]
            k = n
        self.bottom = nn.Sequential(*mods)
        tower = dict(bias=True, route="all", grad_mask="own", **kw)
        self.towers = layers.multi_branch_linear(in_features=k, out_features=c.tower_hidden, num_branches=M,
                                                 activation="relu", **tower)
        self.tower_heads = layers.multi_branch_linear(in_features=c.tower_hidden, out_features=1, num_branches=M,
                                                      activation=None, **tower)
        self.gate = nn.Linear(k, M, **fk)

    def tower_scores(self, h: Tensor, scenario: Tensor) -> Tensor:
        """score [M, B]: every tower on every sample (other scenarios' towers stop-gradient)."""
        t = self.towers(h, scenario)
        return self.tower_heads(t, scenario).squeeze(-1)

    def _forward(self, x0: Tensor, scenario: Tensor) -> Tensor:
        h = self.bottom(x0)
        gate = torch.softmax(self.gate(h), dim=1)  # [B, M]
        return (gate * self.tower_scores(h, scenario).t()).sum(1)


class HMoE(HMoEBody):
    """HMoE on the package's kernels (towers on the all-branch GEMM with the own-branch gradient mask, fused
    embedding bags); see :class:`HMoEBody` and the module docstring.

    Args: config (:class:`HMoEConfig`); backend; embedding_optimizer "rowwise_adagrad" (the default) | "sgd" (fused
    into the embedding backward, as ``SAML``) | None (plain table gradients), embedding_lr, embedding_eps; device,
    dtype."""

    def __init__(self, config: HMoEConfig, *, backend: Optional[str] = None,
                 embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 embedding_lr: float = 0.05, embedding_eps: float = 1e-8,
                 device=None, dtype=None):
        from .layer_set import KERNEL_LAYERS

        super().__init__(config, KERNEL_LAYERS, backend=backend, embedding_optimizer=embedding_optimizer,
                         embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device, dtype=dtype)
