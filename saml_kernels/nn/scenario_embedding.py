"""``ScenarioEmbedding``: the scenario-aware embedding layer of SAML (docs/design.md sections 1 and 3).

Every feature has rows in the global table; a scenario-aware feature also has rows in each of the M scenario
tables. For a batch with scenario ids s_b:

    E_g[b, f] = pool_{i in bag(f, b)} w_i * global_weight[feature_rows[f] + id_i]                  [B, F, D]
    E_s[b, j] = pool_{i in bag(f_j, b)} w_i * scenario_weight[s_b, feature_scenario_rows[f_j] + local(id_i)]  [B, Fs, D]

with f_j the j-th aware feature and local(id) = id, or hash(id) mod Rs_f for a feature given fewer scenario rows
Rs_f than ids (``scenario_rows=``, ops/scenario_hash.py). Rows are laid out in feature order (feature f owns global rows
``feature_rows[f] .. feature_rows[f+1]``, aware features likewise own scenario rows), so a ``state_dict`` with
``global_weight [R, D]`` and ``scenario_weight [M, Rs, D]`` moves unchanged to the reference model.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import _backend
from ..functional import scenario_embedding_bag
from ..graphs import host_read
from ..ops import _checks
from ..ops import embedding_optimizer as _eo
from ..ops import scenario_embedding_bag as _seb
from ..ops.scenario_hash import check_scenario_rows
from ._ddp_guard import refuse_under_ddp

__all__ = ["EmbeddingFeature", "FusedEmbeddingOptimizer", "ScenarioEmbedding", "huge_page_empty"]

OPTIMIZERS = (None, "sgd", "rowwise_adagrad")
_HUGE_PAGE = 2 << 20


def huge_page_empty(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised, contiguous CPU tensor of ``shape`` whose memory is advised as transparent huge pages.

    The memory is an anonymous mapping aligned to 2 MiB and ``madvise(MADV_HUGEPAGE)``d, so the kernel backs it
    with 2 MiB pages where it can (Linux with ``/sys/kernel/mm/transparent_hugepage/enabled`` = madvise or always).
    Random-row lookups into a table much larger than the TLB's reach then miss the TLB far less. The mapping lives
    as long as the tensor. Raises ``RuntimeError`` where the platform has no ``MADV_HUGEPAGE``.
    """
    import ctypes
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        raise RuntimeError("huge_page_empty: this platform has no MADV_HUGEPAGE (Linux only)")
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    size = -(-max(nbytes, 1) // _HUGE_PAGE) * _HUGE_PAGE
    # private anonymous memory (a shared mapping would be shmem, which THP treats separately); one spare huge
    # page to align the start
    mem = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    start = -addr % _HUGE_PAGE
    mem.madvise(mmap.MADV_HUGEPAGE, start, size)
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    flat = torch.frombuffer(mem, dtype=torch.uint8, count=nbytes, offset=start)  # keeps `mem` alive
    return flat.view(dtype).view(tuple(shape))


def _is_exporting() -> bool:
    """True inside a ``torch.export`` trace (``torch.compiler.is_exporting``, torch >= 2.7; False on older torch,
    where an exported training-mode trace records the fused update too)."""
    f = getattr(torch.compiler, "is_exporting", None)
    return bool(f()) if f is not None else False


@dataclass(frozen=True)
class EmbeddingFeature:
    """One sparse feature: ``num_embeddings`` ids (0 .. num_embeddings-1), pooled by "sum" | "mean" | "none"."""

    name: str
    num_embeddings: int
    scenario_aware: bool = False
    pooling: str = "sum"


def _as_feature(spec) -> EmbeddingFeature:
    """An EmbeddingFeature from an EmbeddingFeature, a dict, a tuple / NamedTuple, or any object with the fields."""
    if isinstance(spec, EmbeddingFeature):
        f = spec
    elif isinstance(spec, dict):
        f = EmbeddingFeature(**spec)
    elif hasattr(spec, "name") and hasattr(spec, "num_embeddings"):
        f = EmbeddingFeature(spec.name, spec.num_embeddings, getattr(spec, "scenario_aware", False),
                             getattr(spec, "pooling", "sum"))
    else:
        f = EmbeddingFeature(*spec)
    if not isinstance(f.name, str) or not f.name:
        raise ValueError(f"ScenarioEmbedding: feature name must be a non-empty str, got {f.name!r}")
    try:
        if isinstance(f.num_embeddings, bool):
            raise TypeError
        n = operator.index(f.num_embeddings)  # int, numpy or torch integer
    except TypeError:
        n = 0
    if n < 1:
        raise ValueError(f"ScenarioEmbedding: feature {f.name!r}: num_embeddings must be an int >= 1, "
                         f"got {f.num_embeddings!r}")
    _checks.choice("ScenarioEmbedding", f"feature {f.name!r} pooling", f.pooling, _seb.POOLING)
    return EmbeddingFeature(f.name, n, bool(f.scenario_aware), f.pooling)


class _FusedUpdate(torch.autograd.Function):
    """Forward: the custom op. Backward: the optimizer update applied in place to the touched rows (FBGEMM TBE
    style); no gradient tensor is materialised. The first input is a placeholder that requires grad, so autograd
    calls this backward although the tables themselves are passed detached."""

    @staticmethod
    def forward(ctx, placeholder, args, layer, update, errors_before):
        (indices, offsets, scenario, gw, sw, fr, fsr, slot, psw, pooling, bag_len, num_aware, bounds, backend) = args
        g, s = torch.ops.saml_kernels.scenario_embedding_bag(indices, offsets, scenario, gw, sw, fr, fsr, slot, psw,
                                                             pooling, bag_len, num_aware, bounds, False, backend)
        ctx.save_for_backward(indices, offsets, scenario, fr, fsr, slot, psw)
        # The tables are updated in place in the backward: keep them as attributes, not saved tensors (a saved
        # tensor's version check would reject the update when the layer runs twice before one backward).
        ctx.gw, ctx.sw, ctx.layer, ctx.update, ctx.errors_before = gw, sw, layer, update, errors_before
        ctx.pooling, ctx.bag_len, ctx.backend = pooling, bag_len, backend
        return g, s

    @staticmethod
    def backward(ctx, grad_global, grad_scenario):
        indices, offsets, scenario, fr, fsr, slot, psw = ctx.saved_tensors
        layer = ctx.layer
        # which backward pass this is (host bookkeeping, no sync): TrainingOptimizer.step() warns when one step
        # saw several (gradient accumulation, retain_graph), each of which applied its own update
        layer.__dict__.setdefault("_backward_passes", set()).add(torch._C._current_graph_task_id())
        hparams = layer._fused_hparams
        if layer.skip_nonfinite:
            # The step is skipped on the device when an upstream gradient is not finite: no host sync, and the
            # counter tells the user afterwards (nonfinite_steps).
            ok = _eo.finite_flag(grad_global, grad_scenario)
            layer.nonfinite_steps.add_((1 - ok).to(layer.nonfinite_steps.dtype))
            hparams = torch.cat([hparams[:3], ok.reshape(1), hparams[4:]])
        if ctx.errors_before is not None:
            # capture-safe mode: no update from a step in which a bad input was counted (since the snapshot of
            # this step: the enclosing model forward's, see _checks.step_errors, else this layer's forward)
            clean = (_checks.error_total(ctx.gw.device) == ctx.errors_before).to(torch.float64)
            hparams = torch.cat([hparams[:3], (hparams[3] * clean).reshape(1), hparams[4:]])
        sstate = layer.scenario_state
        _eo.backward_update(
            ctx.backend, grad_global.contiguous(), grad_scenario.contiguous(), indices, offsets, scenario, ctx.gw,
            ctx.sw, fr, fsr, slot, psw, ctx.pooling, ctx.bag_len, layer.global_state,
            sstate.view(-1) if sstate is not None else None, layer.optimizer, hparams, *ctx.update)
        # the stochastic rounding's step word: one per fused update, on the device (no sync, graph-capturable)
        layer._fused_hparams[_STEP:_STEP + 1].add_(1)
        return None, None, None, None, None


#: the param-group keys the kernels read from the device tensor ``_fused_hparams`` -> their slot names
_PUSHED = {"lr": "lr", "eps": "eps", "weight_decay": "weight_decay", "stochastic_rounding": "stochastic_rounding",
           "rounding_seed": "seed"}
_STEP = _eo.HPARAMS.index("step")


def _checked_hparam(key: str, value):
    """The fused optimizer's ``key`` checked: a float for lr / eps / weight_decay (ValueError unless eps > 0, lr and
    weight_decay >= 0), a bool for stochastic_rounding, an int in [0, 2^32) for rounding_seed."""
    if key == "stochastic_rounding":
        _eo.check_rounding(value, 0, 0, "ScenarioEmbedding: fused optimizer")
        return value
    if key == "rounding_seed":
        _eo.check_rounding(True, value, 0, "ScenarioEmbedding: fused optimizer")
        return int(value)
    value = float(value)
    if not (value > 0 if key == "eps" else value >= 0):
        raise ValueError(f"ScenarioEmbedding: fused optimizer {key} must be {'> 0' if key == 'eps' else '>= 0'}, "
                         f"got {value!r}")
    return value


class _HparamGroup(dict):
    """The fused optimizer's param group: writing "lr", "eps" or "weight_decay" (by hand, by an LR scheduler or by
    ``load_state_dict``) also writes the device tensor the backward kernels read (a fill_, no host sync), so the
    change holds for the next backward and for CUDA-graph replays. Bad values raise ValueError, nothing written."""

    def __init__(self, layer: "ScenarioEmbedding", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._layer = layer

    def __setitem__(self, key, value):
        if key in _PUSHED:
            value = _checked_hparam(key, value)
            # While pickle / deepcopy rebuild the group, its items come before its __dict__ (no _layer yet) and the
            # layer's buffers may not be there yet: the pickled buffer carries the same values then.
            layer = self.__dict__.get("_layer")
            hparams = vars(layer).get("_buffers", {}).get("_fused_hparams") if layer is not None else None
            if hparams is not None:
                hparams[_eo.HPARAMS.index(_PUSHED[key])].fill_(float(value))
        super().__setitem__(key, value)


class FusedEmbeddingOptimizer(torch.optim.Optimizer):
    """The handle of a ``ScenarioEmbedding``'s fused optimizer for torch tooling (LR schedulers, logging).

    The update itself runs inside the layer's backward (every backward through the layer applies one update);
    ``step()`` changes no weight: it marks the end of a training step (so torch's LR schedulers see the optimizer
    stepped, and ``TrainingOptimizer`` can tell one backward per step from several) and ``zero_grad()`` does
    nothing. Its one param group holds the tables and ``lr``, ``eps``, ``weight_decay``, ``stochastic_rounding``,
    ``rounding_seed``; setting any of them there (by hand, by any ``torch.optim.lr_scheduler``, or by
    ``load_state_dict``) takes effect from the next backward, also in a replayed CUDA graph. ``state_dict()`` holds
    those hyper-parameters (and a scheduler's ``initial_lr``) and ``rounding_step``, the layer's count of fused
    updates (the stochastic rounding's step word, read from the device: one sync), which ``load_state_dict``
    restores, so a resumed run rounds bitwise as the uninterrupted one; the row-wise Adagrad states stay the
    layer's buffers. Picklable with its layer.
    """

    def __init__(self, layer: "ScenarioEmbedding", lr: float, eps: float, weight_decay: float,
                 stochastic_rounding: bool = True, rounding_seed: int = 0):
        self._layer = layer
        super().__init__([layer.global_weight, layer.scenario_weight],
                         dict(lr=lr, eps=eps, weight_decay=weight_decay, stochastic_rounding=stochastic_rounding,
                              rounding_seed=rounding_seed))
        self._wrap_group()

    def _wrap_group(self):
        g = self.param_groups[0]
        if not isinstance(g, _HparamGroup):
            g = self.param_groups[0] = _HparamGroup(self._layer, g)
        for key in _PUSHED:
            g[key] = g[key]  # push to the device tensor

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rounding_step": self._layer.rounding_step}

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        step = state_dict.pop("rounding_step", None)
        (group,) = state_dict["param_groups"]
        group = dict(group)
        # a dict saved before stochastic rounding existed: keep this layer's setting
        for key in ("stochastic_rounding", "rounding_seed"):
            group.setdefault(key, self.param_groups[0][key])
        for key in _PUSHED:  # check before anything is written (torch's load replaces the group wholesale)
            _checked_hparam(key, group[key])
        if step is not None:
            _eo.check_rounding(True, 0, step, "ScenarioEmbedding: fused optimizer state_dict")
        super().load_state_dict({**state_dict, "param_groups": [group]})
        self._wrap_group()
        if step is not None:
            self._layer._fused_hparams[_STEP].fill_(float(step))

    def __getstate__(self):
        # torch.optim.Optimizer pickles only defaults / state / param_groups: keep the layer link too
        return {**super().__getstate__(), "_layer": self._layer}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - the update happened in the backward
        """Changes no weight (the layer's backward applied the update): ends the training step's bookkeeping
        (the backward passes counted since the last step) and lets LR schedulers see an optimizer step."""
        self._end_step()
        return None if closure is None else closure()

    def _end_step(self) -> None:
        self._layer.__dict__.setdefault("_backward_passes", set()).clear()

    def end_step(self) -> None:
        """What ``TrainingOptimizer.step()`` calls: ``step()`` when something wraps it on this instance (an LR
        scheduler does, to see the optimizer step), else only the bookkeeping (torch's ``Optimizer.step``
        profiling wrapper costs ~25 us a call on the CPU, too much for a no-op on small GPU steps)."""
        if "step" in vars(self):
            self.step()
        else:
            self._end_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: the fused path produces no gradients."""


class FeatureListProperties:
    """``feature_names``, ``num_features`` and ``num_aware`` of a module holding ``self.features`` (FeatureSpecs):
    the layer and its TorchRec form answer them the same way."""

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def num_features(self) -> int:
        return len(self.features)

    @property
    def num_aware(self) -> int:
        return int(sum(f.scenario_aware for f in self.features))


class ScenarioEmbedding(FeatureListProperties, nn.Module):
    """Scenario-aware embedding bag layer (drop-in; TorchRec ``KeyedJaggedTensor`` input accepted).

    Args:
        features: sequence of ``EmbeddingFeature`` (or tuples ``(name, num_embeddings, scenario_aware, pooling)``
            or dicts with those keys), in the order of the input's features.
        num_scenarios: M, the number of scenario tables.
        embedding_dim: D.
        sparse: table gradients as torch sparse COO tensors (use ``torch.optim.SGD`` / ``SparseAdam``).
        optimizer: None (ordinary gradients) | "sgd" | "rowwise_adagrad": the backward applies the update to the
            touched rows in place and produces no gradient (``global_weight.grad`` stays None): with ``g`` the row's
            gradient summed over the batch and ``g' = g + weight_decay * w``, SGD ``w -= lr * g'``; row-wise Adagrad
            ``state[row] += mean_d(g'^2); w -= lr * g' / (sqrt(state[row]) + eps)``. The Adagrad states are float32
            buffers ``global_state [R]`` and ``scenario_state [M, Rs]`` (part of the state_dict). The fused path
            runs whenever grad is enabled, in ``train()`` and in ``eval()`` alike (as FBGEMM / TorchRec: a backward
            in eval mode, e.g. fine-tuning with frozen norm statistics, updates the tables), and only for tables
            that require grad: ``requires_grad_(False)`` on a table freezes it (weights and state); under
            ``torch.no_grad()`` the plain op runs. Every backward applies one update: gradient accumulation (k
            backwards, then one optimizer step) or a ``retain_graph`` second backward updates the rows k times, not
            once with the summed gradient (FBGEMM's behaviour; with Adagrad or weight decay the two differ), and
            ``TrainingOptimizer.step()`` warns when it sees that. per_sample_weights get no gradient there (passing
            ones that require grad raises). The tables are updated in place, so they are kept contiguous: a
            non-contiguous table (e.g. loaded with ``load_state_dict(..., assign=True)`` from a column slice) is
            re-laid out once, in place of the parameter's data (the Parameter object stays; it no longer aliases
            the loaded tensor).
            ``fused_optimizer`` is the torch Optimizer handle whose ``lr`` / ``eps`` / ``weight_decay`` a scheduler
            (or a hand) drives; call its ``step()`` once per training step (``TrainingOptimizer.step()`` does) so
            torch's schedulers see an optimizer step. The layer (and a model holding it) pickles, deep-copies and
            ``torch.save``s whole, its fused optimizer included.
        lr, eps, weight_decay: the fused optimizer's learning rate, Adagrad epsilon and L2 weight decay (applied to
            the touched rows only, FBGEMM's L2 mode).
        stochastic_rounding: with a fused optimizer and a bfloat16 / float16 table, store the updated rows with
            stochastic rounding (default): the row is computed in float32 and stored as one of its two 16-bit
            neighbours, the upper one with probability equal to the fraction of the gap, so the stored value is the
            float32 update on average and a step below half an ulp is not lost (round-to-nearest would drop it:
            a bfloat16 1.0 never moves under steps of 1e-3). The randomness is a hash of (rounding_seed, the
            layer's update count ``rounding_step``, table, row, column), the same on every backend: deterministic,
            no generator state (docs/design.md, "Stochastic rounding"). False: round-to-nearest. No effect on
            float32 / float64 tables.
        rounding_seed: the hash's seed, an int in [0, 2^32); None takes ``torch.initial_seed() % 2^32`` at
            construction (reproducible under ``torch.manual_seed``; nothing is drawn from the generator).
        scenario_rows: hashed scenario tables, a mapping aware feature name -> Rs_f, 1 <= Rs_f <= its
            num_embeddings: the feature's scenario tables get Rs_f rows and id maps to scenario row
            ``hash(id) mod Rs_f`` (``ops/scenario_hash.py``; colliding ids share a row and its gradient); its
            global table keeps one row per id. Rs_f = num_embeddings is the unhashed layout. Not a kernel-only
            option: the reference twin takes it too (it sets the state_dict's shapes).
        skip_nonfinite: with a fused optimizer, skip the whole update of a step whose upstream gradient holds a NaN
            or Inf (checked on the device, no host sync; ``nonfinite_steps`` counts the skipped steps). Without it a
            NaN loss writes NaN into the touched rows, as any optimizer would.
        bounds_check: "error" | "zero" | "off", as in ``saml_kernels.scenario_embedding_bag``.
        backend: forced backend for the op (None: ``use_backend`` context / env / automatic).
        device, dtype: factory arguments of the tables (dtype float32 / float16 / bfloat16 / float64).
        huge_pages: allocate the CPU tables on transparent huge pages (``huge_page_empty``). Lookups into tables
            much larger than the TLB's reach (hundreds of MB) spend much of their time in page walks; 2 MiB pages
            cut those misses (measured in benchmarks/results/embedding_*.md). The trade-off: each table is rounded
            up to 2 MiB and faulted in 2 MiB at a time (the kernel may stall to compact memory for it), the
            effect depends on the host's THP setting, and anything that reallocates the tables (``.to(...)``,
            ``copy.deepcopy``, ``load_state_dict(..., assign=True)``) lands on ordinary pages again.

    Parameters: ``global_weight [R, D]`` (R = sum of num_embeddings) and ``scenario_weight [M, Rs, D]`` (Rs = sum
    over the aware features of Rs_f: ``scenario_rows[name]``, by default num_embeddings), rows in feature order;
    the row-wise Adagrad states are ``global_state [R]`` and ``scenario_state [M, Rs]``.

    Initialisation (``reset_parameters``): every table entry ~ U(-1/sqrt(D), 1/sqrt(D)) (so a sum-pooled one-hot
    embedding has unit-order norm independent of D); Adagrad states zero.

    Mixed poolings: features are split into runs of consecutive features with one pooling, and the op is called
    once per run (one call when all features share a pooling, the usual case; more runs cost one host sync each to
    slice the jagged input). Pooling "none" must be used by all features or none (its outputs are [B, F, L, D]).
    """

    def __init__(self, features: Sequence, num_scenarios: int, embedding_dim: int, *, sparse: bool = False,
                 optimizer: Optional[str] = None, lr: float = 0.01, eps: float = 1e-8, weight_decay: float = 0.0,
                 skip_nonfinite: bool = False, bounds_check: str = "error", backend: Optional[str] = None,
                 device=None, dtype=None, huge_pages: bool = False, stochastic_rounding: bool = True,
                 rounding_seed: Optional[int] = None, scenario_rows: Optional[Mapping[str, int]] = None):
        super().__init__()
        feats = [_as_feature(f) for f in features]
        if not feats:
            raise ValueError("ScenarioEmbedding: features must list at least one feature")
        names = [f.name for f in feats]
        if len(set(names)) != len(names):
            raise ValueError(f"ScenarioEmbedding: feature names must be unique, got {names}")
        if isinstance(num_scenarios, bool) or not isinstance(num_scenarios, int) or num_scenarios < 1:
            raise ValueError(f"ScenarioEmbedding: num_scenarios must be an int >= 1, got {num_scenarios!r}")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"ScenarioEmbedding: embedding_dim must be an int >= 1, got {embedding_dim!r}")
        _checks.choice("ScenarioEmbedding", "optimizer", optimizer, OPTIMIZERS)
        _checks.choice("ScenarioEmbedding", "bounds_check", bounds_check, _seb.BOUNDS)
        poolings = {f.pooling for f in feats}
        if "none" in poolings and len(poolings) > 1:
            raise ValueError("ScenarioEmbedding: pooling 'none' must be used by all features or by none, got "
                             f"{[f.pooling for f in feats]}")
        if optimizer is not None and sparse:
            raise ValueError("ScenarioEmbedding: sparse=True and a fused optimizer exclude each other (the fused "
                             "optimizer produces no gradient)")
        if not (lr >= 0 and eps > 0 and weight_decay >= 0):
            raise ValueError(f"ScenarioEmbedding: need lr >= 0, eps > 0 and weight_decay >= 0, got lr={lr!r}, "
                             f"eps={eps!r}, weight_decay={weight_decay!r}")
        if backend is not None:
            _backend.check_name(backend, "ScenarioEmbedding(backend=...)")
        if rounding_seed is None:  # reproducible under torch.manual_seed, and draws nothing from the generator
            rounding_seed = torch.initial_seed() % _eo.SEED_LIMIT
        _eo.check_rounding(stochastic_rounding, rounding_seed, 0, "ScenarioEmbedding")
        srows = check_scenario_rows("ScenarioEmbedding", [(f.name, f.num_embeddings, f.scenario_aware) for f in feats],
                                    scenario_rows)
        self.features = tuple(feats)
        self.num_scenarios, self.embedding_dim = num_scenarios, embedding_dim
        self.sparse, self.optimizer, self._eps = bool(sparse), optimizer, float(eps)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.bounds_check, self.backend = bounds_check, backend
        fr, fsr = [0], [0]
        for f in feats:
            fr.append(fr[-1] + f.num_embeddings)
            fsr.append(fsr[-1] + (srows.get(f.name, f.num_embeddings) if f.scenario_aware else 0))
        self.feature_rows, self.feature_scenario_rows = tuple(fr), tuple(fsr)
        self.scenario_rows = srows  # the hashed features' Rs_f (feature name -> rows); {} when none is hashed
        # runs of consecutive features with one pooling: (first feature, end feature, pooling)
        runs, a = [], 0
        for f in range(1, len(feats) + 1):
            if f == len(feats) or feats[f].pooling != feats[a].pooling:
                runs.append((a, f, feats[a].pooling))
                a = f
        self._runs = tuple(runs)
        factory = dict(device=device, dtype=dtype)
        if huge_pages:
            if torch.empty(0, device=device).device.type != "cpu":
                raise ValueError(f"ScenarioEmbedding: huge_pages=True needs CPU tables, got device={device!r}")
            dt = dtype if dtype is not None else torch.get_default_dtype()
            empty = lambda *shape: huge_page_empty(shape, dt)  # noqa: E731
        else:
            empty = lambda *shape: torch.empty(*shape, **factory)  # noqa: E731
        self.huge_pages = bool(huge_pages)
        self.global_weight = nn.Parameter(empty(fr[-1], embedding_dim))
        self.scenario_weight = nn.Parameter(empty(num_scenarios, fsr[-1], embedding_dim))
        if optimizer == "rowwise_adagrad":
            self.register_buffer("global_state", torch.zeros(fr[-1], device=device, dtype=torch.float32))
            self.register_buffer("scenario_state", torch.zeros(num_scenarios, fsr[-1], device=device,
                                                                dtype=torch.float32))
        else:
            self.register_buffer("global_state", None)
            self.register_buffer("scenario_state", None)
        # The fused optimizer's [lr, eps, weight_decay, apply, stochastic_rounding, seed, step], read by the kernels
        # on the device (not state: the values come from the constructor / fused_optimizer; the step is advanced
        # by each fused update and saved by fused_optimizer.state_dict()), and the count of steps skipped as
        # non-finite.
        self.register_buffer("_fused_hparams", _eo.make_hparams(lr, eps, weight_decay, device=device,
                                                                stochastic_rounding=stochastic_rounding,
                                                                seed=rounding_seed), persistent=False)
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.fused_optimizer = (FusedEmbeddingOptimizer(self, float(lr), float(eps), float(weight_decay),
                                                        stochastic_rounding, rounding_seed)
                                if optimizer is not None else None)
        self._rounding = (stochastic_rounding, rounding_seed)
        self._lr, self._weight_decay = float(lr), float(weight_decay)
        # graph-task ids of the backward passes that updated the tables since fused_optimizer.step()
        self._backward_passes: set = set()
        self.reset_parameters()

    @property
    def lr(self) -> float:
        """The fused optimizer's learning rate (settable; the same value as ``fused_optimizer.param_groups[0]``)."""
        return self.fused_optimizer.param_groups[0]["lr"] if self.fused_optimizer is not None else self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        if self.fused_optimizer is not None:
            self.fused_optimizer.param_groups[0]["lr"] = value
        self._lr = float(value)

    @property
    def eps(self) -> float:
        """The fused row-wise Adagrad's epsilon (settable; the same value as ``fused_optimizer.param_groups[0]``)."""
        fo = self.__dict__.get("fused_optimizer")
        return fo.param_groups[0]["eps"] if fo is not None else self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        fo = self.__dict__.get("fused_optimizer")
        if fo is not None:
            fo.param_groups[0]["eps"] = value
        self._eps = float(value)

    @property
    def stochastic_rounding(self) -> bool:
        """Whether the fused update stores 16-bit table rows with stochastic rounding (settable through
        ``fused_optimizer.param_groups[0]["stochastic_rounding"]``)."""
        fo = self.__dict__.get("fused_optimizer")
        return fo.param_groups[0]["stochastic_rounding"] if fo is not None else self._rounding[0]

    @property
    def rounding_seed(self) -> int:
        """The stochastic rounding's seed word (an int in [0, 2^32))."""
        fo = self.__dict__.get("fused_optimizer")
        return fo.param_groups[0]["rounding_seed"] if fo is not None else self._rounding[1]

    @property
    def rounding_step(self) -> int:
        """The fused updates this layer has applied: the stochastic rounding's step word (read from the device:
        a host sync: read it when saving a checkpoint, not inside a captured step)."""
        host_read("ScenarioEmbedding.rounding_step (the fused update count, for a state_dict)",
                  self._fused_hparams.device)
        return int(self._fused_hparams[_STEP].item())

    @property
    def weight_decay(self) -> float:
        return (self.fused_optimizer.param_groups[0]["weight_decay"] if self.fused_optimizer is not None
                else self._weight_decay)


    def reset_parameters(self) -> None:
        """Tables ~ U(-1/sqrt(D), 1/sqrt(D)); Adagrad states (if any) zero."""
        bound = 1.0 / math.sqrt(self.embedding_dim)
        with torch.no_grad():
            nn.init.uniform_(self.global_weight, -bound, bound)
            nn.init.uniform_(self.scenario_weight, -bound, bound)
            for buf in (self.global_state, self.scenario_state):
                if buf is not None:
                    buf.zero_()

    def _apply(self, fn, *args, **kwargs):
        """``.half()`` / ``.to(dtype)`` convert the tables; the Adagrad states stay float32 (the fused update needs
        them so, and sums of g^2 lose too much in 16 bits)."""
        super()._apply(fn, *args, **kwargs)
        for name, dtype in (("global_state", torch.float32), ("scenario_state", torch.float32),
                            ("_fused_hparams", torch.float64), ("nonfinite_steps", torch.int64)):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != dtype:
                self._buffers[name] = buf.to(dtype)
        return self

    def extra_repr(self) -> str:
        pools = sorted({f.pooling for f in self.features})
        s = (f"num_features={self.num_features}, num_aware={self.num_aware}, num_scenarios={self.num_scenarios}, "
             f"embedding_dim={self.embedding_dim}, rows={self.feature_rows[-1]}, "
             f"scenario_rows={self.feature_scenario_rows[-1]}, pooling={pools[0] if len(pools) == 1 else pools}")
        hashed = {n: r for n, r in getattr(self, "scenario_rows", {}).items()
                  if r < self.features[self.feature_names.index(n)].num_embeddings}
        if hashed:
            s += f", hashed_scenario_rows={hashed}"
        if self.sparse:
            s += ", sparse=True"
        if self.optimizer is not None:
            s += f", optimizer={self.optimizer!r}, lr={self.lr}" + (
                f", eps={self.eps}" if self.optimizer == "rowwise_adagrad" else "") + (
                f", weight_decay={self.weight_decay}" if self.weight_decay else "") + (
                ", skip_nonfinite=True" if self.skip_nonfinite else "") + (
                ", stochastic_rounding=False" if not self.stochastic_rounding else "")
        if self.bounds_check != "error":
            s += f", bounds_check={self.bounds_check!r}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    # -------------------------------------------------------------------------------------------- forward

    def _unpack(self, indices, offsets, scenario, per_sample_weights):
        """(indices, offsets, scenario, per_sample_weights) from plain tensors or a KeyedJaggedTensor-like input."""
        if not isinstance(indices, Tensor) and all(hasattr(indices, a) for a in ("keys", "values", "offsets")):
            kjt = indices
            if scenario is None:  # forward(kjt, scenario)
                offsets, scenario = None, offsets
            if offsets is not None:
                raise TypeError("ScenarioEmbedding: with a KeyedJaggedTensor input pass forward(kjt, scenario); "
                                "offsets come from the KeyedJaggedTensor")
            indices, offsets, kjt_weights = self._from_kjt(kjt)
            if per_sample_weights is None:
                per_sample_weights = kjt_weights
            if isinstance(indices, Tensor) and isinstance(offsets, Tensor) and offsets.dtype != indices.dtype:
                offsets = offsets.to(indices.dtype)  # TorchRec often keeps int32 offsets beside int64 values
        if offsets is None or scenario is None:
            raise TypeError("ScenarioEmbedding: forward needs (indices, offsets, scenario) or (kjt, scenario)")
        return indices, offsets, scenario, per_sample_weights

    def _from_kjt(self, kjt):
        """(values, offsets, weights) of a KeyedJaggedTensor in the layer's feature order, matched by key name as
        TorchRec's EmbeddingBagCollection does (keys the layer has no feature for are ignored). Keys already in
        the layer's order cost nothing; the layer's keys in another order are reordered on the device (no host
        read: CUDA-graph capturable); extra keys cost one host read of the offsets to cut the values."""
        variable = getattr(kjt, "variable_stride_per_key", None)
        if callable(variable) and variable():
            raise ValueError("ScenarioEmbedding: variable-batch KeyedJaggedTensors (a stride per key) are not "
                             "supported: every feature needs the same batch size B (one scenario id per sample)")
        keys = list(kjt.keys())
        names = self.feature_names
        missing = [n for n in names if n not in keys]
        if missing:
            raise ValueError(f"ScenarioEmbedding: KeyedJaggedTensor keys {keys} lack the layer's feature(s) {missing}")
        values, offsets = kjt.values(), kjt.offsets()
        weights = kjt.weights_or_none() if hasattr(kjt, "weights_or_none") else None
        if keys == names:
            return values, offsets, weights
        K = len(keys)
        if offsets.numel() < 1 or (offsets.numel() - 1) % K:
            raise ValueError(f"ScenarioEmbedding: KeyedJaggedTensor offsets must have len(keys) * B + 1 entries "
                             f"(len(keys) = {K}), got {offsets.numel()}")
        B = (offsets.numel() - 1) // K
        order = [keys.index(n) for n in names]
        lengths = offsets[1:] - offsets[:-1]
        new_lengths = lengths.view(K, B)[self._key_order(order, offsets.device)].reshape(-1)
        new_offsets = torch.zeros(len(names) * B + 1, dtype=offsets.dtype, device=offsets.device)
        torch.cumsum(new_lengths, 0, out=new_offsets[1:])
        if K == len(names):  # a permutation of the layer's keys: same entries, gathered on the device
            src = self._permuted_entries(offsets, new_offsets, order, B, values.numel())
            return values[src], new_offsets, (weights[src] if weights is not None else None)
        host_read(f"ScenarioEmbedding: a KeyedJaggedTensor with keys the layer has no feature for "
                  f"({sorted(set(keys) - set(names))}) is cut by a host read of its offsets; pass only the "
                  f"layer's keys", offsets.device)
        cuts = offsets[torch.arange(K + 1, device=offsets.device) * B].tolist()
        pick = lambda t: torch.cat([t[cuts[k]:cuts[k + 1]] for k in order])  # noqa: E731
        return pick(values), new_offsets, (pick(weights) if weights is not None else None)

    def _key_order(self, order: list, device) -> Tensor:
        """``order`` (the KJT key index of each layer feature) as an int64 tensor on ``device``, cached per order
        and device. Built by scalar fills (kernels with the value as an argument), not a host-to-device copy, so
        it is capture-safe too."""
        cache = self.__dict__.setdefault("_key_orders", {})
        key = (tuple(order), _checks.device_key(device))
        t = cache.get(key)
        if t is None:
            t = torch.empty(len(order), dtype=torch.int64, device=device)
            for i, k in enumerate(order):
                t.narrow(0, i, 1).fill_(k)
            cache[key] = t
        return t

    def _permuted_entries(self, offsets, new_offsets, order, B: int, nnz: int) -> Tensor:
        """int64 [nnz]: the source entry of every entry of the reordered values, all on the device. Entry p lies in
        new bag j = (layer feature f, sample b) (a search in the new offsets); its source is the same position in
        bag (order[f], b) of the KJT. Clamped into range, so malformed offsets read no entry out of bounds (the
        op's offsets check then reports them)."""
        if nnz == 0 or new_offsets.numel() <= 1:
            return torch.zeros(0, dtype=torch.int64, device=offsets.device)
        dev = offsets.device
        off = offsets.long()
        new_off = new_offsets.long()
        nb = new_off.numel() - 1
        pos = torch.arange(nnz, device=dev)
        bag = torch.searchsorted(new_off[1:], pos, right=True).clamp_(max=nb - 1)
        src_bag = (self._key_order(order, dev)[:, None] * B + torch.arange(B, device=dev)).reshape(-1)
        src = off[src_bag[bag]] + (pos - new_off[bag])
        return src.clamp_(0, nnz - 1)

    def _runs_inputs(self, indices, offsets, per_sample_weights):
        """One (indices, offsets, psw, feature range, pooling) per pooling run; slices need one host sync."""
        if len(self._runs) == 1:
            return [(indices, offsets, per_sample_weights, 0, self.num_features, self._runs[0][2])]
        _checks.tensor("ScenarioEmbedding", "indices", indices, ndim=1, dtypes=_checks.INDEX_DTYPES)
        _checks.tensor("ScenarioEmbedding", "offsets", offsets, ndim=1, dtypes=_checks.INDEX_DTYPES)
        F = self.num_features
        if offsets.numel() < 1 or (offsets.numel() - 1) % F:
            raise ValueError(f"ScenarioEmbedding: offsets must have F*B + 1 entries with F = {F} features, got "
                             f"{offsets.numel()}")
        B = (offsets.numel() - 1) // F
        host_read("ScenarioEmbedding with mixed pooling: its runs of features are cut by a host read of the "
                  "offsets; use one pooling per layer", offsets.device)
        cuts = offsets[[a * B for a, _, _ in self._runs] + [F * B]].tolist()
        # the per-run slices re-base the offsets, so the ends are checked here (the op checks each run's inside)
        if cuts[0] != 0:
            raise ValueError(f"ScenarioEmbedding: offsets[0] must be 0, got {cuts[0]}")
        if cuts[-1] != indices.numel():
            raise ValueError(f"ScenarioEmbedding: offsets[-1] must equal indices.numel() = {indices.numel()}, "
                             f"got {cuts[-1]}")
        out = []
        for k, (a, b, pooling) in enumerate(self._runs):
            lo, hi = cuts[k], cuts[k + 1]
            if not 0 <= lo <= hi <= indices.numel():
                raise ValueError(f"ScenarioEmbedding: offsets[{a * B}] = {lo} .. offsets[{b * B}] = {hi} is not a "
                                 f"valid range of the {indices.numel()} indices")
            w = per_sample_weights[lo:hi] if per_sample_weights is not None else None
            out.append((indices[lo:hi], offsets[a * B:b * B + 1] - lo, w, a, b, pooling))
        return out

    def capture_blockers(self) -> list[str]:
        """What keeps this layer's training step out of a CUDA graph whatever the data (``graphs.capture_blockers``):
        mixed pooling (the runs are cut by a host read of the offsets) and, when the tables train, the triton
        backend (its backward reads segment sizes on the host)."""
        found = []
        if len(self._runs) > 1:
            found.append(f"mixed pooling {[p for _, _, p in self._runs]}: the runs of features are cut by a host "
                         "read of the offsets; use one pooling per layer")
        if self.global_weight.requires_grad or self.scenario_weight.requires_grad:
            try:
                be = _backend.resolve(_seb.OP, self.global_weight.device.type, self.backend)
            except _backend.BackendUnavailableError:
                be = None
            if be == "triton":
                found.append("the triton embedding backward reads its segment sizes on the host; use the cuda "
                             "backend")
        return found

    def forward(self, indices, offsets=None, scenario: Optional[Tensor] = None,
                per_sample_weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``forward(indices, offsets, scenario)`` or ``forward(kjt, scenario)``.

        indices [nnz] int32/int64 ids local to their feature, offsets [F*B+1] feature-major (as TorchRec's
        KeyedJaggedTensor values()/offsets()), scenario [B] in [0, M), per_sample_weights [nnz] optional (sum
        pooling; a KJT's weights are used when present).
        Returns (E_g [B, F, D], E_s [B, Fs, D]); [B, F, L, D] / [B, Fs, L, D] with pooling "none".
        """
        indices, offsets, scenario, psw = self._unpack(indices, offsets, scenario, per_sample_weights)
        update = (self.global_weight.requires_grad, self.scenario_weight.requires_grad)
        # As FBGEMM / TorchRec: the fused update runs in every backward, whatever self.training is (fine-tuning in
        # eval mode trains the tables too); not in a torch.export trace (an inference artifact has no backward).
        fused = (self.optimizer is not None and torch.is_grad_enabled() and any(update)
                 and not _is_exporting())
        if fused:
            refuse_under_ddp(self)  # replicas' fused tables would diverge silently (_ddp_guard)
        gs, ss = [], []
        for idx, off, w, a, b, pooling in self._runs_inputs(indices, offsets, psw):
            fr, fsr = self.feature_rows[a:b + 1], self.feature_scenario_rows[a:b + 1]
            if fused:
                g, s = self._fused(idx, off, scenario, fr, fsr, pooling, w, update)
            else:
                g, s = scenario_embedding_bag(idx, off, scenario, self.global_weight, self.scenario_weight, fr, fsr,
                                              pooling=pooling, per_sample_weights=w, bounds_check=self.bounds_check,
                                              sparse=self.sparse, backend=self.backend)
            gs.append(g)
            ss.append(s)
        if len(gs) == 1:
            return gs[0], ss[0]
        return torch.cat(gs, 1), torch.cat(ss, 1)

    def _fused(self, indices, offsets, scenario, fr, fsr, pooling, psw, update):
        """The fused-optimizer path: validate like the functional op, then run ``_FusedUpdate``. ``update`` =
        (global table trains, scenario table trains)."""
        if psw is not None and psw.requires_grad:
            raise ValueError("ScenarioEmbedding: per_sample_weights get no gradient with a fused optimizer; pass "
                             "them detached (or use optimizer=None)")
        for p in (self.global_weight, self.scenario_weight):
            if not p.is_contiguous():  # updated in place below: a contiguous copy would be updated instead
                with torch.no_grad():
                    p.data = p.data.contiguous()
        # capture-safe mode: the step's snapshot of the error counters (the enclosing model's, taken before its
        # first check, so an error anywhere in the model's forward skips this update too), else None
        errors_before = _checks.errors_before(self.global_weight.device)
        args = _seb.prepare_args(indices, offsets, scenario, self.global_weight.detach(),
                                 self.scenario_weight.detach(), fr, fsr, pooling=pooling, per_sample_weights=psw,
                                 bounds_check=self.bounds_check, sparse=False, backend=self.backend)
        (indices, offsets, scenario, gw, sw, fr_t, fsr_t, slot, psw, pool, bag_len, num_aware, bounds, _,
         backend) = args
        placeholder = torch.zeros(0, device=gw.device, requires_grad=True)
        return _FusedUpdate.apply(
            placeholder, (indices, offsets, scenario, gw, sw, fr_t, fsr_t, slot, psw, pool, bag_len, num_aware,
                          bounds, backend), self, update, errors_before)
