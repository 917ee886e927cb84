"""Kernel-contract tests of the GPU backends of scenario_embedding_bag (triton, cuda).

Each backend's ``seb_forward`` / ``seb_backward_rows`` (and the CUDA fused ``seb_backward_update_``) is called with
the kernel contract of csrc/registry.cpp and compared with the float64 oracle of tests/_kernel_oracles.py
(independent of saml_kernels) on float64 copies of the tables. Pairs:
- (cpu, triton): the Triton kernels in the interpreter; run with
  ``TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -m triton_interp tests/test_scenario_embedding_bag_gpu.py``
  (tiny shapes: ~2 ms per program instance);
- (cuda, triton), (cuda, cuda): on a GPU (skipped on a machine without one).
Outputs come from fresh allocations; on CUDA the caching allocator is first filled with NaN, so an element a
kernel forgot to write shows up as NaN.
"""
from __future__ import annotations

import pytest
import torch

from saml_kernels import _backend
import _kernel_oracles as KO
from conftest import gpu_backends, interp_covering, tolerance

OP = "scenario_embedding_bag"
SUM, MEAN, NONE = 0, 1, 2


PAIRS = gpu_backends(OP)


def kernels(backend):
    """(forward, backward_rows) of ``backend``: its table in the registry."""
    k = _backend.kernels(OP, backend)
    return k.forward, k.backward_rows


def poison_allocator(device):
    """Fills freed CUDA cache blocks with NaN so that fresh torch.empty outputs start as NaN."""
    if torch.device(device).type == "cuda":
        t = torch.full((1 << 24,), float("nan"), device=device)
        del t


def make_case(device, *, B=3, sizes=(4, 3, 5, 2), aware=(1, 0, 1, 1), M=3, D=5, dtype=torch.float32,
              idt=torch.int64, pooling=SUM, L=2, bad_ids=0, psw=False, max_len=4, empty_bags=True, dup=False):
    """Random kernel-contract arguments: tables with spare rows after the last feature (an id one past its
    feature's range would read a real row of the next feature if a kernel failed to check it)."""
    F = len(sizes)
    fr, fsr, slot = [0], [0], []
    for s, a in zip(sizes, aware):
        fr.append(fr[-1] + s)
        fsr.append(fsr[-1] + (s if a else 0))
        slot.append(sum(aware[:len(slot)]) if a else -1)
    if pooling == NONE:
        lens = torch.full((F * B,), L)
    else:
        lens = torch.randint(0 if empty_bags else 1, max_len + 1, (F * B,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    nnz = int(offsets[-1])
    feat = torch.repeat_interleave(torch.arange(F * B) // max(B, 1), lens)
    size = torch.tensor(sizes)[feat] if nnz else torch.zeros(0, dtype=torch.long)
    ids = (torch.rand(nnz) * size).long()
    if dup and nnz:  # few distinct rows: long segments in the backward
        ids = ids % 2
    if bad_ids and nnz:
        pos = torch.randperm(nnz)[:bad_ids]
        ids[pos] = torch.where(torch.rand(pos.numel()) < 0.5, size[pos], -1 - torch.randint(0, 3, (pos.numel(),)))
    gw = torch.randn(fr[-1] + 2, D, dtype=dtype)
    sw = torch.randn(M, fsr[-1] + 2, D, dtype=dtype)
    sc = torch.randint(0, M, (B,))
    w = torch.randn(nnz, dtype=dtype) if psw else None
    lt = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    args = [ids.to(idt).to(device), offsets.to(idt).to(device), sc.to(device), gw.to(device), sw.to(device),
            lt(fr), lt(fsr), lt(slot), None if w is None else w.to(device), pooling, L if pooling == NONE else 0]
    return args


def ref_args(args):
    """The same arguments on the CPU with float64 tables (the oracle)."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            a = a.cpu()
            if i in (3, 4, 8):
                a = a.double()
        out.append(a)
    return out


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), **tolerance(dtype))


def check_forward(device, backend, args, check=True, dtype=torch.float32):
    fwd, _ = kernels(backend)
    poison_allocator(device)
    g, s, bad = fwd(*args, check)
    g0, s0, bad0 = KO.seb_forward(*ref_args(args), check)
    assert g.dtype == args[3].dtype and s.dtype == args[4].dtype
    assert g.shape == g0.shape and s.shape == s0.shape
    assert not torch.isnan(g).any() and not torch.isnan(s).any(), "unwritten output elements"
    assert_close(g, g0, dtype)
    assert_close(s, s0, dtype)
    assert bad.dtype == torch.int64 and bad.shape == (1,)
    assert int(bad) == (int(bad0) if check else 0)
    return g, s


def check_backward(device, backend, args, dtype=torch.float32, need_psw=True):
    fwd, bwd = kernels(backend)
    g0, s0, _ = KO.seb_forward(*ref_args(args), False)
    gg = torch.randn(g0.shape, dtype=dtype).to(device)
    gs = torch.randn(s0.shape, dtype=dtype).to(device)
    poison_allocator(device)
    out = bwd(gg, gs, *args, need_psw)
    exp = KO.seb_backward_rows(gg.cpu().double(), gs.cpu().double(), *ref_args(args), need_psw)
    grows, gvals, srows, svals, gpsw = out
    assert grows.dtype == torch.int64 and srows.dtype == torch.int64
    assert torch.equal(grows.cpu(), exp[0]) and torch.equal(srows.cpu(), exp[2])
    assert gvals.dtype == args[3].dtype and svals.dtype == args[4].dtype
    assert_close(gvals, exp[1], dtype)
    assert_close(svals, exp[3], dtype)
    if need_psw and args[8] is not None:
        assert gpsw.shape == exp[4].shape
        assert_close(gpsw, exp[4], dtype)
    else:
        assert gpsw.numel() == 0
    return out, gg, gs


# ------------------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("device,backend,pooling,dtype,idt",
                         interp_covering(PAIRS, [SUM, MEAN, NONE], [torch.float32, torch.float16, torch.bfloat16,
                                                                    torch.float64], [torch.int32, torch.int64]))
def test_forward(device, backend, pooling, dtype, idt):
    args = make_case(device, dtype=dtype, idt=idt, pooling=pooling, psw=(pooling == SUM), bad_ids=2)
    check_forward(device, backend, args, dtype=dtype)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("D", [1, 3, 16, 33, 300])
def test_forward_widths(device, backend, D):
    """Odd D (no 16-byte vectors), D over one column block (several programs / lanes per bag)."""
    args = make_case(device, D=D, B=2, sizes=(3, 2), aware=(1, 1))
    check_forward(device, backend, args)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_forward_invalid_ids_never_spill(device, backend):
    """Ids one past their feature's rows (or negative) read zeros, never the next feature's rows; counted."""
    args = make_case(device, B=2, sizes=(2, 2), aware=(1, 1), pooling=SUM, max_len=3, empty_bags=False)
    idx = args[0]
    idx.copy_(torch.where(torch.arange(idx.numel(), device=device) % 2 == 0, torch.full_like(idx, 2),
                          torch.full_like(idx, -1)))
    g, s = check_forward(device, backend, args)
    assert not g.any() and not s.any()
    fwd, _ = kernels(backend)
    assert int(fwd(*args, True)[2]) == idx.numel()
    assert int(fwd(*args, False)[2]) == 0


@pytest.mark.parametrize("device,backend", PAIRS)
def test_forward_bad_scenario_unchecked_reads_zero(device, backend):
    """With check off (bounds_check="off"), an out-of-range scenario id still never reads another table."""
    args = make_case(device, B=3, M=2, empty_bags=False)
    args[2] = torch.tensor([0, 2, -1], device=device)
    fwd, _ = kernels(backend)
    g, s, _ = fwd(*args, False)
    g0, s0, _ = KO.seb_forward(*ref_args(args[:2] + [torch.zeros(3, dtype=torch.long)] + args[3:]), False)
    assert_close(g, g0, torch.float32)
    assert_close(s[0], s0[0], torch.float32)
    assert not s[1:].any()


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling", [SUM, MEAN, NONE])
def test_forward_empty(device, backend, pooling):
    """B = 0 (no bags) and nnz = 0 (all bags empty): shapes right, zeros, no launch on empty grids."""
    for B in (0, 2):
        args = make_case(device, B=B, pooling=pooling, max_len=0, L=0)
        check_forward(device, backend, args)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_noncontiguous_inputs(device, backend):
    """Strided tables, indices and gradients (views of larger tensors) give the contiguous results."""
    args = make_case(device, D=6, psw=True, bad_ids=1)
    gw, sw, idx = args[3], args[4], args[0]
    args[3] = torch.cat([gw, torch.randn_like(gw)], 1)[:, :6]
    args[4] = torch.cat([sw, torch.randn_like(sw)], 2)[:, :, :6]
    args[0] = torch.stack([idx, torch.zeros_like(idx)], 1)[:, 0]
    args[8] = torch.stack([args[8], args[8]], 1)[:, 1]
    assert not args[3].is_contiguous() and not args[4].is_contiguous() and not args[0].is_contiguous()
    check_forward(device, backend, args)
    check_backward(device, backend, args)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_forward_no_aware_features(device, backend):
    args = make_case(device, sizes=(3, 4), aware=(0, 0))
    g, s = check_forward(device, backend, args)
    assert s.shape[1] == 0


# ------------------------------------------------------------------------------------------------ backward

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling", [SUM, MEAN, NONE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_backward_rows(device, backend, pooling, dtype):
    args = make_case(device, dtype=dtype, idt=torch.int32 if dtype == torch.bfloat16 else torch.int64,
                     pooling=pooling, psw=(pooling == SUM), bad_ids=2)
    check_backward(device, backend, args, dtype=dtype)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("D", [3, 33, 300])
def test_backward_widths_and_long_segments(device, backend, D):
    args = make_case(device, D=D, B=4, sizes=(3, 2), aware=(1, 1), psw=True, dup=True, max_len=5)
    check_backward(device, backend, args)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pooling", [SUM, MEAN])
def test_backward_hot_rows(device, backend, pooling):
    """Rows with more entries than one pass sums (PIECE = 32): the two-level split path, still exact."""
    args = make_case(device, B=48, sizes=(2, 3), aware=(1, 1), M=2, D=6, psw=(pooling == SUM), max_len=4,
                     empty_bags=False, pooling=pooling, bad_ids=3)
    check_backward(device, backend, args)


@pytest.mark.parametrize("device,backend", [p for p in PAIRS if p.values[1] == "triton"] or [
    pytest.param("cpu", "triton", id="no-triton", marks=pytest.mark.skip(reason="triton unavailable here"))])
@pytest.mark.parametrize("piece", [1, 2, 3])
def test_backward_split_pieces(device, backend, piece, monkeypatch):
    """Triton: every piece length, including 1 (each entry its own piece) and segments that split unevenly."""
    from saml_kernels.triton import scenario_embedding_bag as tk

    monkeypatch.setattr(tk, "PIECE", piece)
    args = make_case(device, B=4, psw=True, dup=True, max_len=5, bad_ids=1)
    check_backward(device, backend, args)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_backward_no_psw_grad_and_empty(device, backend):
    args = make_case(device, psw=True)
    check_backward(device, backend, args, need_psw=False)
    args = make_case(device, B=2, max_len=0)
    out, _, _ = check_backward(device, backend, args)
    assert out[0].numel() == 0 and out[2].numel() == 0


@pytest.mark.parametrize("device,backend", PAIRS)
def test_backward_bitwise_repeatable(device, backend):
    """Sort + segment sum in id order: the same inputs give bitwise the same gradients (no float atomics)."""
    args = make_case(device, B=6, sizes=(3, 2), aware=(1, 1), psw=True, dup=True, max_len=6)
    _, bwd = kernels(backend)
    g0, s0, _ = KO.seb_forward(*ref_args(args), False)
    gg = torch.randn(g0.shape).to(device)
    gs = torch.randn(s0.shape).to(device)
    a = bwd(gg, gs, *args, True)
    b = bwd(gg, gs, *args, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------ CUDA only

def _cuda_pairs():
    return [p for p in PAIRS if p.values[1] == "cuda"] or [
        pytest.param("cuda", "cuda", id="no-cuda-backend", marks=pytest.mark.skip(reason="no CUDA device / kernels"))]


def backward_case(device, dtype, D, hot):
    """(kernel args, grad_global, grad_scenario) for the backward tests; ``hot``: a few rows with far more than
    32 entries each (the split / two-level paths), else many duplicate rows and an invalid id."""
    if hot:
        args = make_case(device, dtype=dtype, D=D, B=48, sizes=(2, 3), aware=(1, 1), M=2, psw=True,
                         empty_bags=False, bad_ids=2)
    else:
        args = make_case(device, dtype=dtype, D=D, psw=True, dup=True, bad_ids=1)
    g0, s0, _ = KO.seb_forward(*ref_args(args), False)
    return args, torch.randn(g0.shape, dtype=dtype).to(device), torch.randn(s0.shape, dtype=dtype).to(device)


@pytest.mark.parametrize("device,backend", _cuda_pairs())
@pytest.mark.parametrize("optimizer", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D,hot", [(8, False), (33, False), (600, False), (8, True), (40, True)])
def test_cuda_fused_update(device, backend, optimizer, dtype, D, hot):
    """seb_backward_update_ (SGD / row-wise Adagrad on the deduplicated rows) == rows from the reference + the
    same update written in PyTorch (float32/64 math on the unrounded per-row gradients). ``hot``: rows with
    more than 32 entries (the two-level split path)."""
    args, gg, gs = backward_case(device, dtype, D, hot)
    gw, sw = args[3], args[4]
    M, Rs = sw.shape[0], sw.shape[1]
    gst = torch.rand(gw.shape[0], device=device)
    sst = torch.rand(M * Rs, device=device)
    rows = KO.seb_backward_rows(gg.cpu().double(), gs.cpu().double(), *ref_args(args), False)
    exp_w = [gw.cpu().double().clone(), sw.cpu().double().reshape(M * Rs, D).clone()]
    exp_s = [gst.cpu().double().clone(), sst.cpu().double().clone()]
    for t, (r, v) in enumerate(((rows[0], rows[1]), (rows[2], rows[3]))):
        if optimizer == 1:
            exp_w[t][r] -= 0.1 * v
        else:
            exp_s[t][r] += (v * v).mean(1)
            exp_w[t][r] -= 0.1 * v / (exp_s[t][r].sqrt() + 1e-6).unsqueeze(1)
    # lr, eps, wd, apply, stochastic rounding off (round-to-nearest, compared at the dtype's tolerance), seed, step
    hparams = torch.tensor([0.1, 1e-6, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64, device=device)
    _backend.kernels(OP, backend).backward_update(gg, gs, *args[:3], gw, sw, *args[5:11],
                                                  gst if optimizer == 2 else None, sst if optimizer == 2 else None,
                                                  optimizer, hparams, True, True)
    assert_close(gw, exp_w[0], dtype)
    assert_close(sw.reshape(M * Rs, D), exp_w[1], dtype)
    if optimizer == 2:
        torch.testing.assert_close(gst.cpu().double(), exp_s[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sst.cpu().double(), exp_s[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", _cuda_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("D,hot", [(8, False), (33, False), (600, False), (8, True), (40, True)])
def test_cuda_dense_backward(device, backend, dtype, D, hot):
    """seb_backward_dense (the sync-free two-level schedule: runs of <= 32 entries, counts on the device) ==
    the reference rows scattered into dense dG / dS; ``hot``: rows with far more than 32 entries."""
    args, gg, gs = backward_case(device, dtype, D, hot)
    gw, sw = args[3], args[4]
    M, Rs = sw.shape[0], sw.shape[1]
    rows = KO.seb_backward_rows(gg.cpu().double(), gs.cpu().double(), *ref_args(args), True)
    exp_g = torch.zeros(gw.shape, dtype=torch.float64)
    exp_s = torch.zeros(M * Rs, D, dtype=torch.float64)
    exp_g[rows[0]] = rows[1]
    exp_s[rows[2]] = rows[3]
    dg, ds, gpsw = _backend.kernels(OP, backend).backward_dense(gg, gs, *args, True)
    assert dg.shape == gw.shape and ds.shape == sw.shape and dg.dtype == gw.dtype
    assert_close(dg, exp_g, dtype)
    assert_close(ds.reshape(M * Rs, D), exp_s, dtype)
    assert_close(gpsw, rows[4], dtype)


@pytest.mark.parametrize("device,backend", [p for p in PAIRS if p.values[0] == "cuda"] or [
    pytest.param("cuda", "x", id="no-gpu", marks=pytest.mark.skip(reason="no CUDA device"))])
@pytest.mark.slow
def test_cuda_64bit_addressing(device, backend):
    """Rows past 2^31 elements (a 4.3 GB fp16 table): row * D must be computed in 64 bits."""
    D = 64
    R = (1 << 31) // D + 4096
    try:
        gw = torch.empty(R, D, dtype=torch.float16, device=device)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2^31-element table")
    top = torch.arange(R - 8, R, device=device)
    gw[top] = torch.randn(8, D, dtype=torch.float16, device=device)
    sw = torch.randn(1, 1, D, dtype=torch.float16, device=device)
    idx = torch.tensor([R - 1, R - 8, R - 3, R - 2], device=device)
    off = torch.tensor([0, 1, 4], device=device)
    lt = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    fwd, _ = kernels(backend)
    g, s, bad = fwd(idx, off, torch.zeros(2, dtype=torch.long, device=device), gw, sw, lt([0, R]), lt([0, 0]),
                    lt([-1]), None, SUM, 0, True)
    exp = torch.stack([gw[R - 1].float(), gw[[R - 8, R - 3, R - 2]].float().sum(0)])
    torch.testing.assert_close(g[:, 0].float(), exp, atol=2e-2, rtol=2e-3)
    assert int(bad) == 0
