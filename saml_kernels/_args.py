"""Argument checks shared by the layers, the configs and the reference twins."""
from __future__ import annotations

import operator

import torch


def size_arg(who: str, name: str, value, minimum: int = 1) -> int:
    """``value`` as a Python int >= ``minimum``, for a size argument (features, branches, hidden widths ...).

    Any integral value is accepted (``operator.index``: int, numpy integers, 0-dim integer tensors); bool is
    rejected (``True`` is not a size). Raises TypeError for a non-integral value and ValueError below ``minimum``,
    both naming ``who``, the argument and the value."""
    is_bool = isinstance(value, bool) or type(value).__name__ == "bool_" or (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    try:
        if is_bool:
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{who}: {name} must be an integer >= {minimum}, got {value!r} "
                        f"({type(value).__name__})") from None
    if v < minimum:
        raise ValueError(f"{who}: {name} must be an integer >= {minimum}, got {value!r}")
    return v
