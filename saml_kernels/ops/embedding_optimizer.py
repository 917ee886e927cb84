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
from . import scenario_embedding_bag as _seb
from . import stochastic_rounding as _sr

OP = "scenario_embedding_bag (fused optimizer)"
OPTIMIZERS = FUSED_OPTIMIZERS
#: names of the hparams slots in slot order (saml_kernels/_codes.py: HPARAMS)
HPARAMS = tuple(sorted(_HPARAM_SLOTS, key=_HPARAM_SLOTS.get))
SGD, ROWWISE_ADAGRAD = FUSED_OPTIMIZERS["sgd"], FUSED_OPTIMIZERS["rowwise_adagrad"]


SEED_LIMIT = 1 << 32
STEP_LIMIT = 1 << 53  # float64 holds every integer below


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
