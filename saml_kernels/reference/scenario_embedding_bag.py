"""Plain-PyTorch scenario-aware embedding bag: the oracle of the tests and the eager baseline.

Two entry points:
- ``scenario_embedding_bag_reference``: the public signature, differentiable through ordinary autograd;
- ``forward_kernel`` / ``backward_rows_kernel``: the backend-kernel contract (same arguments as the C++ op
  ``torch.ops.saml_C.seb_forward`` / ``seb_backward_rows``): the ``reference`` backend's kernel table, ``KERNELS``.
"""
from __future__ import annotations

import torch

from .._codes import POOLING
from ..ops.scenario_hash import scenario_local_by_feature

SUM, MEAN, NONE = POOLING["sum"], POOLING["mean"], POOLING["none"]


def _expand(indices, offsets, scenario, feature_rows, feature_scenario_rows, num_features):
    """Per-index metadata: bag, feature, sample, local id, validity, global row, scenario row (or -1)."""
    device = indices.device
    nnz = indices.numel()
    nbags = offsets.numel() - 1
    batch = nbags // num_features if num_features else 0
    lengths = (offsets[1:] - offsets[:-1]).long()
    bag = torch.repeat_interleave(torch.arange(nbags, device=device), lengths, output_size=nnz)
    feat = bag // max(batch, 1)
    sample = bag % max(batch, 1)
    fr = feature_rows.to(device=device, dtype=torch.long)
    fsr = feature_scenario_rows.to(device=device, dtype=torch.long)
    local = indices.long()
    size = fr[feat + 1] - fr[feat]
    valid = (local >= 0) & (local < size)
    safe = torch.where(valid, local, torch.zeros_like(local))
    grow = fr[feat] + safe
    aware = fsr[feat + 1] > fsr[feat]
    slocal = scenario_local_by_feature(safe, feat, fr, fsr)  # the id, or its hash mod Rs_f (hashed tables)
    srow = torch.where(aware, fsr[feat] + slocal, torch.full_like(safe, -1))
    return bag, feat, sample, lengths, valid, grow, srow, batch


def _pool(vals, bag, lengths, nbags, pooling, dim):
    out = vals.new_zeros(nbags, dim)
    out.index_add_(0, bag, vals)
    if pooling == MEAN:
        out = out / lengths.clamp(min=1).to(out.dtype).unsqueeze(1)
    return out


def scenario_embedding_bag_reference(indices, offsets, scenario, global_weight, scenario_weight, feature_rows,
                                     feature_scenario_rows, *, pooling="sum", per_sample_weights=None,
                                     bounds_check="zero"):
    """Differentiable reference. Invalid ids give zero vectors (validation is the public op's job).

    Returns (global_out [B, F, D], scenario_out [B, Fs, D]); [B, F, L, D] / [B, Fs, L, D] for pooling "none".
    Accumulates in float32 (float64 for float64 tables) and returns the table dtype.
    """
    pmode = {"sum": SUM, "mean": MEAN, "none": NONE}[pooling]
    feature_rows = torch.as_tensor(feature_rows)
    feature_scenario_rows = torch.as_tensor(feature_scenario_rows)
    num_features = feature_rows.numel() - 1
    D = global_weight.shape[1]
    M, Rs = scenario_weight.shape[0], scenario_weight.shape[1]
    acc = torch.float64 if global_weight.dtype == torch.float64 else torch.float32
    bag, feat, sample, lengths, valid, grow, srow, B = _expand(
        indices, offsets, scenario, feature_rows, feature_scenario_rows, num_features)
    nbags = num_features * B
    scale = valid.to(acc)
    if per_sample_weights is not None:
        scale = scale * per_sample_weights.to(acc)
    gvals = global_weight[grow].to(acc) * scale.unsqueeze(1)

    fsr = feature_scenario_rows.tolist()
    aware_feats = [f for f in range(num_features) if fsr[f + 1] > fsr[f]]
    Fs = len(aware_feats)
    slot = torch.full((max(num_features, 1),), -1, dtype=torch.long, device=indices.device)
    if Fs:
        slot[torch.tensor(aware_feats, device=indices.device)] = torch.arange(Fs, device=indices.device)
    is_aware = srow >= 0
    sidx = scenario.long()[sample] * Rs + srow.clamp(min=0)
    sflat = scenario_weight.reshape(M * Rs, D) if M * Rs > 0 else scenario_weight.new_zeros(1, D)
    sidx = torch.where(is_aware, sidx, torch.zeros_like(sidx))
    svals = sflat[sidx].to(acc) * (scale * is_aware.to(acc)).unsqueeze(1)
    sbag = slot[feat.clamp(max=max(num_features - 1, 0))] * B + sample if nbags else bag

    if pmode == NONE:
        L = indices.numel() // nbags if nbags else 0
        g = gvals.reshape(num_features, B, L, D).permute(1, 0, 2, 3)
        sel = torch.tensor(aware_feats, dtype=torch.long, device=indices.device)
        s = svals.reshape(num_features, B, L, D).permute(1, 0, 2, 3).index_select(1, sel)
        return g.to(global_weight.dtype), s.to(scenario_weight.dtype)
    gout = _pool(gvals, bag, lengths, nbags, pmode, D).reshape(num_features, B, D).permute(1, 0, 2)
    keep = is_aware
    sout = svals.new_zeros(Fs * B, D)
    sout.index_add_(0, sbag[keep], svals[keep])
    if pmode == MEAN and Fs:
        slen = lengths.reshape(num_features, B)[torch.tensor(aware_feats, dtype=torch.long, device=lengths.device)]
        sout = sout / slen.reshape(-1).clamp(min=1).to(acc).unsqueeze(1)
    sout = sout.reshape(Fs, B, D).permute(1, 0, 2)
    return gout.to(global_weight.dtype), sout.to(scenario_weight.dtype)


# ---------------------------------------------------------------------------------------------------------
# Backend-kernel contract (the ``reference`` backend of saml_kernels::scenario_embedding_bag)
# ---------------------------------------------------------------------------------------------------------

def forward_kernel(indices, offsets, scenario, global_weight, scenario_weight, feature_rows, feature_scenario_rows,
                   aware_slot, per_sample_weights, pooling, bag_len, check, num_aware=-1):
    """Same contract as ``torch.ops.saml_C.seb_forward``: (global_out, scenario_out, bad_count int64 [1])."""
    mode = {SUM: "sum", MEAN: "mean", NONE: "none"}[pooling]
    with torch.no_grad():
        g, s = scenario_embedding_bag_reference(indices, offsets, scenario, global_weight, scenario_weight,
                                                feature_rows, feature_scenario_rows, pooling=mode,
                                                per_sample_weights=per_sample_weights)
        bad = torch.zeros(1, dtype=torch.long, device=indices.device)
        if check and indices.numel():
            F = feature_rows.numel() - 1
            _, _, _, _, valid, _, _, _ = _expand(indices, offsets, scenario, feature_rows, feature_scenario_rows, F)
            bad = (~valid).sum().reshape(1)
    return g.contiguous(), s.contiguous(), bad


def backward_rows_kernel(grad_global, grad_scenario, indices, offsets, scenario, global_weight, scenario_weight,
                         feature_rows, feature_scenario_rows, aware_slot, per_sample_weights, pooling, bag_len,
                         need_psw_grad):
    """Same contract as ``torch.ops.saml_C.seb_backward_rows``.

    Returns (global_rows [U] sorted unique int64, global_vals [U, D], scenario_rows [Us] (m * Rs + r),
    scenario_vals [Us, D], grad_psw [nnz] or empty). Rows touched only by invalid ids are not listed.
    """
    F = feature_rows.numel() - 1
    D = global_weight.shape[1]
    Rs = scenario_weight.shape[1]
    acc = torch.float64 if global_weight.dtype == torch.float64 else torch.float32
    bag, feat, sample, lengths, valid, grow, srow, B = _expand(
        indices, offsets, scenario, feature_rows, feature_scenario_rows, F)
    slot = aware_slot.to(device=indices.device, dtype=torch.long)
    if pooling == NONE:
        L = bag_len
        pos = torch.arange(indices.numel(), device=indices.device) % max(L, 1)
        gg = grad_global.to(acc)[sample, feat, pos] if indices.numel() else grad_global.new_zeros(0, D).to(acc)
    else:
        gg = grad_global.to(acc)[sample, feat] if indices.numel() else grad_global.new_zeros(0, D).to(acc)
    scale = valid.to(acc)
    if pooling == MEAN:
        scale = scale / lengths[bag].clamp(min=1).to(acc)
    is_aware = (srow >= 0) & valid
    if is_aware.any():
        sl = slot[feat]
        if pooling == NONE:
            sg = grad_scenario.to(acc)[sample, sl.clamp(min=0), pos]
        else:
            sg = grad_scenario.to(acc)[sample, sl.clamp(min=0)]
    else:
        sg = gg.new_zeros(gg.shape)
    psw_grad = torch.empty(0, dtype=global_weight.dtype, device=indices.device)
    if need_psw_grad and per_sample_weights is not None:
        sflat = scenario_weight.reshape(-1, D)
        sidx = (scenario.long()[sample] * Rs + srow.clamp(min=0)) if indices.numel() else srow
        dot = (gg * global_weight[grow].to(acc)).sum(1)
        if is_aware.any():
            dot = dot + torch.where(is_aware, (sg * sflat[sidx.clamp(min=0)].to(acc)).sum(1), torch.zeros_like(dot))
        psw_grad = (dot * valid.to(acc)).to(per_sample_weights.dtype)
    if per_sample_weights is not None:
        scale = scale * per_sample_weights.to(acc)
    gv = gg * scale.unsqueeze(1)
    grows, ginv = torch.unique(grow[valid], sorted=True, return_inverse=True)
    gvals = gv.new_zeros(grows.numel(), D).index_add_(0, ginv, gv[valid])
    sidx = scenario.long()[sample] * Rs + srow if indices.numel() else srow
    srows, sinv = torch.unique(sidx[is_aware], sorted=True, return_inverse=True)
    svals = gv.new_zeros(srows.numel(), D).index_add_(0, sinv, (sg * scale.unsqueeze(1))[is_aware])
    return (grows, gvals.to(global_weight.dtype), srows, svals.to(scenario_weight.dtype), psw_grad)


KERNELS = {"scenario_embedding_bag": {"forward": forward_kernel, "backward_rows": backward_rows_kernel}}
