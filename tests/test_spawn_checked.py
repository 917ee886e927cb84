"""conftest.spawn_checked, the spawner of the gloo tests, passes a clean run and fails every broken rank: a failed
assertion, an abort at interpreter exit after the worker returned (the shape of the old flaky teardown SIGABRT,
no longer tolerated), a process group that outlives the worker, and a rank that exits 0 without finishing."""
from __future__ import annotations

import atexit
import os
import resource

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port, spawn_checked

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo missing")]

_PINNED = []  # a process group kept here outlives destroy_process_group


def _init(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _all_reduce_then_teardown(rank, world, port, pin=False):
    _init(rank, world, port)
    try:
        x = torch.full((5,), float(rank + 1))
        dist.all_reduce(x)
        assert torch.equal(x, torch.full((5,), world * (world + 1) / 2)), x
        if pin:
            _PINNED.append(dist.group.WORLD)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _wrong_number(rank, world, port):
    _init(rank, world, port)
    try:
        x = torch.ones(3)
        dist.all_reduce(x)
        assert torch.equal(x, torch.ones(3)), f"rank {rank}: all_reduce gave {x}"  # deliberately wrong: it is 2
    finally:
        dist.destroy_process_group()


def _abort_at_exit(rank):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a deliberate abort leaves no core file behind
    atexit.register(os.abort)  # the worker itself passed; the process dies with SIGABRT at shutdown


def _exit_early(rank):
    os._exit(0)


def test_clean_ranks_pass(tmp_path):
    spawn_checked(_all_reduce_then_teardown, (2, free_port()), 2, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["0", "1"]


def test_wrong_number_fails(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="all_reduce gave"):
        spawn_checked(_wrong_number, (2, free_port()), 2, tmp_path)


def test_abort_after_passed_checks_fails(tmp_path):
    with pytest.raises(mp.ProcessExitedException) as info:
        spawn_checked(_abort_at_exit, (), 1, tmp_path)
    assert info.value.signal_name == "SIGABRT"
    assert os.listdir(tmp_path) == ["0"], "the worker had passed: only the abort can have failed the run"


def test_process_group_outliving_the_worker_fails(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="process-group threads still run"):
        spawn_checked(_all_reduce_then_teardown, (1, free_port(), True), 1, tmp_path)


def test_rank_exiting_early_fails(tmp_path):
    with pytest.raises(AssertionError, match=r"ranks \['0'\] exited 0 without finishing"):
        spawn_checked(_exit_early, (), 1, tmp_path)
