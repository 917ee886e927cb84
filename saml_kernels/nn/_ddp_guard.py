"""Refuses a fused-optimizer ``ScenarioEmbedding`` inside a multi-rank ``DistributedDataParallel`` forward.

A fused layer updates its tables in its own backward from the gradient of *this rank's* batch and leaves no
``.grad`` behind. DDP synchronises replicas only through gradients (all-reduced) and, at construction, a
broadcast of the initial parameters; it never sees the fused update. So every rank moves its copy of the tables
by its own batch and the replicas drift apart silently (with ``find_unused_parameters=True`` DDP just marks the
tables unused; without it DDP fails one step later with an unrelated-looking reduction error). Keeping the tables
out of DDP (``_set_params_and_buffers_to_ignore_for_model``) does not help either: nothing averages the updates.
The sound layouts are in docs/distributed.md: TorchRec sharding (``saml_kernels.torchrec.shard_saml``, which
keeps the fused optimizer) or the fallbacks without a fused optimizer.

DDP marks its forward by setting the class attribute ``DistributedDataParallel._active_ddp_module`` (torch >= 2.0;
its ``_inside_ddp_forward``), which is what is read here: no hook on DDP, no cost outside the fused path.
"""
from __future__ import annotations

from torch import nn

try:
    from torch.nn.parallel import DistributedDataParallel as _DDP
except ImportError:  # a torch without torch.distributed
    _DDP = None


def refuse_under_ddp(layer: nn.Module) -> None:
    """Raises RuntimeError when ``layer`` (a ScenarioEmbedding taking its fused path) runs inside the forward of a
    DistributedDataParallel over more than one rank; does nothing otherwise (one attribute read)."""
    ddp = getattr(_DDP, "_active_ddp_module", None) if _DDP is not None else None
    if ddp is None:
        return
    pg = getattr(ddp, "process_group", None)
    world = pg.size() if pg is not None and hasattr(pg, "size") else None
    if world == 1:  # one replica: nothing to diverge from
        return
    raise RuntimeError(
        f"ScenarioEmbedding(optimizer={layer.optimizer!r}) runs inside DistributedDataParallel (world size "
        f"{world}): its fused optimizer updates this rank's copy of the tables in the backward from this rank's "
        f"batch alone, and DDP never synchronises them (the tables get no gradient), so the replicas' tables "
        f"would silently diverge. Shard the tables with saml_kernels.torchrec.shard_saml (TorchRec; keeps the "
        f"fused optimizer), or build the model without a fused optimizer (embedding_optimizer=None) and use a "
        f"fallback of docs/distributed.md (tables kept out of DDP with their gradients all-reduced by hand, or the "
        f"row-wise shard of python/ddp_example.py).")
