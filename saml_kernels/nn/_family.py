"""What SharedBottom, STAR and HMoE share: the input configuration (``saml_kernels.config.FamilyConfig``: the
features, sequence and dense columns of a ``saml_kernels.data.CTRData``) and the shared-embedding input
representation

    x_0 = [E_g ; att_g ; dense]   [B, global_dim]

with every feature in the global (shared) table, and the global half of the scenario attention over the behaviour
sequence, and the body around it (:class:`FamilyBody`: SAML's layer options and checked forward). The layers come from a ``LayerSet`` so that the kernel models and their reference twins build the same
modules with the same parameter names (docs/design.md section 9).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._layer_set import LayerSet
from ..config import FamilyConfig, check_model_inputs  # noqa: F401  (FamilyConfig re-exported)
from ..ops import _checks
from ..training import bce_loss
from .saml import ModelBody, checked_forward, dense_dtype, layer_options, seq_offsets


def unrouted(scenario: Tensor) -> Tensor:
    """The scenario argument of a ``multi_branch_linear`` whose branches are not scenarios (HMoE's experts, STAR's
    one-branch auxiliary layer): zeros, so its range check (against its own branch count) passes; such a layer
    runs route "all" with dense gradients (``grad_mask="none"``), so the ids route nothing. Recorded as checked
    for any branch count (``_checks.mark_checked``): zeros need no range check."""
    zeros = torch.zeros_like(scenario)
    _checks.mark_checked(zeros, "scenario", 1)
    return zeros


class SharedInputLayers:
    """The shared input's layers and x_0, on whichever module holds them (a mixin of :class:`SharedInput`, and of
    the bodies that keep the layers at their top level: ``SharedBottom``). Needs ``self.config``."""

    def _build_shared_input(self, config: FamilyConfig, layers, options: dict, embedding_options: dict) -> None:
        """Registers ``embedding`` and, with a sequence, ``sequence_embedding`` and ``attention`` (in this order:
        the order their parameters are initialised in) with every feature in the global table only."""
        M, D = config.num_scenarios, config.embedding_dim
        shared = [(f.name, f.num_embeddings, False, f.pooling) for f in config.features]
        self.embedding = layers.scenario_embedding(shared, M, D, **embedding_options)
        if config.sequence is not None:
            seq = config.sequence
            self.sequence_embedding = layers.scenario_embedding([(seq.name, seq.num_embeddings, False, "none")], M, D,
                                                                **embedding_options)
            self.attention = layers.attention(D, config.attention_dim, M, **options)

    def shared_input(self, who: str, indices, offsets, scenario, seq_ids, seq_lengths, dense,
                     dt: torch.dtype) -> Tensor:
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


class SharedInput(SharedInputLayers, nn.Module):
    """x_0 = [E_g ; att_g ; dense] from the shared tables. Submodules ``embedding``, ``sequence_embedding`` and
    ``attention`` (the latter two with a sequence), built from ``layers`` with the options of
    ``saml_kernels.nn.saml.layer_options``: ``options`` (every layer's) and ``embedding_options``."""

    def __init__(self, config: FamilyConfig, layers, options: dict, embedding_options: dict):
        super().__init__()
        self.config = config
        self._build_shared_input(config, layers, options, embedding_options)

    def forward(self, who: str, indices, offsets, scenario, seq_ids, seq_lengths, dense, dt: torch.dtype) -> Tensor:
        """x_0 [B, global_dim] in ``dt``."""
        return self.shared_input(who, indices, offsets, scenario, seq_ids, seq_lengths, dense, dt)


class FamilyBody(SharedInputLayers, ModelBody):
    """The body of the models on the shared input (``SharedBottom``, STAR, HMoE), with what it shares with
    ``SAML``'s (:class:`~saml_kernels.nn.saml.ModelBody`): the layer options (``layer_options``: the kernel-only
    options reach the layers only with the kernel set, a bad backend fails at construction), the shared input
    x_0 (:class:`SharedInputLayers`), and the forward under ``checked_forward`` (the scenario range checked once
    at the boundary; with the kernel layers every value check of the step read with one host sync when the
    forward ends, so a bad input raises before a backward, an optimizer step or a running statistic uses it).

    Subclasses build their layers after ``super().__init__`` from ``self.options`` and define
    ``_forward(x_0, scenario) -> logit [B]``. ``inline_inputs``: False (STAR, HMoE) keeps the input layers in
    the submodule ``inputs`` (parameter names ``inputs.embedding.*``); True (``SharedBottom``) registers them on
    the body itself (``embedding.*``, as SAML's), so each model keeps its checkpoint layout."""

    config_type: type = FamilyConfig
    inline_inputs: bool = False

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
        if self.inline_inputs:
            self._build_shared_input(config, layers, self.options, emb)
        else:
            self.inputs = SharedInput(config, layers, self.options, emb)

    def forward(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None) -> Tensor:
        return checked_forward(self, self._inputs_forward, indices, offsets, scenario, seq_ids, seq_lengths, dense)

    def _inputs_forward(self, indices, offsets, scenario, seq_ids, seq_lengths, dense) -> Tensor:
        x0 = (self.shared_input if self.inline_inputs else self.inputs)(
            type(self).__name__, indices, offsets, scenario, seq_ids, seq_lengths, dense, dense_dtype(self))
        return self._forward(x0, scenario)

    def _forward(self, x0: Tensor, scenario: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, batch) -> Tensor:
        """Mean BCE of the logit on a ``saml_kernels.data.Batch`` (0 with zero gradients for an empty batch)."""
        return bce_loss(self(*batch.inputs()), batch.label)
