"""Adapters from the raw backend-kernel signatures (csrc/registry.cpp; the ``*_kernel`` functions) to float64
oracles, for the tests of the kernels themselves.

Like tests/oracles.py this imports torch only, nothing from ``saml_kernels`` (test_layering.py checks it): the
kernel tests judge the C++/CUDA/Triton kernels by the op's math written here, not by the reference backend's
kernel functions. Everything is computed in float64 on the CPU.

- ``scenario_local``: a hashed scenario table's id -> local row, on plain Python ints (docs/design.md, "Hashed
  scenario tables"; restated here on purpose).
- ``seb_forward``: (global_out, scenario_out, bad_count) of ``seb_forward``.
- ``seb_backward_rows``: (global_rows, global_vals, scenario_rows, scenario_vals, grad_psw) of ``seb_backward_rows``.
"""
from __future__ import annotations

import torch

SUM, MEAN, NONE = 0, 1, 2  # the kernel pooling codes
_M32 = 0xFFFFFFFF


def _fmix32(x: int) -> int:
    """murmur3's fmix32 on a uint32 Python int."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def scenario_local(i: int, rows: int, scenario_rows: int) -> int:
    """local(id) = id if Rs_f == Rg_f, else fmix(fmix(lo32(id)) ^ hi32(id)) mod Rs_f (id a valid, >= 0 int)."""
    if scenario_rows == rows:
        return i
    return _fmix32(_fmix32(i & _M32) ^ ((i >> 32) & _M32)) % scenario_rows


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
        # the op takes per-sample weights with sum pooling only; for mean the kernels give the sum pooling's
        # d psw (the dot of the bag's gradient with the row, not divided by the bag length): restated here
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
