"""The price of SAML's 1+M tables: embedding-table and optimizer-state bytes against held-out AUC
for every table option, on the main job's data and on a large synthetic configuration.

Options (rows of the table), each trained with python/train_saml.py's own loop (``train_saml.fit``: the same model,
batches, seeds and validation-AUC early stopping, the best epoch's weights kept), except the last:

- float32 tables (the main job's SAML);
- bfloat16 tables, stochastic rounding in the fused update (the default for 16-bit tables);
- bfloat16 tables, round to nearest (``embedding_stochastic_rounding=False``);
- hashed scenario tables with 1/4 and 1/16 as many rows as the feature has ids (``scenario_rows=``: id ->
  hash(id) mod rows), float32; the global tables keep one row per id;
- 8-bit serving: the float32 run's model exported with ``serving.export_saml(table_dtype="uint8")`` (FBGEMM's
  row-wise layout: D codes + float32 scale + bias) and scored through the exported program. It holds no optimizer
  state; its AUC difference is paired with the float32 run of the same seed.

Bytes are read from the tensors of each trained model: tables = the ``global_weight`` / ``scenario_weight`` of
every ``nn.ScenarioEmbedding`` (the 8-bit program: the packed uint8 tables of ``quantize_tables``, what the export
lifts); optimizer state = every tensor of ``TrainingOptimizer.state_dict()``, split into the tables' row-wise
Adagrad state and the dense layers' Adam state; total = tables + optimizer state (the dense parameters, the same
for every option, are given once per configuration).

Configurations:

- ``movielens``: MovieLens-100K as the main job reads it (time split 80/10/10, scenario feature on; synthetic data,
  said in the results, when it cannot be had), SAML at the main job's sizes (D = 16, hidden 128-64, mutual unit
  at layer 0), its lr grid (3e-3:0.05 and 1e-3:0.02, the better on validation AUC kept per option and seed), up to
  8 epochs with patience 2, ``--seeds`` seeds (0, 1, ...), batch 1024, one torch thread.
- ``large``: ``make_synthetic`` with 9,000,000 users and 500,000 items, M = 4: 10,000,647 global rows (users,
  items, the behaviour-sequence table of 500,001 rows and the small features); items and the sequence are
  scenario-aware, users are global-only (scenario tables for 9M users at M = 4 would be 36M more rows, 2.3 GB
  at float32), so 4,000,004 scenario rows. D = 16. Training is bounded: ``--large-samples`` samples (default
  600,000, split 80/10/10 at random as the main job's synthetic data), one lr pair (3e-3:0.05), up to 3 epochs
  with patience 1 (at most 1.44M training samples a run). Peak memory is about 3.3 GB while the data is generated
  and ~3 GB while a float32 run keeps its best state (model + two state copies).
- ``quick`` (``--quick``): 3,000 synthetic samples, one epoch, one seed, into a temporary folder (the smoke test).

Results: benchmarks/results/memory_<machine>.md + .json (``--out-dir``). ``--update`` merges the runs of this call
(per configuration, option and seed) into the existing .json and rewrites the .md from all of them, so an option
can be (re)measured alone; each run keeps the load and time it was measured at.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import types
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import harness  # noqa: E402
import train_saml  # noqa: E402

from saml_kernels import data as sdata  # noqa: E402
from saml_kernels import serving  # noqa: E402
from saml_kernels.config import SAMLConfig  # noqa: E402
from saml_kernels.nn import ScenarioEmbedding  # noqa: E402
from saml_kernels.quantized import QuantizedScenarioEmbedding, quantize_tables  # noqa: E402

LARGE_USERS, LARGE_ITEMS = 9_000_000, 500_000


class Option(NamedTuple):  # not a dataclass: tests load this file without registering it in sys.modules
    key: str
    label: str
    model_options: dict = {}    # the model constructor's options
    hash_fraction: int = 0      # scenario tables with 1/hash_fraction of the ids' rows (0: one row per id)
    serving: bool = False       # the 8-bit export of the float32 run


OPTIONS = [
    Option("float32", "float32"),
    Option("bf16-sr", "bfloat16, stochastic rounding (default)", dict(embedding_dtype=torch.bfloat16)),
    Option("bf16-rn", "bfloat16, round to nearest",
           dict(embedding_dtype=torch.bfloat16, embedding_stochastic_rounding=False)),
    Option("hash4", "hashed scenario tables, 1/4 of the ids", hash_fraction=4),
    Option("hash16", "hashed scenario tables, 1/16 of the ids", hash_fraction=16),
    Option("uint8", "8-bit serving (export of the float32 model)", serving=True),
]
BY_KEY = {o.key: o for o in OPTIONS}


# ------------------------------------------------------------------------------------------------ data

def load_config(name: str, args) -> dict:
    """{"desc", "train", "val", "test", "grid", "epochs", "patience", "seeds"} of a configuration."""
    if name == "quick":
        full = sdata.make_synthetic(3000, seed=0)
        train, held = full.split(0.2, seed=0)
        val, test = held.split(0.5, seed=1)
        return dict(desc="synthetic, 3,000 samples (--quick: smoke test, AUCs are noise)", train=train, val=val,
                    test=test, grid=[(3e-3, 0.05)], epochs=1, patience=1, seeds=1)
    if name == "movielens":
        try:
            s = sdata.load_movielens(fetch=False, scenario_feature=True)
            desc, train, val, test = f"MovieLens-100K ({s.source}; split by time)", s.train, s.val, s.test
        except (sdata.MovieLensUnavailable, sdata.MovieLensFormatError) as e:
            print(f"bench_memory: MovieLens-100K cannot be had, synthetic data (50,000 samples) instead ({e})")
            full = sdata.make_synthetic(50_000, seed=0)
            train, held = full.split(0.2, seed=0)
            val, test = held.split(0.5, seed=1)
            desc = "synthetic, 50,000 samples (MovieLens-100K was not available)"
        return dict(desc=desc, train=train, val=val, test=test, grid=[(1e-3, 0.02), (3e-3, 0.05)], epochs=args.epochs,
                    patience=2, seeds=args.seeds)
    if name == "large":
        t0 = time.perf_counter()
        full = sdata.make_synthetic(args.large_samples, num_users=LARGE_USERS, num_items=LARGE_ITEMS, seed=0)
        # users global-only (see the module docstring): the features are the data's, so SAMLConfig.from_data follows
        full = dataclasses.replace(full, features=[f._replace(scenario_aware=False) if f.name == "user" else f
                                                   for f in full.features])
        train, held = full.split(0.2, seed=0)
        del full
        val, test = held.split(0.5, seed=1)
        print(f"bench_memory: large synthetic data generated in {time.perf_counter() - t0:.0f} s", flush=True)
        return dict(desc=f"synthetic, {LARGE_USERS:,} users (global-only) + {LARGE_ITEMS:,} items, M = 4, "
                    f"{args.large_samples:,} samples", train=train, val=val, test=test, grid=[(3e-3, 0.05)],
                    epochs=3, patience=1, seeds=args.large_seeds)
    raise ValueError(f"bench_memory: unknown configuration {name!r}")


class EpochBatches:
    """``batches[ep]``: epoch ep's shuffled training batches, made when asked (train_saml.run_dataset builds every
    epoch up front, which at the large configuration is ~1 GB); the same shuffles (seed * 1000 + ep, drop_last)."""

    def __init__(self, data, batch_size: int, seed: int, device):
        self.data, self.bs, self.seed, self.device = data, batch_size, seed, device

    def __getitem__(self, ep):
        batches = self.data.batches(self.bs, shuffle=True, seed=self.seed * 1000 + ep,
                                    drop_last=len(self.data) >= self.bs)
        return (b.to(self.device) for b in batches)


def hashed_rows(data, fraction: int) -> dict:
    """``SAMLConfig(scenario_rows=)`` giving every scenario-aware feature (and the behaviour sequence) of ``data``
    ceil(ids / fraction) scenario rows. NotImplementedError on a build without hashed scenario tables."""
    if "scenario_rows" not in {f.name for f in dataclasses.fields(SAMLConfig)}:
        raise NotImplementedError("hashed scenario tables (SAMLConfig.scenario_rows) are not in this build")
    specs = [(f.name, f.num_embeddings) for f in data.features if f.scenario_aware]
    if data.sequence is not None and data.sequence.scenario_aware:
        specs.append((data.sequence.name, data.sequence.num_embeddings))
    return {name: -(-n // fraction) for name, n in specs}


# ------------------------------------------------------------------------------------------------ bytes

def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _nbytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)
        if key not in seen:
            seen.add(key)
            n += t.nbytes
    return n


def trained_bytes(model, optimizer) -> dict:
    """Bytes of the model's tensors: tables, the tables' optimizer state, the dense Adam state, dense parameters."""
    tables = [t for m in model.modules() if isinstance(m, ScenarioEmbedding) for t in (m.global_weight,
                                                                                       m.scenario_weight)]
    table_ids = {id(t) for t in tables}
    sd = optimizer.state_dict()
    return {"tables": _nbytes(tables), "table_state": _nbytes(_tensors(sd["embedding_state"])),
            "dense_state": _nbytes(_tensors(sd["dense"]["state"])),
            "dense_params": _nbytes(p for p in model.parameters() if id(p) not in table_ids)}


def serving_bytes(qmodel) -> dict:
    tables = [t for m in qmodel.modules() if isinstance(m, QuantizedScenarioEmbedding)
              for t in (m.global_packed, m.scenario_packed)]
    table_ids = {id(t) for t in tables}
    return {"tables": _nbytes(tables), "table_state": 0, "dense_state": 0,
            "dense_params": _nbytes(p for p in qmodel.parameters() if id(p) not in table_ids)}


# ------------------------------------------------------------------------------------------------ runs

def scores(fn, data, batch_size=4096, device="cpu") -> np.ndarray:
    out = []
    with torch.no_grad():
        for b in data.batches(batch_size):
            y = fn(*b.to(device).inputs())
            out.append((y[0] if isinstance(y, tuple) else y).float().cpu().numpy())
    return np.concatenate(out)


def run_option(opt: Option, cfg: dict, seed: int, args, float_model=None) -> tuple[dict, object]:
    """One (option, seed) run: its record (bytes, AUCs, epochs) and the trained model (float32: for the 8-bit row)."""
    device = torch.device(args.device)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if opt.serving:
        model = float_model.eval()
        example = cfg["test"].batch(np.arange(min(16, len(cfg["test"])))).to(device)
        program = serving.export_saml(model, example, table_dtype="uint8")
        served = serving.served_module(program)
        test_auc = train_saml.aucs(cfg["test"], scores(served, cfg["test"], device=device))
        rec = dict(serving_bytes(quantize_tables(model)), test_auc=test_auc, val_auc=None, epoch=None, lr=None,
                   train_s=None)
        del program, served
    else:
        train, val, test = cfg["train"], cfg["val"], cfg["test"]
        config_options = dict(scenario_rows=hashed_rows(train, opt.hash_fraction)) if opt.hash_fraction else None
        fit_args = types.SimpleNamespace(embedding_dim=16, hidden=[128, 64], epochs=cfg["epochs"],
                                         patience=cfg["patience"], seed_now=seed)
        batches = EpochBatches(train, 1024, seed, device)
        best = None
        for lr, elr in cfg["grid"]:
            r = train_saml.fit("SAML", train, val, batches, lr, elr, fit_args, device, log, opt.model_options,
                               config_options)
            if best is None or r["val_auc"] > best["val_auc"]:
                best = r
            del r
        model = best["model"]
        test_auc = train_saml.aucs(test, train_saml.predict(model, test, 4096, device))
        rec = dict(trained_bytes(model, best["optimizer"]), test_auc=test_auc, val_auc=best["val_auc"],
                   epoch=best["epoch"], lr=[best["lr"], best["embedding_lr"]], train_s=best["train_s"],
                   samples=best["samples"])
    rec.update(seed=seed, wall_s=time.perf_counter() - t0, load=os.getloadavg()[0],
               when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    log(f"  {opt.key:<8} seed {seed}: test AUC {rec['test_auc']['overall']:.4f}  tables {rec['tables'] / 2**20:.2f} "
        f"MiB  table state {rec['table_state'] / 2**20:.3f} MiB  ({rec['wall_s']:.0f} s)")
    return rec, (model if opt.key == "float32" else None)


def run_config(name: str, args, budget, records: dict, configs: dict, save) -> None:
    """Every asked option and seed of one configuration: records[(config, option, seed)] = record,
    configs[name] = its description; ``save()`` after every run (a long call that is cut keeps what it measured)."""
    cfg = load_config(name, args)
    info = dict(desc=cfg["desc"], train=len(cfg["train"]), val=len(cfg["val"]), test=len(cfg["test"]),
                grid=cfg["grid"], epochs=cfg["epochs"], patience=cfg["patience"],
                M=cfg["train"].num_scenarios,
                bayes_auc=None if cfg["test"].logit is None else train_saml.auc(cfg["test"].label, cfg["test"].logit))
    prev = configs.get(name, {})  # --update: the row counts of an earlier float32 run
    info.update(global_rows=prev.get("global_rows"), scenario_rows=prev.get("scenario_rows"))
    configs[name] = info
    print(f"bench_memory: {name}: {cfg['desc']}", flush=True)
    # the 8-bit export right after the float32 run, so the float32 model is not held through the other runs
    order = sorted(args.options, key=lambda k: (k != "float32", k != "uint8"))
    for seed in range(args.seed, args.seed + cfg["seeds"]):
        float_model = None
        for key in order:
            opt = BY_KEY[key]
            if key not in ("float32", "uint8"):
                float_model = None
            if opt.serving and float_model is None:
                print(f"  {key} seed {seed}: needs the float32 run of the same call (add float32 to --options)")
                continue
            if not budget.allows(f"{name} {key} seed {seed}"):
                continue
            try:
                rec, fm = run_option(opt, cfg, seed, args, float_model)
            except NotImplementedError as e:
                print(f"  {key}: not run ({e})")
                continue
            records[(name, key, seed)] = rec
            if fm is not None:
                float_model = fm
                emb = [m for m in fm.modules() if isinstance(m, ScenarioEmbedding)]
                info["global_rows"] = sum(m.global_weight.shape[0] for m in emb)
                info["scenario_rows"] = sum(m.scenario_weight.shape[0] * m.scenario_weight.shape[1] for m in emb)
            save()


# ------------------------------------------------------------------------------------------------ report

def _size(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.3f} MiB"


def _ms(values, signed=False) -> str:
    v = np.asarray(values, dtype=np.float64)
    f, g = ("+.5f", ".5f") if signed else (".4f", ".4f")  # differences are small: one more digit
    return f"{v.mean():{f}}" if v.size == 1 else f"{v.mean():{f}} ± {v.std(ddof=1):{g}}"


def summarize(config: str, records: dict) -> list:
    """One row per option measured for ``config``: bytes (the last seed's; they do not depend on the seed), test AUC
    mean ± sd over seeds, and the paired difference to float32 over the seeds both have."""
    rows = []
    base = {s: r for (c, k, s), r in records.items() if c == config and k == "float32"}
    for opt in OPTIONS:
        recs = sorted(((s, r) for (c, k, s), r in records.items() if c == config and k == opt.key))
        if not recs:
            continue
        last = recs[-1][1]
        total = last["tables"] + last["table_state"] + last["dense_state"]
        aucs = [r["test_auc"]["overall"] for _, r in recs]
        diffs = [r["test_auc"]["overall"] - base[s]["test_auc"]["overall"] for s, r in recs if s in base]
        rows.append(dict(option=opt.key, label=opt.label, tables=last["tables"], table_state=last["table_state"],
                         dense_state=last["dense_state"], dense_params=last["dense_params"], total=total,
                         seeds=[s for s, _ in recs], test_auc=aucs, diff=diffs,
                         epochs=[r["epoch"] for _, r in recs], lr=[r["lr"] for _, r in recs],
                         loads=[r["load"] for _, r in recs], when=sorted({r["when"][:10] for _, r in recs})))
    f32 = next((r for r in rows if r["option"] == "float32"), None)
    for r in rows:
        r["x_total"] = r["total"] / f32["total"] if f32 else None
        r["x_tables"] = r["tables"] / f32["tables"] if f32 else None
    return rows


def config_table(rows: list) -> str:
    out = []
    for r in rows:
        n = len(r["test_auc"])
        lr = "" if r["lr"][0] is None else ", ".join(sorted({f"{a:g}:{b:g}" for a, b in r["lr"]}))
        out.append([r["label"], _size(r["tables"]), _size(r["table_state"]), _size(r["dense_state"]),
                    _size(r["total"]), "" if r["x_total"] is None else f"{r['x_total']:.3f} ({r['x_tables']:.3f})",
                    f"{_ms(r['test_auc'])} (n={n})",
                    "" if r["option"] == "float32" else
                    (_ms(r["diff"], signed=True) if r["diff"] else "no float32 run"),
                    ",".join("-" if e is None else str(e) for e in r["epochs"]), lr or "-"])
    return harness.markdown_table(["option", "embedding tables", "optimizer state: tables (row-wise Adagrad)",
                                   "optimizer state: dense (Adam)", "total", "x vs float32: total (tables)",
                                   "test AUC, mean ± sd over seeds", "Δ AUC vs float32 (paired by seed)",
                                   "best epoch per seed", "lr (dense:emb)"], out)


def report(configs: dict, records: dict) -> tuple[str, dict]:
    parts = ["Written by `benchmarks/bench_memory.py` (its docstring has the protocol). SAML with each table "
             "option, trained by python/train_saml.py's loop (`fit`: validation-AUC early stopping, best epoch "
             "kept); bytes read from the trained model's tensors and its `TrainingOptimizer.state_dict()`. Total "
             "= tables + optimizer state; the dense parameters (the same for every option) are given per "
             "configuration. Δ AUC: test AUC minus the float32 run's with the same seed (same initial weights and "
             "batches), mean ± sd over seeds. The 8-bit row is the float32 run's model exported with "
             "`serving.export_saml(table_dtype=\"uint8\")` and scored through the exported program (serving holds "
             "no optimizer state)."]
    data = {"configs": {}, "records": []}
    for name, info in configs.items():
        rows = summarize(name, records)
        if not rows:
            continue
        dp = rows[0]["dense_params"]
        loads = [l for r in rows for l in r["loads"]]
        when = sorted({w for r in rows for w in r["when"]})
        parts += ["", f"## {name}: {info['desc']}", "",
                  f"{info['train']:,} training / {info['val']:,} validation / {info['test']:,} test samples; M = "
                  f"{info['M']}, D = 16, hidden 128-64; " +
                  (f"{info['global_rows']:,} global rows and {info['scenario_rows']:,} scenario rows (all M tables) "
                   "at one row per id; " if info.get("global_rows") else "") +
                  f"dense parameters {_size(dp)}. " +
                  (f"Bayes AUC (the true logit's, test split) {info['bayes_auc']:.4f}. " if info.get("bayes_auc") else "")
                  + f"Up to {info['epochs']} epoch(s), patience {info['patience']}, lr "
                  f"grid {', '.join(f'{a:g}:{b:g}' for a, b in info['grid'])} (Adam : row-wise Adagrad; the better "
                  f"on validation AUC kept per option and seed). Measured {', '.join(when)}, load "
                  f"{min(loads):.1f}-{max(loads):.1f}, one torch thread.", ""]
        if name == "large":
            parts += [f"**Training is bounded** (2-core shared VM): {info['train']:,} training samples, at most "
                      f"{info['epochs']} epochs ({info['epochs'] * info['train']:,} samples) per run, one lr pair. "
                      "The point of this configuration is the bytes at scale and an AUC that is measured; it is not "
                      "trained to convergence, so small AUC differences between options here are not "
                      "the converged cost.", ""]
        parts.append(config_table(rows))
        data["configs"][name] = dict(info, rows=rows)
    for (c, k, s), r in sorted(records.items()):
        data["records"].append(dict(r, config=c, option=k, seed=s))
    return "\n".join(parts) + "\n", data


def _load_records(path: str) -> tuple[dict, dict]:
    if not os.path.exists(path):
        return {}, {}
    with open(path) as f:
        d = json.load(f)["data"]
    recs = {(r["config"], r["option"], r["seed"]): {k: v for k, v in r.items() if k not in ("config", "option", "seed")}
            for r in d["records"]}
    return recs, {n: {k: v for k, v in c.items() if k != "rows"} for n, c in d["configs"].items()}


def parser():
    p = harness.make_parser(__doc__.split("\n")[0], threads=1,
                            quick_help="3,000 synthetic samples, one epoch, one seed (smoke test; results to a "
                            "temporary folder unless --out-dir is given)",
                            gpu_help="train and score on CUDA (not run on a GPU yet)")
    p.add_argument("--configs", nargs="+", choices=("movielens", "large"), default=["movielens", "large"])
    p.add_argument("--options", nargs="+", choices=list(BY_KEY), default=list(BY_KEY),
                   help="table options to run (uint8 needs float32 in the same call)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the movielens configuration (0, 1, ...)")
    p.add_argument("--large-seeds", type=int, default=1, help="seeds of the large configuration")
    p.add_argument("--seed", type=int, default=0, help="first seed (with --update: add seeds to earlier runs)")
    p.add_argument("--large-samples", type=int, default=600_000, help="samples of the large configuration")
    p.add_argument("--epochs", type=int, default=8, help="maximum epochs of the movielens configuration")
    p.add_argument("--update", action="store_true", help="merge into the existing results .json (same --out-dir)")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json, run nothing")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.seeds < 1 or args.large_seeds < 1 or args.epochs < 1 or args.large_samples < 1000:
        p.error("--seeds, --large-seeds, --epochs must be >= 1 and --large-samples >= 1000")
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu: CUDA is not available")
    args.device = "cuda" if args.gpu else "cpu"
    out_dir = args.out_dir
    stem = harness.result_stem("memory", args)
    update = args.update or args.render_only
    records, configs = _load_records(os.path.join(out_dir, stem + ".json")) if update else ({}, {})
    budget = harness.TimeBudget(args.budget_s)

    def save():
        body, data = report(configs, records)
        return body, harness.write_results(stem, "Memory of SAML's tables: bytes and held-out AUC per table option",
                                           body + budget.note(), data, out_dir=out_dir)

    for name in [] if args.render_only else (["quick"] if args.quick else args.configs):
        run_config(name, args, budget, records, configs, save)
    body, paths = save()
    print(body + budget.note())
    print(f"wrote {paths['md']} and {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
