"""Host memory for large CPU tables: ``huge_page_empty`` (transparent huge pages)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["huge_page_empty"]

_HUGE_PAGE = 2 << 20


def huge_page_empty(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised, contiguous CPU tensor of ``shape`` whose memory is advised as transparent huge pages.

    The memory is an anonymous mapping aligned to 2 MiB and ``madvise(MADV_HUGEPAGE)``d, so the kernel backs it
    with 2 MiB pages where it can (Linux with ``/sys/kernel/mm/transparent_hugepage/enabled`` = madvise or always).
    Random-row lookups into a table much larger than the TLB's reach then miss the TLB far less. The mapping lives
    as long as the tensor. Raises ``RuntimeError`` where the platform has no ``MADV_HUGEPAGE``.
    """
    import ctypes
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        raise RuntimeError("huge_page_empty: this platform has no MADV_HUGEPAGE (Linux only)")
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    size = -(-max(nbytes, 1) // _HUGE_PAGE) * _HUGE_PAGE
    # private anonymous memory (a shared mapping would be shmem, which THP treats separately); one spare huge
    # page to align the start
    mem = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    start = -addr % _HUGE_PAGE
    mem.madvise(mmap.MADV_HUGEPAGE, start, size)
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    flat = torch.frombuffer(mem, dtype=torch.uint8, count=nbytes, offset=start)  # keeps `mem` alive
    return flat.view(dtype).view(tuple(shape))
