"""Backends of every op: one registry of kernel tables, the automatic choice, and the reasons a backend cannot run.

Backends: ``reference`` (plain PyTorch, any device; the kernels of ``saml_kernels.reference``), ``cpu`` (C++
extension, CPU tensors), ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` (CUDA
C++ extension, CUDA tensors).

Registry: ``{op: {backend: kernel table}}``. An op declares the names of its kernel table once
(:func:`define_op`: required names, and optional ones a backend may leave out, e.g. a fused variant); each backend
then registers a *loader* for it (:func:`register_kernels`) that is called the first time the backend serves the
op, so triton is never imported for a CPU-only run and ``saml_kernels.reference`` only when the reference backend
is used. A Python backend module declares its tables itself (``KERNELS = {op: {name: function}}``,
:func:`register_python_kernels`); the C++ backends name the ``torch.ops.saml_C`` operators (:func:`aten_kernels`) and
declare support per dispatch key, so a kernel that one build lacks is reported, not called.

Choice: explicit ``backend=`` > ``use_backend(...)`` context > ``SAML_KERNELS_BACKEND`` > automatic. The automatic
choice takes the first available backend of :data:`PREFERENCE` (per device type and op, fastest measured first;
the CUDA orders are not measured yet, their comment says why they are what they are);
a fallback past a preferred backend is never silent: it warns once per (op, device) with the reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import threading
import types
import warnings
from typing import Callable, Mapping, Optional

from . import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Automatic choice: per device type and op, the backends from fastest to slowest as measured; the first one that
# can run wins. An entry cites its measurement by a file in benchmarks/results/ (tests/test_backend_registry.py
# checks that every cited file exists); an order no committed results file supports says so. Re-measure and update
# an entry when a kernel changes. Results files this table cites: embedding_cpu2.md, bench_branch_gemm_cpu2.md,
# bench_mutual_cpu2.md, bench_model_cpu2.md (all CPU; no GPU results file exists).
PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {
        # benchmarks/results/embedding_cpu2.md (B=4096, 16 x 100k rows, D=32, fp32, 2 threads): one-hot uniform
        # forward cpu 1.8 ms against 3.09 ms eager (F.embedding, the reference's gather) and 24 ms compiled
        # reference; fused SGD step cpu 3.55 ms against 14.8 ms eager.
        "scenario_embedding_bag": ("cpu", "reference"),
        # benchmarks/results/bench_branch_gemm_cpu2.md (M=4, B=4096, K=N=256, fp32): route own fwd+bwd cpu 12.8 ms
        # against 82.0 ms eager_where and 87.5 ms compiled reference.
        "mbranch_linear": ("cpu", "reference"),
        # benchmarks/results/bench_mutual_cpu2.md: no stand-alone figure; the saved path (cpu mbl_all_forward +
        # mutual_forward/backward) is 44.4 ms fwd+bwd against 192 ms eager.
        "mutual_unit": ("cpu", "reference"),
        # benchmarks/results/bench_mutual_cpu2.md (M=4, B=4096, K=N=256, fp32): fwd+bwd cpu 44.7 ms against 192 ms
        # eager.
        "mutual_linear": ("cpu", "reference"),
        # benchmarks/results/bench_model_cpu2.md: the C++ kernel inside STAR's step; no stand-alone figure yet.
        "partitioned_norm": ("cpu", "reference"),
    },
    # CUDA: UNMEASURED. No GPU results file exists; a device run of benchmarks/gpu_check.sh times both backends per
    # op, and this table is then ordered by its results file. Until then the rule is: code that has run on a GPU
    # before code that has not, unless the code that has run cannot do the job. So triton first for the GEMM ops
    # (Triton kernels close to these have run and passed their tests on a GPU, CHANGELOG.md; they launch no host
    # sync, so CUDA-graph capture works, and under deterministic algorithms they use fixed block sizes), the tiled
    # CUDA engine of csrc/cuda/mbranch_common.cuh next (it has run only in the CPU emulation; a Triton-less install
    # still gets a sync-free kernel, and the fallback warns). Speed does not enter: the CUDA engine has no figure.
    # The embedding keeps cuda first: the Triton embedding backward reads its segment sizes on the host (a sync per
    # step, no CUDA-graph capture, tests/test_host_syncs.py), while the CUDA one is sync-free; an embedding that
    # cannot be captured would break CapturedTrainingStep for every model.
    "cuda": {
        "scenario_embedding_bag": ("cuda", "triton", "reference"),
        "mbranch_linear": ("triton", "cuda", "reference"),
        # its kernels are those of mutual_linear's unfused path: the same order
        "mutual_unit": ("triton", "cuda", "reference"),
        "mutual_linear": ("triton", "cuda", "reference"),
        # the "cuda" table is the Triton one (no CUDA C++ kernel): the two are the same code
        "partitioned_norm": ("cuda", "triton", "reference"),
    },
}
# An op or device type missing from PREFERENCE (a new op before its first benchmark): the compiled backends first.
DEFAULT_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_local = threading.local()
_warned: set = set()


class BackendUnavailableError(RuntimeError, ValueError):
    """A backend name is unknown, or a backend was asked for explicitly but cannot serve this op on this device.
    Also a ValueError: an unknown name is a bad argument value."""


# ------------------------------------------------------------------------------------------------ registry

@dataclasses.dataclass
class _Source:
    load: Callable[[], Mapping[str, Optional[Callable]]]
    why_not: Optional[Callable[[str], Optional[str]]]
    table: Optional[types.SimpleNamespace] = None
    served_by: Optional[str] = None  # register_alias: the backend whose table this one is


@dataclasses.dataclass
class _OpSpec:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    sources: dict[str, _Source] = dataclasses.field(default_factory=dict)


_OPS: dict[str, _OpSpec] = {}


def define_op(op: str, *, kernels: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Declares ``op`` and the names of its kernel table: ``kernels`` every backend provides, ``optional`` ones a
    backend may lack (its table then holds None there and the op takes its unfused path)."""
    _OPS[op] = _OpSpec(tuple(kernels), tuple(optional))


def register_kernels(op: str, backend: str, load: Callable[[], Mapping[str, Optional[Callable]]], *,
                     why_not: Optional[Callable[[str], Optional[str]]] = None) -> None:
    """Registers ``backend``'s kernel table for ``op``.

    ``load()`` returns ``{kernel name: callable or None}`` and is called once, the first time the backend serves the
    op. ``why_not(device_type)`` returns None when this backend can serve the op there, else the reason (checked
    after the backend's own conditions, e.g. that the extension is built)."""
    _new_source(op, backend, "register_kernels", _Source(load, why_not))


def _new_source(op: str, backend: str, who: str, source: _Source) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{who}({op!r}): unknown backend {backend!r}; choose one of {BACKENDS}")
    if op not in _OPS:
        raise ValueError(f"{who}({op!r}): define_op({op!r}, kernels=...) first")
    if backend in _OPS[op].sources:  # one table per (op, backend): a second registration would hide the first
        raise ValueError(f"{who}({op!r}): the {backend} backend of {op} is registered already")
    _OPS[op].sources[backend] = source


def register_alias(op: str, backend: str, served_by: str) -> None:
    """``backend`` serves ``op`` with ``served_by``'s kernel table: an op that has no kernel of its own for that
    backend, but whose ``served_by`` kernels run on the same devices (``partitioned_norm``'s "cuda" is its Triton
    table), so ``backend=...`` models keep working. The backend can serve the op where both its own conditions
    (device type, extension) and ``served_by``'s for this op hold; the table is ``kernels(op, served_by)``."""
    if served_by not in BACKENDS or served_by == backend:
        raise ValueError(f"register_alias({op!r}): served_by must be another backend of {BACKENDS}, got "
                         f"{served_by!r}")
    _new_source(op, backend, "register_alias",
                _Source(lambda: vars(kernels(op, served_by)), lambda device_type: why_unavailable(served_by,
                                                                                                   device_type, op),
                        served_by=served_by))


def kernels(op: str, backend: str) -> types.SimpleNamespace:
    """The kernel table of ``backend`` for ``op``: one attribute per name given to :func:`define_op`."""
    spec = _OPS.get(op)
    if spec is None:
        raise ValueError(f"unknown op {op!r}; registered: {sorted(_OPS)}")
    src = spec.sources.get(backend)
    if src is None:
        raise BackendUnavailableError(f"op {op} has no {backend} implementation")
    if src.table is None:
        table = dict(src.load())
        missing = [n for n in spec.required if table.get(n) is None]
        if missing:
            raise BackendUnavailableError(f"the {backend} kernel table of {op} lacks {missing}")
        src.table = types.SimpleNamespace(**{n: table.get(n) for n in spec.required + spec.optional})
    return src.table


def registered_ops() -> dict[str, tuple[str, ...]]:
    """{op: the backends that registered a kernel table for it}."""
    return {op: tuple(b for b in BACKENDS if b in spec.sources) for op, spec in _OPS.items()}


def served_by(op: str, backend: str) -> str:
    """The backend whose kernels run when ``backend`` serves ``op``: ``backend`` itself, or the one it is an alias
    of (:func:`register_alias`)."""
    src = _OPS[op].sources.get(backend) if op in _OPS else None
    return src.served_by if src is not None and src.served_by is not None else backend


def register_python_kernels(op: str, stem: str) -> None:
    """Registers the ``reference`` and ``triton`` tables of ``op``: each lives in its backend's package,
    ``saml_kernels/<backend>/<stem>.py``, which declares them itself as ``KERNELS = {op: {name: function}}``; the
    module is imported the first time that backend serves the op."""
    for backend in ("reference", "triton"):
        module = f"{__package__}.{backend}.{stem}"
        register_kernels(op, backend, lambda module=module: importlib.import_module(module).KERNELS[op])


def _has_dispatch(name: str, dispatch_key: str) -> bool:
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"saml_C::{name}", dispatch_key)
    except RuntimeError:
        return False


def register_aten_kernels(op: str, names: Mapping[str, str], backends: tuple[str, ...] = ("cpu", "cuda")) -> None:
    """Registers the ``cpu`` and ``cuda`` tables (or those of ``backends``) of ``op`` from ``{kernel name:
    torch.ops.saml_C operator}``.

    A backend serves the op when the build has a kernel of every required operator for its dispatch key; an
    optional operator without one gives None in the table (the op's unfused path). The dispatcher is asked once,
    here (the extension is loaded by then), so choosing a backend stays a dictionary lookup (also under
    torch.compile)."""
    spec = _OPS[op]
    for backend, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if backend not in backends:
            continue
        built = {n: aten for n, aten in names.items() if _has_dispatch(aten, key)}
        lacking = [names[n] for n in spec.required if n not in built]
        reason = f"the extension has no {key} kernel of {lacking}" if lacking else None

        def load(built=built):
            import torch

            return {n: getattr(torch.ops.saml_C, aten) for n, aten in built.items()}

        register_kernels(op, backend, load, why_not=lambda device_type, reason=reason: reason)


# ------------------------------------------------------------------------------------------------ availability

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


def _why_backend(backend: str, device_type: str) -> str | None:
    """The backend's own conditions (device type, extension built, triton importable), whatever the op."""
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
    err = _triton_import_error()
    if err:
        return err
    if device_type == "cuda":
        return None
    if device_type == "cpu" and triton_interpret():
        return None
    return f"triton runs on CUDA tensors (or on CPU tensors only with TRITON_INTERPRET=1), not {device_type}"


def why_unavailable(backend: str, device_type: str, op: str | None = None) -> str | None:
    """None when ``backend`` can serve ``op`` on ``device_type``, else the reason it cannot."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS}"
    src = None
    if op is not None and op in _OPS:
        src = _OPS[op].sources.get(backend)
        if src is None:
            return f"op {op} has no {backend} implementation"
    reason = _why_backend(backend, device_type)
    if reason is None and src is not None and src.why_not is not None:
        reason = src.why_not(device_type)
    return reason


def available_backends(device_type: str, op: str | None = None) -> list[str]:
    return [b for b in BACKENDS if why_unavailable(b, device_type, op) is None]


def preference(op: str, device_type: str) -> tuple[str, ...]:
    """The automatic order of backends for ``op`` on ``device_type`` (:data:`PREFERENCE`), fastest first."""
    order = PREFERENCE.get(device_type, {}).get(op)
    return order if order is not None else DEFAULT_PREFERENCE.get(device_type, ("reference",))


# ------------------------------------------------------------------------------------------------ choice

def check_name(name: str, where: str) -> str:
    """``name`` if it names a backend, else BackendUnavailableError naming ``where`` and the choices."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise BackendUnavailableError(f"{where}: unknown backend {name!r}; choose one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: ops called inside use backend ``name`` unless they pass ``backend=``."""
    check_name(name, "use_backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested(explicit: str | None = None) -> tuple[str | None, str]:
    """(backend name or None for automatic, where the request came from) without resolving it."""
    if explicit is not None:
        return check_name(explicit, "backend="), "backend= argument"
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1], "use_backend() context"
    env = os.environ.get("SAML_KERNELS_BACKEND")
    if env:
        return check_name(env, "SAML_KERNELS_BACKEND"), "SAML_KERNELS_BACKEND"
    return None, "automatic"


def auto_backend(op: str, device_type: str) -> tuple[str, str]:
    """(backend, why) for automatic choice; warns once when it falls back past a preferred backend."""
    skipped = []
    for b in preference(op, device_type):
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


def resolve(op: str, device_type: str, explicit: str | None = None) -> str:
    """The backend that serves ``op`` for tensors on ``device_type``; raises if a requested one cannot."""
    name, source = requested(explicit)
    if name is None:
        return auto_backend(op, device_type)[0]
    reason = why_unavailable(name, device_type, op)
    if reason is not None:
        raise BackendUnavailableError(f"saml_kernels.{op}: backend {name!r} (from {source}) cannot run here: {reason}")
    return name
