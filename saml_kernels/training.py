"""Losses and the training optimizer shared by every model of the package and by the reference twins:
``bce_loss``, ``saml_loss``, ``TrainingOptimizer`` (dense Adam + row-wise Adagrad on the tables) and the
``load_state_dict`` post-hook that treats row-wise optimizer states as optional (docs/design.md section 3)."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .ops.embedding_optimizer import rowwise_adagrad_step


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
    ``nn.ScenarioEmbedding(optimizer=...)``, in train and eval mode alike) nothing is left to do here but the
    bookkeeping of ``step()`` (below); for one with dense gradients (the reference) it runs after the backward, on
    the module's ``global_state`` / ``scenario_state`` buffers when it has them (else on float32 states [rows] kept
    here). Both paths are the same math, so SAML and SAMLReference stay equal step after step.

    Fused modules of another optimizer (``embedding_optimizer="sgd"``) are accepted and keep their own
    hyper-parameters: ``embedding_lr`` / ``eps`` here are the row-wise Adagrad recipe's and never reach them
    (drive them through ``module.fused_optimizer``).

    One backward per step: a fused module updates its rows in every backward through it (FBGEMM's behaviour), so
    gradient accumulation (several backwards, then one ``step()``) or a ``retain_graph`` second backward applies
    several updates, not one on the summed gradient. ``step()`` warns (once per optimizer) when a fused module saw
    more than one backward pass since the previous step; sum the micro-batch losses and run one backward instead.

    Learning rates: ``dense`` is a plain ``torch.optim.Adam`` (fused where torch has it): drive it with any torch
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
        try:  # one fused kernel for all dense parameters (torch's default on CPU is a per-tensor loop)
            self.dense = torch.optim.Adam(params, lr=lr, fused=True, **cap)
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
        self.dense.step()
        lr = self.embedding_lr
        for w, st in self.tables:
            if w.grad is None:
                continue
            g = w.grad.to_dense() if w.grad.is_sparse else w.grad
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            w_new, st_new = rowwise_adagrad_step(w.to(acc), g.to(acc), st, lr, self.eps)
            st.copy_(st_new)
            w.copy_(w_new)
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
        "fused": {fused module path: {"optimizer": "sgd" | "rowwise_adagrad", "lr", "eps", "weight_decay", ...: its
        ``fused_optimizer`` param group as it is now, e.g. after a scheduler's steps}}}.

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
                                                                 if k != "params"}}
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
                group = {k: v for k, v in fused[path].items() if k != "optimizer"}
                mod.fused_optimizer.load_state_dict({"state": {}, "param_groups": [{**group, "params": [0, 1]}]})
            elif mod.optimizer == "rowwise_adagrad":  # no saved values of its own: the recipe's
                mod.eps, mod.lr = eps, self._embedding_lr
