#!/usr/bin/env python3
"""Small-batch latency: one SAML training step, and exported inference, against the plain-PyTorch twin.

Cases (the default ``SAMLConfig`` of ``SAMLConfig.from_data`` on the synthetic data: 6 sparse features, a
behaviour sequence of 20, 4 scenarios, D = 16, hidden (256, 128), mutual unit at the first layer; float32, CPU):

- ``train B``: one training step (forward, loss, backward with the fused row-wise Adagrad, Adam on the dense
  parameters) of ``SAML`` and of its twin ``SAMLReference`` (same weights, same batch), B = 64, 256, 4096;
- ``export B``: inference of the program ``serving.export_saml`` wrote and ``serving.load_exported`` read back
  (the input contract's checks included), of the same model's eager forward, of the eager forward with every
  value check off (the embedding layers' ``bounds_check="off"`` and the scenario / length checks patched out:
  the floor of what checks cost), and of the twin's eager forward; ``torch.no_grad()``, ``eval()``, B = 1, 16,
  256.

Reported per case: median ms and the speed-up over the twin (median of the per-round ratios). ``--before DIR``
compares two source trees side by side: a worker process per tree (``DIR``, e.g. a ``git worktree`` of main with
its compiled extension copied in, and this tree) builds the same models once; the driver then lets them time one
round each in turn (one process runs at a time), ``--rounds`` rounds, and takes medians over the rounds, so a
burst of load on a shared machine hits both. The table gives before, after and after / before.

    python benchmarks/bench_step_latency.py [--before DIR] [--rounds N] [--threads T] [--quick] [--out-dir DIR]

Results: ``benchmarks/results/step_latency_<machine>.md`` / ``.json`` (``--quick``: a temporary folder).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_B = (64, 256, 4096)
EXPORT_B = (1, 16, 256)
LR, EMB_LR = 1e-3, 0.05


# ------------------------------------------------------------------------------------------------ worker

def _checks_off(model):
    """A context factory with every value check of ``model``'s eager forward off (the floor of what checks cost): the
    embedding layers' bounds_check "off", the scenario-range / flag / length checks replaced by no-ops. Only for
    timing good inputs: bad ones would be read out of bounds."""
    import contextlib

    from saml_kernels.nn import attention as att
    from saml_kernels.ops import _checks

    @contextlib.contextmanager
    def ctx():
        saved = []

        def patch(obj, name, value):
            if hasattr(obj, name):
                saved.append((obj, name, getattr(obj, name)))
                setattr(obj, name, value)

        for m in model.modules():
            if hasattr(m, "bounds_check"):
                patch(m, "bounds_check", "off")
        patch(_checks, "scenario_range", lambda op, s, n: s)
        patch(_checks, "check_value", lambda *a, **k: False)
        patch(att, "check_seq_lengths", lambda who, lengths, B, L: lengths)
        try:
            yield
        finally:
            for obj, name, value in reversed(saved):
                setattr(obj, name, value)
    return ctx


def _worker(args) -> None:
    """Builds every case once, then times one round per line read from stdin ("round"), answering one JSON line
    {case: {provider: [ms, ...]}}; "quit" ends it."""
    import numpy as np
    import torch

    from saml_kernels import serving  # (--threads: set by the parser)
    from saml_kernels.data import make_synthetic
    from saml_kernels.nn import SAML, SAMLConfig, TrainingOptimizer
    from saml_kernels.reference import SAMLReference

    torch.manual_seed(0)
    data = make_synthetic(max(max(TRAIN_B), max(EXPORT_B)) + 64, seed=0)
    cfg = SAMLConfig.from_data(data)
    cases = {}  # name -> {provider: callable}
    for B in args.train:
        torch.manual_seed(0)
        ours = SAML(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=EMB_LR)
        twin = SAMLReference(cfg, embedding_optimizer="rowwise_adagrad")
        twin.load_state_dict(ours.state_dict())
        batch = data.batch(np.arange(B))
        provs = {}
        for name, m in (("ours", ours), ("twin", twin)):
            opt = TrainingOptimizer(m, LR, EMB_LR)

            def step(m=m, opt=opt, batch=batch):
                opt.zero_grad()
                m.loss(batch).backward()
                opt.step()

            provs[name] = step
        cases[f"train {B}"] = provs
    if args.export:
        torch.manual_seed(0)
        model = SAML(cfg, embedding_optimizer="rowwise_adagrad").eval()
        twin = SAMLReference(cfg, embedding_optimizer="rowwise_adagrad").eval()
        twin.load_state_dict(model.state_dict())
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "saml.pt2")
            serving.export_saml(model, data.batch(np.arange(16)), path)
            served = serving.load_exported(path)
        print(f"export + load: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        off = _checks_off(model)
        for B in args.export:
            inputs = data.batch(np.arange(B)).inputs()

            def run(fn, inputs=inputs):
                with torch.no_grad():
                    fn(*inputs)

            def unchecked(inputs=inputs):
                with off(), torch.no_grad():
                    model(*inputs)

            cases[f"export {B}"] = {"exported": lambda run=run: run(served), "eager": lambda run=run: run(model),
                                    "eager checks off": unchecked, "twin": lambda run=run: run(twin)}
    reps = {name: (args.reps_large if int(name.split()[1]) >= 4096 else args.reps) for name in cases}
    for provs in cases.values():  # warm-up (first calls build caches)
        for _ in range(3):
            for fn in provs.values():
                fn()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        out = {}
        for name, provs in cases.items():
            times = {p: [] for p in provs}
            names = list(provs)
            for k in range(reps[name]):
                for p in names[k % len(names):] + names[:k % len(names)]:  # alternate, rotating who goes first
                    t = time.perf_counter()
                    provs[p]()
                    times[p].append((time.perf_counter() - t) * 1e3)
            out[name] = times
        print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------ driver

def _start(tree: str, args) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(HERE, "bench_step_latency.py"), "--worker", "--reps", str(args.reps),
           "--reps-large", str(args.reps_large), "--train", *map(str, args.train), "--export", *map(str, args.export)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return p


def _wait_ready(p: subprocess.Popen, tree: str) -> None:
    line = p.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"bench_step_latency: the worker of {tree} did not start (got {line!r})")


def _round(p: subprocess.Popen) -> dict:
    p.stdin.write("round\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def _summary(rounds: list) -> dict:
    """{case: {provider: median ms over every call of every round, "speedup": median per-call twin / ours}}."""
    out = {}
    for case in rounds[0]:
        ms = {p: [t for r in rounds for t in r[case][p]] for p in rounds[0][case]}
        s = {p: statistics.median(v) for p, v in ms.items()}
        ours = "ours" if "ours" in ms else "exported"
        s["speedup"] = statistics.median(t / o for t, o in zip(ms["twin"], ms[ours]))
        if "eager checks off" in ms:
            s["exported / checks off"] = statistics.median(e / f for e, f in zip(ms["exported"],
                                                                                    ms["eager checks off"]))
        out[case] = s
    return out


def _commit(tree: str) -> str:
    """The tree's git commit (with "+changes" when its tracked files differ from it), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=tree).returncode != 0
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def parser():
    """The benchmark's arguments: ``harness.make_parser``'s common flags and ``--before`` / ``--rounds``."""
    sys.path.insert(0, HERE)
    from harness import make_parser

    p = make_parser(__doc__.split("\n")[0], gpu_help="accepted for gpu_check.sh; this benchmark is CPU-only and "
                    "does nothing with it")
    p.add_argument("--before", help="source tree to compare against (a checkout with its compiled extension)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per tree (default 5)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reps-large", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--train", type=int, nargs="*", default=list(TRAIN_B), help=argparse.SUPPRESS)
    p.add_argument("--export", type=int, nargs="*", default=list(EXPORT_B), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.reps is None:
        args.reps = 4 if args.quick else 10
    if args.reps_large is None:
        args.reps_large = 1 if args.quick else 3
    if args.worker:
        _worker(args)
        return {}
    if args.gpu:
        print("bench_step_latency: a CPU benchmark (small-batch latency on the CPU); nothing to run with --gpu")
        return {}
    rounds = 2 if args.quick else args.rounds
    here = os.path.dirname(HERE)
    trees = {"after": here} if not args.before else {"before": os.path.abspath(args.before), "after": here}
    t0 = time.perf_counter()
    loads = [_load()]
    workers = {k: _start(tree, args) for k, tree in trees.items()}
    try:
        for k, w in workers.items():
            _wait_ready(w, trees[k])
        print(f"workers ready after {time.perf_counter() - t0:.0f} s (load {_load()})", flush=True)
        results = {k: [] for k in trees}
        for r in range(rounds):
            for k in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                results[k].append(_round(workers[k]))
            loads.append(_load())
    finally:
        for w in workers.values():
            if w.poll() is None:
                w.stdin.write("quit\n")
                w.stdin.flush()
                w.wait(timeout=60)
    summ = {k: _summary(v) for k, v in results.items()}
    wall = time.perf_counter() - t0
    commits = {k: _commit(tree) for k, tree in trees.items()}
    body, table = _report(summ, rounds, loads, args, wall)
    body = "Trees: " + "; ".join(f"{k} = {trees[k]} at {commits[k]}" for k in trees) + ".\n\n" + body
    print(table)
    sys.path.insert(0, HERE)
    from harness import machine_tag, write_results

    stem = f"step_latency_{machine_tag()}"
    paths = write_results(stem, "Small-batch latency: SAML training step and exported inference vs the twin", body,
                          {"summary": summ, "raw": results, "trees": trees, "commits": commits, "rounds": rounds, "load": loads,
                           "threads": args.threads or "default", "wall_s": wall}, out_dir=args.out_dir)
    print("wrote", paths["md"])
    return summ


def _report(summ: dict, rounds: int, loads: list, args, wall: float) -> tuple:
    side = "before" in summ
    cases = list(summ["after"])
    hdr = ["case", "provider"] + (["before ms", "after ms", "after / before"] if side else ["ms"])
    rows = []
    for case in cases:
        for prov in summ["after"][case]:
            if prov in ("speedup", "exported / checks off"):
                continue
            a = summ["after"][case][prov]
            rows.append([case, prov] + ([summ["before"][case][prov], a, a / summ["before"][case][prov]] if side
                                        else [a]))
        for stat in ("speedup", "exported / checks off"):
            if stat in summ["after"][case]:
                a = summ["after"][case][stat]
                name = "speed-up over twin" if stat == "speedup" else stat
                rows.append([case, name] + ([summ["before"][case][stat], a, ""] if side else [a]))
    sys.path.insert(0, HERE)
    from harness import markdown_table

    table = markdown_table(hdr, rows)
    text = (f"Median ms per call ({rounds} rounds per tree, timed alternately"
            + (", before and after in turn" if side else "") + f"; torch threads: {args.threads or 'default'}; "
            f"wall {wall:.0f} s). Load average (1/5/15 min) before and after each round: {'; '.join(loads)}.\n\n"
            "\"speed-up over twin\": median per-call ratio twin / ours (training: SAMLReference's step over SAML's; "
            "export: the twin's eager forward over the exported program). \"exported / checks off\": the exported "
            "program over the same model's eager forward with every value check off.\n\n" + table + "\n")
    return text, table


if __name__ == "__main__":
    main()
