"""The CUDA mutual unit / mutual_linear launchers and row kernels (csrc/cuda/mutual_unit.cu: mutual_fwd_rows,
mutual_bwd_rows; mutual_linear's pre-activation through the tiled GEMM), run from their real source on the CPU
(tests/cuda_emu) through ``torch.ops.saml_C_emu.mutual_*``, against the CPU kernel ``torch.ops.saml_C.mutual_*``
on the float64 upcast of the same inputs, outputs poisoned (NaN). One warp per row with full-mask xor shuffles and
__syncwarp, dynamic shared memory sized by the launch. Shapes: B = 0 and 1, M = 1, N below / at / past a warp
width, strided h (the all-route view), huge rows (the power-of-two scaling of the cosine), both similarities,
every dtype; N = 0 for mutual_linear (its GEMM would launch grid.y = 0).
"""
from __future__ import annotations

import pytest
import torch

from cuda_emu.harness import DTYPES, assert_close, emu_ops, poisoned, up

C = torch.ops.saml_C
COS, DOT = 0, 1


@pytest.fixture(scope="module")
def emu():
    return emu_ops()


def rnd(*s, dtype=torch.float32, scale=1.0):
    return (torch.randn(*s, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sim", [COS, DOT], ids=["cosine", "dot"])
@pytest.mark.parametrize("shape", [(3, 10, 33), (1, 1, 5), (4, 9, 32), (2, 0, 7)], ids=lambda s: "M{}B{}N{}".format(*s))
def test_mutual_unit(emu, dtype, sim, shape):
    M, B, N = shape
    h = rnd(B, M, N, dtype=dtype).permute(1, 0, 2)  # [M, B, N] view of a [B, M, N] buffer: strided, as the all route
    s = torch.randint(0, max(1, M - 1), (B,))
    with poisoned():
        out, attn = emu.mutual_forward(h, s, 0.7, sim)
    out2, attn2 = C.mutual_forward(up(h), s, 0.7, sim)
    assert_close(out, out2, dtype, "out")
    assert_close(attn, attn2.float(), torch.float32, "attn", 100.0 if dtype.itemsize == 2 else 1.0)
    g = rnd(B, N, dtype=dtype)
    with poisoned():
        d = emu.mutual_backward(g, h, s, attn, 0.7, sim)
    d2 = C.mutual_backward(up(g), up(h), s, attn2.float(), 0.7, sim)
    assert_close(d, d2, dtype, "d_own", 4.0)


def test_mutual_unit_huge_rows(emu):
    """Cosine on rows of norm ~1e20 (|h|^2 overflows float32): the kernels' power-of-two row scaling."""
    h = rnd(3, 6, 40, scale=1e20)
    s = torch.randint(0, 3, (6,))
    with poisoned():
        out, attn = emu.mutual_forward(h, s, 1.0, COS)
        d = emu.mutual_backward(torch.ones(6, 40), h, s, attn, 1.0, COS)
    out2, attn2 = C.mutual_forward(up(h), s, 1.0, COS)
    d2 = C.mutual_backward(torch.ones(6, 40, dtype=torch.float64), up(h), s, attn2.float(), 1.0, COS)
    assert torch.isfinite(out).all() and torch.isfinite(d).all()
    torch.testing.assert_close(out.double(), out2, rtol=1e-5, atol=1e15)
    torch.testing.assert_close(d.double(), d2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 3, 20, 19, 5), (1, 1, 3, 40, 0), (0, 2, 4, 5, 0)],
                         ids=lambda s: "B{}M{}K{}N{}Ka{}".format(*s))
def test_mutual_linear(emu, dtype, shape):
    """float16/bfloat16: z from the tiled WMMA GEMM as float32; float32/64: at::mm. Then the row kernels."""
    B, M, K, N, Ka = shape
    x, w, b = rnd(B, K, dtype=dtype), rnd(M, K, N, dtype=dtype, scale=0.3), rnd(M, N, dtype=dtype)
    aux, wa = (rnd(B, Ka, dtype=dtype), rnd(M, Ka, N, dtype=dtype)) if Ka else (None, None)
    s = torch.randint(0, M, (B,))
    with poisoned():
        out, attn = emu.mutual_linear_forward(x, w, b, aux, wa, s, 3, 1.3, COS)
    out2, attn2 = C.mutual_linear_forward(up(x), up(w), up(b), up(aux), up(wa), s, 3, 1.3, COS)
    assert_close(out, out2, dtype, "out", 2.0)
    g = rnd(B, N, dtype=dtype)
    with poisoned():
        dz = emu.mutual_linear_backward(g, x, w, b, aux, wa, s, attn, 3, 1.3, COS)
    dz2 = C.mutual_linear_backward(up(g), up(x), up(w), up(b), up(aux), up(wa), s, attn2.float(), 3, 1.3, COS)
    assert_close(dz, dz2, dtype, "dz_own", 4.0)


@pytest.mark.parametrize("dtype,engine", [(torch.float16, "auto"), (torch.float32, "simt")])
def test_mutual_linear_n0(emu, monkeypatch, dtype, engine):
    """N = 0 once made chunk_preact launch grid.y = cdiv(0, 64) = 0 (cudaErrorInvalidConfiguration, which the
    emulated launch raises too); the launchers now skip a grid with a zero dimension."""
    monkeypatch.setenv("SAML_CUDA_GROUPED", engine)
    x, w = rnd(5, 4, dtype=dtype), rnd(2, 4, 0, dtype=dtype)
    s = torch.tensor([0, 1, 0, 1, 1])
    out, attn = emu.mutual_linear_forward(x, w, None, None, None, s, 3, 1.0, COS)
    assert out.shape == (5, 0) and attn.shape == (5, 2)
    dz = emu.mutual_linear_backward(torch.zeros(5, 0, dtype=dtype), x, w, None, None, None, s, attn, 3, 1.0, COS)
    assert dz.shape == (5, 0)


def test_int64_branch_stride(emu, tmp_path):
    """h [M, B, N] whose branch stride is past 2^31 elements (a sparse file): m * stride needs 64 bits."""
    from cuda_emu.harness import far_strided_copy

    h = rnd(3, 5, 7)
    far = far_strided_copy(h, tmp_path / "h.bin")
    s = torch.tensor([0, 2, 1, 1, 0])
    out, attn = emu.mutual_forward(far, s, 0.9, COS)
    out2, attn2 = C.mutual_forward(up(h), s, 0.9, COS)
    assert_close(out, out2, torch.float32, "out")
    d = emu.mutual_backward(torch.ones(5, 7), far, s, attn, 0.9, COS)
    assert_close(d, C.mutual_backward(torch.ones(5, 7, dtype=torch.float64), up(h), s, attn2.float(), 0.9, COS),
                 torch.float32, "d_own", 4.0)
