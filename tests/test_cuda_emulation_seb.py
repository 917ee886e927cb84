"""The CUDA scenario_embedding_bag kernels (csrc/cuda/scenario_embedding_bag_*.cu: seb_fwd_kernel,
seb_bwd_keys_kernel, seb_segment_kernel) and their launchers, run from their real source on the CPU (tests/cuda_emu).

``torch.ops.saml_C_emu.<op>`` is the CUDA launcher compiled for the host (a std::thread per CUDA thread, real warp
shuffles and barriers); every op is compared with the CPU kernel ``torch.ops.saml_C.<op>`` on the float64 upcast
of the same inputs. Outputs the launchers allocate are poisoned (NaN) so an unwritten element fails. Covered:
every dtype (float32/64, float16, bfloat16) and index type, pooling sum/mean/none, per-sample weights, odd D
(scalar loads) and D a multiple of 16 bytes (vector loads), B = 0 and 1, a scenario without samples, invalid ids
(counted, read as zero), hot rows (more than kPiece = 32 entries of one row: the two-level segment schedule,
which replaces the former Python mirror of it), the fused SGD / row-wise Adagrad update with weight decay on the
narrow and the wide-row (D past one register span) paths, apply = 0, frozen tables, and int64 row addressing on a
table past 2^31 elements (a sparse memory-mapped file).
"""
from __future__ import annotations

import os

import pytest
import torch

from saml_kernels.ops.embedding_optimizer import make_hparams

from cuda_emu.harness import DTYPES, assert_close, emu_ops, poisoned, up

C = torch.ops.saml_C
SUM, MEAN, NONE = 0, 1, 2


@pytest.fixture(scope="module")
def emu():
    return emu_ops()


def problem(*, B=6, M=3, D=7, rows=(11, 5, 9), aware=(True, False, True), dtype=torch.float32,
            itype=torch.int64, pooling=SUM, L=3, max_len=4, psw=False, hot=None, bad_ids=0, empty_scenario=True,
            table=None, scenario_rows=None):
    """Random inputs of one call, as ops/scenario_embedding_bag.py passes them to the C++ ops. ``scenario_rows``
    (Rs_f per feature, None = its rows) gives hashed scenario tables."""
    F = len(rows)
    srows = scenario_rows or rows
    fr = torch.tensor([0] + list(rows)).cumsum(0)
    fsr = torch.tensor([0] + [s if a else 0 for s, a in zip(srows, aware)]).cumsum(0)
    slot = torch.tensor([sum(aware[:f]) if aware[f] else -1 for f in range(F)])
    R, Rs = int(fr[-1]), int(fsr[-1])
    Ms = M - 1 if empty_scenario and M > 1 else M  # the last scenario gets no sample
    scen = torch.randint(0, Ms, (B,))
    lens = torch.full((F * B,), L) if pooling == NONE else torch.randint(0, max_len + 1, (F * B,))
    if hot is not None and pooling != NONE and B:
        lens[0] = hot  # bag (feature 0, sample 0) holds `hot` entries of one row
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    ids = [torch.randint(0, rows[i // B], (int(n),)) for i, n in enumerate(lens)]
    if hot is not None and ids and ids[0].numel():
        ids[0][:] = 3
    idx = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    if bad_ids and idx.numel():
        pos = torch.randperm(idx.numel())[:bad_ids]
        idx[pos] = torch.where(torch.arange(pos.numel()) % 2 == 0, -1, 1000)
    gw = torch.randn(R, D, dtype=torch.float64).to(dtype) if table is None else table
    sw = torch.randn(M, Rs, D, dtype=torch.float64).to(dtype)
    w = torch.rand(idx.numel(), dtype=torch.float64).to(dtype) + 0.5 if psw else None
    Fs = int(sum(aware))
    return dict(idx=idx.to(itype), off=off.to(itype), scen=scen, gw=gw, sw=sw, fr=fr, fsr=fsr, slot=slot, psw=w,
                pooling=pooling, L=L if pooling == NONE else 0, B=B, F=F, Fs=Fs, D=D)


def fwd_args(p, gw=None, sw=None, psw=None, f64=False):
    c = (lambda t: up(t)) if f64 else (lambda t: t)
    return (p["idx"], p["off"], p["scen"], c(p["gw"] if gw is None else gw), c(p["sw"] if sw is None else sw),
            p["fr"], p["fsr"], p["slot"], c(p["psw"]), p["pooling"], p["L"])


def grads(p):
    B, F, Fs, D, dt = p["B"], p["F"], p["Fs"], p["D"], p["gw"].dtype
    shape = (lambda n: (B, n, p["L"], D)) if p["pooling"] == NONE else (lambda n: (B, n, D))
    return (torch.randn(shape(F), dtype=torch.float64).to(dt), torch.randn(shape(Fs), dtype=torch.float64).to(dt))


CASES = [  # (dtype, index dtype, D)
    (torch.float32, torch.int64, 7), (torch.float32, torch.int32, 16), (torch.float64, torch.int32, 5),
    (torch.float64, torch.int64, 8), (torch.float16, torch.int64, 16), (torch.float16, torch.int32, 9),
    (torch.bfloat16, torch.int32, 8), (torch.bfloat16, torch.int64, 3)]


@pytest.mark.parametrize("dtype,itype,D", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("pooling", [SUM, MEAN, NONE])
def test_forward(emu, dtype, itype, D, pooling):
    p = problem(dtype=dtype, itype=itype, D=D, pooling=pooling, psw=pooling == SUM, bad_ids=2)
    with poisoned():
        g, s, bad = emu.seb_forward(*fwd_args(p), True, p["Fs"])
    g2, s2, bad2 = C.seb_forward(*fwd_args(p, f64=True), True, p["Fs"])
    assert_close(g, g2, dtype, "global_out")
    assert_close(s, s2, dtype, "scenario_out")
    assert int(bad) == int(bad2) == 2


@pytest.mark.parametrize("B", [0, 1])
def test_forward_tiny_batches(emu, B):
    p = problem(B=B, D=4)
    with poisoned():
        g, s, bad = emu.seb_forward(*fwd_args(p), True, p["Fs"])
    g2, s2, _ = C.seb_forward(*fwd_args(p, f64=True), True, p["Fs"])
    assert_close(g, g2, torch.float32, "global_out")
    assert_close(s, s2, torch.float32, "scenario_out")
    assert int(bad) == 0


def _rows_ref(p, gg, gs, need_psw):
    return C.seb_backward_rows(up(gg), up(gs), *fwd_args(p, f64=True), need_psw)


@pytest.mark.parametrize("dtype,itype,D", CASES[::2] + [(torch.float32, torch.int64, 129)],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("pooling,hot", [(SUM, None), (MEAN, 70), (NONE, None), (SUM, 32)])
def test_backward_rows_and_dense(emu, dtype, itype, D, pooling, hot):
    """seb_backward_rows (host-counted segments, split in pieces when a row has > kPiece entries) and
    seb_backward_dense (the sync-free two-level schedule) against the CPU kernel's rows."""
    # per-sample weights are a "sum" feature (the public op refuses them otherwise; with "mean" the CUDA kernel
    # scales grad_psw by 1/len and the CPU kernel does not: outside the contract)
    p = problem(dtype=dtype, itype=itype, D=D, pooling=pooling, psw=pooling == SUM, hot=hot, bad_ids=1)
    gg, gs = grads(p)
    with poisoned():
        grows, gvals, srows, svals, gpsw = emu.seb_backward_rows(gg, gs, *fwd_args(p), True)
        dG, dS, gpsw2 = emu.seb_backward_dense(gg, gs, *fwd_args(p), True)
    r = _rows_ref(p, gg, gs, True)
    assert torch.equal(grows, r[0]) and torch.equal(srows, r[2])
    scale = 4.0 if hot else 1.0  # a hot row sums 70 terms
    assert_close(gvals, r[1], dtype, "global_vals", scale)
    assert_close(svals, r[3], dtype, "scenario_vals", scale)
    assert_close(gpsw, r[4], dtype, "grad_psw")
    assert_close(gpsw2, r[4], dtype, "grad_psw (dense)")
    refG = torch.zeros(p["gw"].shape, dtype=torch.float64).index_add_(0, r[0], r[1])
    refS = torch.zeros(p["sw"].shape, dtype=torch.float64).view(-1, D).index_add_(0, r[2], r[3]).view(p["sw"].shape)
    assert_close(dG, refG, dtype, "dense dG", scale)
    assert_close(dS, refS, dtype, "dense dS", scale)


@pytest.mark.parametrize("case", ["all_invalid", "one", "unique", "piece_edges", "empty"])
def test_backward_schedule_edges(emu, case):
    """The segment schedule's edge cases (formerly mirrored in Python): every key a sentinel, one entry, all rows
    distinct, rows of exactly 32 / 64 / 65 entries (run boundaries at multiples of kPiece), nnz = 0."""
    p = problem(D=6, rows=(200,), aware=(True,), B=4, max_len=3)
    idx = p["idx"]
    if case == "all_invalid":
        idx = torch.full_like(idx, -1)
    elif case == "one":
        p["off"] = torch.tensor([0, 1, 1, 1, 1])
        idx = torch.tensor([5])
    elif case == "unique":
        n = 4 * 8
        p["off"] = torch.arange(0, n + 1, 8)
        idx = torch.randperm(200)[:n]
    elif case == "piece_edges":
        idx = torch.cat([torch.full((32,), 1), torch.full((64,), 2), torch.full((65,), 3), torch.tensor([4])])
        p["off"] = torch.tensor([0, 32, 96, 161, 162])
    else:
        p["off"] = torch.zeros(5, dtype=torch.long)
        idx = torch.zeros(0, dtype=torch.long)
    p["idx"] = idx
    gg, gs = grads(p)
    with poisoned():
        dG, dS, _ = emu.seb_backward_dense(gg, gs, *fwd_args(p), False)
        rows = emu.seb_backward_rows(gg, gs, *fwd_args(p), False)
    r = _rows_ref(p, gg, gs, False)
    refG = torch.zeros(p["gw"].shape, dtype=torch.float64).index_add_(0, r[0], r[1])
    refS = torch.zeros(p["sw"].shape, dtype=torch.float64).view(-1, 6).index_add_(0, r[2], r[3]).view(p["sw"].shape)
    assert_close(dG, refG, torch.float32, "dense dG", 4.0)
    assert_close(dS, refS, torch.float32, "dense dS", 4.0)
    assert torch.equal(rows[0], r[0]) and torch.equal(rows[2], r[2])


def _hp(lr=0.1, eps=1e-3, wd=0.0, apply=1.0):
    """The fused update's hyper-parameters (ops/embedding_optimizer.make_hparams): stochastic rounding on, so the
    16-bit cases run the CUDA rounded store against the CPU kernel's (the same hash of seed, step, row, column)."""
    hp = make_hparams(lr, eps, wd, stochastic_rounding=True, seed=1234, step=3)
    hp[3] = apply
    return hp


@pytest.mark.parametrize("dtype,D", [(torch.float32, 7), (torch.float32, 129), (torch.float32, 516),
                                     (torch.float64, 8), (torch.float16, 16), (torch.bfloat16, 130)],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("optimizer", [1, 2], ids=["sgd", "adagrad"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_fused_update(emu, dtype, D, optimizer, wd):
    """seb_backward_update_ (in place). D = 129 (scalar loads) and 516 (float32 vector loads) pass one register span
    of a group (kChunks * 32 lanes * VEC columns): the wide-row path, which walks a segment twice for Adagrad."""
    p = problem(dtype=dtype, D=D, psw=True, hot=40, bad_ids=1, rows=(13, 6), aware=(True, True), max_len=3)
    gg, gs = grads(p)
    hp = _hp(wd=wd)
    gw, sw = p["gw"].clone(), p["sw"].clone()
    gst, sst = torch.rand(gw.shape[0]), torch.rand(sw.shape[0] * sw.shape[1])
    gw2, sw2, gst2, sst2 = up(gw).clone(), up(sw).clone(), gst.clone(), sst.clone()  # clone: up() keeps float64
    states = (gst, sst) if optimizer == 2 else (None, None)
    states2 = (gst2, sst2) if optimizer == 2 else (None, None)
    emu.seb_backward_update_(gg, gs, p["idx"], p["off"], p["scen"], gw, sw, p["fr"], p["fsr"], p["slot"], p["psw"],
                             p["pooling"], p["L"], *states, optimizer, hp, True, True)
    C.seb_backward_update_(up(gg), up(gs), p["idx"], p["off"], p["scen"], gw2, sw2, p["fr"], p["fsr"], p["slot"],
                           up(p["psw"]), p["pooling"], p["L"], *states2, optimizer, hp, True, True)
    assert_close(gw, gw2, dtype, "global_weight", 4.0)
    assert_close(sw, sw2, dtype, "scenario_weight", 4.0)
    if optimizer == 2:
        torch.testing.assert_close(gst, gst2, rtol=1e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(sst, sst2, rtol=1e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("what", ["apply0", "frozen_global", "frozen_scenario"])
def test_fused_update_skips(emu, what):
    p = problem(D=8, psw=False)
    gg, gs = grads(p)
    gw, sw = p["gw"].clone(), p["sw"].clone()
    gst, sst = torch.rand(gw.shape[0]), torch.rand(sw.shape[0] * sw.shape[1])
    st0 = (gst.clone(), sst.clone())
    hp = _hp(apply=0.0 if what == "apply0" else 1.0, wd=0.1)
    emu.seb_backward_update_(gg, gs, p["idx"], p["off"], p["scen"], gw, sw, p["fr"], p["fsr"], p["slot"], None,
                             p["pooling"], p["L"], gst, sst, 2, hp, what != "frozen_global",
                             what != "frozen_scenario")
    if what in ("apply0", "frozen_global"):
        assert torch.equal(gw, p["gw"]) and torch.equal(gst, st0[0])
    else:
        assert not torch.equal(gw, p["gw"])
    if what in ("apply0", "frozen_scenario"):
        assert torch.equal(sw, p["sw"]) and torch.equal(sst, st0[1])
    else:
        assert not torch.equal(sw, p["sw"])


def test_int64_row_addressing(emu, tmp_path):
    """A global table of more than 2^31 elements (a sparse memory-mapped file: only touched pages exist); the
    ids address rows past element 2^31, so a 32-bit (row * D) product would read the wrong row. Forward and the
    fused SGD update (in place) against the CPU kernel on a compact copy of the touched rows."""
    D = 8
    R = (1 << 31) // D + 64  # rows; R * D > 2^31
    f = tmp_path / "table.bin"
    with open(f, "wb") as fh:
        fh.truncate(R * D * 4)
    table = torch.from_file(str(f), shared=True, size=R * D, dtype=torch.float32).view(R, D)
    hi = R - 40  # feature 1 starts here: its rows are past element 2^31
    p = problem(D=D, rows=(hi, 40), aware=(False, True), table=table, max_len=3)
    touched = torch.arange(hi, R)
    table[touched] = torch.randn(40, D)
    g, s, _ = emu.seb_forward(*fwd_args(p), True, p["Fs"])
    small = p["gw"][touched].clone()  # the same rows in a compact table
    q = dict(p, gw=torch.cat([torch.zeros(1, D), small]), fr=torch.tensor([0, 1, 41]))
    q["idx"] = torch.where(torch.arange(p["idx"].numel()) < int(p["off"][p["B"]]), 0, p["idx"])  # feature 0 -> row 0
    g2, s2, _ = C.seb_forward(*fwd_args(q, f64=True), True, q["Fs"])
    assert_close(g[:, 1], g2[:, 1], torch.float32, "global_out of the high rows")
    gg, gs = grads(p)
    gg[:, 0] = 0
    emu.seb_backward_update_(gg, gs, p["idx"], p["off"], p["scen"], p["gw"], p["sw"].clone(), p["fr"], p["fsr"],
                             p["slot"], None, SUM, 0, None, None, 1, _hp(), True, False)
    ref = up(q["gw"]).clone()
    C.seb_backward_update_(up(gg), up(gs), q["idx"], q["off"], q["scen"], ref, up(q["sw"]), q["fr"], q["fsr"],
                           q["slot"], None, SUM, 0, None, None, 1, _hp(), True, False)
    assert_close(table[touched], ref[1:], torch.float32, "updated high rows")
    del table
    os.remove(f)


@pytest.mark.parametrize("dtype,itype,D", [(torch.float32, torch.int64, 7), (torch.bfloat16, torch.int32, 8)],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("pooling", [SUM, NONE])
def test_hashed_scenario_rows(emu, dtype, itype, D, pooling):
    """Hashed scenario tables (Rs_f < rows: id -> hash(id) mod Rs_f, saml_common.h seb_scenario_local; 1 and 3
    rows, so most ids collide): forward, backward rows / dense and the fused Adagrad update against the CPU kernel,
    whose hashed rows tests/test_hashed_scenario_rows.py checks against a float64 oracle."""
    p = problem(dtype=dtype, itype=itype, D=D, pooling=pooling, psw=pooling == SUM, bad_ids=1, rows=(40, 5, 30, 9),
                aware=(True, False, True, True), scenario_rows=(3, 5, 1, 9), max_len=4)
    with poisoned():
        g, s, bad = emu.seb_forward(*fwd_args(p), True, p["Fs"])
    g2, s2, _ = C.seb_forward(*fwd_args(p, f64=True), True, p["Fs"])
    assert_close(g, g2, dtype, "global_out")
    assert_close(s, s2, dtype, "scenario_out")
    gg, gs = grads(p)
    with poisoned():
        grows, gvals, srows, svals, gpsw = emu.seb_backward_rows(gg, gs, *fwd_args(p), True)
        dG, dS, _ = emu.seb_backward_dense(gg, gs, *fwd_args(p), True)
    r = _rows_ref(p, gg, gs, True)
    assert torch.equal(srows, r[2]) and srows.numel() < p["idx"].numel()  # collisions: fewer rows than ids
    assert_close(svals, r[3], dtype, "scenario_vals", 4.0)
    assert_close(gpsw, r[4], dtype, "grad_psw")
    refS = torch.zeros(p["sw"].shape, dtype=torch.float64).view(-1, D).index_add_(0, r[2], r[3]).view(p["sw"].shape)
    assert_close(dS, refS, dtype, "dense dS", 4.0)
    gw, sw = p["gw"].clone(), p["sw"].clone()
    gst, sst = torch.rand(gw.shape[0]), torch.rand(sw.shape[0] * sw.shape[1])
    gw2, sw2, gst2, sst2 = up(gw).clone(), up(sw).clone(), gst.clone(), sst.clone()
    hp = _hp()
    emu.seb_backward_update_(gg, gs, p["idx"], p["off"], p["scen"], gw, sw, p["fr"], p["fsr"], p["slot"], p["psw"],
                             p["pooling"], p["L"], gst, sst, 2, hp, True, True)
    C.seb_backward_update_(up(gg), up(gs), p["idx"], p["off"], p["scen"], gw2, sw2, p["fr"], p["fsr"], p["slot"],
                           up(p["psw"]), p["pooling"], p["L"], gst2, sst2, 2, hp, True, True)
    assert_close(sw, sw2, dtype, "scenario_weight", 4.0)
    torch.testing.assert_close(sst, sst2, rtol=1e-3 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
