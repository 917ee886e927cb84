"""CPU mirror of the sync-free backward schedule of the CUDA scenario_embedding_bag kernels
(csrc/cuda/scenario_embedding_bag_backward.cu: ``schedule``, ``heads_to_starts``, ``launch_two_level``).

The C++ builds the schedule from ATen ops; here the same ops, in the same order, run on the CPU, and the two
levels of the segment kernel are replayed in Python: every unique row must get exactly the sum of its entries
(in sorted order), for hot rows (many runs), sentinels, one-entry rows and empty inputs, with every count kept
in a tensor (the grids use only the capacity n2 = 2 nnz). The kernel itself runs on a GPU in the CUDA tests.
"""
from __future__ import annotations

import zlib

import pytest
import torch

SENTINEL = 1 << 62
PIECE = 32  # kPiece


def heads_to_starts(head, nvalid):
    n2 = head.numel()
    excl = torch.zeros(n2 + 1, dtype=torch.long)
    excl[1:] = torch.cumsum(head, 0)
    start = torch.full((n2 + 1,), n2, dtype=torch.long)
    start.scatter_(0, torch.where(head, excl[:n2], torch.full((), n2, dtype=torch.long)), torch.arange(n2))
    start.scatter_(0, excl[n2:n2 + 1], nvalid)
    return excl, start


def schedule(keys):
    n2 = keys.numel()
    valid = keys.ne(SENTINEL)
    differs = torch.ones(n2, dtype=torch.bool)
    if n2 > 1:
        differs[1:] = keys[1:].ne(keys[:-1])
    seg_head = valid & differs
    run_head = valid & (differs | torch.arange(n2).remainder(PIECE).eq(0))
    nvalid = valid.sum().reshape(1).long()
    seg_excl, seg_start = heads_to_starts(seg_head, nvalid)
    run_excl, run_start = heads_to_starts(run_head, nvalid)
    uniq = keys.gather(0, seg_start[:n2].clamp(max=n2 - 1))
    seg_run = run_excl.gather(0, seg_start)
    return uniq, seg_run, run_start, seg_excl[n2:], run_excl[n2:]


def two_level(keys, vals):
    """The kernel's two levels on sorted ``keys`` [n2] and entry values ``vals`` [n2, D] (sorted order)."""
    n2 = keys.numel()
    uniq, seg_run, run_start, nseg, nrun = schedule(keys)
    part = torch.empty(n2, vals.shape[1], dtype=torch.float64)
    for r in range(n2):  # level 1: one group per run, past the device count it exits
        if r >= int(nrun):
            break
        lo, hi = int(run_start[r]), int(run_start[r + 1])
        assert 0 < hi - lo <= PIECE and len(set(keys[lo:hi].tolist())) == 1
        part[r] = vals[lo:hi].sum(0)
    out = {}
    for u in range(n2):  # level 2: one group per segment
        if u >= int(nseg):
            break
        lo, hi = int(seg_run[u]), int(seg_run[u + 1])
        assert hi > lo
        out[int(uniq[u])] = part[lo:hi].sum(0)
    return out, int(nseg), int(nrun)


def _expected(keys, vals):
    out = {}
    for k, v in zip(keys.tolist(), vals):
        if k != SENTINEL:
            out[k] = out.get(k, torch.zeros_like(v)) + v
    return out


@pytest.mark.parametrize("case", ["random", "hot", "all_sentinel", "unique", "one", "piece_edges"])
def test_two_level_schedule_sums_every_row(case):
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    if case == "random":
        keys = torch.randint(0, 40, (150,), generator=g)
        keys[torch.rand(150, generator=g) < 0.3] = SENTINEL
    elif case == "hot":  # one row with hundreds of entries: many runs
        keys = torch.cat([torch.full((300,), 7), torch.randint(0, 5, (50,), generator=g), torch.full((20,), SENTINEL)])
    elif case == "all_sentinel":
        keys = torch.full((10,), SENTINEL)
    elif case == "unique":
        keys = torch.randperm(64, generator=g)
    elif case == "one":
        keys = torch.tensor([3])
    else:  # segments ending exactly on multiples of kPiece
        keys = torch.cat([torch.full((PIECE,), 1), torch.full((PIECE,), 2), torch.full((2 * PIECE + 1,), 3)])
    keys = torch.sort(keys, stable=True).values
    vals = torch.randn(keys.numel(), 3, dtype=torch.float64, generator=g)
    got, nseg, nrun = two_level(keys, vals)
    exp = _expected(keys, vals)
    assert set(got) == set(exp) and nseg == len(exp)
    for k in exp:
        torch.testing.assert_close(got[k], exp[k])
    nvalid = int((keys != SENTINEL).sum())
    assert nrun <= nvalid <= keys.numel()  # the partial buffer's capacity n2 always suffices
    if case == "hot":
        assert nrun >= nseg + 300 // PIECE  # the hot row is cut into runs
