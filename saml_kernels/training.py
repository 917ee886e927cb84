"""Losses and the training optimizer shared by every model of the package and by the reference twins:
``bce_loss``, ``saml_loss``, ``TrainingOptimizer`` (dense Adam + row-wise Adagrad on the tables) and the
``load_state_dict`` post-hook that treats row-wise optimizer states as optional (docs/design.md section 3)."""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor, nn

from ._lean_adam import LeanAdam
from .ops.embedding_optimizer import check_rounding, rowwise_adagrad_step


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
    """``load_state_dict`` post-hook of the model bodies (SAML, SharedBottom and their reference twins): the row-wise
    Adagrad states of the embedding modules (``<embedding module>.global_state`` / ``.scenario_state``) are
    optimizer state, not weights, so they never make a (strict) load fail:

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


DENSE_GRAD_WARN_ROWS = 1_000_000
"""A table with more rows than this (``weight.shape[:-1].numel()``) that trains with dense gradients gets one
:class:`DenseTableGradientWarning` (:func:`warn_dense_table`)."""

# id -> table already warned about (weak: an entry goes with its table, so a reused id is not mistaken for it)
_WARNED_TABLES: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


class DenseTableGradientWarning(UserWarning):
    """A large embedding table trains with dense gradients (see :func:`warn_dense_table`)."""


def warn_dense_table(weight: Tensor) -> None:
    """Warns once per table (per process) when ``weight`` [..., D] has more than ``DENSE_GRAD_WARN_ROWS`` rows and
    a dense gradient: every backward then writes a whole [rows, D] gradient (and the step scans it) for a batch
    that touches a few thousand rows, so the step time grows with the table. The message points at the fused
    optimizer (the models' default) and at sparse gradients."""
    rows = weight.shape[:-1].numel()
    if rows <= DENSE_GRAD_WARN_ROWS or _WARNED_TABLES.get(id(weight)) is weight:
        return
    _WARNED_TABLES[id(weight)] = weight
    warnings.warn(
        f"TrainingOptimizer: an embedding table of {rows:,} rows ({list(weight.shape)}) trains with dense gradients: "
        f"each step writes and scans a full [{rows}, {weight.shape[-1]}] gradient, so it slows down as the table "
        f"grows. Use the fused optimizer (the models' default embedding_optimizer='rowwise_adagrad', or "
        f"nn.ScenarioEmbedding(optimizer='rowwise_adagrad')), or sparse gradients "
        f"(nn.ScenarioEmbedding(sparse=True)). (Warned once per table; threshold "
        f"saml_kernels.training.DENSE_GRAD_WARN_ROWS = {DENSE_GRAD_WARN_ROWS:,} rows.)",
        DenseTableGradientWarning, stacklevel=3)


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _sparse_rows(grad: Tensor, table_shape: torch.Size) -> tuple[Tensor, Tensor]:
    """(rows [n] int64 unique flat row ids, g [n, D]) of a sparse COO gradient with one dense dim: the rows it
    stores and their gradient sums. The sums come from ``to_dense()`` of the same entries re-indexed onto n rows,
    so they are bitwise the rows of ``grad.to_dense()`` (the same per-entry accumulation in the same order, also
    for an uncoalesced gradient with repeated rows)."""
    idx, vals = grad._indices(), grad._values()
    flat = idx[0]
    for j in range(1, idx.shape[0]):  # row-major flat id over the sparse dims (the table's row dims)
        flat = flat * table_shape[j] + idx[j]
    if grad.is_coalesced():  # unique and sorted already (the layer's sparse gradients are)
        rows, pos, coo = flat, torch.arange(flat.numel(), device=flat.device), dict(is_coalesced=True)
    else:
        rows, pos = torch.unique(flat, return_inverse=True)
        coo = {}
    coo["check_invariants"] = False  # pos indexes the n rows by construction
    compact = torch.sparse_coo_tensor(pos.unsqueeze(0), vals, (rows.numel(), vals.shape[-1]), **coo)
    return rows, compact.to_dense()


def _nonzero_rows(grad2d: Tensor) -> Tensor:
    """Flat ids [n] int64 of the rows of ``grad2d`` [N, D] with any bit set: -0.0 counts as non-zero, so a
    skipped row's gradient is exactly +0.0 everywhere (the case in which the update is the identity)."""
    bits = grad2d.view(_BITS[grad2d.element_size()])
    return bits.ne(0).any(1).nonzero().squeeze(1)


def rowwise_adagrad_rows_(weight: Tensor, grad: Tensor, state: Tensor, lr: float, eps: float) -> None:
    """In place: the row-wise Adagrad step of ``rowwise_adagrad_step`` on table ``weight`` [..., D] (any float
    dtype; computed in float32, float64 for float64 tables) with ``grad`` (dense or sparse COO, weight's shape)
    and float32 ``state`` [...], applied to the rows that can change only:

        rows = the rows a sparse gradient stores (touched rows, even where their sum is 0), or
               the rows of a dense gradient with a non-zero bit (there is no "touched" in a dense gradient);
        for r in rows: state[r] += mean_d(g[r]^2);  w[r] -= lr * g[r] / (sqrt(state[r]) + eps)

    Exactness: a row whose gradient is +0.0 everywhere is left as it is, and there the full-table update is the
    identity (state + 0 = state, w - 0 = w, bit for bit, -0.0 weights included) for a finite lr and any state
    Adagrad produces (finite, +0.0 or positive); so this equals the full-table computation bit for bit on every row
    (the rows it updates get the same element-wise math on the same values). A -0.0 gradient is not skipped
    (w = -0.0 minus -0.0 gives +0.0 in the full update). The one difference: a row with a NaN / negative state or
    an infinite lr, which the full update would turn into NaN although nothing touched it, stays untouched here.

    Cost: O(rows touched x D) for a sparse gradient; a dense one is scanned once (O(R x D) reads, no float32
    copy of the table). On an accelerator a dense gradient keeps the full-table update: selecting its rows
    would read their count on the host (a sync per table, and no CUDA-graph capture)."""
    D = weight.shape[-1]
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    sparse_rows = grad.is_sparse and grad.dense_dim() == 1
    if not (weight.is_contiguous() and state.is_contiguous()) or (
            not sparse_rows and weight.device.type != "cpu"):
        g = grad.to_dense() if grad.is_sparse else grad
        w_new, st_new = rowwise_adagrad_step(weight.to(acc), g.to(acc), state, lr, eps)
        state.copy_(st_new)
        weight.copy_(w_new)
        return
    if sparse_rows:
        rows, g = _sparse_rows(grad, weight.shape)
    else:
        g2 = (grad.to_dense() if grad.is_sparse else grad).reshape(-1, D)
        rows = _nonzero_rows(g2)
        g = g2.index_select(0, rows)
    w2, s1 = weight.view(-1, D), state.view(-1)
    w_new, st_new = rowwise_adagrad_step(w2.index_select(0, rows).to(acc), g.to(acc), s1.index_select(0, rows),
                                         lr, eps)
    s1.index_copy_(0, rows, st_new)
    w2.index_copy_(0, rows, w_new.to(weight.dtype))


def saml_loss(main: Tensor, aux: Tensor, label: Tensor, aux_loss_weight: float) -> Tensor:
    """BCE(main, label) + aux_loss_weight * BCE(aux, label), means over the batch (main, aux, label [B]).

    An empty batch gives 0 with zero gradients (see :func:`bce_loss`), not NaN."""
    return bce_loss(main, label) + aux_loss_weight * bce_loss(aux, label)


class TrainingOptimizer:
    """The training recipe of the main job and the model benchmark: Adam on the dense parameters and row-wise
    Adagrad on the embedding tables (FBGEMM's recipe for sparse tables):

        state[row] += mean_d(g[row]^2);   w[row] -= embedding_lr * g[row] / (sqrt(state[row]) + eps)

    with g the row's gradient summed over the batch (rows not in the batch have g = 0 and do not change).
    For an embedding module that applies it fused in its backward (one with a ``fused_optimizer``:
    ``nn.ScenarioEmbedding(optimizer=...)``, in train and eval mode alike; the models' default) nothing is left to
    do here but the bookkeeping of ``step()`` (below); for one with gradients (the reference, or
    ``embedding_optimizer=None``) it runs after the backward, on the module's ``global_state`` / ``scenario_state``
    buffers when it has them (else on float32 states [rows] kept here), and only on the rows that can change
    (:func:`rowwise_adagrad_rows_`: a sparse gradient's rows, a dense one's non-zero rows; bitwise the full-table
    result). Both paths are the same math, so SAML and SAMLReference stay equal step after step. A table of more
    than ``DENSE_GRAD_WARN_ROWS`` rows with dense gradients warns once (:func:`warn_dense_table`).

    Fused modules of another optimizer (``embedding_optimizer="sgd"``) are accepted and keep their own
    hyper-parameters: ``embedding_lr`` / ``eps`` here are the row-wise Adagrad recipe's and never reach them
    (drive them through ``module.fused_optimizer``).

    One backward per step: a fused module updates its rows in every backward through it (FBGEMM's behaviour), so
    gradient accumulation (several backwards, then one ``step()``) or a ``retain_graph`` second backward applies
    several updates, not one on the summed gradient. ``step()`` warns (once per optimizer) when a fused module saw
    more than one backward pass since the previous step; sum the micro-batch losses and run one backward instead.

    Learning rates: ``dense`` is a ``torch.optim.Adam`` (fused where torch has it; a ``LeanAdam``, which runs the
    fused kernel without ``Adam.step``'s Python around it and is bitwise the same): drive it with any torch
    LR scheduler, ``torch.optim.lr_scheduler.StepLR(opt.dense, ...)``. ``embedding_lr`` is an attribute read at
    every step; setting it also sets the row-wise Adagrad fused modules' ``lr`` (used from their next backward),
    so ``opt.embedding_lr = value`` (by hand or from a schedule) drives every Adagrad table. A scheduler may
    instead drive a module's ``fused_optimizer`` (``step()`` calls each fused module's ``fused_optimizer.step()``,
    so torch's schedulers see the optimizer step and do not warn).

    CUDA graphs: ``capturable=True`` builds Adam with ``capturable=True`` so the whole step can be captured
    (``saml_kernels.graphs.CapturedTrainingStep``); the row-wise lr of non-fused tables is then the value at
    capture time (the fused modules read theirs on the device at every replay).

    Checkpoints: ``state_dict()`` / ``load_state_dict()`` hold the dense Adam state, every table's row-wise
    Adagrad state (fused ones included) keyed by parameter name, the recipe's hyper-parameters and each fused
    module's current ones (``lr``, ``eps``, ``weight_decay``, a scheduler's ``initial_lr``; keyed by module path),
    so training resumes exactly in a fresh model + optimizer, also mid-schedule (bitwise equal to an uninterrupted
    run on the CPU; load the schedulers' own state_dicts as torch's recipe says).
    """

    def __init__(self, model: nn.Module, lr: float = 2e-3, embedding_lr: float = 0.05, eps: float = 1e-8,
                 capturable: bool = False):
        names = {id(p): n for n, p in model.named_parameters()}
        self.tables = []       # (weight, state) pairs updated here, after the backward
        self._row_states = {}  # table parameter name -> its row-wise state tensor (here's, or a fused module's)
        self._fused = {}       # module path -> embedding module whose backward applies the update
        emb_ids = set()
        for path, mod in model.named_modules():
            w_g, w_s = getattr(mod, "global_weight", None), getattr(mod, "scenario_weight", None)
            if not isinstance(w_g, nn.Parameter) or not isinstance(w_s, nn.Parameter):
                continue
            emb_ids.update((id(w_g), id(w_s)))
            if getattr(mod, "fused_optimizer", None) is not None:  # fused in the module's backward
                if mod.optimizer == "rowwise_adagrad":
                    if mod.lr != embedding_lr or mod.eps != eps:
                        raise ValueError(f"TrainingOptimizer: the fused row-wise Adagrad of {path or 'the model'} "
                                         f"(lr={mod.lr}, eps={mod.eps}) differs from this recipe (lr={embedding_lr}, "
                                         f"eps={eps}); build the model with the same settings")
                    self._row_states.update({names[id(w_g)]: mod.global_state, names[id(w_s)]: mod.scenario_state})
                self._fused[path] = mod  # another optimizer (sgd) keeps its own hyper-parameters
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
        try:  # one fused kernel for all dense parameters (torch's default on CPU is a per-tensor loop), called
            # directly on the CPU (LeanAdam: an Adam, bitwise; without the Python around the kernel)
            self.dense = LeanAdam(params, lr=lr, fused=True, **cap)
        except (RuntimeError, ValueError, TypeError):
            self.dense = torch.optim.Adam(params, lr=lr, foreach=True, **cap)
        self._embedding_lr, self.eps = float(embedding_lr), float(eps)
        self._warned_backwards = False

    def _recipe_modules(self):
        """The fused modules that run this recipe (row-wise Adagrad): ``embedding_lr`` / ``eps`` reach them."""
        return [m for m in self._fused.values() if m.optimizer == "rowwise_adagrad"]

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
        for mod in self._recipe_modules():
            mod.lr = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        for w, _ in self.tables:
            w.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Adam on the dense parameters; row-wise Adagrad on the non-fused tables' rows that can change
        (:func:`rowwise_adagrad_rows_`: the rows of a sparse gradient, the non-zero rows of a dense one)."""
        self.dense.step()
        lr = self.embedding_lr
        for w, st in self.tables:
            if w.grad is None:
                continue
            if not w.grad.is_sparse:
                warn_dense_table(w)
            rowwise_adagrad_rows_(w, w.grad, st, lr, self.eps)
        self._end_fused_step()

    def _end_fused_step(self) -> None:
        """The fused modules' end of step: warn (once) about several backward passes since the last step, then
        ``fused_optimizer.step()`` via ``end_step()`` (no weight changes; schedulers see the step, the pass count
        restarts)."""
        for path, mod in self._fused.items():
            n = len(mod.__dict__.get("_backward_passes", ()))
            if n > 1 and not self._warned_backwards:
                self._warned_backwards = True
                warnings.warn(
                    f"TrainingOptimizer.step(): the fused embedding module {path or '(the model)'} ran {n} backward "
                    f"passes since the last step, and its fused {mod.optimizer} update ran in each of them (FBGEMM's "
                    f"behaviour): gradient accumulation or a retain_graph second backward updates those rows {n} "
                    f"times, not once with the summed gradient. Sum the losses and run one backward per step, or "
                    f"build the model with embedding_optimizer=None to accumulate gradients (warned once per "
                    f"optimizer)", RuntimeWarning, stacklevel=4)
            mod.fused_optimizer.end_step()

    def state_dict(self) -> dict:
        """{"dense": {"params": [names], "state": {name: Adam state}, "param_group": Adam hyper-parameters},
        "embedding_state": {table parameter name: row-wise Adagrad state [rows] float32}, "embedding_lr", "eps",
        "fused": {fused module path: {"optimizer": "sgd" | "rowwise_adagrad", "lr", "eps", "weight_decay",
        "stochastic_rounding", "rounding_seed", ...: its ``fused_optimizer`` param group as it is now, e.g. after a
        scheduler's steps; "rounding_step": its count of fused updates (the stochastic rounding's step word, read
        from the device)}}}.

        The tensors are references to the live states (as ``torch.optim``'s): ``torch.save`` or deep-copy the
        dict to keep a snapshot."""
        sd = self.dense.state_dict()
        (group,) = sd["param_groups"]
        names = self._dense_names
        return {"dense": {"params": list(names), "state": {names[i]: st for i, st in sd["state"].items()},
                          "param_group": {k: v for k, v in group.items() if k != "params"}},
                "embedding_state": dict(self._row_states), "embedding_lr": self.embedding_lr, "eps": self.eps,
                "fused": {path: {"optimizer": mod.optimizer, **{k: v for k, v in
                                                                 mod.fused_optimizer.param_groups[0].items()
                                                                 if k != "params"},
                                 "rounding_step": mod.rounding_step}
                          for path, mod in self._fused.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a :meth:`state_dict` (of this model or of a fresh one / its twin with the same parameter names).

        Each fused module gets its saved hyper-parameters back (the values a scheduler had reached). A fused
        module the dict has none for (a dict of the reference twin, whose tables are not fused, or one written
        before they were saved) gets the saved ``embedding_lr`` / ``eps`` when it runs row-wise Adagrad; saved
        entries of modules not fused here are ignored. Raises ValueError, with nothing loaded, when the parameter
        or table names differ, a fused module's optimizer or a hyper-parameter is bad, or a row-wise state has
        another shape."""
        dense, rows = state_dict["dense"], state_dict["embedding_state"]
        fused = {p: g for p, g in (state_dict.get("fused") or {}).items() if p in self._fused}
        for what, own, saved in (("dense parameters", self._dense_names, dense["params"]),
                                 ("embedding tables", list(self._row_states), list(rows))):
            if set(own) != set(saved):
                raise ValueError(f"TrainingOptimizer.load_state_dict: {what} differ: missing "
                                 f"{sorted(set(own) - set(saved))}, unexpected {sorted(set(saved) - set(own))}")
        eps = float(state_dict["eps"])
        for path, group in fused.items():
            mod = self._fused[path]
            if group["optimizer"] != mod.optimizer:
                raise ValueError(f"TrainingOptimizer.load_state_dict: fused embedding module {path} was saved with "
                                 f"optimizer {group['optimizer']!r}, this model's is {mod.optimizer!r}")
            if not (float(group["lr"]) >= 0 and float(group["eps"]) > 0 and float(group["weight_decay"]) >= 0):
                raise ValueError(f"TrainingOptimizer.load_state_dict: fused embedding module {path}: need lr >= 0, "
                                 f"eps > 0, weight_decay >= 0, got lr={group['lr']!r}, eps={group['eps']!r}, "
                                 f"weight_decay={group['weight_decay']!r}")
            check_rounding(group.get("stochastic_rounding", True), group.get("rounding_seed", 0),
                           group.get("rounding_step", 0), f"TrainingOptimizer.load_state_dict: fused embedding "
                                                          f"module {path}")
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
        self._embedding_lr = float(state_dict["embedding_lr"])
        for path, mod in self._fused.items():
            if path in fused:
                group = {k: v for k, v in fused[path].items() if k not in ("optimizer", "rounding_step")}
                sd = {"state": {}, "param_groups": [{**group, "params": [0, 1]}]}
                if "rounding_step" in fused[path]:
                    sd["rounding_step"] = fused[path]["rounding_step"]
                mod.fused_optimizer.load_state_dict(sd)
            elif mod.optimizer == "rowwise_adagrad":  # no saved values of its own: the recipe's
                mod.eps, mod.lr = eps, self._embedding_lr
