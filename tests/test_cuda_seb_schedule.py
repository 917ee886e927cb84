"""CPU mirror of the sync-free backward schedule of the CUDA scenario_embedding_bag kernels
(csrc/cuda/scenario_embedding_bag_backward.cu: ``schedule``, ``heads_to_starts``, ``piece_capacity``,
``launch_two_level``).

The C++ builds the schedule from ATen ops; here the same ops, in the same order, run on the CPU, and the two
levels of the segment kernel are replayed in Python: every unique row must get exactly the sum of its entries
(in sorted order), for hot rows (many pieces), sentinels, one-entry rows and empty inputs, with every count kept
in a tensor; the partial buffer (the backward's only float scratch) has the host-known capacity
P = 2 * floor((n2 - 1) / 32) rows, and the bound is reached. The kernels themselves run from their real source in
the CUDA emulation tests (tests/test_cuda_emulation*.py) and on a GPU in the CUDA tests.
"""
from __future__ import annotations

import zlib

import pytest
import torch

SENTINEL = 1 << 62
PIECE = 32  # kPiece


def piece_capacity(n2):
    return 2 * ((n2 - 1) // PIECE) if n2 > 0 else 0


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
    P = piece_capacity(n2)
    valid = keys.ne(SENTINEL)
    differs = torch.ones(n2, dtype=torch.bool)
    if n2 > 1:
        differs[1:] = keys[1:].ne(keys[:-1])
    seg_head = valid & differs
    run_head = valid & (differs | torch.arange(n2).remainder(PIECE).eq(0))
    nvalid = valid.sum().reshape(1).long()
    seg_excl, seg_start = heads_to_starts(seg_head, nvalid)
    run_excl, run_start = heads_to_starts(run_head, nvalid)
    nseg = seg_excl[n2:]
    uniq = keys.gather(0, seg_start[:n2].clamp(max=n2 - 1))
    seg_run = run_excl.gather(0, seg_start)
    npieces = seg_run[1:] - seg_run[:-1]
    npieces.mul_(npieces.gt(1))
    seg_piece = torch.zeros(n2 + 1, dtype=torch.long)
    torch.cumsum(npieces, 0, out=seg_piece[1:])
    npiece = seg_piece[n2:]
    p = torch.arange(P)
    owner = (torch.searchsorted(seg_piece, p, right=True) - 1).clamp(0, n2 - 1)
    run = (seg_run.gather(0, owner) + p - seg_piece.gather(0, owner)).clamp(0, n2 - 1)
    piece_start, piece_end = run_start.gather(0, run), run_start.gather(0, run + 1)
    return uniq, seg_start, seg_piece, piece_start, piece_end, nseg, npiece


def two_level(keys, vals):
    """The kernel's two levels on sorted ``keys`` [n2] and entry values ``vals`` [n2, D] (sorted order)."""
    n2 = keys.numel()
    uniq, seg_start, seg_piece, piece_start, piece_end, nseg, npiece = schedule(keys)
    P = piece_start.numel()
    assert P == piece_capacity(n2) and int(npiece) <= P  # the partial buffer's capacity always suffices
    part = torch.full((P, vals.shape[1]), float("nan"), dtype=torch.float64)
    for q in range(P):  # level 1: one group per piece, past the device count it exits
        if q >= int(npiece):
            break
        lo, hi = int(piece_start[q]), int(piece_end[q])
        assert 0 < hi - lo <= PIECE and len(set(keys[lo:hi].tolist())) == 1
        part[q] = vals[lo:hi].sum(0)
    out = {}
    for u in range(n2):  # level 2: one group per segment
        if u >= int(nseg):
            break
        lo, hi = int(seg_start[u]), int(seg_start[u + 1])
        p0, p1 = int(seg_piece[u]), int(seg_piece[u + 1])
        assert hi > lo and set(keys[lo:hi].tolist()) == {int(uniq[u])}
        if p1 > p0:  # a hot row: its pieces tile its entries in order
            # (split iff a multiple of kPiece lies strictly inside: every row of > kPiece entries, and some
            # shorter ones that straddle a cut)
            assert any(i % PIECE == 0 for i in range(lo + 1, hi))
            assert int(piece_start[p0]) == lo and int(piece_end[p1 - 1]) == hi
            assert all(int(piece_end[q]) == int(piece_start[q + 1]) for q in range(p0, p1 - 1))
            out[int(uniq[u])] = part[p0:p1].sum(0)
        else:  # read straight from the entries
            assert hi - lo <= PIECE and not any(i % PIECE == 0 for i in range(lo + 1, hi))
            out[int(uniq[u])] = vals[lo:hi].sum(0)
    return out, int(nseg), int(npiece)


def _expected(keys, vals):
    out = {}
    for k, v in zip(keys.tolist(), vals):
        if k != SENTINEL:
            out[k] = out.get(k, torch.zeros_like(v)) + v
    return out


@pytest.mark.parametrize("case", ["random", "hot", "all_sentinel", "unique", "one", "piece_edges", "worst"])
def test_two_level_schedule_sums_every_row(case):
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    if case == "random":
        keys = torch.randint(0, 40, (150,), generator=g)
        keys[torch.rand(150, generator=g) < 0.3] = SENTINEL
    elif case == "hot":  # one row with hundreds of entries: many pieces
        keys = torch.cat([torch.full((300,), 7), torch.randint(0, 5, (50,), generator=g), torch.full((20,), SENTINEL)])
    elif case == "all_sentinel":
        keys = torch.full((10,), SENTINEL)
    elif case == "unique":
        keys = torch.randperm(64, generator=g)
    elif case == "one":
        keys = torch.tensor([3])
    elif case == "piece_edges":  # segments ending exactly on multiples of kPiece
        keys = torch.cat([torch.full((PIECE,), 1), torch.full((PIECE,), 2), torch.full((2 * PIECE + 1,), 3)])
    else:  # every multiple of kPiece straddled by a two-entry row: two pieces per cut, the capacity's bound
        n2 = 5 * PIECE + 7
        keys = torch.arange(n2) * 2
        keys[PIECE::PIECE] = keys[PIECE - 1::PIECE][:len(keys[PIECE::PIECE])]
    keys = torch.sort(keys, stable=True).values
    vals = torch.randn(keys.numel(), 3, dtype=torch.float64, generator=g)
    got, nseg, npiece = two_level(keys, vals)
    exp = _expected(keys, vals)
    assert set(got) == set(exp) and nseg == len(exp)
    for k in exp:
        torch.testing.assert_close(got[k], exp[k])
    if case == "hot":
        assert npiece >= 300 // PIECE  # the hot row is cut into pieces
    if case in ("unique", "one", "all_sentinel"):
        assert npiece == 0
    if case == "worst":
        assert npiece == piece_capacity(keys.numel()) == 10
