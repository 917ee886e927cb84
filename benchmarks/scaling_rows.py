"""Sweep T of bench_scaling.py (imported by it; not a benchmark of its own): the SAML training step against the
global table rows G at fixed (M, B), for the settings of ``ROWS_SETTINGS`` (the default fused row-wise Adagrad,
``embedding_optimizer=None`` with sparse and with dense table gradients), each timed on its own (one model alive at
a time) with the CPU time of the step's thread beside the wall time (``run_rows_point``); its results-file table
(``rows_table``) and plot (``plot_rows``, ``<stem>_tables.png``).
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
from harness import markdown_table
from scaling_measure import LR, slope, state_bytes, step_peak_extra

from saml_kernels.data import make_synthetic
from saml_kernels.nn import SAML, SAMLConfig, TrainingOptimizer

# sweep "T": global table rows G, (M, B) fixed; the settings are timed one after another (one model
# alive at a time: at G = 10M the tables take ~3 GB); "non-fused dense" only up to DENSE_MAX_ROWS (it is the slow one)
ROWS_GRIDS = {"cpu": ((2, 2048), [100_000, 300_000, 1_000_000, 3_000_000, 10_000_000]),
              "gpu": ((2, 8192), [100_000, 10_000_000]),
              "quick": ((2, 128), [40_000, 200_000])}
ROWS_SETTINGS = ("fused (default)", "non-fused sparse", "non-fused dense")
DENSE_MAX_ROWS = 1_000_000
ROWS_THREADS = 1  # torch threads of the T sweep on the CPU (see run_rows_point)


def rows_problem(M: int, B: int, G: int, device: str):
    """(cfg, batch) of a SAML problem whose global table has about G rows: the synthetic data of a small
    problem (users = items = 20k, so make_synthetic stays fast), with the user, item and behaviour-sequence tables
    widened to G/2 rows each and their ids spread over the wide tables (id -> id * stride): the batch touches as
    many rows as the small problem, scattered over tables G/40k times larger."""
    import dataclasses

    small = 20_000
    data = make_synthetic(B, num_scenarios=M, scenario_mix=[1.0] * M, num_users=small, num_items=small, seed=0)
    cfg = SAMLConfig.from_data(data)
    wide = max(G // 2, small)
    stride = wide // small
    feats = [f._replace(num_embeddings=wide) if f.name in ("user", "item") else f for f in cfg.features]
    seq = cfg.sequence._replace(num_embeddings=wide + 1)  # + the padding id 0
    cfg = dataclasses.replace(cfg, features=feats, sequence=seq)
    b = data.batch(np.arange(B))
    off, idx = b.offsets, b.indices.clone()
    for f, spec in enumerate(cfg.features):
        if spec.name in ("user", "item"):
            lo, hi = int(off[f * B]), int(off[(f + 1) * B])
            idx[lo:hi] *= stride
    seq_ids = torch.where(b.seq_ids > 0, (b.seq_ids - 1) * stride + 1, b.seq_ids)
    b = dataclasses.replace(b, indices=idx, seq_ids=seq_ids)
    return cfg, b.to(device)


def build_rows_setting(cfg, setting: str, device: str):
    """(model, optimizer, body) of one setting: the default model (fused row-wise Adagrad), or
    embedding_optimizer=None with sparse (``sparse=True`` on the embedding layers) or dense table gradients, the
    tables then updated by TrainingOptimizer.step (the rows the gradient touches)."""
    torch.manual_seed(0)
    if setting == "fused (default)":
        model = SAML(cfg, device=device)
    else:
        model = SAML(cfg, embedding_optimizer=None, device=device)
        for mod in (model.embedding, getattr(model, "sequence_embedding", None)):
            if mod is not None:
                mod.sparse = setting == "non-fused sparse"
    opt = TrainingOptimizer(model, LR)  # embedding_lr: the models' default (0.05)
    return model, opt


def run_rows_point(M: int, B: int, G: int, device: str, reps: int) -> dict:
    """Step time (median of ``reps`` steps after 2 warm-up steps), state and peak memory of each setting at G.

    Two clocks per step: wall time, and on the CPU the CPU time of the calling thread (``time.thread_time``). The
    sweep runs its CPU steps on one torch thread (``ROWS_THREADS``), so that thread's CPU time is the whole step's
    CPU work and waiting for a core held by another process does not count: on a shared machine it is the number
    that still compares across points (the cache and memory bandwidth stay shared)."""
    import gc
    import warnings

    t_start = time.perf_counter()
    cfg, b = rows_problem(M, B, G, device)
    rows = sum(f.num_embeddings for f in cfg.features)
    out = {"M": M, "B": B, "G": G, "global_rows": rows, "medians_ms": {}, "steps_ms": {}, "cpu_medians_ms": {},
           "cpu_steps_ms": {}, "memory_bytes": {}}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for setting in ROWS_SETTINGS:
        if setting == "non-fused dense" and G > DENSE_MAX_ROWS:
            continue
        model, opt = build_rows_setting(cfg, setting, device)

        def body(model=model, opt=opt):
            model.loss(b).backward()
            opt.step()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dense setting's large-table warning, expected here
            for _ in range(2):
                opt.zero_grad()
                body()
            times, cpu = [], []
            for _ in range(reps):
                opt.zero_grad()
                sync()
                t, c = time.perf_counter(), time.thread_time()
                body()
                sync()
                times.append((time.perf_counter() - t) * 1e3)
                cpu.append((time.thread_time() - c) * 1e3)
            state = state_bytes(model, opt)
            out["memory_bytes"][setting] = {"state": state, "peak": state + step_peak_extra(opt, body, device)}
        out["medians_ms"][setting] = statistics.median(times)
        out["steps_ms"][setting] = times
        out["cpu_medians_ms"][setting] = statistics.median(cpu)
        out["cpu_steps_ms"][setting] = cpu
        del model, opt, body
        gc.collect()
    out["wall_s"] = time.perf_counter() - t_start
    return out


def rows_table(res: dict) -> str:
    pts = res["points"]
    (M, B) = res["base"]
    clock = "cpu_medians_ms" if pts[0].get("cpu_medians_ms") and res.get("device", "cpu") == "cpu" else "medians_ms"
    base = pts[0][clock]["fused (default)"]
    rows = []
    for p in pts:
        ms, wall, mem = p[clock], p["medians_ms"], p["memory_bytes"]
        rows.append([f"{p['global_rows']:,}"] + [ms.get(s, "-") for s in ROWS_SETTINGS]
                    + [f"{ms['fused (default)'] / base:.2f}x"] + [wall.get(s, "-") for s in ROWS_SETTINGS]
                    + [mem[s]["state"] / 2**20 if s in mem else "-" for s in ROWS_SETTINGS[:1]]
                    + [mem[s]["peak"] / 2**20 if s in mem else "-" for s in ROWS_SETTINGS])
    what = "CPU ms" if clock == "cpu_medians_ms" else "ms"
    header = (["global rows"] + [f"{s} {what}" for s in ROWS_SETTINGS] + ["default vs first point"]
              + [f"{s} wall ms" for s in ROWS_SETTINGS] + ["state MiB (every setting)"]
              + [f"{s} peak MiB" for s in ROWS_SETTINGS])
    text = (f"### Sweep over the global table rows (M={M}, B={B})\n\nSettings: `SAML(cfg)` (the default: "
            "row-wise Adagrad fused into the embedding backward); `SAML(cfg, embedding_optimizer=None)` with sparse "
            "table gradients (`sparse=True` on its embedding layers) or dense ones (the old default; only at the "
            f"points of at most ~{DENSE_MAX_ROWS:,} global rows), tables updated by `TrainingOptimizer.step` on "
            f"the touched rows. Median of {res.get('reps', '?')} timed steps of each setting (timed one setting "
            f"after another, one model alive at a time), {res.get('threads', '?')} torch thread(s); 'CPU ms' = CPU "
            "time of the step's thread (`run_rows_point`: on a shared machine the comparable number), 'wall ms' "
            "beside it; the user and item tables and the behaviour-sequence table are G/2 rows each, with the "
            "batch's ids spread over them (`rows_problem`). State = weights + row-wise and Adam states; peak = state "
            "+ the peak extra allocation of one step.\n\n")
    text += markdown_table(header, rows) + "\n\n"
    gs = [p["global_rows"] for p in pts]
    sl = [(s, slope([g for g, p in zip(gs, pts) if s in p[clock]],
                    [p[clock][s] for p in pts if s in p[clock]])) for s in ROWS_SETTINGS]
    text += f"Slopes of log({what}) vs log(global rows):\n\n" + markdown_table(["setting", "slope"],
                                                                          [[k, f"{v:.2f}"] for k, v in sl]) + "\n"
    return text


def plot_rows(res: dict, out_dir: str, stem: str) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    pts = res["points"]
    clock = "cpu_medians_ms" if pts[0].get("cpu_medians_ms") and res.get("device", "cpu") == "cpu" else "medians_ms"
    fig, (ax, axm) = plt.subplots(1, 2, figsize=(11, 4.5))
    for s in ROWS_SETTINGS:
        xs = [p["global_rows"] for p in pts if s in p[clock]]
        if xs:
            ys = [p[clock][s] for p in pts if s in p[clock]]
            ax.plot(xs, ys, "-o", ms=3, label=f"{s} (slope {slope(xs, ys):.2f})")
            axm.plot(xs, [p["memory_bytes"][s]["peak"] / 2**20 for p in pts if s in p["memory_bytes"]], "-o", ms=3,
                     label=f"{s} peak")
    xs = [p["global_rows"] for p in pts]
    axm.plot(xs, [p["memory_bytes"]["fused (default)"]["state"] / 2**20 for p in pts], "k:o", ms=3,
             label="state (weights + optimizer states)")
    ylab = "CPU ms per training step (median, 1 thread)" if clock == "cpu_medians_ms" else "ms per training step"
    for a, yl, t in ((ax, ylab, "SAML step vs global table rows"),
                     (axm, "MiB", "memory vs global table rows")):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("global table rows")
        a.set_ylabel(yl)
        a.set_title(f"{t} ({stem}, M={res['base'][0]}, B={res['base'][1]})", fontsize=9)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}_tables.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
