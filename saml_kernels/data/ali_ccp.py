"""Loader for Ali-CCP-format CSV (the Alibaba Click and Conversion Prediction set, as multi-scenario
benchmarks preprocess it).

Columns (header row, any order): ``click``, ``purchase`` (0/1 labels), the scenario column ``301`` (raw values
mapped to 0..M-1 in sorted order), dense columns whose name starts with ``D`` (floats), and every other column a
sparse id feature (one integer id per row). Vocabularies are built from the data: raw id -> 1..n in sorted
order, and index 0 is kept for ids unseen when the vocabulary was built (so a held-out file loaded with the
training vocabulary maps new ids to 0 instead of failing). Malformed input raises :class:`AliCCPFormatError`
naming the file, the row (1-based line number in the file) and the column.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Optional, Sequence

import numpy as np

from .batch import CTRData, FeatureSpec

LABELS = ("click", "purchase")
SCENARIO_COLUMN = "301"
DEFAULT_AWARE = ("101", "205", "206")  # user id, item id, item category: the features worth per-scenario tables


class AliCCPFormatError(ValueError):
    """A malformed Ali-CCP CSV: the message names the file, the row and the column."""


@dataclasses.dataclass
class AliCCPVocab:
    """Per-column raw-id -> index maps (index 0 = unseen) and the scenario value -> 0..M-1 map."""

    sparse: dict
    scenario: dict

    def sizes(self) -> dict:
        return {c: len(m) + 1 for c, m in self.sparse.items()}


def _fail(path, line, column, msg):
    where = f"{path}, row {line}" + (f", column {column!r}" if column is not None else "")
    raise AliCCPFormatError(f"{where}: {msg}")


def _read(path: str):
    """(header, rows of strings, first data line number); checks shape and the required columns."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Ali-CCP file not found: {path}")
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or not [h for h in header if h.strip()]:
            _fail(path, 1, None, "empty file (expected a header row with click, purchase, 301, ... columns)")
        header = [h.strip() for h in header]
        missing = [c for c in (*LABELS, SCENARIO_COLUMN) if c not in header]
        if missing:
            _fail(path, 1, missing[0], f"missing required column(s) {missing} in the header {header}")
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            _fail(path, 1, dup[0], f"duplicate column(s) {dup}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row or all(not v.strip() for v in row):
                continue  # blank line (a trailing newline)
            if len(row) != len(header):
                _fail(path, line, None, f"has {len(row)} fields but the header has {len(header)}")
            rows.append((line, row))
    if not rows:
        _fail(path, 2, None, "no data rows after the header")
    return header, rows


def _int(path, line, col, text):
    try:
        v = float(text) if ("." in text or "e" in text.lower()) else int(text)
    except ValueError:
        _fail(path, line, col, f"expected an integer id, got {text!r}")
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            _fail(path, line, col, f"expected an integer id, got {text!r}")
        v = int(v)
    return v


def load_ali_ccp(path: str, *, vocab: Optional[AliCCPVocab] = None,
                 aware: Sequence[str] = DEFAULT_AWARE) -> tuple[CTRData, AliCCPVocab]:
    """Load one Ali-CCP CSV file.

    Args:
        path: the CSV file.
        vocab: vocabularies of a previous load (the training file) to reuse; None builds them from this file.
            A scenario value absent from a given vocab is an error (the model has no branch for it).
        aware: sparse columns that get scenario-specific tables (those present in the file).

    Returns:
        (CTRData with every sparse column as a one-id feature in header order, label = click, purchase, dense
        = the D columns; the vocabulary used).
    """
    path = os.fspath(path)
    header, rows = _read(path)
    col = {h: j for j, h in enumerate(header)}
    dense_cols = [h for h in header if h.startswith("D")]
    sparse_cols = [h for h in header if h not in (*LABELS, SCENARIO_COLUMN) and h not in dense_cols]
    n = len(rows)
    raw = np.zeros((n, len(sparse_cols)), dtype=np.int64)
    dense = np.zeros((n, len(dense_cols)), dtype=np.float32)
    labels = np.zeros((n, 2), dtype=np.float32)
    scen_raw = np.zeros(n, dtype=np.int64)
    for r, (line, row) in enumerate(rows):
        for k, c in enumerate(LABELS):
            v = _int(path, line, c, row[col[c]].strip())
            if v not in (0, 1):
                _fail(path, line, c, f"label must be 0 or 1, got {row[col[c]]!r}")
            labels[r, k] = v
        scen_raw[r] = _int(path, line, SCENARIO_COLUMN, row[col[SCENARIO_COLUMN]].strip())
        for k, c in enumerate(sparse_cols):
            raw[r, k] = _int(path, line, c, row[col[c]].strip())
        for k, c in enumerate(dense_cols):
            text = row[col[c]].strip()
            try:
                v = float(text)
            except ValueError:
                _fail(path, line, c, f"expected a number, got {text!r}")
            if not math.isfinite(v):
                _fail(path, line, c, f"expected a finite number, got {text!r}")
            dense[r, k] = v

    if vocab is None:
        vocab = AliCCPVocab(
            sparse={c: {int(v): i + 1 for i, v in enumerate(np.unique(raw[:, k]))} for k, c in enumerate(sparse_cols)},
            scenario={int(v): i for i, v in enumerate(np.unique(scen_raw))})
    else:
        absent = [c for c in vocab.sparse if c not in col]
        if absent:
            _fail(path, 1, absent[0], f"column(s) {absent} of the given vocabulary are missing from the header")
    ids = np.zeros_like(raw)
    for k, c in enumerate(sparse_cols):
        m = vocab.sparse.get(c)
        if m is None:
            _fail(path, 1, c, "column not in the given vocabulary")
        ids[:, k] = [m.get(int(v), 0) for v in raw[:, k]]
    scenario = np.zeros(n, dtype=np.int64)
    for r, v in enumerate(scen_raw):
        s = vocab.scenario.get(int(v))
        if s is None:
            _fail(path, rows[r][0], SCENARIO_COLUMN,
                  f"scenario value {int(v)} is not one of the known scenarios {sorted(vocab.scenario)}")
        scenario[r] = s

    sizes = vocab.sizes()
    feats = [FeatureSpec(c, sizes[c], c in aware, "sum") for c in sparse_cols]
    ones = np.ones(n, dtype=np.int64)
    data = CTRData(features=feats, values=[ids[:, k].copy() for k in range(len(sparse_cols))],
                   lengths=[ones] * len(sparse_cols), scenario=scenario, label=labels[:, 0],
                   num_scenarios=len(vocab.scenario), purchase=labels[:, 1],
                   dense=dense if dense_cols else None, dense_names=tuple(dense_cols),
                   scenario_names=tuple(f"301={v}" for v in sorted(vocab.scenario)))
    return data, vocab
