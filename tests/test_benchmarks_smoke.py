"""The benchmarks run end to end on small sizes (so they cannot rot). Performance is not asserted.

Every test here is a subprocess (marked ``slow``: ``make test-fast`` leaves them out, ``make test`` runs them once).
benchmarks/gpu_check.sh has its own dry-run file (test_gpu_check_dry_run.py)."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8"])
def test_bench_embedding_quick(tmp_path, dtype):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_embedding.py"), "--quick",
                        "--no-compile", "--dtype", dtype, "--out-dir", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ours-" in r.stdout and "eager-embbag" in r.stdout
    written = sorted(p.name for p in tmp_path.iterdir())
    suffix = "" if dtype == "float32" else f"_{dtype}"
    assert any(n.endswith(f"{suffix}_quick.md") for n in written), written
    assert any(n.endswith(f"{suffix}_quick.json") for n in written), written


def test_bench_scaling_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_scaling.py"), "--quick",
                        "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Sweep over M" in r.stdout and "reference eager" in r.stdout and "mutual" in r.stdout
    written = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith("scaling_") and n.endswith("_quick.md") for n in written), written
    assert any(n.endswith("_quick_m.png") for n in written) or "matplotlib" not in sys.modules, written
    assert "Sweep over the global table rows" in r.stdout and "non-fused sparse" in r.stdout  # sweep T


def test_bench_model_family_quick(tmp_path):
    """STAR and HMoE against their eager twins, small batch, no torch.compile."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_model.py"), "--model", "star", "hmoe",
                        "--quick", "--batch", "256", "--out-dir", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| STAR | float32 | 256 | reference eager |" in r.stdout and "| HMoE | float32 | 256 | HMoE |" in r.stdout
    written = sorted(p.name for p in tmp_path.iterdir())
    assert "bench_model_" + ("cpu%d" % os.cpu_count()) + "_quick.md" in written or any(
        n.startswith("bench_model_") and n.endswith("_quick.json") for n in written), written


def test_bench_mutual_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_mutual.py"), "--quick", "--reps", "2",
                        "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for mode in ("fwd", "fwdbwd"):
        for provider in ("ours", "ours_saved", "eager"):
            assert re.search(rf"^{mode} +{provider} +[0-9.]+ ms", r.stdout, re.M), (mode, provider, r.stdout)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith("bench_mutual_") and n.endswith("_quick.json") for n in written), written


def test_bench_branch_gemm_quick(tmp_path):
    """bench_branch_gemm.py with its phase breakdown."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_branch_gemm.py"), "--quick",
                        "--reps", "2", "--mixes", "skewed", "--out-dir", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "## relu_bias route=own fwdbwd skewed" in r.stdout and "| plain |" in r.stdout
    written = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith("_quick.md") for n in written), written
    data = json.loads(next(p for p in tmp_path.iterdir() if p.name.endswith("_quick.json")).read_text())
    results = data["data"]["results"]
    phases = results["relu_bias route=own fwdbwd skewed"]["phases"]
    assert set(phases) == {"forward", "backward dx", "backward dW", "backward db", "backward all", "plain GEMM"}
    assert all(v["ms"] > 0 for v in phases.values())


def test_bench_model_on_movielens(tmp_path):
    """--data movielens; skipped when MovieLens-100K is not cached (the benchmark fetches it otherwise)."""
    from saml_kernels.data import movielens as ml
    try:
        ml.read_raw()
    except ml.MovieLensUnavailable as e:
        pytest.skip(f"MovieLens-100K is not cached: {e}")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_model.py"), "--model", "saml", "star",
                        "hmoe", "--data", "movielens", "--quick", "--reps", "1", "--batch", "128", "--out-dir",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| HMoE | float32 | 128 | reference eager |" in r.stdout and "MovieLens-100K" in r.stdout
    assert any(p.name.endswith("_movielens_quick.md") for p in tmp_path.iterdir())
def test_bench_memory_quick():
    """bench_memory --quick writes into a temporary folder (never benchmarks/results/), and its bytes are the
    tensors' own: bfloat16 tables are half of float32's, hashed scenario tables have ceil(ids / k) rows, 8-bit rows
    (D + 8) / (4 D) = 0.375 at D = 16."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_memory.py"), "--quick"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"^wrote (\S+\.md) and (\S+\.json)$", r.stdout, re.M)
    assert m, r.stdout[-2000:]
    out_dir = os.path.dirname(m.group(1))
    try:
        assert os.path.realpath(out_dir) != os.path.realpath(os.path.join(ROOT, "benchmarks", "results")), out_dir
        text = open(m.group(1)).read()
        # the quick data: global rows 8,647; scenario rows 4 x (2000 users + 3000 items + 3001 sequence ids), hashed
        # to ceil(ids / k) per aware feature
        hashed = lambda k: (8647 + 4 * sum(-(-n // k) for n in (2000, 3000, 3001))) / (8647 + 4 * 8001)  # noqa: E731
        for label, ratio in (("float32", "(1.000)"), ("bfloat16, stochastic rounding (default)", "(0.500)"),
                             ("bfloat16, round to nearest", "(0.500)"),
                             ("hashed scenario tables, 1/4 of the ids", f"({hashed(4):.3f})"),
                             ("hashed scenario tables, 1/16 of the ids", f"({hashed(16):.3f})"),
                             ("8-bit serving (export of the float32 model)", "(0.375)")):
            assert re.search(rf"^\| {re.escape(label)} \|.*\| [0-9.]+ {re.escape(ratio)} \|", text, re.M), (label, text)
    finally:
        import shutil
        shutil.rmtree(out_dir, ignore_errors=True)
