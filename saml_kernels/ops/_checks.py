"""Argument checks shared by the ops: each raises with the op, the argument and the offending value."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(op: str, name: str, t, *, ndim=None, dtypes=None, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{op}: {name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.is_sparse:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")


def same_device(op: str, **tensors):
    named = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    if not named:
        return
    ref_name, ref = named[0]
    for n, t in named[1:]:
        if t.device != ref.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {ref_name} is on {ref.device}; all tensors must share a device")


def choice(op: str, name: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def scenario_range(op: str, scenario: torch.Tensor, num_scenarios: int) -> None:
    """Raises when a scenario id is outside [0, num_scenarios): one reduction, one host sync."""
    if scenario.numel() == 0:
        return
    bad = (scenario < 0) | (scenario >= num_scenarios)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(f"{op}: scenario[{pos}] = {int(scenario[pos])} is out of range [0, {num_scenarios})")
