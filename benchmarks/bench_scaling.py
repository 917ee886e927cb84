#!/usr/bin/env python3
"""Scaling benchmark: how the cost of one SAML training step grows with the number of scenarios M, the batch B
and the table rows per feature R — ours vs the plain-PyTorch reference.

Providers per point (same initial weights, same batch, timed alternately in one process with
``harness.time_alternating``, medians): ``SAML`` (``nn.SAML``, row-wise Adagrad fused into the embedding backward,
Adam on the dense parameters), ``reference eager`` (``SAMLReference`` + ``TrainingOptimizer``: dense table
gradients, row-wise Adagrad after the backward, Adam) and ``reference compiled`` (``torch.compile`` of the
reference's forward + loss, as in bench_model.py; only at the points listed in the grid: a compile takes tens of
seconds on 2 cores). Data: ``make_synthetic(n, num_scenarios=M, scenario_mix=uniform, num_users=num_items=R)``
(6 pooled features of which user and item are scenario-aware, a behaviour sequence of 20 over the item table),
default ``SAMLConfig.from_data`` (D = 16, branch and aux hidden (256, 128), mutual unit at layer 0), float32.

Three sweeps (one axis moves, the others stay at the base point): M, B, R. Per point it records:
- step time (median, ms) and samples/s of each provider, speed-up = median of per-round ratios;
- memory: ``state`` = weights + buffers (Adagrad states) + Adam states, ``peak`` = state + the peak extra bytes
  allocated during one step after ``zero_grad`` (CPU: the running sum of the profiler's allocation events; CUDA:
  ``max_memory_allocated``), so gradients and activations are in ``peak``;
- our step split into phases: forward hooks time ``embedding`` (+ ``sequence_embedding``), ``attention``, the
  ``mutual`` branch layer, the other ``branches`` (+ head) and the ``aux`` network (CUDA: synchronize at each
  hook); the backward of each of these groups is attributed on the CPU with torch.profiler (each backward node
  is mapped to the forward op that created it, by sequence number; the fused embedding update is in
  ``embedding``); ``optimizer`` = ``TrainingOptimizer.step`` (Adam on the dense parameters); ``other`` = the rest
  (loss, concatenations, ReLU/dropout, gradient accumulation). On CUDA the backward is one phase. The phases are
  medians of a few extra instrumented steps (the CPU ones run under the profiler, a little slower than the
  timed step).
- minor page faults per step of ours (``ru_minflt``: fresh pages the OS zero-fills, i.e. allocations that did
  not reuse memory) and, on the CPU, the mutual_linear kernel's block GEMM timed alone (``block_gemm_probe``): the
  two causes the results file names for the curves that are steeper than expected.
Slopes: least-squares slope of log(y) against log(x) over each curve (1 = linear, 0 = flat).

Sweep T (``ROWS_GRIDS``): the global table rows G from 100k to 10M at M=2, B=2048, for the settings of
``ROWS_SETTINGS``: the default ``SAML(cfg)`` (fused row-wise Adagrad), ``embedding_optimizer=None`` with sparse
table gradients, and with dense ones (the old default, only up to ``DENSE_MAX_ROWS``), each timed on its own (one
model alive at a time), on one torch thread with the CPU time of the step's thread beside the wall time (see
``run_rows_point``), plus state and peak memory; plot ``..._tables.png``.

    python benchmarks/bench_scaling.py [--quick] [--gpu] [--reps N] [--no-compile] [--sweeps MBRT] [--budget-s S]
                                       [--out-dir DIR]

The sweeps not named in ``--sweeps`` are carried over from the previous results file (``carry_over``), with its
hand-written notes, so there is one current file per benchmark and machine.

``--quick``: a tiny grid, no compile, results suffixed ``_quick`` in a temporary folder (``harness.make_parser``;
``--out-dir`` to choose), for the smoke test. ``--gpu``: a
small CUDA grid (no compile) that fits in gpu_check.sh's 60 s: no point is started unless one as long as the
previous one still fits in ``--budget-s`` (45 s). The full CPU grid (GRIDS["cpu"]) takes 4-5 min on 2 cores with a
warm inductor cache, 7-10 min cold (a compile of the reference takes 20-60 s per point). Results:
``benchmarks/results/scaling_<machine>.{md,json}`` and the plots ``..._m.png`` (time vs M), ``..._b.png`` (time vs
B), ``..._rows.png`` (time vs R), ``..._mem.png`` (memory vs M), ``..._tables.png`` (sweep T).

Code: this file runs the M / B / R sweeps (``run_point``), writes their tables and plots and the results file;
``scaling_measure.py`` holds the per-step measurements (set-up, memory, phase split, mutual-layer probe, ``slope``),
``scaling_rows.py`` sweep T.
"""
from __future__ import annotations

import math
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from harness import make_parser, markdown_table, result_stem, time_alternating, write_results  # noqa: E402
from scaling_measure import (block_gemm_probe, build_point, mutual_gflop, phase_times, slope,  # noqa: E402
                             state_bytes, step_peak_extra)
from scaling_rows import ROWS_GRIDS, ROWS_THREADS, plot_rows, rows_table, run_rows_point  # noqa: E402

# sweep -> (base point (M, B, R), axis, values, points with torch.compile)
GRIDS = {
    "cpu": {"M": ((4, 2048, 3000), "M", [2, 4, 8, 16, 32, 64], [2, 4, 8, 16, 32, 64]),
            "B": ((4, 2048, 3000), "B", [1024, 2048, 4096, 8192, 16384, 32768, 65536], [1024, 8192, 65536]),
            "R": ((4, 2048, 3000), "R", [3000, 30_000, 300_000, 1_000_000], [])},
    "gpu": {"M": ((4, 8192, 3000), "M", [2, 8, 32, 64], []),
            "B": ((4, 8192, 3000), "B", [1024, 65536], []),
            "R": ((4, 8192, 3000), "R", [3000, 1_000_000], [])},
    "quick": {"M": ((2, 256, 500), "M", [2, 4], []),
              "B": ((2, 256, 500), "B", [128, 256], []),
              "R": ((2, 256, 500), "R", [500, 2000], [])},
}


# ------------------------------------------------------------------------------------------------ one point

def run_point(M: int, B: int, R: int, device: str, reps: int, compile_ref: bool, phase_reps: int) -> dict:
    t_start = time.perf_counter()
    cfg, b, prov = build_point(M, B, R, device, compile_ref)
    steps = {n: (lambda opt=opt, body=body: (opt.zero_grad(), body())) for n, (_, opt, body) in prov.items()}
    compile_s = None
    for name, fn in steps.items():  # first calls (and the compile) outside the timed region
        t = time.perf_counter()
        fn()
        if name == "reference compiled":
            compile_s = time.perf_counter() - t
    mem = {n: {"state": state_bytes(m, opt), "peak": state_bytes(m, opt) + step_peak_extra(opt, body, device)}
           for n, (m, opt, body) in prov.items()}
    res = time_alternating(steps, reps=reps, warmup=1, device=device)
    med = res["medians_ms"]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):  # minor page faults of our step (fresh pages the kernel zero-fills)
        steps["SAML"]()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 3
    model, opt, _ = prov["SAML"]
    phases, ops = phase_times(model, opt, b, device, phase_reps)
    return {"M": M, "B": B, "R": R, "medians_ms": med, "samples_per_s": {k: B / v * 1e3 for k, v in med.items()},
            "speedup": {k: res["ratios"][(k, "SAML")] for k in med if k != "SAML"}, "memory_bytes": mem,
            "phases_ms": phases, "op_self_ms": ops, "mutual_gflop": mutual_gflop(cfg, B), "compile_s": compile_s,
            "page_faults_per_step": faults, "block_gemm": block_gemm_probe(cfg, B) if device == "cpu" else None,
            "dense_params": sum(p.numel() for n, p in model.named_parameters() if "embedding." not in n),
            "wall_s": time.perf_counter() - t_start}


def group_ms(phases: dict) -> dict:
    """fwd + bwd per phase group (CUDA: the backward stays one 'backward' phase)."""
    out = {}
    for k, v in phases.items():
        g = k.split(" ", 1)[1] if " " in k else k
        g = "backward" if g == "all" else g
        out[g] = out.get(g, 0.0) + v
    return out

def curves(points: list, axis: str) -> dict:
    """name -> (xs, ys) for the time curves of a sweep (providers, then our phase groups)."""
    out = {}
    for prov in ["SAML", "reference eager", "reference compiled"]:
        pts = [(p[axis], p["medians_ms"][prov]) for p in points if prov in p["medians_ms"]]
        if pts:
            out[prov] = tuple(zip(*pts))
    for g in group_ms(points[0]["phases_ms"]):
        out[f"SAML: {g}"] = tuple(zip(*[(p[axis], group_ms(p["phases_ms"]).get(g, 0.0)) for p in points]))
    out["SAML: all but mutual"] = tuple(zip(*[(p[axis], sum(v for g, v in group_ms(p["phases_ms"]).items()
                                                            if g != "mutual")) for p in points]))
    return out


def sweep_tables(name: str, axis: str, points: list, base: tuple) -> str:
    fixed = ", ".join(f"{k}={v}" for k, v in zip("MBR", base) if k != axis)
    provs = [p for p in ["SAML", "reference eager", "reference compiled"] if any(p in q["medians_ms"] for q in points)]
    rows = []
    for p in points:
        row = [p[axis]]
        for prov in provs:
            ms = p["medians_ms"].get(prov)
            row.append("-" if ms is None else ms)
        row += [f"{p['speedup'][prov]:.2f}x" if prov in p["speedup"] else "-" for prov in provs[1:]]
        row.append(f"{p['samples_per_s']['SAML']:,.0f}")
        row.append(f"{p['page_faults_per_step']:,.0f}")
        row += [p["memory_bytes"][prov]["peak"] / 2**20 if prov in p["memory_bytes"] else "-" for prov in provs]
        rows.append(row)
    header = ([axis] + [f"{p} ms" for p in provs] + [f"speed-up vs {p}" for p in provs[1:]]
              + ["SAML samples/s", "SAML page faults/step"] + [f"{p} peak MiB" for p in provs])
    text = f"### Sweep over {axis} ({fixed})\n\n" + markdown_table(header, rows) + "\n\n"
    groups = list(group_ms(points[0]["phases_ms"]))
    prow = [[p[axis]] + [group_ms(p["phases_ms"]).get(g, 0.0) for g in groups] + [sum(p["phases_ms"].values())]
            for p in points]
    text += "Our step by phase (ms, forward + backward of each group):\n\n"
    text += markdown_table([axis] + groups + ["sum"], prow) + "\n\n"
    sl = [(k, slope(*v)) for k, v in curves(points, axis).items()]
    xs = [p[axis] for p in points]
    sl.append(("state memory SAML", slope(xs, [p["memory_bytes"]["SAML"]["state"] for p in points])))
    sl.append(("peak memory SAML", slope(xs, [p["memory_bytes"]["SAML"]["peak"] for p in points])))
    sl.append(("peak memory reference eager",
               slope(xs, [p["memory_bytes"]["reference eager"]["peak"] for p in points])))
    if axis == "M":
        sl.append(("mutual layer GEMM FLOPs", slope(xs, [p["mutual_gflop"] for p in points])))
        sl.append(("dense parameters (Adam)", slope(xs, [p["dense_params"] for p in points])))
        mrows = [[p["M"], p["mutual_gflop"], group_ms(p["phases_ms"]).get("mutual", 0.0),
                  p["mutual_gflop"] / max(group_ms(p["phases_ms"]).get("mutual", 0.0), 1e-9) * 1e3]
                 + ([p["block_gemm"]["rows"], p["block_gemm"].get("branches_per_tile", "-"),
                     p["block_gemm"]["packed_weights_mib"], p["block_gemm"]["gflops"]]
                    if p["block_gemm"] else ["-"] * 4) for p in points]
        text += ("Mutual layer (fwd + bwd) against its GEMM FLOPs, and the CPU kernel's block GEMM measured alone "
                 "(one thread, `block_gemm_probe`):\n\n")
        text += markdown_table(["M", "GEMM GFLOP/step", "mutual ms", "GFLOP/s", "block rows", "branches per tile", "packed W MiB",
                                "block GEMM GFLOP/s"], mrows) + "\n\n"
    if axis == "M" and points[-1]["op_self_ms"]:
        last = {k: v for k, v in points[-1]["op_self_ms"].items() if not k.startswith("phase::")}
        top = sorted(last, key=lambda k: -last[k])[:14]
        text += ("Profiler, self CPU ms per step of the top operators of our step (at the largest M; median of the "
                 "profiled steps; nested ops count in their own row only):\n\n")
        text += markdown_table(["op"] + [f"M={p['M']}" for p in points],
                               [[k[:60]] + [p["op_self_ms"].get(k, 0.0) for p in points] for k in top]) + "\n\n"
    text += f"Slopes of log(y) vs log({axis}) (least squares over the sweep):\n\n"
    text += markdown_table(["curve", "slope"], [[k, f"{v:.2f}"] for k, v in sl]) + "\n"
    return text


def _save_loglog(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    """Log-log axes (base 2 in x), labels, grid and legend; saves and closes the figure; returns the path."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: dict, out_dir: str, stem: str) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for key, axis, suffix, xlabel in [("M", "M", "m", "scenarios M"), ("B", "B", "b", "batch B"),
                                      ("R", "R", "rows", "table rows per feature R")]:
        if key not in results:
            continue
        fig, ax = plt.subplots(figsize=(7, 5))
        colors = iter(plt.cm.tab10.colors)
        for name, (xs, ys) in curves(results[key]["points"], axis).items():
            phase = name.startswith("SAML: ")
            style = dict(color="k", ls="-.", lw=2) if name == "SAML: all but mutual" else \
                dict(color=next(colors), ls="--" if phase else "-", lw=1 if phase else 2)
            ax.plot(xs, [max(y, 1e-3) for y in ys], marker="o", ms=3, label=f"{name} (slope {slope(xs, ys):.2f})",
                    **style)
        if key == "M":  # the mutual layer's GEMM FLOPs, scaled to its time at the first point
            pts = results[key]["points"]
            mut = [group_ms(p["phases_ms"]).get("mutual", 0.0) for p in pts]
            if mut[0] > 0:
                ax.plot([p["M"] for p in pts], [p["mutual_gflop"] / pts[0]["mutual_gflop"] * mut[0] for p in pts],
                        "k:", lw=1, label="mutual GEMM FLOPs, scaled to the first point")
        paths.append(_save_loglog(plt, fig, ax, xlabel, "ms per training step (median)",
                                  f"SAML training step vs {xlabel} ({stem})", os.path.join(out_dir, f"{stem}_{suffix}.png")))
    if "M" in results:
        pts = results["M"]["points"]
        fig, ax = plt.subplots(figsize=(7, 5))
        xs = [p["M"] for p in pts]
        for prov in ["SAML", "reference eager", "reference compiled"]:
            ys = [p["memory_bytes"][prov]["peak"] / 2**20 for p in pts if prov in p["memory_bytes"]]
            if ys:
                xp = [p["M"] for p in pts if prov in p["memory_bytes"]]
                ax.plot(xp, ys, "-o", ms=3, label=f"{prov} peak (slope {slope(xp, ys):.2f})")
        ys = [p["memory_bytes"]["SAML"]["state"] / 2**20 for p in pts]  # the same for every provider
        ax.plot(xs, ys, "k:o", ms=3,
                label=f"state: weights + Adagrad + Adam, every provider (slope {slope(xs, ys):.2f})")
        paths.append(_save_loglog(plt, fig, ax, "scenarios M", "MiB", f"Memory of one training step vs M ({stem})",
                                  os.path.join(out_dir, f"{stem}_mem.png")))
    return paths


def carry_over(out_dir: str, stem: str, results: dict) -> tuple:
    """Keeps one current results file per benchmark and machine when only some sweeps run: the sweeps of the
    previous ``<stem>.json`` that this invocation did not run are added to ``results`` (in place), and the
    hand-written notes of the previous ``<stem>.md`` (from its first "## " heading on) are returned to be
    appended. Returns (carried sweep keys, notes)."""
    import json

    carried, notes = [], ""
    jpath, mpath = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")
    if os.path.exists(jpath):
        with open(jpath) as f:
            old = json.load(f).get("data", {}).get("results", {})
        for k, r in old.items():
            if k not in results:
                results[k] = r
                carried.append(k)
    if os.path.exists(mpath):
        with open(mpath) as f:
            text = f.read()
        at = text.find("\n## ")
        if at >= 0:
            notes = "\n" + text[at + 1:]
    return carried, notes


# ------------------------------------------------------------------------------------------------ main

def parser():
    p = make_parser("SAML scaling benchmark (M, B, table rows); --budget-s defaults to 45 with --gpu",
                    gpu_help="small CUDA grid (about 60 s)",
                    quick_help="tiny grid, no compile, _quick results in a temporary folder (smoke test)")
    p.add_argument("--sweeps", default="MBRT", help="which sweeps to run: any of M, B, R, T (table rows, the "
                   "settings of ROWS_SETTINGS; default MBRT); the sweeps not run are carried over from the previous "
                   "results file")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("bench_scaling.py --gpu: CUDA is not available")
    grid = GRIDS["quick" if args.quick else device]
    reps = args.reps or (2 if args.quick else 5)
    phase_reps = 1 if args.quick else 3
    budget = args.budget_s if args.budget_s is not None else (45.0 if args.gpu else math.inf)
    last_wall = 0.0  # a point is started only if one as long as the last one still fits in the budget
    t0 = time.perf_counter()
    results = {}
    run_keys = [k for k in "MBRT" if k in args.sweeps.upper()]
    for key in [k for k in "MBR" if k in run_keys]:
        base, axis, values, compile_at = grid[key]
        points = []
        for v in values:
            M, B, R = (v if a == axis else x for a, x in zip("MBR", base))
            if time.perf_counter() - t0 + last_wall > budget:
                print(f"bench_scaling: time budget ({budget:.0f} s) spent, skipping M={M} B={B} R={R}", flush=True)
                continue
            comp = v in compile_at and not args.no_compile
            print(f"bench_scaling: {device} sweep {axis}: M={M} B={B} R={R} compile={comp}", flush=True)
            pt = run_point(M, B, R, device, reps, comp, phase_reps)
            print("   " + ", ".join(f"{k} {v:.1f} ms" for k, v in pt["medians_ms"].items())
                  + f"  ({pt['wall_s']:.0f} s" + (f", compile {pt['compile_s']:.0f} s)" if pt["compile_s"] else ")"),
                  flush=True)
            points.append(pt)
            last_wall = pt["wall_s"]
        if points:
            results[key] = {"base": base, "axis": axis, "points": points, "compile_at": compile_at}
    if "T" in run_keys:
        (M, B), values = ROWS_GRIDS["quick" if args.quick else device]
        threads = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(ROWS_THREADS)
        points = []
        try:
            for G in values:
                if time.perf_counter() - t0 + last_wall > budget:
                    print(f"bench_scaling: time budget ({budget:.0f} s) spent, skipping sweep T rows ~{G:,}",
                          flush=True)
                    continue
                print(f"bench_scaling: {device} sweep T: M={M} B={B} global rows ~{G:,}", flush=True)
                pt = run_rows_point(M, B, G, device, reps)
                last_wall = pt["wall_s"]
                print("   " + ", ".join(f"{k} {v:.1f} ms wall / {pt['cpu_medians_ms'][k]:.1f} ms CPU"
                                        for k, v in pt["medians_ms"].items()) + f"  ({pt['wall_s']:.0f} s)", flush=True)
                points.append(pt)
        finally:
            t_rows = torch.get_num_threads()
            torch.set_num_threads(threads)
        if points:  # none when the time budget was spent before the sweep
            results["T"] = {"base": (M, B), "axis": "global rows", "points": points, "reps": reps, "threads": t_rows,
                            "device": device, "loadavg_1m_after": os.getloadavg()[0]}
    stem = result_stem("scaling", args)
    carried, notes = carry_over(args.out_dir, stem, results)
    body = (f"One training step = zero_grad + forward + backward + optimizer, float32, {torch.get_num_threads()} "
            f"threads, {reps} alternating rounds per point (medians); speed-up = median of per-round ratios "
            "t(provider) / t(SAML). Peak MiB = weights + Adagrad/Adam states + the peak extra allocation of one "
            "step after zero_grad. torch.compile of the reference only where a column has a value. Phases: see "
            "the benchmark's docstring (the CPU phase split comes from profiled steps, so 'sum' can exceed the "
            "timed median).\n\n")
    if carried:
        body += (f"Sweeps {', '.join(sorted(carried))} are carried over unchanged from the previous results file "
                 f"(not rerun in this invocation, which ran {', '.join(run_keys)}).\n\n")
    body += "\n".join(rows_table(r) if k == "T" else sweep_tables(k, r["axis"], r["points"], r["base"])
                      for k, r in sorted(results.items(), key=lambda kr: "MBRT".index(kr[0])))
    body += f"\nTotal wall time of this invocation: {time.perf_counter() - t0:.0f} s.\n" + notes
    print(body)
    paths = write_results(stem, "Scaling of the SAML training step with M, B and table rows: ours vs SAMLReference",
                          body, {"results": results}, out_dir=args.out_dir)
    paths = list(paths.values()) + plot_all(results, args.out_dir, stem)
    if "T" in results:
        paths += plot_rows(results["T"], args.out_dir, stem)
    print("wrote", ", ".join(paths))
    return results


if __name__ == "__main__":
    main()
