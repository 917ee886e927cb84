"""The SAML configuration and the plain-PyTorch SAML model (``SAMLReference``): the oracle of the accelerated
``saml_kernels.nn.SAML`` and the eager baseline of the model benchmark.

Model (DESIGN section 1), with F features of which Fs scenario-aware, embedding dim D, sequence length L:

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

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.batch import FeatureSpec, SequenceSpec
from .attention import RefScenarioAttention
from .layers import RefMultiBranchLinear, RefMutualUnit, RefScenarioEmbedding


@dataclasses.dataclass
class SAMLConfig:
    """Configuration of SAML (and of the shared-bottom baseline).

    features: FeatureSpec (name, num_embeddings, scenario_aware, pooling) list of the pooled sparse features.
    num_scenarios: M. sequence: the behaviour-sequence SequenceSpec (None = no attention).
    target_feature: name of the feature whose embeddings query the sequence (the target item).
    num_dense: dense input columns. attention_dim: d of the query/key projections.
    aux_hidden / branch_hidden: hidden sizes of the auxiliary network and of every branch (same depth).
    mutual_layers: hidden-layer indices (0-based) where the MutualUnit runs. temperature, similarity: of the
    mutual unit. aux_loss_weight: weight of the auxiliary BCE. dropout: after every hidden layer.
    """

    features: list
    num_scenarios: int
    embedding_dim: int = 16
    sequence: Optional[SequenceSpec] = None
    target_feature: Optional[str] = None
    num_dense: int = 0
    attention_dim: int = 16
    aux_hidden: tuple = (256, 128)
    branch_hidden: tuple = (256, 128)
    mutual_layers: tuple = (0,)
    temperature: float = 1.0
    similarity: str = "cosine"
    aux_loss_weight: float = 0.3
    dropout: float = 0.0

    def __post_init__(self):
        self.features = [FeatureSpec(*f) for f in self.features]
        self.aux_hidden, self.branch_hidden = tuple(self.aux_hidden), tuple(self.branch_hidden)
        self.mutual_layers = tuple(sorted(set(int(m) for m in self.mutual_layers)))
        if self.sequence is not None:
            self.sequence = SequenceSpec(*self.sequence)
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"SAMLConfig: feature names must be unique, got {names}")
        if self.num_scenarios < 1:
            raise ValueError(f"SAMLConfig: num_scenarios must be >= 1, got {self.num_scenarios}")
        if len(self.aux_hidden) != len(self.branch_hidden) or not self.branch_hidden:
            raise ValueError("SAMLConfig: aux_hidden and branch_hidden need the same (non-zero) number of layers, "
                             f"got {self.aux_hidden} and {self.branch_hidden}")
        bad = [m for m in self.mutual_layers if not 0 <= m < len(self.branch_hidden)]
        if bad:
            raise ValueError(f"SAMLConfig: mutual_layers {bad} out of range [0, {len(self.branch_hidden)})")
        if self.similarity not in ("cosine", "dot"):
            raise ValueError(f"SAMLConfig: similarity must be 'cosine' or 'dot', got {self.similarity!r}")
        if self.temperature <= 0:
            raise ValueError(f"SAMLConfig: temperature must be > 0, got {self.temperature}")
        if self.sequence is not None:
            if self.target_feature not in names:
                raise ValueError(f"SAMLConfig: target_feature {self.target_feature!r} must name one of {names}")
            tf = self.features[names.index(self.target_feature)]
            if not (tf.scenario_aware and self.sequence.scenario_aware):
                raise ValueError("SAMLConfig: the local attention needs a scenario-aware target feature and sequence")
        if self.num_aware == 0 and self.sequence is None:
            raise ValueError("SAMLConfig: at least one scenario-aware feature (or a sequence) is needed")

    @property
    def num_aware(self) -> int:
        return sum(1 for f in self.features if f.scenario_aware)

    @property
    def global_dim(self) -> int:
        """Width of A_0 = [E_g ; att_g ; dense]."""
        return len(self.features) * self.embedding_dim + (self.embedding_dim if self.sequence else 0) + self.num_dense

    @property
    def scenario_dim(self) -> int:
        """Width of H_0 = [E_s ; att_l]."""
        return self.num_aware * self.embedding_dim + (self.embedding_dim if self.sequence else 0)

    def target_slots(self) -> tuple[int, int]:
        """(index of the target feature in E_g, its index in E_s)."""
        names = [f.name for f in self.features]
        f = names.index(self.target_feature)
        return f, sum(1 for g in self.features[:f] if g.scenario_aware)

    def layer_kinds(self) -> list:
        """Per hidden layer: "mutual", "all" (below a mutual layer) or "own"."""
        last = max(self.mutual_layers, default=-1)
        return ["mutual" if l in self.mutual_layers else ("all" if l < last else "own")
                for l in range(len(self.branch_hidden))]

    @classmethod
    def from_data(cls, data, **kw) -> "SAMLConfig":
        """A config matching a ``saml_kernels.data.CTRData`` (features, scenarios, dense, sequence)."""
        names = [f.name for f in data.features]
        target = kw.pop("target_feature", "item" if "item" in names else None)
        return cls(features=list(data.features), num_scenarios=data.num_scenarios, sequence=data.sequence,
                   target_feature=target if data.sequence is not None else None, num_dense=data.num_dense, **kw)


def _seq_offsets(B: int, L: int, like: Tensor) -> Tensor:
    return torch.arange(0, B * L + 1, L, device=like.device, dtype=like.dtype)


class SAMLReference(nn.Module):
    """SAML in plain PyTorch (see the module docstring); same parameter names as ``saml_kernels.nn.SAML``.

    embedding_optimizer: None or "rowwise_adagrad": the latter registers the row-wise Adagrad state buffers
    (``global_state``, ``scenario_state``) of ``nn.SAML(embedding_optimizer="rowwise_adagrad")``, which
    :class:`TrainingOptimizer` then updates with the same math after the backward (not fused).

    forward(indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None) -> (main [B], aux [B]) logits.
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

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def representations(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        """(A_0 [B, global_dim], H_0 [B, scenario_dim])."""
        c = self.config
        e_g, e_s = self.embedding(indices, offsets, scenario)
        B = scenario.shape[0]
        glob, scen = [e_g.reshape(B, -1)], [e_s.reshape(B, -1)]
        if c.sequence is not None:
            L = seq_ids.shape[1]
            s_g, s_s = self.sequence_embedding(seq_ids.reshape(-1), _seq_offsets(B, L, seq_ids), scenario)
            fg, fs = c.target_slots()
            att_g, att_l = self.attention(e_g[:, fg], e_s[:, fs], s_g.reshape(B, L, -1), s_s.reshape(B, L, -1),
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
        """BCE(main) + aux_loss_weight * BCE(aux) on a ``saml_kernels.data.Batch``."""
        main, aux = self(*batch.inputs())
        return saml_loss(main, aux, batch.label, self.config.aux_loss_weight)


def saml_loss(main: Tensor, aux: Tensor, label: Tensor, aux_loss_weight: float) -> Tensor:
    bce = nn.functional.binary_cross_entropy_with_logits
    y = label.to(main.dtype)
    return bce(main, y) + aux_loss_weight * bce(aux, y)


class TrainingOptimizer:
    """The training recipe of the main job and the model benchmark: Adam on the dense parameters and row-wise
    Adagrad on the embedding tables (FBGEMM's recipe for sparse tables):

        state[row] += mean_d(g[row]^2);   w[row] -= embedding_lr * g[row] / (sqrt(state[row]) + eps)

    with g the row's gradient summed over the batch (rows not in the batch have g = 0 and do not change).
    For an embedding module that applies it fused in its backward (``nn.ScenarioEmbedding(optimizer=...)`` in
    training) nothing is left to do here; for one with dense gradients (the reference) it runs after the
    backward, on the module's ``global_state`` / ``scenario_state`` buffers when it has them (else on states
    kept here). Both paths are the same math, so SAML and SAMLReference stay equal step after step.
    """

    def __init__(self, model: nn.Module, lr: float = 2e-3, embedding_lr: float = 0.05, eps: float = 1e-8):
        self.tables = []  # (weight, state) pairs updated here
        emb_ids = set()
        for mod in model.modules():
            w_g, w_s = getattr(mod, "global_weight", None), getattr(mod, "scenario_weight", None)
            if not isinstance(w_g, nn.Parameter) or not isinstance(w_s, nn.Parameter):
                continue
            emb_ids.update((id(w_g), id(w_s)))
            if getattr(mod, "optimizer", None) is not None:  # fused in the module's backward
                if mod.optimizer != "rowwise_adagrad" or mod.lr != embedding_lr or mod.eps != eps:
                    raise ValueError(f"TrainingOptimizer: the model's fused embedding optimizer ({mod.optimizer!r}, "
                                     f"lr={mod.lr}, eps={mod.eps}) differs from this recipe (rowwise_adagrad, "
                                     f"lr={embedding_lr}, eps={eps}); build the model with the same settings")
                continue
            for w, name in ((w_g, "global_state"), (w_s, "scenario_state")):
                st = getattr(mod, name, None)
                self.tables.append((w, st if st is not None else torch.zeros(w.shape[:-1], device=w.device)))
        dense = [p for p in model.parameters() if id(p) not in emb_ids]
        try:  # one fused kernel for all dense parameters (torch's default on CPU is a per-tensor loop)
            self.dense = torch.optim.Adam(dense, lr=lr, fused=True)
        except (RuntimeError, ValueError, TypeError):
            self.dense = torch.optim.Adam(dense, lr=lr, foreach=True)
        self.embedding_lr, self.eps = embedding_lr, eps

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        for w, _ in self.tables:
            w.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.dense.step()
        for w, st in self.tables:
            if w.grad is None:
                continue
            g = w.grad.to_dense() if w.grad.is_sparse else w.grad
            st.add_(g.float().pow(2).mean(-1))
            w.sub_((self.embedding_lr * g.float() / (st.sqrt() + self.eps).unsqueeze(-1)).to(w.dtype))
