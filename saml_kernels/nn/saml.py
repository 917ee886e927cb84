"""``SAML`` (docs/design.md section 1) and the ``SharedBottom`` baseline, each one model body built from a layer set.

    E_g, E_s = embedding(ids, scenario);  S_g, S_s = sequence_embedding(behaviour ids, scenario)  (pooling "none")
    att_g, att_l = attention(E_g[target], E_s[target], S_g, S_s, lengths, scenario)
    A_0 = [E_g ; att_g ; dense],  H_0 = [E_s ; att_l]
    A_l = dropout(relu(Linear(A_{l-1})))                               auxiliary network
    H_l = dropout(branch_l(H_{l-1}, aux=A_{l-1}))                       multi-branch network: mutual_unit at
          config.mutual_layers, multi_branch_linear route "all" below a mutual layer (per-branch outputs
          [M, B, N], which the mutual layer takes as its per-branch input), route "own" above
    main = branch_head(H_L, aux=A_L) (own route),  aux = aux_head(A_L)
    loss = BCE(main) + aux_loss_weight * BCE(aux)

The layer classes come from a :class:`~saml_kernels._layer_set.LayerSet` (``layers=``): ``KERNEL_LAYERS`` (the
default, this package's fused layers) or ``REFERENCE_LAYERS`` (the plain-PyTorch twins;
``saml_kernels.reference.SAMLReference`` and ``SharedBottomReference`` are these bodies built with them). The twins
take the same constructor arguments and hold the same parameter names, so both models have one structure and
their state_dicts interchange. The kernel-only options reach the layers only with the kernel set (see
:func:`layer_options`), and only the kernel forward runs under deferred value checks (see
:func:`checked_forward`; both check the scenario range once at the boundary).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _backend
from .._layer_set import LayerSet
from ..config import SAMLConfig, check_model_inputs
from ..ops import _checks
from ..training import TrainingOptimizer, bce_loss, optimizer_state_keys_optional, saml_loss
from .layer_set import KERNEL_LAYERS

__all__ = ["SAML", "SAMLConfig", "SharedBottom", "TrainingOptimizer"]


def layer_options(who: str, layers: LayerSet, *, backend: Optional[str], embedding_optimizer: Optional[str],
                  embedding_lr: float, embedding_eps: float, device, dtype) -> tuple[dict, dict]:
    """(keyword options of every layer, keyword options of the embedding layers) of a body built from ``layers``.

    Every layer gets ``device`` / ``dtype``, and with the kernel layers ``backend`` (its name is checked here, so a
    bad one fails when the model is built). The embedding layers also get ``optimizer=embedding_optimizer``: the
    kernel layers fuse it into their backward with ``lr=embedding_lr``, ``eps=embedding_eps``; the reference layers
    keep the row-wise Adagrad states that ``TrainingOptimizer`` updates after the backward and fuse nothing, so
    the learning rate and eps are ``TrainingOptimizer``'s there. A ``backend`` given with a set other than the
    kernel one raises ValueError (it would select nothing)."""
    factory = dict(device=device, dtype=dtype)
    if not layers.kernels:
        if backend is not None:
            raise ValueError(f"{who}: backend={backend!r} selects kernels, but the {layers.name} layers have none")
        return factory, dict(optimizer=embedding_optimizer, **factory)
    if backend is not None:
        _backend.check_name(backend, f"{who}(backend=...)")
    common = dict(backend=backend, **factory)
    return common, dict(optimizer=embedding_optimizer, lr=embedding_lr, eps=embedding_eps, **common)


def _boundary_scenario(who: str, scenario, num_scenarios: int):
    """The model's one scenario-range check; the layers below get the result (clamped while the check is
    pending), so they neither re-check nor read out of range (a non-tensor is left to the shape checks)."""
    if isinstance(scenario, Tensor) and scenario.dtype in (torch.int32, torch.int64) and scenario.dim() == 1:
        return _checks.scenario_range(who, scenario, num_scenarios)
    return scenario


def checked_forward(model: nn.Module, forward, indices, offsets, scenario, *rest):
    """``forward(indices, offsets, scenario, *rest)`` of a body with ``model.layer_set`` and ``model.config``, the
    scenario range checked once here at the boundary (IndexError naming the model, the position and the value).

    With the kernel layers it runs under ``saml_kernels.deferred_checks()``: the value checks of every layer (ids,
    offsets, scenario ids, lengths) are read with one host sync when the forward ends, and a bad input raises its
    layer's clear error then, before any backward (so nothing is written to the tables); the layers get the
    boundary's scenario (clamped while its check is pending). Inside ``capture_safe_checks()`` there is no sync at
    all. The reference layers check each input at once (plain PyTorch), so their forward runs outside that block
    (and under ``torch.compile`` without the boundary check, which would add a graph break)."""
    who, M = type(model).__name__, model.config.num_scenarios
    if not model.layer_set.kernels:
        if not torch.compiler.is_compiling():  # compiled, a host read would break the graph: the layers' checks do
            scenario = _boundary_scenario(who, scenario, M)
        return forward(indices, offsets, scenario, *rest)
    with _checks.deferred_checks():
        return forward(indices, offsets, _boundary_scenario(who, scenario, M), *rest)


def seq_offsets(B: int, L: int, like: Tensor) -> Tensor:
    """Offsets [B + 1] of B bags of L ids each (a padded [B, L] sequence as jagged input), dtype of ``like``."""
    return torch.arange(0, B * L + 1, L, device=like.device, dtype=like.dtype)


class SAML(nn.Module):
    """SAML, built from the kernel layers by default.

    Args:
        config: a :class:`SAMLConfig`.
        layers: the :class:`~saml_kernels._layer_set.LayerSet` of the body (default ``KERNEL_LAYERS``).
        backend: forced backend of every op (None: ``use_backend`` context / env / automatic). Kernel layers only.
        embedding_optimizer: "rowwise_adagrad" (the default) | "sgd": the embedding tables are updated inside
            the backward (``nn.ScenarioEmbedding``'s fused optimizer, only the touched rows, no gradient tensor,
            so the step does not grow with the tables); the other parameters are left to a torch optimizer
            (``TrainingOptimizer``, built with the same ``embedding_lr`` / ``eps``). None: the tables get ordinary
            dense gradients (``TrainingOptimizer.step`` then updates their non-zero rows; a table above 1M rows
            warns once). ``TrainingOptimizer`` gives the reference layers the same row-wise Adagrad math after
            their backward (they take None | "rowwise_adagrad", default "rowwise_adagrad", and keep the states).
        embedding_lr, embedding_eps: learning rate and eps of the fused embedding optimizer (kernel layers).
        device, dtype: factory arguments.

    forward(indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None) -> (main [B], aux [B]) logits:
    indices/offsets feature-major over ``config.features`` (a ``saml_kernels.data.Batch``'s ``inputs()``),
    scenario [B], seq_ids [B, L] (0 = padding) and seq_lengths [B] when the config has a sequence, dense
    [B, num_dense]. ``loss(batch)`` = BCE(main) + aux_loss_weight * BCE(aux). seq_ids must be a 2-D integer
    [B, L] with B = scenario.shape[0], seq_lengths integers in [0, L], dense [B, num_dense]: anything else raises
    ValueError naming the argument and the shapes / position and value. An empty batch (B = 0) gives [0] logits
    and a loss of 0 with zero gradients (not NaN); with a fused embedding optimizer it updates nothing.

    State dicts: the *weights* state_dict is the same for every ``embedding_optimizer`` and every layer set (so
    ``SAML`` and ``saml_kernels.reference.SAMLReference`` interchange). The row-wise Adagrad states
    (``*.global_state`` / ``*.scenario_state`` buffers, present only with "rowwise_adagrad") are optimizer state: a
    strict ``load_state_dict`` ignores them when this model has no such buffers and leaves this model's states
    unchanged when the dict lacks them (``saml_kernels.training.optimizer_state_keys_optional``). To resume
    training exactly, save ``TrainingOptimizer.state_dict()`` too (it holds every table's row-wise state).

    Parameter names: embedding.{global_weight, scenario_weight}, sequence_embedding.{global_weight,
    scenario_weight}, attention.{global_query, global_key, value, local_query, local_key}.weight,
    aux_layers.<l>.{weight, bias}, aux_head.{weight, bias}, branch_layers.<l>.{weight, bias, aux_weight},
    branch_head.{weight, bias, aux_weight}.
    """

    def __init__(self, config: SAMLConfig, *, layers: LayerSet = KERNEL_LAYERS, backend: Optional[str] = None,
                 embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 embedding_lr: float = 0.05, embedding_eps: float = 1e-8,
                 device=None, dtype=None):
        super().__init__()
        kw, emb = layer_options(type(self).__name__, layers, backend=backend, embedding_optimizer=embedding_optimizer,
                                embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device, dtype=dtype)
        c = self.config = config
        self.layer_set, self.backend = layers, backend
        fk = dict(device=device, dtype=dtype)
        M, D = c.num_scenarios, c.embedding_dim
        self.embedding = layers.scenario_embedding(c.features, M, D, **emb)
        if c.sequence is not None:
            seq = c.sequence
            self.sequence_embedding = layers.scenario_embedding([(seq.name, seq.num_embeddings, True, "none")], M, D,
                                                                **emb)
            self.attention = layers.attention(D, c.attention_dim, M, **kw)
        self.aux_layers = nn.ModuleList()
        self.branch_layers = nn.ModuleList()
        ka, kh = c.global_dim, c.scenario_dim
        for kind, na, nh in zip(c.layer_kinds(), c.aux_hidden, c.branch_hidden):
            self.aux_layers.append(nn.Linear(ka, na, **fk))
            if kind == "mutual":
                self.branch_layers.append(layers.mutual_unit(kh, nh, M, aux_features=ka, activation="relu",
                                                             temperature=c.temperature, similarity=c.similarity,
                                                             **kw))
            else:
                self.branch_layers.append(layers.multi_branch_linear(kh, nh, M, aux_features=ka, bias=True,
                                                                     activation="relu", route=kind, grad_mask="own",
                                                                     **kw))
            ka, kh = na, nh
        self.aux_head = nn.Linear(ka, 1, **fk)
        self.branch_head = layers.multi_branch_linear(kh, 1, M, aux_features=ka, bias=True, activation=None,
                                                      route="own", **kw)
        self.dropout = nn.Dropout(c.dropout)
        self.register_load_state_dict_post_hook(optimizer_state_keys_optional)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def representations(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        """(A_0 [B, global_dim], H_0 [B, scenario_dim])."""
        c = self.config
        B, L = check_model_inputs(type(self).__name__, c, scenario, seq_ids, seq_lengths, dense)
        D = c.embedding_dim
        e_g, e_s = self.embedding(indices, offsets, scenario)
        # explicit widths: reshape(B, -1) is ambiguous (an error) for B = 0
        glob, scen = [e_g.reshape(B, len(c.features) * D)], [e_s.reshape(B, c.num_aware * D)]
        if c.sequence is not None:
            s_g, s_s = self.sequence_embedding(seq_ids.reshape(-1), seq_offsets(B, L, seq_ids), scenario)
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

    def forward(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        return checked_forward(self, self._forward, indices, offsets, scenario, seq_ids, seq_lengths, dense)

    def _forward(self, indices, offsets, scenario, seq_ids, seq_lengths, dense):
        a, h = self.representations(indices, offsets, scenario, seq_ids, seq_lengths, dense)
        for aux_layer, branch in zip(self.aux_layers, self.branch_layers):
            h_next = self.dropout(branch(h, scenario, a))
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

    Arguments as :class:`SAML` (``layers``, ``backend``, ``embedding_optimizer``, ...); ``backend`` applies to
    every op, the tower's included. forward(...) -> logit [B] (same inputs and input checks as SAML);
    loss(batch) = BCE(logit) (0 with zero gradients for an empty batch). Its state_dict follows SAML's rule:
    row-wise Adagrad states are optimizer state (optional in a strict load). Parameter names: embedding.*,
    sequence_embedding.*, attention.* (as SAML), bottom.<3 i>.{weight, bias}, tower.{weight, bias},
    head.{weight, bias}.
    """

    def __init__(self, config: SAMLConfig, *, layers: LayerSet = KERNEL_LAYERS, backend: Optional[str] = None,
                 embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 embedding_lr: float = 0.05, embedding_eps: float = 1e-8,
                 device=None, dtype=None):
        super().__init__()
        kw, emb = layer_options(type(self).__name__, layers, backend=backend, embedding_optimizer=embedding_optimizer,
                                embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device, dtype=dtype)
        c = self.config = config
        self.layer_set, self.backend = layers, backend
        fk = dict(device=device, dtype=dtype)
        M, D = c.num_scenarios, c.embedding_dim
        self.embedding = layers.scenario_embedding([(f.name, f.num_embeddings, False, f.pooling) for f in c.features],
                                                   M, D, **emb)
        if c.sequence is not None:
            seq = c.sequence
            self.sequence_embedding = layers.scenario_embedding([(seq.name, seq.num_embeddings, False, "none")], M, D,
                                                                **emb)
            self.attention = layers.attention(D, c.attention_dim, M, **kw)
        k = c.global_dim
        bottom = []
        for n in c.branch_hidden[:-1]:
            bottom += [nn.Linear(k, n, **fk), nn.ReLU(), nn.Dropout(c.dropout)]
            k = n
        self.bottom = nn.Sequential(*bottom)
        self.tower = layers.multi_branch_linear(k, c.branch_hidden[-1], M, bias=True, activation="relu", route="own",
                                                **kw)
        self.head = layers.multi_branch_linear(c.branch_hidden[-1], 1, M, bias=True, activation=None, route="own",
                                               **kw)
        self.register_load_state_dict_post_hook(optimizer_state_keys_optional)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        return checked_forward(self, self._forward, indices, offsets, scenario, seq_ids, seq_lengths, dense)

    def _forward(self, indices, offsets, scenario, seq_ids, seq_lengths, dense):
        c = self.config
        B, L = check_model_inputs(type(self).__name__, c, scenario, seq_ids, seq_lengths, dense)
        D = c.embedding_dim
        e_g, _ = self.embedding(indices, offsets, scenario)
        parts = [e_g.reshape(B, len(c.features) * D)]  # explicit width: reshape(B, -1) fails for B = 0
        if c.sequence is not None:
            s_g, _ = self.sequence_embedding(seq_ids.reshape(-1), seq_offsets(B, L, seq_ids), scenario)
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
