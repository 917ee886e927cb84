"""The Python half of benchmarks/gpu_check.sh: a pytest plugin that keeps the GPU tests and streams results, and the
reports the script prints (pytest per file, the final summary). Standard library only at import (env-report
imports torch inside): the summary must work when everything else is broken.

As a pytest plugin (``PYTHONPATH=benchmarks pytest -p gpu_check_lib``):
  - keeps the tests that touch the GPU (:func:`touches_gpu`), unless GPU_CHECK_ALL_TESTS=1;
  - appends ``nodeid<TAB>outcome<TAB>phase`` per finished test to $GPU_CHECK_RESULTS (one line as each test ends,
    so a run cut off by its time limit still reports what finished; with xdist the controller writes, and a worker
    killed by pytest-timeout shows up as a failed test while the other workers go on).
As a program:
  ``python gpu_check_lib.py results-report RESULTS.tsv PYTEST.log``    pass / fail / skip per test file, failing tests;
  ``python gpu_check_lib.py results-counts RESULTS.tsv``               one line of counts;
  ``python gpu_check_lib.py results-failures RESULTS.tsv PYTEST.log``  the failing tests, one a line;
  ``python gpu_check_lib.py summary STEPS.tsv HEADER FAILURES RESULT_FILE...``  the final summary (:func:`summary`);
  ``python gpu_check_lib.py env-report [--dry-run]``                   the device and versions (the env step).
"""
from __future__ import annotations

import collections
import inspect
import os
import re
import sys

AOT_FILE = "test_gpu_compile.py"  # ahead-of-time Triton/nvcc compiles: CPU minutes, no GPU (CI runs them)
SELF_FILES = ("test_gpu_check_dry_run.py",)  # gpu_check.sh's own dry-run tests: CPU, and they run the script
# The CPU emulation of the CUDA kernels (g++ builds of minutes, no GPU involved): CI's job, never the device's.
EMULATION_FILES = ("test_cuda_sync_free.py",)
EMULATION_PREFIX = "test_cuda_emulation"
# a device literal, .cuda(), or the torch.cuda API in a test's own code
_CUDA_SRC = re.compile(r"""["']cuda(:\d+)?["']|\.cuda\(|torch\.cuda\.""")
_DEVICE_KINDS = ("cpu", "cuda", "meta")


# ------------------------------------------------------------------------------------------------ pytest plugin

def touches_gpu(item) -> bool:
    """Whether a collected test runs something on a GPU. In order: the AOT compile file only for its CUDA-extension
    checks; the ``gpu`` marker; a device parametrization (kept only for its cuda values; "cuda-triton" style ids
    count); "cuda" or "gpu" in the test's own name (not the file's: test_cuda_sync_free.py is a CPU emulation);
    a skipif whose reason names CUDA / a GPU; else a device literal / torch.cuda in the test function's source."""
    fname = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
    name = (getattr(item, "originalname", None) or item.name).lower()
    if fname in SELF_FILES or fname in EMULATION_FILES or fname.startswith(EMULATION_PREFIX):
        return False
    if fname == AOT_FILE:
        return "cuda" in item.name
    if item.get_closest_marker("gpu") is not None:
        return True
    cs = getattr(item, "callspec", None)
    if cs is not None:
        devs = [str(v) for v in cs.params.values() if str(v).split(":")[0] in _DEVICE_KINDS]
        if devs:
            return any(d.startswith("cuda") for d in devs)
        if re.search(r"(^|[-_\[])cuda($|[-_:\]])", cs.id):
            return True
    if "cuda" in name or "gpu" in name:
        return True
    for m in item.iter_markers("skipif"):
        if re.search(r"cuda|gpu", str(m.kwargs.get("reason", "")), re.I):
            return True
    fn = getattr(item, "function", None)
    try:
        return fn is not None and bool(_CUDA_SRC.search(inspect.getsource(fn)))
    except (OSError, TypeError):
        return False


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GPU_CHECK_ALL_TESTS") == "1":
        keep, drop = list(items), []
    else:
        flags = [touches_gpu(i) for i in items]
        keep = [i for i, f in zip(items, flags) if f]
        drop = [i for i, f in zip(items, flags) if not f]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    path = os.environ.get("GPU_CHECK_RESULTS")
    # under xdist every worker collects the same set: the first one writes the header
    if path and getattr(config, "workerinput", {}).get("workerid", "gw0") == "gw0":
        with open(path, "a") as fh:
            fh.write(f"#selected\t{len(keep)}\t{len(drop)}\n")


_CONFIG = []


def pytest_configure(config):
    _CONFIG.append(config)


def pytest_runtest_logreport(report):
    """One line per test outcome, written by the xdist controller (every worker's reports arrive there) or by a
    plain run; the workers themselves write nothing (no duplicates)."""
    path = os.environ.get("GPU_CHECK_RESULTS")
    if not path or (_CONFIG and _is_worker(_CONFIG[0])):
        return
    if report.when != "call" and not (report.failed or report.skipped):
        return
    outcome = "error" if (report.failed and report.when != "call") else report.outcome
    with open(path, "a") as fh:
        fh.write(f"{report.nodeid}\t{outcome}\t{report.when}\n")


# ------------------------------------------------------------------------------------------------ reports

def read_results(path: str):
    """(selected, deselected) or None, {file: Counter(outcome)}, [(outcome, nodeid)] of failures/errors."""
    sel, per, bad = None, collections.OrderedDict(), []
    if not os.path.exists(path):
        return sel, per, bad
    for line in open(path, errors="replace"):
        parts = line.rstrip("\n").split("\t")
        if parts[0] == "#selected" and len(parts) >= 3:
            sel = (int(parts[1]), int(parts[2]))
            continue
        if len(parts) < 2:
            continue
        nodeid, outcome = parts[0], parts[1]
        per.setdefault(nodeid.split("::")[0], collections.Counter())[outcome] += 1
        if outcome in ("failed", "error"):
            bad.append((outcome, nodeid))
    return sel, per, bad


def results_counts(path: str) -> str:
    """'312 passed, 2 failed, 5 skipped of 330 selected (11 did not finish)' from a results file."""
    sel, per, _ = read_results(path)
    tot = collections.Counter()
    for c in per.values():
        tot.update(c)
    done = sum(tot.values())
    parts = [f"{tot[k]} {k}" for k in ("passed", "failed", "error", "skipped") if tot[k]]
    text = ", ".join(parts) or "no test finished"
    if sel is not None:
        text += f" of {sel[0]} selected"
        if done < sel[0]:
            text += f" ({sel[0] - done} did not finish)"
    return text


def results_report(results: str, log: str) -> str:
    """Per test file: pass / fail / error / skip; then every failing test with pytest's -rfE line when found."""
    sel, per, bad = read_results(results)
    if sel is None and not per:
        return "pytest: no results (not run, or stopped before collection ended)"
    out = [f"pytest: {results_counts(results)}"]
    out.append(f"{'file':52} {'pass':>5} {'fail':>5} {'error':>5} {'skip':>5}")
    for f, c in per.items():
        out.append(f"{f[-52:]:52} {c['passed']:5d} {c['failed']:5d} {c['error']:5d} {c['skipped']:5d}")
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    short = {m.group(2): m.group(0) for m in re.finditer(r"^(FAILED|ERROR) (\S+)( - .*)?$", text, re.M)}
    out.append(f"failing tests: {len(bad)}")
    for outcome, nodeid in bad:
        line = short.get(nodeid) or next((v for k, v in short.items() if k.endswith(nodeid) or nodeid.endswith(k)),
                                         f"{outcome.upper()} {nodeid}")
        out.append("  " + line[:240])
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ summary

STEP_FIELDS = ("seq", "name", "state", "rc", "secs", "required", "note")


def read_steps(path: str) -> list:
    rows = []
    for line in open(path, errors="replace") if os.path.exists(path) else []:
        parts = line.rstrip("\n").split("\t")
        if len(parts) >= len(STEP_FIELDS) - 1:
            parts += [""] * (len(STEP_FIELDS) - len(parts))
            rows.append(dict(zip(STEP_FIELDS, parts)))
    rows.sort(key=lambda r: (float(r["seq"]) if r["seq"].replace(".", "", 1).isdigit() else 1e9))
    return rows


def summary(steps_path: str, *, header: str = "", failures: str = "", results: list = (),
            max_failures: int = 12) -> tuple[str, int]:
    """The summary gpu_check.sh prints last, and its exit status.

    Layout (the device tool returns only the output's tail, so the verdict is in the last lines):
        header; the step table (step, status, rc, seconds, note); up to ``max_failures`` failing tests;
        ``passed: ...``; ``failed: ...``; ``not run: ...``; ``results files (n): ...``; ``RESULT: ...``.
    A step's status: ok | FAILED | TIMEOUT (cut by its cap) | PARTIAL (a sanitizer step whose driver left cases out
    for time: what ran is checked, not everything) | skipped (asked) | not-run (time budget).
    Exit status 1 when a step failed or timed out, or a required step did not run for time; else 0."""
    rows = read_steps(steps_path)
    lines = [header] if header else []
    lines.append(f"{'step':24} {'status':8} {'rc':>4} {'secs':>5}  note")
    for r in rows:
        lines.append(f"{r['name'][:24]:24} {r['state']:8} {r['rc']:>4} {r['secs']:>5}  {r['note'][:110]}")
    fail_lines = [ln for ln in failures.splitlines() if ln.strip()]
    if fail_lines:
        lines.append(f"failing tests ({len(fail_lines)}" + (f", first {max_failures}" if len(fail_lines) > max_failures
                                                            else "") + "):")
        lines += ["  " + ln.strip()[:200] for ln in fail_lines[:max_failures]]
    passed = [r["name"] for r in rows if r["state"] == "ok"]
    failed = [f"{r['name']} ({r['state']})" for r in rows if r["state"] in ("FAILED", "TIMEOUT", "PARTIAL")]
    why_not = collections.OrderedDict()  # reason -> steps (one group per reason keeps the line short)
    for r in rows:
        if r["state"] in ("skipped", "not-run"):
            why_not.setdefault(r["note"] or r["state"], []).append(r["name"])
    not_run = [f"{' '.join(names)} ({why})" for why, names in why_not.items()]
    n_not_run = sum(len(v) for v in why_not.values())
    missing_required = [r["name"] for r in rows if r["state"] == "not-run" and r["required"] == "1"]
    lines.append("passed: " + (" ".join(passed) or "none"))
    lines.append("failed: " + (" ".join(failed) or "none"))
    lines.append("not run: " + ("; ".join(not_run) or "none"))
    lines.append(f"results files ({len(results)}): " + (" ".join(results) or "none"))
    status = 1 if failed or missing_required else 0
    if status:
        why = [f"{len(failed)} step(s) failed"] if failed else []
        why += [f"required step(s) not run: {' '.join(missing_required)}"] if missing_required else []
        lines.append(f"RESULT: FAILED ({'; '.join(why)})")
    else:
        lines.append(f"RESULT: OK ({len(passed)} steps passed" + (f", {n_not_run} not run" if n_not_run else "") + ")")
    return "\n".join(lines), status


def results_failures(results: str, log: str) -> str:
    """The failing tests of one results file, one line each (pytest's -rfE line when the log has it)."""
    return "\n".join(ln.strip() for ln in results_report(results, log).split("failing tests:", 1)[-1].splitlines()[1:])


def env_report(dry_run: bool) -> str:
    """The env step's lines: ``device: <name>`` (first: the summary's header reads it), versions, pytest plugins."""
    import importlib.util
    import platform

    lines = []
    try:
        import torch

        if dry_run:
            dev = "none (dry run)"
        else:
            dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (torch sees no CUDA device)"
        lines.append(f"device: {dev}")
        lines.append(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda}")
    except Exception as exc:  # noqa: BLE001 - reported, the step fails
        lines.append(f"device: unknown (torch import failed: {exc})")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"triton: not importable ({exc})")
    for mod in ("pytest_timeout", "xdist"):
        lines.append(f"{mod}: {'present' if importlib.util.find_spec(mod) else 'MISSING'}")
    return "\n".join(lines)


def _main(argv) -> int:
    if len(argv) >= 1 and argv[0] == "env-report":
        text = env_report("--dry-run" in argv)
        print(text)
        return 1 if "torch import failed" in text else 0
    if len(argv) >= 3 and argv[0] == "results-report":
        print(results_report(argv[1], argv[2]))
        return 0
    if len(argv) >= 3 and argv[0] == "results-failures":
        text = results_failures(argv[1], argv[2])
        if text:
            print(text)
        return 0
    if len(argv) >= 2 and argv[0] == "results-counts":
        print(results_counts(argv[1]))
        return 0
    if len(argv) >= 2 and argv[0] == "summary":
        # summary STEPS.tsv HEADER FAILURES_FILE RESULT_FILE...
        header = argv[2] if len(argv) > 2 else ""
        failures = open(argv[3], errors="replace").read() if len(argv) > 3 and os.path.exists(argv[3]) else ""
        text, status = summary(argv[1], header=header, failures=failures, results=argv[4:])
        print(text)
        return status
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
