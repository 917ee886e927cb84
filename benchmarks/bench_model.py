#!/usr/bin/env python3
"""Model benchmark: one training step (forward, backward, optimizer) of SAML, STAR and HMoE — ours vs the
plain-PyTorch twins.

Providers per model (same initial weights, same batch, timed alternately with benchmarks/harness.py):
- ours (``SAML`` / ``STAR`` / ``HMoE`` of ``saml_kernels.nn``) on the package's kernels, row-wise Adagrad on the
  tables fused in the embedding backward, Adam on the dense parameters;
- ``reference eager``: the twin (``SAMLReference`` / ``STARReference`` / ``HMoEReference``: scenario loops +
  torch.where, dense table gradients), the same row-wise Adagrad after the backward (``TrainingOptimizer``) and Adam;
- ``reference compiled``: the same with ``torch.compile`` of the reference's forward + loss (backward through
  AOT autograd; the optimizer step stays eager, as in a typical training loop);
- ``SAML CUDA graph`` (``--gpu``): the SAML step captured once in a CUDA graph (``saml_kernels.graphs.
  CapturedTrainingStep``, capture-safe checks, capturable Adam) and replayed: no launch overhead, no host sync.

Work (``--data synthetic``, the default): B = 4096 on the synthetic features (6 sparse features, 2 scenario-aware,
a behaviour sequence of 20, 4 scenarios with the 40/30/20/10 mix), float32 (``--gpu``: float32 and bfloat16 on
CUDA), the default configs:
``SAMLConfig`` (D = 16, attention d = 16, aux and branch hidden (256, 128), mutual unit at the first hidden layer),
``STARConfig`` (partitioned norm, star layers (256, 128), auxiliary network on the indicator and the features),
``HMoEConfig`` (4 experts of (256,), a gate per scenario over them, towers of 128, a score gate per scenario).
``--data movielens``: B = 4096 rows drawn at random (seed 0) from the MovieLens-100K training split (``saml_kernels.data.movielens``: 7 sparse features with a genre bag and the scenario id, user and item
scenario-aware, the behaviour sequence of 20 earlier items, 3 age scenarios, dense age), the same default configs;
results go to ``..._movielens``.
Reported: median step time, samples/s, speed-up (median of per-round ratios), peak memory of one step.
Targets on the 2-core CPU: >= 2x the eager reference and >= 1.3x the compiled reference.

    python benchmarks/bench_model.py [--model saml|star|hmoe ...] [--data synthetic|movielens] [--quick] [--gpu]
                                     [--reps N] [--no-compile] [--batch B [B ...]] [--out-dir DIR]

``--model`` (default: all three) picks the models. Results go to one file per machine, ``bench_model_<machine>``
(``harness.result_stem``: ``_movielens``, ``_t<threads>``, ``_quick`` appended as they apply; ``--quick`` writes to
a temporary folder unless ``--out-dir`` is given), holding the models of that run: the current file is written by
the default run of all three.

``--gpu`` runs B = 4096 in float32 and bfloat16 and B = 65536 in float32 (the large batch without torch.compile).
"""
from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from harness import (TimeBudget, make_parser, markdown_table, peak_memory, result_stem, time_alternating,  # noqa: E402
                     write_results)

from saml_kernels.data import load_movielens, make_synthetic  # noqa: E402
from saml_kernels.nn import HMoE, HMoEConfig, SAML, SAMLConfig, STAR, STARConfig, TrainingOptimizer  # noqa: E402
from saml_kernels.reference import HMoEReference, SAMLReference, STARReference  # noqa: E402
from saml_kernels.training import bce_loss, saml_loss  # noqa: E402

LR, EMB_LR = 1e-3, 0.05

# name -> (ours, twin, config from data, loss from (model outputs, label, config))
MODELS = {
    "SAML": (SAML, SAMLReference, SAMLConfig.from_data, lambda out, y, c: saml_loss(*out, y, c.aux_loss_weight)),
    "STAR": (STAR, STARReference, STARConfig.from_data, lambda out, y, c: bce_loss(out, y)),
    "HMoE": (HMoE, HMoEReference, HMoEConfig.from_data, lambda out, y, c: bce_loss(out, y)),
}


def bench_data(kind: str, batch: int, seed: int = 0):
    """(data, rows of the timed batch): synthetic data of ``batch`` samples, or ``batch`` random rows of the
    MovieLens-100K training split (fetched into the cache if needed; sampled with replacement beyond its size)."""
    if kind == "synthetic":
        return make_synthetic(max(batch, 1), seed=seed), np.arange(batch)
    train = load_movielens(fetch=True).train
    rng = np.random.default_rng(seed)
    return train, rng.choice(len(train), size=batch, replace=batch > len(train))


def build(batch: int, device: str, dtype, compile_ref: bool, seed: int = 0, graph: bool = False, model: str = "SAML",
          data_kind: str = "synthetic"):
    ours_cls, ref_cls, make_cfg, loss_of = MODELS[model]
    data, rows = bench_data(data_kind, batch, seed)
    cfg = make_cfg(data)
    b = data.batch(rows).to(device)
    if b.dense is not None:
        b.dense = b.dense.to(dtype)
    torch.manual_seed(seed)
    ours = ours_cls(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=EMB_LR, device=device, dtype=dtype)
    ref = ref_cls(cfg, embedding_optimizer="rowwise_adagrad", device=device, dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    models = {model: ours, "reference eager": ref}
    if compile_ref:
        refc = ref_cls(cfg, embedding_optimizer="rowwise_adagrad", device=device, dtype=dtype)
        refc.load_state_dict(ours.state_dict())
        models["reference compiled"] = refc
    steps = {}
    for name, m in models.items():
        opt = TrainingOptimizer(m, LR, EMB_LR)
        fwd = m.loss
        if name == "reference compiled":
            cf = torch.compile(lambda *inp, m=m: loss_of(m(*inp[:-1]), inp[-1], cfg))
            fwd = lambda bb, cf=cf: cf(*bb.inputs(), bb.label)  # noqa: E731

        def step(opt=opt, fwd=fwd):
            opt.zero_grad()
            loss = fwd(b)
            loss.backward()
            opt.step()
            return loss

        steps[name] = step
    if graph and model == "SAML":  # the same SAML step, captured once and replayed
        from saml_kernels.graphs import CapturedTrainingStep

        g = SAML(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=EMB_LR, device=device, dtype=dtype)
        g.load_state_dict(ours.state_dict())
        models["SAML CUDA graph"] = g
        given = [i for i, t in enumerate(b.inputs()) if t is not None]  # the graph takes tensors only
        inputs = [b.inputs()[i] for i in given] + [b.label]

        def loss_fn(model, *t):
            full = [None] * len(b.inputs())
            for k, i in enumerate(given):
                full[i] = t[k]
            return saml_loss(*model(*full), t[-1], cfg.aux_loss_weight)

        captured = CapturedTrainingStep(g, TrainingOptimizer(g, LR, EMB_LR, capturable=True), inputs, loss_fn)
        steps["SAML CUDA graph"] = lambda captured=captured, inputs=inputs: captured(*inputs)
    return cfg, b, models, steps


def run(device: str, dtype, reps: int, batch: int, compile_ref: bool, model: str = "SAML",
        data_kind: str = "synthetic") -> dict:
    t0 = time.perf_counter()
    cfg, b, models, steps = build(batch, device, dtype, compile_ref, graph=device == "cuda", model=model,
                                  data_kind=data_kind)
    # first calls: warm-up (and the compile) outside the timed region; peak memory of one step, ours first
    mem = {}
    for name, fn in steps.items():
        t = time.perf_counter()
        fn()
        if name == "reference compiled":
            print(f"  torch.compile warm-up: {time.perf_counter() - t:.1f} s", flush=True)
    for name, fn in steps.items():
        mem[name] = peak_memory(fn, device)
    res = time_alternating(steps, reps=reps, warmup=1, device=device)
    med = res["medians_ms"]
    out = {"model": model, "data": data_kind, "dtype": str(dtype).replace("torch.", ""), "device": device, "batch": batch,
           "medians_ms": med, "samples_per_s": {k: batch / (v / 1e3) for k, v in med.items()},
           "speedup": {k: res["ratios"][(k, model)] for k in med if k != model},
           "peak_memory_bytes": mem, "params": sum(p.numel() for p in models[model].parameters()),
           "wall_s": time.perf_counter() - t0}
    return out


def star_linear_overhead(reps: int, batch: int = 4096) -> dict:
    """The cost of materialising W_eff = W_m * W_shared in autograd: StarLinear vs a MultiBranchLinear (route "own")
    of the same shape (the GEMMs alone), forward + backward, B x 256 -> 128, M = 4, float32."""
    from saml_kernels.nn import MultiBranchLinear, StarLinear

    torch.manual_seed(0)
    K, N, M = 256, 128, 4
    x = torch.randn(batch, K, requires_grad=True)
    s = torch.randint(0, M, (batch,))
    star = StarLinear(K, N, M, activation="relu")
    plain = MultiBranchLinear(K, N, M, activation="relu", route="own")
    g = torch.randn(batch, N)

    def run(layer):
        def fn():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x, s).backward(g)
        return fn

    res = time_alternating({"StarLinear": run(star), "MultiBranchLinear": run(plain)}, reps=reps, warmup=2)
    return {"batch": batch, "K": K, "N": N, "M": M, "medians_ms": res["medians_ms"],
            "ratio_star_to_plain": res["ratios"][("StarLinear", "MultiBranchLinear")]}


def parser():
    p = make_parser("SAML / STAR / HMoE training-step benchmark", gpu_help="run on CUDA in float32 and bfloat16",
                    quick_help="few repetitions, no torch.compile (a smoke check, to a temporary folder)")
    p.add_argument("--model", nargs="+", choices=[m.lower() for m in MODELS], default=[m.lower() for m in MODELS],
                   help="models to time (default all: the results file holds the models of the run)")
    p.add_argument("--data", choices=("synthetic", "movielens"), default="synthetic",
                   help="the batch: synthetic features (default) or rows of MovieLens-100K")
    p.add_argument("--star-linear-overhead", action="store_true",
                   help="only time StarLinear against MultiBranchLinear of the same shape (the W_m * W_shared cost)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 4096; --gpu: 4096 "
                   "in float32 and bfloat16, then 65536 in float32 without torch.compile)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    budget = TimeBudget(args.budget_s)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("bench_model.py --gpu: CUDA is not available")
    reps = args.reps or (3 if args.quick else 10)
    if args.star_linear_overhead:
        r = star_linear_overhead(reps * 3)
        print(f"StarLinear vs MultiBranchLinear (B={r['batch']}, {r['K']} -> {r['N']}, M={r['M']}, fwd+bwd): "
              f"{r['medians_ms']} ms, ratio {r['ratio_star_to_plain']:.3f}")
        return [r]
    compile_ref = not (args.quick or args.no_compile)
    if args.batch:
        plan = [(B, torch.float32, compile_ref) for B in args.batch]
    elif args.gpu:
        plan = [(4096, torch.float32, compile_ref), (4096, torch.bfloat16, compile_ref), (65536, torch.float32, False)]
    else:
        plan = [(4096, torch.float32, compile_ref)]
    names = [next(k for k in MODELS if k.lower() == m) for m in dict.fromkeys(args.model)]
    results = []
    for model in names:
        for batch, dt, comp in plan:
            if not budget.allows(f"{model} {dt} B={batch}"):
                continue
            print(f"bench_model: {model} {args.data} {device} {dt} B={batch} reps={reps} compile={comp}", flush=True)
            results.append(run(device, dt, reps, batch, comp, model, args.data))
    rows = []
    for r in results:
        for k, ms in r["medians_ms"].items():
            sp = r["speedup"].get(k)
            mem = r["peak_memory_bytes"].get(k)
            rows.append([r["model"], r["dtype"], r["batch"], k, ms, f"{r['samples_per_s'][k]:,.0f}",
                         "1.00x (ours)" if sp is None else f"{sp:.2f}x", "n/a" if mem is None else f"{mem / 2**20:.1f}"])
    body = markdown_table(["model", "dtype", "B", "provider", "step ms (median)", "samples/s", "our speed-up vs it",
                           "peak extra memory MiB"], rows) + budget.note()
    params = ", ".join(f"{r['model']} {r['params']:,}" for r in results if r["batch"] == results[0]["batch"])
    body += (("\n\nData: B rows drawn at random from the MovieLens-100K training split." if args.data == "movielens"
              else "") + "\n\nOne training step = forward + backward + optimizer (Adam on dense parameters, row-wise Adagrad on "
             f"the tables, fused into the embedding backward for ours). Default configs (parameters: {params}). "
             "Speed-up = median over alternating rounds of t(provider) / t(ours). Targets (2-core CPU): >= 2x eager, "
             ">= 1.3x compiled. CPU peak memory is the growth of the process RSS high-water mark over one step "
             "(providers measured in the order listed; later providers only show growth beyond earlier peaks). "
             f"Load average when the run ended: {', '.join(f'{v:.1f}' for v in os.getloadavg())}.")
    print(body)
    stem = result_stem("bench_model", args, "movielens" if args.data == "movielens" else "")
    plot = {"groups": {f"{r['model']} {r['dtype']} B={r['batch']}": {
        ("ours" if k == r["model"] else k): v for k, v in r["samples_per_s"].items()} for r in results},
        "ylabel": "samples/s"}
    title = (("MovieLens-100K: " if args.data == "movielens" else "")
             + f"{' / '.join(names)} training step: ours vs the plain-PyTorch twins (eager, torch.compile)")
    paths = write_results(stem, title, body, {"results": results}, plot=plot, out_dir=args.out_dir)
    print("wrote", ", ".join(paths.values()))
    return results


if __name__ == "__main__":
    main()
