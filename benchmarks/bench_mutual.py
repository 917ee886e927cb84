"""Benchmark of the fused mutual layer: ``mutual_linear`` = all-branch GEMM + mutual unit, forward and
forward+backward, against the unfused eager composition and torch.compile of it.

CPU (default): M=4, B=4096, K=N=256, float32.  ``--gpu``: M=4, B=16384, K=N=512, bfloat16 on CUDA.
Layer: bias + relu, cosine similarity, temperature 1, uniform scenario mix, rows unsorted.

Providers (same out and, for fwd+bwd, the same gradients of x, W and bias):
  ours         saml_kernels.mutual_linear (automatic backend), save_branch_outputs=False: the forward never
               writes h [M, B, N]; the backward recomputes the branch outputs block by block (one more GEMM)
  ours_saved   save_branch_outputs=True: all-branch GEMM to memory + mutual_forward, h kept for the backward
  eager        saml_kernels.reference.mutual_linear_reference: mbranch_linear_reference(route="all",
               grad_mask="own") + mutual_unit_reference, dense autograd with torch.where stop-gradient
  compile_ref  torch.compile of the same reference (inductor)

Reported: median ms, speed-up of ``ours`` over each provider (median of per-round ratios of alternating
timing, harness.time_alternating), peak extra memory of one call and its ratio to eager's.
Targets (2-core CPU): fwd+bwd >= 1.7x eager with <= 50% of eager's peak memory.

Peak memory on the CPU: as in bench_branch_gemm.py (the process re-executes itself with
MALLOC_MMAP_THRESHOLD_=65536 so freed large buffers leave the resident set; a sampling thread records the peak
RSS over one warm call). On CUDA: the allocator's peak.
"""
from __future__ import annotations

import os
import sys

# as a script only: importing this module (the flag test) must not replace the importing process
if __name__ == "__main__" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and "--gpu" not in sys.argv:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import saml_kernels  # noqa: E402
from bench_branch_gemm import cpu_peak  # noqa: E402  (the CPU peak-memory probe)
from harness import (TimeBudget, make_parser, markdown_table, peak_memory, result_stem, time_alternating,  # noqa: E402
                     write_results)
from saml_kernels.reference.mutual_unit import mutual_linear_reference  # noqa: E402


def make_case(M, B, K, N, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)  # noqa
    return dict(M=M, B=B, K=K, N=N, x=mk(B, K), weight=mk(M, K, N, scale=K ** -0.5), bias=mk(M, N, scale=0.1),
                scenario=torch.randint(0, M, (B,), generator=g).to(device), g=mk(B, N))


def provider(case, fn, mode):
    """A zero-argument call: forward only (no autograd) or forward + backward into fresh leaf gradients."""
    leaves = {k: case[k].detach().clone().requires_grad_(mode == "fwdbwd") for k in ("x", "weight", "bias")}
    kw = dict(activation="relu", temperature=1.0, similarity="cosine")

    def run():
        for p in leaves.values():
            p.grad = None
        if mode == "fwd":
            with torch.no_grad():
                return fn(leaves["x"], leaves["weight"], leaves["bias"], case["scenario"], **kw)
        out = fn(leaves["x"], leaves["weight"], leaves["bias"], case["scenario"], **kw)
        out.backward(case["g"])
    return run


def parser():
    ap = make_parser(__doc__.split("\n")[0], gpu_help="CUDA, M=4 B=16384 K=N=512 bf16",
                     quick_help="smoke run: fewer reps, B/4, no torch.compile (to a temporary folder)")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--batch", type=int, default=None, metavar="B",
                    help="CPU batch size (default 4096; another B writes the _b<B> results file: the small-batch "
                         "recompute-or-save comparison behind MutualUnit's SAVE_AUTO_ELEMENTS)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    budget = TimeBudget(args.budget_s)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu:
        M, B, K, N, dtype = 4, 16384, 512, 512, torch.bfloat16
    else:
        M, B, K, N, dtype = 4, 4096, 256, 256, torch.float32
    if args.batch is not None and not args.gpu:
        if args.batch < 1:
            raise SystemExit(f"bench_mutual: --batch must be >= 1, got {args.batch}")
        B = args.batch
    if args.quick:
        B = max(B // 4, 1)
    reps = args.reps or (5 if args.quick else 25)
    case = make_case(M, B, K, N, dtype, device)
    fns = {
        "ours": saml_kernels.mutual_linear,
        "ours_saved": lambda *a, **k: saml_kernels.mutual_linear(*a, save_branch_outputs=True, **k),
        "eager": mutual_linear_reference,
    }
    if not (args.quick or args.no_compile):
        fns["compile_ref"] = torch.compile(mutual_linear_reference)
    header = ["mode", "provider", "median ms", "ours speed-up", "peak extra MiB", "peak / eager's"]
    rows, data = [], {"shape": dict(M=M, B=B, K=K, N=N, dtype=str(dtype), device=device), "results": {}}
    for mode in args.modes.split(","):
        if not budget.allows(f"mode {mode}"):
            continue
        calls = {name: provider(case, fn, mode) for name, fn in fns.items()}
        peaks = {}
        for name, call in calls.items():  # memory first (warm call inside), compile happens here too
            peaks[name] = peak_memory(call, device) if device == "cuda" else cpu_peak(call)
        res = time_alternating(calls, reps=reps, warmup=2, device=device)
        for name in calls:
            speed = 1.0 if name == "ours" else res["ratios"][(name, "ours")]
            mem_ratio = peaks[name] / peaks["eager"] if peaks["eager"] else float("nan")
            rows.append([mode, name, res["medians_ms"][name], speed, peaks[name] / 2 ** 20, mem_ratio])
            data["results"][f"{mode}/{name}"] = dict(median_ms=res["medians_ms"][name], ours_speedup=speed,
                                                     peak_bytes=peaks[name], peak_vs_eager=mem_ratio)
            print(f"{mode:7s} {name:12s} {res['medians_ms'][name]:9.2f} ms  ours x{speed:5.2f}  "
                  f"peak {peaks[name] / 2 ** 20:8.1f} MiB ({mem_ratio:.2f} of eager)", flush=True)
    body = (f"mutual_linear, M={M} B={B} K={K} N={N} {dtype}, relu, cosine, bias, uniform unsorted scenarios, "
            f"{torch.get_num_threads()} threads.\n"
            "Speed-up = median over alternating rounds of t_provider / t_ours. Targets (2-core CPU, fwd+bwd): "
            ">= 1.7x eager, <= 50% of eager's peak memory.\n\n" + markdown_table(header, rows) + budget.note())
    stem = result_stem("bench_mutual", args, f"b{B}" if args.batch is not None and not args.gpu and B != 4096 else "")
    paths = write_results(stem, "mutual_linear: fused all-branch GEMM + mutual unit", body, data,
                          plot={"groups": {f"{r[0]}/{r[1]}": {"ms": r[2]} for r in rows}, "ylabel": "median ms"},
                          out_dir=args.out_dir)
    print("wrote", ", ".join(paths.values()))


if __name__ == "__main__":
    main()
