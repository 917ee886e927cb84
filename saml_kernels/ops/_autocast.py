"""How every custom op behaves under ``torch.autocast`` (one policy per op, registered for CPU and CUDA).

- ``cast``: the GEMM-like ops (``mbranch_linear_own``, ``mbranch_linear_all``, ``mutual_linear``). Every floating
  input on the autocast device that is float32 / float16 / bfloat16 is cast to the autocast dtype (``torch.
  get_autocast_dtype(device)``, e.g. bfloat16 on the CPU, float16 or bfloat16 on CUDA) and the op runs in it, as
  ``torch.mm`` does under autocast. float64 inputs are left as they are (as torch does), so nothing is promoted.
- ``promote``: ``partitioned_norm`` (a normalisation). Its data inputs (x and the per-scenario scale and shift,
  ``PROMOTED``) are cast to the widest of their dtypes (torch's ``promote`` rule, as for ``cat``): a 16-bit x from
  an autocast GEMM with float32 parameters is normalised in float32 and comes out float32; an all-16-bit or an
  all-float32 call is not cast. Its statistics (mean, rstd) are float32 whatever x is. Chosen over ``cast``
  (normalising in 16 bits loses what the statistics are for) and over keeping x's dtype (the kernels take one
  dtype for x, scale and shift, so the float32 parameters would be rounded to 16 bits in the forward).
- ``keep``: ``scenario_embedding_bag`` (the tables keep their dtype, as ``F.embedding_bag`` does under autocast;
  the outputs are in the table dtype), ``mutual_unit`` (runs in the dtype of h, float32 arithmetic inside) and
  every backward op (they run in the dtypes the forward saved). Inputs pass through unchanged.

Both kinds run the op's body with autocast switched off for that device, so the torch ops inside a custom op
(the reference backend, the safe stand-ins of the input checks) are never cast a second time: each input is cast
at most once, by the dispatcher, in front of the op. The casts are ordinary autograd ops, so gradients reach
the parameters in the parameters' own dtype.

Outputs under autocast with dtype d (float32 parameters): ``mbranch_linear`` -> d, ``mutual_linear`` -> d (its
attention float32), ``mutual_unit`` -> h.dtype, ``scenario_embedding_bag`` -> the table dtype,
``partitioned_norm`` -> the widest of x's and the parameters' dtypes (float32 here); in ``nn.SAML`` the logits come
out in d (the heads are a routed GEMM and an ``nn.Linear``).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["POLICY", "PROMOTED", "autocast_dtype", "register", "will_cast"]

# op name (namespace saml_kernels) -> "cast" | "promote" | "keep"
POLICY = {
    "mbranch_linear_own": "cast",
    "mbranch_linear_all": "cast",
    "mutual_linear": "cast",
    "scenario_embedding_bag": "keep",
    "scenario_embedding_bag_8bit": "keep",  # uint8 tables, float32 outputs: nothing to cast
    "mutual_unit": "keep",
    "scenario_embedding_bag_backward": "keep",
    "mbranch_linear_own_backward": "keep",
    "mbranch_linear_all_backward": "keep",
    "mutual_unit_backward": "keep",
    "mutual_linear_backward": "keep",
    # statistics of x in float32 whatever x's dtype (the accumulation dtype of every 16-bit input)
    "partitioned_norm_stats": "keep",
    # x, scale, shift brought to their widest dtype (see the module docstring); mean / rstd are float32 already
    "partitioned_norm": "promote",
    "partitioned_norm_backward": "keep",
}
# "promote" ops: the positions of the arguments promoted together
PROMOTED = {"partitioned_norm": (0, 4, 5)}
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


def _promote(args: tuple, positions: tuple, device_type: str) -> tuple:
    """``args`` with the floating tensors at ``positions`` cast to the widest of their (castable) dtypes."""
    picked = [args[i] for i in positions if isinstance(args[i], torch.Tensor) and args[i].is_floating_point()]
    if not picked or any(t.dtype not in _CASTABLE for t in picked):
        return args  # float64 is never cast (the op's own dtype check then speaks)
    dtype = picked[0].dtype
    for t in picked[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(_cast(a, device_type, dtype) if i in positions else a for i, a in enumerate(args))


def _kernel(op, device_type: str, key: str, policy: str, name: str):
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args, **kwargs):
        if policy == "cast":
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(_cast(a, device_type, dtype) for a in args)
        elif policy == "promote":
            args = _promote(args, PROMOTED[name], device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args, **kwargs)

    return kernel


_LIB = None


def register() -> None:
    """Registers every op's policy as its AutocastCPU / AutocastCUDA kernel (once). Called by ``saml_kernels.ops``
    (ops/__init__.py) after it has imported every op module, i.e. after the custom ops exist; this module imports
    no op module (the op modules import it for :func:`will_cast`), so there is no import cycle."""
    global _LIB
    if _LIB is not None:
        return
    missing = [name for name in POLICY if not hasattr(torch.ops.saml_kernels, name)]
    if missing:
        raise RuntimeError(f"ops._autocast.register: the custom ops {missing} are not defined yet; import their "
                           "op modules first (saml_kernels.ops does)")
    lib = torch.library.Library("saml_kernels", "IMPL")
    for name, policy in POLICY.items():
        op = getattr(torch.ops.saml_kernels, name).default
        for device_type, key in _AUTOCAST_KEYS.items():
            if torch._C._is_autocast_available(device_type):
                lib.impl(name, _kernel(op, device_type, key, policy, name), key, with_keyset=True)
    _LIB = lib
