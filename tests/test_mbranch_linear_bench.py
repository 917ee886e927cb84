"""The M-branch GEMM benchmark (benchmarks/bench_branch_gemm.py) runs end to end on small sizes, phase breakdown
included, so it cannot rot. Performance is not asserted."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_branch_gemm_quick(tmp_path):
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
