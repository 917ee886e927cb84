"""Fused optimizer step in the backward of ``scenario_embedding_bag`` (the FBGEMM "fused TBE" approach).

Instead of materialising the table gradients (dense [R, D] / [M, Rs, D], or sparse COO) and then running an
optimizer over them, the backward reduces the gradient of every touched row (deduplicated: each unique row is
summed over all of its occurrences, in a fixed order) and applies the update to that row in place:

    g_r   = sum_{i : row(i) = r} scale_i * dL/dout[bag(i)]      (scale_i = w_i, / bag length for "mean")
    g'_r  = g_r + weight_decay * W[r]                           (L2 weight decay on the touched rows, FBGEMM's L2 mode)
    SGD:               W[r] <- W[r] - lr * g'_r
    row-wise Adagrad:  state[r] <- state[r] + mean_d(g'_r[d]^2);   W[r] <- W[r] - lr * g'_r / (sqrt(state[r]) + eps)

for the global rows ``r = feature_rows[f] + id`` and the scenario rows ``r = scenario[b] * Rs +
feature_scenario_rows[f] + id`` (rows of scenario table s only from samples of scenario s). Invalid ids (out of
their feature's range) contribute nothing. Row-wise Adagrad keeps one float32 value per row: ``global_state [R]``
and ``scenario_state [M * Rs]`` (or ``[M, Rs]``), owned by the caller (the layer keeps them as buffers).

The hyper-parameters travel as a float64 tensor ``hparams = [lr, eps, weight_decay, apply, stochastic_rounding,
seed, step]`` on the weights' device, read by the kernels when they run (never by the host): a scheduler can change
the learning rate between CUDA-graph replays, and ``apply = 0`` (e.g. a non-finite gradient found on the device)
skips the whole update without a host sync. A frozen table (``update_global`` / ``update_scenario`` False) is left
untouched, state included.

16-bit tables (bfloat16 / float16): the updated row is computed in float32 and stored with stochastic rounding when
``stochastic_rounding`` is 1 (the default), with round-to-nearest when 0 (``stochastic_rounding.py``: a hash of
(seed, step, table, row, column), the same on every backend, so E[stored] = the float32 update and a step below
half an ulp is not lost). The caller advances ``step`` once per update (the layer does); float32 / float64 tables
ignore the three slots.

Public API: :func:`scenario_embedding_bag_fused` (the op whose backward applies the update; the layer
``nn.ScenarioEmbedding(optimizer=...)`` keeps the tables, the states and the hparams tensor and calls it) and
:func:`backward_update` (the update alone, for callers that hold the upstream gradients).

Backends: those whose kernel table has ``backward_update`` (``cpu``, ``cuda``: the fused C++ op
``torch.ops.saml_C.seb_backward_update_``, no gradient tensor beyond per-row scratch) run it; the others
(``reference``, ``triton``) take the backend's deduplicated rows (``backward_rows``) and apply the same update
in PyTorch on the unique rows (:func:`rowwise_adagrad_step`, also the table update of
``saml_kernels.training.TrainingOptimizer``). Both are
deterministic: the per-row sums come from a sort + segment reduce, never from atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .._codes import FUSED_OPTIMIZERS, HPARAMS as _HPARAM_SLOTS
from . import _checks
from . import scenario_embedding_bag as _seb
from . import stochastic_rounding as _sr

OP = "scenario_embedding_bag (fused optimizer)"
OPTIMIZERS = FUSED_OPTIMIZERS
#: names of the hparams slots in slot order (saml_kernels/_codes.py: HPARAMS)
HPARAMS = tuple(sorted(_HPARAM_SLOTS, key=_HPARAM_SLOTS.get))
SGD, ROWWISE_ADAGRAD = FUSED_OPTIMIZERS["sgd"], FUSED_OPTIMIZERS["rowwise_adagrad"]


SEED_LIMIT = 1 << 32
STEP_LIMIT = 1 << 53  # float64 holds every integer below
_STEP = HPARAMS.index("step")
_APPLY = HPARAMS.index("apply")

# ------------------------------------------------------------------------------------------- hyper-parameters


def make_hparams(lr: float, eps: float, weight_decay: float = 0.0, device=None, stochastic_rounding: bool = True,
                 seed: int = 0, step: int = 0) -> Tensor:
    """The float64 [7] tensor ``[lr, eps, weight_decay, apply=1, stochastic_rounding, seed, step]`` the fused
    update reads on ``device`` (seed an int in [0, 2^32), step an int in [0, 2^53))."""
    check_rounding(stochastic_rounding, seed, step, "make_hparams")
    return torch.tensor([float(lr), float(eps), float(weight_decay), 1.0, float(bool(stochastic_rounding)),
                         float(seed), float(step)], dtype=torch.float64, device=device)


def check_rounding(stochastic_rounding, seed, step, who: str) -> None:
    """ValueError naming ``who`` unless stochastic_rounding is a bool, seed an int in [0, 2^32) and step an int in
    [0, 2^53) (the hash's words; float64 slots)."""
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"{who}: stochastic_rounding must be a bool, got {stochastic_rounding!r}")
    for name, v, limit in (("seed", seed, SEED_LIMIT), ("step", step, STEP_LIMIT)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < limit:
            raise ValueError(f"{who}: rounding {name} must be an int in [0, {limit}), got {v!r}")


def finite_flag(*grads: Tensor) -> Tensor:
    """A 0-dim float64 tensor on the gradients' device: 1 when every element of ``grads`` is finite, else 0
    (device reductions only: no host sync)."""
    ok = torch.ones((), dtype=torch.bool, device=grads[0].device)
    for g in grads:
        if g.numel():
            ok = ok & torch.isfinite(g).all()
    return ok.to(torch.float64)


# ------------------------------------------------------------------------------------------------ update math

def rowwise_adagrad_step(weight: Tensor, grad: Tensor, state: Tensor, lr, eps) -> tuple[Tensor, Tensor]:
    """Row-wise Adagrad on rows ``weight`` [..., D] with gradients ``grad`` [..., D] (both in the accumulation
    dtype: float32, float64 for float64 tables) and their float32 states ``state`` [...]; ``lr``, ``eps`` are
    floats or 0-dim tensors:

        state' = state + mean_d(grad^2);    weight' = weight - lr / (sqrt(state') + eps) * grad

    Returns (weight', state') without writing the inputs. The C++ kernels compute the same factor with
    ``saml::fused_step_scale`` (csrc/include/saml_common.h)."""
    new_state = state + (grad * grad).mean(-1).to(torch.float32)
    return weight - (lr / (new_state.to(grad.dtype).sqrt() + eps)).unsqueeze(-1) * grad, new_state


def _store(w: Tensor, dtype: torch.dtype, hparams: Tensor, table: int, rows: Tensor) -> Tensor:
    """Updated rows ``w`` [U, D] (accumulation dtype) in the table's ``dtype``: stochastic rounding for 16-bit tables
    when hparams says so (chosen with torch.where: no host sync), else round-to-nearest."""
    if dtype not in _sr.DTYPES:
        return w.to(dtype)
    sr = _sr.round_rows(w, dtype, hparams[5], hparams[6], table, rows)
    return torch.where(hparams[4] != 0, sr, w.to(dtype))


def _apply_rows(weight2d: Tensor, rows: Tensor, grads: Tensor, state: Optional[Tensor], optimizer: int,
                hparams: Tensor, table: int = _sr.GLOBAL_TABLE) -> None:
    """The update on unique ``rows`` of ``weight2d`` [N, D] (``table``: 0 global, 1 scenario, a hash word of the
    stochastic rounding) with their reduced gradients ``grads`` [U, D]; a skipped step (hparams[3] == 0) writes
    the old values back (torch.where, no host sync)."""
    if rows.numel() == 0:
        return
    acc = torch.float64 if weight2d.dtype == torch.float64 else torch.float32
    lr, eps, wd, apply = hparams[:4].unbind()
    w_old = weight2d.index_select(0, rows)
    w = w_old.to(acc)
    g = grads.to(acc) + wd.to(acc) * w
    keep = apply == 0
    if optimizer == SGD:
        w = w - lr.to(acc) * g
    else:
        s_old = state.index_select(0, rows)
        w, s = rowwise_adagrad_step(w, g, s_old, lr.to(acc), eps.to(acc))
        state.index_copy_(0, rows, torch.where(keep, s_old, s))
    weight2d.index_copy_(0, rows, torch.where(keep, w_old, _store(w, weight2d.dtype, hparams, table, rows)))


# --------------------------------------------------------------------------- the update on given gradients

def backward_update(backend: str, grad_global: Tensor, grad_scenario: Tensor, indices: Tensor, offsets: Tensor,
                    scenario: Tensor, global_weight: Tensor, scenario_weight: Tensor, feature_rows: Tensor,
                    feature_scenario_rows: Tensor, aware_slot: Tensor, per_sample_weights: Optional[Tensor],
                    pooling: int, bag_len: int, global_state: Optional[Tensor], scenario_state: Optional[Tensor],
                    optimizer: str, hparams: Tensor, update_global: bool = True,
                    update_scenario: bool = True) -> None:
    """Applies one optimizer step for the upstream gradients of ``scenario_embedding_bag``, in place.

    Args (the kernel contract of ``seb_backward_rows``, see csrc/registry.cpp):
        backend: "reference" | "cpu" | "triton" | "cuda".
        grad_global [B, F, D] ([B, F, L, D] for pooling "none"), grad_scenario [B, Fs, D] (or [B, Fs, L, D]):
            dL/d(outputs) of the forward.
        indices [nnz], offsets [F*B+1] (int32/int64, same dtype), scenario [B]: the forward's inputs.
        global_weight [R, D], scenario_weight [M, Rs, D]: updated in place (must be contiguous).
        feature_rows, feature_scenario_rows [F+1] int64, aware_slot [F] int64: from ``table_layout``.
        per_sample_weights [nnz] or None; pooling 0 sum / 1 mean / 2 none; bag_len L for "none" (else 0).
        global_state float32 [R], scenario_state float32 [M*Rs] (or [M, Rs]): row-wise Adagrad state, updated
            in place (None for SGD).
        optimizer: "sgd" | "rowwise_adagrad".
        hparams: float64 [7] on the weights' device, ``[lr, eps, weight_decay, apply, stochastic_rounding, seed,
            step]`` (see ``make_hparams``; the caller advances ``step`` between updates).
        update_global, update_scenario: False leaves that table and its state unchanged (frozen).

    Returns None; the update is the one in the module docstring.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"{OP}: optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    code = OPTIMIZERS[optimizer]
    for name, w in (("global_weight", global_weight), ("scenario_weight", scenario_weight)):
        if not w.is_contiguous():
            raise ValueError(f"{OP}: {name} must be contiguous to be updated in place")
    if (not isinstance(hparams, Tensor) or hparams.dtype != torch.float64 or hparams.numel() != len(HPARAMS)
            or hparams.device != global_weight.device):
        raise ValueError(f"{OP}: hparams must be a float64 tensor {list(HPARAMS)} on {global_weight.device}, got "
                         f"{hparams if not isinstance(hparams, Tensor) else (hparams.dtype, hparams.device)}")
    if code == ROWWISE_ADAGRAD:
        for name, st, n in (("global_state", global_state, global_weight.shape[0]),
                            ("scenario_state", scenario_state, scenario_weight.shape[0] * scenario_weight.shape[1])):
            if st is None or st.dtype != torch.float32 or st.numel() != n or not st.is_contiguous():
                raise ValueError(f"{OP}: rowwise_adagrad needs {name} as a contiguous float32 tensor of {n} elements, "
                                 f"got {None if st is None else (st.dtype, tuple(st.shape))}")
        global_state = global_state.view(-1)
        scenario_state = scenario_state.view(-1)
    else:
        global_state = scenario_state = None
    if not (update_global or update_scenario):
        return
    _backend.check_name(backend, f"{OP}: backend")
    hparams = hparams.contiguous()
    with torch.no_grad():
        k = _backend.kernels(_seb.OP, backend)
        if k.backward_update is not None:
            k.backward_update(
                grad_global, grad_scenario, indices, offsets, scenario, global_weight, scenario_weight, feature_rows,
                feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len, global_state,
                scenario_state, code, hparams, bool(update_global), bool(update_scenario))
            return
        grows, gvals, srows, svals, _ = k.backward_rows(
            grad_global.contiguous(), grad_scenario.contiguous(), indices, offsets, scenario, global_weight,
            scenario_weight, feature_rows, feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len,
            False)
        D = global_weight.shape[1]
        if update_global:
            _apply_rows(global_weight, grows, gvals, global_state, code, hparams)
        if update_scenario:
            _apply_rows(scenario_weight.view(-1, D), srows, svals, scenario_state, code, hparams, _sr.SCENARIO_TABLE)


# ------------------------------------------------------------------------------------------------ autograd

class _FusedUpdate(torch.autograd.Function):
    """Forward: the ``scenario_embedding_bag`` custom op (its eager path, ops/_eager.py, outside graphs). Backward: :func:`backward_update` applied in place to the
    touched rows (FBGEMM TBE style); no gradient tensor is materialised. The first input is a placeholder that
    requires grad, so autograd calls this backward although the tables themselves are passed detached."""

    @staticmethod
    def forward(ctx, placeholder, args, step):
        (indices, offsets, scenario, gw, sw, fr, fsr, slot, psw, pooling, bag_len, num_aware, bounds, backend) = args
        g, s = _seb._forward_op(indices, offsets, scenario, gw, sw, fr, fsr, slot, psw, pooling, bag_len, num_aware,
                                bounds, False, backend)
        ctx.save_for_backward(indices, offsets, scenario, fr, fsr, slot, psw)
        # The tables (and states) are updated in place in the backward: keep them as attributes, not saved tensors
        # (a saved tensor's version check would reject the update when the op runs twice before one backward).
        ctx.gw, ctx.sw, ctx.step = gw, sw, step
        ctx.pooling, ctx.bag_len, ctx.backend = pooling, bag_len, backend
        return g, s

    @staticmethod
    def backward(ctx, grad_global, grad_scenario):
        indices, offsets, scenario, fr, fsr, slot, psw = ctx.saved_tensors
        st = ctx.step
        if st.backward_passes is not None:
            # which backward pass this is (host bookkeeping, no sync): TrainingOptimizer.step() warns when one step
            # saw several (gradient accumulation, retain_graph), each of which applied its own update
            st.backward_passes.add(torch._C._current_graph_task_id())
        hparams = st.hparams
        if st.nonfinite_steps is not None:
            # The step is skipped on the device when an upstream gradient is not finite: no host sync, and the
            # counter tells the user afterwards.
            ok = finite_flag(grad_global, grad_scenario)
            st.nonfinite_steps.add_((1 - ok).to(st.nonfinite_steps.dtype))
            hparams = torch.cat([hparams[:_APPLY], ok.reshape(1), hparams[_APPLY + 1:]])
        if st.errors_before is not None:
            # capture-safe mode: no update from a step in which a bad input was counted (since the snapshot of
            # this step: the enclosing model forward's, see _checks.step_errors, else this op's call)
            clean = (_checks.error_total(ctx.gw.device) == st.errors_before).to(torch.float64)
            hparams = torch.cat([hparams[:_APPLY], (hparams[_APPLY] * clean).reshape(1), hparams[_APPLY + 1:]])
        sstate = st.scenario_state
        backward_update(
            ctx.backend, grad_global.contiguous(), grad_scenario.contiguous(), indices, offsets, scenario, ctx.gw,
            ctx.sw, fr, fsr, slot, psw, ctx.pooling, ctx.bag_len, st.global_state,
            sstate.view(-1) if sstate is not None else None, st.optimizer, hparams, *st.update)
        # the stochastic rounding's step word: one per fused update, on the device (no sync, graph-capturable)
        st.hparams[_STEP:_STEP + 1].add_(1)
        return None, None, None


class _Step:
    """What the backward of one fused call needs besides the saved inputs (host objects, no nn.Module)."""

    __slots__ = ("optimizer", "hparams", "global_state", "scenario_state", "update", "nonfinite_steps",
                 "backward_passes", "errors_before")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


# ------------------------------------------------------------------------------------------------ public API

def scenario_embedding_bag_fused(indices: Tensor, offsets: Tensor, scenario: Tensor, global_weight: Tensor,
                                 scenario_weight: Tensor, feature_rows, feature_scenario_rows, *, optimizer: str,
                                 hparams: Tensor, global_state: Optional[Tensor] = None,
                                 scenario_state: Optional[Tensor] = None, pooling: str = "sum",
                                 per_sample_weights: Optional[Tensor] = None, bounds_check: str = "error",
                                 backend: Optional[str] = None, update: tuple = (True, True),
                                 nonfinite_steps: Optional[Tensor] = None,
                                 backward_passes: Optional[set] = None) -> tuple[Tensor, Tensor]:
    """``scenario_embedding_bag`` whose backward updates the tables in place (module docstring) and returns no
    gradient for them.

    Forward: exactly ``saml_kernels.scenario_embedding_bag(indices, offsets, scenario, global_weight,
    scenario_weight, feature_rows, feature_scenario_rows, pooling=..., per_sample_weights=..., bounds_check=...,
    backend=...)``: (E_g [B, F, D], E_s [B, Fs, D]) ([B, F, L, D] / [B, Fs, L, D] for pooling "none"), the same
    checks and messages. The outputs require grad (through a placeholder), so a loss built on them reaches the
    backward, which applies ONE optimizer step per backward pass:

        g'_r = sum_i scale_i dL/dout[bag(i)] + weight_decay W[r];   SGD W[r] -= lr g'_r;
        Adagrad state[r] += mean_d(g'_r^2), W[r] -= lr g'_r / (sqrt(state[r]) + eps)

    Args beyond the op's:
        global_weight [R, D], scenario_weight [M, Rs, D]: contiguous; updated in place in the backward (their
            ``requires_grad`` is ignored: pass ``update`` instead).
        optimizer: "sgd" | "rowwise_adagrad".
        hparams: float64 [7] ``[lr, eps, weight_decay, apply, stochastic_rounding, seed, step]`` on the tables'
            device (``make_hparams``), read when the backward runs (so a change made between forward and backward
            holds); the backward advances its ``step`` slot by one.
        global_state float32 [R], scenario_state float32 [M, Rs] (or [M * Rs]): row-wise Adagrad states, updated in
            place (None for SGD).
        update: (global table trains, scenario table trains); a False table is left untouched, state included.
        nonfinite_steps: a 0-dim integer tensor, or None. Given: a backward whose upstream gradient holds a NaN
            or Inf applies no update (decided on the device, no host sync) and adds 1 to it.
        backward_passes: a set, or None. Given: every backward adds its autograd graph-task id (host bookkeeping;
            ``TrainingOptimizer`` reads it to warn about several updates in one step).

    In capture-safe check mode a backward applies nothing when a bad input was counted since the step's snapshot
    (``_checks.errors_before``: the enclosing model forward's, else this call's).
    Raises ValueError for a per_sample_weights that requires grad (it would get no gradient), a non-contiguous
    table, an unknown optimizer or a malformed hparams / state, before anything runs.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"{OP}: optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    if per_sample_weights is not None and per_sample_weights.requires_grad:
        raise ValueError(f"{OP}: per_sample_weights get no gradient with a fused optimizer; pass them detached "
                         "(or use optimizer=None)")
    for name, w in (("global_weight", global_weight), ("scenario_weight", scenario_weight)):
        if isinstance(w, Tensor) and not w.is_contiguous():
            raise ValueError(f"{OP}: {name} must be contiguous to be updated in place")
    # capture-safe mode: the step's snapshot of the error counters (the enclosing model's, taken before its first
    # check, so an error anywhere in the model's forward skips this update too), else None
    errors_before = _checks.errors_before(global_weight.device)
    args = _seb.prepare_args(indices, offsets, scenario, global_weight.detach(), scenario_weight.detach(),
                             feature_rows, feature_scenario_rows, pooling=pooling, per_sample_weights=per_sample_weights,
                             bounds_check=bounds_check, sparse=False, backend=backend)
    (indices, offsets, scenario, gw, sw, fr, fsr, slot, psw, pool, bag_len, num_aware, bounds, _, be) = args
    step = _Step(optimizer=optimizer, hparams=hparams, global_state=global_state, scenario_state=scenario_state,
                 update=(bool(update[0]), bool(update[1])), nonfinite_steps=nonfinite_steps,
                 backward_passes=backward_passes, errors_before=errors_before)
    placeholder = torch.zeros(0, device=gw.device, requires_grad=True)
    return _FusedUpdate.apply(
        placeholder, (indices, offsets, scenario, gw, sw, fr, fsr, slot, psw, pool, bag_len, num_aware, bounds, be),
        step)
