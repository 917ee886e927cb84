"""``python -m saml_kernels.info``: versions, what was built, and which backend serves each op on each device.

For each op and device type it prints the preference order of the automatic choice
(``saml_kernels._backend.PREFERENCE``, fastest measured first), the backend chosen here, and for every backend
whether it can run or why not."""
from __future__ import annotations

import platform

import torch

from . import _backend, _ext
import saml_kernels  # noqa: F401  (registers every op)


def report() -> str:
    lines = [
        f"saml_kernels {saml_kernels.__version__}",
        f"python {platform.python_version()}  torch {torch.__version__} (CUDA build: {torch.version.cuda})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}  (TRITON_INTERPRET={int(_backend.triton_interpret())})")
    except Exception as exc:
        lines.append(f"triton: not importable ({exc})")
    lines.append(f"C++ CPU extension: {'built' if _ext.has_cpu_ext() else 'MISSING: ' + str(_ext.LOAD_ERROR)}")
    lines.append("CUDA kernels: " + (f"built for archs {_ext.cuda_archs()}" if _ext.has_cuda_ext() else "not built"))
    lines.append(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    try:
        name, source = _backend.requested()
    except _backend.BackendUnavailableError as exc:
        name, source = None, f"invalid request: {exc}"
        lines.append(f"backend request: {source}")
    if name is not None:
        lines.append(f"backend request: {name!r} from {source} (overrides the automatic choice below)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op, backends in sorted(_backend.registered_ops().items()):
        lines.append(f"\n{op}:")
        for dev in devices + ([] if "cuda" in devices else ["cuda"]):
            auto, why = _backend.auto_backend(op, dev) if dev in devices else ("-", "no device")
            order = " > ".join(_backend.preference(op, dev))
            if name is None:
                lines.append(f"  {dev:5s} automatic -> {auto}" + ("" if dev in devices else " (no CUDA device here)")
                             + f"  [preference {order}]")
            else:
                reason = _backend.why_unavailable(name, dev, op)
                lines.append(f"  {dev:5s} {source} -> {name}" + ("" if reason is None else f" (FAILS here: {reason})")
                             + f"  [automatic would be {auto}; preference {order}]")
            for b in _backend.BACKENDS:
                reason = _backend.why_unavailable(b, dev, op)
                lines.append(f"      {b:9s} {'available' if reason is None else 'no: ' + reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
