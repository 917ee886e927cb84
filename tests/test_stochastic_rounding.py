"""Stochastic rounding of 16-bit tables in the fused embedding update (docs/design.md, "Stochastic rounding";
saml_kernels/ops/stochastic_rounding.py is the Python reference of the hash).

A float32 update v is stored as one of its two 16-bit neighbours lo < v < hi, hi with probability
p = (v - lo) / (hi - lo): E[stored] = v, and the error e = stored - v has variance p (1 - p) (hi - lo)^2 =
(v - lo)(hi - v). For N independent elements the mean error has standard deviation
sigma = sqrt(sum_i (v_i - lo_i)(hi_i - v_i)) / N, and the tests require |mean error| <= 6 sigma (a 6-sigma event
has probability ~2e-9 under the CLT; the hash is fixed, so the test is deterministic). Round-to-nearest misses
that bound by far on the same data (checked below), so the bound has teeth.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from saml_kernels import _ext
from saml_kernels.nn import ScenarioEmbedding
from saml_kernels.ops import embedding_optimizer as eo
from saml_kernels.ops import scenario_embedding_bag as seb
from saml_kernels.ops import stochastic_rounding as sr

from conftest import device_backends

OP = seb.OP
DTYPES = [torch.bfloat16, torch.float16]
needs_cpu_ext = pytest.mark.skipif(not _ext.has_cpu_ext(), reason="C++ extension not built")
CPU_BACKENDS = [p for p in device_backends(OP) if p.values[0] == "cpu"]


def _assert_same_bits(got, want, v):
    """got / want: int16 views of the stored tables; v: the float32 update. Fails naming the first element that
    differs, its update and both bit patterns."""
    bad = (got != want).nonzero()
    if bad.numel():
        at = tuple(bad[0])
        pytest.fail(f"{bad.shape[0]} elements differ, first at (row, column) {bad[0].tolist()}: update "
                    f"{v[at].item()!r}, kernel bits {got[at].item() & 0xFFFF:#06x}, reference "
                    f"{want[at].item() & 0xFFFF:#06x}")


def one_hot_case(R: int, D: int, M: int = 2, dtype=torch.bfloat16, seed: int = 0):
    """Every global row touched exactly once (one id per bag, ids a permutation), so the float32 update of row r
    is w[r] - lr * g[r] with g the upstream gradient row: computable here bit for bit. One feature, aware (its
    scenario rows are updated too)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(R, generator=gen)
    return dict(indices=perm, offsets=torch.arange(R + 1), scenario=torch.randint(0, M, (R,), generator=gen),
                fr=[0, R], fsr=[0, R],
                gw=(torch.rand(R, D, generator=gen) + 0.5).to(dtype),
                sw=(torch.rand(M, R, D, generator=gen) + 0.5).to(dtype),
                gg=torch.rand(R, 1, D, generator=gen).to(dtype),  # one sign: round-to-nearest is biased
                gs=(torch.rand(R, 1, D, generator=gen) * 2 - 1).to(dtype))


def run_update(c, backend, lr, *, optimizer="sgd", wd=0.0, stochastic=True, seed=7, step=3, gst=None, sst=None):
    gw, sw = c["gw"].clone(), c["sw"].clone()
    fr, fsr, slot, _ = seb.table_layout(c["fr"], c["fsr"], gw.shape[0], sw.shape[1], gw.device)
    eo.backward_update(backend, c["gg"], c["gs"], c["indices"], c["offsets"], c["scenario"], gw, sw, fr, fsr, slot,
                       None, seb.POOLING["sum"], 0, gst, sst, optimizer,
                       eo.make_hparams(lr, 1e-6, weight_decay=wd, stochastic_rounding=stochastic, seed=seed,
                                       step=step))
    return gw, sw


def float32_update(c, lr):
    """The float32 SGD update of every global row (row r's gradient is gg[b] of the bag holding id r)."""
    g = torch.empty_like(c["gg"][:, 0]).float()
    g[c["indices"]] = c["gg"][:, 0].float()
    return c["gw"].float() - torch.tensor(lr, dtype=torch.float32) * g


def neighbours(v: torch.Tensor, dtype):
    """(lo, hi): the 16-bit neighbours of float32 v toward and away from zero (v's own value twice when exact)."""
    r = v.to(dtype)
    rf = r.float()
    bits = r.view(torch.int16).to(torch.int32)
    back = rf.abs() > v.abs()
    lo_bits = torch.where(back, bits - 1, bits)
    lo = lo_bits.to(torch.int16).view(dtype).float()
    hi = torch.where(lo == v, lo, (lo_bits + 1).to(torch.int16).view(dtype).float())
    return lo, hi


def mean_error_bound(v, lo, hi, k: float = 6.0) -> float:
    """k standard deviations of the mean of the stochastic rounding errors of v (module docstring)."""
    var = ((v.double() - lo.double()) * (hi.double() - v.double())).clamp_min(0)
    return k * var.sum().sqrt().item() / v.numel()


# ------------------------------------------------------------------------------------------------ the user's case

def _f32_steps(n: int) -> float:
    f32 = torch.tensor(1.0, dtype=torch.float32)
    for _ in range(n):
        f32 = f32 - torch.tensor(1e-3, dtype=torch.float32)
    return float(f32)


def _bound(dtype, steps: int, elements: int) -> float:
    """6 sigma of the mean of `elements` independent walks of `steps` roundings on [0.5, 1) (each adds a variance
    of at most ulp^2 / 4; ulp = 2^-8 for bfloat16, 2^-11 for float16)."""
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    return 6 * (steps * ulp ** 2 / 4) ** 0.5 / elements ** 0.5


@needs_cpu_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_user_example_small_steps_are_not_lost(dtype):
    """As the user tried it (the layer, default backend): a 16-bit table at 1.0, 100 fused SGD steps of -1e-3.
    Round-to-nearest leaves bfloat16 at exactly 1.0; stochastic rounding (the default) ends near the float32
    result 0.9 (mean over 4 x 64 elements, within _bound)."""
    results = {}
    for stochastic in (True, False):
        layer = ScenarioEmbedding([("f", 4, True)], 2, 64, optimizer="sgd", lr=1e-3, dtype=dtype,
                                  stochastic_rounding=stochastic, rounding_seed=11)
        with torch.no_grad():
            layer.global_weight.fill_(1.0)
            layer.scenario_weight.fill_(1.0)
        ids, off, sc = torch.arange(4), torch.arange(5), torch.tensor([0, 1, 0, 1])
        for _ in range(100):
            g, s = layer(ids, off, sc)
            g.float().sum().backward()  # gradient exactly 1 per element: each step is -1e-3 in float32
        results[stochastic] = layer.global_weight.detach().float()
        assert layer.rounding_step == 100
    f32, bound = _f32_steps(100), _bound(dtype, 100, 4 * 64)
    got = results[True].mean().item()
    assert abs(got - f32) <= bound, f"{dtype}: mean {got} vs float32 {f32} (bound {bound})"
    if dtype == torch.bfloat16:
        assert torch.equal(results[False], torch.ones_like(results[False])), "round-to-nearest should stall"
    assert abs(results[False].mean().item() - f32) > bound  # round-to-nearest is off by more than the bound


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_steps_every_backend(device, backend, dtype):
    """The user's example through the fused op on each backend (30 steps, 16 x 32 elements)."""
    c = one_hot_case(16, 32, dtype=dtype)
    c["gw"].fill_(1.0)
    c["gg"].fill_(1.0)
    gw, sw = c["gw"], c["sw"]
    fr, fsr, slot, _ = seb.table_layout(c["fr"], c["fsr"], gw.shape[0], sw.shape[1], gw.device)
    for step in range(30):
        eo.backward_update(backend, c["gg"], c["gs"], c["indices"], c["offsets"], c["scenario"], gw, sw, fr, fsr,
                           slot, None, seb.POOLING["sum"], 0, None, None, "sgd",
                           eo.make_hparams(1e-3, 1e-8, seed=2, step=step))
    assert abs(gw.float().mean().item() - _f32_steps(30)) <= _bound(dtype, 30, gw.numel())


# ------------------------------------------------------------------------------------------------ unbiasedness

@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unbiased_and_neighbours(device, backend, dtype):
    """Many rows with steps of a fraction of an ulp: every stored value is a neighbour of the float32 update, and
    the mean error is within 6 sigma (module docstring); round-to-nearest on the same data is not."""
    c = one_hot_case(2048, 32, dtype=dtype)
    lr = 2.0 ** -10  # steps of |g| * 2^-10 < 2^-10: below the bf16 ulp at [0.5, 2) (2^-8 / 2^-7)
    v = float32_update(c, lr)
    lo, hi = neighbours(v, dtype)
    got = run_update(c, backend, lr)[0].float()
    assert bool(((got == lo) | (got == hi)).all()), "a stored value is not a neighbour of the float32 update"
    bound = mean_error_bound(v, lo, hi)
    err = (got.double() - v.double()).mean().item()
    assert abs(err) <= bound, f"mean error {err} exceeds 6 sigma = {bound}"
    rtn = run_update(c, backend, lr, stochastic=False)[0].float()
    assert torch.equal(rtn, v.to(dtype).float())
    # the bound has teeth: round-to-nearest's mean error on the same data is far outside it (a bfloat16 step below
    # half an ulp is dropped entirely)
    rtn_err = (rtn.double() - v.double()).mean().item()
    if dtype == torch.bfloat16:
        assert abs(rtn_err) > 10 * bound, (rtn_err, bound)


def test_python_reference_unbiased_edge_values():
    """The reference rounding on values across the whole range: tiny (float16 subnormal and below), signs, zero,
    powers of two, the largest finite values; E[stored] = x within 6 sigma over 4096 hash draws per value."""
    xs = torch.tensor([0.0, -0.0, 1e-9, -3e-8, 7e-6, 1.0 + 2 ** -20, -(1.0 + 3 * 2 ** -12), 3.14159, 1000.3,
                       -65000.7, 2.0 ** -14 * 1.3, 2.0 ** -126 * 1.5, 1e30], dtype=torch.float32)
    n = 4096
    for dtype in DTYPES:
        x = xs.unsqueeze(0).expand(n, -1).contiguous()
        got = sr.round_rows(x, dtype, 5, 9, 0, torch.arange(n)).float()
        finite = got.isfinite().all(0)
        if dtype == torch.float16:
            assert not bool(finite[-1])  # 1e30 overflows as round-to-nearest would
        lo, hi = neighbours(x, dtype)
        ok = (got == lo) | (got == hi)
        assert bool(ok[:, finite].all())
        for j in range(xs.numel()):
            if not finite[j]:
                continue
            bound = mean_error_bound(x[:, j], lo[:, j], hi[:, j])
            err = (got[:, j].double() - x[:, j].double()).mean().item()
            assert abs(err) <= bound + 1e-3 * (hi[0, j] - lo[0, j]).item() * 2.0 ** -10, (dtype, xs[j].item(), err)
        assert torch.equal(sr.round_rows(torch.tensor([[float("nan")]]), dtype, 1, 1, 0, torch.tensor([0])).isnan(),
                           torch.tensor([[True]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_python_reference_columns_independent(dtype):
    """The two columns of a pair share one mix (its low and high 16 bits): their rounding decisions, and those of
    neighbouring pairs and of the same column in consecutive rows, are uncorrelated. Values halfway between
    neighbours (p = 1/2, decision = up), 8192 rows: every Pearson correlation within 6 / sqrt(8192) = 0.066."""
    n, D = 8192, 32
    one = 1.0 + 2.0 ** -7 if dtype == torch.bfloat16 else 1.0 + 2.0 ** -10  # 1 + ulp: halfway is 1 + ulp / 2
    x = torch.full((n, D), (1.0 + one) / 2)
    up = (sr.round_rows(x, dtype, 17, 4, 0, torch.arange(n)).float() == one).double()
    assert abs(up.mean().item() - 0.5) < 6 * 0.5 / (n * D) ** 0.5
    z = (up - up.mean(0)) / up.std(0)
    bound = 6 / n ** 0.5
    for a, b in [(0, 1), (6, 7), (1, 2), (0, 2), (0, 16), (31, 30)]:
        corr = (z[:, a] * z[:, b]).mean().item()
        assert abs(corr) < bound, (a, b, corr)
    rows = (z[1:] * z[:-1]).mean(0)  # each column against itself one row on
    assert rows.abs().max().item() < bound, rows


# ------------------------------------------------------------------------------------------------ bitwise agreement

@needs_cpu_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 21])
def test_cpu_kernel_matches_python_hash_bitwise(dtype, D):
    """The C++ kernel's stored bits are the Python reference's round_rows of the same float32 update, global and
    scenario rows (table words 0 / 1), through the AVX2 lanes and the scalar tail (D = 21)."""
    c = one_hot_case(300, D, dtype=dtype, seed=1)
    lr = 0.01
    gw, sw = run_update(c, "cpu", lr, seed=123456789, step=41)
    v = float32_update(c, lr)
    want = sr.round_rows(v, dtype, 123456789, 41, sr.GLOBAL_TABLE, torch.arange(v.shape[0]))
    assert torch.equal(gw.view(torch.int16), want.view(torch.int16))
    # scenario rows: row m * Rs + r, gradient gs of the sample holding id r (its scenario m)
    R = c["gw"].shape[0]
    gsr = torch.empty(R, D, dtype=torch.float32)
    gsr[c["indices"]] = c["gs"][:, 0].float()
    m = torch.empty(R, dtype=torch.long)
    m[c["indices"]] = c["scenario"]
    flat_rows = m * R + torch.arange(R)
    vs = c["sw"].reshape(-1, D)[flat_rows].float() - torch.tensor(lr, dtype=torch.float32) * gsr
    want_s = sr.round_rows(vs, dtype, 123456789, 41, sr.SCENARIO_TABLE, flat_rows)
    assert torch.equal(sw.reshape(-1, D)[flat_rows].view(torch.int16), want_s.view(torch.int16))


@needs_cpu_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernel_matches_python_hash_bitwise_whole_range(dtype):
    """As above, with updates across the whole float16 range (the CPU kernel rounds 8-lane groups of float16
    normals on the integer bits and other groups by the float32 comparison): float16 normals, subnormals and
    below, exact zeros, values at and beyond the largest finite float16, mixed within 8-lane groups (D = 40)."""
    R, D = 512, 40
    c = one_hot_case(R, D, dtype=dtype, seed=3)
    gen = torch.Generator().manual_seed(11)
    mag = torch.pow(2.0, torch.empty(R, D).uniform_(-27, 15.9, generator=gen))
    sign = torch.where(torch.rand(R, D, generator=gen) < 0.5, -1.0, 1.0)
    w = sign * mag
    region = torch.randint(0, 4, (R, 1), generator=gen).expand(R, D)  # per row: mixed, tiny, zero-ish, huge
    w = torch.where(region == 1, w * 2.0 ** -20, w)
    w = torch.where((region == 2) & (torch.rand(R, D, generator=gen) < 0.5), torch.zeros(()), w)
    w = torch.where(region == 3, sign * 65504.0, w)
    c["gw"] = w.to(dtype)
    g = torch.randn(R, 1, D, generator=gen) * torch.where(region == 3, 2000.0, 1.0)[:, None] \
        * torch.where(region == 1, 2.0 ** -20, 1.0)[:, None]
    g = torch.where(torch.rand(R, 1, D, generator=gen) < 0.1, torch.zeros(()), g).to(dtype)
    c["gg"] = torch.where(g == 0, torch.zeros((), dtype=dtype), g)  # +0: the kernel sums gradients from +0
    lr = 0.0123
    gw, _ = run_update(c, "cpu", lr, seed=99, step=5)
    v = float32_update(c, lr)
    if dtype == torch.float16:  # the data reach every region of the float16 rounding
        a = v.abs()
        assert int((a == 0).sum()) > 0 and int(((a > 0) & (a < 2.0 ** -14)).sum()) > 100
        assert int((a >= 65520).sum()) > 0 and int(((a >= 2.0 ** -14) & (a < 65504)).sum()) > 1000
    want = sr.round_rows(v, dtype, 99, 5, sr.GLOBAL_TABLE, torch.arange(R))
    assert torch.equal(gw.view(torch.int16), want.view(torch.int16))


def _special_rows(R: int, D: int, dtype, gen):
    """[R, D] float32 table values exactly representable in ``dtype`` and gradients whose SGD update reaches every
    kind of value, mixed within 8-lane groups: normals of both signs across many binades, values that are
    subnormal in ``dtype`` (float32 subnormals for bfloat16, float16 subnormals for float16), +-0, +-inf, NaN
    (a NaN weight, and inf - inf), and values at the largest finite ``dtype`` value (the update may overflow)."""
    big = 3.3895313892515355e38 if dtype == torch.bfloat16 else 65504.0
    tiny = 2.0 ** -133 if dtype == torch.bfloat16 else 2.0 ** -20
    kind = torch.randint(0, 8, (R, D), generator=gen)
    sign = torch.where(torch.rand(R, D, generator=gen) < 0.5, -1.0, 1.0)
    mag = torch.pow(2.0, torch.empty(R, D).uniform_(-24, 14, generator=gen))
    w = torch.where(kind <= 2, sign * mag, torch.zeros(()))                       # 0-2: normals
    w = torch.where(kind == 3, sign * tiny * torch.rand(R, D, generator=gen), w)  # 3: subnormal
    w = torch.where(kind == 4, sign * float("inf"), w)                            # 4: inf (5: inf - inf = NaN)
    w = torch.where(kind == 5, float("inf"), w)
    w = torch.where(kind == 6, float("nan"), w)                                   # 6: NaN
    w = torch.where(kind == 7, sign * big, w)                                     # 7: the largest finite
    w = w.to(dtype).float()  # what the table holds (-0 where a zero kept its sign)
    g = torch.randn(R, D, generator=gen) * torch.where(w.isfinite() & (w != 0), w.abs(), torch.ones(()))
    g = torch.where(kind == 3, torch.randn(R, D, generator=gen) * tiny * 50, g)
    g = torch.where(kind == 5, float("inf"), g)
    g = torch.where(kind == 7, -sign * big * 2.0 ** -9, g)  # pushes past the largest finite value
    zero = (kind <= 2) & (torch.rand(R, D, generator=gen) < 0.15)  # +-0 - 0: a zero update
    return torch.where(zero, sign * 0.0, w), torch.where(zero, torch.zeros(()), g)


@needs_cpu_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [37, 16])
def test_cpu_row_store_special_values_bitwise(dtype, D):
    """The CPU kernel's 8-lane stochastic stores (bfloat16 and float16, AVX2 where the CPU has it) and their scalar
    tail (D = 37) store the Python reference's bits for every kind of value: normals, subnormals, +-0, +-inf,
    NaN, overflow past the largest finite value, both signs, mixed within 8-lane groups."""
    R = 256
    c = one_hot_case(R, D, dtype=dtype, seed=5)
    gen = torch.Generator().manual_seed(21)
    w, g = _special_rows(R, D, dtype, gen)
    c["gw"] = w.to(dtype)
    g = g.to(dtype)
    c["gg"] = torch.where(g == 0, torch.zeros((), dtype=dtype), g)[:, None]  # +0: the kernel sums from +0
    lr = 0.25
    gw, _ = run_update(c, "cpu", lr, seed=2024, step=77)
    v = float32_update(c, lr)
    # the data reach every kind of value, in the float32 update and in what is stored
    assert bool(v.isnan().any()) and bool(v.isposinf().any()) and bool(v.isneginf().any())
    assert bool((v == 0).any()) and int((v.abs() < torch.finfo(dtype).tiny).sum()) > 50
    assert int((v.abs() > torch.finfo(dtype).max).sum()) > 10
    want = sr.round_rows(v, dtype, 2024, 77, sr.GLOBAL_TABLE, torch.arange(R))
    got, want = gw.view(torch.int16), want.view(torch.int16)
    _assert_same_bits(got, want, v)


@needs_cpu_ext
@pytest.mark.parametrize("D", [136, 64])
def test_cpu_float16_store_chunks_bitwise(D):
    """The CPU float16 store rounds every 8-lane group on the integer bits first and checks the stored bits once
    per 64 columns (csrc/cpu/sixteen_bit_rows.h, half_step_row_sr): rows longer than a chunk (D = 136: two
    chunks and a group) where one chunk holds a value that needs the float32 comparison (a float16 subnormal,
    inf, NaN, overflow) or only a value whose stored bits look special although the integer rounding was right
    (0, 2^-14, just below 65504), the rest of the row float16 normals: all bitwise the Python reference."""
    R, dtype = 320, torch.float16
    c = one_hot_case(R, D, dtype=dtype, seed=8)
    gen = torch.Generator().manual_seed(31)
    sign = torch.where(torch.rand(R, D, generator=gen) < 0.5, -1.0, 1.0)
    w = (sign * torch.pow(2.0, torch.empty(R, D).uniform_(-12, 14, generator=gen))).to(dtype).float()
    g = torch.randn(R, D, generator=gen) * w.abs() * 2.0 ** -6
    col = torch.randint(0, D, (R,), generator=gen)
    kind = torch.arange(R) % 10  # one special element per row (kind 9: none), in a random chunk
    # 0, 2^-14, 65500 (stored 65472 or 65504), a float16 subnormal, inf, NaN, overflow, 5 2^-30, -2^-14
    ww = [0.0, 2.0 ** -14, 65472.0, 2.0 ** -20, float("inf"), float("nan"), 65504.0, 0.0, -2.0 ** -14, 1.0]
    gg = [0.0, 0.0, -28.0 * 64, 3 * 2.0 ** -24, 0.0, 0.0, -2000.0, -5 * 2.0 ** -24, 0.0, 2.0 ** -8]
    for k in range(9):
        rows = (kind == k).nonzero()[:, 0]
        w[rows, col[rows]] = ww[k]
        g[rows, col[rows]] = gg[k]
    c["gw"] = w.to(dtype)
    g = g[c["indices"]].to(dtype)  # bag b holds id indices[b]: row g[r] goes to the bag holding r
    c["gg"] = torch.where(g == 0, torch.zeros((), dtype=dtype), g)[:, None]  # +0: the kernel sums from +0
    lr = 1.0 / 64
    gw, _ = run_update(c, "cpu", lr, seed=5, step=9)
    v = float32_update(c, lr)
    a = v.abs()
    assert int((a == 0).sum()) > 0 and int((a == 2.0 ** -14).sum()) > 0 and int(((a > 0) & (a < 2.0 ** -14)).sum())
    assert int(((a >= 65472) & (a < 65504)).sum()) > 0 and int((a >= 65520).sum()) > 0 and bool(v.isnan().any())
    want = sr.round_rows(v, dtype, 5, 9, sr.GLOBAL_TABLE, torch.arange(R)).view(torch.int16)
    got = gw.view(torch.int16)
    _assert_same_bits(got, want, v)


@pytest.fixture(scope="module")
def cuda_emu():
    """The CUDA kernels compiled from their real source for the CPU (tests/cuda_emu; built once per session)."""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "cuda_emu"))
    try:
        import build
    except ImportError:
        pytest.skip("no CUDA emulation (tests/cuda_emu)")
    return build.load()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [136, 7])
def test_cuda_store_matches_python_hash_bitwise(cuda_emu, dtype, D):
    """The CUDA fused update's stochastic store (csrc/cuda/scenario_embedding_bag.cuh, store_vec_update: 8 columns a
    thread where D % 8 == 0, whole column pairs sharing one mix; D = 7: a column a thread), run in the CPU
    emulation, stores the Python reference's bits: the same hash on every backend."""
    c = one_hot_case(96, D, dtype=dtype, seed=6)
    lr = 0.01
    gw, sw = c["gw"].clone(), c["sw"].clone()
    fr, fsr, slot, _ = seb.table_layout(c["fr"], c["fsr"], gw.shape[0], sw.shape[1], gw.device)
    cuda_emu.seb_backward_update_(c["gg"], c["gs"], c["indices"], c["offsets"], c["scenario"], gw, sw, fr, fsr, slot,
                                  None, seb.POOLING["sum"], 0, None, None, eo.SGD,
                                  eo.make_hparams(lr, 1e-6, seed=31337, step=12), True, True)
    v = float32_update(c, lr)
    want = sr.round_rows(v, dtype, 31337, 12, sr.GLOBAL_TABLE, torch.arange(v.shape[0]))
    assert torch.equal(gw.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("device,backend", [p for p in CPU_BACKENDS if p.values[1] != "cpu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer,wd", [("sgd", 0.0), ("sgd", 0.05)])
def test_backends_agree_bitwise(device, backend, dtype, optimizer, wd):
    """reference (and triton, under TRITON_INTERPRET=1) store the bits the C++ kernel stores where their float32
    update is the same: rows touched once (the eager path of those backends reduces a row's gradient into the
    table dtype first, the C++ kernel keeps it in float32, so with repeated ids the float32 values themselves
    may differ; then only the hash agrees, test_cpu_kernel_matches_python_hash_bitwise). SGD with and without
    weight decay: row-wise Adagrad's mean of squares is summed in another order by torch's mean than by the C++
    loop, so its float32 step may differ in the last bit and the stored bits with it (not bitwise before this
    change either)."""
    if not _ext.has_cpu_ext():
        pytest.skip("C++ extension not built")
    c = one_hot_case(64, 16, M=3, dtype=dtype, seed=8)
    R, M = 64, 3
    out = {}
    for b in ("cpu", backend):
        st = (torch.rand(R, generator=torch.Generator().manual_seed(4)),
              torch.rand(M * R, generator=torch.Generator().manual_seed(5))) if optimizer != "sgd" else (None, None)
        gw, sw = run_update(c, b, 0.03, optimizer=optimizer, wd=wd, gst=st[0], sst=st[1])
        out[b] = (gw, sw) + tuple(s for s in st if s is not None)
    for x, y in zip(out["cpu"], out[backend]):
        assert torch.equal(x.view(torch.int16) if x.dtype in DTYPES else x,
                           y.view(torch.int16) if y.dtype in DTYPES else y)


# ------------------------------------------------------------------------------------------------ switches

@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
def test_float32_tables_ignore_the_option(device, backend):
    c = one_hot_case(200, 8, dtype=torch.float32)
    a = run_update(c, backend, 0.1, stochastic=True)
    b = run_update(c, backend, 0.1, stochastic=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0], float32_update(c, 0.1))


@pytest.mark.parametrize("device,backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_in_seed_and_step(device, backend, dtype):
    c = one_hot_case(256, 16, dtype=dtype)
    a = run_update(c, backend, 2.0 ** -9, seed=1, step=5)[0]
    assert torch.equal(a, run_update(c, backend, 2.0 ** -9, seed=1, step=5)[0])
    assert not torch.equal(a, run_update(c, backend, 2.0 ** -9, seed=1, step=6)[0])
    assert not torch.equal(a, run_update(c, backend, 2.0 ** -9, seed=2, step=5)[0])


def _train(layer, steps, gen):
    for _ in range(steps):
        ids = torch.randint(0, 6, (12,), generator=gen)
        g, s = layer(ids, torch.arange(0, 13, 2), torch.randint(0, 2, (6,), generator=gen))
        (g.float().square().sum() + s.float().sum()).backward()
        layer.fused_optimizer.step()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_resume_bitwise(dtype, optimizer):
    """state_dict of the layer + of its fused optimizer (which holds rounding_step) resume bitwise; pickle and
    deepcopy carry the seed and step too."""
    def make(seed):
        return ScenarioEmbedding([("f", 6, True)], 2, 8, optimizer=optimizer, lr=0.01, dtype=dtype,
                                 rounding_seed=seed)
    torch.manual_seed(0)
    full = make(99)
    _train(full, 3, torch.Generator().manual_seed(1))
    sd, osd = copy.deepcopy(full.state_dict()), copy.deepcopy(full.fused_optimizer.state_dict())
    assert osd["rounding_step"] == 3 and osd["param_groups"][0]["rounding_seed"] == 99
    clone = pickle.loads(pickle.dumps(full))
    twin = copy.deepcopy(full)
    gen = torch.Generator().manual_seed(2)
    _train(full, 4, gen)
    resumed = make(5)  # another seed: the optimizer state_dict brings 99 back
    resumed.load_state_dict(sd)
    resumed.fused_optimizer.load_state_dict(osd)
    assert resumed.rounding_seed == 99 and resumed.rounding_step == 3
    for other in (resumed, clone, twin):
        _train(other, 4, torch.Generator().manual_seed(2))
        assert torch.equal(other.global_weight, full.global_weight)
        assert torch.equal(other.scenario_weight, full.scenario_weight)
    # without the optimizer's state the step restarts at 0: another (still unbiased) rounding
    fresh = make(99)
    fresh.load_state_dict(sd)
    _train(fresh, 4, torch.Generator().manual_seed(2))
    assert not torch.equal(fresh.global_weight, full.global_weight)


def _small_saml(**kw):
    import numpy as np
    from saml_kernels.data import make_synthetic
    from saml_kernels.nn import SAML, SAMLConfig

    d = make_synthetic(200, num_users=30, num_items=40, num_categories=6, num_contexts=5, num_segments=6,
                       num_tags=9, seq_len=5, seed=3)
    cfg = SAMLConfig.from_data(d, aux_hidden=(8,), branch_hidden=(8,), embedding_dim=4, attention_dim=4)
    rng = np.random.default_rng(4)
    batches = [d.batch(np.sort(rng.choice(len(d), 48, replace=False))) for _ in range(4)]
    return (lambda: SAML(cfg, embedding_dtype=torch.bfloat16, **kw)), batches, cfg


def test_training_optimizer_resume_is_bitwise():
    """A bfloat16 SAML (stochastic rounding on by default) resumed from model + TrainingOptimizer state_dicts
    trains bitwise as the uninterrupted run (the optimizer's dict carries each fused module's rounding_step)."""
    from saml_kernels.training import TrainingOptimizer

    make, batches, _ = _small_saml()

    def train(model, opt, bs):
        for b in bs:
            opt.zero_grad()
            model.loss(b).backward()
            opt.step()

    torch.manual_seed(0)
    straight = make()
    init = copy.deepcopy(straight.state_dict())
    opt = TrainingOptimizer(straight)
    train(straight, opt, batches)
    assert straight.embedding.stochastic_rounding and straight.embedding.rounding_step == 4
    first = make()
    first.load_state_dict(init)
    opt1 = TrainingOptimizer(first)
    train(first, opt1, batches[:2])
    ckpt = copy.deepcopy({"model": first.state_dict(), "opt": opt1.state_dict()})
    assert ckpt["opt"]["fused"]["embedding"]["rounding_step"] == 2
    resumed = make()
    resumed.load_state_dict(ckpt["model"])
    opt2 = TrainingOptimizer(resumed)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, batches[2:])
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_model_option():
    from saml_kernels.nn import SAML
    from saml_kernels.reference import SAMLReference

    make, _, cfg = _small_saml()
    assert all(e.stochastic_rounding for e in make().modules() if isinstance(e, ScenarioEmbedding))
    off = SAML(cfg, embedding_stochastic_rounding=False)
    embs = [e for e in off.modules() if isinstance(e, ScenarioEmbedding)]
    assert embs and all(not e.stochastic_rounding for e in embs)
    with pytest.raises(ValueError, match="embedding_stochastic_rounding"):
        SAML(cfg, embedding_stochastic_rounding="no")
    from saml_kernels.reference.layer_set import REFERENCE_LAYERS
    with pytest.raises(ValueError, match="embedding_stochastic_rounding"):
        SAML(cfg, layers=REFERENCE_LAYERS, embedding_stochastic_rounding=False)
    SAMLReference(cfg)  # the default is accepted by the reference twin


# ------------------------------------------------------------------------------------------------ bad options

def test_bad_options_raise():
    feats = [("f", 4, True)]
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="stochastic_rounding"):
            ScenarioEmbedding(feats, 2, 4, optimizer="sgd", stochastic_rounding=bad)
    for bad in (-1, 2 ** 32, 1.5, True, "3"):
        with pytest.raises(ValueError, match="seed"):
            ScenarioEmbedding(feats, 2, 4, optimizer="sgd", rounding_seed=bad)
    layer = ScenarioEmbedding(feats, 2, 4, optimizer="sgd", dtype=torch.bfloat16, rounding_seed=3)
    before = layer._fused_hparams.clone()
    with pytest.raises(ValueError, match="stochastic_rounding"):
        layer.fused_optimizer.param_groups[0]["stochastic_rounding"] = "off"
    with pytest.raises(ValueError, match="seed"):
        layer.fused_optimizer.param_groups[0]["rounding_seed"] = -3
    sd = layer.fused_optimizer.state_dict()
    with pytest.raises(ValueError, match="step"):
        layer.fused_optimizer.load_state_dict({**sd, "rounding_step": -1})
    assert torch.equal(layer._fused_hparams, before), "a rejected value was written"
    layer.fused_optimizer.param_groups[0]["stochastic_rounding"] = False  # a good value is pushed
    assert layer._fused_hparams[4].item() == 0.0 and not layer.stochastic_rounding
    with pytest.raises(ValueError, match="stochastic_rounding"):
        eo.make_hparams(0.1, 1e-8, stochastic_rounding=0)
