"""Helpers of the tests/test_cuda_emulation*.py files: the emulated ops, poisoned allocations, comparisons."""
from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

TOL = {  # emulated result (inputs of this dtype) vs the float64 CPU kernel on the same (upcast) inputs
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def emu_ops():
    """torch.ops.saml_C_emu (the plain emulation build, loaded into this process), or skip without g++."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no host C++ compiler for the CUDA emulation")
    from cuda_emu.build import load

    return load()


@contextlib.contextmanager
def poisoned():
    """Every at::empty inside is filled with NaN (floats) / the largest value (integers): torch's deterministic
    mode fills uninitialised memory, so an output element a kernel forgets to write shows."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def up(t):
    """float64 copy of a floating tensor (others unchanged, None kept)."""
    if t is None or not t.is_floating_point():
        return t
    return t.double()


def assert_close(got, ref, dtype, what, scale=1.0):
    tol = TOL[dtype]
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    g = got.double()
    nan = torch.isnan(g) & ~torch.isnan(ref.double())
    assert not bool(nan.any()), f"{what}: NaN at {nan.nonzero()[:5].tolist()} (an unwritten, poisoned element?)"
    torch.testing.assert_close(g, ref.double(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale, equal_nan=True,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def sparse_file_tensor(path, numel, dtype=torch.float32):
    """A 1-D tensor of ``numel`` elements backed by a sparse file (only touched pages take memory or disk): a view
    of it with a stride past 2^31 elements tests int64 addressing without allocating 8 GB."""
    with open(path, "wb") as fh:
        fh.truncate(numel * torch.tensor([], dtype=dtype).element_size())
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


def far_strided_copy(t, path, gap=(1 << 31) + 64):
    """``t`` [A, ...] copied into a view whose dim-0 stride is ``gap`` elements (> 2^31) over a sparse file."""
    inner = t[0].numel()
    base = sparse_file_tensor(path, gap * (t.shape[0] - 1) + inner, t.dtype)
    v = base.as_strided(t.shape, (gap,) + tuple(t[0].stride()) if t.dim() > 1 else (gap,))
    v.copy_(t)
    return v
