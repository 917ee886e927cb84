"""The fused step of bench_embedding (forward + fused SGD update, cpu backend) on 16-bit tables with the default
stochastic rounding against round-to-nearest: alternating rounds, medians, and the median of the per-round ratios.

Usage: python benchmarks/stochastic_rounding_cost.py [--reps N] [--threads N] [--B 4096] [--F 16] [--R 100000]
                                                     [--D 32] [--L 1]
Prints one line per dtype; writes nothing.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_embedding import LR, Problem  # noqa: E402
from harness import machine_info, make_parser, time_alternating  # noqa: E402

import saml_kernels  # noqa: E402
from saml_kernels.ops import embedding_optimizer  # noqa: E402


def main():
    ap = make_parser(__doc__.split("\n")[0], reps=15, flags=("reps", "threads"))
    for k, v in (("B", 4096), ("F", 16), ("R", 100_000), ("D", 32), ("M", 4), ("L", 1)):
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--dtypes", default="bfloat16,float16")
    a = ap.parse_args()
    print(f"machine: {machine_info()}; torch threads {torch.get_num_threads()}", flush=True)
    for name in a.dtypes.split(","):
        P = Problem(a.B, a.F, a.R, a.D, a.M, a.L, "uniform", "cpu", dtype=getattr(torch, name))
        provs = {}
        # Both providers update the same tables: with a clone each, where the tables landed in memory alone moved
        # an A/A ratio (round-to-nearest against itself) by 5-13% in favour of the first clone.
        gw, sw = P.gw, P.sw
        for tag, sr in (("sr", True), ("rtn", False)):
            hp = embedding_optimizer.make_hparams(LR, 0.0, stochastic_rounding=sr, seed=1, step=0)

            def f(gw=gw, sw=sw, hp=hp):
                saml_kernels.scenario_embedding_bag(P.ids, P.offsets, P.scenario, gw, sw, P.fr, P.fr, backend="cpu")
                embedding_optimizer.backward_update("cpu", P.gg, P.gs, P.ids, P.offsets, P.scenario, gw, sw, P.fr_t,
                                                    P.fsr_t, P.slot, None, 0, 0, None, None, "sgd", hp)
            provs[tag] = f
        r = time_alternating(provs, reps=a.reps, warmup=2)
        m = r["medians_ms"]
        print(f"{name}: B={a.B} F={a.F} R={a.R} D={a.D} M={a.M} L={a.L}: fused step median stochastic "
              f"{m['sr']:.3f} ms, round-to-nearest {m['rtn']:.3f} ms, median per-round ratio sr/rtn "
              f"{r['ratios'][('sr', 'rtn')]:.3f}", flush=True)


if __name__ == "__main__":
    main()
