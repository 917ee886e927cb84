"""The float64 oracles the tests judge every backend by (the ``reference`` backend included).

Written apart from the package: this module imports torch only, nothing from ``saml_kernels`` (test_layering.py
checks it), so a bug in ``saml_kernels/reference/`` (the eager backend and the plain-PyTorch twins) or in a
helper it shares with the kernels cannot hide behind an oracle built from the same code. Each oracle is the
op's math written the plain way (index_add / einsum / masks), in float64, differentiable by autograd; the
constants of the op contracts (leaky_relu slope, cosine eps) are restated here on purpose.

- ``seb_loop_oracle``: scenario_embedding_bag as one Python loop over bags and ids (invalid ids read zero; hashed
  scenario rows through ``scenario_local``, on Python ints).
- ``seb_oracle``: scenario_embedding_bag, pooled outputs (g [B, F, D], s [B, F_aware, D]) or, for pooling
  "none", the per-position rows.
- ``mbranch_oracle``: mbranch_linear, with the design's gradient masks (docs/design.md).
- ``mutual_oracle``: mutual_unit, other branches stop-gradient per sample; optionally the attention [B, M].
- ``mutual_linear_oracle``: mutual_linear = mutual_unit(mbranch_linear(route="all", grad_mask="own")).
- ``partitioned_norm_oracle``: partitioned_norm, per-scenario batch statistics by index_add, running
  statistics updated in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

LEAKY_RELU_SLOPE = 0.01  # the op contract (saml_kernels/_codes.py LEAKY_RELU_SLOPE; test_codes.py ties them)
COSINE_EPS = 1e-8        # each norm of the cosine similarity is max(|v|, eps)


# ------------------------------------------------------------------------------------------ embedding bag

_M32 = 0xFFFFFFFF


def _fmix32(x: int) -> int:
    """murmur3's fmix32 on a uint32 Python int."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def id_hash(i: int) -> int:
    """The id hash of hashed scenario tables on a Python int id >= 0: fmix(fmix(lo32(id)) ^ hi32(id))."""
    return _fmix32(_fmix32(i & _M32) ^ ((i >> 32) & _M32))


def scenario_local(i: int, rows: int, scenario_rows: int) -> int:
    """A hashed scenario table's local row of a valid id (docs/design.md, "Hashed scenario tables"; restated here
    on plain Python ints): id if Rs_f == Rg_f, else id_hash(id) mod Rs_f."""
    return i if scenario_rows == rows else id_hash(i) % scenario_rows


def _stack(vecs, shape, like):
    return torch.stack(vecs) if vecs else like.new_zeros(shape)


def seb_loop_oracle(indices, offsets, scenario, G, S, fr, fsr, pooling="sum", psw=None):
    """Float64 loop oracle. Invalid ids (outside their feature's rows) contribute nothing ("zero" semantics).

    global_out[b, f] = pool_i w_i G[fr[f] + id_i];  scenario_out[b, j] = pool_i w_i S[scenario[b], fsr[f_j] + id_i].
    A hashed feature (Rs_f = fsr[f+1] - fsr[f] < Rg_f) reads scenario row fsr[f] + scenario_local(id, Rg_f, Rs_f).
    Differentiable w.r.t. G, S, psw (autograd through the loop)."""
    G64, S64 = G.double(), S.double()
    w64 = psw.double() if psw is not None else None
    idx, off, sc = indices.tolist(), offsets.tolist(), scenario.tolist()
    fr, fsr = [int(v) for v in fr], [int(v) for v in fsr]
    F = len(fr) - 1
    B = (len(off) - 1) // F
    D = G.shape[1]
    aware = [f for f in range(F) if fsr[f + 1] > fsr[f]]
    zero = G64.new_zeros(D)
    L = (len(idx) // (F * B)) if (pooling == "none" and F * B) else 0
    gout, sout = [], []
    for b in range(B):
        grow, srow = [], []
        for f in range(F):
            gv, sv = [], []
            lo, hi = off[f * B + b], off[f * B + b + 1]
            for i in range(lo, hi):
                r = idx[i]
                ok = 0 <= r < fr[f + 1] - fr[f]
                w = w64[i] if w64 is not None else 1.0
                gv.append(G64[fr[f] + r] * w if ok else zero)
                if f in aware:
                    sv.append(S64[sc[b], fsr[f] + scenario_local(r, fr[f + 1] - fr[f], fsr[f + 1] - fsr[f])] * w
                              if ok else zero)
            if pooling == "none":
                grow.append(_stack(gv, (L, D), G64))
                if f in aware:
                    srow.append(_stack(sv, (L, D), G64))
                continue
            g = torch.stack(gv).sum(0) if gv else zero
            s = torch.stack(sv).sum(0) if sv else zero
            if pooling == "mean" and gv:
                g, s = g / len(gv), s / len(gv)
            grow.append(g)
            if f in aware:
                srow.append(s)
        inner = (L, D) if pooling == "none" else (D,)
        gout.append(_stack(grow, (0, *inner), G64))
        sout.append(_stack(srow, (0, *inner), G64))
    inner = (L, D) if pooling == "none" else (D,)
    return _stack(gout, (0, F, *inner), G64), _stack(sout, (0, len(aware), *inner), G64)



def seb_oracle(inp, pooling="sum"):
    """float64 oracle, differentiable w.r.t. the (float64) tables and per-sample weights it is given."""
    idx = inp["indices"].long().cpu()
    off = inp["offsets"].long().cpu()
    sc = inp["scenario"].long().cpu()
    G, S = inp["global_weight"], inp["scenario_weight"]
    psw = inp["per_sample_weights"]
    fr, fsr = inp["feature_rows"], inp["feature_scenario_rows"]
    F = len(fr) - 1
    B = (off.numel() - 1) // F
    D = G.shape[1]
    M, Rs = S.shape[0], S.shape[1]
    lengths = off[1:] - off[:-1]
    bag = torch.repeat_interleave(torch.arange(F * B), lengths)
    feat, sample = bag // max(B, 1), bag % max(B, 1)
    frt, fsrt = torch.tensor(fr), torch.tensor(fsr)
    grow = frt[feat] + idx
    w = psw.double() if psw is not None else torch.ones(idx.numel(), dtype=torch.float64)
    gv = G[grow] * w[:, None]
    aware_f = [f for f in range(F) if fsr[f + 1] > fsr[f]]
    slot = torch.full((F,), -1, dtype=torch.long)
    slot[aware_f] = torch.arange(len(aware_f))
    is_aware = slot[feat] >= 0
    sflat = S.reshape(M * Rs, D)
    srow = sc[sample] * Rs + (fsrt[feat] + idx)
    if pooling == "none":
        L = idx.numel() // (F * B) if F * B else 0
        g = gv.reshape(F, B, L, D).permute(1, 0, 2, 3)
        keep = torch.nonzero(is_aware).flatten()
        sv = torch.zeros(idx.numel(), D, dtype=torch.float64)
        if keep.numel():
            sv = sv.index_put((keep,), sflat[srow[keep]] * w[keep, None])
        s = sv.reshape(F, B, L, D).permute(1, 0, 2, 3)[:, aware_f]
        return g, s
    g = torch.zeros(F * B, D, dtype=torch.float64).index_add(0, bag, gv)
    keep = torch.nonzero(is_aware).flatten()
    s = torch.zeros(len(aware_f) * B, D, dtype=torch.float64)
    if keep.numel():
        s = s.index_add(0, slot[feat[keep]] * B + sample[keep], sflat[srow[keep]] * w[keep, None])
    if pooling == "mean":
        n = lengths.clamp(min=1).double()
        g = g / n[:, None]
        if aware_f:
            s = s / n.reshape(F, B)[aware_f].reshape(-1, 1)
    return g.reshape(F, B, D).permute(1, 0, 2), s.reshape(len(aware_f), B, D).permute(1, 0, 2)


# ------------------------------------------------------------------------------------ branch GEMM / mutual

def act64(y, activation):
    """act(y) for an activation name (None/"none", relu, leaky_relu(0.01), exact-erf gelu, silu)."""
    if activation is None or activation == "none":
        return y
    return {"relu": Fn.relu, "leaky_relu": lambda t: Fn.leaky_relu(t, LEAKY_RELU_SLOPE), "gelu": Fn.gelu,
            "silu": Fn.silu}[activation](y)


def mbranch_oracle(x, weight, bias, scenario, *, route="own", activation=None, grad_mask="own", aux=None,
                   aux_weight=None):
    """float64 oracle of mbranch_linear with the design's (docs/design.md) gradient masking semantics.

    x [B, K] (shared) or [M, B, K]; weight [M, K, N]; bias [M, N] | None; aux [B, Ka] | None; aux_weight
    [M, Ka, N] | None; scenario [B]. route "own" -> [B, N]; route "all" -> [M, B, N], whose off-own entries
    (m != s_b) carry no gradient (grad_mask "own"), gradient to x/aux only ("params"), or every gradient ("none").
    """
    sc = scenario.long().cpu()
    M = weight.shape[0]
    B = x.shape[-2]
    mask = (torch.arange(M)[:, None] == sc[None, :]).to(x.device)  # [M, B]: branch m is sample b's own

    def pre(W, Wa, bb, xx, aa):
        y = torch.einsum("bk,mkn->mbn", xx, W) if xx.dim() == 2 else torch.einsum("mbk,mkn->mbn", xx, W)
        if aa is not None:
            y = y + torch.einsum("bk,mkn->mbn", aa, Wa)
        if bb is not None:
            y = y + bb[:, None, :]
        return act64(y, activation)

    full = pre(weight, aux_weight, bias, x, aux)
    if route == "own":
        return full[sc.to(x.device), torch.arange(B, device=x.device)]
    if grad_mask == "none":
        return full
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    if grad_mask == "own":
        other = pre(det(weight), det(aux_weight), det(bias), det(x), det(aux))
    elif grad_mask == "params":  # W_m only from scenario-m samples, x from every branch
        other = pre(det(weight), det(aux_weight), det(bias), x, aux)
    else:
        raise ValueError(f"unknown grad_mask {grad_mask!r}")
    return torch.where(mask[:, :, None], full, other)


def mutual_oracle(h, scenario, *, temperature=1.0, similarity="cosine", return_attention=False):
    """float64 oracle of mutual_unit on h [M, B, N]: out[b] = sum_m a[m, b] h[m, b] with
    a[:, b] = softmax_m(sim(h[s_b, b], h[m, b]) / T); sim = cosine (norms max(|v|, 1e-8)) or dot / sqrt(N).
    Other branches are stop-gradient for each sample. Returns out [B, N] (and attn [B, M])."""
    M, B, N = h.shape
    sc = scenario.long().to(h.device)
    mask = (torch.arange(M, device=h.device)[:, None] == sc[None, :])[:, :, None]
    hh = torch.where(mask, h, h.detach())
    own = hh[sc, torch.arange(B, device=h.device)]                     # [B, N]
    dot = (own[None] * hh).sum(-1)                                     # [M, B]
    if similarity == "cosine":
        sim = dot / (own.norm(dim=-1).clamp_min(COSINE_EPS)[None] * hh.norm(dim=-1).clamp_min(COSINE_EPS))
    else:
        sim = dot / N ** 0.5
    a = torch.softmax(sim / temperature, dim=0)
    out = (a[:, :, None] * hh).sum(0)
    return (out, a.t()) if return_attention else out


def mutual_linear_oracle(x, weight, bias, scenario, *, activation=None, temperature=1.0, similarity="cosine",
                         aux=None, aux_weight=None, return_attention=False):
    """float64 oracle of mutual_linear: the mutual unit over every branch's output (route "all", grad_mask
    "own"): [B, N] (and attn [B, M])."""
    h = mbranch_oracle(x, weight, bias, scenario, route="all", activation=activation, grad_mask="own", aux=aux,
                       aux_weight=aux_weight)
    return mutual_oracle(h, scenario, temperature=temperature, similarity=similarity,
                         return_attention=return_attention)


# ------------------------------------------------------------------------------------------ partitioned norm

def partitioned_norm_oracle(x, scenario, weight, bias, scenario_weight, scenario_bias, *, running_mean=None,
                            running_var=None, training=True, momentum=0.1, eps=1e-5):
    """float64 oracle of partitioned_norm: y[b] = (x[b] - mean_s) / sqrt(var_s + eps) * (weight * scenario_weight[s])
    + (bias + scenario_bias[s]) with s = scenario[b]; mean_s, var_s (biased) over the rows of scenario s in
    training or without running statistics, else the running ones. In training, running_mean/var [M, N] are
    updated in place, r += momentum (batch - r), for scenarios with >= 1 row (mean) / >= 2 rows (unbiased var).
    x [B, N]; returns y [B, N] float64."""
    M = scenario_weight.shape[0]
    s = scenario.long().to(x.device)
    xd = x.double()
    n = torch.zeros(M, dtype=torch.float64, device=x.device).index_add(0, s, torch.ones_like(xd[:, 0]))
    if training or running_mean is None:
        mean = torch.zeros(M, x.shape[1], dtype=torch.float64, device=x.device).index_add(0, s, xd)
        mean = mean / n.clamp_min(1)[:, None]
        dev = xd - mean[s]
        var = torch.zeros_like(mean).index_add(0, s, dev * dev) / n.clamp_min(1)[:, None]
        if training and running_mean is not None:
            with torch.no_grad():
                unbiased = var * (n / (n - 1).clamp_min(1))[:, None]
                rm = torch.where((n >= 1)[:, None], running_mean.double() * (1 - momentum) + momentum * mean,
                                 running_mean.double())
                rv = torch.where((n >= 2)[:, None], running_var.double() * (1 - momentum) + momentum * unbiased,
                                 running_var.double())
                running_mean.copy_(rm.to(running_mean.dtype))
                running_var.copy_(rv.to(running_var.dtype))
    else:
        mean, var = running_mean.double(), running_var.double()
    scale = weight.double()[None] * scenario_weight.double()
    shift = bias.double()[None] + scenario_bias.double()
    return (xd - mean[s]) / torch.sqrt(var[s] + eps) * scale[s] + shift[s]
