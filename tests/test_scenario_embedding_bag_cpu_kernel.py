"""Direct tests of the C++ CPU kernels (torch.ops.saml_C.seb_forward / seb_backward_rows) against the Python
kernel contract, judged by the float64 oracles of tests/_kernel_oracles.py (independent of saml_kernels).

The public API (validation, autograd, sparse gradients) is tested in test_scenario_embedding_bag.py; this file pins
the kernel contract: outputs, bad_count, sorted unique int64 rows, m * Rs + r scenario rows, grad_psw, pooling
modes, dtypes, int32/int64, invalid ids, empty bags, B = 0, and bitwise equality across thread counts.
"""
from __future__ import annotations

import pytest
import torch

from saml_kernels import _ext
import _kernel_oracles as KO

from conftest import poison_like, tolerance

pytestmark = pytest.mark.skipif(not _ext.has_cpu_ext(), reason="C++ extension not built")

SUM, MEAN, NONE = 0, 1, 2
# torch's own float32 assert_close tolerances, applied to a float32 result against the float64 oracle
F32_DEFAULT = dict(rtol=1.3e-6, atol=1e-5)


def make_case(dtype=torch.float32, itype=torch.int64, B=7, D=5, M=3, sizes=(4, 9, 3, 6), aware=(1, 0, 1, 1),
              pooling=SUM, max_len=4, bag_len=3, invalid=0.0, psw=False):
    """Random inputs of the kernel contract (layout tensors int64 as table_layout gives them)."""
    F = len(sizes)
    fr = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
    fs = [0]
    for s, a in zip(sizes, aware):
        fs.append(fs[-1] + (s if a else 0))
    fsr = torch.tensor(fs)
    slot, j = [], 0
    for a in aware:
        slot.append(j if a else -1)
        j += bool(a)
    slot = torch.tensor(slot)
    Rs = max(fs[-1], 1)
    gw = torch.randn(int(fr[-1]) + 2, D, dtype=torch.float64).to(dtype)  # 2 spare rows: must stay unread
    sw = torch.randn(M, Rs, D, dtype=torch.float64).to(dtype)
    if pooling == NONE:
        lens = torch.full((F * B,), bag_len)
    else:
        lens = torch.randint(0, max_len + 1, (F * B,))
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    nnz = int(off[-1])
    feat = torch.repeat_interleave(torch.arange(F * B) // max(B, 1), lens) if B else torch.zeros(0, dtype=torch.long)
    size = torch.tensor(sizes)[feat]
    idx = (torch.rand(nnz) * size).long()
    if invalid and nnz:
        bad = torch.rand(nnz) < invalid
        choice = torch.randint(0, 3, (nnz,))
        bad_val = torch.where(choice == 0, -1 - torch.randint(0, 5, (nnz,)),
                              torch.where(choice == 1, size, size + torch.randint(1, 50, (nnz,))))
        idx = torch.where(bad, bad_val, idx)
    scen = torch.randint(0, M, (B,), dtype=itype)
    w = torch.randn(nnz, dtype=torch.float64).to(dtype) if psw else None
    return dict(indices=idx.to(itype), offsets=off.to(itype), scenario=scen, global_weight=gw, scenario_weight=sw,
                feature_rows=fr, feature_scenario_rows=fsr, aware_slot=slot, per_sample_weights=w, pooling=pooling,
                bag_len=bag_len if pooling == NONE else 0)


def fwd_args(c, check=True):
    return (c["indices"], c["offsets"], c["scenario"], c["global_weight"], c["scenario_weight"], c["feature_rows"],
            c["feature_scenario_rows"], c["aware_slot"], c["per_sample_weights"], c["pooling"], c["bag_len"], check)


def ref_case(c):
    """The case in float64 (the oracle computes in float64 then)."""
    d = dict(c)
    for k in ("global_weight", "scenario_weight", "per_sample_weights"):
        if d[k] is not None:
            d[k] = d[k].double()
    return d


def oracle_shaped(c):
    """The oracle's forward outputs in the table dtype (for shapes / gradient inputs of the kernel's dtype)."""
    g, s, _ = KO.seb_forward(*fwd_args(c))
    return g.to(c["global_weight"].dtype), s.to(c["scenario_weight"].dtype)


def bwd_args(c, gg, gs, need_psw):
    return (gg, gs) + fwd_args(c)[:-1] + (need_psw,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pooling", [SUM, MEAN, NONE])
def test_forward_matches_reference(dtype, itype, pooling):
    c = make_case(dtype, itype, pooling=pooling, invalid=0.15)
    g, s, bad = torch.ops.saml_C.seb_forward(*fwd_args(c))
    rg, rs, rbad = KO.seb_forward(*fwd_args(ref_case(c)))
    assert g.dtype == dtype and s.dtype == dtype and bad.dtype == torch.int64
    assert g.shape == rg.shape and s.shape == rs.shape
    torch.testing.assert_close(g.double(), rg, **tolerance(dtype))
    torch.testing.assert_close(s.double(), rs, **tolerance(dtype))
    assert int(bad) == int(rbad) > 0


@pytest.mark.parametrize("psw", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pooling", [SUM, MEAN, NONE])
def test_backward_rows_matches_reference(psw, dtype, itype, pooling):
    c = make_case(dtype, itype, pooling=pooling, invalid=0.15, psw=psw, B=9, max_len=5)
    g, s = oracle_shaped(c)
    gg, gs = torch.randn_like(g, dtype=torch.float64).to(dtype), torch.randn_like(s, dtype=torch.float64).to(dtype)
    out = torch.ops.saml_C.seb_backward_rows(*bwd_args(c, gg, gs, psw))
    ref = KO.seb_backward_rows(*bwd_args(ref_case(c), gg.double(), gs.double(), psw))
    grows, gvals, srows, svals, gpsw = out
    for rows in (grows, srows):
        assert rows.dtype == torch.int64
        assert bool((rows[1:] > rows[:-1]).all()), "rows must be sorted and unique"
    assert torch.equal(grows, ref[0]) and torch.equal(srows, ref[2])
    torch.testing.assert_close(gvals.double(), ref[1], **tolerance(dtype))
    torch.testing.assert_close(svals.double(), ref[3], **tolerance(dtype))
    if psw:
        torch.testing.assert_close(gpsw.double(), ref[4].double(), **tolerance(dtype))
    else:
        assert gpsw.numel() == 0


def test_scenario_rows_flattened_and_only_own_scenario():
    """Scenario rows are m * Rs + r, and only the sample's scenario table gets its gradient."""
    c = make_case(B=6, M=4, sizes=(5, 5), aware=(1, 1), max_len=2)
    c["scenario"] = torch.tensor([3, 3, 1, 1, 3, 1])
    g, s = oracle_shaped(c)
    _, _, srows, _, _ = torch.ops.saml_C.seb_backward_rows(*bwd_args(c, torch.ones_like(g), torch.ones_like(s), False))
    Rs = c["scenario_weight"].shape[1]
    assert set((srows // Rs).tolist()) <= {1, 3}
    ref = KO.seb_backward_rows(*bwd_args(c, torch.ones_like(g), torch.ones_like(s), False))
    assert torch.equal(srows, ref[2])


def test_invalid_ids_read_zero_and_get_no_gradient():
    c = make_case(B=4, sizes=(3, 3), aware=(1, 1), max_len=1)
    c["offsets"] = torch.arange(0, 9)
    c["indices"] = torch.tensor([0, 3, -1, 2, 1, 100, 0, 3])  # feature 0: 3 valid of 4; feature 1: 2 valid
    g, s, bad = torch.ops.saml_C.seb_forward(*fwd_args(c))
    assert int(bad) == 4
    assert torch.equal(g[1, 0], torch.zeros(5)) and torch.equal(g[2, 0], torch.zeros(5))
    assert torch.equal(g[1, 1], torch.zeros(5)) and torch.equal(s[3, 1], torch.zeros(5))
    # an id one past feature 0's rows must not read feature 1's first row
    assert not torch.equal(g[1, 0], c["global_weight"][3])
    grows, _, srows, _, _ = torch.ops.saml_C.seb_backward_rows(
        *bwd_args(c, torch.ones_like(g), torch.ones_like(s), False))
    assert grows.tolist() == [0, 2, 3, 4]  # feature 1 starts at global row 3
    _, _, bad0 = torch.ops.saml_C.seb_forward(*fwd_args(c, check=False))
    assert int(bad0) == 0


@pytest.mark.parametrize("pooling", [SUM, MEAN, NONE])
def test_empty_batch_and_empty_bags(pooling):
    c = make_case(B=0, pooling=pooling)
    g, s, bad = torch.ops.saml_C.seb_forward(*fwd_args(c))
    assert g.shape[0] == 0 and s.shape[0] == 0 and int(bad) == 0
    out = torch.ops.saml_C.seb_backward_rows(*bwd_args(c, g, s, False))
    assert out[0].numel() == 0 and out[1].shape == (0, 5)
    if pooling != NONE:  # all bags empty: zeros, mean included
        c = make_case(B=3, pooling=pooling, max_len=0)
        g, s, _ = torch.ops.saml_C.seb_forward(*fwd_args(c))
        assert torch.equal(g, torch.zeros_like(g)) and torch.equal(s, torch.zeros_like(s))


def test_outputs_fully_written_over_reused_memory():
    """Outputs come from a block cache: poison a freed output and check the next one is fully overwritten."""
    c = make_case(B=2048, D=64, sizes=(50, 60), aware=(1, 1), max_len=3, invalid=0.1)
    g, s, _ = torch.ops.saml_C.seb_forward(*fwd_args(c))
    g.copy_(poison_like(g))
    s.copy_(poison_like(s))
    del g, s
    g, s, _ = torch.ops.saml_C.seb_forward(*fwd_args(c))
    rg, rs, _ = KO.seb_forward(*fwd_args(c))
    torch.testing.assert_close(g.double(), rg, **F32_DEFAULT)
    torch.testing.assert_close(s.double(), rs, **F32_DEFAULT)


def test_large_one_hot_and_bags_match_reference():
    """Sizes past the group/prefetch/block lengths of the kernel (one-hot fast path and pooled bags)."""
    for max_len in (1, 8):
        c = make_case(B=1500, D=32, sizes=(1000, 700, 5), aware=(1, 1, 0), max_len=max_len, invalid=0.01)
        if max_len == 1:
            c["offsets"] = torch.arange(0, 3 * 1500 + 1)
            c["indices"] = (torch.rand(4500) * torch.tensor([1000, 700, 5]).repeat_interleave(1500)).long()
        g, s, _ = torch.ops.saml_C.seb_forward(*fwd_args(c))
        rg, rs, _ = KO.seb_forward(*fwd_args(c))
        torch.testing.assert_close(g.double(), rg, **F32_DEFAULT)
        torch.testing.assert_close(s.double(), rs, **F32_DEFAULT)


@pytest.mark.parametrize("pooling", [SUM, MEAN, NONE])
def test_bitwise_identical_across_thread_counts(pooling):
    c = make_case(B=300, D=16, sizes=(40, 3, 70), aware=(1, 1, 0), max_len=6, pooling=pooling, invalid=0.05,
                  psw=pooling == SUM)
    g, s = oracle_shaped(c)
    gg, gs = torch.randn_like(g), torch.randn_like(s)
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 4):
            torch.set_num_threads(t)
            outs.append((torch.ops.saml_C.seb_forward(*fwd_args(c)),
                         torch.ops.saml_C.seb_backward_rows(*bwd_args(c, gg, gs, pooling == SUM))))
    finally:
        torch.set_num_threads(old)
    for f, b in outs[1:]:
        for x, y in zip(f + b, outs[0][0] + outs[0][1]):
            assert torch.equal(x, y)


def test_gradcheck_float64_through_the_kernels():
    """The C++ forward/backward pair is a correct adjoint: gradcheck of a tiny autograd wrapper."""
    c = make_case(torch.float64, B=3, D=3, sizes=(3, 4), aware=(1, 1), max_len=3, psw=True)

    class K(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gw, sw, w):
            ctx.save_for_backward(gw, sw, w)
            d = dict(c, global_weight=gw, scenario_weight=sw, per_sample_weights=w)
            g, s, _ = torch.ops.saml_C.seb_forward(*fwd_args(d))
            return g, s

        @staticmethod
        def backward(ctx, gg, gs):
            gw, sw, w = ctx.saved_tensors
            d = dict(c, global_weight=gw, scenario_weight=sw, per_sample_weights=w)
            grows, gvals, srows, svals, gpsw = torch.ops.saml_C.seb_backward_rows(*bwd_args(d, gg, gs, True))
            dg = torch.zeros_like(gw).index_copy_(0, grows, gvals)
            ds = torch.zeros_like(sw).view(-1, sw.shape[-1]).index_copy_(0, srows, svals).view_as(sw)
            return dg, ds, gpsw

    gw = c["global_weight"].clone().requires_grad_()
    sw = c["scenario_weight"].clone().requires_grad_()
    w = c["per_sample_weights"].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, x: K.apply(a, b, x), (gw, sw, w))


def test_non_contiguous_and_64bit_offsets():
    """Non-contiguous tables are accepted (made contiguous); a row index past 2^31 / D elements is addressed
    with 64-bit arithmetic (checked with a table of > 2^31 elements only when memory allows: skipped here)."""
    c = make_case(D=6)
    c["global_weight"] = torch.randn(6, c["global_weight"].shape[0]).t()
    g, s, _ = torch.ops.saml_C.seb_forward(*fwd_args(c))
    rg, rs, _ = KO.seb_forward(*fwd_args(c))
    torch.testing.assert_close(g.double(), rg, **F32_DEFAULT)
    torch.testing.assert_close(s.double(), rs, **F32_DEFAULT)


def test_kernel_rejects_mismatched_dtypes():
    c = make_case()
    c["offsets"] = c["offsets"].to(torch.int32)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.saml_C.seb_forward(*fwd_args(c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pooling,psw", [(SUM, False), (SUM, True), (MEAN, False), (MEAN, True)])
@pytest.mark.parametrize("D", [32, 40])
def test_pooled_fast_path_dtypes_match_reference(dtype, itype, pooling, psw, D):
    """Pooled float32 / float16 / bfloat16 bags run FBGEMM's generated kernel where libtorch has it (long runs of
    valid bags, per-sample weights as float); the few bags with an invalid id run the portable gather."""
    c = make_case(dtype, itype, B=700, D=D, sizes=(900, 40, 1200), aware=(1, 0, 1), pooling=pooling, max_len=9,
                  invalid=0.002, psw=psw)
    g, s, bad = torch.ops.saml_C.seb_forward(*fwd_args(c))
    rg, rs, rbad = KO.seb_forward(*fwd_args(ref_case(c)))
    torch.testing.assert_close(g.double(), rg, **tolerance(dtype))
    torch.testing.assert_close(s.double(), rs, **tolerance(dtype))
    assert int(bad) == int(rbad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_rows_low_precision_round_once(dtype):
    """16-bit gradient rows are the float32 sums of the same values rounded once (to nearest even), bitwise (float16
    rows take the 8-lane F16C loops where the CPU has them; D = 21 adds a scalar tail)."""
    c = make_case(dtype, B=40, D=21, max_len=6, sizes=(7, 9, 5, 6))
    g, s = oracle_shaped(c)
    gg, gs = torch.randn_like(g, dtype=torch.float32).to(dtype), torch.randn_like(s, dtype=torch.float32).to(dtype)
    low = torch.ops.saml_C.seb_backward_rows(*bwd_args(c, gg, gs, False))
    c32 = dict(c, global_weight=c["global_weight"].float(), scenario_weight=c["scenario_weight"].float())
    f32 = torch.ops.saml_C.seb_backward_rows(*bwd_args(c32, gg.float(), gs.float(), False))
    assert torch.equal(low[0], f32[0]) and torch.equal(low[2], f32[2])
    assert torch.equal(low[1], f32[1].to(dtype)) and torch.equal(low[3], f32[3].to(dtype))
    assert low[1].abs().sum() > 0
