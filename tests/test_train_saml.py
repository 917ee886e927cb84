"""python/train_saml.py: a --path implies or requires its data kind (never a silent fall-back to synthetic data),
the protocol's output on a small MovieLens folder and on synthetic data, and
bench_model.py --data movielens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_movielens import _tables, _write_official

ROOT = Path(__file__).resolve().parents[1]
ALI = ROOT / "data" / "ali_ccp" / "ali_ccp_train_sample.csv"
sys.path.insert(0, str(ROOT / "python"))
import train_saml  # noqa: E402


def test_path_implies_its_data_kind(tmp_path):
    folder = _write_official(tmp_path / "ml-100k", *_tables())
    assert train_saml.parse_args(["--path", str(ALI)]).data == "ali_ccp"
    assert train_saml.parse_args(["--path", str(folder)]).data == "movielens"
    assert train_saml.parse_args(["--data", "movielens", "--path", str(folder)]).data == "movielens"
    assert train_saml.parse_args([]).data == "auto"


@pytest.mark.parametrize("argv, match", [
    (["--data", "synthetic", "--path", "ALI"], "--data synthetic, which reads no file"),
    (["--data", "movielens", "--path", "ALI"], "looks like ali_ccp data"),
    (["--data", "ali_ccp", "--path", "FOLDER"], "looks like movielens data"),
    (["--path", "OTHER"], "cannot tell its data kind"),
    (["--path", "MISSING"], "no such file or folder"),
    (["--data", "movielens", "--val-path", "ALI"], "--val-path is an Ali-CCP option"),
    (["--lr-grid", "1e-3"], "--lr-grid"),
])
def test_path_that_the_data_kind_cannot_use_is_an_error(tmp_path, capsys, argv, match):
    other = tmp_path / "ratings.txt"
    other.write_text("x")
    paths = {"ALI": str(ALI), "FOLDER": str(tmp_path), "OTHER": str(other), "MISSING": str(tmp_path / "nope.csv")}
    with pytest.raises(SystemExit) as e:
        train_saml.parse_args([paths.get(a, a) for a in argv])
    assert e.value.code == 2 and match in capsys.readouterr().err


def _run(args, cwd=ROOT, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "python" / "train_saml.py"), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


SMALL = ["--batch-size", "128", "--hidden", "8", "--embedding-dim", "4", "--throughput-steps", "0", "--threads", "1"]


def test_movielens_protocol_end_to_end(tmp_path):
    folder = _write_official(tmp_path / "ml-100k", *_tables(n=1500))
    out = _run(["--path", str(folder), "--seeds", "2", "--epochs", "3", "--patience", "1", "--lr-grid", "1e-3:0.02",
                "3e-3:0.05", "--out", str(tmp_path / "o"), *SMALL])
    assert "official ml-100k folder" in out and "mean ± sd over 2 seeds" in out and "scenario" in out
    (run,) = list((tmp_path / "o").iterdir())
    s = json.loads((run / "summary.json").read_text())
    res = s["datasets"]["movielens"]
    assert res["features"][-1] == "scenario"  # the scenario as a feature for every model (Scenario-Wise-Rec)
    for name, m in res["models"].items():
        assert len(m["test_auc"]) == 2 and set(m["test_auc"][0]) == {"overall", "age<25", "age25-34", "age>=35"}
        assert all(1 <= e <= 3 for e in m["epoch"]) and all(lr in ([1e-3, 0.02], [3e-3, 0.05]) for lr in m["lr"])
        assert m["params"] > 0 and all(v > 0 for v in m["samples_per_s"])
        assert len(m["diff_to_shared_bottom"]) == 2
    assert all(d["overall"] == 0 for d in res["models"]["shared-bottom"]["diff_to_shared_bottom"])


def test_synthetic_runs_both_strengths_with_the_bayes_auc(tmp_path):
    out = _run(["--data", "synthetic", "--samples", "3000", "--epochs", "1", "--lr-grid", "3e-3:0.05", "--out",
                str(tmp_path), "--models", "SAML", "shared-bottom", *SMALL])
    assert "specific_strength 1" in out and "specific_strength 0" in out and out.count("Bayes (true logit)") == 2


def test_bench_model_on_movielens(tmp_path):
    """--data movielens; skipped when MovieLens-100K is not cached (the benchmark fetches it otherwise)."""
    from saml_kernels.data import movielens as ml
    try:
        ml.read_raw()
    except ml.MovieLensUnavailable as e:
        pytest.skip(f"MovieLens-100K is not cached: {e}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--model", "saml", "star",
                        "hmoe", "--data", "movielens", "--quick", "--reps", "1", "--batch", "128", "--out-dir",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| HMoE | float32 | 128 | reference eager |" in r.stdout and "MovieLens-100K" in r.stdout
    assert any(p.name.endswith("_movielens_quick.md") for p in tmp_path.iterdir())


def test_default_falls_back_to_synthetic_with_one_line(tmp_path, monkeypatch):
    """No --data, no --path, MovieLens not to be had (a cache folder that cannot be created: no download tried):
    one line naming where it looked, then synthetic data."""
    monkeypatch.setenv("SAML_MOVIELENS_CACHE", "/proc/no-such-dir/movielens")
    out = _run(["--samples", "2000", "--epochs", "1", "--lr-grid", "3e-3:0.05", "--specific-strength", "1",
                "--models", "SAML", "shared-bottom", "--out", str(tmp_path), *SMALL])
    first = out.splitlines()[0]
    assert first.startswith("train_saml.py: MovieLens-100K cannot be had, training on synthetic data instead")
    assert "/proc/no-such-dir/movielens" in first and "synthetic (2000 samples" in out
