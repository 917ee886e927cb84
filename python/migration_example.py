#!/usr/bin/env python3
"""Migrating a plain PyTorch multi-scenario model to the drop-in layers of saml_kernels.

``PublicModel`` is written the way public multi-scenario code (Scenario-Wise-Rec, MMLRec, ...) writes it: one
``nn.Embedding`` per feature, per-scenario embedding tables for the scenario-aware features, one MLP tower per
scenario, and a loop over the scenarios that runs each tower on the *whole* batch and keeps its rows with
``torch.where`` (M times the necessary FLOPs).

``DropInModel`` is the same model on ``saml_kernels.nn``: one ``ScenarioEmbedding`` (global + scenario tables in one
fused lookup) and ``MultiBranchLinear`` layers (route "own": each sample runs only its own tower, a grouped GEMM).
``convert()`` copies the weights over (tables concatenated in feature order, tower weights stacked and
transposed to [M, K, N]); the script checks that outputs and every gradient agree, then times a training step.

    python python/migration_example.py [--quick] [--batch 4096]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saml_kernels.nn import MultiBranchLinear, ScenarioEmbedding  # noqa: E402


# ------------------------------------------------------------------------------------- before: public style

class PublicModel(nn.Module):
    """vocab: rows per feature; aware: which features also have per-scenario tables; towers: hidden sizes."""

    def __init__(self, vocab, aware, num_scenarios, dim, hidden):
        super().__init__()
        self.vocab, self.aware, self.M = list(vocab), list(aware), num_scenarios
        self.embs = nn.ModuleList(nn.Embedding(v, dim) for v in vocab)
        self.scenario_embs = nn.ModuleList(
            nn.ModuleList(nn.Embedding(vocab[f], dim) for f in self.aware_ids) for _ in range(num_scenarios))
        k = (len(vocab) + len(self.aware_ids)) * dim
        self.towers = nn.ModuleList()
        for _ in range(num_scenarios):
            layers, kk = [], k
            for h in hidden:
                layers += [nn.Linear(kk, h), nn.ReLU()]
                kk = h
            layers.append(nn.Linear(kk, 1))
            self.towers.append(nn.Sequential(*layers))

    @property
    def aware_ids(self):
        return [f for f, a in enumerate(self.aware) if a]

    def forward(self, ids, scenario):
        """ids [B, F] (one id per feature), scenario [B] -> logit [B]."""
        e_g = torch.stack([emb(ids[:, f]) for f, emb in enumerate(self.embs)], 1)
        e_s = None
        for m in range(self.M):  # every scenario's tables on the whole batch, rows picked by torch.where
            e_m = torch.stack([t(ids[:, f]) for t, f in zip(self.scenario_embs[m], self.aware_ids)], 1)
            sel = (scenario == m).view(-1, 1, 1)
            e_s = e_m if e_s is None else torch.where(sel, e_m, e_s)
        x = torch.cat([e_g.flatten(1), e_s.flatten(1)], 1)
        out = None
        for m in range(self.M):  # every tower on the whole batch
            y = self.towers[m](x).squeeze(-1)
            out = y if out is None else torch.where(scenario == m, y, out)
        return out


# ------------------------------------------------------------------------------------- after: drop-in layers

class DropInModel(nn.Module):
    def __init__(self, vocab, aware, num_scenarios, dim, hidden):
        super().__init__()
        feats = [(f"f{i}", v, a, "sum") for i, (v, a) in enumerate(zip(vocab, aware))]
        self.embedding = ScenarioEmbedding(feats, num_scenarios, dim)
        k = (len(vocab) + sum(aware)) * dim
        self.layers = nn.ModuleList()
        for h in hidden:
            self.layers.append(MultiBranchLinear(k, h, num_scenarios, activation="relu", route="own"))
            k = h
        self.head = MultiBranchLinear(k, 1, num_scenarios, route="own")

    def forward(self, ids, scenario):
        B, F = ids.shape
        # [B, F] one-hot ids -> feature-major jagged layout (TorchRec KeyedJaggedTensor order)
        indices = ids.t().reshape(-1)
        offsets = torch.arange(F * B + 1, dtype=indices.dtype, device=ids.device)
        e_g, e_s = self.embedding(indices, offsets, scenario)
        x = torch.cat([e_g.flatten(1), e_s.flatten(1)], 1)
        for layer in self.layers:
            x = layer(x, scenario)
        return self.head(x, scenario).squeeze(-1)


@torch.no_grad()
def convert(public: PublicModel, dropin: DropInModel) -> DropInModel:
    """Copy PublicModel's weights into DropInModel: tables in feature order, towers stacked as [M, K, N]."""
    dropin.embedding.global_weight.copy_(torch.cat([e.weight for e in public.embs]))
    dropin.embedding.scenario_weight.copy_(
        torch.stack([torch.cat([e.weight for e in tables]) for tables in public.scenario_embs]))
    linears = [[l for l in tower if isinstance(l, nn.Linear)] for tower in public.towers]
    for j, layer in enumerate([*dropin.layers, dropin.head]):
        layer.weight.copy_(torch.stack([lins[j].weight.t() for lins in linears]))
        layer.bias.copy_(torch.stack([lins[j].bias for lins in linears]))
    return dropin


def mapped_grads(public: PublicModel):
    """PublicModel's gradients in DropInModel's layout (for the comparison)."""
    g = {"embedding.global_weight": torch.cat([e.weight.grad for e in public.embs]),
         "embedding.scenario_weight": torch.stack([torch.cat([e.weight.grad for e in t])
                                                   for t in public.scenario_embs])}
    linears = [[l for l in tower if isinstance(l, nn.Linear)] for tower in public.towers]
    n = len(linears[0])
    for j in range(n):
        name = f"layers.{j}" if j < n - 1 else "head"
        g[f"{name}.weight"] = torch.stack([lins[j].weight.grad.t() for lins in linears])
        g[f"{name}.bias"] = torch.stack([lins[j].bias.grad for lins in linears])
    return g


def time_steps(models: dict, ids, scenario, label, reps: int) -> dict:
    """Median ms of one training step (forward, BCE, backward, SGD) per model, timed alternately."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
    bce = nn.functional.binary_cross_entropy_with_logits
    times = {k: [] for k in models}
    for r in range(reps + 1):
        for k, m in models.items():
            t = time.perf_counter()
            opts[k].zero_grad()
            bce(m(ids, scenario), label).backward()
            opts[k].step()
            if r:  # the first round is warm-up
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (a smoke run)")
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        vocab, aware, M, D, hidden, B, reps = [50, 40, 30, 20], [True, True, False, False], 3, 8, (16, 8), 256, 2
    else:
        vocab, aware, M, D, hidden, B, reps = ([20000, 50000, 1000, 100, 500, 3000], [True, True, False, False,
                                               False, True], 4, 16, (256, 128), 4096, 7)
    B = args.batch or B
    public = PublicModel(vocab, aware, M, D, hidden)
    dropin = convert(public, DropInModel(vocab, aware, M, D, hidden))
    ids = torch.stack([torch.randint(0, v, (B,)) for v in vocab], 1)
    scenario = torch.randint(0, M, (B,))
    label = torch.randint(0, 2, (B,)).float()

    # 1. equal outputs and gradients
    out_p, out_d = public(ids, scenario), dropin(ids, scenario)
    bce = nn.functional.binary_cross_entropy_with_logits
    bce(out_p, label).backward()
    bce(out_d, label).backward()
    worst_out = (out_p - out_d).abs().max().item()
    gp = mapped_grads(public)
    worst_grad = max(((gp[n] - q.grad).abs().max() / gp[n].abs().max().clamp_min(1e-12)).item()
                     for n, q in dropin.named_parameters())
    ok = worst_out < 1e-4 and worst_grad < 1e-3
    print(f"outputs max |diff| = {worst_out:.2e}, gradients max relative diff = {worst_grad:.2e}: "
          f"{'equal (fp32 tolerance)' if ok else 'NOT EQUAL'}")
    if not ok:
        raise SystemExit(1)

    # 2. time a training step
    ms = time_steps({"public (loop + torch.where)": public, "drop-in saml_kernels": dropin}, ids, scenario, label,
                    reps)
    base = ms["public (loop + torch.where)"]
    print(f"training step, B={B}, M={M}, {len(vocab)} features ({sum(aware)} scenario-aware), towers {hidden}:")
    for k, v in ms.items():
        print(f"  {k:30s} {v:9.1f} ms   {base / v:5.2f}x")
    return ms


if __name__ == "__main__":
    main()
