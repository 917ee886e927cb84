"""Triton block sizes: no timing race under deterministic algorithms, and one autotune cache per GEMM direction.

Autotuning picks a kernel's block sizes by timing every config once per key; block sizes change the order of the
float reductions (BLOCK_K splits K), so two processes that time differently can differ in the last bits. Under
``torch.use_deterministic_algorithms(True)`` every autotuned launcher must use a config that is a function of the
shapes alone (``saml_kernels.triton.launch_config``), never time anything. And the dx GEMM (W read transposed) must
not reuse a forward's autotuned config that happens to share its key (N, K, K2, dtypes).

How, without a GPU: the kernels run under ``TRITON_INTERPRET=1`` (marker ``triton_interp``), and the launchers are
told they are not interpreting (``_backend.triton_interpret`` -> False, so they take the GPU branch: fixed config or
autotuner); the autotuner's timing (``Autotuner._bench``) is replaced, by one that raises (nothing may be timed) or
by a fake timing that records which autotuner timed what. The outputs are compared with float64 formulas.
"""
from __future__ import annotations

import pytest
import torch

from saml_kernels import _backend

triton = pytest.importorskip("triton")

from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

from saml_kernels.triton import mbranch_linear as mbl  # noqa: E402
from saml_kernels.triton import mutual_unit as mu  # noqa: E402

INTERP = pytest.mark.skipif(not _backend.triton_interpret(), reason="runs Triton kernels on the CPU: TRITON_INTERPRET=1")
TUNERS = (mbl._grouped_mm_tuned, mbl._grouped_dx_tuned, mbl._all_mm_tuned, mbl._wgrad_tuned, mu._fused_tuned,
          mu._fused_bwd_tuned)


def test_fixed_configs_are_functions_of_the_shapes():
    """The deterministic-mode choices are configs the autotuner (and the AOT compile test) knows, and depend on
    nothing but their arguments."""
    shapes = [1, 7, 16, 63, 64, 65, 127, 128, 129, 512, 4096]
    for n in shapes:
        for k in shapes:
            c = mbl.fixed_mm_config(n, k)
            assert c in mbl._MM_CONFIGS and c == mbl.fixed_mm_config(n, k)
            w = mbl.fixed_wg_config(k, n)
            assert w in mbl._WG_CONFIGS and w == mbl.fixed_wg_config(k, n)
    assert mu.FIXED_FUSED_CONFIG in mu._FUSED_CONFIGS


@pytest.fixture
def gpu_branch(monkeypatch):
    """Launchers take their GPU branch (fixed config or autotuner) while the kernels still run interpreted; every
    autotuner starts with an empty cache; returns the list of launches (kernel name, {constexpr: value})."""
    monkeypatch.setattr(_backend, "triton_interpret", lambda: False)
    for t in TUNERS:
        monkeypatch.setattr(t, "cache", {})
    seen = []
    real = KernelInterface.__getitem__

    def getitem(self, grid):
        launch = real(self, grid)

        def record(*args, **kwargs):
            seen.append((getattr(getattr(self, "fn", None), "__name__", "?"),
                         {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k.startswith("num_")}))
            return launch(*args, **kwargs)
        return record

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    return seen


@pytest.fixture
def deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


def _no_timing(self, *args, config, **meta):
    raise AssertionError(f"autotuning timed config {config} under deterministic algorithms")


def _own_case(B=40, M=3, K=24, N=80, Ka=5):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(B, K), r(M, K, N), r(M, N), r(B, Ka), r(M, Ka, N), torch.randint(0, M, (B,), generator=g)


@INTERP
@pytest.mark.triton_interp
def test_deterministic_mode_uses_fixed_configs_and_times_nothing(gpu_branch, deterministic, monkeypatch):
    monkeypatch.setattr(Autotuner, "_bench", _no_timing)
    x, w, b, a, wa, s = _own_case()
    B, K, N, Ka = x.shape[0], x.shape[1], w.shape[2], a.shape[1]
    d = torch.float64
    z_ref = (torch.einsum("bk,bkn->bn", x.to(d), w.to(d)[s]) + torch.einsum("bk,bkn->bn", a.to(d), wa.to(d)[s])
             + b.to(d)[s])
    y, _ = mbl.grouped_forward(x, w, b, a, wa, s, mbl.ACT_NONE)
    torch.testing.assert_close(y.to(d), z_ref, rtol=1e-5, atol=1e-5)
    dz = torch.randn(B, N)
    dx, dw, db, daux, dwa = mbl.grouped_backward(dz, x, w, a, wa, s, True, True, True, True, True)
    torch.testing.assert_close(dx.to(d), torch.einsum("bn,bkn->bk", dz.to(d), w.to(d)[s]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(daux.to(d), torch.einsum("bn,bkn->bk", dz.to(d), wa.to(d)[s]), rtol=1e-5, atol=1e-5)
    onehot = torch.nn.functional.one_hot(s, w.shape[0]).to(d)                          # [B, M]
    torch.testing.assert_close(dw.to(d), torch.einsum("bm,bk,bn->mkn", onehot, x.to(d), dz.to(d)), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(db.to(d), onehot.T @ dz.to(d), rtol=1e-5, atol=1e-5)
    yall, _ = mbl.all_forward(x, w, b, None, None, mbl.ACT_NONE)
    torch.testing.assert_close(yall.to(d), torch.einsum("bk,mkn->mbn", x.to(d), w.to(d)) + b.to(d)[:, None],
                               rtol=1e-5, atol=1e-5)
    # the fused mutual_linear (forward and backward) takes its fixed config too
    M8, N8 = 3, 8
    assert mu.fused_supported(M8, N8, torch.float32)
    xm, wm, bm = torch.randn(B, K), torch.randn(M8, K, N8), torch.randn(M8, N8)
    out, attn = mu.mutual_linear_forward(xm, wm, bm, None, None, s, mbl.ACT_RELU, 0.7, 0)
    mu.mutual_linear_backward(torch.randn(B, N8), xm, wm, bm, None, None, s, attn, mbl.ACT_RELU, 0.7, 0)
    h = torch.relu(torch.einsum("bk,mkn->mbn", xm.to(d), wm.to(d)) + bm.to(d)[:, None])
    from saml_kernels.reference import mutual_unit as ref_mu
    torch.testing.assert_close(out.to(d), ref_mu.mutual_unit_reference(h, s, temperature=0.7, similarity="cosine"),
                               rtol=1e-5, atol=1e-5)

    def blocks(cfg, names):
        return dict(zip(names, cfg[:len(names)]), num_warps=cfg[-2], num_stages=cfg[-1])

    mm = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    expect = {
        "_grouped_mm_kernel": [blocks(mbl.fixed_mm_config(N, K), mm),            # forward [B,K] x [K,N]
                               blocks(mbl.fixed_mm_config(K, N), mm),            # dx: [B,N] x W^T [N,K]
                               blocks(mbl.fixed_mm_config(Ka, N), mm)],          # daux
        "_grouped_wgrad_kernel": [blocks(mbl.fixed_wg_config(K, N), ("BLOCK_K", "BLOCK_N", "BLOCK_R")),
                                  blocks(mbl.fixed_wg_config(Ka, N), ("BLOCK_K", "BLOCK_N", "BLOCK_R"))],
        "_all_mm_kernel": [blocks(mbl.fixed_mm_config(N, K), mm)],
    }
    for name, cfgs in expect.items():
        got = [kw for k, kw in gpu_branch if k == name]
        assert got == cfgs, (name, got)
    fused = [kw for k, kw in gpu_branch if k.startswith("_mutual_linear")]
    c = mu.FIXED_FUSED_CONFIG
    assert len(fused) == 2 and all(kw["BLOCK_K"] == c[0] and kw["num_warps"] == c[1] and kw["num_stages"] == c[2]
                                   for kw in fused), fused


@INTERP
@pytest.mark.triton_interp
def test_deterministic_results_do_not_depend_on_what_timing_would_pick(gpu_branch, deterministic, monkeypatch):
    """Two runs whose (fake) timings prefer opposite configs give bitwise-identical results: nothing is timed."""
    x, w, b, a, wa, s = _own_case()
    dz = torch.randn(x.shape[0], w.shape[2])
    runs = []
    for sign in (1.0, -1.0):
        monkeypatch.setattr(Autotuner, "_bench",
                            lambda self, *ar, config, sign=sign, **m: [sign * config.kwargs.get("BLOCK_K", 0)])
        for t in TUNERS:
            t.cache = {}
        y, _ = mbl.grouped_forward(x, w, b, a, wa, s, mbl.ACT_NONE)
        runs.append((y, *mbl.grouped_backward(dz, x, w, a, wa, s, True, True, True, True, True)))
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@INTERP
@pytest.mark.triton_interp
def test_dx_is_autotuned_apart_from_the_forward(gpu_branch, monkeypatch):
    """Outside deterministic mode: a layer's dx GEMM whose key (N, K, K2, dtypes) equals another layer's forward
    key is timed by its own autotuner instead of reusing the forward's choice."""
    timed = []

    def fake_bench(self, *args, config, **meta):
        timed.append(self)
        return [float(config.kwargs["BLOCK_M"])]       # any fixed preference

    monkeypatch.setattr(Autotuner, "_bench", fake_bench)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        _dx_case(timed)
    finally:
        torch.use_deterministic_algorithms(prev)


def _dx_case(timed):
    g = torch.Generator().manual_seed(2)
    B, M = 24, 2
    s = torch.randint(0, M, (B,), generator=g)
    # layer 1: K=16 -> N=32, forward key (N=32, K=16, K2=0); layer 2: K=32 -> N=16, its dx key is (32, 16, 0) too
    x1, w1 = torch.randn(B, 16, generator=g), torch.randn(M, 16, 32, generator=g)
    mbl.grouped_forward(x1, w1, None, None, None, s, mbl.ACT_NONE)
    assert timed and all(t is timed[0] for t in timed)
    fwd_tuner = timed[0]
    timed.clear()
    x2, w2 = torch.randn(B, 32, generator=g), torch.randn(M, 32, 16, generator=g)
    dx, *_ = mbl.grouped_backward(torch.randn(B, 16, generator=g), x2, w2, None, None, s, True, False, False, False,
                                  False)
    assert timed, "the dx GEMM reused the forward's autotuned config (shared autotune key)"
    assert all(t is not fwd_tuner for t in timed)
