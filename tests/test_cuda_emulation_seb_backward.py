"""The CUDA embedding backward (csrc/cuda/scenario_embedding_bag_backward.cu) run from its real source in the CPU
emulation (tests/cuda_emu, ``torch.ops.saml_C_emu``): dense gradients, deduplicated rows and the fused SGD /
row-wise Adagrad update (with weight decay) against the float64 reference over dtypes, int32/int64 ids,
sum/mean/none pooling, per-sample weights, narrow / odd / wide rows, hot rows (the two-level split), sentinel
entries of features that are not scenario-aware, invalid ids, empty bags and B = 0; and the scratch contract of
the file's header: the only float allocation of the backward besides its outputs is the hot rows' piece partials,
[P, D] acc_t with P = 2 * floor((2 nnz - 1) / 32), whatever the share of aware features.
"""
from __future__ import annotations

import sys
import pathlib

import pytest
import torch

from saml_kernels.ops.embedding_optimizer import make_hparams

from saml_kernels.reference import scenario_embedding_bag as ref
from conftest import tolerance

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_scenario_embedding_bag_gpu import MEAN, NONE, SUM, make_case, ref_args  # noqa: E402

PIECE = 32  # kPiece
LR, EPS, WD = 0.1, 1e-6, 0.01


@pytest.fixture(scope="module")
def emu():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "cuda_emu"))
    try:
        import build
    except ImportError:
        pytest.skip("no CUDA emulation (tests/cuda_emu)")
    return build.load()


def piece_capacity(nnz):
    return 2 * ((2 * nnz - 1) // PIECE) if nnz else 0


def case(dtype, D, hot, *, pooling=SUM, psw=True, idt=torch.int64, B=None):
    """Kernel arguments with sentinels of non-aware features (aware=(1, 0, 1, 1) / (1, 0)) and invalid ids;
    ``hot``: two features of 2-3 rows over 48 bags, so rows get far more than 32 entries (the split path)."""
    if hot:
        return make_case("cpu", dtype=dtype, D=D, B=48 if B is None else B, sizes=(2, 3), aware=(1, 0), M=2,
                         psw=psw, idt=idt, pooling=pooling, empty_bags=False, bad_ids=2)
    return make_case("cpu", dtype=dtype, D=D, B=5 if B is None else B, psw=psw, idt=idt, pooling=pooling,
                     dup=True, bad_ids=1)


def grads(args, dtype):
    g0, s0, _ = ref.forward_kernel(*ref_args(args), False)
    return torch.randn(g0.shape).to(dtype), torch.randn(s0.shape).to(dtype)


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **tolerance(dtype))


def expected_dense(args, gg, gs, need_psw=True):
    rows = ref.backward_rows_kernel(gg.double(), gs.double(), *ref_args(args), need_psw)
    gw, sw = args[3], args[4]
    dg = torch.zeros(gw.shape, dtype=torch.float64)
    ds = torch.zeros(sw.shape[0] * sw.shape[1], sw.shape[2], dtype=torch.float64)
    dg[rows[0]] = rows[1]
    ds[rows[2]] = rows[3]
    return rows, dg, ds.reshape(sw.shape)


DENSE_CASES = [  # (dtype, D, hot, pooling, psw, idt); per-sample weights go with sum pooling only (op contract)
    (torch.float32, 8, False, SUM, True, torch.int64),
    (torch.float32, 33, True, MEAN, False, torch.int32),
    (torch.float32, 600, True, SUM, True, torch.int64),
    (torch.float16, 8, True, SUM, True, torch.int32),
    (torch.float16, 33, False, NONE, False, torch.int64),
    (torch.bfloat16, 16, True, MEAN, False, torch.int64),
    (torch.bfloat16, 5, False, SUM, False, torch.int32),
    (torch.float64, 6, True, SUM, True, torch.int64),
    (torch.float64, 9, False, MEAN, False, torch.int32),
]


@pytest.mark.parametrize("dtype,D,hot,pooling,psw,idt", DENSE_CASES)
def test_dense_and_rows_match_float64(emu, dtype, D, hot, pooling, psw, idt):
    """seb_backward_dense == the float64 rows scattered into dG / dS; seb_backward_rows == the float64 rows, and
    bitwise the rows of the dense result (one schedule, one summation order)."""
    args = case(dtype, D, hot, pooling=pooling, psw=psw, idt=idt)
    gg, gs = grads(args, dtype)
    rows, exp_g, exp_s = expected_dense(args, gg, gs)
    dg, ds, gpsw = emu.seb_backward_dense(gg, gs, *args, True)
    assert dg.dtype == dtype and dg.shape == args[3].shape and ds.shape == args[4].shape
    close(dg, exp_g, dtype)
    close(ds, exp_s, dtype)
    if psw:
        close(gpsw, rows[4], dtype)
    grows, gvals, srows, svals, rpsw = emu.seb_backward_rows(gg, gs, *args, True)
    assert torch.equal(grows, rows[0]) and torch.equal(srows, rows[2])
    close(gvals, rows[1], dtype)
    close(svals, rows[3], dtype)
    M, Rs = args[4].shape[:2]
    assert torch.equal(gvals, dg[grows]) and torch.equal(svals, ds.reshape(M * Rs, D)[srows])
    if hot:  # the split path ran: some row has more than kPiece entries
        assert max(int((args[0] == i).sum()) for i in range(3)) > PIECE


def test_short_rows_straddling_every_cut(emu):
    """Two-entry rows straddling every multiple of kPiece in the sorted order: every such row is split (two pieces
    of one entry each), the most pieces per entry any input makes (half the aware-less feature's scenario entries
    are sentinels); results still equal float64, rows and dense gradients bitwise the same."""
    N, B, D = 5 * PIECE + 7, 9, 6
    pos = torch.arange(N)
    ids = (pos - pos // PIECE)[torch.randperm(N)]  # sorted: ids i - floor(i / 32): equal pairs at (32k - 1, 32k)
    cut = torch.sort(torch.randint(0, N + 1, (B - 1,))).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), cut, torch.full((1,), N)])
    R = int(ids.max()) + 1
    lt = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    args = [ids, offsets, torch.randint(0, 2, (B,)), torch.randn(R, D), torch.randn(2, 1, D), lt([0, R]), lt([0, 0]),
            lt([-1]), torch.randn(N), SUM, 0]
    gg, gs = torch.randn(B, 1, D), torch.zeros(B, 0, D)
    rows, exp_g, exp_s = expected_dense(args, gg, gs)
    dg, ds, gpsw = emu.seb_backward_dense(gg, gs, *args, True)
    close(dg, exp_g, torch.float32)
    close(gpsw, rows[4], torch.float32)
    grows, gvals, srows, _, _ = emu.seb_backward_rows(gg, gs, *args, True)
    assert torch.equal(grows, rows[0]) and srows.numel() == 0 and torch.equal(gvals, dg[grows])


def expected_update(args, gg, gs, optimizer, gst, sst):
    rows = ref.backward_rows_kernel(gg.double(), gs.double(), *ref_args(args), False)
    gw, sw = args[3], args[4]
    M, Rs, D = sw.shape
    w = [gw.double().clone(), sw.double().reshape(M * Rs, D).clone()]
    st = [gst.double().clone(), sst.double().clone()]
    for t, (r, v) in enumerate(((rows[0], rows[1]), (rows[2], rows[3]))):
        g = v + WD * w[t][r]
        if optimizer == 1:
            w[t][r] -= LR * g
        else:
            st[t][r] += (g * g).mean(1)
            w[t][r] -= LR * g / (st[t][r].sqrt() + EPS).unsqueeze(1)
    return w[0], w[1].reshape(sw.shape), st


@pytest.mark.parametrize("optimizer", [1, 2])
@pytest.mark.parametrize("dtype,D,hot", [(torch.float32, 8, False), (torch.float32, 600, True),
                                         (torch.float32, 33, True), (torch.float16, 40, True),
                                         (torch.bfloat16, 8, False), (torch.float64, 7, True)])
def test_fused_update_matches_float64(emu, optimizer, dtype, D, hot):
    """seb_backward_update_ (weight decay 0.01; wide rows: the two-pass Adagrad) == the float64 rows + the same
    update in float64."""
    args = case(dtype, D, hot, pooling=MEAN if hot else SUM, psw=not hot)
    gg, gs = grads(args, dtype)
    gw, sw = args[3].clone(), args[4].clone()
    M, Rs = sw.shape[:2]
    gst, sst = torch.rand(gw.shape[0]), torch.rand(M * Rs)
    exp_g, exp_s, exp_st = expected_update(args, gg, gs, optimizer, gst, sst)
    hp = make_hparams(LR, EPS, WD, stochastic_rounding=True, seed=7, step=2)
    emu.seb_backward_update_(gg, gs, *args[:3], gw, sw, *args[5:11], gst if optimizer == 2 else None,
                             sst if optimizer == 2 else None, optimizer, hp, True, True)
    # row-wise Adagrad keeps its state in float32: float32 rounding at best
    wdt = torch.float32 if optimizer == 2 and dtype == torch.float64 else dtype
    close(gw, exp_g, wdt)
    close(sw, exp_s, wdt)
    if optimizer == 2:
        torch.testing.assert_close(gst.double(), exp_st[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sst.double(), exp_st[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,max_len", [(0, 4), (4, 0)])
def test_empty_inputs(emu, B, max_len):
    """B = 0 and all-empty bags: zero gradients, no rows, an untouched table."""
    args = make_case("cpu", B=B, max_len=max_len, psw=True)
    gg, gs = grads(args, torch.float32)
    dg, ds, gpsw = emu.seb_backward_dense(gg, gs, *args, True)
    assert not dg.any() and not ds.any() and gpsw.numel() == 0
    out = emu.seb_backward_rows(gg, gs, *args, True)
    assert out[0].numel() == 0 and out[2].numel() == 0
    gw = args[3].clone()
    hp = make_hparams(LR, EPS, WD, stochastic_rounding=True, seed=7, step=2)
    emu.seb_backward_update_(gg, gs, *args[:3], gw, args[4], *args[5:11], None, None, 1, hp, True, True)
    assert torch.equal(gw, args[3])


def float_allocations(fn):
    """Bytes of every float32/float64 tensor allocated by ``fn()`` (aten::empty / empty_strided), and the result."""
    from torch.profiler import ProfilerActivity, profile

    sizes = {torch.float32: 4, torch.float64: 8}
    codes = {6: torch.float32, 7: torch.float64}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn()
    allocs = []
    for e in prof.events():
        if e.name not in ("aten::empty", "aten::empty_strided") or not e.concrete_inputs:
            continue
        shape = e.concrete_inputs[0]
        dtype = e.concrete_inputs[1 if e.name == "aten::empty" else 2]
        if dtype in codes:
            n = 1
            for s in shape:
                n *= s
            allocs.append((tuple(shape), n * sizes[codes[dtype]]))
    return allocs, out


@pytest.mark.parametrize("aware", [(1, 1), (1, 0), (0, 0)])
def test_float_scratch_contract(emu, aware):
    """The backward's float scratch is the hot rows' piece partials [P, D] float32, P = 2 floor((2 nnz - 1) / 32),
    and the entries' scales [nnz] float32, the same for any share of aware features (it used to hold a
    [2 nnz, D] float32 partial buffer)."""
    D = 8
    args = make_case("cpu", D=D, B=40, sizes=(3, 50), aware=aware, M=2, psw=False, max_len=6)
    nnz = args[0].numel()
    gg, gs = grads(args, torch.float32)
    allocs, (dg, ds, _) = float_allocations(lambda: emu.seb_backward_dense(gg, gs, *args, False))
    scratch = [a for a in allocs if a[0] not in (tuple(dg.shape), tuple(ds.shape), (0,))]
    P = piece_capacity(nnz)
    assert sorted(scratch) == sorted([((P, D), P * D * 4), ((nnz,), nnz * 4)]), scratch
