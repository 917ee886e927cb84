#!/usr/bin/env bash
# One-shot GPU check for a lent H200 (or any CUDA machine): build, test, benchmark, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; uses python3 (override: PYTHON=...)
#
# Steps (each limited by `timeout`; a failed step is recorded and the script goes on):
#   env      nvidia-smi, python / torch / triton / nvcc versions
#   build    the extension for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0, SAML_BUILD_CUDA=1, setup.py build_ext --inplace)
#   info     python3 -m saml_kernels.info (which backend serves each op on cpu and cuda)
#   ceiling  device-to-device copy bandwidth (bytes read + written), the GB/s ceiling the benchmarks compare to
#   pytest   the whole test suite (but the ahead-of-time compile tests); tests parametrize over the cuda device (and the cuda/triton backends) by
#            themselves when a GPU is present (tests/conftest.py)
#   bench:*  every benchmarks/bench_*.py with --gpu
# Output: $OUT (or ./gpu_results when OUT is unset): summary.txt, all_logs.txt (every step's log),
# bench_results.md (the result tables the benchmarks wrote), gpu_results.tar.gz (logs, junit xml, result files).
# Dry run without a GPU: GPU_CHECK_SKIP=build,ceiling,pytest,bench (comma list of step names; "bench" = all);
# GPU_CHECK_TESTS=tests/test_x.py narrows the pytest step.
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

run_step env 60 "nvidia-smi; echo; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else None); print(\"triton\", triton.__version__)'; nvcc --version | tail -2; nproc"
cat "$LOGDIR/env.log" 2>/dev/null   # nvidia-smi and versions on the console too

run_step build 270 "rm -f saml_kernels/_C*.so; TORCH_CUDA_ARCH_LIST=9.0 SAML_BUILD_CUDA=1 MAX_JOBS=\$(nproc) $PY setup.py build_ext --inplace"

run_step info 60 "$PY -m saml_kernels.info"

run_step ceiling 60 "$PY - <<'EOF'
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

XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
PTO=""
if $PY -c "import pytest_timeout" 2>/dev/null; then PTO="--timeout=150"; fi
# test_triton_aot (ahead-of-time compiles, no GPU needed, minutes of CPU) is CI's job; the kernels are JIT-
# compiled and run here by the other tests anyway.
run_step pytest 200 "$PY -m pytest -q -rfE -p no:cacheprovider $XDIST $PTO -k 'not test_triton_aot' --junitxml='$LOGDIR/pytest_junit.xml' ${GPU_CHECK_TESTS:-tests}"

for bench in benchmarks/bench_*.py; do
  [ -e "$bench" ] || continue
  run_step "bench:$(basename "$bench" .py)" 120 "$PY $bench --gpu"
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
  if (( FAILED )); then echo "RESULT: FAILED (see all_logs.txt)"; else echo "RESULT: all steps passed"; fi
} > "$OUTDIR/summary.txt"
echo
cat "$OUTDIR/summary.txt"
exit $FAILED
