"""8-bit row-wise serving tables: the layout against a float64 formula, the 8-bit lookup against
the float op on the dequantised tables (every backend here: FBGEMM on the CPU, the Triton kernel under
TRITON_INTERPRET=1, the reference), the layer, and the exported 8-bit program against the float model with a
bound on the logits' difference derived from scale / 2 per table element."""
from __future__ import annotations

import copy
import warnings
import zlib

import numpy as np
import pytest
import torch

from conftest import device_backends, interp_covering
from saml_kernels import serving
from saml_kernels.data import make_synthetic
from saml_kernels._codes import POOLING
from saml_kernels.nn import SAML, SAMLConfig, STAR, STARConfig, ScenarioEmbedding, TrainingOptimizer
from saml_kernels.ops import scenario_embedding_bag_8bit as q8
from saml_kernels.ops.scenario_hash import scenario_local
from saml_kernels.quantized import QuantizedScenarioEmbedding, first_order_bound, quantize_tables, table_bytes
from saml_kernels.reference.scenario_embedding_bag import scenario_embedding_bag_reference

OP = "scenario_embedding_bag_8bit"


# ------------------------------------------------------------------------------------------------ layout

def test_layout_matches_the_float64_formula():
    """Row = D uint8 codes | float32 scale | float32 bias (little-endian); bias = row min, scale = range / 255,
    q = round((x - min) / scale), every element read back within scale / 2 (float32 rounding aside)."""
    g = torch.Generator().manual_seed(0)
    for D in (1, 3, 7, 16):
        x = torch.randn(50, D, generator=g) * torch.rand(50, 1, generator=g) * 3
        x[0] = 0.25  # a constant row: scale 0, read back exactly
        p = q8.quantize_rows(x)
        assert p.dtype == torch.uint8 and p.shape == (50, D + 8)
        x64 = x.double()
        lo, hi = x64.min(1).values, x64.max(1).values
        scale = (hi - lo) / 255
        raw = p.numpy()
        got_scale = torch.from_numpy(raw[:, D:D + 4].copy().view("<f4")[:, 0]).double()
        got_bias = torch.from_numpy(raw[:, D + 4:D + 8].copy().view("<f4")[:, 0]).double()
        torch.testing.assert_close(got_scale, scale, atol=0, rtol=2e-7)
        assert torch.equal(got_bias, lo)
        s, b = q8.scale_bias(p)
        assert torch.equal(s.double(), got_scale) and torch.equal(b.double(), got_bias)
        want_q = torch.where(scale[:, None] > 0, ((x64 - lo[:, None]) / scale.clamp(min=1e-300)[:, None]).round(),
                             torch.zeros_like(x64))
        assert (p[:, :D].double() - want_q).abs().max() <= 1  # exact except at a float32 .5 tie
        assert (p[:, :D].double() != want_q).double().mean() < 0.01
        deq = q8.dequantize_rows(p).double()
        assert torch.equal(deq, (got_scale[:, None] * p[:, :D].double() + got_bias[:, None]).float().double()) or \
            (deq - (got_scale[:, None] * p[:, :D].double() + got_bias[:, None])).abs().max() < 1e-6
        err = (deq - x64).abs()
        assert bool((err <= scale[:, None] / 2 * (1 + 1e-4) + 1e-6).all()), float((err - scale[:, None] / 2).max())
        assert torch.equal(deq[0], x64[0])


def test_quantize_rows_of_16_bit_tables_and_3d():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 6, generator=g)
    p = q8.quantize_rows(x)
    assert p.shape == (3, 20, 14)
    assert torch.equal(p.reshape(60, 14), q8.quantize_rows(x.reshape(60, 6)))
    for dt in (torch.float16, torch.bfloat16):
        assert torch.equal(q8.quantize_rows(x.to(dt)), q8.quantize_rows(x.to(dt).float()))
    with pytest.raises(TypeError, match=r"float32 / float16 / bfloat16 tables, got torch.float64"):
        q8.quantize_rows(x.double())
    bad = x.clone()
    bad[1, 4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"row 24 of the table holds a non-finite value"):
        q8.quantize_rows(bad)


# ------------------------------------------------------------------------------------------------ the lookup

FR, FSR = [0, 10, 17, 40], [0, 10, 10, 33]  # features 0 and 2 scenario-aware, feature 1 not


def _inputs(B, M, D, pooling, idt, g, bad_ids=False, fixed=False):
    """Bags of random lengths 0..3 with an empty one, or (``fixed``, and always for "none") all of one length
    (the CPU kernel's pooled and one-id-per-row paths, one-hot bags)."""
    F = len(FR) - 1
    if pooling == "none" or fixed:
        lengths = torch.full((F * B,), 1 if fixed else 3)
    else:
        lengths = torch.randint(0, 4, (F * B,), generator=g)
        lengths[1] = 0  # an empty bag in every case
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.cat([torch.randint(0, FR[f + 1] - FR[f], (int(lengths[f * B:(f + 1) * B].sum()),), generator=g)
                     for f in range(F)])
    if bad_ids and ids.numel() > 3:
        ids[2], ids[-1] = -1, 999
    scenario = torch.randint(0, M, (B,), generator=g)
    G = torch.randn(FR[-1], D, generator=g)
    S = torch.randn(M, FSR[-1], D, generator=g) * 2
    return ids.to(idt), offsets.to(idt), scenario.to(idt), G, S


CASES = [("sum", False, False), ("sum", True, False), ("mean", False, False), ("none", False, False),
         ("sum", True, True), ("mean", False, True)]


@pytest.mark.parametrize("device, backend, pooling, psw, fixed, idt, M, D",
                         interp_covering(device_backends(OP), CASES, [torch.int32, torch.int64], [(1, 5), (4, 16)]))
def test_lookup_equals_the_float_op_on_the_dequantised_tables(device, backend, pooling, psw, fixed, idt, M, D):
    g = torch.Generator().manual_seed(hash((pooling, psw, fixed, M, D)) % 1000)
    ids, offsets, scenario, G, S = _inputs(6, M, D, pooling, idt, g, fixed=fixed)
    w = torch.randn(ids.numel(), generator=g) if psw else None
    Gq, Sq = q8.quantize_rows(G), q8.quantize_rows(S)
    dev = lambda t: t.to(device) if t is not None else None  # noqa: E731
    got = q8.scenario_embedding_bag_8bit(dev(ids), dev(offsets), dev(scenario), dev(Gq), dev(Sq), FR, FSR,
                                         pooling=pooling, per_sample_weights=dev(w), backend=backend)
    want = scenario_embedding_bag_reference(ids, offsets, scenario, q8.dequantize_rows(Gq).double(),
                                            q8.dequantize_rows(Sq).double(), FR, FSR, pooling=pooling,
                                            per_sample_weights=w.double() if psw else None)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.cpu().double(), b, atol=2e-6, rtol=2e-6)  # float32 accumulation


@pytest.mark.parametrize("device, backend", device_backends(OP))
@pytest.mark.parametrize("fixed", [False, True], ids=["ragged", "onehot"])
def test_bounds_and_scenario_checks_as_the_float_op(device, backend, fixed):
    """bounds_check "zero": a bad id is a zero vector (counted in the mean's length, as the float op); "error":
    the float op's IndexError, word for word; a bad scenario id: the float op's IndexError."""
    from saml_kernels.ops.scenario_embedding_bag import scenario_embedding_bag

    g = torch.Generator().manual_seed(5)
    ids, offsets, scenario, G, S = _inputs(5, 3, 6, "mean", torch.int64, g, bad_ids=True, fixed=fixed)
    Gq, Sq = q8.quantize_rows(G), q8.quantize_rows(S)
    Gd, Sd = q8.dequantize_rows(Gq), q8.dequantize_rows(Sq)
    d = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    with warnings.catch_warnings():  # the float op's warning, once per process
        warnings.simplefilter("ignore", RuntimeWarning)
        got = q8.scenario_embedding_bag_8bit(*d(ids, offsets, scenario, Gq, Sq), FR, FSR, pooling="mean",
                                             bounds_check="zero", backend=backend)
    want = scenario_embedding_bag_reference(ids, offsets, scenario, Gd.double(), Sd.double(), FR, FSR, pooling="mean")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b, atol=2e-6, rtol=2e-6)
    msgs = []
    for fn, tabs in ((q8.scenario_embedding_bag_8bit, (Gq, Sq)), (scenario_embedding_bag, (Gd, Sd))):
        with pytest.raises(IndexError) as e:
            fn(*d(ids, offsets, scenario, *tabs), FR, FSR, backend=backend if fn is not scenario_embedding_bag
               else "reference")
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "indices[2] = -1 is out of range for feature 0" in msgs[0]
    ok_ids = ids.clamp(0, 6)
    bad_s = scenario.clone()
    bad_s[3] = 3
    with pytest.raises(IndexError, match=r"scenario\[3\] = 3"):
        q8.scenario_embedding_bag_8bit(*d(ok_ids, offsets, bad_s, Gq, Sq), FR, FSR, backend=backend)
    # bounds_check="off" trusts the input, yet the kernels read nothing out of bounds: a bad scenario id gives
    # zero scenario rows for its sample, the other samples are unchanged (the reference's indexing raises)
    if backend == "reference":
        with pytest.raises(IndexError):
            q8.scenario_embedding_bag_8bit(*d(ok_ids, offsets, bad_s, Gq, Sq), FR, FSR, bounds_check="off",
                                           backend=backend)
        return
    g_off, s_off = q8.scenario_embedding_bag_8bit(*d(ok_ids, offsets, bad_s, Gq, Sq), FR, FSR, bounds_check="off",
                                                  backend=backend)
    g_ok, s_ok = q8.scenario_embedding_bag_8bit(*d(ok_ids, offsets, scenario, Gq, Sq), FR, FSR, backend=backend)
    assert torch.equal(g_off, g_ok) and bool((s_off[3] == 0).all())
    keep = [b for b in range(5) if b != 3]
    assert torch.equal(s_off[keep], s_ok[keep])


@pytest.mark.parametrize("device, backend", device_backends(OP))
@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
def test_no_ids_and_no_samples(device, backend, pooling):
    """Every bag empty (nnz = 0) gives zeros; B = 0 gives empty outputs of the right shapes."""
    g = torch.Generator().manual_seed(3)
    _, _, _, G, S = _inputs(2, 2, 5, "sum", torch.int64, g)
    Gq, Sq = q8.quantize_rows(G).to(device), q8.quantize_rows(S).to(device)
    F = len(FR) - 1
    for B in (4, 0):
        ids = torch.zeros(0, dtype=torch.int64, device=device)
        offsets = torch.zeros(F * B + 1, dtype=torch.int64, device=device)
        scenario = torch.zeros(B, dtype=torch.int64, device=device)
        got = q8.scenario_embedding_bag_8bit(ids, offsets, scenario, Gq, Sq, FR, FSR, pooling=pooling,
                                             backend=backend)
        shapes = [(B, F, 0, 5), (B, 2, 0, 5)] if pooling == "none" else [(B, F, 5), (B, 2, 5)]
        for t, shape in zip(got, shapes):
            assert t.shape == shape and t.dtype == torch.float32 and bool((t == 0).all())


def test_bad_arguments_of_the_op():
    g = torch.Generator().manual_seed(2)
    ids, offsets, scenario, G, S = _inputs(4, 2, 4, "sum", torch.int64, g)
    Gq, Sq = q8.quantize_rows(G), q8.quantize_rows(S)
    with pytest.raises(TypeError, match=r"global_packed must have dtype in \['torch.uint8'\], got torch.float32"):
        q8.scenario_embedding_bag_8bit(ids, offsets, scenario, G, Sq, FR, FSR)
    with pytest.raises(ValueError, match="scenario_packed row width 11 differs from global_packed's 12"):
        q8.scenario_embedding_bag_8bit(ids, offsets, scenario, Gq, q8.quantize_rows(S[..., :3]), FR, FSR)
    with pytest.raises(ValueError, match="per_sample_weights need pooling='sum'"):
        q8.scenario_embedding_bag_8bit(ids, offsets, scenario, Gq, Sq, FR, FSR, pooling="mean",
                                       per_sample_weights=torch.ones(ids.numel()))
    with pytest.raises(ValueError, match=r"feature_rows\[-1\] = 40 exceeds the table's 39 rows"):
        q8.scenario_embedding_bag_8bit(ids, offsets, scenario, Gq[:-1], Sq, FR, FSR)


# ------------------------------------------------------------------------------------------------ the CPU kernel

# (Rg_f ids, Rs_f scenario rows): unhashed aware, not aware, hashed (collisions), a one-id feature, hashed to 1 row
KFEATS = [(50, 50), (37, 0), (200, 7), (1, 1), (90, 0), (64, 3), (30, 1)]
KFR = [0] + np.cumsum([r for r, _ in KFEATS]).tolist()
KFSR = [0] + np.cumsum([s for _, s in KFEATS]).tolist()
cpu_kernel = pytest.mark.skipif(
    "cpu" not in [p.values[1] for p in device_backends(OP)],
    reason="the extension has no CPU kernel of seb_forward_8bit (saml_kernels._backend.why_unavailable)")


def _kernel_inputs(seed, B, M, D, pooling, idt, psw=False, bad_ids=False, L=2):
    """Fresh random inputs on KFEATS: ragged bags of 0..5 ids with many empty ones (fixed length L for "none"),
    rows of varied ranges, and with ``bad_ids`` about 3% invalid ids (-1, Rg_f, and a huge id)."""
    g = torch.Generator().manual_seed(seed)
    F = len(KFEATS)
    if pooling == "none":
        lengths = torch.full((F * B,), L)
    else:
        lengths = torch.randint(0, 6, (F * B,), generator=g)
        lengths[torch.rand(F * B, generator=g) < 0.2] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.cat([torch.randint(0, rows, (int(lengths[f * B:(f + 1) * B].sum()),), generator=g)
                     for f, (rows, _) in enumerate(KFEATS)])
    if bad_ids:
        feat = torch.repeat_interleave(torch.arange(F), lengths.reshape(F, B).sum(1))
        pos = (torch.rand(ids.numel(), generator=g) < 0.03).nonzero().flatten()
        huge = 2 ** 31 - 1 if idt == torch.int32 else 2 ** 40
        for k, p in enumerate(pos.tolist()):
            ids[p] = (-1, KFEATS[int(feat[p])][0], huge)[k % 3]
    scenario = torch.randint(0, M, (B,), generator=g)
    G = torch.randn(KFR[-1], D, generator=g) * torch.rand(KFR[-1], 1, generator=g) * 4
    S = torch.randn(M, KFSR[-1], D, generator=g) * torch.rand(M, KFSR[-1], 1, generator=g) * 4
    w = torch.randn(ids.numel(), generator=g) if psw else None
    return ids.to(idt), offsets.to(idt), scenario.to(idt), q8.quantize_rows(G), q8.quantize_rows(S), w


def _oracle(ids, offsets, scenario, Gq, Sq, pooling, w=None, bad_scenario=()):
    """The float64 reference on the dequantised tables; samples in ``bad_scenario`` get zero scenario rows."""
    sc = scenario.clone()
    sc[list(bad_scenario)] = 0
    g, s = scenario_embedding_bag_reference(ids.long(), offsets.long(), sc.long(), q8.dequantize_rows(Gq).double(),
                                            q8.dequantize_rows(Sq).double(), KFR, KFSR, pooling=pooling,
                                            per_sample_weights=w.double() if w is not None else None)
    s[list(bad_scenario)] = 0
    return g, s


def _poisoned(fn):
    """``fn()`` with its two outputs' memory NaN-filled first: the CPU kernel takes outputs of >= 1 MiB from a pool
    (csrc/cpu/common/output_pool.h), so a first call's outputs, filled with NaN and freed, are the second call's;
    an element the kernel fails to write stays NaN."""
    first = fn()[:2]
    ptrs = sorted(t.data_ptr() for t in first)
    for t in first:
        t.fill_(float("nan"))
    del t, first
    out = fn()
    assert sorted(t.data_ptr() for t in out[:2]) == ptrs  # the poisoned blocks were reused
    return out


@cpu_kernel
@pytest.mark.parametrize("pooling, psw, bad_ids", [("sum", False, False), ("sum", True, False), ("mean", False, False),
                                                   ("none", False, False), ("sum", True, True), ("mean", False, True), ("none", False, True)])
@pytest.mark.parametrize("idt, D", [(torch.int64, 45), (torch.int32, 13), (torch.int64, 32)])
def test_cpu_kernel_on_fresh_random_inputs_equals_the_float64_oracle(pooling, psw, bad_ids, idt, D):
    """The C++ kernel (saml_C::seb_forward_8bit) against the float64 reference on the dequantised tables: hashed
    features with colliding ids, a non-aware feature, ragged and empty bags, odd D (scale / bias unaligned; rows
    written directly) and D = 32 (rows streamed from a tile), int32 and int64 ids, invalid ids read as zero vectors
    (counted in the mean's length); outputs poisoned with NaN."""
    seed = zlib.crc32(f"{pooling}{psw}{bad_ids}{idt}{D}".encode())
    Fs, L = sum(s > 0 for _, s in KFEATS), 2 if pooling == "none" else 1
    B = 2 ** 20 // (4 * Fs * L * D) + 50  # both outputs >= 1 MiB: pooled, so poisoned
    ids, offsets, scenario, Gq, Sq, w = _kernel_inputs(seed, B, 3, D, pooling, idt, psw, bad_ids)
    hashed = [f for f, (r, s) in enumerate(KFEATS) if 0 < s < r]
    local = [scenario_local(ids[offsets[f * B]:offsets[(f + 1) * B]].long(), *KFEATS[f]) for f in hashed]
    assert all(loc.unique().numel() < ids[offsets[f * B]:offsets[(f + 1) * B]].unique().numel()
               for f, loc in zip(hashed, local))  # collisions: distinct ids share scenario rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bounds_check="zero" warns once per process
        got = _poisoned(lambda: q8.scenario_embedding_bag_8bit(
            ids, offsets, scenario, Gq, Sq, KFR, KFSR, pooling=pooling, per_sample_weights=w,
            bounds_check="zero" if bad_ids else "error", backend="cpu"))
    want = _oracle(ids, offsets, scenario, Gq, Sq, pooling, w)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape and bool(torch.isfinite(a).all())
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=2e-6)  # float32 accumulation of rows up to ~8


def _raw(ids, offsets, scenario, Gq, Sq, pooling="sum", check=True, w=None, bag_len=0):
    fr, fsr, slot, fs = _seb_layout(Gq, Sq)
    return torch.ops.saml_C.seb_forward_8bit(ids, offsets, scenario, Gq, Sq, fr, fsr, slot, w,
                                             POOLING[pooling], bag_len, check, fs)


def _seb_layout(Gq, Sq):
    from saml_kernels.ops.scenario_embedding_bag import table_layout
    return table_layout(KFR, KFSR, Gq.shape[0], Sq.shape[1], Gq.device)


@cpu_kernel
@pytest.mark.parametrize("pooling", ["sum", "none"])
def test_cpu_kernel_counts_bad_ids_and_rejects_bad_offsets_and_scenarios(pooling):
    """bad_count = the number of invalid ids with check on, 0 with check off; -1 (nothing gathered) for offsets not
    from 0 to nnz, decreasing offsets, a bag of another length under "none", a scenario id outside [0, M). With the
    check off a bad scenario id gives its sample zero scenario rows; every other output is bitwise unchanged."""
    B, M = 1400, 4  # outputs >= 1 MiB: poisoned where the check is off
    ids, offsets, scenario, Gq, Sq, _ = _kernel_inputs(7, B, M, 40, pooling, torch.int64, bad_ids=True)
    sizes = torch.tensor([r for r, _ in KFEATS])
    feat = torch.repeat_interleave(torch.arange(len(KFEATS)), (offsets[1:] - offsets[:-1]).reshape(-1, B).sum(1))
    nbad = int(((ids < 0) | (ids >= sizes[feat])).sum())
    assert nbad > 10
    L = 2 if pooling == "none" else 0
    g, s, bad = _raw(ids, offsets, scenario, Gq, Sq, pooling, bag_len=L)
    assert bad.tolist() == [nbad]
    assert _raw(ids, offsets, scenario, Gq, Sq, pooling, check=False, bag_len=L)[2].tolist() == [0]
    want = _oracle(ids, offsets, scenario, Gq, Sq, pooling)
    torch.testing.assert_close(g.double(), want[0], atol=1e-5, rtol=2e-6)
    torch.testing.assert_close(s.double(), want[1], atol=1e-5, rtol=2e-6)
    if pooling == "none":  # per-sample weights with pooling none: the operator's contract (the public op refuses)
        w = torch.randn(ids.numel())
        want = _oracle(ids, offsets, scenario, Gq, Sq, pooling, w)
        for a, b in zip(_raw(ids, offsets, scenario, Gq, Sq, pooling, w=w, bag_len=L)[:2], want):
            torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=2e-6)
    for k, v in ((0, 1), (-1, int(offsets[-1]) - 1), (B + 5, int(offsets[B + 5]) + 9)):
        bad_off = offsets.clone()
        bad_off[k] = v
        assert _raw(ids, bad_off, scenario, Gq, Sq, pooling, bag_len=L)[2].tolist() == [-1], (k, v)
    for v in (-1, M):
        bad_s = scenario.clone()
        bad_s[17] = v
        assert _raw(ids, offsets, bad_s, Gq, Sq, pooling, bag_len=L)[2].tolist() == [-1]
        g2, s2, _ = _poisoned(lambda: _raw(ids, offsets, bad_s, Gq, Sq, pooling, check=False, bag_len=L))
        assert torch.equal(g2, g) and bool((s2[17] == 0).all())
        keep = [b for b in range(B) if b != 17]
        assert torch.equal(s2[keep], s[keep])


@cpu_kernel
@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
def test_cpu_kernel_bits_do_not_depend_on_threads_or_the_index_dtype(pooling):
    """Bitwise the same output for 1 and 2 threads (B = 4500 crosses the kernel's 4096-sample block on one thread
    and splits at 2250 on two) and for int32 / int64 ids, invalid ids included."""
    B = 4500
    ids, offsets, scenario, Gq, Sq, w = _kernel_inputs(11, B, 2, 12, pooling, torch.int32, psw=pooling == "sum",
                                                        bad_ids=True, L=1)  # int32: its invalid ids fit both dtypes
    outs = []
    threads = torch.get_num_threads()
    try:
        for n, dt in ((1, torch.int64), (2, torch.int64), (2, torch.int32)):
            torch.set_num_threads(n)
            outs.append(_raw(ids.to(dt), offsets.to(dt), scenario.to(dt), Gq, Sq, pooling, w=w,
                             bag_len=1 if pooling == "none" else 0))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


# ------------------------------------------------------------------------------------------------ the layer

def test_layer_with_mixed_pooling_runs_equals_the_float_layer_on_dequantised_tables():
    torch.manual_seed(0)
    feats = [("a", 9, True, "sum"), ("b", 5, False, "mean"), ("c", 7, True, "mean"), ("d", 4, False, "sum")]
    layer = ScenarioEmbedding(feats, 3, 7, optimizer=None)
    q = QuantizedScenarioEmbedding(layer)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        gd, sd = q.dequantized()
        twin.global_weight.copy_(gd)
        twin.scenario_weight.copy_(sd)
    B = 5
    lengths = torch.randint(0, 3, (4 * B,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.cat([torch.randint(0, f[1], (int(lengths[k * B:(k + 1) * B].sum()),)) for k, f in enumerate(feats)])
    scenario = torch.randint(0, 3, (B,))
    with torch.no_grad():
        got, want = q(ids, offsets, scenario), twin(ids, offsets, scenario)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert set(q.state_dict()) == {"global_packed", "scenario_packed"}
    assert q.global_packed.shape == (25, 15) and q.scenario_packed.shape == (3, 16, 15)


# ------------------------------------------------------------------------------------------------ export

DATA = make_synthetic(300, num_users=60, num_items=80, num_categories=7, num_contexts=5, num_segments=6,
                      num_tags=11, seq_len=6, seed=3)


def _trained(steps=4):
    torch.manual_seed(0)
    cfg = SAMLConfig.from_data(DATA, embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6),
                               mutual_layers=(0,))
    model = SAML(cfg)
    opt = TrainingOptimizer(model, lr=1e-2)
    for k in range(steps):
        opt.zero_grad()
        model.loss(DATA.batch(np.arange(32 * k, 32 * k + 32))).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    model = _trained()
    return model, serving.export_saml(model, DATA.batch(np.arange(40, 56)), table_dtype="uint8")


def test_exported_8bit_program_vs_the_float_model(trained, tmp_path):
    model, program = trained
    path = tmp_path / "saml8.pt2"
    serving.save_exported(program, path)
    served = serving.load_exported(path)
    assert isinstance(served, serving.ServedProgram) and served.spec["table_dtype"] == "uint8"
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "saml_kernels.scenario_embedding_bag_8bit.default" in ops
    assert not any(o.startswith("saml_kernels.scenario_embedding_bag.") for o in ops), ops
    qmodel = quantize_tables(model)
    batch = DATA.batch(np.arange(len(DATA)))
    with torch.no_grad():
        want = model(*batch.inputs())
        got = served(*batch.inputs())
        eager8 = qmodel(*batch.inputs())
    torch.testing.assert_close(got, eager8, atol=1e-6, rtol=1e-6)  # the program = the eager 8-bit model
    diff = (got[0] - want[0]).abs()
    bound = first_order_bound(model, qmodel, batch)
    assert diff.max() > 0  # the tables did change
    assert bool((diff <= 2 * bound + 1e-5).all()), float((diff / bound).max())
    assert float(diff.max()) < 0.05


@pytest.mark.parametrize("B", [1, 2, 7])
def test_exported_8bit_program_serves_any_batch_size(trained, B):
    model, program = trained
    fn = serving.served_module(program)
    qmodel = quantize_tables(model)
    for start in (0, 101):
        batch = DATA.batch(np.arange(start, start + B))
        with torch.no_grad():
            torch.testing.assert_close(fn(*batch.inputs()), qmodel(*batch.inputs()), atol=1e-6, rtol=1e-6)


def test_export_at_batch_one_and_a_star_model():
    torch.manual_seed(0)
    model = STAR(STARConfig.from_data(DATA, embedding_dim=8, attention_dim=4, hidden=(12, 6), aux_dim=3,
                                      aux_hidden=5)).eval()
    program = serving.export_saml(model, DATA.batch(np.arange(1)), table_dtype="uint8")
    fn = serving.served_module(program)
    qmodel = quantize_tables(model)
    for B in (1, 5):
        batch = DATA.batch(np.arange(10, 10 + B))
        with torch.no_grad():
            torch.testing.assert_close(fn(*batch.inputs()), qmodel(*batch.inputs()), atol=1e-6, rtol=1e-6)


def test_the_8bit_program_raises_the_float_models_errors(trained):
    from test_serving import _bad_inputs, _error

    model, program = trained
    served = serving.served_module(program)
    for name, inputs in _bad_inputs(DATA.batch(np.arange(8))).items():
        eager = _error(model, inputs)
        assert eager[0] is not None and _error(served, inputs) == eager, name


def test_quantize_tables_leaves_the_model_and_counts_bytes():
    model = _trained(steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_tables(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(q.embedding, QuantizedScenarioEmbedding) and isinstance(model.embedding, ScenarioEmbedding)
    nb = table_bytes(model)["float"], table_bytes(q)["uint8"]
    D = model.config.embedding_dim
    assert nb[1] * 4 * D == nb[0] * (D + 8)
    assert not any(isinstance(m, ScenarioEmbedding) for m in q.modules())


def test_bad_exports_raise_and_write_nothing(tmp_path):
    path = tmp_path / "never.pt2"
    model = _trained(steps=0)
    batch = DATA.batch(np.arange(8))
    with pytest.raises(ValueError, match=r"table_dtype must be one of \(None, 'uint8'\), got 'int4'"):
        serving.export_saml(model, batch, path, table_dtype="int4")
    with pytest.raises(TypeError, match=r"SAML.embedding: global_weight is torch.float64; .*float32 / float16"):
        serving.export_saml(copy.deepcopy(model).double(), batch, path, table_dtype="uint8")
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.sequence_embedding.scenario_weight[1, 3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"SAML.sequence_embedding scenario_weight: row \d+ of the table holds a "
                                         r"non-finite value"):
        serving.export_saml(broken, batch, path, table_dtype="uint8")
    from saml_kernels.reference import SAMLReference

    ref = SAMLReference(model.config)
    with pytest.raises(ValueError, match="SAMLReference has no saml_kernels.nn.ScenarioEmbedding layer"):
        serving.export_saml(ref, batch, path, table_dtype="uint8")
    with pytest.raises(ValueError, match="has no saml_kernels.nn.ScenarioEmbedding layer"):
        quantize_tables(torch.nn.Linear(3, 4))
    assert not path.exists() and not list(tmp_path.iterdir())


def test_cuda_backend_is_an_alias_of_the_triton_kernel():
    """No CUDA C++ 8-bit kernel: the op's "cuda" backend is registered as an alias of its Triton table (no hand-made
    loader), so backend="cuda" models export to 8-bit and run the Triton kernel."""
    pytest.importorskip("triton")
    from saml_kernels import _backend
    from saml_kernels.ops import scenario_embedding_bag_8bit as op8

    assert _backend.served_by(op8.OP, "cuda") == "triton"
    assert _backend.kernels(op8.OP, "cuda").forward is _backend.kernels(op8.OP, "triton").forward
