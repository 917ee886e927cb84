"""Measurements of one SAML training step for bench_scaling.py (imported by it; not a benchmark of its own).

- set-up of one point of the M / B / R sweeps: ``build_point`` (ours, the eager twin, the compiled twin, each with
  its optimizer and the step body after ``zero_grad``), ``state_bytes`` (what lives between steps) and
  ``step_peak_extra`` (peak extra bytes of one step);
- the phase split of our step: ``phase_times`` (forward groups by hooks, backward groups by the profiler,
  attributed by ``backward_split``);
- the mutual layer's work: ``mutual_gflop`` and the CPU kernel's block GEMM timed alone (``block_gemm_probe``,
  blocks from ``mutual_blocking``, a mirror of csrc/cpu/mutual_unit.cpp);
- ``slope``: the least-squares slope of log(y) against log(x), for every curve of the results file.
"""
from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch
from harness import peak_memory, time_alternating

from saml_kernels.data import make_synthetic
from saml_kernels.nn import SAML, SAMLConfig, TrainingOptimizer
from saml_kernels.reference import SAMLReference
from saml_kernels.training import saml_loss

LR, EMB_LR = 1e-3, 0.05


# ------------------------------------------------------------------------------------------------ set-up

def build_point(M: int, B: int, R: int, device: str, compile_ref: bool):
    """Models, optimizers and the batch of one point; returns (cfg, batch, {name: (model, opt, body)})."""
    data = make_synthetic(B, num_scenarios=M, scenario_mix=[1.0] * M, num_users=R, num_items=R, seed=0)
    cfg = SAMLConfig.from_data(data)
    b = data.batch(np.arange(B)).to(device)
    torch.manual_seed(0)
    ours = SAML(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=EMB_LR, device=device)
    models = {"SAML": ours}
    for name in ["reference eager"] + (["reference compiled"] if compile_ref else []):
        models[name] = SAMLReference(cfg, embedding_optimizer="rowwise_adagrad", device=device)
        models[name].load_state_dict(ours.state_dict())
    providers = {}
    for name, model in models.items():
        opt = TrainingOptimizer(model, LR, EMB_LR)
        fwd = model.loss
        if name == "reference compiled":
            torch._dynamo.reset()  # a fresh compile per point (never the recompile limit's silent eager fallback)
            cf = torch.compile(lambda *inp, m=model: saml_loss(*m(*inp[:-1]), inp[-1], cfg.aux_loss_weight))
            fwd = lambda bb, cf=cf: cf(*bb.inputs(), bb.label)  # noqa: E731

        def body(opt=opt, fwd=fwd):  # the step after zero_grad
            fwd(b).backward()
            opt.step()

        providers[name] = (model, opt, body)
    return cfg, b, providers


def state_bytes(model, opt) -> int:
    """Weights + buffers (row-wise Adagrad states) + Adam states: what lives between steps besides gradients."""
    ts = list(model.parameters()) + list(model.buffers())
    ts += [v for st in opt.dense.state.values() for v in st.values() if torch.is_tensor(v)]
    ts += [st for _, st in opt.tables if all(st is not b for b in model.buffers())]
    return sum(t.numel() * t.element_size() for t in ts)


def step_peak_extra(opt, body, device: str) -> int:
    """Peak bytes allocated on top of what was live when the step started (after zero_grad)."""
    opt.zero_grad()
    if device == "cuda":
        return peak_memory(body, "cuda")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        body()
    live = peak = 0
    # raw allocation (+) / free (-) events in time order (the frees of blocks allocated before are not recorded)
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ------------------------------------------------------------------------------------------------ phases

def phase_groups(model) -> dict:
    groups = {"embedding": [model.embedding], "aux": list(model.aux_layers) + [model.aux_head],
              "branches": [model.branch_head], "mutual": []}
    if hasattr(model, "sequence_embedding"):
        groups["embedding"].append(model.sequence_embedding)
        groups["attention"] = [model.attention]
    for kind, layer in zip(model.config.layer_kinds(), model.branch_layers):
        groups["mutual" if kind == "mutual" else "branches"].append(layer)
    return groups


def phase_times(model, opt, batch, device: str, reps: int) -> tuple:
    """({phase: median ms} of our step (see the module docstring), {op: median self ms per step} from the profiler
    (CPU only)); forward groups by hooks, backward groups by the profiler on the CPU."""
    from torch.profiler import ProfilerActivity, profile, record_function
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    acc, open_, ops = {}, {}, []
    handles = []

    def pre(mod, args, name):
        sync()
        rf = record_function("phase::" + name)
        rf.__enter__()
        open_[id(mod)] = (time.perf_counter(), rf)

    def post(mod, args, out, name):
        sync()
        t0, rf = open_.pop(id(mod))
        rf.__exit__(None, None, None)
        acc[name] = acc.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    for name, mods in phase_groups(model).items():
        for mod in mods:
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: pre(m, a, n)))
            handles.append(mod.register_forward_hook(lambda m, a, o, n=name: post(m, a, o, n)))
    runs = []
    try:
        for _ in range(reps):
            acc.clear()
            opt.zero_grad()
            sync()
            prof = profile(activities=[ProfilerActivity.CPU]) if device == "cpu" else None
            if prof:
                prof.__enter__()
            t0 = time.perf_counter()
            loss = model.loss(batch)
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            opt.step()
            sync()
            t3 = time.perf_counter()
            if prof:
                prof.__exit__(None, None, None)
            ms = {f"fwd {k}": v for k, v in acc.items()}
            ms["fwd other"] = (t1 - t0) * 1e3 - sum(acc.values())
            bwd = (t2 - t1) * 1e3
            if prof:
                ops.append({e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()})
                split = backward_split(prof)
                ms.update({f"bwd {k}": v for k, v in split.items()})
                ms["bwd other"] = bwd - sum(split.values())
            else:
                ms["bwd all"] = bwd
            ms["optimizer"] = (t3 - t2) * 1e3
            runs.append(ms)
    finally:
        for h in handles:
            h.remove()
    med = lambda rs: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in rs[0]} if rs else {}  # noqa: E731
    return med(runs), med(ops)


def backward_split(prof) -> dict:
    """Profiled ms of the backward nodes per phase group: a node belongs to the group whose forward range holds
    the last forward op that got the node's sequence number (the op that created the node)."""
    evs = prof.events()
    ranges = [(e.time_range.start, e.time_range.end, e.name[7:]) for e in evs if e.name.startswith("phase::")]
    bwd = [e for e in evs if e.name.startswith("autograd::engine::evaluate_function")]
    t_bwd = min((e.time_range.start for e in bwd), default=math.inf)
    creator = {}
    for e in evs:
        if e.sequence_nr >= 0 and e.time_range.start < t_bwd and not e.name.startswith("autograd::"):
            if e.sequence_nr not in creator or e.time_range.start >= creator[e.sequence_nr]:
                creator[e.sequence_nr] = e.time_range.start
    out = {}
    for e in bwd:
        t = creator.get(e.sequence_nr)
        group = next((n for s, f, n in ranges if t is not None and s <= t <= f), None)
        if group:
            out[group] = out.get(group, 0.0) + e.cpu_time_total / 1e3
    return out


def mutual_dims(cfg) -> tuple:
    """(K, Ka, N) of the (first) mutual layer."""
    layer = cfg.layer_kinds().index("mutual")
    K = cfg.scenario_dim if layer == 0 else cfg.branch_hidden[layer - 1]
    Ka = cfg.global_dim if layer == 0 else cfg.aux_hidden[layer - 1]
    return K, Ka, cfg.branch_hidden[layer]


def mutual_gflop(cfg, B: int) -> float:
    """GEMM GFLOP of the mutual layer per step: forward all-branch GEMM 2BM(K+Ka)N, its recompute in the
    backward (same), and the own-branch gradients dW/dWa and dx/daux (2 x 2B(K+Ka)N)."""
    K, Ka, N = mutual_dims(cfg)
    return (4 * B * cfg.num_scenarios + 4 * B) * (K + Ka) * N / 1e9


def mutual_blocking(B: int, M: int, Kt: int, N: int, elem: int = 4) -> tuple:
    """(rows per block, [branches per column tile]) of the CPU mutual_linear kernel: a mirror of ``blocking()`` in
    csrc/cpu/mutual_unit.cpp (see its "why this shape" header): R = B / 4 rounded up to a multiple of 16, clamped
    to [16, 128]; tiles of t whole branches with (Kt + R) t N elem <= 1 MiB, near-equal."""
    rows = min(max(-(-(-(-B // 4)) // 16) * 16, 16), 128)
    t = min(max((1 << 20) // max((Kt + rows) * N * elem, 1), 1), max(M, 1))
    tiles = -(-M // t)
    edges = [M * i // tiles for i in range(tiles + 1)]
    return rows, [b - a for a, b in zip(edges, edges[1:])]


def block_gemm_probe(cfg, B: int, reps: int = 30) -> dict:
    """The CPU mutual_linear kernel's block GEMM alone (csrc/cpu/mutual_unit.cpp: block_gemm on one block of
    ``mutual_blocking`` rows, tile by tile, x and aux against each column tile's packed [K, t N] and [Ka, t N]
    weights, as one worker of its parallel_for runs it, one thread): rows per block, branches per tile and
    GFLOP/s."""
    M = cfg.num_scenarios
    K, Ka, N = mutual_dims(cfg)
    rows, tiles = mutual_blocking(B, M, K + Ka, N)
    x, a, bias = torch.randn(rows, K), torch.randn(rows, Ka), torch.randn(M * N)
    ws = [(torch.randn(K, t * N), torch.randn(Ka, t * N)) for t in tiles]
    z = torch.empty(rows, M * N)
    cols = [(sum(tiles[:i]) * N, t * N) for i, t in enumerate(tiles)]

    def f():
        for (w, wa), (c0, c) in zip(ws, cols):
            zt = z[:, c0:c0 + c]
            torch.addmm(bias[c0:c0 + c], x, w, out=zt)
            zt.addmm_(a, wa)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = time_alternating({"block": f}, reps=reps, warmup=3)
    finally:
        torch.set_num_threads(threads)
    return {"rows": rows, "branches_per_tile": max(tiles), "gflops": 2 * rows * (K + Ka) * M * N
            / res["medians_ms"]["block"] / 1e6, "packed_weights_mib": (K + Ka) * M * N * 4 / 2**20}


def slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x) over the points with y > 0 (1 = linear, 0 = flat; NaN below
    two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx, my = (sum(p[i] for p in pts) / len(pts) for i in (0, 1))
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else float("nan")
