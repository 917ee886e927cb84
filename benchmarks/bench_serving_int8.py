"""8-bit row-wise serving tables: what they save, what they cost in AUC, how fast they look up.

1. Accuracy on the main job's data (MovieLens-100K, time split; synthetic with --quick or when MovieLens cannot be
   had): SAML as in python/train_saml.py (D = 16, hidden 128-64, mutual unit at layer 0, row-wise Adagrad tables,
   lr 3e-3 : 0.05, batch 1024), trained --epochs epochs, keeping the epoch with the best validation AUC. Then the
   float model in eager mode against the 8-bit program (``serving.export_saml(table_dtype="uint8")``, saved and
   reloaded with ``serving.load_exported``) on the held-out test split: AUC of each, logits' max / mean |diff|,
   the tables' bytes (float32 vs uint8 rows + scale + bias), the .pt2 files' bytes, and per-batch serving time.
2. Lookup speed at a realistic size: B = 4096, 16 features x 50,000 rows, 8 of them scenario-aware, M = 3, D = 32,
   one-hot and bags of 4: ``scenario_embedding_bag`` (float32, the C++ kernel) against
   ``scenario_embedding_bag_8bit`` (FBGEMM's 8-bit kernel), forward only, medians of alternating calls.

One torch thread (as the main job; ``--threads N`` for another count). Writes
benchmarks/results/serving_int8_<machine>[_t<threads>].md (``harness.result_stem``; with --quick ``..._quick.md`` in a
temporary folder unless --out-dir is given).
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import harness  # noqa: E402
from train_saml import auc  # noqa: E402

import saml_kernels as sk  # noqa: E402
from saml_kernels import data as sdata  # noqa: E402
from saml_kernels import serving  # noqa: E402
from saml_kernels.nn import SAML, SAMLConfig, TrainingOptimizer  # noqa: E402
from saml_kernels.ops import scenario_embedding_bag_8bit as q8  # noqa: E402
from saml_kernels.quantized import QuantizedScenarioEmbedding, first_order_bound, quantize_tables, table_bytes  # noqa: E402


def load(quick: bool):
    if not quick:
        try:
            s = sdata.load_movielens(fetch=False, scenario_feature=True)
            return f"MovieLens-100K ({s.source}; split by time)", s.train, s.val, s.test
        except (sdata.MovieLensUnavailable, sdata.MovieLensFormatError) as e:
            print(f"bench_serving_int8: MovieLens-100K cannot be had, synthetic data instead ({e})")
    full = sdata.make_synthetic(3000 if quick else 50_000, seed=0).with_scenario_feature()
    train, held = full.split(0.2, seed=0)
    val, test = held.split(0.5, seed=1)
    return "synthetic", train, val, test


def scores(fn, data, batch_size=4096):
    out = []
    with torch.no_grad():
        for b in data.batches(batch_size):
            out.append(fn(*b.inputs())[0].float().numpy())
    return np.concatenate(out)


def train(trn, val, epochs):
    torch.manual_seed(0)
    cfg = SAMLConfig.from_data(trn, embedding_dim=16, attention_dim=16, aux_hidden=(128, 64), branch_hidden=(128, 64),
                               mutual_layers=(0,), dropout=0.0)
    model = SAML(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=0.05)
    opt = TrainingOptimizer(model, 3e-3, 0.05)
    best = (-1.0, None, 0)
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        for b in trn.batches(1024, shuffle=True, seed=ep):
            opt.zero_grad(set_to_none=True)
            model.loss(b).backward()
            opt.step()
        model.eval()
        v = auc(val.label, scores(model, val))
        if v > best[0]:
            best = (v, copy.deepcopy(model.state_dict()), ep + 1)
    model.load_state_dict(best[1])
    return model.eval(), best[0], best[2], time.perf_counter() - t0


def accuracy(args):
    desc, trn, val, test = load(args.quick)
    model, val_auc, epoch, train_s = train(trn, val, 1 if args.quick else args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        example = test.batch(np.arange(16))
        p32 = serving.export_saml(model, example, os.path.join(tmp, "f32.pt2"))
        p8 = serving.export_saml(model, example, os.path.join(tmp, "u8.pt2"), table_dtype="uint8")
        size32, size8 = os.path.getsize(os.path.join(tmp, "f32.pt2")), os.path.getsize(os.path.join(tmp, "u8.pt2"))
        served8 = serving.load_exported(os.path.join(tmp, "u8.pt2"))
        served32 = serving.load_exported(os.path.join(tmp, "f32.pt2"))
    del p32, p8
    s_float = scores(model, test)
    s_8 = scores(served8, test)
    s_32 = scores(served32, test)
    qmodel = quantize_tables(model)
    halves = torch.cat([q8.scale_bias(m.global_packed)[0].flatten() / 2 for m in qmodel.modules()
                        if isinstance(m, QuantizedScenarioEmbedding)] +
                       [q8.scale_bias(m.scenario_packed)[0].flatten() / 2 for m in qmodel.modules()
                        if isinstance(m, QuantizedScenarioEmbedding)])
    tb32, tb8 = table_bytes(model)["float"], table_bytes(qmodel)["uint8"]
    d = np.abs(s_8.astype(np.float64) - s_float)
    bound = np.concatenate([first_order_bound(model, qmodel, b).numpy() for b in test.batches(2048)])
    a_float, a_8 = auc(test.label, s_float), auc(test.label, s_8)
    per_scen = []
    for m in range(test.num_scenarios):
        sel = test.scenario == m
        name = test.scenario_names[m] if test.scenario_names else f"scenario{m}"
        per_scen.append((name, int(sel.sum()), auc(test.label[sel], s_float[sel]), auc(test.label[sel], s_8[sel])))
    # serving time per batch of 1024: the float program vs the 8-bit program (both exported, medians)
    b = test.batch(np.arange(min(1024, len(test))))
    inputs = b.inputs()
    with torch.no_grad():
        t = harness.time_alternating({"float32 program": lambda: served32(*inputs),
                                      "8-bit program": lambda: served8(*inputs)},
                                     reps=args.reps or (5 if args.quick else 25))
    return dict(desc=desc, train=len(trn), val=len(val), test=len(test), epoch=epoch, val_auc=val_auc,
                train_s=train_s, auc_float=a_float, auc_8=a_8, auc_32_program=auc(test.label, s_32),
                max_diff=float(d.max()), mean_diff=float(d.mean()), max_diff_32=float(np.abs(s_32 - s_float).max()),
                tb32=tb32, tb8=tb8, size32=size32, size8=size8, half_max=float(halves.max()),
                half_mean=float(halves.mean()), per_scen=per_scen, bound_max=float(bound.max()),
                bound_mean=float(bound.mean()), ratio_max=float((d / bound).max()),
                within=float((d <= bound).mean()), serve_ms=t["medians_ms"], batch=len(b),
                D=model.config.embedding_dim)


def lookup_speed(args):
    F, rows, aware, M, D, B = (4, 2000, 2, 3, 32, 256) if args.quick else (16, 50_000, 8, 3, 32, 4096)
    dev = "cuda" if args.gpu else "cpu"
    g = torch.Generator().manual_seed(0)
    fr = [rows * f for f in range(F + 1)]
    fsr = [rows * min(f, aware) for f in range(F + 1)]
    G = torch.randn(fr[-1], D, generator=g) * 0.1
    S = torch.randn(M, fsr[-1], D, generator=g) * 0.1
    Gq, Sq = q8.quantize_rows(G).to(dev), q8.quantize_rows(S).to(dev)
    G, S = G.to(dev), S.to(dev)
    tbe = _fbgemm_tbe(F + aware, [rows] * F + [M * rows] * aware, D) if dev == "cpu" else None
    out = []
    for L in (1, 4):
        ids = torch.randint(0, rows, (F * B * L,), generator=g).to(dev)
        offsets = torch.arange(0, F * B * L + 1, L).to(dev)
        scen = torch.randint(0, M, (B,), generator=g).to(dev)
        providers = {
            "float32": lambda: sk.scenario_embedding_bag(ids, offsets, scen, G, S, fr, fsr),
            "8-bit": lambda: q8.scenario_embedding_bag_8bit(ids, offsets, scen, Gq, Sq, fr, fsr),
            "eager-embbag": lambda: _eager_embbag(ids, offsets, scen, G, S, F, B, L, rows, aware, M),
        }
        with torch.no_grad():  # the eager twin computes what the op computes
            torch.testing.assert_close(_eager_embbag(ids, offsets, scen, G, S, F, B, L, rows, aware, M),
                                       sk.scenario_embedding_bag(ids, offsets, scen, G, S, fr, fsr))
        if tbe is not None:
            providers["fbgemm-tbe-int8"] = lambda: _tbe_call(tbe, ids, offsets, scen, F, B, L, rows, aware)
        with torch.no_grad():
            t = harness.time_alternating(providers, reps=args.reps or (5 if args.quick else 30), device=dev)
        out.append((L, {n: t["medians_ms"][n] for n in providers}, t["ratios"][("float32", "8-bit")]))
    be = sk._backend.resolve(q8.OP, dev)
    return dict(F=F, rows=rows, aware=aware, M=M, D=D, B=B, rows_out=out, device=dev, backend8=be,
                backend32=sk._backend.resolve("scenario_embedding_bag", dev),
                bytes32=(G.nbytes + S.nbytes), bytes8=(Gq.nbytes + Sq.nbytes))


def _eager_embbag(ids, offsets, scen, G, S, F, B, L, rows, aware, M):
    """Two F.embedding_bag calls on the float32 tables (global ids shifted by feature, scenario ids by feature and
    scenario on the flattened [M * Rs, D] table), outputs [B, F, D] / [B, Fs, D] contiguous."""
    fnn = torch.nn.functional
    shift = torch.arange(F).repeat_interleave(B * L) * rows
    g = fnn.embedding_bag(ids + shift, G, offsets[:-1], mode="sum").reshape(F, B, -1).transpose(0, 1).contiguous()
    n = aware * B * L
    srow = ids[:n] + shift[:n] + scen.repeat_interleave(L).repeat(aware) * (aware * rows)
    s = fnn.embedding_bag(srow, S.reshape(-1, S.shape[-1]), offsets[:aware * B], mode="sum")
    return g, s.reshape(aware, B, -1).transpose(0, 1).contiguous()


def _fbgemm_tbe(T, rows, D):
    """FBGEMM's inference TBE with INT8 row-wise tables on the CPU (fbgemm-gpu-cpu), float32 output, random
    weights: T tables (the F global ones, then one [M * rows] table per aware feature). None without fbgemm_gpu."""
    try:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
    except Exception as e:  # noqa: BLE001 - any import failure means: no such provider here
        print(f"bench_serving_int8: no FBGEMM TBE ({type(e).__name__}: {e})")
        return None
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[("", r, D, SparseType.INT8, EmbeddingLocation.HOST) for r in rows], device="cpu",
        pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32)
    tbe.fill_random_weights()
    return tbe


def _tbe_call(tbe, ids, offsets, scen, F, B, L, rows, aware):
    """The same lookups through the TBE: F global tables + the aware features' scenario tables (id + s * rows);
    TBE takes int32 ids and table-major offsets. Index arithmetic inside the timed region, as for the others."""
    n = aware * B * L
    sids = ids[:n] + scen.repeat_interleave(L).repeat(aware) * rows
    all_ids = torch.cat([ids, sids]).int()
    all_off = torch.arange(0, (F + aware) * B * L + 1, L, dtype=torch.int32)
    return tbe(all_ids, all_off)


def memory_rows(acc) -> list:
    """Table bytes (+ row-wise Adagrad state, one float32 per row, what training holds) of the measured MovieLens
    model and, by the layout's formula (nothing allocated), of a large configuration: 10M global rows, 5M of them
    scenario-aware, M = 4, D = 16 and 64."""
    out = [["MovieLens-100K SAML (measured)", acc["D"], f"{acc['tb32'] / 2**20:.2f} MiB",
            f"{(acc['tb32'] + acc['tb32'] // acc['D']) / 2**20:.2f} MiB", f"{acc['tb8'] / 2**20:.2f} MiB",
            f"{acc['tb8'] / acc['tb32']:.3f}", f"{acc['auc_float']:.5f} / {acc['auc_8']:.5f}"]]
    for D in (16, 64):
        n_rows = 10_000_000 + 4 * 5_000_000
        f32, state, u8 = n_rows * D * 4, n_rows * 4, n_rows * (D + q8.ROW_EXTRA)
        out.append([f"10M global + 4 x 5M scenario rows (formula)", D, f"{f32 / 2**30:.2f} GiB",
                    f"{(f32 + state) / 2**30:.2f} GiB", f"{u8 / 2**30:.2f} GiB", f"{u8 / f32:.3f}",
                    "not measured"])
    return out


def report(acc, spd, info) -> str:
    mb = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    lines = [f"# 8-bit row-wise serving tables ({info['cpu']}, {info['torch_threads']} torch thread(s), "
             f"torch {info['torch']}, load {info['loadavg_1m']:.1f})", "",
             "Written by `benchmarks/bench_serving_int8.py` (see its docstring for the protocol).", "",
             f"## Accuracy: {acc['desc']}", "",
             f"SAML (D = {acc['D']}, hidden 128-64, mutual unit at layer 0, row-wise Adagrad tables), "
             f"{acc['train']} training / {acc['val']} validation / {acc['test']} test samples, best validation "
             f"epoch {acc['epoch']} (validation AUC {acc['val_auc']:.4f}, {acc['train_s']:.0f} s of training). "
             "Test split, the float model in eager mode against the exported 8-bit program (saved, reloaded with "
             "`serving.load_exported`):", "",
             harness.markdown_table(["", "float32 tables", "8-bit row-wise tables", "difference"], [
                 ["test AUC", f"{acc['auc_float']:.5f}", f"{acc['auc_8']:.5f}",
                  f"{acc['auc_8'] - acc['auc_float']:+.5f}"],
                 ["embedding table bytes", mb(acc["tb32"]), mb(acc["tb8"]), f"x {acc['tb8'] / acc['tb32']:.3f}"],
                 [".pt2 program bytes", mb(acc["size32"]), mb(acc["size8"]), f"x {acc['size8'] / acc['size32']:.3f}"],
                 [f"serving time per batch of {acc['batch']} (median, exported programs)",
                  f"{acc['serve_ms']['float32 program']:.2f} ms", f"{acc['serve_ms']['8-bit program']:.2f} ms", ""],
             ]), "",
             f"Main logits, 8-bit program vs float model: max |diff| = {acc['max_diff']:.2e}, mean |diff| = "
             f"{acc['mean_diff']:.2e} (the float32 program vs the float model: max {acc['max_diff_32']:.1e}). Per "
             f"element, an 8-bit table value is within scale / 2 of the float value: max {acc['half_max']:.2e}, mean "
             f"{acc['half_mean']:.2e} over the rows here. The first-order bound these give per sample "
             "(`quantized.first_order_bound`: sum over the embedding outputs of |d logit / d e| x the bag's pooled "
             f"scale / 2): max {acc['bound_max']:.2e}, mean {acc['bound_mean']:.2e}; measured |diff| / bound: max "
             f"{acc['ratio_max']:.2f}, {100 * acc['within']:.1f} % of the test samples within the bound "
             "(tests/test_serving_int8.py asserts |diff| <= 2 x bound on synthetic data).", "",
             harness.markdown_table(["scenario", "test samples", "AUC float32", "AUC 8-bit"],
                                    [[n, c, f"{a:.5f}", f"{b:.5f}"] for n, c, a, b in acc["per_scen"]]), "",
             "## Memory", "",
             "Embedding tables only (the dense layers are the same in both); training also holds the row-wise "
             "Adagrad state (one float32 per row), serving holds none:", "",
             harness.markdown_table(["configuration", "D", "float32 tables", "float32 tables + Adagrad state",
                                     "8-bit tables", "8-bit / float32", "test AUC float32 / 8-bit"],
                                    memory_rows(acc)), "",
             f"## Lookup speed ({spd['device']})", "",
             f"B = {spd['B']}, {spd['F']} features x {spd['rows']:,} rows, {spd['aware']} scenario-aware, M = "
             f"{spd['M']}, D = {spd['D']}; tables {mb(spd['bytes32'])} float32, {mb(spd['bytes8'])} 8-bit. Forward "
             f"only, medians of alternating calls: `scenario_embedding_bag` ({spd['backend32']} backend, float32), "
             f"`scenario_embedding_bag_8bit` ({spd['backend8']} backend), two `F.embedding_bag` calls on the float32 "
             "tables (eager-embbag) and FBGEMM's inference TBE with INT8 tables (fbgemm-tbe-int8, fbgemm-gpu-cpu: "
             "16 global + 8 scenario tables of M x rows; its rows carry a float16 scale and bias, 4 bytes less "
             "than torch's layout; float32 output). Index arithmetic is inside every timed call.", "",
             harness.markdown_table(["ids per bag"] + [f"{n} ms" for n in spd["rows_out"][0][1]]
                                    + ["float32 / 8-bit (median of ratios)"],
                                    [[L] + [f"{v:.2f}" for v in ms.values()] + [f"{r:.2f}"]
                                     for L, ms, r in spd["rows_out"]]),
             "", "The times (not the AUCs, bytes or logits) move with the machine's load, given in the title: on a "
             "shared machine compare the ratios, measured on alternating calls, rather than the milliseconds."]
    return "\n".join(lines) + "\n"


def parser():
    # gpu_check.sh passes every benchmark the same flags: this one has no torch.compile column and a fixed, short
    # list of cases (one training run, one speed table), so --no-compile and --budget-s have nothing to do here.
    p = harness.make_parser(__doc__.split("\n")[0], threads=1, quick_help="small synthetic run (smoke test, to a "
                            "temporary folder)", gpu_help="lookup speed on CUDA (Triton 8-bit kernel)")
    p.add_argument("--epochs", type=int, default=3)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    acc = accuracy(args)
    spd = lookup_speed(args)
    text = report(acc, spd, harness.machine_info())
    print(text)
    stem = harness.result_stem("serving_int8", args)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, stem + ".md")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
