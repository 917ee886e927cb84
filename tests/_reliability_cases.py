"""Shared input makers and float64 oracles for the reliability suites.

Not a test module (no ``test_`` prefix). Used by test_properties, test_determinism, test_threads and
test_bad_input_subprocess. The oracles here are written independently of ``saml_kernels.reference`` (plain
float64 index_add / einsum), so the ``reference`` backend is checked too, not compared with itself.

Every op is described by ``make_case(op, seed)``: a dict with ``call(backend)`` (runs the public op on fresh
leaf copies of the inputs and returns forward outputs + input gradients for a fixed random upstream gradient)
so that determinism and thread tests treat all ops alike.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as Fn

ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "silu")


def op_available(op: str) -> bool:
    """True when ``saml_kernels.<op>`` exists (colleagues land ops one by one)."""
    try:
        mod = importlib.import_module("saml_kernels")
    except Exception:
        return False
    return hasattr(mod, op)


def op_fn(op: str):
    return getattr(importlib.import_module("saml_kernels"), op)


# ------------------------------------------------------------------------------------------ embedding bag

def seb_inputs(gen: torch.Generator, *, B, rows, aware, D, M, bag_max, pooling="sum", idx_dtype=torch.int64,
               dtype=torch.float32, psw=False, all_empty=False, device="cpu"):
    """Random inputs of scenario_embedding_bag.

    rows[f] = global rows of feature f (>= 1); aware[f] = feature f has per-scenario tables. Bags are
    feature-major; pooling "none" uses the fixed length bag_max (0 when all_empty).
    """
    F = len(rows)
    fr = [0]
    fsr = [0]
    for f in range(F):
        fr.append(fr[-1] + rows[f])
        fsr.append(fsr[-1] + (rows[f] if aware[f] else 0))
    R, Rs = fr[-1], fsr[-1]
    gw = torch.randn(R, D, generator=gen).to(dtype)
    sw = torch.randn(M, Rs, D, generator=gen).to(dtype)
    if pooling == "none":
        L = 0 if all_empty else bag_max
        lengths = torch.full((F * B,), L, dtype=torch.int64)
    elif all_empty:
        lengths = torch.zeros(F * B, dtype=torch.int64)
    else:
        lengths = torch.randint(0, bag_max + 1, (F * B,), generator=gen)
    ids = []
    for f in range(F):
        n = int(lengths[f * B:(f + 1) * B].sum())
        ids.append(torch.randint(0, rows[f], (n,), generator=gen))
    indices = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    scenario = torch.randint(0, M, (B,), generator=gen)
    out = dict(indices=indices.to(idx_dtype).to(device), offsets=offsets.to(idx_dtype).to(device),
               scenario=scenario.to(idx_dtype).to(device), global_weight=gw.to(device),
               scenario_weight=sw.to(device), feature_rows=fr, feature_scenario_rows=fsr)
    out["per_sample_weights"] = (torch.randn(indices.numel(), generator=gen).to(dtype).to(device) if psw else None)
    return out


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


def seb_call(inp, backend, pooling="sum", **kw):
    from saml_kernels import scenario_embedding_bag

    return scenario_embedding_bag(inp["indices"], inp["offsets"], inp["scenario"], inp["global_weight"],
                                  inp["scenario_weight"], inp["feature_rows"], inp["feature_scenario_rows"],
                                  pooling=pooling, per_sample_weights=inp["per_sample_weights"], backend=backend,
                                  **kw)


# ------------------------------------------------------------------------------------ branch GEMM / mutual

def act64(y, activation):
    if activation is None:
        return y
    return {"relu": Fn.relu, "leaky_relu": Fn.leaky_relu, "gelu": Fn.gelu, "silu": Fn.silu}[activation](y)


def mbranch_oracle(x, weight, bias, scenario, *, route="own", activation=None, grad_mask="own", aux=None,
                   aux_weight=None):
    """float64 oracle of mbranch_linear with the design's (docs/design.md) gradient masking semantics (autograd-able)."""
    sc = scenario.long()
    M = weight.shape[0]
    B = x.shape[-2]
    mask = (torch.arange(M)[:, None] == sc[None, :])  # [M, B]: branch m is sample b's own

    def pre(W, Wa, bb, xx, aa):
        y = torch.einsum("bk,mkn->mbn", xx, W) if xx.dim() == 2 else torch.einsum("mbk,mkn->mbn", xx, W)
        if aa is not None:
            y = y + torch.einsum("bk,mkn->mbn", aa, Wa)
        if bb is not None:
            y = y + bb[:, None, :]
        return act64(y, activation)

    full = pre(weight, aux_weight, bias, x, aux)
    if route == "own":
        return full[sc, torch.arange(B)]
    if grad_mask == "none":
        return full
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    if grad_mask == "own":
        other = pre(det(weight), det(aux_weight), det(bias), det(x), det(aux))
    else:  # "params": W_m only from scenario-m samples, x from every branch
        other = pre(det(weight), det(aux_weight), det(bias), x, aux)
    return torch.where(mask[:, :, None], full, other)


def mutual_oracle(h, scenario, *, temperature=1.0, similarity="cosine"):
    """float64 oracle of mutual_unit: other branches are stop-gradient for each sample."""
    M, B, N = h.shape
    sc = scenario.long()
    mask = (torch.arange(M)[:, None] == sc[None, :])[:, :, None]
    hh = torch.where(mask, h, h.detach())
    own = hh[sc, torch.arange(B)]
    if similarity == "cosine":
        sim = Fn.cosine_similarity(own[None].expand_as(hh), hh, dim=-1)  # [M, B]
    else:
        sim = (own[None] * hh).sum(-1) / N ** 0.5
    a = torch.softmax(sim / temperature, dim=0)
    return (a[:, :, None] * hh).sum(0)


# -------------------------------------------------------------------------------------------- op cases

def _leafs(d, names):
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor) and k in names:
            out[k] = v.detach().clone().requires_grad_(True)
        elif isinstance(v, torch.Tensor):
            out[k] = v.clone()
        else:
            out[k] = v
    return out


def make_case(op: str, seed: int = 0, *, size: str = "small", dtype=torch.float32):
    """A fixed random problem for ``op``: {'call': fn(backend) -> list of tensors (outputs then grads)}.

    Each call builds fresh leaf tensors, runs forward and backward with a fixed upstream gradient, and
    returns everything as a flat list (for bitwise comparisons across runs / threads / thread counts).
    """
    g = torch.Generator().manual_seed(seed)
    big = size != "small"
    if op == "scenario_embedding_bag":
        B = {"small": 9, "medium": 64, "large": 512}[size]
        inp = seb_inputs(g, B=B, rows=[50, 7, 300] if big else [5, 3, 11], aware=[True, False, True],
                         D=33 if big else 5, M=3, bag_max=6, psw=True, dtype=dtype)
        grads = ("global_weight", "scenario_weight", "per_sample_weights")

        def call(backend, pooling="sum"):
            leaf = _leafs(inp, grads)
            names = grads
            if pooling != "sum":  # per-sample weights need sum pooling
                leaf["per_sample_weights"], names = None, grads[:2]
            go, so = seb_call(leaf, backend, pooling=pooling)
            ug = torch.randn(go.shape, generator=torch.Generator().manual_seed(seed + 1)).to(go.dtype)
            us = torch.randn(so.shape, generator=torch.Generator().manual_seed(seed + 2)).to(so.dtype)
            torch.autograd.backward([go, so], [ug, us])
            return [go.detach(), so.detach()] + [leaf[k].grad for k in names]
        return dict(call=call, inputs=inp)

    if op == "partitioned_norm":
        return _partitioned_norm_case(g, seed, size, dtype)

    M, B, K, N, Ka = {"small": (3, 11, 7, 5, 3), "medium": (4, 96, 40, 24, 12), "large": (4, 512, 64, 48, 16)}[size]
    sc = torch.randint(0, M, (B,), generator=g)
    base = dict(x=torch.randn(B, K, generator=g).to(dtype), weight=(torch.randn(M, K, N, generator=g) / K ** 0.5).to(dtype),
                bias=torch.randn(M, N, generator=g).to(dtype), aux=torch.randn(B, Ka, generator=g).to(dtype),
                aux_weight=(torch.randn(M, Ka, N, generator=g) / Ka ** 0.5).to(dtype), scenario=sc)
    if op == "mutual_unit":
        base = dict(h=torch.randn(M, B, N, generator=g).to(dtype), scenario=sc)
        grads = ("h",)
    else:
        grads = ("x", "weight", "bias", "aux", "aux_weight")
    fn = op_fn(op)

    def call(backend, **kw):
        leaf = _leafs(base, grads)
        if op == "mutual_unit":
            out = fn(leaf["h"], leaf["scenario"], backend=backend, **kw)
        elif op == "mbranch_linear":
            kw = {"route": "all", "grad_mask": "own", "activation": "relu", **kw}
            out = fn(leaf["x"], leaf["weight"], leaf["bias"], leaf["scenario"], aux=leaf["aux"],
                     aux_weight=leaf["aux_weight"], backend=backend, **kw)
        else:  # mutual_linear
            kw = {"activation": "relu", "temperature": 0.7, "similarity": "cosine", **kw}
            out = fn(leaf["x"], leaf["weight"], leaf["bias"], leaf["scenario"], aux=leaf["aux"],
                     aux_weight=leaf["aux_weight"], backend=backend, **kw)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.dtype)
        out.backward(up)
        return [out.detach()] + [leaf[k].grad for k in grads]
    return dict(call=call, inputs=base)


def _partitioned_norm_case(g: torch.Generator, seed: int, size: str, dtype):
    """partitioned_norm on B rows (odd) of M scenarios in random order: scenario M - 1 has no row, M - 2 exactly
    one, the others the rest. Each call runs three scenarios on fresh leaves and returns all their tensors: training
    with running statistics (y, the 5 input gradients, the updated running mean / var), eval on the running
    statistics (y, 5 gradients), and an empty batch (y, 5 gradients). "large" has B > 2 x 256 rows, so the CPU
    kernel's segmented sums span several blocks and parallel_for splits them over threads."""
    M, B, N = {"small": (4, 13, 5), "medium": (4, 301, 24), "large": (5, 1031, 37)}[size]
    sc = torch.randint(0, M - 2, (B,), generator=g)
    sc[int(torch.randint(0, B, (1,), generator=g))] = M - 2
    base = dict(x=(torch.randn(B, N, generator=g) * 3 + 1).to(dtype), weight=torch.randn(N, generator=g).to(dtype),
                bias=torch.randn(N, generator=g).to(dtype), scenario_weight=torch.randn(M, N, generator=g).to(dtype),
                scenario_bias=torch.randn(M, N, generator=g).to(dtype),
                scenario=sc.to(torch.int32 if size == "medium" else torch.int64),
                running_mean=torch.randn(M, N, generator=g), running_var=torch.rand(M, N, generator=g) + 0.5)
    grads = ("x", "weight", "bias", "scenario_weight", "scenario_bias")
    fn = op_fn("partitioned_norm")

    def run(backend, training, rows):
        leaf = _leafs(base, grads)
        x = leaf["x"][:rows]
        y = fn(x, leaf["scenario"][:rows], leaf["weight"], leaf["bias"], leaf["scenario_weight"],
               leaf["scenario_bias"], running_mean=leaf["running_mean"], running_var=leaf["running_var"],
               training=training, backend=backend)
        up = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y.dtype)
        y.backward(up)
        out = [y.detach()] + [leaf[k].grad for k in grads]
        return out + [leaf["running_mean"], leaf["running_var"]] if training else out

    def call(backend):
        return run(backend, True, B) + run(backend, False, B) + run(backend, True, 0)
    return dict(call=call, inputs=base)


ALL_OPS = ("scenario_embedding_bag", "mbranch_linear", "mutual_unit", "mutual_linear", "partitioned_norm")


def landed_ops():
    return [op for op in ALL_OPS if op_available(op)]


# ------------------------------------------------------------------------------------------------ model

def model_available() -> bool:
    try:
        _, cfg = small_saml(n=8)
        make_saml(cfg)
        return True
    except Exception:
        return False


def small_saml(seed: int = 0, n: int = 1024, *, num_scenarios: int = 3, dim: int = 8, hidden=(32, 16)):
    """(data, config) of a small SAML problem on the synthetic generator (tables of a few hundred rows)."""
    from saml_kernels.data import make_synthetic
    from saml_kernels.nn import SAMLConfig

    data = make_synthetic(n, num_scenarios=num_scenarios, num_users=300, num_items=400, num_categories=12,
                          num_contexts=8, num_segments=8, num_tags=30, seq_len=6, seed=seed)
    cfg = SAMLConfig(features=data.features, num_scenarios=num_scenarios, embedding_dim=dim, sequence=data.sequence,
                     target_feature="item", num_dense=data.num_dense, attention_dim=dim, aux_hidden=hidden,
                     branch_hidden=hidden, mutual_layers=(0,), dropout=0.0)
    return data, cfg


def make_saml(cfg, seed: int = 0, backend=None, reference: bool = False):
    from saml_kernels.nn import SAML

    torch.manual_seed(seed)
    if reference:
        from saml_kernels.reference import SAMLReference

        return SAMLReference(cfg)
    return SAML(cfg, backend=backend)
