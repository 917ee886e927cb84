"""The fused step of bench_embedding (forward + fused SGD update, cpu backend) on 16-bit tables with the default
stochastic rounding against round-to-nearest: alternating rounds, medians, and the median of the per-round ratios.

Usage: python benchmarks/stochastic_rounding_cost.py [--reps N] [--runs N] [--aa] [--clock wall|cpu] [--threads N]
                                                     [--out-dir DIR]
                                                     [--B 4096] [--F 16] [--R 100000] [--D 32] [--L 1]
Prints one line per dtype and run, and writes stochastic_rounding_cost_<machine>[_cpuclock][_t<N>].{md,json} (with --aa
also a round-to-nearest-against-itself run per dtype: the noise of the ratio on this machine now).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_embedding import LR, Problem  # noqa: E402
from harness import machine_info, make_parser, result_stem, time_alternating, write_results  # noqa: E402

import saml_kernels  # noqa: E402
from saml_kernels.ops import embedding_optimizer  # noqa: E402


def time_alternating_cpu(providers: dict, reps: int, warmup: int = 2) -> dict:
    """time_alternating's result with process CPU time per call (time.process_time) instead of wall time: on a
    shared machine a call's wall time also counts the time other processes held the cores."""
    names = list(providers)
    for _ in range(warmup):
        for n in names:
            providers[n]()
    times = {n: [] for n in names}
    for k in range(reps):
        for n in names[k % len(names):] + names[:k % len(names)]:
            t0 = time.process_time()
            providers[n]()
            times[n].append((time.process_time() - t0) * 1e3)
    a, b = names
    return {"medians_ms": {n: statistics.median(v) for n, v in times.items()},
            "ratios": {(a, b): statistics.median(x / y for x, y in zip(times[a], times[b]))}}


def measure(P: Problem, reps: int, aa: bool = False, clock: str = "wall") -> dict:
    """One alternating run: {"sr": median ms, "rtn": median ms, "ratio": median per-round sr / rtn}; with ``aa``
    the "sr" provider rounds to nearest too (an A/A run); ``clock`` "cpu": process CPU time per call."""
    provs = {}
    # Both providers update the same tables: with a clone each, where the tables landed in memory alone moved
    # an A/A ratio (round-to-nearest against itself) by 5-13% in favour of the first clone.
    gw, sw = P.gw, P.sw
    for tag, sr in (("sr", not aa), ("rtn", False)):
        hp = embedding_optimizer.make_hparams(LR, 0.0, stochastic_rounding=sr, seed=1, step=0)

        def f(gw=gw, sw=sw, hp=hp):
            saml_kernels.scenario_embedding_bag(P.ids, P.offsets, P.scenario, gw, sw, P.fr, P.fr, backend="cpu")
            embedding_optimizer.backward_update("cpu", P.gg, P.gs, P.ids, P.offsets, P.scenario, gw, sw, P.fr_t,
                                                P.fsr_t, P.slot, None, 0, 0, None, None, "sgd", hp)
        provs[tag] = f
    r = time_alternating(provs, reps=reps, warmup=2) if clock == "wall" else time_alternating_cpu(provs, reps)
    return {"sr": r["medians_ms"]["sr"], "rtn": r["medians_ms"]["rtn"], "ratio": r["ratios"][("sr", "rtn")],
            "load_1m": os.getloadavg()[0]}


def main():
    ap = make_parser(__doc__.split("\n")[0], reps=15, flags=("reps", "threads", "out-dir"))
    for k, v in (("B", 4096), ("F", 16), ("R", 100_000), ("D", 32), ("M", 4), ("L", 1)):
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--runs", type=int, default=3, help="whole alternating runs per dtype (default 3)")
    ap.add_argument("--aa", action="store_true", help="also one round-to-nearest-against-itself run per dtype")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or process CPU time per call (use with --threads 1 on a shared "
                    "machine; the file name gets _cpuclock)")
    a = ap.parse_args()
    print(f"machine: {machine_info()}; torch threads {torch.get_num_threads()}", flush=True)
    shape = f"B={a.B} F={a.F} R={a.R} D={a.D} M={a.M} L={a.L}"
    rows, data = [], {}
    for name in a.dtypes.split(","):
        P = Problem(a.B, a.F, a.R, a.D, a.M, a.L, "uniform", "cpu", dtype=getattr(torch, name))
        kinds = ["sr/rtn"] * a.runs + (["rtn/rtn (A/A)"] if a.aa else [])
        data[name] = []
        for kind in kinds:
            m = measure(P, a.reps, aa=kind != "sr/rtn", clock=a.clock)
            data[name].append({"kind": kind, **m})
            rows.append(f"| {name} | {kind} | {m['sr']:.3f} | {m['rtn']:.3f} | {m['ratio']:.3f} | {m['load_1m']:.1f} |")
            print(f"{name}: {shape}: {kind}: fused step median first {m['sr']:.3f} ms, round-to-nearest "
                  f"{m['rtn']:.3f} ms, median per-round ratio {m['ratio']:.3f}", flush=True)
    body = (f"Fused step (forward + fused SGD update, cpu backend) of bench_embedding's problem {shape}, uniform "
            f"ids, torch threads {torch.get_num_threads()}: stochastic rounding (the default for 16-bit tables) "
            f"against round-to-nearest on the same tables, {a.reps} alternating rounds per run (order rotated), "
            + ("wall time" if a.clock == "wall" else "process CPU time per call")
            + ". 'ratio': the median of the per-round ratios first / round-to-nearest (the issue's target: <= 1.10). "
            "'rtn/rtn (A/A)': round-to-nearest against itself, the noise of the ratio on this machine "
            "then. 'load': the 1-minute load average after the run (the machine is shared).\n\n"
            "| dtype | run | first ms | round-to-nearest ms | ratio | load |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    stem = result_stem("stochastic_rounding_cost", a, "cpuclock" if a.clock == "cpu" else "")
    paths = write_results(stem, "Stochastic rounding cost: fused step, stochastic vs round-to-nearest", body,
                          {"args": {k: v for k, v in vars(a).items() if k != "config_tags"}, "runs": data},
                          out_dir=a.out_dir)
    print("wrote", ", ".join(paths.values()), flush=True)


if __name__ == "__main__":
    main()
