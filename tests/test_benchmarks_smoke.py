"""The benchmarks run end to end on small sizes (so they cannot rot). Performance is not asserted."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
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
    assert "model_family_" + ("cpu%d" % os.cpu_count()) + "_quick.md" in written or any(
        n.startswith("model_family_") and n.endswith("_quick.json") for n in written), written


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
