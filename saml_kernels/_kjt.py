"""KeyedJaggedTensor inputs of the embedding layers: the ``forward(kjt, scenario)`` convention, the key checks and
the reordering of a KJT's features into a layer's feature order.

A KJT (TorchRec's, or any object with ``keys()``, ``values()``, ``offsets()``, optional ``weights_or_none()`` and
``variable_stride_per_key()``) holds K keys with one stride B: feature-major values and offsets [K * B + 1],
bag (k, b) = ``values[offsets[k * B + b] : offsets[k * B + b + 1]]``. A layer with features ``names`` matches
the keys by name (TorchRec's EmbeddingBagCollection does the same; keys without a feature are ignored) and needs
values / offsets / weights in its own feature order:

    new bag (f, b) = old bag (order[f], b),   order[f] = keys.index(names[f])

Used by ``nn.ScenarioEmbedding``, ``quantized.QuantizedScenarioEmbedding`` (through the layer's methods) and
``torchrec.TorchRecScenarioEmbedding`` (which reorders with TorchRec's own ``KeyedJaggedTensor.permute``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .graphs import host_read
from .ops import _checks


def is_kjt(x) -> bool:
    """True for a KeyedJaggedTensor-like input (not a Tensor, has ``keys``, ``values`` and ``offsets``)."""
    return not isinstance(x, Tensor) and all(hasattr(x, a) for a in ("keys", "values", "offsets"))


def split_call(who: str, offsets, scenario):
    """The ``forward(kjt, scenario)`` convention: (offsets, scenario) as the layer's ``forward(indices, offsets,
    scenario)`` received them with a KJT as ``indices``, returned as (None, scenario). TypeError when offsets are
    passed beside a KJT (they come from the KJT)."""
    if scenario is None:  # forward(kjt, scenario)
        offsets, scenario = None, offsets
    if offsets is not None:
        raise TypeError(f"{who}: with a KeyedJaggedTensor input pass forward(kjt, scenario); offsets come from the "
                        "KeyedJaggedTensor")
    return None, scenario


def check_keys(who: str, kjt, names: list) -> list:
    """The KJT's keys as a list, after checking it has one stride (ValueError for a variable-batch KJT) and a key
    for every name in ``names`` (ValueError naming the missing ones)."""
    variable = getattr(kjt, "variable_stride_per_key", None)
    if callable(variable) and variable():
        raise ValueError(f"{who}: variable-batch KeyedJaggedTensors (a stride per key) are not supported: every "
                         "feature needs the same batch size B (one scenario id per sample)")
    keys = list(kjt.keys())
    missing = [n for n in names if n not in keys]
    if missing:
        raise ValueError(f"{who}: KeyedJaggedTensor keys {keys} lack the layer's feature(s) {missing}")
    return keys


def reorder(who: str, kjt, names: list, cache: dict) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(values, offsets, weights or None) of ``kjt`` in the order of ``names``. Keys already in that order cost
    nothing; the same keys in another order are gathered on the device (no host read: CUDA-graph capturable);
    extra keys cost one host read of the offsets to cut the values. ``cache`` (a dict the caller keeps) holds the
    order tensors per (order, device)."""
    keys = check_keys(who, kjt, names)
    values, offsets = kjt.values(), kjt.offsets()
    weights = kjt.weights_or_none() if hasattr(kjt, "weights_or_none") else None
    if keys == names:
        return values, offsets, weights
    K = len(keys)
    if offsets.numel() < 1 or (offsets.numel() - 1) % K:
        raise ValueError(f"{who}: KeyedJaggedTensor offsets must have len(keys) * B + 1 entries "
                         f"(len(keys) = {K}), got {offsets.numel()}")
    B = (offsets.numel() - 1) // K
    order = [keys.index(n) for n in names]
    lengths = offsets[1:] - offsets[:-1]
    new_lengths = lengths.view(K, B)[key_order(cache, order, offsets.device)].reshape(-1)
    new_offsets = torch.zeros(len(names) * B + 1, dtype=offsets.dtype, device=offsets.device)
    torch.cumsum(new_lengths, 0, out=new_offsets[1:])
    if K == len(names):  # a permutation of the layer's keys: same entries, gathered on the device
        src = permuted_entries(cache, offsets, new_offsets, order, B, values.numel())
        return values[src], new_offsets, (weights[src] if weights is not None else None)
    host_read(f"{who}: a KeyedJaggedTensor with keys the layer has no feature for "
              f"({sorted(set(keys) - set(names))}) is cut by a host read of its offsets; pass only the "
              f"layer's keys", offsets.device)
    cuts = offsets[torch.arange(K + 1, device=offsets.device) * B].tolist()
    pick = lambda t: torch.cat([t[cuts[k]:cuts[k + 1]] for k in order])  # noqa: E731
    return pick(values), new_offsets, (pick(weights) if weights is not None else None)


def key_order(cache: dict, order: list, device) -> Tensor:
    """``order`` (the KJT key index of each layer feature) as an int64 tensor on ``device``, cached in ``cache``
    per order and device. Built by scalar fills (kernels with the value as an argument), not a host-to-device copy,
    so it is capture-safe too."""
    key = (tuple(order), _checks.device_key(device))
    t = cache.get(key)
    if t is None:
        t = torch.empty(len(order), dtype=torch.int64, device=device)
        for i, k in enumerate(order):
            t.narrow(0, i, 1).fill_(k)
        cache[key] = t
    return t


def permuted_entries(cache: dict, offsets: Tensor, new_offsets: Tensor, order: list, B: int, nnz: int) -> Tensor:
    """int64 [nnz]: the source entry of every entry of the reordered values, all on the device. Entry p lies in
    new bag j = (layer feature f, sample b) (a search in the new offsets); its source is the same position in
    bag (order[f], b) of the KJT. Clamped into range, so malformed offsets read no entry out of bounds (the
    op's offsets check then reports them)."""
    if nnz == 0 or new_offsets.numel() <= 1:
        return torch.zeros(0, dtype=torch.int64, device=offsets.device)
    dev = offsets.device
    off = offsets.long()
    new_off = new_offsets.long()
    nb = new_off.numel() - 1
    pos = torch.arange(nnz, device=dev)
    bag = torch.searchsorted(new_off[1:], pos, right=True).clamp_(max=nb - 1)
    src_bag = (key_order(cache, order, dev)[:, None] * B + torch.arange(B, device=dev)).reshape(-1)
    src = off[src_bag[bag]] + (pos - new_off[bag])
    return src.clamp_(0, nnz - 1)
