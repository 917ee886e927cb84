"""Backend choice: explicit ``backend=`` > ``use_backend(...)`` context > ``SAML_KERNELS_BACKEND`` > automatic.

Backends: ``reference`` (plain PyTorch, any device), ``cpu`` (C++ extension, CPU tensors), ``triton`` (CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` (CUDA C++ extension, CUDA tensors).
A fallback is never silent: automatic choice that skips a faster backend warns once per (op, device).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

from . import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")
# Automatic order per device type: first available wins.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_local = threading.local()
_warned: set = set()
_OP_BACKENDS: dict[str, tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError, ValueError):
    """A backend name is unknown, or a backend was asked for explicitly but cannot serve this op on this device.
    (Also a ValueError, so code that caught the unknown-name ValueError of earlier versions still does.)"""


def register_op(op: str, backends: tuple[str, ...]) -> None:
    """Declare which backends implement ``op`` (called by each ops/<op>.py module)."""
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"register_op({op!r}): unknown backend {b!r}")
    _OP_BACKENDS[op] = tuple(backends)


def registered_ops() -> dict[str, tuple[str, ...]]:
    return dict(_OP_BACKENDS)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def why_unavailable(backend: str, device_type: str, op: str | None = None) -> str | None:
    """None when ``backend`` can serve ``op`` on ``device_type``, else the reason it cannot."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS}"
    if op is not None and op in _OP_BACKENDS and backend not in _OP_BACKENDS[op]:
        return f"op {op} has no {backend} implementation"
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device_type}"
        if not _ext.has_cpu_ext():
            return f"the C++ extension is not built or failed to load ({_ext.LOAD_ERROR})"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device_type}"
        if not _ext.has_cpu_ext():
            return f"the C++ extension is not built or failed to load ({_ext.LOAD_ERROR})"
        if not _ext.has_cuda_ext():
            return "the extension was built without CUDA kernels (no CUDA toolkit/torch at build time, or SAML_BUILD_CUDA=0)"
        return None
    # triton
    err = _triton_import_error()
    if err:
        return err
    if device_type == "cuda":
        return None
    if device_type == "cpu" and triton_interpret():
        return None
    return f"triton runs on CUDA tensors (or on CPU tensors only with TRITON_INTERPRET=1), not {device_type}"


def available_backends(device_type: str, op: str | None = None) -> list[str]:
    return [b for b in BACKENDS if why_unavailable(b, device_type, op) is None]


def check_name(name: str, where: str) -> str:
    """``name`` if it names a backend, else BackendUnavailableError naming ``where`` and the choices."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise BackendUnavailableError(f"{where}: unknown backend {name!r}; choose one of {BACKENDS}")
    return name


_check_name = check_name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: ops called inside use backend ``name`` unless they pass ``backend=``."""
    _check_name(name, "use_backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _requested(explicit: str | None) -> tuple[str | None, str]:
    if explicit is not None:
        return _check_name(explicit, "backend="), "backend= argument"
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1], "use_backend() context"
    env = os.environ.get("SAML_KERNELS_BACKEND")
    if env:
        return _check_name(env, "SAML_KERNELS_BACKEND"), "SAML_KERNELS_BACKEND"
    return None, "automatic"


def auto_backend(op: str, device_type: str) -> tuple[str, str]:
    """(backend, why) for automatic choice; warns once when it falls back past a faster backend."""
    order = AUTO_ORDER.get(device_type, ("reference",))
    skipped = []
    for b in order:
        reason = why_unavailable(b, device_type, op)
        if reason is None:
            if skipped and (op, device_type) not in _warned:
                _warned.add((op, device_type))
                warnings.warn(
                    f"saml_kernels.{op} on {device_type}: falling back to the {b} backend because "
                    + "; ".join(f"{s}: {r}" for s, r in skipped),
                    RuntimeWarning,
                    stacklevel=3,
                )
            return b, "automatic" + (f" (fallback; {skipped[0][0]} unavailable)" if skipped else "")
        skipped.append((b, reason))
    return "reference", "automatic"


def requested(explicit: str | None = None) -> tuple[str | None, str]:
    """(backend name or None for automatic, where the request came from) without resolving it."""
    return _requested(explicit)


def resolve(op: str, device_type: str, explicit: str | None = None) -> str:
    """The backend that serves ``op`` for tensors on ``device_type``; raises if a requested one cannot."""
    name, source = _requested(explicit)
    if name is None:
        return auto_backend(op, device_type)[0]
    reason = why_unavailable(name, device_type, op)
    if reason is not None:
        raise BackendUnavailableError(f"saml_kernels.{op}: backend {name!r} (from {source}) cannot run here: {reason}")
    return name
