"""``SAML`` (docs/design.md section 1), one model body built from a layer set, and what every model body shares
(``ModelBody``, ``layer_options``, ``dense_dtype``, ``checked_forward``; ``SharedBottom`` is in nn/shared_bottom.py).

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
``saml_kernels.reference.SAMLReference`` is this body built with them). The twins
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
from ..training import TrainingOptimizer, optimizer_state_keys_optional, saml_loss
from .layer_set import KERNEL_LAYERS

__all__ = ["SAML", "SAMLConfig", "SharedBottom", "TrainingOptimizer"]  # SharedBottom: nn/shared_bottom.py

# table dtypes a model's embedding_dtype may name (those of the embedding op)
EMBEDDING_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def layer_options(who: str, layers: LayerSet, *, backend: Optional[str], embedding_optimizer: Optional[str],
                  embedding_lr: float, embedding_eps: float, device, dtype, embedding_weight_decay: float = 0.0,
                  embedding_skip_nonfinite: bool = False, embedding_dtype=None,
                  embedding_stochastic_rounding: bool = True) -> tuple[dict, dict]:
    """(keyword options of every layer, keyword options of the embedding layers) of a body built from ``layers``.

    Every layer gets ``device`` / ``dtype``; the embedding layers get ``dtype=embedding_dtype`` when it is given
    (16-bit tables beside float32 dense layers, FBGEMM's usual set-up; the bodies cast the embedding outputs to
    the dense dtype, :func:`dense_dtype`). With the kernel layers every layer also gets ``backend`` (its name is
    checked here, so a bad one fails when the model is built). The embedding layers also get
    ``optimizer=embedding_optimizer``: the kernel layers fuse it into their backward with ``lr=embedding_lr``,
    ``eps=embedding_eps``, ``weight_decay=embedding_weight_decay``, ``skip_nonfinite=embedding_skip_nonfinite``,
    ``stochastic_rounding=embedding_stochastic_rounding``;
    the reference layers keep the row-wise Adagrad states that ``TrainingOptimizer`` updates after the backward
    and fuse nothing, so the learning rate and eps are ``TrainingOptimizer``'s there. Options that select kernels
    or fused behaviour the reference layers do not have (``backend``, a non-zero ``embedding_weight_decay``,
    ``embedding_skip_nonfinite=True``, ``embedding_stochastic_rounding=False``) raise ValueError with another set
    (they would silently do nothing)."""
    factory = dict(device=device, dtype=dtype)
    emb_factory = dict(device=device, dtype=embedding_dtype if embedding_dtype is not None else dtype)
    if embedding_dtype is not None and embedding_dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"{who}: embedding_dtype must be one of {[str(d) for d in EMBEDDING_DTYPES]} or None, "
                         f"got {embedding_dtype!r}")
    weight_decay = embedding_weight_decay
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"{who}: embedding_weight_decay must be a float >= 0, got {embedding_weight_decay!r}")
    if not isinstance(embedding_skip_nonfinite, bool):
        raise TypeError(f"{who}: embedding_skip_nonfinite must be a bool, got {embedding_skip_nonfinite!r}")
    if not isinstance(embedding_stochastic_rounding, bool):
        raise ValueError(f"{who}: embedding_stochastic_rounding must be a bool, got "
                         f"{embedding_stochastic_rounding!r}")
    if not layers.kernels:
        if backend is not None:
            raise ValueError(f"{who}: backend={backend!r} selects kernels, but the {layers.name} layers have none")
        fused_only = [f"{k}={v!r}" for k, v, default in (("embedding_weight_decay", embedding_weight_decay, 0.0),
                                                          ("embedding_skip_nonfinite", embedding_skip_nonfinite, False),
                                                          ("embedding_stochastic_rounding",
                                                           embedding_stochastic_rounding, True))
                      if v != default]
        if fused_only:
            raise ValueError(f"{who}: {', '.join(fused_only)} configure the fused embedding update, but the "
                             f"{layers.name} layers fuse none (TrainingOptimizer's row-wise Adagrad there has no "
                             f"weight decay, no non-finite skip and rounds to nearest)")
        return factory, dict(optimizer=embedding_optimizer, **emb_factory)
    if embedding_optimizer is None and (weight_decay or embedding_skip_nonfinite):
        raise ValueError(f"{who}: embedding_weight_decay={embedding_weight_decay!r} / embedding_skip_nonfinite="
                         f"{embedding_skip_nonfinite!r} act in the fused embedding update; pass embedding_optimizer="
                         f"'sgd' or 'rowwise_adagrad' (without one the tables get plain gradients)")
    if backend is not None:
        _backend.check_name(backend, f"{who}(backend=...)")
    common = dict(backend=backend, **factory)
    return common, dict(optimizer=embedding_optimizer, lr=embedding_lr, eps=embedding_eps,
                        weight_decay=float(weight_decay),
                        skip_nonfinite=embedding_skip_nonfinite,
                        stochastic_rounding=embedding_stochastic_rounding, backend=backend, **emb_factory)


def dense_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's dense layers: that of its first floating parameter outside the embedding layers
    (``model.layer_set.scenario_embedding`` instances). Read at every forward, so it follows ``.to()``: the
    embedding outputs are cast to it, which lets 16-bit tables feed float32 dense layers (built with
    ``embedding_dtype=``, or ``model.float()`` then ``model.embedding.to(torch.bfloat16)``). The cast is a no-op
    when the dtypes agree; it is an autograd op, so the tables' gradients come back in the table dtype."""
    table_layer = model.layer_set.scenario_embedding
    for m in model.modules():
        if isinstance(m, table_layer):
            continue
        for p in m._parameters.values():
            if p is not None and p.is_floating_point():
                return p.dtype
    return torch.get_default_dtype()


def _boundary_scenario(who: str, scenario, num_scenarios: int):
    """The model's one scenario-range check (``_checks.model_scenario``); the layers below get the result
    (clamped while the check is pending), recorded as checked for the block, so no op checks it again and none
    reads out of range (a non-tensor is left to the shape checks)."""
    if isinstance(scenario, Tensor) and scenario.dtype in (torch.int32, torch.int64) and scenario.dim() == 1:
        return _checks.model_scenario(who, scenario, num_scenarios)
    return scenario


def checked_forward(model: nn.Module, forward, indices, offsets, scenario, *rest):
    """``forward(indices, offsets, scenario, *rest)`` of a body with ``model.layer_set`` and ``model.config``, the
    scenario range checked once here at the boundary (IndexError naming the model, the position and the value).

    With the kernel layers it runs under ``saml_kernels.deferred_checks()``: the value checks of every layer (ids,
    offsets, scenario ids, lengths) are read with one host sync when the forward ends, and a bad input raises its
    layer's clear error then, before any backward (so nothing is written to the tables); the layers get the
    boundary's scenario (clamped while its check is pending) and the ops trust it (docs/design.md section 5,
    "One check site per value"). Inside ``capture_safe_checks()`` there is no sync at
    all: the forward is one step of the fused embedding update (``_checks.step_errors``, entered before the
    boundary check), so a bad input anywhere in it (the scenario, any layer's ids, offsets or lengths) skips the
    fused update of every embedding layer of the model in the backward. The reference layers check each input at
    once (plain PyTorch), so their forward runs outside that block (and under ``torch.compile`` without the
    boundary check, which would add a graph break)."""
    who, M = type(model).__name__, model.config.num_scenarios
    if not model.layer_set.kernels:
        if not torch.compiler.is_compiling():  # compiled, a host read would break the graph: the layers' checks do
            scenario = _boundary_scenario(who, scenario, M)
        return forward(indices, offsets, scenario, *rest)
    param = next(model.parameters(), None)
    with _checks.deferred_checks(), _checks.step_errors(param.device if param is not None else None):
        return forward(indices, offsets, _boundary_scenario(who, scenario, M), *rest)


def seq_offsets(B: int, L: int, like: Tensor) -> Tensor:
    """Offsets [B + 1] of B bags of L ids each (a padded [B, L] sequence as jagged input), dtype of ``like``."""
    return torch.arange(0, B * L + 1, L, device=like.device, dtype=like.dtype)


class ModelBody(nn.Module):
    """What every model body (``SAML``, and the family bodies of ``nn/_family.py``: ``SharedBottom``, STAR, HMoE)
    shares: ``reset_parameters`` (every submodule's, in module order) and the state_dict rule that the row-wise
    Adagrad states are optimizer state (``training.optimizer_state_keys_optional``: optional in a strict load)."""

    def __init__(self):
        super().__init__()
        self.register_load_state_dict_post_hook(optimizer_state_keys_optional)

    def reset_parameters(self) -> None:
        """Re-initialises every layer as its constructor did (each layer's ``reset_parameters``)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()


class SAML(ModelBody):
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
        embedding_weight_decay: the fused optimizer's L2 weight decay on the touched rows (FBGEMM's L2 mode:
            g' = g + embedding_weight_decay * w); kernel layers only (ValueError with the reference layers).
        embedding_skip_nonfinite: skip a step's fused embedding update when its upstream gradient holds a NaN or
            Inf (decided on the device; each table's ``nonfinite_steps`` counts them). Only the fused tables'
            update is skipped, not the dense optimizer's step. Kernel layers only. Both need an
            ``embedding_optimizer`` (ValueError without one: they would do nothing).
        embedding_stochastic_rounding: the fused update stores 16-bit (bfloat16 / float16) table rows with
            stochastic rounding (default True; unbiased, so steps below half an ulp are not lost; docs/design.md
            "Stochastic rounding"); False rounds to nearest. No effect on float32 / float64 tables. Kernel layers
            only (False raises ValueError with the reference layers, whose TrainingOptimizer step rounds to
            nearest).
        device, dtype: factory arguments (dtype: of every layer, and of the tables unless embedding_dtype is set).
        embedding_dtype: dtype of the embedding tables (float32 / float16 / bfloat16 / float64), None = ``dtype``.
            16-bit tables with float32 dense layers is FBGEMM's usual set-up: the tables (and the fused update)
            stay 16-bit, their outputs are cast to the dense layers' dtype (:func:`dense_dtype`, read at every
            forward, so ``model.embedding.to(torch.bfloat16)`` on a float32 model works too) and their
            gradients come back through that cast, rounded to the table dtype.

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
                 embedding_weight_decay: float = 0.0, embedding_skip_nonfinite: bool = False, device=None, dtype=None,
                 embedding_dtype: Optional[torch.dtype] = None, embedding_stochastic_rounding: bool = True):
        super().__init__()
        kw, emb = layer_options(type(self).__name__, layers, backend=backend, embedding_optimizer=embedding_optimizer,
                                embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device, dtype=dtype,
                                embedding_weight_decay=embedding_weight_decay,
                                embedding_skip_nonfinite=embedding_skip_nonfinite, embedding_dtype=embedding_dtype,
                                embedding_stochastic_rounding=embedding_stochastic_rounding)
        c = self.config = config
        self.layer_set, self.backend = layers, backend
        fk = dict(device=device, dtype=dtype)
        M, D = c.num_scenarios, c.embedding_dim
        hashed = c.scenario_rows or {}  # hashed scenario tables: feature name -> Rs_f
        self.embedding = layers.scenario_embedding(c.features, M, D, **emb, scenario_rows={
            f.name: hashed[f.name] for f in c.features if f.name in hashed} or None)
        if c.sequence is not None:
            seq = c.sequence
            self.sequence_embedding = layers.scenario_embedding([(seq.name, seq.num_embeddings, True, "none")], M, D,
                                                                **emb, scenario_rows={
                                                                    seq.name: hashed[seq.name]} if seq.name in hashed
                                                                else None)
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

    def representations(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        """(A_0 [B, global_dim], H_0 [B, scenario_dim])."""
        c = self.config
        B, L = check_model_inputs(type(self).__name__, c, scenario, seq_ids, seq_lengths, dense)
        D = c.embedding_dim
        dt = dense_dtype(self)  # 16-bit tables may feed float32 dense layers: their outputs are cast here
        e_g, e_s = (e.to(dt) for e in self.embedding(indices, offsets, scenario))
        # explicit widths: reshape(B, -1) is ambiguous (an error) for B = 0
        glob, scen = [e_g.reshape(B, len(c.features) * D)], [e_s.reshape(B, c.num_aware * D)]
        if c.sequence is not None:
            s_g, s_s = (e.to(dt) for e in self.sequence_embedding(seq_ids.reshape(-1), seq_offsets(B, L, seq_ids),
                                                                  scenario))
            fg, fs = c.target_slots()
            # a fresh contiguous copy: .contiguous() on the strided slice would make torch.export specialise B != 1
            target_s = e_s[:, fs].clone(memory_format=torch.contiguous_format)
            att_g, att_l = self.attention(e_g[:, fg], target_s, s_g.reshape(B, L, D), s_s.reshape(B, L, D),
                                          seq_lengths, scenario)
            glob.append(att_g)
            scen.append(att_l)
        if c.num_dense:
            glob.append(dense.to(dt))
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


def __getattr__(name: str):
    # ``SharedBottom`` lives in nn/shared_bottom.py (a family body, which imports this module); checkpoints pickled
    # as ``saml_kernels.nn.saml.SharedBottom`` still find it here, imported on first use (no import cycle)
    if name == "SharedBottom":
        from .shared_bottom import SharedBottom

        return SharedBottom
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
