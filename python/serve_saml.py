#!/usr/bin/env python3
"""Serve a trained SAML: export it with torch.export (optionally AOTInductor), reload it, score Ali-CCP rows.

    python python/serve_saml.py                  # train briefly on data/ali_ccp, export, reload, score
    python python/serve_saml.py --aoti           # also compile an AOTInductor package and score with it
    python python/serve_saml.py --score-only [--csv FILE.csv] [--batch-size B]
        # only load the artifact of an earlier run (``--out``) and score the first B rows of FILE.csv

Writes ``<out>/saml.pt2`` (``torch.export`` program), ``<out>/vocab.json`` (the raw-id -> row maps the model was
trained with; scoring maps new rows through them) and, with ``--aoti``, ``<out>/saml_aoti.pt2``. ``--out``
defaults to ``./saml_run/serve`` under the current directory. The serving side needs ``import saml_kernels``
(the custom ops and the compiled extension), nothing else from training.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from saml_kernels import serving  # noqa: E402
from saml_kernels.data import AliCCPVocab, load_ali_ccp  # noqa: E402
from saml_kernels.nn import SAML, SAMLConfig, TrainingOptimizer  # noqa: E402

ALI_DIR = ROOT / "data" / "ali_ccp"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="saml_run/serve", help="artifact directory (default ./saml_run/serve)")
    p.add_argument("--train-csv", default=str(ALI_DIR / "ali_ccp_train_sample.csv"))
    p.add_argument("--csv", default=str(ALI_DIR / "ali_ccp_val_sample.csv"), help="rows to score")
    p.add_argument("--batch-size", type=int, default=16, help="rows of --csv to score (the batch is dynamic)")
    p.add_argument("--steps", type=int, default=30, help="training steps before the export")
    p.add_argument("--aoti", action="store_true", help="also build and score with an AOTInductor package")
    p.add_argument("--score-only", action="store_true", help="load the artifact in --out, do not train")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def save_vocab(vocab: AliCCPVocab, path: Path) -> None:
    blob = {"sparse": {c: {str(k): v for k, v in m.items()} for c, m in vocab.sparse.items()},
            "scenario": {str(k): v for k, v in vocab.scenario.items()}}
    path.write_text(json.dumps(blob))


def load_vocab(path: Path) -> AliCCPVocab:
    blob = json.loads(path.read_text())
    return AliCCPVocab(sparse={c: {int(k): v for k, v in m.items()} for c, m in blob["sparse"].items()},
                       scenario={int(k): v for k, v in blob["scenario"].items()})


def train_and_export(args, out: Path):
    """Trains a small SAML on the training CSV and writes the artifacts; returns (model, vocab)."""
    torch.manual_seed(args.seed)
    train, vocab = load_ali_ccp(args.train_csv)
    cfg = SAMLConfig.from_data(train, embedding_dim=8, attention_dim=8, aux_hidden=(32, 16), branch_hidden=(32, 16),
                               mutual_layers=(0,), dropout=0.0)
    model = SAML(cfg, embedding_optimizer="rowwise_adagrad")
    opt = TrainingOptimizer(model, lr=3e-3)
    batches = list(train.batches(32, shuffle=True, seed=args.seed))
    for step in range(args.steps):
        opt.zero_grad()
        model.loss(batches[step % len(batches)]).backward()
        opt.step()
    model.eval()
    t0 = time.perf_counter()
    serving.export_saml(model, train.batch(np.arange(min(32, len(train)))), out / "saml.pt2")
    print(f"exported {out / 'saml.pt2'}  ({time.perf_counter() - t0:.1f} s, {args.steps} training steps first)")
    save_vocab(vocab, out / "vocab.json")
    if args.aoti:
        t0 = time.perf_counter()
        serving.aoti_package(out / "saml.pt2", out / "saml_aoti.pt2")
        print(f"compiled {out / 'saml_aoti.pt2'} with AOTInductor ({time.perf_counter() - t0:.1f} s)")
    return model


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = None if args.score_only else train_and_export(args, out)
    if not (out / "saml.pt2").exists():
        sys.exit(f"serve_saml: no artifact at {out / 'saml.pt2'}; run without --score-only first")

    # The serving side: the artifact, the vocabulary and saml_kernels; no model code, no config.
    data, _ = load_ali_ccp(args.csv, vocab=load_vocab(out / "vocab.json"))
    n = max(1, min(args.batch_size, len(data)))
    batch = data.batch(np.arange(n))
    runners = [("exported program", serving.load_exported(out / "saml.pt2"))]
    if args.aoti or (args.score_only and (out / "saml_aoti.pt2").exists()):
        runners.append(("AOTInductor package", serving.load_aoti(out / "saml_aoti.pt2")))
    for name, fn in runners:
        t0 = time.perf_counter()
        p_click, p_aux = serving.sigmoid_scores(fn, batch)
        ms = (time.perf_counter() - t0) * 1e3
        print(f"\n{name}: scored {n} rows of {Path(args.csv).name} in {ms:.1f} ms")
        print("  row  scenario  click  p(click)  p(aux head)")
        for i in range(min(n, 8)):
            print(f"  {i:3d}  {int(batch.scenario[i]):8d}  {int(batch.label[i]):5d}  {float(p_click[i]):8.4f}  "
                  f"{float(p_aux[i]):11.4f}")
        if model is not None:
            e_click, e_aux = serving.sigmoid_scores(model, batch)
            diff = max(float((p_click - e_click).abs().max()), float((p_aux - e_aux).abs().max()))
            print(f"  max |exported - eager| = {diff:.3g}")


if __name__ == "__main__":
    main()
