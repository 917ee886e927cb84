"""saml-kernels: fused kernels, autograd functions and drop-in layers for multi-scenario recommendation (SAML)."""
from . import _ext  # noqa: F401  (loads the C++ operators, warns once when they are missing)
from ._backend import BackendUnavailableError, available_backends, use_backend
from .functional import *  # noqa: F401,F403
from .functional import __all__ as _functional_all
from .ops._checks import (capture_safe_checks, deferred_checks, error_counts, prepare_capture_safe,  # noqa: F401
                          raise_errors)

__version__ = "0.1.0"

__all__ = ["use_backend", "available_backends", "BackendUnavailableError", "reference", "deferred_checks",
           "capture_safe_checks", "error_counts", "prepare_capture_safe", "raise_errors", *_functional_all]


def __getattr__(name: str):
    # ``saml_kernels.reference`` (the plain-PyTorch oracle) is imported on first use only, never by the package.
    if name == "reference":
        import importlib

        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
