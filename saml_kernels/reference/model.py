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

import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.batch import FeatureSpec, SequenceSpec
from .attention import RefScenarioAttention
from .layers import RefMultiBranchLinear, RefMutualUnit, RefScenarioEmbedding, size_arg


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

    Sizes (num_scenarios, embedding_dim, attention_dim, every aux/branch hidden width >= 1; num_dense and
    mutual_layers >= 0) take any integral value (int, numpy integer, 0-dim integer tensor) but not bool; anything
    else raises TypeError / ValueError naming the field and the value.
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
        # sizes: any integral value (numpy ints, 0-dim int tensors), never bool or float; stored as Python ints
        size = lambda name, v, minimum=1: size_arg("SAMLConfig", name, v, minimum)  # noqa: E731
        self.num_scenarios = size("num_scenarios", self.num_scenarios)
        self.embedding_dim = size("embedding_dim", self.embedding_dim)
        self.attention_dim = size("attention_dim", self.attention_dim)
        self.num_dense = size("num_dense", self.num_dense, 0)
        self.aux_hidden = tuple(size(f"aux_hidden[{i}]", v) for i, v in enumerate(self.aux_hidden))
        self.branch_hidden = tuple(size(f"branch_hidden[{i}]", v) for i, v in enumerate(self.branch_hidden))
        self.mutual_layers = tuple(sorted(set(size(f"mutual_layers[{i}]", m, 0)
                                              for i, m in enumerate(self.mutual_layers))))
        if self.sequence is not None:
            self.sequence = SequenceSpec(*self.sequence)
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"SAMLConfig: feature names must be unique, got {names}")
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


def _is_int_tensor(t) -> bool:
    return isinstance(t, Tensor) and not (t.dtype == torch.bool or t.is_floating_point() or t.is_complex())


def check_model_inputs(who: str, config: SAMLConfig, scenario, seq_ids, seq_lengths, dense) -> tuple[int, int]:
    """Shape checks of the model inputs that the layers cannot make (they only see derived tensors); returns
    (B, L) with B = scenario.shape[0] and L = seq_ids.shape[1] (0 without a sequence). No host sync: only shapes
    and dtypes are read (the value checks are the layers': ids in the embedding op, lengths in the attention).

    scenario [B]; with ``config.sequence``: seq_ids [B, L] integer (L >= 1) and seq_lengths [B] (both required);
    with ``config.num_dense``: dense [B, num_dense]. Raises ValueError naming the argument and the shapes."""
    if not isinstance(scenario, Tensor) or scenario.dim() != 1:
        raise ValueError(f"{who}: scenario must be a [B] tensor, got "
                         f"{list(scenario.shape) if isinstance(scenario, Tensor) else type(scenario).__name__}")
    B, L = scenario.shape[0], 0
    if config.sequence is not None:
        if seq_ids is None or seq_lengths is None:
            raise ValueError(f"{who}: this config has a behaviour sequence; pass seq_ids [B, L] and seq_lengths [B]")
        if not _is_int_tensor(seq_ids) or seq_ids.dim() != 2 or seq_ids.shape[0] != B or seq_ids.shape[1] < 1:
            got = (f"{seq_ids.dtype} of shape {list(seq_ids.shape)}" if isinstance(seq_ids, Tensor)
                   else type(seq_ids).__name__)
            raise ValueError(f"{who}: seq_ids must be a 2-D integer tensor [B, L] with B = scenario.shape[0] = {B} "
                             f"and L >= 1, got {got}")
        L = seq_ids.shape[1]
    if config.num_dense:
        if not isinstance(dense, Tensor) or tuple(dense.shape) != (B, config.num_dense):
            raise ValueError(f"{who}: dense must be [B, num_dense] = [{B}, {config.num_dense}], got "
                             f"{list(dense.shape) if isinstance(dense, Tensor) else dense}")
    return B, L


def bce_loss(logit: Tensor, label: Tensor) -> Tensor:
    """mean_b BCE(logit_b, label_b) (with logits), logit and label [B].

    An empty batch (B = 0) has loss 0, not the NaN of a mean over no samples: ``logit.sum()``, which stays in the
    autograd graph, so backward runs and gives exactly zero gradients (a training step on it moves nothing except
    what an optimizer's own state does, e.g. Adam momentum from earlier steps)."""
    if logit.shape[0] == 0:
        return logit.sum()
    return nn.functional.binary_cross_entropy_with_logits(logit, label.to(logit.dtype))


OPTIMIZER_STATE_NAMES = ("global_state", "scenario_state")


def optimizer_state_keys_optional(model: nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook of SAML, SAMLReference and SharedBottom: the row-wise Adagrad states of the
    embedding modules (``<embedding module>.global_state`` / ``.scenario_state``) are optimizer state, not weights,
    so they never make a (strict) load fail:

    - present in the state_dict but absent from the model (an Adagrad model's state_dict into a model built with
      another embedding optimizer): ignored;
    - absent from the state_dict but present in the model (a plain state_dict into an Adagrad model): the model's
      states are left as they are (zero after construction).

    Present in both, they load as usual. Keys are matched by their embedding module's path (also under a wrapper
    prefix such as DDP's ``module.``); every other key keeps the strict rules."""
    emb = [n for n, m in model.named_modules() if isinstance(getattr(m, "global_weight", None), nn.Parameter)]

    def is_state(key: str) -> bool:
        prefix, _, leaf = key.rpartition(".")
        return leaf in OPTIMIZER_STATE_NAMES and any(prefix == e or prefix.endswith("." + e) for e in emb)

    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k for k in keys if not is_state(k)]


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


def saml_loss(main: Tensor, aux: Tensor, label: Tensor, aux_loss_weight: float) -> Tensor:
    """BCE(main, label) + aux_loss_weight * BCE(aux, label), means over the batch (main, aux, label [B]).

    An empty batch gives 0 with zero gradients (see :func:`bce_loss`), not NaN."""
    return bce_loss(main, label) + aux_loss_weight * bce_loss(aux, label)


class TrainingOptimizer:
    """The training recipe of the main job and the model benchmark: Adam on the dense parameters and row-wise
    Adagrad on the embedding tables (FBGEMM's recipe for sparse tables):

        state[row] += mean_d(g[row]^2);   w[row] -= embedding_lr * g[row] / (sqrt(state[row]) + eps)

    with g the row's gradient summed over the batch (rows not in the batch have g = 0 and do not change).
    For an embedding module that applies it fused in its backward (``nn.ScenarioEmbedding(optimizer=...)`` in
    training) nothing is left to do here; for one with dense gradients (the reference) it runs after the
    backward, on the module's ``global_state`` / ``scenario_state`` buffers when it has them (else on float32
    states [rows] kept here). Both paths are the same math, so SAML and SAMLReference stay equal step after step.

    Learning rates: ``dense`` is a plain ``torch.optim.Adam`` (fused where torch has it): drive it with any torch
    LR scheduler, ``torch.optim.lr_scheduler.StepLR(opt.dense, ...)``. ``embedding_lr`` is an attribute read at
    every step; setting it also sets the fused embedding modules' ``lr`` (used from their next backward), so
    ``opt.embedding_lr = value`` (by hand or from a schedule) drives every table.

    CUDA graphs: ``capturable=True`` builds Adam with ``capturable=True`` so the whole step can be captured
    (``saml_kernels.graphs.CapturedTrainingStep``); the row-wise lr of non-fused tables is then the value at
    capture time (the fused modules read theirs on the device at every replay).

    Checkpoints: ``state_dict()`` / ``load_state_dict()`` hold the dense Adam state and every table's row-wise
    Adagrad state (fused ones included), keyed by parameter name, and the hyper-parameters, so training resumes
    exactly in a fresh model + optimizer (bitwise equal to an uninterrupted run on the CPU).
    """

    def __init__(self, model: nn.Module, lr: float = 2e-3, embedding_lr: float = 0.05, eps: float = 1e-8,
                 capturable: bool = False):
        names = {id(p): n for n, p in model.named_parameters()}
        self.tables = []       # (weight, state) pairs updated here, after the backward
        self._row_states = {}  # table parameter name -> its row-wise state tensor (here's, or a fused module's)
        self._fused = []       # embedding modules whose backward applies the update
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
                self._fused.append(mod)
                self._row_states.update({names[id(w_g)]: mod.global_state, names[id(w_s)]: mod.scenario_state})
                continue
            for w, name in ((w_g, "global_state"), (w_s, "scenario_state")):
                st = getattr(mod, name, None)
                st = st if st is not None else torch.zeros(w.shape[:-1], device=w.device)
                self.tables.append((w, st))
                self._row_states[names[id(w)]] = st
        dense = [(n, p) for n, p in model.named_parameters() if id(p) not in emb_ids]
        self._dense_names = [n for n, _ in dense]
        params = [p for _, p in dense]
        # capturable: Adam keeps its step count on the device, as a CUDA-graph capture of the step needs
        cap = dict(capturable=True) if capturable else {}
        try:  # one fused kernel for all dense parameters (torch's default on CPU is a per-tensor loop)
            self.dense = torch.optim.Adam(params, lr=lr, fused=True, **cap)
        except (RuntimeError, ValueError, TypeError):
            self.dense = torch.optim.Adam(params, lr=lr, foreach=True, **cap)
        self._embedding_lr, self.eps = float(embedding_lr), float(eps)

    @property
    def embedding_lr(self) -> float:
        """Row-wise Adagrad learning rate of the tables; read at every step, settable (also sets the fused
        embedding modules' ``lr``, which their next backward uses)."""
        return self._embedding_lr

    @embedding_lr.setter
    def embedding_lr(self, value: float) -> None:
        value = float(value)
        if not value >= 0:
            raise ValueError(f"TrainingOptimizer: embedding_lr must be >= 0, got {value!r}")
        self._embedding_lr = value
        for mod in self._fused:
            mod.lr = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        for w, _ in self.tables:
            w.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.dense.step()
        lr = self.embedding_lr
        for w, st in self.tables:
            if w.grad is None:
                continue
            g = w.grad.to_dense() if w.grad.is_sparse else w.grad
            st.add_(g.float().pow(2).mean(-1))
            w.sub_((lr * g.float() / (st.sqrt() + self.eps).unsqueeze(-1)).to(w.dtype))

    def state_dict(self) -> dict:
        """{"dense": {"params": [names], "state": {name: Adam state}, "param_group": Adam hyper-parameters},
        "embedding_state": {table parameter name: row-wise Adagrad state [rows] float32}, "embedding_lr", "eps"}.

        The tensors are references to the live states (as ``torch.optim``'s): ``torch.save`` or deep-copy the
        dict to keep a snapshot."""
        sd = self.dense.state_dict()
        (group,) = sd["param_groups"]
        names = self._dense_names
        return {"dense": {"params": list(names), "state": {names[i]: st for i, st in sd["state"].items()},
                          "param_group": {k: v for k, v in group.items() if k != "params"}},
                "embedding_state": dict(self._row_states), "embedding_lr": self.embedding_lr, "eps": self.eps}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a :meth:`state_dict` (of this model or of a fresh one / its twin with the same parameter names).

        Raises ValueError when the parameter or table names differ, a row-wise state has another shape, or the
        saved eps differs from a fused embedding module's (fixed when the model is built)."""
        dense, rows = state_dict["dense"], state_dict["embedding_state"]
        for what, own, saved in (("dense parameters", self._dense_names, dense["params"]),
                                 ("embedding tables", list(self._row_states), list(rows))):
            if set(own) != set(saved):
                raise ValueError(f"TrainingOptimizer.load_state_dict: {what} differ: missing "
                                 f"{sorted(set(own) - set(saved))}, unexpected {sorted(set(saved) - set(own))}")
        eps = float(state_dict["eps"])
        if self._fused and eps != self.eps:
            raise ValueError(f"TrainingOptimizer.load_state_dict: saved eps={eps} differs from the model's fused "
                             f"embedding optimizer eps={self.eps}; build the model with eps={eps}")
        for name, st in self._row_states.items():
            if tuple(rows[name].shape) != tuple(st.shape):
                raise ValueError(f"TrainingOptimizer.load_state_dict: row-wise state of {name} has shape "
                                 f"{list(rows[name].shape)}, expected {list(st.shape)}")
        index = {n: i for i, n in enumerate(self._dense_names)}
        group = dict(dense["param_group"])
        own_group = self.dense.param_groups[0]
        for k in ("fused", "foreach", "capturable", "differentiable"):  # how this Adam runs, not training state
            if k in own_group:
                group[k] = own_group[k]
        group["params"] = list(range(len(index)))
        self.dense.load_state_dict({"state": {index[n]: st for n, st in dense["state"].items()},
                                    "param_groups": [group]})
        with torch.no_grad():
            for name, st in self._row_states.items():
                st.copy_(rows[name])
        self.eps = eps
        self.embedding_lr = state_dict["embedding_lr"]
