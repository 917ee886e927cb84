"""Adapters from the raw backend-kernel signatures (csrc/registry.cpp; the ``*_kernel`` functions) to float64
oracles, for the tests of the kernels themselves.

Like tests/oracles.py (whose oracles it adapts) this imports torch and ``oracles`` only, nothing from
``saml_kernels`` (test_layering.py checks it): the kernel tests judge the C++/CUDA/Triton kernels by the ops' math
written apart from the package, not by the reference backend's kernel functions. Everything is float64 on the CPU.

- ``seb_forward`` / ``seb_backward_rows``: the embedding bag's kernel pair (hashed scenario rows by
  ``oracles.scenario_local``).
- ``mbl_grouped_forward`` / ``mbl_all_forward`` / ``mbl_grouped_backward``: the branch GEMM's kernels.
- ``mutual_forward`` / ``mutual_backward`` / ``mutual_linear_forward`` / ``mutual_linear_backward``: the mutual
  unit's and the fused mutual_linear's kernels (backwards by autograd through the oracles).
"""
from __future__ import annotations

import torch

from oracles import act64, mbranch_oracle, mutual_linear_oracle, mutual_oracle, scenario_local

SUM, MEAN, NONE = 0, 1, 2  # the kernel pooling codes
def _entries(indices, offsets, scenario, feature_rows, feature_scenario_rows, Rs):
    """Per entry (Python lists): bag, feature, sample, valid, global row, flat scenario row (m * Rs + r, or -1 for
    a non-aware feature / invalid id)."""
    idx, off, sc = indices.tolist(), offsets.tolist(), scenario.tolist()
    fr, fsr = [int(v) for v in feature_rows], [int(v) for v in feature_scenario_rows]
    F = len(fr) - 1
    B = (len(off) - 1) // F if F else 0
    bag, feat, samp, valid, grow, srow = [], [], [], [], [], []
    for k in range(F * B):
        f, b = k // B, k % B
        rg, rs = fr[f + 1] - fr[f], fsr[f + 1] - fsr[f]
        for i in idx[off[k]:off[k + 1]]:
            ok = 0 <= i < rg
            bag.append(k), feat.append(f), samp.append(b), valid.append(ok)
            grow.append(fr[f] + i if ok else 0)
            srow.append(sc[b] * Rs + fsr[f] + scenario_local(i, rg, rs) if ok and rs > 0 else -1)
    return F, B, bag, feat, samp, valid, grow, srow


def _pooled(indices, offsets, scenario, G, S, feature_rows, feature_scenario_rows, aware_slot, psw, pooling,
            bag_len):
    """float64 outputs of the forward, differentiable w.r.t. the float64 G [R, D], S [M, Rs, D], psw [nnz]."""
    D, Rs = G.shape[1], S.shape[1]
    F, B, bag, feat, samp, valid, grow, srow = _entries(indices, offsets, scenario, feature_rows,
                                                        feature_scenario_rows, Rs)
    slot = [int(v) for v in aware_slot]
    A = sum(v >= 0 for v in slot)
    nnz = len(bag)
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    okf = torch.tensor(valid, dtype=torch.float64)
    w = okf * (psw if psw is not None else 1.0)
    gv = G[t(grow)].reshape(nnz, D) * w[:, None]
    aw = [k for k in range(nnz) if srow[k] >= 0]
    sv = S.reshape(-1, D)[t([srow[k] for k in aw])].reshape(len(aw), D) * w[t(aw)][:, None]
    if pooling == NONE:
        L = bag_len
        g = torch.zeros(B, F, L, D, dtype=torch.float64)
        s = torch.zeros(B, A, L, D, dtype=torch.float64)
        pos = [k % max(L, 1) for k in range(nnz)]
        if nnz:
            g = g.index_put((t(samp), t(feat), t(pos)), gv, accumulate=True)
        if aw:
            s = s.index_put((t([samp[k] for k in aw]), t([slot[feat[k]] for k in aw]), t([pos[k] for k in aw])),
                            sv, accumulate=True)
        return g, s
    g = torch.zeros(B, F, D, dtype=torch.float64)
    s = torch.zeros(B, A, D, dtype=torch.float64)
    if nnz:
        g = g.index_put((t(samp), t(feat)), gv, accumulate=True)
    if aw:
        s = s.index_put((t([samp[k] for k in aw]), t([slot[feat[k]] for k in aw])), sv, accumulate=True)
    if pooling == MEAN:  # divided by the bag's length, invalid ids included
        off = offsets.tolist()
        n = torch.tensor([max(off[k + 1] - off[k], 1) for k in range(F * B)], dtype=torch.float64).reshape(F, B).t()
        g = g / n[:, :, None]
        s = s / n[:, [f for f in range(F) if slot[f] >= 0]][:, :, None]
    return g, s


def seb_forward(indices, offsets, scenario, global_weight, scenario_weight, feature_rows, feature_scenario_rows,
                aware_slot, per_sample_weights, pooling, bag_len, check, num_aware=-1):
    """float64 oracle of ``seb_forward``: (global_out [B, F, D] | [B, F, L, D], scenario_out [B, A, ...], bad [1])
    with invalid ids (outside their feature's rows) reading zero and counted in bad when ``check``."""
    psw = None if per_sample_weights is None else per_sample_weights.detach().double().cpu()
    with torch.no_grad():
        g, s = _pooled(indices.cpu(), offsets.cpu(), scenario.cpu(), global_weight.detach().double().cpu(),
                       scenario_weight.detach().double().cpu(), feature_rows.cpu(), feature_scenario_rows.cpu(),
                       aware_slot.cpu(), psw, pooling, bag_len)
    valid = _entries(indices.cpu(), offsets.cpu(), scenario.cpu(), feature_rows.cpu(), feature_scenario_rows.cpu(),
                     1)[5]
    bad = torch.tensor([sum(not v for v in valid) if check else 0], dtype=torch.long)
    return g, s, bad


def seb_backward_rows(grad_global, grad_scenario, indices, offsets, scenario, global_weight, scenario_weight,
                      feature_rows, feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len,
                      need_psw_grad):
    """float64 oracle of ``seb_backward_rows`` by autograd through the forward: (sorted unique global rows read by
    valid ids, dG at them, sorted unique flat scenario rows m * Rs + r, dS at them, d psw [nnz] or empty)."""
    G = global_weight.detach().double().cpu().requires_grad_()
    S = scenario_weight.detach().double().cpu().requires_grad_()
    psw = None
    if per_sample_weights is not None:
        psw = per_sample_weights.detach().double().cpu().requires_grad_(bool(need_psw_grad))
    cpu = [v.cpu() for v in (indices, offsets, scenario, feature_rows, feature_scenario_rows, aware_slot)]
    g, s = _pooled(cpu[0], cpu[1], cpu[2], G, S, cpu[3], cpu[4], cpu[5], psw, pooling, bag_len)
    loss = (g * grad_global.detach().double().cpu()).sum() + (s * grad_scenario.detach().double().cpu()).sum()
    if not loss.requires_grad:  # no entry at all: nothing reads a row
        loss = loss + 0.0 * (G.sum() + S.sum() + (psw.sum() if psw is not None and psw.requires_grad else 0.0))
    grads = torch.autograd.grad(loss, [G, S], allow_unused=True, retain_graph=True)
    if psw is not None and need_psw_grad:
        # the op takes per-sample weights with sum pooling only; for mean the CPU kernel and the reference give the
        # sum pooling's d psw (the dot of the bag's gradient with the row, not divided by the bag length; the CUDA
        # and Triton kernels divide it: csrc/registry.cpp leaves it unspecified): the CPU one restated here
        if pooling == MEAN:
            g, s = _pooled(cpu[0], cpu[1], cpu[2], G, S, cpu[3], cpu[4], cpu[5], psw, SUM, bag_len)
            loss = (g * grad_global.detach().double().cpu()).sum() + (s * grad_scenario.detach().double().cpu()).sum()
            loss = loss + 0.0 * psw.sum()
        grads = grads + torch.autograd.grad(loss, [psw], allow_unused=True)
    dG, dS = [torch.zeros_like(v) if d is None else d for v, d in zip((G, S), grads[:2])]
    D = G.shape[1]
    _, _, _, _, _, valid, grow, srow = _entries(cpu[0], cpu[1], cpu[2], cpu[3], cpu[4], S.shape[1])
    grows = torch.tensor(sorted({r for r, v in zip(grow, valid) if v}), dtype=torch.long)
    srows = torch.tensor(sorted({r for r in srow if r >= 0}), dtype=torch.long)
    gpsw = grads[2] if len(grads) > 2 else torch.empty(0, dtype=torch.float64)
    if gpsw is None:
        gpsw = torch.zeros_like(psw)
    return grows, dG[grows].reshape(-1, D), srows, dS.reshape(-1, D)[srows].reshape(-1, D), gpsw


# ------------------------------------------------------------------------------ branch GEMM / mutual unit

ACTIVATION = {0: None, 1: "relu", 2: "leaky_relu", 3: "gelu", 4: "silu"}  # the kernels' activation codes
SIMILARITY = {0: "cosine", 1: "dot"}                                     # the kernels' similarity codes


def _d(t):
    return None if t is None else t.detach().double().cpu()


def _own_rows(s, M):
    """(scenario as int64 on the CPU, clamped into [0, M), ok [B]): a row whose scenario is outside [0, M) gives
    zeros in every kernel output (the unchecked-input contract, docs/design.md)."""
    s = s.long().cpu()
    ok = (s >= 0) & (s < M)
    return s.clamp(0, max(M - 1, 0)), ok


def mbl_grouped_forward(x, weight, bias, aux, aux_weight, scenario, activation):
    """``mbl_grouped_forward``: (y = act(z) [B, N], z [B, N] for gelu / silu (codes 3, 4) else empty)."""
    M = weight.shape[0]
    s, ok = _own_rows(scenario, M)
    with torch.no_grad():
        z = mbranch_oracle(_d(x), _d(weight), _d(bias), s, route="own", aux=_d(aux), aux_weight=_d(aux_weight))
        z = z * ok[:, None]
    y = act64(z, ACTIVATION[activation]) * ok[:, None]
    return y, (z if activation in (3, 4) else z.new_empty(0))


def mbl_all_forward(x, weight, bias, aux, aux_weight, activation):
    """``mbl_all_forward``: (y [M, B, N] every branch on every row, z or empty as above)."""
    B = x.shape[-2]
    with torch.no_grad():
        z = mbranch_oracle(_d(x), _d(weight), _d(bias), torch.zeros(B, dtype=torch.long), route="all",
                           grad_mask="none", aux=_d(aux), aux_weight=_d(aux_weight))
    return act64(z, ACTIVATION[activation]), (z if activation in (3, 4) else z.new_empty(0))


def mbl_grouped_backward(dz, x, weight, aux, aux_weight, scenario, need_dx, need_dweight, need_dbias, need_daux,
                         need_daux_weight):
    """``mbl_grouped_backward``: (dx, dW, db, daux, dWa) of z_b = x_b W_{s_b} + aux_b Wa_{s_b} + b_{s_b} against
    dz [B, N] by autograd; empty where not asked for (or without aux)."""
    M, K, N = weight.shape
    s, ok = _own_rows(scenario, M)
    X, W = _d(x).requires_grad_(), _d(weight).requires_grad_()
    b = torch.zeros(M, N, dtype=torch.float64, requires_grad=True)
    A, Wa = _d(aux), _d(aux_weight)
    if A is not None:
        A.requires_grad_(), Wa.requires_grad_()
    z = mbranch_oracle(X, W, b, s, route="own", aux=A, aux_weight=Wa)
    loss = (z * (_d(dz) * ok[:, None])).sum() + 0.0 * (X.sum() + W.sum() + b.sum())
    if A is not None:
        loss = loss + 0.0 * (A.sum() + Wa.sum())
    wrt = [X, W, b] + ([A, Wa] if A is not None else [])
    grads = list(torch.autograd.grad(loss, wrt)) + [None, None][:5 - len(wrt)]
    need = (need_dx, need_dweight, need_dbias, need_daux, need_daux_weight)
    return tuple(g if (n and g is not None) else torch.empty(0, dtype=torch.float64) for g, n in zip(grads, need))


def mutual_forward(h, scenario, temperature, similarity):
    """``mutual_forward``: (out [B, N], attn [B, M]) of the mutual unit on h [M, B, N]."""
    M = h.shape[0]
    s, ok = _own_rows(scenario, M)
    with torch.no_grad():
        out, attn = mutual_oracle(_d(h), s, temperature=temperature, similarity=SIMILARITY[similarity],
                                  return_attention=True)
    return out * ok[:, None], attn * ok[:, None]


def mutual_backward(grad_out, h, scenario, attn, temperature, similarity):
    """``mutual_backward``: dh_own [B, N], the gradient w.r.t. h[s_b, b] (the others stop-gradient), by autograd;
    the kernel's ``attn`` argument is not used (the oracle recomputes the attention in float64)."""
    M, B = h.shape[0], h.shape[1]
    s, ok = _own_rows(scenario, M)
    H = _d(h).requires_grad_()
    out = mutual_oracle(H, s, temperature=temperature, similarity=SIMILARITY[similarity])
    (dh,) = torch.autograd.grad((out * _d(grad_out)).sum() + 0.0 * H.sum(), [H])
    return dh[s, torch.arange(B)] * ok[:, None]


def _preactivations(x, weight, bias, aux, aux_weight):
    B = x.shape[-2]
    with torch.no_grad():
        return mbranch_oracle(_d(x), _d(weight), _d(bias), torch.zeros(B, dtype=torch.long), route="all",
                              grad_mask="none", aux=_d(aux), aux_weight=_d(aux_weight))


def mutual_linear_forward(x, weight, bias, aux, aux_weight, scenario, activation, temperature, similarity):
    """``mutual_linear_forward``: (out [B, N], attn [B, M]) of the mutual unit over act(every branch's z)."""
    M = weight.shape[0]
    s, ok = _own_rows(scenario, M)
    with torch.no_grad():
        out, attn = mutual_linear_oracle(_d(x), _d(weight), _d(bias), s, activation=ACTIVATION[activation],
                                         temperature=temperature, similarity=SIMILARITY[similarity], aux=_d(aux),
                                         aux_weight=_d(aux_weight), return_attention=True)
    return out * ok[:, None], attn * ok[:, None]


def mutual_linear_backward(grad_out, x, weight, bias, aux, aux_weight, scenario, attn, activation, temperature,
                           similarity):
    """``mutual_linear_backward``: dz_own [B, N], the gradient w.r.t. the own branch's pre-activation z[s_b, b]
    (``attn`` not used, as above)."""
    M, B = weight.shape[0], x.shape[-2]
    s, ok = _own_rows(scenario, M)
    Z = _preactivations(x, weight, bias, aux, aux_weight).requires_grad_()
    out = mutual_oracle(act64(Z, ACTIVATION[activation]), s, temperature=temperature,
                        similarity=SIMILARITY[similarity])
    (dz,) = torch.autograd.grad((out * _d(grad_out)).sum() + 0.0 * Z.sum(), [Z])
    return dz[s, torch.arange(B)] * ok[:, None]
