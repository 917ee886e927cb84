"""SAML under torch.distributed: TorchRec sharding (production), and data-parallel / hand-written row-wise
fallbacks for machines without TorchRec / FBGEMM (docs/distributed.md says which to use when).

Four ways to train the same model on W processes (gloo on CPU, nccl on GPUs), all ending with the parameters
of single-process training on the same global batches (each rank takes a contiguous slice of every batch):

  --mode torchrec         saml_kernels.torchrec.shard_saml: TorchRec's planner and DistributedModelParallel shard
                          the tables (--sharding table_wise | row_wise | ...; FBGEMM kernels, fused SGD applied in
                          the backward); the dense part runs on this package's kernels under DDP.
  --mode excluded         fallback: the embedding tables are excluded from DDP
                          (DDP._set_params_and_buffers_to_ignore_for_model) and their dense gradients are
                          all-reduced by hand after backward; DDP all-reduces everything else.
  --mode excluded-sparse  fallback: the same with sparse=True tables: the sparse COO gradients are all-reduced by
                          hand (gloo supports sparse all-reduce; NCCL does not). Handing sparse-gradient tables to
                          DDP itself fails: DDP only expects sparse gradients from nn.Embedding / nn.EmbeddingBag
                          ("Cannot access storage of SparseTensorImpl" in its reducer).
  --mode rowwise          fallback: the tables are sharded row-wise by hand (RowWiseShardedScenarioEmbedding):
                          rank r owns a contiguous row range of every feature (in the global table and, for aware
                          features, in every scenario table). Ids are routed to their owner with all_to_all, the
                          owner pools its partial sums, and the partial bags come back with a second all_to_all
                          (summed at the sample's rank). Dense parts in DDP.

    python python/ddp_example.py --mode torchrec --sharding row_wise --world 2 --steps 5
    python python/ddp_example.py --mode rowwise --world 2 --steps 5     # trains, checks against 1 process

The fallbacks train tables with gradients (SAML(cfg), no fused optimizer). A model built with
``embedding_optimizer=...`` updates its tables inside its backward, which DDP never sees: under plain DDP it raises
at the first forward (its replicas' tables would diverge); --mode torchrec keeps the fused optimizer, sharded.

The example is importable: tests/test_distributed.py runs every mode (torchrec when it imports).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: its collectives take ``group=group.WORLD`` as a default
# argument, evaluated at import. Imported after init_process_group (DDP's constructor imports it), that default
# holds the default group past destroy_process_group; gloo's threads then live into interpreter shutdown, where
# one releasing a finished collective's tensors needs the GIL and aborts the process ("terminate called without
# an active exception"). A group must be gone before the rank exits: nothing may hold it (this import), and what
# holds it in reference cycles is collected (train_distributed).
import torch.distributed.nn.functional as dist_nn
import torch.multiprocessing as mp
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import saml_kernels  # noqa: E402
from saml_kernels.training import saml_loss  # noqa: E402

EMB_PREFIXES = ("embedding.", "sequence_embedding.")
MODES = ("torchrec", "excluded", "excluded-sparse", "rowwise")


# =========================================================================================== sharded tables

def _all_to_all(x: Tensor, send_splits, recv_splits, group=None) -> Tensor:
    """all_to_all_single along dim 0 with autograd (its backward is the reverse all_to_all)."""
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    return dist_nn.all_to_all_single(out, x.contiguous(), list(recv_splits), list(send_splits), group=group)


def _a2a_plain(x: Tensor, send_splits, recv_splits, group=None) -> Tensor:
    """all_to_all_single along dim 0 for integer tensors (no autograd)."""
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(recv_splits), list(send_splits), group=group)
    return out


def _exchange_counts(counts: Tensor, group=None) -> Tensor:
    """counts [W, ...] int64 (row d: what this rank sends to rank d) -> [W, ...] (row s: what rank s sends here)."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


class RowWiseShardedScenarioEmbedding(nn.Module):
    """Row-wise shard of a :class:`saml_kernels.nn.ScenarioEmbedding` (same forward contract, dense gradients).

    Rank r of W owns rows ``[n_f * r // W, n_f * (r + 1) // W)`` of every feature f (n_f rows), in the global
    table and in each scenario table of an aware feature, stored as ``global_weight [R_r, D]`` and
    ``scenario_weight [M, Rs_r, D]`` with the local feature layout ``feature_rows`` / ``feature_scenario_rows``.

    forward(indices, offsets, scenario) (this rank's B samples, feature-major, as ScenarioEmbedding):
      1. bucketize every id by owner; send each owner its ids (re-based to the shard), every bag's partial
         length and the samples' scenarios (all_to_all; 3 collectives of sizes, ids, scenarios);
      2. the owner runs ``scenario_embedding_bag`` (sum pooling) on its shard for the concatenated batch of all
         sources -> partial pooled bags;
      3. the partial bags go back to their sample's rank (all_to_all) and are summed; "mean" divides by the
         full bag length there. Pooling "none" (fixed length L) is run as L one-id sum bags per (f, b).
    The backward is the same path reversed (autograd through the all_to_all), so every shard receives exactly
    the gradient rows of the ids it owns; shards are ordinary (dense-gradient) parameters local to the rank and
    must be kept out of DDP (each rank holds different rows).
    """

    def __init__(self, full: nn.Module, rank: int, world: int, group=None):
        super().__init__()
        self.rank, self.world, self.group = rank, world, group
        self.backend = getattr(full, "backend", None)
        feats = full.features
        poolings = {f.pooling for f in feats}
        if len(poolings) != 1:
            raise ValueError(f"RowWiseShardedScenarioEmbedding: one pooling for all features, got {poolings}")
        self.pooling = poolings.pop()
        self.num_features = len(feats)
        sizes = [f.num_embeddings for f in feats]
        aware = [bool(f.scenario_aware) for f in feats]
        self.aware = tuple(aware)
        # bounds[f, r] = first row of feature f owned by rank r (local id space of the feature)
        self.register_buffer("bounds", torch.tensor([[n * r // world for r in range(world + 1)] for n in sizes]),
                             persistent=False)
        fr, fsr = list(full.feature_rows), list(full.feature_scenario_rows)
        g_rows, s_rows, lfr, lfsr = [], [], [0], [0]
        for f, n in enumerate(sizes):
            lo, hi = n * rank // world, n * (rank + 1) // world
            g_rows.append(torch.arange(fr[f] + lo, fr[f] + hi))
            lfr.append(lfr[-1] + hi - lo)
            if aware[f]:
                s_rows.append(torch.arange(fsr[f] + lo, fsr[f] + hi))
            lfsr.append(lfsr[-1] + (hi - lo if aware[f] else 0))
        g_rows = torch.cat(g_rows)
        s_rows = torch.cat(s_rows) if s_rows else torch.zeros(0, dtype=torch.long)
        self.register_buffer("global_rows", g_rows, persistent=False)      # rows of the full table held here
        self.register_buffer("scenario_rows", s_rows, persistent=False)
        self.local_feature_rows, self.local_feature_scenario_rows = tuple(lfr), tuple(lfsr)
        self.global_weight = nn.Parameter(full.global_weight.detach()[g_rows].clone())
        self.scenario_weight = nn.Parameter(full.scenario_weight.detach()[:, s_rows].clone())
        self.num_aware = sum(aware)

    def forward(self, indices: Tensor, offsets: Tensor, scenario: Tensor):
        W, F = self.world, self.num_features
        B = scenario.numel()
        idx_dtype = indices.dtype
        lengths = (offsets[1:] - offsets[:-1]).long()
        L = 0
        if self.pooling == "none":  # fixed length L: run as B*L single-id bags per feature
            L = indices.numel() // max(F * B, 1)
            lengths = torch.ones(F * B * L, dtype=torch.long, device=indices.device)
            scenario = scenario.repeat_interleave(L)
            B = B * L
        ids = indices.long()
        bag = torch.repeat_interleave(torch.arange(F * B, device=ids.device), lengths)
        feat = bag // max(B, 1)
        owner = torch.searchsorted(self.bounds[feat], ids[:, None], right=True).squeeze(1) - 1
        owner = owner.clamp(0, W - 1)  # out-of-range ids stay out of range on the last rank (the op reports them)
        local = ids - self.bounds[feat, owner]
        # sort by (owner, bag): each owner's ids in feature-major bag order
        key = owner * (F * B) + bag
        order = torch.sort(key, stable=True).indices
        send_ids = local[order]
        per_owner_bag = torch.zeros(W, F * B, dtype=torch.long, device=ids.device)
        per_owner_bag.index_put_((owner, bag), torch.ones_like(bag), accumulate=True)
        send_counts = per_owner_bag.sum(1)
        # 1. sizes: [W] ids and B per source; then lengths [W, F*B], ids, scenarios
        meta = torch.stack([send_counts, torch.full_like(send_counts, B)], 1)
        recv_meta = _exchange_counts(meta, self.group)
        recv_counts, recv_B = recv_meta[:, 0].tolist(), recv_meta[:, 1].tolist()
        recv_len = _a2a_plain(per_owner_bag.reshape(-1), [F * B] * W, [F * b for b in recv_B], self.group)
        recv_ids = _a2a_plain(send_ids, send_counts.tolist(), recv_counts, self.group)
        recv_sc = _a2a_plain(scenario.long().repeat(W), [B] * W, recv_B, self.group)  # every owner needs them
        # 2. the concatenated batch of all sources, feature-major: bag (f, s, b)
        Bt = sum(recv_B)
        src_len = torch.split(recv_len, [F * b for b in recv_B])
        len_fm = torch.cat([l.reshape(F, b) for l, b in zip(src_len, recv_B)], 1).reshape(-1) if Bt else recv_len
        # ids arrive grouped by source then bag (f, b); reorder to (f, source, b)
        src_of_id = torch.repeat_interleave(torch.arange(W, device=ids.device), torch.tensor(recv_counts))
        bag_of_id = torch.repeat_interleave(torch.arange(recv_len.numel(), device=ids.device), recv_len)
        starts = torch.tensor([0] + recv_B[:-1], device=ids.device).cumsum(0)
        src_bag_start = torch.tensor([0] + [F * b for b in recv_B[:-1]], device=ids.device).cumsum(0)
        within = bag_of_id - src_bag_start[src_of_id]
        f_of_id, b_of_id = within // torch.tensor(recv_B, device=ids.device)[src_of_id].clamp(min=1), \
            within % torch.tensor(recv_B, device=ids.device)[src_of_id].clamp(min=1)
        new_key = f_of_id * Bt + starts[src_of_id] + b_of_id
        perm = torch.sort(new_key, stable=True).indices
        local_ids = recv_ids[perm].to(idx_dtype)
        local_off = torch.cat([len_fm.new_zeros(1), len_fm.cumsum(0)]).to(idx_dtype)
        g, s = saml_kernels.scenario_embedding_bag(local_ids, local_off, recv_sc.to(idx_dtype), self.global_weight,
                                                   self.scenario_weight, self.local_feature_rows,
                                                   self.local_feature_scenario_rows, pooling="sum",
                                                   backend=self.backend)
        # 3. partial bags back to their sample's rank, summed over owners
        g = _all_to_all(g, recv_B, [B] * W, self.group).reshape(W, B, F, -1).sum(0)
        s = _all_to_all(s, recv_B, [B] * W, self.group).reshape(W, B, self.num_aware, -1).sum(0)
        if self.pooling == "mean":
            n = lengths.reshape(F, B).t().clamp(min=1).to(g.dtype)  # full bag lengths [B, F]
            g = g / n[:, :, None]
            s = s / n[:, [f for f in range(F) if self.aware[f]]][:, :, None]
        if self.pooling == "none":
            Bs = B // max(L, 1)
            g = g.reshape(Bs, L, F, -1).permute(0, 2, 1, 3)
            s = s.reshape(Bs, L, self.num_aware, -1).permute(0, 2, 1, 3)
        return g, s

    @torch.no_grad()
    def gather_full(self, full_global: Tensor, full_scenario: Tensor) -> tuple[Tensor, Tensor]:
        """Writes every rank's shard into full-size copies (all_gather), e.g. to checkpoint or compare."""
        g = full_global.clone()
        s = full_scenario.clone()
        parts = [None] * self.world
        dist.all_gather_object(parts, (self.global_rows, self.global_weight.detach(), self.scenario_rows,
                                       self.scenario_weight.detach()), group=self.group)
        for rows, w, srows, sw in parts:
            g[rows] = w
            s[:, srows] = sw
        return g, s


# ============================================================================================= training

def make_problem(seed: int = 0, n: int = 2048, num_scenarios: int = 3):
    """(data, config) of a small SAML problem on the synthetic generator."""
    from saml_kernels.data import make_synthetic
    from saml_kernels.nn import SAMLConfig

    data = make_synthetic(n, num_scenarios=num_scenarios, num_users=300, num_items=400, num_categories=12,
                          num_contexts=8, num_segments=8, num_tags=30, seq_len=6, seed=seed)
    cfg = SAMLConfig(features=data.features, num_scenarios=num_scenarios, embedding_dim=8, sequence=data.sequence,
                     target_feature="item", num_dense=data.num_dense, attention_dim=8, aux_hidden=(32, 16),
                     branch_hidden=(32, 16), mutual_layers=(0,), dropout=0.0)
    return data, cfg


def make_model(cfg, seed: int = 0, backend=None):
    from saml_kernels.nn import SAML

    torch.manual_seed(seed)
    # plain table gradients (not the default fused optimizer): every mode here trains all parameters with SGD
    return SAML(cfg, backend=backend, embedding_optimizer=None)


def _slice(batch, rank: int, world: int):
    """Rank ``rank``'s contiguous share of a global batch (samples [rank*b, (rank+1)*b))."""
    import dataclasses

    B = len(batch)
    b = B // world
    lo, hi = rank * b, (rank + 1) * b
    F = (batch.offsets.numel() - 1) // B
    off = batch.offsets.reshape(-1)
    idx_parts, off_parts, base = [], [torch.zeros(1, dtype=off.dtype)], 0
    for f in range(F):
        s, e = int(off[f * B + lo]), int(off[f * B + hi])
        idx_parts.append(batch.indices[s:e])
        off_parts.append(off[f * B + lo + 1: f * B + hi + 1] - s + base)
        base += e - s
    sl = lambda t: None if t is None else t[lo:hi]  # noqa: E731
    return dataclasses.replace(batch, indices=torch.cat(idx_parts), offsets=torch.cat(off_parts),
                               scenario=batch.scenario[lo:hi], label=batch.label[lo:hi], purchase=sl(batch.purchase),
                               dense=sl(batch.dense), seq_ids=sl(batch.seq_ids), seq_lengths=sl(batch.seq_lengths))


def _loss(module, cfg, batch):
    main, aux = module(*batch.inputs())
    return saml_loss(main, aux, batch.label, cfg.aux_loss_weight)


def train_single(cfg, batches, lr: float = 0.1, seed: int = 0, backend=None):
    """The single-process baseline: plain SGD on the global batches. Returns the final state_dict."""
    model = make_model(cfg, seed, backend)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for b in batches:
        opt.zero_grad(set_to_none=True)
        _loss(model, cfg, b).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _setup(rank: int, world: int, port: int):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)


def train_torchrec(model, cfg, batches, rank: int, world: int, lr: float, sharding: str) -> dict:
    """TorchRec: tables sharded by DistributedModelParallel with FBGEMM's fused SGD (the same update as plain SGD
    on the table gradients), dense part under DDP with SGD. Returns the unsharded state_dict (every rank)."""
    from saml_kernels.torchrec import dense_parameters, shard_saml, unsharded_state_dict

    dmp = shard_saml(model, sharding_types=[sharding], optimizer="sgd", lr=lr)
    opt = torch.optim.SGD(dense_parameters(dmp), lr=lr)
    for gb in batches:
        opt.zero_grad(set_to_none=True)
        _loss(dmp, cfg, _slice(gb, rank, world)).backward()  # the tables are updated inside the backward
        opt.step()
    return unsharded_state_dict(dmp)


def train_distributed(rank: int, world: int, mode: str, cfg, batches, port: int, out_path: str, lr: float = 0.1,
                      seed: int = 0, backend=None, sharding: str = "row_wise"):
    """One rank of distributed training; rank 0 saves the final full state_dict to ``out_path``."""
    _setup(rank, world, port)
    try:
        _train_rank(rank, world, mode, cfg, batches, out_path, lr, seed, backend, sharding)
    finally:
        dist.destroy_process_group()
        # The rank's models are garbage now, but TorchRec's sharded model holds the group in reference cycles:
        # collected here, the group and its threads end now rather than during interpreter shutdown (see the
        # import of torch.distributed.nn.functional above).
        gc.collect()


def _train_rank(rank, world, mode, cfg, batches, out_path, lr, seed, backend, sharding):
    """train_distributed's training, in its own frame so that its models are garbage once it returns."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model(cfg, seed, backend)  # same seed on every rank: identical initial replicas
    full_tables = {}
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "torchrec":
        state = train_torchrec(model, cfg, batches, rank, world, lr, sharding)
        if rank == 0:
            torch.save(state, out_path)
        dist.barrier()
        return
    if mode == "excluded-sparse":
        for m in (model.embedding, getattr(model, "sequence_embedding", None)):
            if m is not None:
                m.sparse = True
    if mode == "rowwise":
        for name in ("embedding", "sequence_embedding"):
            full = getattr(model, name, None)
            if full is not None:
                full_tables[name] = (full.global_weight.detach().clone(), full.scenario_weight.detach().clone())
                setattr(model, name, RowWiseShardedScenarioEmbedding(full, rank, world))
    # The tables (and, for shards, their per-rank row buffers, which DDP would otherwise broadcast from
    # rank 0) stay out of DDP.
    emb_names = [n for n, _ in model.named_parameters() if n.startswith(EMB_PREFIXES)]
    DDP._set_params_and_buffers_to_ignore_for_model(
        model, emb_names + [n for n, _ in model.named_buffers() if n.startswith(EMB_PREFIXES)])
    ddp = DDP(model)
    emb_params = [p for n, p in model.named_parameters() if n in emb_names]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for gb in batches:
        b = _slice(gb, rank, world)
        opt.zero_grad(set_to_none=True)
        _loss(ddp, cfg, b).backward()
        if mode.startswith("excluded"):  # the tables' gradients, averaged by hand (sparse COO or dense)
            for p in emb_params:
                g = p.grad.coalesce() if p.grad.is_sparse else p.grad
                dist.all_reduce(g)
                p.grad = g / world
        elif mode == "rowwise":  # each shard got the summed gradient of all ranks' losses: average
            for p in emb_params:
                p.grad.div_(world)
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, (fg, fs) in full_tables.items():
        g, s = getattr(model, name).gather_full(fg, fs)
        state[f"{name}.global_weight"], state[f"{name}.scenario_weight"] = g, s
    if rank == 0:
        torch.save(state, out_path)
    dist.barrier()


def run(mode: str, world: int = 2, steps: int = 4, global_batch: int = 128, seed: int = 0, port: int = 29571,
        backend=None, sharding: str = "row_wise"):
    """Trains with ``world`` processes and in one process; returns (distributed, single) state_dicts."""
    data, cfg = make_problem(seed)
    batches = list(data.batches(global_batch))[:steps]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "state.pt")
        mp.spawn(train_distributed, args=(world, mode, cfg, batches, port, out, 0.1, seed, backend, sharding),
                 nprocs=world, join=True)
        dist_state = torch.load(out)
    single = train_single(cfg, batches, 0.1, seed, backend)
    return dist_state, single


def compare(a: dict, b: dict) -> float:
    """Largest |a - b| over the common parameters (keys must match)."""
    assert set(a) == set(b), f"state_dict keys differ: {sorted(set(a) ^ set(b))}"
    return max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="torchrec")
    ap.add_argument("--sharding", default="row_wise", help="TorchRec sharding type of every table (mode torchrec)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch (split evenly over the ranks)")
    ap.add_argument("--backend", default=None)
    args = ap.parse_args()
    d, s = run(args.mode, args.world, args.steps, args.batch_size, backend=args.backend, sharding=args.sharding)
    diff = compare(d, s)
    mode = args.mode + (f" sharding={args.sharding}" if args.mode == "torchrec" else "")
    print(f"mode={mode} world={args.world} steps={args.steps}: "
          f"max |param(distributed) - param(single)| = {diff:.2e}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
