"""``dense(t)``: ``t.contiguous()`` without a guard on the batch size while tracing.

``Tensor.contiguous()`` asks ``is_contiguous()``, and for a strided view such as the route-"all" output
[M, B, N] with strides (N, M*N, 1) the answer depends on B: a size-1 dimension's stride does not count, so the view
is contiguous exactly when B == 1. Under ``torch.export`` with a symbolic B that question becomes a guard B != 1
baked into the program, which then rejects a batch of one (docs/design.md section 10). ``dense`` decides from
what is *statically* known instead: a tensor proven contiguous for every B is returned as is, anything else is
copied (``clone`` to the contiguous format, which asks nothing). In eager mode every size is a plain int, so the
result is exactly ``t.contiguous()``'s: ``t`` itself when contiguous, else one copy.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    from torch.fx.experimental.symbolic_shapes import statically_known_true as _known
except ImportError:  # pragma: no cover - every supported torch has it
    def _known(expr) -> bool:
        return bool(expr)


_PLAIN = (Tensor, torch.nn.Parameter)


def _known_contiguous(t: Tensor) -> bool:
    """True only when t is contiguous whatever values its symbolic sizes take (no guard is recorded)."""
    if _known(t.numel() == 0):
        return True
    expected = 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        if _known(size == 1):
            continue
        if not _known(stride == expected):
            return False
        expected = expected * size
    return True


def dense(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` when it is contiguous for every batch size, else a contiguous copy (None stays None)."""
    if t is None:
        return t
    if type(t) in _PLAIN and not torch.compiler.is_compiling():  # eager: plain ints, no guard to avoid
        return t.contiguous()
    if _known_contiguous(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)
