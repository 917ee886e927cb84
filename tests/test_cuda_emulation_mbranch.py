"""The CUDA mbranch_linear launchers and kernels (csrc/cuda/mbranch_linear.cu, mbranch_common.cuh: row_gemm_kernel,
wgrad_kernel, grouped_epilogue_kernel, all_epilogue_kernel), run from their real source on the CPU (tests/cuda_emu)
through ``torch.ops.saml_C_emu.mbl_*``, against the CPU kernel ``torch.ops.saml_C.mbl_*`` on the float64 upcast of
the same inputs, outputs poisoned (NaN). Shapes: B = 0 and 1, M = 1, K below the K step (BK = 16 / 32) and K / N
tails past a 64-wide tile, N = 0, a scenario without rows, aux operands, strided (transposed) weights; every dtype;
the engines auto (tensor cores for 16-bit: the WMMA emulation with its alignment / ldm checks), simt and cublas
(per-scenario at::mm + the epilogue kernels).
"""
from __future__ import annotations

import pytest
import torch

from cuda_emu.harness import DTYPES, assert_close, emu_ops, poisoned, up

C = torch.ops.saml_C
GELU, LEAKY = 3, 2


@pytest.fixture(scope="module")
def emu():
    return emu_ops()


@pytest.fixture(params=["auto", "simt", "cublas"])
def engine(request, monkeypatch):
    monkeypatch.setenv("SAML_CUDA_GROUPED", request.param)  # read by the launcher on every call
    return request.param


def inputs(B, M, K, N, Ka, dtype, empty_scenario=True, wt=False):
    r = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype)  # noqa: E731
    x, b = r(B, K), r(M, N)
    w = r(M, N, K).transpose(1, 2) if wt else r(M, K, N)  # wt: a non-contiguous (transposed) weight
    aux, wa = (r(B, Ka), r(M, Ka, N)) if Ka else (None, None)
    hi = max(1, M - 1) if empty_scenario else M
    s = torch.randint(0, hi, (B,))
    return x, w, b, aux, wa, s


SHAPES = [  # (B, M, K, N, Ka)
    (150, 4, 70, 100, 9),  # K and N tails, an empty scenario, aux
    (1, 1, 5, 3, 0),       # B = 1, M = 1, K < BK
    (65, 2, 33, 64, 0),    # one row past a 64-row tile, N exactly one tile, K one past two float32 K steps
    (0, 3, 8, 5, 2),       # B = 0
    (7, 3, 9, 0, 0),       # N = 0
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}M{}K{}N{}Ka{}".format(*s))
def test_grouped_forward_backward(emu, engine, dtype, shape):
    B, M, K, N, Ka = shape
    if engine == "cublas" and dtype != torch.float32:
        pytest.skip("the cuBLAS benchmarking path: one dtype is enough")
    if engine == "simt" and dtype in (torch.float32, torch.float64):
        pytest.skip("same path as auto (FMA tiles) for float32/float64")
    x, w, b, aux, wa, s = inputs(B, M, K, N, Ka, dtype, wt=shape[0] == 65)
    with poisoned():
        y, z = emu.mbl_grouped_forward(x, w, b, aux, wa, s, GELU)
    y2, z2 = C.mbl_grouped_forward(up(x), up(w), up(b), up(aux), up(wa), s, GELU)
    sc = 1.0 + K / 16 if dtype in (torch.float16, torch.bfloat16) else 1.0
    assert_close(y, y2, dtype, "y", sc)
    assert_close(z, z2, dtype, "z", sc)
    if engine == "cublas":
        return  # the backward's cuBLAS path has no kernel of its own
    dz = torch.randn(B, N, dtype=torch.float64).to(dtype)
    with poisoned():
        got = emu.mbl_grouped_backward(dz, x, w, aux, wa, s, True, True, True, Ka > 0, Ka > 0)
    ref = C.mbl_grouped_backward(up(dz), up(x), up(w), up(aux), up(wa), s, True, True, True, Ka > 0, Ka > 0)
    for name, a, r in zip(("dx", "dW", "db", "daux", "dWa"), got, ref):
        assert_close(a, r, dtype, name, 1.0 + max(B, N) / 16 if sc > 1 else 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_branch_x"])
def test_all_forward(emu, engine, dtype, shared):
    """float16/bfloat16: the dense tiled schedule (auto / simt); float32/64: at::mm + all_epilogue_kernel."""
    if engine == "cublas" and dtype != torch.float32:
        pytest.skip("the cuBLAS benchmarking path: one dtype is enough")
    B, M, K, N, Ka = 67, 3, 40, 70, 6
    x, w, b, aux, wa, _ = inputs(B, M, K, N, Ka, dtype)
    if not shared:
        x = torch.randn(M, B, K, dtype=torch.float64).to(dtype)
    with poisoned():
        y, z = emu.mbl_all_forward(x, w, b, aux, wa, GELU)
    y2, z2 = C.mbl_all_forward(up(x), up(w), up(b), up(aux), up(wa), GELU)
    sc = 4.0 if dtype in (torch.float16, torch.bfloat16) else 1.0
    assert_close(y, y2, dtype, "y", sc)
    assert_close(z, z2, dtype, "z", sc)


def test_grouped_forward_leaky_without_z(emu):
    x, w, b, aux, wa, s = inputs(40, 3, 12, 20, 0, torch.float32)
    with poisoned():
        y, z = emu.mbl_grouped_forward(x, w, None, None, None, s, LEAKY)
    y2, _ = C.mbl_grouped_forward(up(x), up(w), None, None, None, s, LEAKY)
    assert z.numel() == 0
    assert_close(y, y2, torch.float32, "y")


def test_int64_weight_stride(emu, tmp_path):
    """weight [M, K, N] whose branch stride is past 2^31 elements (a sparse file): m * stride needs 64 bits, in the
    forward (row_gemm_kernel) and dx (transposed operand) / dW (wgrad_kernel writes a contiguous dW)."""
    from cuda_emu.harness import far_strided_copy

    x, w, b, _, _, s = inputs(20, 3, 9, 11, 0, torch.float32, empty_scenario=False)
    far = far_strided_copy(w, tmp_path / "w.bin")
    y, z = emu.mbl_grouped_forward(x, far, b, None, None, s, GELU)
    y2, z2 = C.mbl_grouped_forward(up(x), up(w), up(b), None, None, s, GELU)
    assert_close(y, y2, torch.float32, "y")
    dz = torch.randn(20, 11)
    got = emu.mbl_grouped_backward(dz, x, far, None, None, s, True, False, False, False, False)
    ref = C.mbl_grouped_backward(up(dz), up(x), up(w), None, None, s, True, False, False, False, False)
    assert_close(got[0], ref[0], torch.float32, "dx")
