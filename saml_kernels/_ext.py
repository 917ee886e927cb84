"""Loads the compiled extension ``saml_kernels._C`` once; the package works (reference + Triton) without it."""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)
import warnings

_C = None
LOAD_ERROR: str | None = None

try:
    _C = importlib.import_module("saml_kernels._C")
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "saml_kernels: the C++ extension saml_kernels._C is not available "
        f"({LOAD_ERROR}); only the reference and Triton backends can run. "
        "Build it with `make build`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cpu_ext() -> bool:
    return _C is not None


def has_cuda_ext() -> bool:
    return _C is not None and bool(_C.built_with_cuda())


def cuda_archs() -> str:
    return _C.cuda_archs() if _C is not None else ""


def ops():
    """The C++ operators, ``torch.ops.saml_C`` (registered when the extension loads)."""
    import torch

    return torch.ops.saml_C
