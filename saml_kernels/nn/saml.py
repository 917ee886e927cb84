"""``SAML``: the full Scenario-aware and Mutual-based model (docs/design.md section 1) from the drop-in layers, and a
shared-bottom baseline for comparison.

    E_g, E_s = ScenarioEmbedding(ids, scenario);  S_g, S_s = sequence ScenarioEmbedding (pooling "none")
    att_g, att_l = ScenarioAttention(E_g[target], E_s[target], S_g, S_s, lengths, scenario)
    A_0 = [E_g ; att_g ; dense],  H_0 = [E_s ; att_l]
    A_l = dropout(relu(Linear(A_{l-1})))                               auxiliary network
    H_l = dropout(branch_l(H_{l-1}, aux=A_{l-1}))                       multi-branch network:
          MutualUnit at config.mutual_layers (fused mutual_linear), MultiBranchLinear route "all" with
          per-branch inputs below a mutual layer, route "own" (grouped GEMM by scenario) above
    main = branch_head(H_L, aux=A_L) (own route),  aux = aux_head(A_L)
    loss = BCE(main) + aux_loss_weight * BCE(aux)

Parameters are named as in ``saml_kernels.reference.SAMLReference``: a state_dict moves between them unchanged,
whatever the embedding optimizer (the row-wise Adagrad states are optimizer state, see the SAML docstring).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _backend

from ..ops import _checks

from ..config import SAMLConfig, check_model_inputs
from ..training import TrainingOptimizer, bce_loss, optimizer_state_keys_optional, saml_loss

__all__ = ["SAML", "SAMLConfig", "SharedBottom", "TrainingOptimizer"]


def _boundary_scenario(who: str, scenario, num_scenarios: int):
    """The model's one scenario-range check; the layers below get the result (clamped while the check is
    pending), so they neither re-check nor read out of range (a non-tensor is left to the shape checks)."""
    if isinstance(scenario, Tensor) and scenario.dtype in (torch.int32, torch.int64) and scenario.dim() == 1:
        return _checks.scenario_range(who, scenario, num_scenarios)
    return scenario


def _seq_offsets(B: int, L: int, like: Tensor) -> Tensor:
    return torch.arange(0, B * L + 1, L, device=like.device, dtype=like.dtype)


class SAML(nn.Module):
    """SAML on the package's kernels.

    Args:
        config: a :class:`SAMLConfig`.
        backend: forced backend of every op (None: ``use_backend`` context / env / automatic).
        embedding_optimizer: None (the tables get ordinary dense gradients) | "sgd" | "rowwise_adagrad": the
            embedding tables are updated inside the backward (``nn.ScenarioEmbedding``'s fused optimizer, only the
            touched rows, no gradient tensor); the other parameters are left to a torch optimizer.
            ``TrainingOptimizer`` gives the reference the same row-wise Adagrad math after its backward.
        embedding_lr: learning rate of the fused embedding optimizer.
        device, dtype: factory arguments.

    forward(indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None) -> (main [B], aux [B]) logits:
    indices/offsets feature-major over ``config.features`` (a ``saml_kernels.data.Batch``'s ``inputs()``),
    scenario [B], seq_ids [B, L] (0 = padding) and seq_lengths [B] when the config has a sequence, dense
    [B, num_dense]. ``loss(batch)`` = BCE(main) + aux_loss_weight * BCE(aux). seq_ids must be a 2-D integer
    [B, L] with B = scenario.shape[0], seq_lengths integers in [0, L], dense [B, num_dense]: anything else raises
    ValueError naming the argument and the shapes / position and value. An empty batch (B = 0) gives [0] logits
    and a loss of 0 with zero gradients (not NaN); with a fused embedding optimizer it updates nothing.

    State dicts: the *weights* state_dict is the same for every ``embedding_optimizer`` and for both twins
    (``SAML`` and ``saml_kernels.reference.SAMLReference``). The row-wise Adagrad states (``*.global_state`` /
    ``*.scenario_state`` buffers, present only with "rowwise_adagrad") are optimizer state: a strict
    ``load_state_dict`` ignores them when this model has no such buffers and leaves this model's states unchanged
    when the dict lacks them (``saml_kernels.training.optimizer_state_keys_optional``). To resume training
    exactly, save ``TrainingOptimizer.state_dict()`` too (it holds every table's row-wise state).
    """

    def __init__(self, config: SAMLConfig, *, backend: Optional[str] = None,
                 embedding_optimizer: Optional[str] = None, embedding_lr: float = 0.05, embedding_eps: float = 1e-8, device=None, dtype=None):
        super().__init__()
        from . import MultiBranchLinear, MutualUnit, ScenarioAttention, ScenarioEmbedding

        c = self.config = config
        fk = dict(device=device, dtype=dtype)
        M, D = c.num_scenarios, c.embedding_dim
        if backend is not None:  # a bad name fails here, not at the first forward
            _backend.check_name(backend, "SAML(backend=...)")
        self.backend = backend
        emb = dict(backend=backend, optimizer=embedding_optimizer, lr=embedding_lr, eps=embedding_eps, **fk)
        self.embedding = ScenarioEmbedding(c.features, M, D, **emb)
        if c.sequence is not None:
            seq = c.sequence
            self.sequence_embedding = ScenarioEmbedding([(seq.name, seq.num_embeddings, True, "none")], M, D, **emb)
            self.attention = ScenarioAttention(D, c.attention_dim, M, backend=backend, **fk)
        self.aux_layers = nn.ModuleList()
        self.branch_layers = nn.ModuleList()
        ka, kh = c.global_dim, c.scenario_dim
        for kind, na, nh in zip(c.layer_kinds(), c.aux_hidden, c.branch_hidden):
            self.aux_layers.append(nn.Linear(ka, na, **fk))
            if kind == "mutual":
                self.branch_layers.append(MutualUnit(kh, nh, M, aux_features=ka, activation="relu",
                                                     temperature=c.temperature, similarity=c.similarity,
                                                     backend=backend, **fk))
            else:
                self.branch_layers.append(MultiBranchLinear(kh, nh, M, aux_features=ka, bias=True, activation="relu",
                                                            route=kind, grad_mask="own", backend=backend, **fk))
            ka, kh = na, nh
        self.aux_head = nn.Linear(ka, 1, **fk)
        self.branch_head = MultiBranchLinear(kh, 1, M, aux_features=ka, bias=True, activation=None, route="own",
                                             backend=backend, **fk)
        self.dropout = nn.Dropout(c.dropout)
        self.register_load_state_dict_post_hook(optimizer_state_keys_optional)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def representations(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        """(A_0 [B, global_dim], H_0 [B, scenario_dim])."""
        c = self.config
        B, L = check_model_inputs("SAML", c, scenario, seq_ids, seq_lengths, dense)
        D = c.embedding_dim
        e_g, e_s = self.embedding(indices, offsets, scenario)
        # explicit widths: reshape(B, -1) is ambiguous (an error) for B = 0
        glob, scen = [e_g.reshape(B, len(c.features) * D)], [e_s.reshape(B, c.num_aware * D)]
        if c.sequence is not None:
            s_g, s_s = self.sequence_embedding(seq_ids.reshape(-1), _seq_offsets(B, L, seq_ids), scenario)
            fg, fs = c.target_slots()
            # a fresh contiguous copy: .contiguous() on the strided slice would make torch.export specialise B != 1
            target_s = e_s[:, fs].clone(memory_format=torch.contiguous_format)
            att_g, att_l = self.attention(e_g[:, fg], target_s, s_g.reshape(B, L, D), s_s.reshape(B, L, D),
                                          seq_lengths, scenario)
            glob.append(att_g)
            scen.append(att_l)
        if c.num_dense:
            glob.append(dense.to(e_g.dtype))
        return torch.cat(glob, 1), torch.cat(scen, 1)

    def _branch(self, kind: str, branch: nn.Module, h: Tensor, scenario: Tensor, a: Tensor) -> Tensor:
        if kind == "mutual" and h.dim() == 3:
            # per-branch inputs (a route-"all" layer below): the unfused pair, all branches then the mutual mix
            from ..ops.mbranch_linear import mbranch_linear
            from ..ops.mutual_unit import mutual_unit

            z = mbranch_linear(h, branch.weight, branch.bias, scenario, route="all", activation="relu",
                               grad_mask="own", aux=a, aux_weight=branch.aux_weight, backend=self.backend)
            return mutual_unit(z, scenario, temperature=self.config.temperature, similarity=self.config.similarity,
                               backend=self.backend)
        return branch(h, scenario, a)

    def forward(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        # The value checks of every layer (ids, offsets, scenario ids, lengths) are read with one host sync when
        # the forward ends, and a bad input raises its layer's clear error then, before any backward (so nothing
        # is written to the tables). Inside ``_checks.capture_safe_checks()`` there is no sync at all.
        with _checks.deferred_checks():
            return self._forward(indices, offsets, _boundary_scenario("SAML", scenario, self.config.num_scenarios),
                                 seq_ids, seq_lengths, dense)

    def _forward(self, indices, offsets, scenario, seq_ids, seq_lengths, dense):
        a, h = self.representations(indices, offsets, scenario, seq_ids, seq_lengths, dense)
        for kind, aux_layer, branch in zip(self.config.layer_kinds(), self.aux_layers, self.branch_layers):
            h_next = self.dropout(self._branch(kind, branch, h, scenario, a))
            a = self.dropout(torch.relu(aux_layer(a)))
            h = h_next
        return self.branch_head(h, scenario, a).squeeze(-1), self.aux_head(a).squeeze(-1)

    def loss(self, batch) -> Tensor:
        """BCE(main) + aux_loss_weight * BCE(aux) on a ``saml_kernels.data.Batch`` (0 for an empty batch)."""
        main, aux = self(*batch.inputs())
        return saml_loss(main, aux, batch.label, self.config.aux_loss_weight)


class SharedBottom(nn.Module):
    """Shared-bottom baseline with SAML's embedding budget: the same tables and widths, no scenario structure in
    the representation (only the global embeddings E_g, global attention and dense go in), one shared bottom MLP
    (``config.branch_hidden[:-1]``) and a per-scenario tower (last hidden layer + logit, own route).

    forward(...) -> logit [B] (same inputs and input checks as SAML); loss(batch) = BCE(logit) (0 with zero
    gradients for an empty batch). ``backend`` applies to every op, the tower's included. Its state_dict follows
    SAML's rule: row-wise Adagrad states are optimizer state (optional in a strict load).
    """

    def __init__(self, config: SAMLConfig, *, backend: Optional[str] = None,
                 embedding_optimizer: Optional[str] = None, embedding_lr: float = 0.05, embedding_eps: float = 1e-8, device=None, dtype=None):
        super().__init__()
        from . import MultiBranchLinear, ScenarioAttention, ScenarioEmbedding

        c = self.config = config
        fk = dict(device=device, dtype=dtype)
        M, D = c.num_scenarios, c.embedding_dim
        emb = dict(backend=backend, optimizer=embedding_optimizer, lr=embedding_lr, eps=embedding_eps, **fk)
        self.embedding = ScenarioEmbedding([(f.name, f.num_embeddings, False, f.pooling) for f in c.features], M, D,
                                           **emb)
        if c.sequence is not None:
            seq = c.sequence
            self.sequence_embedding = ScenarioEmbedding([(seq.name, seq.num_embeddings, False, "none")], M, D, **emb)
            self.attention = ScenarioAttention(D, c.attention_dim, M, backend=backend, **fk)
        k = c.global_dim
        layers = []
        for n in c.branch_hidden[:-1]:
            layers += [nn.Linear(k, n, **fk), nn.ReLU(), nn.Dropout(c.dropout)]
            k = n
        self.bottom = nn.Sequential(*layers)
        self.tower = MultiBranchLinear(k, c.branch_hidden[-1], M, bias=True, activation="relu", route="own",
                                       backend=backend, **fk)
        self.head = MultiBranchLinear(c.branch_hidden[-1], 1, M, bias=True, activation=None, route="own",
                                      backend=backend, **fk)
        self.register_load_state_dict_post_hook(optimizer_state_keys_optional)

    def forward(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        with _checks.deferred_checks():  # one host sync for the value checks of the whole forward (see SAML)
            return self._forward(indices, offsets,
                                 _boundary_scenario("SharedBottom", scenario, self.config.num_scenarios), seq_ids,
                                 seq_lengths, dense)

    def _forward(self, indices, offsets, scenario, seq_ids, seq_lengths, dense):
        c = self.config
        B, L = check_model_inputs("SharedBottom", c, scenario, seq_ids, seq_lengths, dense)
        D = c.embedding_dim
        e_g, _ = self.embedding(indices, offsets, scenario)
        parts = [e_g.reshape(B, len(c.features) * D)]  # explicit width: reshape(B, -1) fails for B = 0
        if c.sequence is not None:
            s_g, _ = self.sequence_embedding(seq_ids.reshape(-1), _seq_offsets(B, L, seq_ids), scenario)
            fg, _ = c.target_slots()
            s_g = s_g.reshape(B, L, D)
            # the global half of the attention only (the local half gets the same global inputs)
            att_g, _ = self.attention(e_g[:, fg], e_g[:, fg], s_g, s_g, seq_lengths, scenario)
            parts.append(att_g)
        if c.num_dense:
            parts.append(dense.to(e_g.dtype))
        h = self.bottom(torch.cat(parts, 1))
        return self.head(self.tower(h, scenario), scenario).squeeze(-1)

    def loss(self, batch) -> Tensor:
        """Mean BCE of the logit on a ``saml_kernels.data.Batch`` (0 with zero gradients for an empty batch)."""
        return bce_loss(self(*batch.inputs()), batch.label)
