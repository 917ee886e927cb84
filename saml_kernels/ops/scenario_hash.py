"""Hashed scenario tables: the id -> scenario-row hash, torch twin of ``saml::seb_id_hash`` /
``saml::seb_scenario_local`` (csrc/include/saml_common.h) and of the Triton ``_id_hash`` (triton/
scenario_embedding_bag.py). docs/design.md, "Hashed scenario tables", has the contract.

A scenario-aware feature f has Rg_f ids (its global rows) and 1 <= Rs_f <= Rg_f rows in each scenario table. A
valid id's scenario row is ``feature_scenario_rows[f] + local(id)`` with, on uint32 words (arithmetic mod 2^32,
``mix`` = murmur3's fmix32, ``ops/stochastic_rounding.mix32``):

    local(id) = id                                     if Rs_f == Rg_f   (bitwise the unhashed layout)
              = hash(id) mod Rs_f                      if Rs_f <  Rg_f   (then Rs_f < 2^32)
    hash(id)  = mix(mix(id & 0xFFFFFFFF) ^ (id >> 32))                     (id a non-negative int64)

int32 and int64 ids give the same bits (an id is its int64 value). Every backend, the reference, the 8-bit op's
FBGEMM path and the TorchRec adapter compute it; ``tests/test_hashed_scenario_rows.py`` checks the twins agree.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch import Tensor

from .stochastic_rounding import mix32

_M32 = 0xFFFFFFFF
#: a hashed feature's scenario rows must stay below this (the hash is a uint32)
MAX_HASHED_ROWS = 1 << 32


def id_hash(ids: Tensor) -> Tensor:
    """int64 tensor of uint32 values: ``mix(mix(lo32(id)) ^ hi32(id))`` of the (non-negative) int64 ids."""
    ids = ids.to(torch.int64)
    return mix32(mix32(ids & _M32) ^ ((ids >> 32) & _M32))


def scenario_local(ids: Tensor, rows: int, scenario_rows: int) -> Tensor:
    """int64 scenario-local rows of valid ids of a feature with ``rows`` ids and ``scenario_rows`` scenario rows:
    the ids themselves when the two agree, else ``id_hash(ids) mod scenario_rows``."""
    if scenario_rows == rows:
        return ids.to(torch.int64)
    return id_hash(ids) % scenario_rows


def scenario_local_by_feature(ids: Tensor, feat: Tensor, feature_rows: Tensor, feature_scenario_rows: Tensor) -> Tensor:
    """Per-entry ``local(id)`` for entries of features ``feat`` (int64 [nnz], any feature; entries of non-aware
    features and invalid ids give meaningless values the callers mask). ``feature_rows`` / ``feature_scenario_rows``
    are the [F+1] cumulative starts (int64 tensors on ids' device)."""
    ids = ids.to(torch.int64)
    rg = (feature_rows[1:] - feature_rows[:-1])[feat]
    rs = (feature_scenario_rows[1:] - feature_scenario_rows[:-1])[feat]
    hashed = id_hash(ids) % rs.clamp(min=1)
    return torch.where(rs == rg, ids, hashed)


def is_hashed(feature_rows: Sequence[int], feature_scenario_rows: Sequence[int]) -> bool:
    """Whether any aware feature of the layout has fewer scenario rows than ids."""
    return any(0 < s1 - s0 < g1 - g0 for g0, g1, s0, s1 in zip(feature_rows[:-1], feature_rows[1:],
                                                               feature_scenario_rows[:-1], feature_scenario_rows[1:]))


def check_scenario_rows(who: str, features: Sequence, scenario_rows) -> dict:
    """The ``scenario_rows`` option of a layer (or config) checked against its features: None or a mapping feature
    name -> Rs_f, an int with 1 <= Rs_f <= the feature's num_embeddings (and < 2^32 when smaller), given only for
    scenario-aware features. ``features``: (name, num_embeddings, scenario_aware, ...) tuples. Returns a plain dict
    (name -> int); ValueError naming ``who``, the feature and the value otherwise (raised before anything is built).
    """
    if scenario_rows is None:
        return {}
    if not hasattr(scenario_rows, "items"):
        raise ValueError(f"{who}: scenario_rows must be a mapping feature name -> scenario rows (or None), got "
                         f"{scenario_rows!r}")
    spec = {str(f[0]): (int(f[1]), bool(f[2]) if len(f) > 2 else False) for f in features}
    out = {}
    for name, rows in scenario_rows.items():
        if name not in spec:
            raise ValueError(f"{who}: scenario_rows names feature {name!r}, which is not one of {sorted(spec)}")
        n, aware = spec[name]
        if not aware:
            raise ValueError(f"{who}: scenario_rows gives feature {name!r} {rows!r} rows, but it is not "
                             f"scenario-aware (it has no scenario tables)")
        try:  # int, numpy or 0-dim torch integer; never bool or float
            r = None if isinstance(rows, bool) or (isinstance(rows, Tensor) and rows.dtype == torch.bool) \
                else operator.index(rows)
        except TypeError:
            r = None
        if r is None or not 1 <= r <= n or (r < n and r >= MAX_HASHED_ROWS):
            raise ValueError(f"{who}: feature {name!r}: scenario_rows must be an int in [1, num_embeddings = {n}] "
                             f"(the scenario tables' rows; fewer than its ids hashes them), got {rows!r}")
        out[name] = int(r)
    return out
