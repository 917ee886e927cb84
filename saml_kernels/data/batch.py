"""Tabular multi-scenario CTR data and the batches the layers take.

A :class:`CTRData` holds N samples column-wise in numpy: every sparse feature as a ragged column (``values`` +
per-sample ``lengths``), the scenario id, the labels, optional dense columns and an optional fixed-length
behaviour sequence. :meth:`CTRData.batch` turns rows into a :class:`Batch` in the layout of
``saml_kernels.scenario_embedding_bag`` / ``nn.ScenarioEmbedding``: ids of all features concatenated
*feature-major* with ``offsets [F*B + 1]`` (bag (f, b) = ``indices[offsets[f*B+b] : offsets[f*B+b+1]]``,
TorchRec KeyedJaggedTensor order).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


class FeatureSpec(NamedTuple):
    """A sparse feature: ``(name, num_embeddings, scenario_aware, pooling)`` (the ScenarioEmbedding tuple)."""

    name: str
    num_embeddings: int
    scenario_aware: bool = False
    pooling: str = "sum"


class SequenceSpec(NamedTuple):
    """The behaviour sequence: ``length`` ids per sample from a table of ``num_embeddings`` rows.

    Positions ``>= seq_lengths[b]`` are padding (id 0, masked out by the attention)."""

    name: str
    num_embeddings: int
    length: int
    scenario_aware: bool = True


@dataclasses.dataclass
class Batch:
    """One mini-batch of B samples in the layers' layout.

    indices [nnz] int64 feature-major ids (local to each feature); offsets [F*B + 1] int64;
    scenario [B] int64 in [0, M); label [B] float32 (click); purchase [B] float32 or None;
    dense [B, Nd] float32 or None; seq_ids [B, L] int64 or None; seq_lengths [B] int64 or None.
    """

    indices: Tensor
    offsets: Tensor
    scenario: Tensor
    label: Tensor
    purchase: Optional[Tensor] = None
    dense: Optional[Tensor] = None
    seq_ids: Optional[Tensor] = None
    seq_lengths: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.scenario.shape[0])

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def inputs(self) -> tuple:
        """The model's positional inputs: (indices, offsets, scenario, seq_ids, seq_lengths, dense)."""
        return self.indices, self.offsets, self.scenario, self.seq_ids, self.seq_lengths, self.dense


def _gather_ragged(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Concatenate ``values[starts[r] : starts[r] + lengths[r]]`` for r in rows, vectorised."""
    lens = lengths[rows]
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    if (lens == 1).all():  # one-hot fast path (most CTR features)
        return values[starts[rows]]
    out_start = np.cumsum(lens) - lens
    pos = np.repeat(starts[rows] - out_start, lens) + np.arange(total)
    return values[pos]


@dataclasses.dataclass
class CTRData:
    """N samples of multi-scenario CTR data, column-wise (numpy).

    features: the sparse features, in column order; values[f] [nnz_f] int64 ids in [0, num_embeddings_f),
    lengths[f] [N] int64 bag sizes. scenario [N] int64 in [0, num_scenarios). label / purchase [N] float32.
    dense [N, Nd] float32 or None. sequence: SequenceSpec or None with seq_ids [N, L], seq_lengths [N].
    Not model inputs: timestamp [N] int64 or None (time-ordered data sets, for the time split); logit [N] float64
    or None (synthetic data: the true click logit, whose AUC is the Bayes AUC).
    """

    features: list
    values: list
    lengths: list
    scenario: np.ndarray
    label: np.ndarray
    num_scenarios: int
    purchase: Optional[np.ndarray] = None
    dense: Optional[np.ndarray] = None
    dense_names: tuple = ()
    sequence: Optional[SequenceSpec] = None
    seq_ids: Optional[np.ndarray] = None
    seq_lengths: Optional[np.ndarray] = None
    scenario_names: tuple = ()
    timestamp: Optional[np.ndarray] = None
    logit: Optional[np.ndarray] = None

    def __post_init__(self):
        self._starts = [np.cumsum(l) - l for l in self.lengths]

    def __len__(self) -> int:
        return int(self.scenario.shape[0])

    @property
    def num_dense(self) -> int:
        return 0 if self.dense is None else int(self.dense.shape[1])

    def subset(self, rows: np.ndarray) -> "CTRData":
        """A new CTRData holding ``rows`` (e.g. a train / held-out split)."""
        rows = np.asarray(rows, dtype=np.int64)
        vals = [_gather_ragged(v, s, l, rows) for v, s, l in zip(self.values, self._starts, self.lengths)]
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return CTRData(self.features, vals, [l[rows] for l in self.lengths], self.scenario[rows], self.label[rows],
                       self.num_scenarios, pick(self.purchase), pick(self.dense), self.dense_names, self.sequence,
                       pick(self.seq_ids), pick(self.seq_lengths), self.scenario_names, pick(self.timestamp),
                       pick(self.logit))

    def with_scenario_feature(self, name: str = "scenario") -> "CTRData":
        """A copy with the scenario id appended as a one-id sparse feature of ``num_scenarios`` rows (as the
        ``domain_indicator`` feature of Scenario-Wise-Rec), so scenario-blind models see it."""
        if name in feature_names(self.features):
            raise ValueError(f"CTRData.with_scenario_feature: a feature named {name!r} exists already")
        out = dataclasses.replace(self, features=[*self.features, FeatureSpec(name, self.num_scenarios)],
                                  values=[*self.values, self.scenario.astype(np.int64)],
                                  lengths=[*self.lengths, np.ones(len(self), dtype=np.int64)])
        return out

    def split(self, holdout: float, seed: int = 0) -> tuple["CTRData", "CTRData"]:
        """(train, held-out) random split, deterministic by seed."""
        perm = np.random.default_rng(seed).permutation(len(self))
        n_hold = int(round(len(self) * holdout))
        return self.subset(np.sort(perm[n_hold:])), self.subset(np.sort(perm[:n_hold]))

    def batch(self, rows: np.ndarray) -> Batch:
        """Rows -> a :class:`Batch` (feature-major indices + offsets)."""
        rows = np.asarray(rows, dtype=np.int64)
        B = rows.shape[0]
        parts, lens = [], []
        for v, s, l in zip(self.values, self._starts, self.lengths):
            parts.append(_gather_ragged(v, s, l, rows))
            lens.append(l[rows])
        lengths = np.concatenate(lens) if lens else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(self.features) * B + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        t = torch.from_numpy
        return Batch(
            indices=t(np.concatenate(parts).astype(np.int64, copy=False)),
            offsets=t(offsets),
            scenario=t(self.scenario[rows].astype(np.int64)),
            label=t(self.label[rows].astype(np.float32)),
            purchase=None if self.purchase is None else t(self.purchase[rows].astype(np.float32)),
            dense=None if self.dense is None else t(np.ascontiguousarray(self.dense[rows], dtype=np.float32)),
            seq_ids=None if self.seq_ids is None else t(np.ascontiguousarray(self.seq_ids[rows])),
            seq_lengths=None if self.seq_lengths is None else t(self.seq_lengths[rows].astype(np.int64)),
        )

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[Batch]:
        """Iterate over mini-batches (shuffled deterministically by seed when asked)."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        for i in range(0, stop, batch_size):
            yield self.batch(order[i:i + batch_size])

    def scenario_counts(self) -> np.ndarray:
        return np.bincount(self.scenario, minlength=self.num_scenarios)


def feature_names(features: Sequence) -> list:
    return [f[0] for f in features]
