"""benchmarks/gpu_check.sh (the one device run) dry-run here, with its GPU parts stubbed and tiny caps.

What a device session depends on and cannot debug there (15 minutes of device time): the summary's last lines say
what passed, failed and did not run, and which results files were written; a failing step makes the script exit
non-zero and the others still run; a hanging step is cut by its cap (its processes killed) and the total budget
holds; the benchmarks accept the flags the script passes; results files are named by the device; the sanitizer
driver's Python runs and covers every op csrc/cuda registers. The script runs with stub tests, a stub driver and
stub benchmarks (GPU_CHECK_* switches), so each run takes seconds; the real driver runs in-process on the CPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check_lib  # noqa: E402
import gpu_sanitize_driver as driver  # noqa: E402
import harness  # noqa: E402

BENCH_OK = """import argparse, os
ap = argparse.ArgumentParser()
for f in ("--gpu", "--quick", "--no-compile"):
    ap.add_argument(f, action="store_true")
ap.add_argument("--budget-s", type=float, required=True)
ap.add_argument("--out-dir", required=True)
a = ap.parse_args()
assert a.no_compile and (a.gpu or a.quick)
open(os.path.join(a.out_dir, "stub_h100.md"), "w").write("| a |\\n| 1 |\\n")
print("wrote", os.path.join(a.out_dir, "stub_h100.md"))
"""
HANG = """import os, sys, time
open(sys.argv[0] + ".pid", "w").write(str(os.getpid()))
print("hanging", flush=True)
time.sleep(120)
"""
DRIVER_OK = "print('gpu_sanitize_driver: 3 cases, 0 failed, 0 ops without a case, 0 skipped, 0.0 s -> OK')\n"
# memcheck's call (parts direct,api) finds an error; racecheck's (direct,api,graph) stops at --stop-at (exit 3)
DRIVER_FAIL = """import sys, time
a = sys.argv
stop = float(a[a.index("--stop-at") + 1])
assert "--dry-run" in a and stop < time.time() + 15, a  # within the step's cap
if a[a.index("--parts") + 1] == "direct,api,graph":
    print("gpu_sanitize_driver: 2 cases, 0 failed, 0 ops without a case, 0 skipped, 5 not run -> PARTIAL (time)")
    sys.exit(3)
print("gpu_sanitize_driver: 3 cases, 1 failed, 0 ops without a case -> FAILED")
sys.exit(1)
"""
TESTS_OK = "def test_one():\n    assert True\n"
TESTS_BAD = "import time\n\ndef test_fails():\n    assert 1 == 2, 'planted'\n\ndef test_hangs():\n    time.sleep(120)\n"


def _write(d: pathlib.Path, name: str, text: str) -> str:
    p = d / name
    p.write_text(text)
    return str(p)


def _run_script(tmp_path, **env):
    out = tmp_path / "out"
    e = dict(os.environ, PYTHON=sys.executable, OUT=str(out), GPU_CHECK_DRY_RUN="1", GPU_CHECK_ALL_TESTS="1",
             GPU_CHECK_WORKERS="0", GPU_CHECK_MIN_STEP="1", GPU_CHECK_KILL_GRACE="2", GPU_CHECK_BENCH_MARGIN="1")
    e.update(env)
    t0 = time.monotonic()
    p = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # the steps run in process groups of their own (timeout's): end the whole session, then fail
        sids = subprocess.run(["ps", "-o", "pid=", "-s", str(p.pid)], capture_output=True, text=True).stdout.split()
        for pid in map(int, sids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        raise AssertionError("gpu_check.sh outlived 120 s:\n" + stdout[-3000:] + stderr[-2000:])
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), out, time.monotonic() - t0


def _summary_rows(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+(ok|FAILED|TIMEOUT|PARTIAL|skipped|not-run)\s+(\S+)\s+(\d+)", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_dry_run_passes_and_reports_last(tmp_path):
    r, out, _ = _run_script(
        tmp_path, GPU_CHECK_SKIP="env,info,tests_rest", GPU_CHECK_SANITIZERS="memcheck",
        GPU_CHECK_NEW_TESTS=_write(tmp_path, "test_stub_ok.py", TESTS_OK),
        GPU_CHECK_DRIVER=_write(tmp_path, "driver_ok.py", DRIVER_OK),
        GPU_CHECK_BENCHES=_write(tmp_path, "bench_ok.py", BENCH_OK), GPU_CHECK_BUDGET="60")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    lines = r.stdout.rstrip().splitlines()
    # the verdict is in the last lines (the device tool returns only the output's tail)
    assert lines[-1].startswith("RESULT: OK"), lines[-6:]
    assert lines[-2] == "results files (1): stub_h100.md", lines[-6:]
    assert lines[-3] == "not run: env info tests_rest (GPU_CHECK_SKIP)"
    assert lines[-4] == "failed: none"
    assert lines[-5] == "passed: build tests_new memcheck bench:bench_ok"
    rows = _summary_rows(r.stdout)
    assert rows == {"env": "skipped", "build": "ok", "info": "skipped", "tests_new": "ok", "tests_rest": "skipped",
                    "memcheck": "ok", "bench:bench_ok": "ok"}, rows
    assert "1 passed of 1 selected" in r.stdout and "driver: 3 cases, 0 failed" in r.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["all_logs.txt", "bench_results.md", "gpu_results.tar.gz", "summary.txt"]  # <= 8 come back
    assert (out / "summary.txt").read_text().rstrip().splitlines()[-1] == lines[-1]
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        names = tar.getnames()
    assert {"logs/steps.tsv", "logs/tests_new.tsv", "logs/memcheck.log", "logs/results/stub_h100.md"} <= set(names)
    assert "| a |" in (out / "bench_results.md").read_text()


def test_dry_run_failure_hang_and_budget(tmp_path):
    """A failing test, a hanging test (cut at its 6 s cap), a failing sanitizer driver, one stopped for time, a
    required step left no time, a hanging benchmark (cut at 3 s, its process killed): exit 1, each reported, all
    within the budget."""
    hang = _write(tmp_path, "bench_hang.py", HANG)
    r, out, elapsed = _run_script(
        tmp_path, GPU_CHECK_SKIP="env,build,info", GPU_CHECK_SANITIZERS="memcheck racecheck",
        GPU_CHECK_NEW_TESTS=_write(tmp_path, "test_stub_bad.py", TESTS_BAD),
        GPU_CHECK_REST_TESTS=_write(tmp_path, "test_stub_rest.py", TESTS_OK),
        GPU_CHECK_DRIVER=_write(tmp_path, "driver_fail.py", DRIVER_FAIL), GPU_CHECK_BENCHES=hang,
        GPU_CHECK_CAPS="tests_new=6,bench=3", GPU_CHECK_MIN_STEP="5", GPU_CHECK_BUDGET="15", GPU_CHECK_BENCH_MIN="5")
    text = r.stdout
    assert r.returncode == 1, text[-3000:] + r.stderr[-2000:]
    rows = _summary_rows(text)
    assert rows["tests_new"] == "TIMEOUT" and rows["bench:bench_hang"] == "TIMEOUT", text
    assert rows["memcheck"] == "FAILED" and rows["racecheck"] == "PARTIAL", rows
    assert rows["tests_rest"] == "not-run", rows        # < 5 s left before the lanes' deadline (15 - 5 s)
    lines = text.rstrip().splitlines()
    assert lines[-1] == ("RESULT: FAILED (4 step(s) failed; required step(s) not run: tests_rest)"), lines[-6:]
    assert lines[-3] == "not run: env build info (GPU_CHECK_SKIP); tests_rest (time budget)"
    assert lines[-4] == "failed: tests_new (TIMEOUT) memcheck (FAILED) racecheck (PARTIAL) bench:bench_hang (TIMEOUT)"
    assert lines[-2] == "results files (0): none"
    assert "FAILED" in text and "test_stub_bad.py::test_fails" in text  # streamed before the cut
    assert elapsed < 15 + 10, elapsed                  # budget + packing; the caps cut both hangs
    pid = int(pathlib.Path(hang + ".pid").read_text())
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)                                 # the hung benchmark was killed, not left behind


FAKE_SANITIZER = """#!/usr/bin/env bash
echo "$*" >>"$FAKE_LOG"
while [[ "$1" == --* ]]; do case "$1" in --tool|--error-exitcode|--print-limit) shift 2 ;; *) shift ;; esac; done
"$@"; rc=$?
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
"""
FAKE_DRIVER = """import os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("driver " + os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "-") + " " + " ".join(sys.argv[1:]) + "\\n")
print("gpu_sanitize_driver: 3 cases, 0 failed, 0 ops without a case, 0 skipped, 0 not run, 0.0 s -> OK")
"""


def test_device_mode_commands_with_fake_tools(tmp_path):
    """Not a dry run: the command lines a device run executes, with nvidia-smi, nvcc and compute-sanitizer faked on
    PATH (they record their arguments) and the build left out (it would rebuild this checkout's extension)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("nvidia-smi", "#!/bin/sh\necho fake-smi\n"), ("nvcc", "#!/bin/sh\necho release 13.0\n"),
                       ("compute-sanitizer", FAKE_SANITIZER)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    log = tmp_path / "fake.log"
    results = tmp_path / "results"
    r, out, _ = _run_script(
        tmp_path, GPU_CHECK_DRY_RUN="0", PATH=f"{fake}:{os.environ['PATH']}", FAKE_LOG=str(log),
        GPU_CHECK_SKIP="build,info,tests_new,tests_rest", GPU_CHECK_RESULTS_DIR=str(results),
        GPU_CHECK_DRIVER=_write(tmp_path, "driver_rec.py", FAKE_DRIVER),
        GPU_CHECK_BENCHES=_write(tmp_path, "bench_ok.py", BENCH_OK), GPU_CHECK_BUDGET="100")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = _summary_rows(r.stdout)
    assert all(rows[k] == "ok" for k in ("env", "memcheck", "racecheck", "synccheck", "initcheck", "bench:bench_ok"))
    assert "ERROR SUMMARY: 0 errors" in r.stdout and "fake-smi" in r.stdout
    calls = log.read_text().splitlines()
    tools = [ln.split()[1] for ln in calls if ln.startswith("--tool")]
    assert tools == ["memcheck", "memcheck", "racecheck", "synccheck", "initcheck"], calls
    assert all(ln.startswith(f"--tool {t} --error-exitcode 1 --print-limit 20 {sys.executable} ")
               for ln, t in zip([c for c in calls if c.startswith("--tool")], tools)), calls
    drivers = [ln.split()[1:4] for ln in calls if ln.startswith("driver ")]
    # memcheck without the caching allocator for the ops, with it for the CUDA graph; --stop-at within the cap
    assert drivers == [["1", "--parts", "direct,api"], ["-", "--parts", "graph"], ["-", "--parts", "direct,api,graph"],
                       ["-", "--parts", "direct,api,graph"], ["1", "--parts", "direct,api"]], drivers
    assert all("--dry-run" not in ln and "--stop-at" in ln for ln in calls if ln.startswith("driver ")), calls
    assert (results / "stub_h100.md").exists() and "results files (1): stub_h100.md" in r.stdout


def test_summary_format_and_status(tmp_path):
    steps = tmp_path / "steps.tsv"
    steps.write_text("20\tbuild\tok\t0\t61\t1\tdone\n10\tenv\tok\t0\t3\t1\tdevice: NVIDIA H100\n"
                     "52\tinitcheck\tnot-run\t-\t0\t0\ttime budget\n")
    text, status = gpu_check_lib.summary(str(steps), header="H", results=["a_h100.md", "a_h100.json"])
    lines = text.splitlines()
    assert status == 0 and lines[0] == "H" and lines[2].startswith("env ") and lines[3].startswith("build ")
    assert lines[-5:] == ["passed: env build", "failed: none", "not run: initcheck (time budget)",
                          "results files (2): a_h100.md a_h100.json", "RESULT: OK (2 steps passed, 1 not run)"]
    with open(steps, "a") as f:
        f.write("41\ttests_rest\tnot-run\t-\t0\t1\ttime budget\n")
    assert gpu_check_lib.summary(str(steps))[1] == 1      # a required step that did not run fails the run


def test_results_stream_counts(tmp_path):
    res = tmp_path / "r.tsv"
    res.write_text("#selected\t5\t10\ntests/a.py::t1\tpassed\tcall\ntests/a.py::t2\tfailed\tcall\n"
                   "tests/b.py::t3\tskipped\tsetup\n")
    assert gpu_check_lib.results_counts(str(res)) == "1 passed, 1 failed, 1 skipped of 5 selected (2 did not finish)"
    assert gpu_check_lib.results_failures(str(res), str(tmp_path / "missing.log")) == "FAILED tests/a.py::t2"


class _Item:
    """The attributes of a pytest item that touches_gpu reads."""

    def __init__(self, nodeid, params=None, marks=(), fn=None, cs_id=""):
        self.nodeid, self.name = nodeid, nodeid.split("::")[-1]
        self.originalname = self.name.split("[")[0]
        self.callspec = None if params is None else type("CS", (), {"params": params, "id": cs_id})()
        self._marks, self.function = list(marks), fn

    def get_closest_marker(self, name):
        return next((m for m in self._marks if m.name == name), None)

    def iter_markers(self, name):
        return (m for m in self._marks if m.name == name)


def _plain():
    return torch.zeros(2).sum()


def _on_device():
    return torch.zeros(2, device="cuda")


def test_test_selection_rules():
    sel = gpu_check_lib.touches_gpu
    assert sel(_Item("tests/test_x.py::test_a[cuda-triton]", {"device": "cuda", "backend": "triton"}))
    assert not sel(_Item("tests/test_x.py::test_a[cpu-triton]", {"device": "cpu", "backend": "triton"}))
    assert not sel(_Item("tests/test_cuda_sync_free.py::test_emulation", fn=_plain))  # a CPU test in a cuda file
    assert sel(_Item("tests/test_x.py::test_cuda_graph_step", fn=_plain))
    assert sel(_Item("tests/test_x.py::test_b", fn=_on_device))
    assert sel(_Item("tests/test_x.py::test_c", marks=[pytest.mark.gpu.mark], fn=_plain))
    assert sel(_Item("tests/test_x.py::test_d", marks=[pytest.mark.skipif(True, reason="needs CUDA").mark], fn=_plain))
    assert not sel(_Item("tests/test_gpu_compile.py::test_aot_triton_sm90", fn=_on_device))
    assert sel(_Item("tests/test_gpu_compile.py::test_cuda_extension_links", fn=_plain))
    assert not sel(_Item("tests/test_gpu_check_dry_run.py::test_x", fn=_on_device))
    # the CPU emulation of the CUDA kernels never goes to the device, whatever its tests are named
    assert not sel(_Item("tests/test_cuda_emulation_seb.py::test_cuda_forward[cuda]", fn=_on_device))
    assert not sel(_Item("tests/test_cuda_sync_free.py::test_cuda_gemm", fn=_on_device))


def _bench_module(path):
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_benchmark_accepts_the_flags_gpu_check_passes(tmp_path):
    """Every bench_*.py builds its parser from harness.make_parser and parses what gpu_check.sh passes."""
    benches = sorted((ROOT / "benchmarks").glob("bench_*.py"))
    assert len(benches) >= 5
    for b in benches:
        parser = _bench_module(b).parser()
        assert isinstance(parser, harness.BenchParser), f"{b.name}: parser() is not harness.make_parser's"
        for mode in (["--gpu"], ["--quick"]):
            a = parser.parse_args(mode + ["--no-compile", "--budget-s", "5", "--out-dir", str(tmp_path)])
            assert a.no_compile and a.budget_s == 5 and a.out_dir == str(tmp_path), b.name


def test_quick_writes_to_a_temporary_folder():
    """--quick without --out-dir never writes into benchmarks/results/; --threads names the configuration."""
    threads = torch.get_num_threads()
    try:
        a = harness.make_parser("x").parse_args(["--quick"])
        assert os.path.isdir(a.out_dir) and not os.listdir(a.out_dir)
        assert not os.path.abspath(a.out_dir).startswith(str(ROOT)), a.out_dir
        assert harness.make_parser("x").parse_args([]).out_dir == harness.RESULTS_DIR
        assert harness.result_stem("emb", a, "", "bfloat16") == f"emb_{harness.machine_tag()}_bfloat16_quick"
        b = harness.make_parser("x", threads=1).parse_args(["--threads", "1", "--results-dir", a.out_dir])
        c = harness.make_parser("x").parse_args(["--threads", "1", "--out-dir", a.out_dir])
        assert harness.result_stem("m", b) == f"m_{harness.machine_tag()}"         # 1 is this benchmark's default
        assert harness.result_stem("m", c) == f"m_{harness.machine_tag()}_t1"
        os.rmdir(a.out_dir)
    finally:
        torch.set_num_threads(threads)


def test_results_named_by_device(monkeypatch):
    assert harness.gpu_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert harness.gpu_tag("NVIDIA H200") == "h200"
    assert harness.gpu_tag("NVIDIA A100-SXM4-80GB") == "a100"
    assert harness.gpu_tag("Some Card") == "Some_Card"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert harness.machine_tag() == "h200"


def test_time_budget_stops_starting_cases(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    b = harness.TimeBudget(10)
    assert b.allows("a")
    clock[0] = 4.0                                      # case a took 4 s
    assert b.allows("b")                                # 4 + 4 <= 10
    clock[0] = 7.0                                      # case b took 3 s: 7 + 3 <= 10
    assert b.allows("c")
    clock[0] = 9.0                                      # case c took 2 s: 9 + 2 > 10
    assert not b.allows("d") and b.skipped == ["d"] and "d" in b.note()
    assert harness.TimeBudget(None).allows("x")


def test_sanitizer_driver_direct_part_on_cpu(capsys):
    assert driver.main(["--dry-run", "--parts", "direct"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"gpu_sanitize_driver: \d+ cases, 0 failed, 0 ops without a case", out), out[-2000:]


def test_sanitizer_driver_names_an_uncovered_op(monkeypatch, capsys):
    real = driver.cuda_registered_ops()
    assert {"seb_forward", "seb_backward_update_", "mbl_grouped_forward", "mutual_linear_backward"} <= real
    monkeypatch.setattr(driver, "cuda_registered_ops", lambda *a: real | {"brand_new_op"})
    assert driver.main(["--dry-run", "--parts", "direct"]) == 2
    assert "saml_C::brand_new_op is registered for CUDA but the driver has no case" in capsys.readouterr().out


def test_sanitizer_driver_compare_rejects():
    run = driver.Run("cpu")
    ref = torch.ones(4, dtype=torch.float64)
    run.compare("ok", ref.float() * (1 + 1e-6), ref, torch.float32)
    with pytest.raises(AssertionError, match="relative error"):
        run.compare("off", ref.float() * 1.01, ref, torch.float32)
    with pytest.raises(AssertionError, match="non-finite"):
        run.compare("nan", torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref, torch.float32)
    with pytest.raises(AssertionError, match="shape"):
        run.compare("shape", torch.ones(3), ref, torch.float32)
