"""Benchmark of the M-branch GEMMs: ``mbranch_linear`` routes "own" and "all" (grad_mask "own").

CPU (default): M=4, B=4096, K=N=256, float32.  ``--gpu``: M=4, B=16384, K=N=512, bfloat16 on CUDA.
Scenario mixes: uniform and skewed (70/20/5/5); rows always unsorted (random order).
Layers (``--layers``): "relu_bias" (bias + relu, every route) and "linear" (no bias, no activation: the same
work as the plain matmul, route own only).

Providers (all compute the same y and, for fwd+bwd, the gradients of x, W and bias):
  ours         saml_kernels.mbranch_linear (backend chosen automatically: cpu / cuda)
  eager_where  the pattern of public multi-scenario code: every branch on the full batch, rows picked with
               torch.where (M times the FLOPs)
  masked_loop  per branch: boolean-mask gather of its rows, GEMM, masked write back
  sort_segment argsort by scenario, one GEMM per contiguous segment, unsort (index_copy)
  grouped_mm   torch._grouped_mm on the sorted rows (route own) / batched (route all), where it runs
  compile_ref  torch.compile of saml_kernels.reference.mbranch_linear_reference
  plain        one plain matmul of the same shape class (own: [B,K]x[K,N]; all: [B,K]x[K,M*N]), the ceiling

Reported: median ms, useful GFLOP/s (own: 2BKN fwd, 6BKN fwd+bwd; all+grad_mask own: 2MBKN fwd,
2MBKN + 4BKN fwd+bwd), % of the plain-matmul rate measured in the same run, speed-up of ours over each provider
(median of per-round ratios, alternating timing), peak extra memory of one call. For ours, the per-round ratio
of the plain matmul's rate to ours is also given as median [25th, 75th percentile] across rounds: its spread
shows how much a shared machine disturbed the pair.

Peak memory on the CPU: the process re-executes itself with MALLOC_MMAP_THRESHOLD_=65536 so that every large
buffer is mmapped and returned on free; resident memory then follows live memory and a sampling thread
(~0.2 ms period) records its peak over one call (warm). On CUDA: the allocator's peak.

Phase breakdown (route own, fwd+bwd, CPU kernel): the kernels called directly, alternating with one plain
[B,K]x[K,N] GEMM: the forward, and the backward asked for dx only, dW only, db only and all three. Each backward
phase includes the dz = dy * act'(y) gather it needs, so the phases do not add up to "all"; the ratio to one plain
GEMM shows which phase is off its ceiling (dx and dW are each one GEMM's worth of FLOPs).

The mutual layer (mutual_linear) is benchmarked in benchmarks/bench_mutual.py.
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time

# as a script only: importing this module (bench_mutual.py, the flag test) must not replace the importing process
if __name__ == "__main__" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and "--gpu" not in sys.argv:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import saml_kernels  # noqa: E402
from harness import (TimeBudget, make_parser, markdown_table, peak_memory, result_stem, time_alternating,  # noqa: E402
                     write_results)
from saml_kernels.reference.mbranch_linear import mbranch_linear_reference  # noqa: E402

MIXES = {"uniform": None, "skewed": (0.70, 0.20, 0.05, 0.05)}


def make_case(M, B, K, N, dtype, device, mix, seed=0):
    g = torch.Generator().manual_seed(seed)
    if MIXES[mix] is None:
        s = torch.randint(0, M, (B,), generator=g)
    else:
        counts = [int(round(p * B)) for p in MIXES[mix]]
        counts[0] += B - sum(counts)
        s = torch.cat([torch.full((c,), m) for m, c in enumerate(counts)])
        s = s[torch.randperm(B, generator=g)]  # unsorted rows
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)  # noqa
    return dict(x=mk(B, K), weight=mk(M, K, N, scale=K ** -0.5), bias=mk(M, N, scale=0.1), scenario=s.to(device),
                M=M, B=B, K=K, N=N)


# ------------------------------------------------------------------------------------------------ providers

_LAYER = {"name": "relu_bias"}  # set by main() per configuration


def _relu(t):
    return torch.relu(t) if _LAYER["name"] == "relu_bias" else t


def _act():
    return "relu" if _LAYER["name"] == "relu_bias" else None


def _bias(b):
    return b if _LAYER["name"] == "relu_bias" else None


def _add_bias(t, b):
    return t + b if _LAYER["name"] == "relu_bias" else t


def own_providers(c, compile_ref=True):
    """name -> f(x, W, b, s) returning y [B, N] (route own)."""
    M, B, N = c["M"], c["B"], c["N"]

    def ours(x, w, b, s):
        return saml_kernels.mbranch_linear(x, w, _bias(b), s, route="own", activation=_act())

    def eager_where(x, w, b, s):
        out = x.new_zeros(B, N)
        for m in range(M):
            out = torch.where((s == m).unsqueeze(1), _relu(_add_bias(x @ w[m], b[m])), out)
        return out

    def masked_loop(x, w, b, s):
        out = x.new_zeros(B, N)
        for m in range(M):
            rows = s == m
            out = out.index_put((rows,), _relu(_add_bias(x[rows] @ w[m], b[m])))
        return out

    def _sorted(s):
        order = torch.argsort(s, stable=True)
        counts = torch.bincount(s, minlength=M)
        return order, counts

    def sort_segment(x, w, b, s):
        order, counts = _sorted(s)
        parts = x.index_select(0, order).split(counts.tolist())
        ys = torch.cat([_relu(_add_bias(p @ w[m], b[m])) for m, p in enumerate(parts)])
        return ys.new_zeros(B, N).index_copy(0, order, ys)

    def grouped_mm(x, w, b, s):
        order, counts = _sorted(s)
        offs = counts.cumsum(0).to(torch.int32)
        ys = torch._grouped_mm(x.index_select(0, order), w, offs=offs)
        ys = _relu(_add_bias(ys, b.index_select(0, s.index_select(0, order))))
        return ys.new_zeros(B, N).index_copy(0, order, ys)

    provs = dict(ours=ours, eager_where=eager_where, masked_loop=masked_loop, sort_segment=sort_segment,
                 grouped_mm=grouped_mm)
    if compile_ref:
        provs["compile_ref"] = torch.compile(
            lambda x, w, b, s: mbranch_linear_reference(x, w, _bias(b), s, route="own", activation=_act()))
    return provs


def all_providers(c, compile_ref=True):
    """name -> f(x, W, b, s) returning y [M, B, N] (route all, grad_mask own)."""
    M, B = c["M"], c["B"]

    def ours(x, w, b, s):
        return saml_kernels.mbranch_linear(x, w, b, s, route="all", grad_mask="own", activation="relu")

    def eager_ref(x, w, b, s):
        return mbranch_linear_reference(x, w, b, s, route="all", grad_mask="own", activation="relu")

    def _mask(s):
        return (torch.arange(M, device=s.device).view(M, 1) == s.view(1, B)).unsqueeze(-1)

    def eager_loop(x, w, b, s):
        y = torch.stack([_relu(_add_bias(x @ w[m], b[m])) for m in range(M)])
        return torch.where(_mask(s), y, y.detach())

    def grouped_mm(x, w, b, s):
        y = _relu(torch._grouped_mm(x.unsqueeze(0).expand(M, -1, -1), w) + b.unsqueeze(1))
        return torch.where(_mask(s), y, y.detach())

    provs = dict(ours=ours, eager_ref=eager_ref, eager_loop=eager_loop, grouped_mm=grouped_mm)
    if compile_ref:
        provs["compile_ref"] = torch.compile(eager_ref)
    return provs


def plain_provider(c, route):
    """One plain matmul of the route's shape class: the rate ceiling measured in the same run."""
    M, K, N = c["M"], c["K"], c["N"]
    w = c["weight"][0] if route == "own" else c["weight"].permute(1, 0, 2).reshape(K, M * N).contiguous()
    w = w.detach().clone()
    return (lambda x, _w, _b, _s: x @ w), w


# ------------------------------------------------------------------------------------------------ measuring

def as_callable(f, c, mode, extra_leaves=()):
    """A zero-argument call of provider ``f``: forward only (no autograd) or forward + backward."""
    if mode == "fwd":
        x, w, b, s = c["x"], c["weight"], c["bias"], c["scenario"]

        def run():
            with torch.no_grad():
                return f(x, w, b, s)
        return run
    x = c["x"].detach().clone().requires_grad_()
    w = c["weight"].detach().clone().requires_grad_()
    b = c["bias"].detach().clone().requires_grad_()
    s = c["scenario"]
    leaves = [x, w, b, *extra_leaves]
    gy = {}

    def run():
        for t in leaves:
            t.grad = None
        y = f(x, w, b, s)
        if y.shape not in gy:
            gy[y.shape] = torch.randn(y.shape, device=y.device, dtype=y.dtype)
        y.backward(gy[y.shape])
    return run


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_peak(fn, period_s=0.0002):
    """Peak extra resident bytes during one call of fn (see the module docstring)."""
    fn()  # warm: caches, lazy init
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(period_s)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    stop.set()
    t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return peak[0] - base


def useful_flops(c, route, mode):
    M, B, K, N = c["M"], c["B"], c["K"], c["N"]
    if route == "own":
        return 2 * B * K * N * (1 if mode == "fwd" else 3)
    return 2 * M * B * K * N + (0 if mode == "fwd" else 4 * B * K * N)


def plain_flops(c, route, mode):
    M, B, K, N = c["M"], c["B"], c["K"], c["N"]
    width = N if route == "own" else M * N
    return 2 * B * K * width * (1 if mode == "fwd" else 3)


def bench_one(c, route, mode, reps, device, compile_ref, mem):
    provs = own_providers(c, compile_ref) if route == "own" else all_providers(c, compile_ref)
    plain_f, plain_w = plain_provider(c, route)
    calls, skipped = {}, {}
    for name, f in provs.items():
        fn = as_callable(f, c, mode)
        try:
            fn()
            calls[name] = fn
        except Exception as exc:  # e.g. torch._grouped_mm without a backward on this device
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    plain_w.requires_grad_(mode != "fwd")
    calls["plain"] = as_callable(plain_f, c, mode, extra_leaves=(plain_w,))
    res = time_alternating(calls, reps=reps, warmup=2, device=device)
    med = res["medians_ms"]
    plain_rate = plain_flops(c, route, mode) / (med["plain"] * 1e-3) / 1e9
    rows, data = [], {"skipped": skipped, "plain_gflops": plain_rate, "providers": {}}
    times = res["times_ms"]
    spread = sorted(p / o for p, o in zip(times["plain"], times["ours"])) if "ours" in times else []
    if spread:
        q = lambda f: 100 * spread[min(len(spread) - 1, int(f * len(spread)))]  # noqa: E731
        data["ours_pct_plain_rounds"] = dict(median=100 * statistics.median(spread), q25=q(0.25), q75=q(0.75),
                                             rounds=len(spread))
    for name in calls:
        if name == "plain":
            rate = plain_rate
        else:
            rate = useful_flops(c, route, mode) / (med[name] * 1e-3) / 1e9
        pk = None
        if mem and name != "compile_ref":
            pk = peak_memory(calls[name], device) if device == "cuda" else cpu_peak(calls[name])
        speedup = res["ratios"][(name, "ours")] if name != "ours" else 1.0
        data["providers"][name] = dict(ms=med[name], gflops=rate, pct_plain=100 * rate / plain_rate,
                                       ours_speedup=speedup, peak_bytes=pk)
        pct = f"{100 * rate / plain_rate:.0f}%"
        if name == "ours" and spread:
            r = data["ours_pct_plain_rounds"]
            pct += f" (rounds {r['median']:.0f}% [{r['q25']:.0f}, {r['q75']:.0f}])"
        rows.append([name, med[name], rate, pct, f"{speedup:.2f}x",
                     "-" if pk is None else f"{pk / 2**20:.1f}"])
    for name, why in skipped.items():
        rows.append([name, "n/a", "n/a", "n/a", "n/a", why])
    return rows, data


def phase_breakdown(c, reps, device):
    """ms of the route-own kernels per phase and their ratio to one plain GEMM (see the module docstring)."""
    x, w, s = c["x"], c["weight"], c["scenario"]
    b, act = _bias(c["bias"]), 1 if _act() == "relu" else 0
    ops = torch.ops.saml_C
    y, _ = ops.mbl_grouped_forward(x, w, b, None, None, s, act)
    dy = torch.randn_like(y)
    w0 = w[0].contiguous()

    def bwd(dx, dw, db):
        return lambda: ops.mbl_grouped_backward_act(dy, y if act else y.new_empty(0), x, w, None, None, s, act,
                                                    dx, dw, db, False, False)
    calls = {"forward": lambda: ops.mbl_grouped_forward(x, w, b, None, None, s, act),
             "backward dx": bwd(True, False, False), "backward dW": bwd(False, True, False)}
    if b is not None:
        calls["backward db"] = bwd(False, False, True)
    calls.update({"backward all": bwd(True, True, b is not None), "plain GEMM": lambda: torch.mm(x, w0)})
    res = time_alternating(calls, reps=reps, warmup=2, device=device)
    return {n: dict(ms=res["medians_ms"][n], x_plain_gemm=res["ratios"].get((n, "plain GEMM"), 1.0))
            for n in calls}


def parser():
    ap = make_parser(__doc__.split("\n")[0], gpu_help="CUDA, M=4 B=16384 K=N=512 bf16",
                     quick_help="smoke run: small sizes, few reps, no compile, no memory (to a temporary folder)")
    ap.add_argument("--no-mem", action="store_true")
    ap.add_argument("--routes", default="own,all")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--mixes", default="uniform,skewed")
    ap.add_argument("--layers", default="relu_bias,linear",
                    help="relu_bias (every route) and/or linear (no bias, no activation; route own only)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    budget = TimeBudget(args.budget_s)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu:
        M, B, K, N, dtype = 4, 16384, 512, 512, torch.bfloat16
    else:
        M, B, K, N, dtype = 4, 4096, 256, 256, torch.float32
    if args.quick:
        B, K, N = B // 8, K // 4, N // 4
    reps = args.reps or (3 if args.quick else 25)
    compile_ref = not (args.no_compile or args.quick)
    mem = not (args.no_mem or args.quick)
    header = ["provider", "median ms", "useful GFLOP/s", "% of plain matmul", "ours speed-up", "peak extra MiB"]
    body, data = [], {"shape": dict(M=M, B=B, K=K, N=N, dtype=str(dtype), device=device), "results": {}}
    plot = {}
    configs = [(layer, route) for layer in args.layers.split(",") for route in args.routes.split(",")
               if layer == "relu_bias" or route == "own"]
    for layer, route in configs:
        _LAYER["name"] = layer
        for mode in args.modes.split(","):
            for mix in args.mixes.split(","):
                if not budget.allows(f"{layer} route={route} {mode} {mix}"):
                    continue
                c = make_case(M, B, K, N, dtype, device, mix)
                torch._dynamo.reset()
                # linear is about the ratio to the plain matmul: no compile_ref, no memory sampling (keeps the run short)
                full = layer == "relu_bias"
                rows, d = bench_one(c, route, mode, reps, device, compile_ref and full, mem and full)
                key = f"{layer} route={route}{' grad_mask=own' if route == 'all' else ''} {mode} {mix}"
                phases = ""
                if route == "own" and mode == "fwdbwd" and device == "cpu":
                    d["phases"] = phase_breakdown(c, reps, device)
                    phases = ("\nphases of ours (kernels called directly; x plain GEMM = median per-round time ratio "
                              "to one plain [B,K]x[K,N] GEMM):\n\n"
                              + markdown_table(["phase", "median ms", "x plain GEMM"],
                                               [[n, v["ms"], f"{v['x_plain_gemm']:.2f}"]
                                                for n, v in d["phases"].items()]) + "\n")
                data["results"][key] = d
                plot[key] = {n: v["gflops"] for n, v in d["providers"].items()}
                body.append(f"## {key}\n\nplain matmul rate: {d['plain_gflops']:.1f} GFLOP/s\n\n"
                            + markdown_table(header, rows) + "\n" + phases)
                print(body[-1], flush=True)
    stem = result_stem("bench_branch_gemm", args)
    title = f"M-branch GEMM, M={M} B={B} K={K} N={N} {dtype} on {device} (unsorted rows)"
    paths = write_results(stem, title, "\n".join(body) + budget.note(), data,
                          plot={"groups": plot, "ylabel": "useful GFLOP/s"}, out_dir=args.out_dir)
    print(paths)


if __name__ == "__main__":
    main()
