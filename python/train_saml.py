#!/usr/bin/env python3
"""The main job: train SAML, STAR, HMoE and a shared-bottom baseline on the same multi-scenario CTR data, with one
protocol for every model.

    python python/train_saml.py                      # MovieLens-100K (synthetic data if it cannot be had), 1 seed
    python python/train_saml.py --seeds 3            # the full table: mean +- sd over seeds 0, 1, 2
    python python/train_saml.py --data movielens [--path ml-100k/]   # the official folder, or the cache
    python python/train_saml.py --data synthetic     # specific_strength 1 and 0, with the Bayes AUC
    python python/train_saml.py --data ali_ccp [--path FILE.csv] [--val-path FILE.csv]

``--path`` implies its data kind: a folder is an ml-100k folder (``--data movielens``), a ``.csv`` file Ali-CCP;
anything else, or a ``--path`` with ``--data synthetic``, is an error.

Protocol (the same for every model, on every data set): train / validation / test splits (MovieLens: by time;
synthetic: random; Ali-CCP: the validation file, halved into validation and test); for every learning-rate pair
of ``--lr-grid`` (Adam on the dense parameters : row-wise Adagrad fused into the embedding backward) train up to
``--epochs`` epochs with early stopping on validation AUC (``--patience`` epochs without a gain; the weights of the
best epoch are kept); the pair with the best validation AUC is the model's; its test AUC (overall and per
scenario) is reported as mean +- sd over ``--seeds`` seeds, with the per-seed difference to shared-bottom,
parameters, training time (every epoch run at the chosen pair, evaluation excluded) and training samples/s. Same
seed -> same initial weights (torch.manual_seed before each model) and the same batches for every model. On
synthetic data the Bayes AUC (the true logit's AUC on the test rows) is printed, and the data is generated with
``specific_strength`` 1 (scenario x id effects that only per-scenario tables can fit) and 0.

The scenario as an input feature: on MovieLens every model gets the scenario id as a sparse feature, as in
Scenario-Wise-Rec (its ``domain_indicator``), so STAR's, HMoE's and shared-bottom's shared input is not
scenario-blind; on synthetic data and Ali-CCP it is not added (``--scenario-feature`` / ``--no-scenario-feature``
override). ``<out>/<name>/summary.json``, ``table.txt`` and ``report.png`` are written under ``--out`` (default
``./saml_run`` under the *current* directory).
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--data", choices=("movielens", "synthetic", "ali_ccp"), default=None,
                   help="data set (default: inferred from --path; without --path MovieLens-100K, or synthetic data "
                   "with one line saying why when MovieLens cannot be had)")
    p.add_argument("--path", help="an ml-100k folder (MovieLens) or an Ali-CCP CSV training file; implies --data")
    p.add_argument("--val-path", help="Ali-CCP CSV held-out file (default: the shipped validation rows with the "
                   "default --path, else a split of --path); halved into validation and test")
    p.add_argument("--samples", type=int, default=50_000, help="synthetic samples (train + validation + test)")
    p.add_argument("--specific-strength", type=float, nargs="+", default=[1.0, 0.0],
                   help="synthetic data: the specific_strength values to run (default 1 and 0)")
    p.add_argument("--scenario-feature", action=argparse.BooleanOptionalAction, default=None,
                   help="add the scenario id as a sparse feature for every model (default: on for MovieLens, as "
                   "Scenario-Wise-Rec does; off otherwise)")
    p.add_argument("--holdout", type=float, default=0.2, help="synthetic / single-file Ali-CCP: validation + test "
                   "fraction (halved between them)")
    p.add_argument("--backend", default=None, help="force a backend for every op (reference|cpu|triton|cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--epochs", type=int, default=8, help="maximum epochs per run (early stopping on validation AUC)")
    p.add_argument("--patience", type=int, default=2, help="epochs without a validation-AUC gain before stopping")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr-grid", nargs="+", default=["1e-3:0.02", "3e-3:0.05"], metavar="LR:EMB_LR",
                   help="learning-rate pairs tried per model: Adam lr of the dense parameters : row-wise Adagrad lr "
                   "of the tables; the best on validation AUC is kept")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 64], help="aux and branch hidden sizes")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed + 1, ...)")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.add_argument("--throughput-steps", type=int, default=6, help="timed steps of SAML vs SAMLReference (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="saml_run",
                   help="output folder, relative to the current directory (a sub-folder per run; default ./saml_run)")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress lines")
    args = p.parse_args(argv)
    args.data = resolve_data_kind(p, args)
    try:
        args.grid = [tuple(float(v) for v in g.split(":")) for g in args.lr_grid]
        if any(len(g) != 2 or min(g) <= 0 for g in args.grid):
            raise ValueError
    except ValueError:
        p.error(f"--lr-grid: expected positive LR:EMB_LR pairs such as 1e-3:0.02, got {args.lr_grid}")
    if args.seeds < 1 or args.epochs < 1 or args.patience < 1:
        p.error("--seeds, --epochs and --patience must be >= 1")
    if "shared-bottom" not in args.models:
        p.error("--models must include shared-bottom (the baseline of the differences)")
    return args


def resolve_data_kind(parser, args) -> str:
    """--data from --path when not given: a folder -> movielens, a .csv file -> ali_ccp; a --path the chosen kind
    cannot use is an error (a path is never ignored). Without either: "auto" (MovieLens, else synthetic)."""
    if args.path is None:
        if args.val_path and args.data not in (None, "ali_ccp"):
            parser.error(f"--val-path is an Ali-CCP option; --data {args.data} does not use it")
        return args.data or ("ali_ccp" if args.val_path else "auto")
    path = Path(args.path)
    if not path.exists():
        parser.error(f"--path {args.path}: no such file or folder")
    inferred = "movielens" if path.is_dir() else ("ali_ccp" if path.suffix.lower() == ".csv" else None)
    if args.data is None:
        if inferred is None:
            parser.error(f"--path {args.path}: cannot tell its data kind (an ml-100k folder is MovieLens, a .csv "
                         "file Ali-CCP); name it with --data movielens|ali_ccp")
        return inferred
    if args.data == "synthetic":
        parser.error(f"--path {args.path} was given with --data synthetic, which reads no file; drop --path or "
                     "choose --data movielens|ali_ccp")
    if inferred is not None and inferred != args.data:
        parser.error(f"--path {args.path} looks like {inferred} data (a {'folder' if path.is_dir() else '.csv file'})"
                     f" but --data {args.data} was given")
    return args.data


MODEL_NAMES = ("SAML", "STAR", "HMoE", "shared-bottom")


def _halves(data, seed):
    """(validation, test): a random half each."""
    a, b = data.split(0.5, seed=seed)
    return a, b


def load_datasets(args) -> list:
    """[(name, description, train, val, test)]: one entry per data set run (synthetic: one per specific_strength)."""
    kind = args.data
    if kind == "auto":
        try:
            s = sdata.load_movielens(fetch=True, scenario_feature=args.scenario_feature is not False)
            kind = "movielens"
        except (sdata.MovieLensUnavailable, sdata.MovieLensFormatError) as e:
            print(f"train_saml.py: MovieLens-100K cannot be had, training on synthetic data instead ({e})")
            kind = "synthetic"
    elif kind == "movielens":
        try:
            s = sdata.load_movielens(args.path, fetch=args.path is None,
                                     scenario_feature=args.scenario_feature is not False)
        except sdata.MovieLensUnavailable as e:
            raise SystemExit(f"train_saml.py --data movielens: {e}")
    args.data = kind
    if kind == "movielens":
        return [("movielens", f"MovieLens-100K ({s.source}; split by time)", s.train, s.val, s.test)]
    if kind == "synthetic":
        out = []
        for a in args.specific_strength:
            full = sdata.make_synthetic(args.samples, specific_strength=a, seed=args.seed)
            if args.scenario_feature:
                full = full.with_scenario_feature()
            train, held = full.split(args.holdout, seed=args.seed)
            val, test = _halves(held, args.seed + 1)
            out.append((f"synthetic-s{a:g}", f"synthetic ({args.samples} samples, specific_strength {a:g}, "
                        f"data seed {args.seed})", train, val, test))
        return out
    if not args.path:  # the real sample rows shipped with the repository
        args.path = str(ROOT / "data" / "ali_ccp" / "ali_ccp_train_sample.csv")
        args.val_path = args.val_path or str(ROOT / "data" / "ali_ccp" / "ali_ccp_val_sample.csv")
    train, vocab = sdata.load_ali_ccp(args.path)
    if args.val_path:
        held, _ = sdata.load_ali_ccp(args.val_path, vocab=vocab)
    else:
        train, held = train.split(args.holdout, seed=args.seed)
    if args.scenario_feature:
        train, held = train.with_scenario_feature(), held.with_scenario_feature()
    val, test = _halves(held, args.seed + 1)
    return [("ali_ccp", f"ali_ccp ({os.path.basename(args.path)})", train, val, test)]


def make_model(name: str, train, args, device, embedding_lr: float, config_options=None, **options):
    """One model of the comparison, same widths: SAML and shared-bottom from SAMLConfig (aux and branch hidden =
    --hidden, mutual unit at the first layer); STAR with star layers of widths --hidden; HMoE with experts of the
    first width and towers of the last. ``options`` go to the model's constructor (e.g. ``embedding_dtype=``,
    ``embedding_stochastic_rounding=``), ``config_options`` to its config's ``from_data`` (e.g. ``scenario_rows=``):
    benchmarks/bench_memory.py trains its table options with this loop."""
    fused = dict(embedding_optimizer="rowwise_adagrad", embedding_lr=embedding_lr, device=device, **options)
    dims = dict(embedding_dim=args.embedding_dim, attention_dim=args.embedding_dim, **(config_options or {}))
    h = tuple(args.hidden)
    if name in ("SAML", "shared-bottom"):
        cfg = SAMLConfig.from_data(train, aux_hidden=h, branch_hidden=h, mutual_layers=(0,), dropout=0.0, **dims)
        return (SAML if name == "SAML" else SharedBottom)(cfg, **fused)
    if name == "STAR":
        return STAR(STARConfig.from_data(train, hidden=h, **dims), **fused)
    return HMoE(HMoEConfig.from_data(train, expert_hidden=h[:1], tower_hidden=h[-1], **dims), **fused)


def predict(model, data, batch_size, device) -> np.ndarray:
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for b in data.batches(batch_size):
            y = model(*b.to(device).inputs())
            out.append((y[0] if isinstance(y, tuple) else y).float().cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros(0)


def aucs(data, scores) -> dict:
    res = {"overall": auc(data.label, scores)}
    for m in range(data.num_scenarios):
        sel = data.scenario == m
        res[_scen_name(data, m)] = auc(data.label[sel], scores[sel])
    return res


def _scen_name(data, m) -> str:
    return data.scenario_names[m] if data.scenario_names else f"scenario{m}"


def fit(name, train, val, batches, lr, emb_lr, args, device, log, model_options=None, config_options=None) -> dict:
    """Train one model at one learning-rate pair with early stopping on validation AUC; returns the model with the
    best epoch's weights, its optimizer, its validation AUC, the validation curve, the losses, the training time
    and the samples seen. ``batches[ep]``: the epoch's training batches; ``model_options`` / ``config_options``: see
    make_model."""
    torch.manual_seed(args.seed_now)
    model = make_model(name, train, args, device, emb_lr, config_options, **(model_options or {}))
    opt = TrainingOptimizer(model, lr, emb_lr)
    best = {"val_auc": -1.0, "epoch": 0, "state": None}
    curve, losses, train_s, seen = [], [], 0.0, 0
    for ep in range(args.epochs):
        t0 = time.perf_counter()
        for b in batches[ep]:
            loss = model.loss(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            seen += len(b)
        train_s += time.perf_counter() - t0
        v = aucs(val, predict(model, val, 4096, device))["overall"]
        curve.append(v)
        if best["state"] is None or v > best["val_auc"]:  # a NaN AUC (one class only) never replaces a number
            best = {"val_auc": v, "epoch": ep + 1, "state": copy.deepcopy(model.state_dict())}
        elif ep + 1 - best["epoch"] >= args.patience:
            break
    model.load_state_dict(best["state"])
    log(f"  {name:<14} lr {lr:g}:{emb_lr:g}  val AUC {best['val_auc']:.4f} at epoch {best['epoch']}/{len(curve)}  "
        f"({train_s:.1f} s)")
    return dict(model=model, optimizer=opt, val_auc=best["val_auc"], epoch=best["epoch"], epochs_run=len(curve), curve=curve,
                losses=losses, train_s=train_s, samples=seen, lr=lr, embedding_lr=emb_lr)


def run_dataset(ds, args, device, log) -> dict:
    """Every model, every seed, every grid point on one data set; the per-model results (see the module docstring)."""
    key, desc, train, val, test = ds
    res = {"description": desc, "train": len(train), "val": len(val), "test": len(test),
           "scenario_counts": {"train": train.scenario_counts().tolist(), "val": val.scenario_counts().tolist(),
                               "test": test.scenario_counts().tolist()},
           "ctr": {"train": float(train.label.mean()), "val": float(val.label.mean()),
                   "test": float(test.label.mean())},
           "features": [f.name for f in train.features], "seeds": [], "models": {}}
    if test.logit is not None:
        res["bayes_auc"] = aucs(test, test.logit)
    for name in args.models:
        res["models"][name] = {"test_auc": [], "val_auc": [], "lr": [], "epoch": [], "train_s": [],
                               "samples_per_s": [], "curve": [], "losses": None, "params": None}
    bs = args.batch_size
    for seed in range(args.seed, args.seed + args.seeds):
        args.seed_now = seed
        res["seeds"].append(seed)
        batches = [[b.to(device) for b in train.batches(bs, shuffle=True, seed=seed * 1000 + ep,
                                                         drop_last=len(train) >= bs)] for ep in range(args.epochs)]
        log(f"{key} seed {seed}:")
        for name in args.models:
            runs = [fit(name, train, val, batches, lr, elr, args, device, log) for lr, elr in args.grid]
            r = max(runs, key=lambda x: x["val_auc"])
            m = res["models"][name]
            m["test_auc"].append(aucs(test, predict(r["model"], test, 4096, device)))
            m["val_auc"].append(r["val_auc"])
            m["lr"].append([r["lr"], r["embedding_lr"]])
            m["epoch"].append(r["epoch"])
            m["train_s"].append(r["train_s"])
            m["samples_per_s"].append(r["samples"] / r["train_s"])
            m["curve"].append(r["curve"])
            m["params"] = sum(p.numel() for p in r["model"].parameters())
            if m["losses"] is None:
                m["losses"] = r["losses"]
    base = res["models"]["shared-bottom"]["test_auc"]
    for name, m in res["models"].items():
        m["diff_to_shared_bottom"] = [{k: t[k] - b[k] for k in t} for t, b in zip(m["test_auc"], base)]
    return res


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


def plot(path, results: dict, title: str):
    """Left: validation AUC per epoch of each model's chosen run (first seed), per data set. Right: test AUC
    (mean over seeds) overall and per scenario."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(n, 2, figsize=(12, 4.2 * n), squeeze=False)
    for row, (key, res) in zip(axes, results.items()):
        a1, a2 = row
        for name, m in res["models"].items():
            a1.plot(np.arange(1, len(m["curve"][0]) + 1), m["curve"][0], marker="o", label=name)
        a1.set_xlabel("epoch")
        a1.set_ylabel("validation AUC")
        a1.set_title(f"{key}: validation AUC of the chosen learning rates (seed {res['seeds'][0]})")
        a1.legend()
        keys = list(next(iter(res["models"].values()))["test_auc"][0].keys())
        w = 0.8 / len(res["models"])
        vals_all = []
        for i, (name, m) in enumerate(res["models"].items()):
            vals = [np.mean([t[k] for t in m["test_auc"]]) for k in keys]
            vals_all += [v for v in vals if np.isfinite(v)]
            a2.bar(np.arange(len(keys)) + i * w, vals, w, label=name)
        a2.set_xticks(np.arange(len(keys)) + w * (len(res["models"]) - 1) / 2)
        a2.set_xticklabels(keys)
        if vals_all:
            a2.set_ylim(max(0.0, min(vals_all) - 0.05), min(1.0, max(vals_all) + 0.03))
        a2.set_ylabel("test AUC (mean over seeds)")
        a2.set_title(f"{key}: test AUC overall and per scenario")
        a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_saml.py: --device cuda but CUDA is not available")
    log = (lambda *a: None) if args.no_progress else (lambda *a: print(*a, flush=True))
    t_start = time.perf_counter()
    datasets = load_datasets(args)
    ctx = saml_kernels.use_backend(args.backend) if args.backend else _null()
    results, tput = {}, None
    with ctx:
        for ds in datasets:
            results[ds[0]] = run_dataset(ds, args, device, log)
        if args.throughput_steps > 0 and "SAML" in args.models:
            tput = saml_vs_reference(datasets[0][2], args, device)

    from saml_kernels import _backend
    backends = {op: _backend.resolve(op, device.type, args.backend) for op in _backend.registered_ops()}
    name = time.strftime("%Y%m%d-%H%M%S") + f"-{args.data}-seeds{args.seed}-{args.seed + args.seeds - 1}"
    out_dir = (Path(args.out) / name).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "data": args.data, "datasets": results, "device": str(device), "backends": backends,
        "threads": torch.get_num_threads(), "max_epochs": args.epochs, "patience": args.patience,
        "batch_size": args.batch_size, "lr_grid": args.grid, "seeds": list(range(args.seed, args.seed + args.seeds)),
        "embedding_dim": args.embedding_dim, "hidden": args.hidden, "throughput": tput,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "wall_s": None,
    }
    plot(out_dir / "report.png", results, "SAML, STAR, HMoE and shared-bottom: one protocol "
         f"(early stopping on validation AUC, lr grid {args.lr_grid}, seeds {summary['seeds']})")
    summary["wall_s"] = time.perf_counter() - t_start
    for res in results.values():
        for m in res["models"].values():
            m.pop("losses", None)
    with open(out_dir / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    text = format_tables(summary)
    (out_dir / "table.txt").write_text(text + "\n")
    print(text)
    print(f"wrote {out_dir / 'summary.json'}, table.txt and report.png   (wall {summary['wall_s']:.0f} s)")
    return summary


def saml_vs_reference(train, args, device) -> dict:
    """Training samples/s of SAML and of its plain-PyTorch twin SAMLReference (same weights, same batches)."""
    lr, elr = args.grid[0]
    torch.manual_seed(args.seed)
    fast = make_model("SAML", train, args, device, elr)
    ref = SAMLReference(fast.config, embedding_optimizer="rowwise_adagrad", device=device)
    ref.load_state_dict(fast.state_dict())
    bs = min(args.batch_size, len(train))
    tb = [b.to(device) for b in train.batches(bs, shuffle=True, seed=args.seed, drop_last=True)]
    tb = tb[: max(2, args.throughput_steps + 1)]
    args.lr, args.embedding_lr = lr, elr
    return throughput({"SAML": fast, "SAMLReference": ref}, tb, args.throughput_steps, args, device)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _ms(values) -> str:
    """'mean +- sd' (sample sd over seeds), or the value alone for one seed."""
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.4f}" if v.size == 1 else f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"


def format_tables(s: dict) -> str:
    lines = []
    for key, res in s["datasets"].items():
        models = res["models"]
        keys = list(next(iter(models.values()))["test_auc"][0].keys())
        n = len(res["seeds"])
        w = 17 if n > 1 else 10
        lines += ["", f"{res['description']}: train {res['train']}  validation {res['val']}  test {res['test']}   "
                  f"CTR test {res['ctr']['test']:.3f}   test rows per scenario {res['scenario_counts']['test']}",
                  f"features: {', '.join(res['features'])}"]
        hdr = f"test AUC ({'mean ± sd over ' + str(n) + ' seeds' if n > 1 else 'seed ' + str(res['seeds'][0])})"
        lines.append(hdr.ljust(34) + "".join(k.rjust(w) for k in keys) + "params".rjust(11) + "lr (dense:emb)".rjust(22)
                     + "best epoch".rjust(12) + "train s".rjust(9) + "samples/s".rjust(11))
        for name, m in models.items():
            lrs = sorted({f"{a:g}:{b:g}" for a, b in m["lr"]})
            lines.append(name.ljust(34) + "".join(_ms([t[k] for t in m["test_auc"]]).rjust(w) for k in keys)
                         + f"{m['params']:,}".rjust(11) + ",".join(lrs).rjust(22)
                         + ",".join(str(e) for e in m["epoch"]).rjust(12) + f"{np.mean(m['train_s']):.1f}".rjust(9)
                         + f"{np.mean(m['samples_per_s']):,.0f}".rjust(11))
        if "bayes_auc" in res:
            lines.append("Bayes (true logit)".ljust(34) + "".join(f"{res['bayes_auc'][k]:.4f}".rjust(w) for k in keys))
        for name, m in models.items():
            if name == "shared-bottom":
                continue
            lines.append(f"{name} - shared-bottom".ljust(34) + "".join(
                _signed([d[k] for d in m["diff_to_shared_bottom"]]).rjust(w) for k in keys)
                + ("   per seed (overall): " + " ".join(f"{d['overall']:+.4f}" for d in m["diff_to_shared_bottom"])
                   if n > 1 else ""))
    small = [r["description"] for r in s["datasets"].values() if r["test"] < 2000]
    if small:
        lines.append(f"NOTE: {', '.join(small)} has under 2,000 test rows: these AUCs are noise, not a comparison")
    lines.append("(lr chosen per model and seed on validation AUC; best epoch by early stopping; train s and samples/s: "
                 "every epoch run at the chosen lr, evaluation excluded)")
    if s.get("throughput"):
        t = s["throughput"]
        lines.append(f"training step, batch {s['batch_size']}: SAML {t['SAML']['median_step_s'] * 1e3:.1f} ms, "
                     f"SAMLReference {t['SAMLReference']['median_step_s'] * 1e3:.1f} ms: "
                     f"{t['SAMLReference']['ratio_to_SAML']:.2f}x (median of per-step ratios, timed alternately)")
    lines.append(f"device {s['device']} ({s['threads']} threads)")
    return "\n".join(lines)


def _signed(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():+.4f}" if v.size == 1 else f"{v.mean():+.4f} ± {v.std(ddof=1):.4f}"


if __name__ == "__main__":
    main()
