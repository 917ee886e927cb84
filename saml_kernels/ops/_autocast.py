"""How every custom op behaves under ``torch.autocast`` (one policy per op, registered for CPU and CUDA).

- ``cast``: the GEMM-like ops (``mbranch_linear_own``, ``mbranch_linear_all``, ``mutual_linear``). Every floating
  input on the autocast device that is float32 / float16 / bfloat16 is cast to the autocast dtype (``torch.
  get_autocast_dtype(device)``, e.g. bfloat16 on the CPU, float16 or bfloat16 on CUDA) and the op runs in it, as
  ``torch.mm`` does under autocast. float64 inputs are left as they are (as torch does), so nothing is promoted.
- ``keep``: ``scenario_embedding_bag`` (the tables keep their dtype, as ``F.embedding_bag`` does under autocast;
  the outputs are in the table dtype), ``mutual_unit`` (runs in the dtype of h, float32 arithmetic inside) and
  every backward op (they run in the dtypes the forward saved). Inputs pass through unchanged.

Both kinds run the op's body with autocast switched off for that device, so the torch ops inside a custom op
(the reference backend, the safe stand-ins of the input checks) are never cast a second time: each input is cast
at most once, by the dispatcher, in front of the op. The casts are ordinary autograd ops, so gradients reach
the parameters in the parameters' own dtype.

Outputs under autocast with dtype d (float32 parameters): ``mbranch_linear`` -> d, ``mutual_linear`` -> d (its
attention float32), ``mutual_unit`` -> h.dtype, ``scenario_embedding_bag`` -> the table dtype; in ``nn.SAML``
the logits come out in d (the heads are a routed GEMM and an ``nn.Linear``).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["POLICY", "autocast_dtype", "will_cast"]

# op name (namespace saml_kernels) -> "cast" | "keep"
POLICY = {
    "mbranch_linear_own": "cast",
    "mbranch_linear_all": "cast",
    "mutual_linear": "cast",
    "scenario_embedding_bag": "keep",
    "mutual_unit": "keep",
    "scenario_embedding_bag_backward": "keep",
    "mbranch_linear_own_backward": "keep",
    "mbranch_linear_all_backward": "keep",
    "mutual_unit_backward": "keep",
    "mutual_linear_backward": "keep",
    # a normalisation runs in its input's dtype with float32 statistics (as torch's batch_norm under autocast)
    "partitioned_norm_stats": "keep",
    "partitioned_norm": "keep",
    "partitioned_norm_backward": "keep",
}
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` casts to on ``device_type`` now, or None when autocast is off there."""
    if device_type not in _AUTOCAST_KEYS or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def will_cast(device_type: str, *tensors) -> bool:
    """True when autocast is on for ``device_type`` and a ``cast`` op would bring every given floating tensor to
    one dtype (none is float64): an op's same-dtype argument check is then satisfied after the cast."""
    if autocast_dtype(device_type) is None:
        return False
    return all(t.dtype in _CASTABLE for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype in _CASTABLE
        return value.to(dtype) if eligible and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def _kernel(op, device_type: str, key: str, cast: bool):
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args, **kwargs):
        if cast:
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(_cast(a, device_type, dtype) for a in args)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args, **kwargs)

    return kernel


def _register() -> None:
    # the op modules register the custom ops when imported (they import this module for will_cast, so the
    # helpers above are defined by then)
    from . import (embedding_optimizer, mbranch_linear, mutual_linear, mutual_unit,  # noqa: F401
                   partitioned_norm, scenario_embedding_bag)

    global _LIB
    _LIB = torch.library.Library("saml_kernels", "IMPL")
    for name, policy in POLICY.items():
        op = getattr(torch.ops.saml_kernels, name).default
        for device_type, key in _AUTOCAST_KEYS.items():
            if torch._C._is_autocast_available(device_type):
                _LIB.impl(name, _kernel(op, device_type, key, policy == "cast"), key, with_keyset=True)


_LIB = None
_register()
