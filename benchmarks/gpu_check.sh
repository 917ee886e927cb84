#!/usr/bin/env bash
# One-shot GPU check for a lent H200 (or any CUDA machine): build, test, benchmark, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; uses python3 (override: PYTHON=...)
#
# Steps (each limited by `timeout`; a failed step is recorded and the script goes on):
#   env      nvidia-smi, python / torch / triton / nvcc versions
#   build    the extension for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0, SAML_BUILD_CUDA=1, MAX_JOBS=$(nproc),
#            setup.py build_ext --inplace), capped at 150 s (~60 s seen)
#   info     python3 -m saml_kernels.info (which backend serves each op on cpu and cuda)
#   ceiling  device-to-device copy bandwidth (bytes read + written), the GB/s ceiling the benchmarks compare to
#   pytest   every test that touches the GPU, on all cores (-n $(nproc)), at most 300 s: the tests whose id has
#            "cuda" (the (cuda, backend) / device parametrizations of tests/conftest.py, test_cuda_* names), whose
#            parameters hold a CUDA device, or whose code names cuda; the CPU-only tests (CI's job, minutes on
#            this machine's CPU; the AOT compiles of test_gpu_compile.py above all) are deselected by a small
#            pytest plugin written next to the logs. Results stream to a file as tests finish, so a timeout still
#            reports; the summary gives pass/fail/skip per test file and names every failing test.
#   bench:*  every benchmarks/bench_*.py with --gpu, each capped (60 s) and all within the budget
# Budget: 465 s for all steps together (GPU_CHECK_BUDGET), so the whole call stays under 8 minutes; the pytest
# step leaves >= 100 s for the benchmarks.
# Output: $OUT (or ./gpu_results when OUT is unset): summary.txt, all_logs.txt (every step's log),
# bench_results.md (the result tables the benchmarks wrote), gpu_results.tar.gz (logs, junit xml, result files).
# Dry run without a GPU: GPU_CHECK_SKIP=build,ceiling,pytest,bench (comma list of step names; "bench" = all);
# GPU_CHECK_TESTS=tests/test_x.py narrows the pytest step; GPU_CHECK_PYTEST_ARGS adds pytest arguments;
# GPU_CHECK_ALL_TESTS=1 runs every test (no GPU selection).
# Exit status: 0 when every step passed, 1 otherwise. The summary table is printed last.
# The machine has no internet and no venv: nothing is installed; python3 must already hold torch + triton.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0

if [ -n "${OUT:-}" ]; then
  OUTDIR="$OUT"
  LOGDIR="$(mktemp -d)/logs"      # $OUT returns at most 8 files: per-step logs go into the tarball
else
  OUTDIR="$ROOT/gpu_results"
  LOGDIR="$OUTDIR/logs"
fi
mkdir -p "$OUTDIR" "$LOGDIR"
BUDGET="${GPU_CHECK_BUDGET:-465}"   # seconds for all steps together (the whole script stays under 8 minutes)
T0=$SECONDS
MARK="$LOGDIR/.start"; touch "$MARK"
NAMES=(); STATES=(); RCS=(); SECS=(); NOTES=()
FAILED=0

# run_step NAME MAX_SECONDS COMMAND_STRING: runs under `timeout`, never past the overall budget.
run_step() {
  local name="$1" max="$2" cmd="$3"
  local left=$(( BUDGET - (SECONDS - T0) ))
  local lim=$(( max < left ? max : left ))
  local log="$LOGDIR/${name//[:\/]/_}.log"
  NAMES+=("$name")
  if [[ ",${GPU_CHECK_SKIP:-}," == *",${name%%:*},"* ]]; then   # dry runs: GPU_CHECK_SKIP=build,pytest,bench
    STATES+=("skipped"); RCS+=("-"); SECS+=(0); NOTES+=("GPU_CHECK_SKIP"); echo "=== $name: skipped by request"
    return
  fi
  if (( lim < 5 )); then
    STATES+=("SKIPPED"); RCS+=("-"); SECS+=(0); NOTES+=("out of time budget"); FAILED=1
    echo "=== $name: skipped (time budget spent)"
    return
  fi
  echo "=== $name (limit ${lim}s): $cmd"
  local s0=$SECONDS
  timeout -k 10 "$lim" bash -c "$cmd" >"$log" 2>&1
  local rc=$?
  local dt=$(( SECONDS - s0 ))
  local state="ok"
  if (( rc == 124 || rc == 137 )); then state="TIMEOUT"; FAILED=1
  elif (( rc != 0 )); then state="FAILED"; FAILED=1; fi
  STATES+=("$state"); RCS+=("$rc"); SECS+=("$dt")
  NOTES+=("$(grep -E '(passed|failed|error|skipped).* in [0-9.]+s' "$log" | tail -1 | tr -s ' ' | cut -c1-90)")
  echo "    -> $state (rc=$rc, ${dt}s); last lines of $log:"
  tail -n 4 "$log" | cut -c1-200 | sed 's/^/    | /'
}

run_step env 30 "nvidia-smi; echo; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else None); print(\"triton\", triton.__version__)'; nvcc --version | tail -2; nproc"
cat "$LOGDIR/env.log" 2>/dev/null   # nvidia-smi and versions on the console too

run_step build 150 "rm -f saml_kernels/_C*.so; TORCH_CUDA_ARCH_LIST=9.0 SAML_BUILD_CUDA=1 MAX_JOBS=\$(nproc) $PY setup.py build_ext --inplace"

run_step info 40 "$PY -m saml_kernels.info"

run_step ceiling 40 "$PY - <<'EOF'
import torch
n = 1 << 30  # 1 GiB per buffer, far over the L2
src = torch.randn(n // 4, device='cuda'); dst = torch.empty_like(src)
for _ in range(3): dst.copy_(src)
ts = []
for _ in range(10):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); dst.copy_(src); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
ts.sort(); ms = ts[len(ts) // 2]
print(f'device copy: {2 * n / ms / 1e6:.0f} GB/s (read + write, median of 10, {ms:.3f} ms for 2 x 1 GiB)')
EOF"

# ---- pytest: the GPU tests only, on every core, results streamed to $RESULTS (readable after a timeout)
PLUGDIR="$(dirname "$LOGDIR")/plugins"; mkdir -p "$PLUGDIR"
RESULTS="$LOGDIR/pytest_results.tsv"; JUNIT="$LOGDIR/pytest_junit.xml"; : >"$RESULTS"
cat >"$PLUGDIR/gpu_check_plugin.py" <<'EOF'
"""gpu_check.sh's pytest plugin: keeps the tests that touch the GPU; streams one line per finished test."""
import inspect
import os

import pytest

AOT_FILE = "test_gpu_compile.py"   # ahead-of-time compiles: CPU minutes, no GPU involved (CI runs them)


def _touches_gpu(item):
    nodeid = item.nodeid
    fname = nodeid.split("::")[0].rsplit("/", 1)[-1]
    if fname == AOT_FILE:
        return "cuda" in item.name                    # only the CUDA-extension checks of that file
    if "cuda" in nodeid:                              # (cuda, backend) / device parametrizations, test_cuda_*
        return True
    cs = getattr(item, "callspec", None)
    if cs is not None:
        devs = [str(v) for v in cs.params.values() if str(v).split(":")[0] in ("cpu", "cuda", "meta")]
        if devs:                                      # parametrized by device: the cuda variants only
            return any(d.startswith("cuda") for d in devs)
    fn = getattr(item, "function", None)
    try:
        return fn is not None and "cuda" in inspect.getsource(fn)
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GPU_CHECK_ALL_TESTS") == "1":
        keep, drop = list(items), []
    else:
        keep = [i for i in items if _touches_gpu(i)]
        drop = [i for i in items if not _touches_gpu(i)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    path = os.environ.get("GPU_CHECK_RESULTS")
    # under xdist the workers collect (all the same set): the first one writes the header
    if path and getattr(config, "workerinput", {}).get("workerid", "gw0") == "gw0":
        with open(path, "a") as fh:
            fh.write(f"#selected\t{len(keep)}\t{len(drop)}\n")


_CONFIG = []


def pytest_configure(config):
    _CONFIG.append(config)


def pytest_runtest_logreport(report):
    """One line per test outcome, written by the xdist controller (every worker's reports arrive there) or by a
    plain run; the workers' own calls of this hook write nothing (no duplicates)."""
    path = os.environ.get("GPU_CHECK_RESULTS")
    if not path or (_CONFIG and hasattr(_CONFIG[0], "workerinput")):
        return
    if report.when != "call" and not (report.failed or report.skipped):
        return
    outcome = "error" if (report.failed and report.when != "call") else report.outcome
    with open(path, "a") as fh:
        fh.write(f"{report.nodeid}\t{outcome}\t{report.when}\n")
EOF
NPROC="$(nproc 2>/dev/null || echo 2)"
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n $NPROC"; fi
PTO=""
if $PY -c "import pytest_timeout" 2>/dev/null; then PTO="--timeout=120"; fi
BENCH_RESERVE=100   # seconds kept for the benchmarks whatever pytest does
PYTEST_MAX=$(( BUDGET - (SECONDS - T0) - BENCH_RESERVE )); (( PYTEST_MAX > 300 )) && PYTEST_MAX=300
(( PYTEST_MAX < 30 )) && PYTEST_MAX=30
run_step pytest "$PYTEST_MAX" "GPU_CHECK_RESULTS='$RESULTS' PYTHONPATH='$PLUGDIR':\$PYTHONPATH $PY -m pytest -q -rfE -p no:cacheprovider -p gpu_check_plugin $XDIST $PTO --junitxml='$JUNIT' ${GPU_CHECK_PYTEST_ARGS:-} ${GPU_CHECK_TESTS:-tests}"

# Per-file counts and the failing tests, from the streamed results (complete even when pytest was cut off;
# the junit xml, when pytest finished, holds the failure messages).
PYTEST_REPORT="$LOGDIR/pytest_report.txt"
$PY - "$RESULTS" "$LOGDIR/pytest.log" >"$PYTEST_REPORT" 2>&1 <<'EOF'
import collections, os, re, sys
res, log = sys.argv[1], sys.argv[2]
if not os.path.exists(res) or not os.path.exists(log):
    print("pytest: not run"); sys.exit(0)
sel = None
per = collections.OrderedDict()
bad = []
for line in open(res):
    parts = line.rstrip("\n").split("\t")
    if parts[0] == "#selected":
        sel = (int(parts[1]), int(parts[2])); continue
    if len(parts) < 2:
        continue
    nodeid, outcome = parts[0], parts[1]
    f = nodeid.split("::")[0]
    per.setdefault(f, collections.Counter())[outcome] += 1
    if outcome in ("failed", "error"):
        bad.append(f"{outcome.upper()} {nodeid}")
done = sum(sum(c.values()) for c in per.values())
if sel:
    print(f"pytest: {sel[0]} GPU tests selected ({sel[1]} CPU-only deselected), {done} outcomes recorded"
          + ("" if done >= sel[0] else f"  ** {sel[0] - done} did not finish (time limit?) **"))
print(f"{'file':52} {'pass':>6} {'fail':>5} {'error':>5} {'skip':>5}")
for f, c in per.items():
    print(f"{f:52} {c['passed']:6d} {c['failed']:5d} {c['error']:5d} {c['skipped']:5d}")
tail = open(log, errors="replace").read()
short = {m.group(2): m.group(0) for m in re.finditer(r"^(FAILED|ERROR) (\S+)( - .*)?$", tail, re.M)}
print(f"failing tests: {len(bad)}")
for b in bad:                                   # with the -rfE message when the log has it
    nodeid = b.split(" ", 1)[1]
    line = next((v for k, v in short.items() if k == nodeid or k.endswith("/" + nodeid) or nodeid.endswith(k)), b)
    print("  " + line[:300])
EOF
cat "$PYTEST_REPORT"

for bench in benchmarks/bench_*.py; do
  [ -e "$bench" ] || continue
  run_step "bench:$(basename "$bench" .py)" 60 "$PY $bench --gpu"
done

# ---- collect
{
  for f in "$LOGDIR"/*.log; do echo "################ $(basename "$f")"; cat "$f"; echo; done
} > "$OUTDIR/all_logs.txt" 2>/dev/null
NEW_RESULTS=$(find benchmarks/results -type f -newer "$MARK" 2>/dev/null | sort)
{
  for f in $NEW_RESULTS; do
    case "$f" in *.md) echo "################ $f"; cat "$f"; echo ;; esac
  done
} > "$OUTDIR/bench_results.md"
if [ -n "$NEW_RESULTS" ]; then
  # shellcheck disable=SC2086
  tar czf "$OUTDIR/gpu_results.tar.gz" -C "$(dirname "$LOGDIR")" logs -C "$ROOT" $NEW_RESULTS
else
  tar czf "$OUTDIR/gpu_results.tar.gz" -C "$(dirname "$LOGDIR")" logs
fi

{
  echo "gpu_check summary ($(date -u +%FT%TZ), $(( SECONDS - T0 ))s total; logs: $OUTDIR)"
  printf '%-28s %-8s %-5s %6s  %s\n' step status rc secs note
  for i in "${!NAMES[@]}"; do
    printf '%-28s %-8s %-5s %6s  %s\n' "${NAMES[$i]}" "${STATES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
  done
  echo "result files: ${NEW_RESULTS:-none}"
  if [ -s "$PYTEST_REPORT" ]; then echo; cat "$PYTEST_REPORT"; fi
  if (( FAILED )); then echo "RESULT: FAILED (see all_logs.txt)"; else echo "RESULT: all steps passed"; fi
} > "$OUTDIR/summary.txt"
echo
cat "$OUTDIR/summary.txt"
exit $FAILED
