"""The SAML configuration and the plain-PyTorch SAML model (``SAMLReference``): the oracle of the accelerated
``saml_kernels.nn.SAML`` and the eager baseline of the model benchmark.

Model (docs/design.md section 1), with F features of which Fs scenario-aware, embedding dim D, sequence length L:

    E_g [B, F, D], E_s [B, Fs, D]       = embedding(ids, scenario)
    S_g [B, L, D], S_s [B, L, D]         = sequence_embedding(behaviour ids, scenario)
    att_g, att_l [B, D]                  = attention(E_g[target], E_s[target], S_g, S_s, lengths, scenario)
    A_0 = [E_g ; att_g ; dense]          (the global representation)
    H_0 = [E_s ; att_l]                  (the scenario representation)
    A_l = dropout(relu(A_{l-1} Wa_l + ba_l))                    auxiliary network, l = 1..L_h
    H_l = branch layer l ([H_{l-1} ; A_{l-1}])                 own route, MutualUnit at mutual layers,
                                                                route "all" below a mutual layer
    main = [H_L ; A_L] w_{s} + b_{s}  (own branch),  aux = A_L w_a + b_a
    loss = BCE(main, y) + aux_loss_weight * BCE(aux, y)

Parameter names (shared with ``nn.SAML``): embedding.{global_weight, scenario_weight},
sequence_embedding.{global_weight, scenario_weight}, attention.{global_query, global_key, value,
local_query, local_key}.weight, aux_layers.<l>.{weight, bias}, aux_head.{weight, bias},
branch_layers.<l>.{weight, bias, aux_weight}, branch_head.{weight, bias, aux_weight}.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..config import SAMLConfig, check_model_inputs
from ..training import (OPTIMIZER_STATE_NAMES, TrainingOptimizer, bce_loss,  # noqa: F401  (re-exported)
                        optimizer_state_keys_optional, saml_loss)
from .attention import RefScenarioAttention
from .layers import RefMultiBranchLinear, RefMutualUnit, RefScenarioEmbedding


def _seq_offsets(B: int, L: int, like: Tensor) -> Tensor:
    return torch.arange(0, B * L + 1, L, device=like.device, dtype=like.dtype)


class SAMLReference(nn.Module):
    """SAML in plain PyTorch (see the module docstring); same parameter names as ``saml_kernels.nn.SAML``.

    embedding_optimizer: None or "rowwise_adagrad": the latter registers the row-wise Adagrad state buffers
    (``global_state``, ``scenario_state``) of ``nn.SAML(embedding_optimizer="rowwise_adagrad")``, which
    :class:`TrainingOptimizer` then updates with the same math after the backward (not fused).

    forward(indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None) -> (main [B], aux [B]) logits;
    seq_ids [B, L] integer, seq_lengths [B] integer in [0, L], dense [B, num_dense] (wrong shapes or lengths raise
    ValueError naming the argument). An empty batch (B = 0) gives [0] logits and ``loss`` 0 with zero gradients.

    State dicts: the *weights* state_dict is the same for every ``embedding_optimizer`` and for both twins
    (``nn.SAML`` and ``SAMLReference``). The row-wise Adagrad states (``*.global_state`` / ``*.scenario_state``
    buffers, present only with "rowwise_adagrad") are optimizer state: a strict ``load_state_dict`` ignores them
    when the model has no such buffers and leaves the model's own states unchanged when the dict lacks them (see
    :func:`optimizer_state_keys_optional`). To resume training exactly, save ``TrainingOptimizer.state_dict()``
    too (it holds every table's row-wise state).
    """

    def __init__(self, config: SAMLConfig, *, embedding_optimizer: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        c = self.config = config
        fk = dict(device=device, dtype=dtype)
        M, D = c.num_scenarios, c.embedding_dim
        if embedding_optimizer not in (None, "rowwise_adagrad"):
            raise ValueError(f"SAMLReference: embedding_optimizer must be None or 'rowwise_adagrad', "
                             f"got {embedding_optimizer!r}")
        st = dict(optimizer_state=embedding_optimizer == "rowwise_adagrad", **fk)
        self.embedding = RefScenarioEmbedding(c.features, M, D, **st)
        if c.sequence is not None:
            seq = c.sequence
            self.sequence_embedding = RefScenarioEmbedding([(seq.name, seq.num_embeddings, True, "none")], M, D, **st)
            self.attention = RefScenarioAttention(D, c.attention_dim, M, **fk)
        self.aux_layers = nn.ModuleList()
        self.branch_layers = nn.ModuleList()
        ka, kh = c.global_dim, c.scenario_dim
        for kind, na, nh in zip(c.layer_kinds(), c.aux_hidden, c.branch_hidden):
            self.aux_layers.append(nn.Linear(ka, na, **fk))
            if kind == "mutual":
                self.branch_layers.append(RefMutualUnit(kh, nh, M, ka, "relu", c.temperature, c.similarity, **fk))
            else:
                self.branch_layers.append(RefMultiBranchLinear(kh, nh, M, ka, True, "relu", kind, "own", **fk))
            ka, kh = na, nh
        self.aux_head = nn.Linear(ka, 1, **fk)
        self.branch_head = RefMultiBranchLinear(kh, 1, M, ka, True, None, "own", **fk)
        self.dropout = nn.Dropout(c.dropout)
        self.register_load_state_dict_post_hook(optimizer_state_keys_optional)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def representations(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        """(A_0 [B, global_dim], H_0 [B, scenario_dim])."""
        c = self.config
        B, L = check_model_inputs("SAMLReference", c, scenario, seq_ids, seq_lengths, dense)
        D = c.embedding_dim
        e_g, e_s = self.embedding(indices, offsets, scenario)
        # explicit widths: reshape(B, -1) is ambiguous (an error) for B = 0
        glob, scen = [e_g.reshape(B, len(c.features) * D)], [e_s.reshape(B, c.num_aware * D)]
        if c.sequence is not None:
            s_g, s_s = self.sequence_embedding(seq_ids.reshape(-1), _seq_offsets(B, L, seq_ids), scenario)
            fg, fs = c.target_slots()
            att_g, att_l = self.attention(e_g[:, fg], e_s[:, fs], s_g.reshape(B, L, D), s_s.reshape(B, L, D),
                                          seq_lengths, scenario)
            glob.append(att_g)
            scen.append(att_l)
        if c.num_dense:
            glob.append(dense.to(e_g.dtype))
        return torch.cat(glob, 1), torch.cat(scen, 1)

    def forward(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
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
