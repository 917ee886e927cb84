"""Fused optimizer step in the backward of ``scenario_embedding_bag`` (the FBGEMM "fused TBE" approach).

Instead of materialising the table gradients (dense [R, D] / [M, Rs, D], or sparse COO) and then running an
optimizer over them, the backward reduces the gradient of every touched row (deduplicated: each unique row is
summed over all of its occurrences, in a fixed order) and applies the update to that row in place:

    g_r   = sum_{i : row(i) = r} scale_i * dL/dout[bag(i)]      (scale_i = w_i, / bag length for "mean")
    SGD:               W[r] <- W[r] - lr * g_r
    row-wise Adagrad:  state[r] <- state[r] + mean_d(g_r[d]^2);   W[r] <- W[r] - lr * g_r / (sqrt(state[r]) + eps)

for the global rows ``r = feature_rows[f] + id`` and the scenario rows ``r = scenario[b] * Rs +
feature_scenario_rows[f] + id`` (rows of scenario table s only from samples of scenario s). Invalid ids (out of
their feature's range) contribute nothing. Row-wise Adagrad keeps one float32 value per row: ``global_state [R]``
and ``scenario_state [M * Rs]`` (or ``[M, Rs]``), owned by the caller (the layer keeps them as buffers).

Backends: ``cpu`` / ``cuda`` call the fused C++ op ``torch.ops.saml_C.seb_backward_update_`` (no gradient
tensor beyond per-row scratch); ``reference`` / ``triton`` take the backend's deduplicated rows
(``seb_backward_rows`` contract) and apply the same update in PyTorch on the unique rows. Both are
deterministic: the per-row sums come from a sort + segment reduce, never from atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import scenario_embedding_bag as _seb

OP = "scenario_embedding_bag (fused optimizer)"
OPTIMIZERS = {"sgd": 1, "rowwise_adagrad": 2}


def _apply_rows(weight2d: Tensor, rows: Tensor, grads: Tensor, state: Optional[Tensor], optimizer: int, lr: float,
                eps: float) -> None:
    """The update on unique ``rows`` of ``weight2d`` [N, D] with their reduced gradients ``grads`` [U, D]."""
    if rows.numel() == 0:
        return
    acc = torch.float64 if weight2d.dtype == torch.float64 else torch.float32
    g = grads.to(acc)
    w = weight2d.index_select(0, rows).to(acc)
    if optimizer == 1:
        w = w - lr * g
    else:
        s = state.index_select(0, rows) + (g * g).mean(1).to(torch.float32)
        state.index_copy_(0, rows, s)
        w = w - (lr / (s.to(acc).sqrt() + eps)).unsqueeze(1) * g
    weight2d.index_copy_(0, rows, w.to(weight2d.dtype))


def backward_update(backend: str, grad_global: Tensor, grad_scenario: Tensor, indices: Tensor, offsets: Tensor,
                    scenario: Tensor, global_weight: Tensor, scenario_weight: Tensor, feature_rows: Tensor,
                    feature_scenario_rows: Tensor, aware_slot: Tensor, per_sample_weights: Optional[Tensor],
                    pooling: int, bag_len: int, global_state: Optional[Tensor], scenario_state: Optional[Tensor],
                    optimizer: str, lr: float, eps: float) -> None:
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
        optimizer: "sgd" | "rowwise_adagrad"; lr: learning rate; eps: Adagrad epsilon.

    Returns None; the update is W[r] -= lr * g_r (SGD) or the row-wise Adagrad step in the module docstring.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"{OP}: optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    code = OPTIMIZERS[optimizer]
    for name, w in (("global_weight", global_weight), ("scenario_weight", scenario_weight)):
        if not w.is_contiguous():
            raise ValueError(f"{OP}: {name} must be contiguous to be updated in place")
    if code == 2:
        for name, st, n in (("global_state", global_state, global_weight.shape[0]),
                            ("scenario_state", scenario_state, scenario_weight.shape[0] * scenario_weight.shape[1])):
            if st is None or st.dtype != torch.float32 or st.numel() != n or not st.is_contiguous():
                raise ValueError(f"{OP}: rowwise_adagrad needs {name} as a contiguous float32 tensor of {n} elements, "
                                 f"got {None if st is None else (st.dtype, tuple(st.shape))}")
        global_state = global_state.view(-1)
        scenario_state = scenario_state.view(-1)
    else:
        global_state = scenario_state = None
    with torch.no_grad():
        if backend in ("cpu", "cuda"):
            torch.ops.saml_C.seb_backward_update_(
                grad_global, grad_scenario, indices, offsets, scenario, global_weight, scenario_weight, feature_rows,
                feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len, global_state,
                scenario_state, code, float(lr), float(eps))
            return
        if backend not in ("reference", "triton"):
            raise ValueError(f"{OP}: unknown backend {backend!r}")
        _, bwd = _seb._kernels(backend)
        grows, gvals, srows, svals, _ = bwd(grad_global.contiguous(), grad_scenario.contiguous(), indices, offsets,
                                            scenario, global_weight, scenario_weight, feature_rows,
                                            feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len,
                                            False)
        D = global_weight.shape[1]
        _apply_rows(global_weight, grows, gvals, global_state, code, lr, eps)
        _apply_rows(scenario_weight.view(-1, D), srows, svals, scenario_state, code, lr, eps)
