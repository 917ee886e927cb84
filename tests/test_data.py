"""saml_kernels.data: synthetic generator determinism and layout, Ali-CCP loader on the real rows and on broken files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from saml_kernels.data import AliCCPFormatError, load_ali_ccp, make_synthetic

ALI = Path(__file__).resolve().parents[1] / "data" / "ali_ccp"  # shipped with the repository
TRAIN = ALI / "ali_ccp_train_sample.csv"
VAL = ALI / "ali_ccp_val_sample.csv"
def test_ali_ccp_sample_rows_ship_with_the_repository():
    assert TRAIN.exists() and VAL.exists() and (ALI.parent / "LICENSE.Scenario-Wise-Rec").exists()


def _arrays(d):
    return [d.scenario, d.label, d.dense, d.seq_ids, d.seq_lengths, *d.values, *d.lengths]


def test_synthetic_deterministic_by_seed():
    a, b, c = make_synthetic(3000, seed=7), make_synthetic(3000, seed=7), make_synthetic(3000, seed=8)
    for x, y in zip(_arrays(a), _arrays(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.label, c.label) or not np.array_equal(a.values[0], c.values[0])
    ba, bb = a.batch(np.arange(100, 300)), b.batch(np.arange(100, 300))
    for f in ("indices", "offsets", "scenario", "label", "dense", "seq_ids", "seq_lengths"):
        assert torch.equal(getattr(ba, f), getattr(bb, f))


def test_synthetic_scenario_mix_and_signal():
    d = make_synthetic(40000, scenario_mix=(0.7, 0.2, 0.05, 0.05), seed=1)
    frac = d.scenario_counts() / len(d)
    np.testing.assert_allclose(frac, [0.7, 0.2, 0.05, 0.05], atol=0.01)
    assert 0.05 < d.label.mean() < 0.6
    # Zipf ids: the most frequent user is far above the uniform rate
    assert np.bincount(d.values[0]).max() > 20 * len(d) / d.features[0].num_embeddings
    # some sequences are all padding, padding is id 0, real positions are ids >= 1
    L = d.sequence.length
    pad = np.arange(L)[None] >= d.seq_lengths[:, None]
    assert (d.seq_lengths == 0).any() and (d.seq_ids[pad] == 0).all() and (d.seq_ids[~pad] >= 1).all()
    with pytest.raises(ValueError, match="scenario_mix"):
        make_synthetic(10, scenario_mix=(1.0, 0.0), num_scenarios=4)
    with pytest.raises(ValueError, match="num_scenarios"):
        make_synthetic(10, num_scenarios=0)


def test_batch_layout_feature_major():
    d = make_synthetic(500, seed=3)
    rows = np.array([5, 0, 499, 17, 17, 230])
    b = d.batch(rows)
    F, B = len(d.features), len(rows)
    assert b.offsets.shape == (F * B + 1,) and int(b.offsets[0]) == 0 and int(b.offsets[-1]) == b.indices.numel()
    assert b.indices.dtype == torch.int64 and b.offsets.dtype == torch.int64
    for f in range(F):
        starts = np.cumsum(d.lengths[f]) - d.lengths[f]
        for j, r in enumerate(rows):
            want = d.values[f][starts[r]:starts[r] + d.lengths[f][r]]
            got = b.indices[b.offsets[f * B + j]:b.offsets[f * B + j + 1]].numpy()
            np.testing.assert_array_equal(got, want)
            assert (got < d.features[f].num_embeddings).all()
    assert torch.equal(b.scenario, torch.from_numpy(d.scenario[rows]))
    assert b.seq_ids.shape == (B, d.sequence.length) and len(b) == B
    # tags is a bag feature with empty bags somewhere
    assert (d.lengths[5] == 0).any() and (d.lengths[5] > 1).any()


def test_split_and_batches_cover_everything():
    d = make_synthetic(1000, seed=2)
    tr, ho = d.split(0.25, seed=4)
    assert len(tr) == 750 and len(ho) == 250
    n = sum(len(b) for b in tr.batches(128, shuffle=True, seed=1))
    assert n == 750
    assert sum(len(b) for b in tr.batches(128, drop_last=True)) == 640
    assert int(tr.label.sum() + ho.label.sum()) == int(d.label.sum())


# ------------------------------------------------------------------------------------------------ Ali-CCP

def test_ali_ccp_real_rows():
    tr, vocab = load_ali_ccp(TRAIN)
    header = TRAIN.read_text().splitlines()[0].split(",")
    n_rows = len(TRAIN.read_text().strip().splitlines()) - 1
    assert len(tr) == n_rows
    dense_cols = [h for h in header if h.startswith("D")]
    sparse_cols = [h for h in header if h not in ("click", "purchase", "301") and not h.startswith("D")]
    assert [f.name for f in tr.features] == sparse_cols and tr.dense.shape == (n_rows, len(dense_cols))
    assert set(np.unique(tr.scenario)) == set(range(tr.num_scenarios)) and tr.num_scenarios == len(vocab.scenario)
    assert set(np.unique(tr.label)) <= {0.0, 1.0} and set(np.unique(tr.purchase)) <= {0.0, 1.0}
    # vocabularies from the data: every id in 1..n, size n + 1 (0 = unseen)
    for f, v in zip(tr.features, tr.values):
        assert v.min() >= 1 and v.max() == f.num_embeddings - 1
    # raw values round-trip: first row, column "205"
    first = dict(zip(header, TRAIN.read_text().splitlines()[1].split(",")))
    k = sparse_cols.index("205")
    inv = {i: r for r, i in vocab.sparse["205"].items()}
    assert inv[int(tr.values[k][0])] == int(first["205"])
    assert tr.scenario[0] == vocab.scenario[int(first["301"])]
    va, _ = load_ali_ccp(VAL, vocab=vocab)
    assert va.num_scenarios == tr.num_scenarios and all(fv.num_embeddings == ft.num_embeddings
                                                        for fv, ft in zip(va.features, tr.features))
    assert any((v == 0).any() for v in va.values)  # ids unseen in training map to row 0
    b = va.batch(np.arange(len(va)))
    assert b.offsets.shape == (len(va.features) * len(va) + 1,) and b.dense.shape == (len(va), len(dense_cols))


def _write(tmp_path, text, name="x.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


HEADER = "click,purchase,101,205,301,D508\n"


@pytest.mark.parametrize("text, row, column, what", [
    ("click,purchase,101,205,D508\n0,0,1,2,0.5\n", 1, "301", "missing"),
    (HEADER + "0,0,1,2,1,0.5\n1,0,7,abc,2,0.1\n", 3, "205", "integer"),
    (HEADER + "0,0,1,2,x1,0.5\n", 2, "301", "integer"),
    (HEADER + "0,0,1,2,1,nope\n", 2, "D508", "number"),
    (HEADER + "2,0,1,2,1,0.5\n", 2, "click", "0 or 1"),
    (HEADER + "0,0,1,2,1\n", 2, None, "fields"),
    (HEADER, 2, None, "no data rows"),
    ("", 1, None, "empty file"),
])
def test_ali_ccp_malformed(tmp_path, text, row, column, what):
    p = _write(tmp_path, text)
    with pytest.raises(AliCCPFormatError) as ei:
        load_ali_ccp(p)
    msg = str(ei.value)
    assert str(p) in msg and f"row {row}" in msg and what in msg
    if column is not None:
        assert repr(column) in msg


def test_ali_ccp_unknown_scenario_and_missing_file(tmp_path):
    _, vocab = load_ali_ccp(_write(tmp_path, HEADER + "0,0,1,2,1,0.5\n1,0,3,4,2,0.1\n", "a.csv"))
    p = _write(tmp_path, HEADER + "0,0,1,2,9,0.5\n", "b.csv")
    with pytest.raises(AliCCPFormatError, match=r"b\.csv, row 2, column '301'.*scenario value 9"):
        load_ali_ccp(p, vocab=vocab)
    with pytest.raises(FileNotFoundError):
        load_ali_ccp(tmp_path / "absent.csv")
