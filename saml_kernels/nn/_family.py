"""What STAR and HMoE share: the input configuration (the features, sequence and dense columns of a
``saml_kernels.data.CTRData``) and the shared-embedding input representation

    x_0 = [E_g ; att_g ; dense]   [B, global_dim]

with every feature in the global (shared) table, and the global half of the scenario attention over the behaviour
sequence (as ``SharedBottom``), and the body around it (:class:`FamilyBody`: SAML's layer options and checked
forward). The layers come from a ``LayerSet`` so that the kernel models and their reference twins build the same
modules with the same parameter names (docs/design.md section 9).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from .._args import size_arg
from .._layer_set import LayerSet
from ..config import check_model_inputs
from ..data.batch import FeatureSpec, SequenceSpec
from ..ops import _checks
from ..training import bce_loss, optimizer_state_keys_optional
from .saml import checked_forward, dense_dtype, layer_options, seq_offsets


@dataclasses.dataclass
class FamilyConfig:
    """Input part of the STAR / HMoE configurations (see ``SAMLConfig`` for the fields' meaning)."""

    features: list
    num_scenarios: int
    embedding_dim: int = 16
    sequence: Optional[SequenceSpec] = None
    target_feature: Optional[str] = None
    num_dense: int = 0
    attention_dim: int = 16
    dropout: float = 0.0

    def _check(self, who: str) -> None:
        self.features = [FeatureSpec(*f) for f in self.features]
        if not self.features:
            raise ValueError(f"{who}: at least one feature is needed")
        self.num_scenarios = size_arg(who, "num_scenarios", self.num_scenarios)
        self.embedding_dim = size_arg(who, "embedding_dim", self.embedding_dim)
        self.attention_dim = size_arg(who, "attention_dim", self.attention_dim)
        self.num_dense = size_arg(who, "num_dense", self.num_dense, 0)
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"{who}: feature names must be unique, got {names}")
        if self.sequence is not None:
            self.sequence = SequenceSpec(*self.sequence)
            if self.target_feature not in names:
                raise ValueError(f"{who}: target_feature {self.target_feature!r} must name one of {names}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"{who}: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def global_dim(self) -> int:
        """Width of x_0 = [E_g ; att_g ; dense]."""
        return len(self.features) * self.embedding_dim + (self.embedding_dim if self.sequence else 0) + self.num_dense

    def target_slot(self) -> int:
        return [f.name for f in self.features].index(self.target_feature)

    @classmethod
    def from_data(cls, data, **kw):
        """A config matching a ``saml_kernels.data.CTRData`` (features, scenarios, dense, sequence)."""
        names = [f.name for f in data.features]
        target = kw.pop("target_feature", "item" if "item" in names else None)
        return cls(features=list(data.features), num_scenarios=data.num_scenarios, sequence=data.sequence,
                   target_feature=target if data.sequence is not None else None, num_dense=data.num_dense, **kw)


def unrouted(scenario: Tensor) -> Tensor:
    """The scenario argument of a ``multi_branch_linear`` whose branches are not scenarios (HMoE's experts, STAR's
    one-branch auxiliary layer): zeros, so its range check (against its own branch count) passes; such a layer
    runs route "all" with dense gradients (``grad_mask="none"``), so the ids route nothing. Recorded as checked
    for any branch count (``_checks.mark_checked``): zeros need no range check."""
    zeros = torch.zeros_like(scenario)
    _checks.mark_checked(zeros, "scenario", 1)
    return zeros


class SharedInput(nn.Module):
    """x_0 = [E_g ; att_g ; dense] from the shared tables. Submodules ``embedding``, ``sequence_embedding`` and
    ``attention`` (the latter two with a sequence), built from ``layers`` with the options of
    ``saml_kernels.nn.saml.layer_options``: ``options`` (every layer's) and ``embedding_options``."""

    def __init__(self, config: FamilyConfig, layers, options: dict, embedding_options: dict):
        super().__init__()
        c = self.config = config
        M, D = c.num_scenarios, c.embedding_dim
        shared = [(f.name, f.num_embeddings, False, f.pooling) for f in c.features]
        self.embedding = layers.scenario_embedding(shared, M, D, **embedding_options)
        if c.sequence is not None:
            seq = c.sequence
            self.sequence_embedding = layers.scenario_embedding([(seq.name, seq.num_embeddings, False, "none")], M, D,
                                                                **embedding_options)
            self.attention = layers.attention(D, c.attention_dim, M, **options)

    def forward(self, who: str, indices, offsets, scenario, seq_ids, seq_lengths, dense, dt: torch.dtype) -> Tensor:
        """x_0 [B, global_dim] in ``dt`` (the body's dense dtype: the embedding outputs are cast to it)."""
        c = self.config
        B, L = check_model_inputs(who, c, scenario, seq_ids, seq_lengths, dense)
        D = c.embedding_dim
        e_g = self.embedding(indices, offsets, scenario)[0].to(dt)
        parts = [e_g.reshape(B, len(c.features) * D)]  # explicit width: reshape(B, -1) fails for B = 0
        if c.sequence is not None:
            s_g = self.sequence_embedding(seq_ids.reshape(-1), seq_offsets(B, L, seq_ids), scenario)[0].to(dt)
            fg = c.target_slot()
            s_g = s_g.reshape(B, L, D)
            # the global half of the attention only (the local half gets the same global inputs, unused)
            att_g, _ = self.attention(e_g[:, fg], e_g[:, fg], s_g, s_g, seq_lengths, scenario)
            parts.append(att_g)
        if c.num_dense:
            parts.append(dense.to(dt))
        return torch.cat(parts, 1)


class FamilyBody(nn.Module):
    """What the STAR and HMoE bodies share with ``SAML``'s: the layer options (``layer_options``: the kernel-only
    options reach the layers only with the kernel set, a bad backend fails at construction), the ``inputs``
    (:class:`SharedInput`), and the forward under ``checked_forward`` (the scenario range checked once at the
    boundary; with the kernel layers every value check of the step read with one host sync when the forward
    ends, so a bad input raises before a backward, an optimizer step or a running statistic uses it).

    Subclasses build their layers after ``super().__init__`` from ``self.options`` and define
    ``_forward(x_0, scenario) -> logit [B]``."""

    config_type: type = FamilyConfig

    def __init__(self, config, layers: LayerSet, *, backend: Optional[str], embedding_optimizer: Optional[str],
                 embedding_lr: float, embedding_eps: float, device, dtype, **embedding_options):
        super().__init__()
        who = type(self).__name__
        if not isinstance(config, self.config_type):
            raise TypeError(f"{who}: config must be a {self.config_type.__name__}, got {type(config).__name__}")
        # embedding_options: embedding_weight_decay, embedding_skip_nonfinite, embedding_dtype,
        # embedding_stochastic_rounding (see layer_options)
        self.options, emb = layer_options(who, layers, backend=backend, embedding_optimizer=embedding_optimizer,
                                          embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device,
                                          dtype=dtype, **embedding_options)
        self.config, self.layer_set, self.backend = config, layers, backend
        self.inputs = SharedInput(config, layers, self.options, emb)
        self.register_load_state_dict_post_hook(optimizer_state_keys_optional)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None) -> Tensor:
        return checked_forward(self, self._inputs_forward, indices, offsets, scenario, seq_ids, seq_lengths, dense)

    def _inputs_forward(self, indices, offsets, scenario, seq_ids, seq_lengths, dense) -> Tensor:
        x0 = self.inputs(type(self).__name__, indices, offsets, scenario, seq_ids, seq_lengths, dense,
                         dense_dtype(self))
        return self._forward(x0, scenario)

    def _forward(self, x0: Tensor, scenario: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, batch) -> Tensor:
        """Mean BCE of the logit on a ``saml_kernels.data.Batch`` (0 with zero gradients for an empty batch)."""
        return bce_loss(self(*batch.inputs()), batch.label)
