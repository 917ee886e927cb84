"""What STAR and HMoE share: the input configuration (the features, sequence and dense columns of a
``saml_kernels.data.CTRData``) and the shared-embedding input representation

    x_0 = [E_g ; att_g ; dense]   [B, global_dim]

with every feature in the global (shared) table, and the global half of the scenario attention over the behaviour
sequence (as ``SharedBottom``). The layers come from a ``LayerSet`` so that the kernel models and their reference
twins build the same modules with the same parameter names (docs/design.md section 9).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from .._args import size_arg
from ..config import check_model_inputs
from ..data.batch import FeatureSpec, SequenceSpec


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


def _seq_offsets(B: int, L: int, like: Tensor) -> Tensor:
    return torch.arange(0, B * L + 1, L, device=like.device, dtype=like.dtype)


class SharedInput(nn.Module):
    """x_0 = [E_g ; att_g ; dense] from the shared tables. Submodules ``embedding``, ``sequence_embedding`` and
    ``attention`` (the latter two with a sequence), built from ``layers`` with ``embedding_kwargs`` (the
    embedding layer's own options) and ``layer_kwargs`` (e.g. the kernel layers' ``backend``)."""

    def __init__(self, config: FamilyConfig, layers, embedding_kwargs: dict, layer_kwargs: dict, fk: dict):
        super().__init__()
        c = self.config = config
        M, D = c.num_scenarios, c.embedding_dim
        shared = [(f.name, f.num_embeddings, False, f.pooling) for f in c.features]
        self.embedding = layers.scenario_embedding(shared, M, D, **embedding_kwargs, **fk)
        if c.sequence is not None:
            seq = c.sequence
            self.sequence_embedding = layers.scenario_embedding([(seq.name, seq.num_embeddings, False, "none")], M, D,
                                                                **embedding_kwargs, **fk)
            self.attention = layers.attention(D, c.attention_dim, M, **layer_kwargs, **fk)

    def forward(self, who: str, indices, offsets, scenario, seq_ids, seq_lengths, dense) -> Tensor:
        c = self.config
        B, L = check_model_inputs(who, c, scenario, seq_ids, seq_lengths, dense)
        D = c.embedding_dim
        e_g, _ = self.embedding(indices, offsets, scenario)
        parts = [e_g.reshape(B, len(c.features) * D)]  # explicit width: reshape(B, -1) fails for B = 0
        if c.sequence is not None:
            s_g, _ = self.sequence_embedding(seq_ids.reshape(-1), _seq_offsets(B, L, seq_ids), scenario)
            fg = c.target_slot()
            s_g = s_g.reshape(B, L, D)
            # the global half of the attention only (the local half gets the same global inputs, unused)
            att_g, _ = self.attention(e_g[:, fg], e_g[:, fg], s_g, s_g, seq_lengths, scenario)
            parts.append(att_g)
        if c.num_dense:
            parts.append(dense.to(e_g.dtype))
        return torch.cat(parts, 1)


def family_kwargs(layers, backend, embedding_optimizer, embedding_lr, embedding_eps) -> tuple[dict, dict]:
    """(embedding_kwargs, layer_kwargs) for a layer set: the kernel layers take a backend and the fused embedding
    optimizer; the reference layers only the row-wise state buffers (updated by ``TrainingOptimizer``)."""
    if layers.name == "kernels":
        return (dict(backend=backend, optimizer=embedding_optimizer, lr=embedding_lr, eps=embedding_eps),
                dict(backend=backend))
    if embedding_optimizer not in (None, "rowwise_adagrad"):
        raise ValueError(f"reference models: embedding_optimizer must be None or 'rowwise_adagrad', "
                         f"got {embedding_optimizer!r}")
    return dict(optimizer=embedding_optimizer), {}
