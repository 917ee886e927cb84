"""Distributed training (torch.distributed, gloo, 2 processes via torch.multiprocessing.spawn).

* SAML trained on 2 ranks ends with the parameters of single-process training on the same global batches
  (fp32 tolerance) in every mode of python/ddp_example.py: TorchRec sharding ("torchrec", skipped when
  torchrec / FBGEMM do not import; tests/test_torchrec.py tests the adapter in depth) and the fallbacks without
  TorchRec: tables excluded from DDP and their dense ("excluded") or sparse COO ("excluded-sparse") gradients
  all-reduced by hand, DDP for the rest; tables sharded row-wise by hand with all_to_all routing ("rowwise").
  (DDP itself cannot take the sparse table gradients: its reducer expects sparse gradients only from
  nn.Embedding / nn.EmbeddingBag.)
* The row-wise sharded scenario embedding gives, for different local batches on every rank, the outputs of the
  unsharded ScenarioEmbedding and shard gradients equal to the full table's gradient rows (sum, mean, none).

The tests spawn their ranks through conftest.spawn_checked, which also fails a rank whose process-group threads
outlive its worker (they would run into interpreter shutdown and can abort the process there); the example's own
command line (its mp.spawn) runs once too.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import free_port as _free_port, spawn_checked

import _reliability_cases as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
TOL = 1e-4  # fp32: a few steps of SGD, different summation order of the gradient all-reduce

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _example():
    """python/ddp_example.py as module ``ddp_example`` (its dir goes on sys.path, which spawned children inherit,
    so they can unpickle the worker functions)."""
    path = os.path.join(ROOT, "python")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("ddp_example")


def _local_batch(rank, pooling, B=5, F=3, sizes=(11, 5, 7), L=3):
    g = torch.Generator().manual_seed(100 + rank)
    lens = torch.full((F * B,), L) if pooling == "none" else torch.randint(0, 4, (F * B,), generator=g)
    ids = torch.cat([torch.randint(0, n, (int(lens[f * B:(f + 1) * B].sum()),), generator=g)
                     for f, n in enumerate(sizes)])
    return ids, torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]), torch.randint(0, 3, (B,), generator=g)


def _shard_worker(rank, world, port):
    ex = _example()
    from saml_kernels.nn import ScenarioEmbedding

    ex._setup(rank, world, port)
    try:
        for pooling in ("sum", "mean", "none"):
            torch.manual_seed(0)
            full = ScenarioEmbedding([("a", 11, True, pooling), ("b", 5, False, pooling), ("c", 7, True, pooling)], 3, 4)
            sh = ex.RowWiseShardedScenarioEmbedding(full, rank, world)
            ids, off, sc = _local_batch(rank, pooling)
            og, os_ = sh(ids, off, sc)
            rg, rs = full(ids, off, sc)
            torch.testing.assert_close(og, rg, atol=1e-6, rtol=1e-6, msg=lambda m: f"{pooling} rank {rank} E_g: {m}")
            torch.testing.assert_close(os_, rs, atol=1e-6, rtol=1e-6, msg=lambda m: f"{pooling} rank {rank} E_s: {m}")
            (og.square().sum() + 0.5 * os_.sum()).backward()
            # the full table's gradient of the sum of every rank's loss, computed locally from all batches
            for r in range(world):
                ids_r, off_r, sc_r = _local_batch(r, pooling)
                a, b = full(ids_r, off_r, sc_r)
                (a.square().sum() + 0.5 * b.sum()).backward()
            torch.testing.assert_close(sh.global_weight.grad, full.global_weight.grad[sh.global_rows], atol=1e-5,
                                       rtol=1e-5, msg=lambda m: f"{pooling} rank {rank} global shard grad: {m}")
            torch.testing.assert_close(sh.scenario_weight.grad, full.scenario_weight.grad[:, sh.scenario_rows],
                                       atol=1e-5, rtol=1e-5, msg=lambda m: f"{pooling} rank {rank} scenario grad: {m}")
        dist.barrier()  # no rank tears gloo down while another still has a collective in flight
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rowwise_sharded_embedding_matches_unsharded(tmp_path):
    _example()
    spawn_checked(_shard_worker, (WORLD, _free_port()), WORLD, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not R.model_available(), reason="saml_kernels.nn.SAML has not landed yet")
@pytest.mark.parametrize("mode", ["torchrec", "excluded", "excluded-sparse", "rowwise"])
def test_saml_ddp_matches_single_process(mode, tmp_path):
    if mode == "torchrec":
        try:
            importlib.import_module("saml_kernels.torchrec")
        except ImportError as e:
            pytest.skip(f"saml_kernels.torchrec unavailable: {e}")
    ex = _example()
    # ex.run's steps, with the ranks spawned through spawn_checked (clean teardown of every rank checked)
    data, cfg = ex.make_problem(0)
    batches = list(data.batches(128))[:4]
    out = tmp_path / "state.pt"
    (tmp_path / "done").mkdir()
    spawn_checked(ex.train_distributed, (WORLD, mode, cfg, batches, _free_port(), str(out)), WORLD, tmp_path / "done")
    dist_state, single = torch.load(out), ex.train_single(cfg, batches)
    diff = ex.compare(dist_state, single)
    assert diff < TOL, f"{mode}: max |param(DDP, {WORLD} ranks) - param(1 process)| = {diff:.3e} >= {TOL}"
    # the run must have moved the parameters, else equality proves nothing
    init = ex.make_model(ex.make_problem(0)[1], 0).state_dict()
    assert ex.compare(single, {k: v for k, v in init.items()}) > 1e-3, "training did not change the parameters"


@pytest.mark.slow
@pytest.mark.skipif(not R.model_available(), reason="saml_kernels.nn.SAML has not landed yet")
def test_ddp_example_command_line():
    """The example as users run it (its own mp.spawn in ``run``): exit status 0 and the printed comparison."""
    import subprocess

    r = subprocess.run([sys.executable, os.path.join(ROOT, "python", "ddp_example.py"), "--mode", "excluded",
                        "--world", "2", "--steps", "2", "--batch-size", "64"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mode=excluded world=2 steps=2: max |param(distributed) - param(single)| = " in r.stdout, r.stdout


def _fused_under_ddp_worker(rank, world, port):
    """A fused-optimizer SAML inside plain DDP (find_unused_parameters=True, as a user silencing DDP's unused-
    parameter error would): the first forward must refuse, naming shard_saml and docs/distributed.md, before any
    table moves. Without the refusal the replicas' tables drift apart; that divergence is measured and reported."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from saml_kernels.nn import SAML

    ex = _example()
    ex._setup(rank, world, port)
    try:
        data, cfg = ex.make_problem(0, n=256)
        batches = list(data.batches(64))[:3]
        for find_unused in (True, False):
            torch.manual_seed(0)
            model = SAML(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=0.05)
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            ddp = DDP(model, find_unused_parameters=find_unused)
            opt = torch.optim.SGD([p for n, p in model.named_parameters()
                                   if not n.endswith(("global_weight", "scenario_weight"))], lr=0.05)
            try:
                for gb in batches:
                    opt.zero_grad()
                    ex._loss(ddp, cfg, ex._slice(gb, rank, world)).backward()
                    opt.step()
            except RuntimeError as e:
                msg = str(e)
                for part in ("inside DistributedDataParallel (world size 2)", "diverge", "shard_saml",
                             "docs/distributed.md"):
                    assert part in msg, f"rank {rank}: the refusal must say {part!r}: {msg}"
            else:
                gaps = []
                for k in ("embedding.global_weight", "embedding.scenario_weight"):
                    copies = [torch.empty_like(model.state_dict()[k]) for _ in range(world)]
                    dist.all_gather(copies, model.state_dict()[k].contiguous())
                    gaps.append(max(float((c - copies[0]).abs().max()) for c in copies))
                raise AssertionError(f"rank {rank}: a fused ScenarioEmbedding trained under DDP "
                                     f"(find_unused_parameters={find_unused}) without an error; the replicas' "
                                     f"tables differ by {max(gaps):.3g} after {len(batches)} steps")
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), f"rank {rank}: {k} moved before the refusal"
            del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not R.model_available(), reason="saml_kernels.nn.SAML has not landed yet")
def test_fused_embedding_under_ddp_refused(tmp_path):
    _example()
    spawn_checked(_fused_under_ddp_worker, (WORLD, _free_port()), WORLD, tmp_path)


def test_ddp_guard_reads_the_active_ddp(monkeypatch):
    """The refusal without processes: a fused layer's forward raises while a DDP over 2 ranks is active (before
    any table moves), runs inside a one-rank DDP, and outside any DDP; a layer without a fused optimizer, or in
    eval, is never refused."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from saml_kernels.nn import ScenarioEmbedding

    class _Group:
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

    class _FakeDDP:
        def __init__(self, n):
            self.process_group = _Group(n)

    ids, off, sc = torch.tensor([1, 2, 0]), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 1])
    fused = ScenarioEmbedding([("a", 4, True)], 2, 3, optimizer="sgd", lr=0.1)
    plain = ScenarioEmbedding([("a", 4, True)], 2, 3)
    before = fused.global_weight.detach().clone()
    monkeypatch.setattr(DDP, "_active_ddp_module", _FakeDDP(2), raising=False)
    refusal = (r"ScenarioEmbedding\(optimizer='sgd'\) runs inside DistributedDataParallel \(world size 2\)"
               r".*shard_saml.*docs/distributed.md")
    with pytest.raises(RuntimeError, match=refusal):
        fused(ids, off, sc)
    assert torch.equal(fused.global_weight, before)
    plain(ids, off, sc)[0].sum().backward()
    with torch.no_grad():
        fused(ids, off, sc)
    monkeypatch.setattr(DDP, "_active_ddp_module", _FakeDDP(1), raising=False)
    fused(ids, off, sc)[0].sum().backward()
    monkeypatch.setattr(DDP, "_active_ddp_module", None, raising=False)
    fused(ids, off, sc)[0].sum().backward()
    assert not torch.equal(fused.global_weight, before), "the allowed steps must have moved the table"
