#!/usr/bin/env python3
"""The main job: train SAML, STAR, HMoE and a shared-bottom baseline on the same multi-scenario CTR data.

    python python/train_saml.py                       # synthetic data, CPU, about a minute on 2 cores
    python python/train_saml.py --data ali_ccp [--path FILE.csv] [--val-path FILE.csv]
        (default: the real Ali-CCP sample rows shipped in data/ali_ccp/, train and validation files)

Steps: build data (held-out split, or --val-path), train SAML, STAR, HMoE (the package's models,
``saml_kernels.nn``) and the shared-bottom baseline on the same batches with the same optimizer (Adam on the
dense parameters, row-wise Adagrad fused into the embedding backward), evaluate overall and per-scenario AUC on
the held-out data, time training throughput (samples/s) of SAML and of the plain-PyTorch ``SAMLReference``
(same weights, same batches, timed alternately), write ``<out>/<name>/summary.json`` and ``<out>/<name>/report.png``
and print one table (AUCs, parameters, train time, training samples/s per model) and where the files went. ``--out`` defaults to ``./saml_run`` under the *current* directory (never the package or source
tree unless asked), so ``make run`` from the repository root writes to ``./saml_run/``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import saml_kernels  # noqa: E402
from saml_kernels import data as sdata  # noqa: E402
from saml_kernels.nn import (HMoE, HMoEConfig, SAML, SAMLConfig, STAR, STARConfig, SharedBottom,  # noqa: E402
                             TrainingOptimizer)
from saml_kernels.reference import SAMLReference  # noqa: E402


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney U) formula, ties counted half; NaN when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank of each run of tied scores (1-based)
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("synthetic", "ali_ccp"), default="synthetic")
    p.add_argument("--path", help="Ali-CCP CSV (training file) for --data ali_ccp (default: the sample rows in "
                   "data/ali_ccp/)")
    p.add_argument("--val-path", help="Ali-CCP CSV held-out file (default: the shipped validation rows with the "
                   "default --path, else a split of --path)")
    p.add_argument("--samples", type=int, default=80_000, help="synthetic samples (train + held-out)")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction when there is no --val-path")
    p.add_argument("--backend", default=None, help="force a backend for every op (reference|cpu|triton|cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate of the dense parameters")
    p.add_argument("--embedding-lr", type=float, default=0.05, help="row-wise Adagrad learning rate of the embedding tables")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 64], help="aux and branch hidden sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--throughput-steps", type=int, default=6, help="timed steps per model for samples/s")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="saml_run",
                   help="output folder, relative to the current directory (a sub-folder per run; default ./saml_run)")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm bar")
    return p.parse_args(argv)


def load_data(args):
    if args.data == "synthetic":
        full = sdata.make_synthetic(args.samples, seed=args.seed)
        train, held = full.split(args.holdout, seed=args.seed)
        return train, held, f"synthetic ({args.samples} samples, seed {args.seed})"
    if not args.path:  # the real sample rows shipped with the repository
        args.path = str(ROOT / "data" / "ali_ccp" / "ali_ccp_train_sample.csv")
        args.val_path = args.val_path or str(ROOT / "data" / "ali_ccp" / "ali_ccp_val_sample.csv")
    train, vocab = sdata.load_ali_ccp(args.path)
    if args.val_path:
        held, _ = sdata.load_ali_ccp(args.val_path, vocab=vocab)
    else:
        train, held = train.split(args.holdout, seed=args.seed)
    return train, held, f"ali_ccp ({os.path.basename(args.path)})"


MODEL_NAMES = ("SAML", "STAR", "HMoE", "shared-bottom")


def make_config(train, args) -> SAMLConfig:
    h = tuple(args.hidden)
    return SAMLConfig.from_data(train, embedding_dim=args.embedding_dim, attention_dim=args.embedding_dim,
                                aux_hidden=h, branch_hidden=h, mutual_layers=(0,), dropout=0.0)


def make_models(train, cfg: SAMLConfig, args, device) -> dict:
    """The four models of the comparison, same widths: SAML and shared-bottom from ``cfg``; STAR with star layers
    of widths ``--hidden``; HMoE with experts of the first width and towers of the last."""
    fused = dict(embedding_optimizer="rowwise_adagrad", embedding_lr=args.embedding_lr, device=device)
    dims = dict(embedding_dim=args.embedding_dim, attention_dim=args.embedding_dim)
    h = tuple(args.hidden)
    build = {"SAML": lambda: SAML(cfg, **fused),
             "STAR": lambda: STAR(STARConfig.from_data(train, hidden=h, **dims), **fused),
             "HMoE": lambda: HMoE(HMoEConfig.from_data(train, expert_hidden=h[:1], tower_hidden=h[-1], **dims),
                                  **fused),
             "shared-bottom": lambda: SharedBottom(cfg, **fused)}
    models = {}
    for name in MODEL_NAMES:
        torch.manual_seed(args.seed)
        models[name] = build[name]()
    return models


def predict(model, held, batch_size, device):
    model.eval()
    out = []
    with torch.no_grad():
        for b in held.batches(batch_size):
            y = model(*b.to(device).inputs())
            out.append(torch.sigmoid((y[0] if isinstance(y, tuple) else y).float()).cpu().numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros(0)


def aucs(held, scores) -> dict:
    res = {"overall": auc(held.label, scores)}
    for m in range(held.num_scenarios):
        sel = held.scenario == m
        res[f"scenario{m}"] = auc(held.label[sel], scores[sel])
    return res


def train(model, batches, epochs, args, desc, progress, device):
    opt = TrainingOptimizer(model, args.lr, args.embedding_lr)
    losses = []
    total = epochs * len(batches[0])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True)
    t0 = time.perf_counter()
    for ep in range(epochs):
        for b in batches[ep]:
            loss = model.loss(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                if len(losses) % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    if bar is not None:
        bar.close()
    return losses, time.perf_counter() - t0


def throughput(models: dict, batches, steps, args, device) -> dict:
    """samples/s of each model's full training step on the same batches, timed alternately (A B A B ...)."""
    opts = {k: TrainingOptimizer(m, args.lr, args.embedding_lr) for k, m in models.items()}
    times = {k: [] for k in models}

    def step(k, b):
        loss = models[k].loss(b)
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for k in models:  # warm-up
        step(k, batches[0])
    for i in range(steps):
        b = batches[(i + 1) % len(batches)]
        for k in models:
            sync()
            t = time.perf_counter()
            step(k, b)
            sync()
            times[k].append(time.perf_counter() - t)
    B = len(batches[0])
    out = {k: {"median_step_s": float(np.median(v)), "samples_per_s": float(B / np.median(v))} for k, v in times.items()}
    first = next(iter(models))
    for k in models:  # median of the per-round ratios: a burst of load on a shared machine hits both sides
        out[k]["ratio_to_" + first] = float(np.median(np.array(times[k]) / np.array(times[first])))
    return out


def plot(path, curves: dict, auc_table: dict, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, losses in curves.items():
        x = np.arange(len(losses))
        k = max(1, len(losses) // 50)
        sm = np.convolve(losses, np.ones(k) / k, mode="valid")
        a1.plot(x, losses, alpha=0.25)
        a1.plot(x[k - 1:], sm, label=name, color=a1.lines[-1].get_color())
    a1.set_xlabel("step")
    a1.set_ylabel("training loss")
    a1.set_title("training loss (SAML: BCE + aux; others: BCE)")
    a1.legend()
    keys = list(next(iter(auc_table.values())).keys())
    w = 0.8 / len(auc_table)
    for i, (name, res) in enumerate(auc_table.items()):
        vals = [res[k] for k in keys]
        a2.bar(np.arange(len(keys)) + i * w, vals, w, label=name)
    a2.set_xticks(np.arange(len(keys)) + w * (len(auc_table) - 1) / 2)
    a2.set_xticklabels(keys)
    finite = [v for r in auc_table.values() for v in r.values() if np.isfinite(v)]
    if finite:
        a2.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.03))
    a2.set_ylabel("held-out AUC")
    a2.set_title("AUC overall and per scenario")
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_saml.py: --device cuda but CUDA is not available")
    t_start = time.perf_counter()
    train_data, held, data_desc = load_data(args)
    cfg = make_config(train_data, args)
    bs = args.batch_size
    batches = [[b.to(device) for b in train_data.batches(bs, shuffle=True, seed=args.seed * 1000 + ep,
                                                           drop_last=len(train_data) >= bs)]
               for ep in range(args.epochs)]
    ctx = saml_kernels.use_backend(args.backend) if args.backend else _null()
    with ctx:
        fused = dict(embedding_optimizer="rowwise_adagrad", embedding_lr=args.embedding_lr, device=device)
        models = make_models(train_data, cfg, args, device)
        init_state = copy.deepcopy(models["SAML"].state_dict())
        progress = not args.no_progress
        losses, train_time, auc_table = {}, {}, {}
        for name, model in models.items():
            losses[name], train_time[name] = train(model, batches, args.epochs, args, name, progress, device)
            auc_table[name] = aucs(held, predict(model, held, 4096, device))
        # throughput: the accelerated model vs the plain-PyTorch twin from the same initial weights
        fast = SAML(cfg, **fused)
        fast.load_state_dict(init_state)
        ref = SAMLReference(cfg, embedding_optimizer="rowwise_adagrad", device=device)
        ref.load_state_dict(init_state)
        tb = [b for ep in batches for b in ep][: max(2, args.throughput_steps + 1)]
        tput = throughput({"SAML": fast, "SAMLReference": ref}, tb, args.throughput_steps, args, device)

    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    seen = sum(len(b) for ep in batches for b in ep)
    samples_per_s = {name: seen / t for name, t in train_time.items()}
    speedup = tput["SAMLReference"]["ratio_to_SAML"]
    from saml_kernels import _backend
    backends = {op: _backend.resolve(op, device.type, args.backend) for op in _backend.registered_ops()}
    name = time.strftime("%Y%m%d-%H%M%S") + f"-{args.data}-seed{args.seed}"
    out_dir = (Path(args.out) / name).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "data": data_desc, "train_samples": len(train_data), "heldout_samples": len(held),
        "scenario_counts_train": train_data.scenario_counts().tolist(),
        "ctr_train": float(train_data.label.mean()) if len(train_data) else None,
        "device": str(device), "backends": backends, "threads": torch.get_num_threads(),
        "epochs": args.epochs, "batch_size": bs, "lr": args.lr, "embedding_lr": args.embedding_lr, "seed": args.seed,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()
                   if k not in ("features", "sequence")},
        "num_features": len(cfg.features), "num_aware": cfg.num_aware, "parameters": n_params,
        "auc": auc_table, "train_time_s": train_time, "train_samples_per_s": samples_per_s,
        "final_loss": {k: float(np.mean(v[-20:])) if v else None for k, v in losses.items()},
        "throughput": tput, "speedup_vs_reference": speedup,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "wall_s": None,
    }
    plot(out_dir / "report.png", losses, auc_table, f"SAML, STAR, HMoE and shared-bottom on {data_desc}")
    summary["wall_s"] = time.perf_counter() - t_start
    with open(out_dir / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    print_table(summary, out_dir)
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def print_table(s: dict, out_dir: Path) -> None:
    keys = list(s["auc"]["SAML"].keys())
    w = 14
    print()
    print(f"data: {s['data']}   train {s['train_samples']}  held-out {s['heldout_samples']}   device {s['device']} "
          f"({s['threads']} threads)   backends {s['backends']}")
    print("held-out AUC".ljust(16) + "".join(k.rjust(w) for k in keys) + "params".rjust(w) + "train s".rjust(10)
          + "samples/s".rjust(12))
    for name, res in s["auc"].items():
        print(name.ljust(16) + "".join(f"{res[k]:.4f}".rjust(w) for k in keys)
              + f"{s['parameters'][name]:,}".rjust(w) + f"{s['train_time_s'][name]:.1f}".rjust(10)
              + f"{s['train_samples_per_s'][name]:,.0f}".rjust(12))
    for name in s["auc"]:
        if name != "shared-bottom":
            d = [s["auc"][name][k] - s["auc"]["shared-bottom"][k] for k in keys]
            print(f"{name} - baseline".ljust(16) + "".join(f"{v:+.4f}".rjust(w) for v in d))
    print("(samples/s: training samples over the whole training time of the model, evaluation excluded)")
    print()
    print("training throughput".ljust(24) + "step ms".rjust(12) + "samples/s".rjust(14))
    for name, t in s["throughput"].items():
        print(name.ljust(24) + f"{t['median_step_s'] * 1e3:.1f}".rjust(12) + f"{t['samples_per_s']:,.0f}".rjust(14))
    print(f"speed-up of SAML over SAMLReference: {s['speedup_vs_reference']:.2f}x (median of per-step ratios, "
          f"batch {s['batch_size']}, same batches, timed alternately)")
    print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'report.png'}   (wall {s['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
