#!/usr/bin/env bash
# gpu_check.sh: the one device run. Build for sm_90, the GPU tests (the new code's first),
# compute-sanitizer over every CUDA op, every benchmark in GPU mode; in one call of at most 8 minutes, with a
# compact summary printed last.
#
# HOW TO RUN IT ON A LENT DEVICE (a device tool with a time limit, e.g. 15 minutes of device time, start-up and idle
# counted; a fresh machine needs 4 minutes left to start; 30 s warm after a call):
#   1. run(command="bash benchmarks/gpu_check.sh", timeout_s=480)
#      The script ends within GPU_CHECK_BUDGET = 450 s plus ~10 s of packing, so with a 1-2 minute start the call
#      costs at most ~10.5 minutes and >= 4 minutes stay for one more, shorter call.
#   2. Rerun at once (within the 30 s the machine stays warm) only what needs it, e.g. a flaky step:
#      run(command="GPU_CHECK_STEPS=build,tests_new GPU_CHECK_BUDGET=150 bash benchmarks/gpu_check.sh", timeout_s=180)
#      otherwise call give_back() straight away: idle time counts.
#   3. Here: the reply's files_at folder holds summary.txt, all_logs.txt, bench_results.md, gpu_results.tar.gz.
#      `tar xzf <files_at>/gpu_results.tar.gz benchmarks/results` from the repository root puts the benchmark
#      results (named by the device: *_h100.*, *_h200.*) into benchmarks/results/; commit them with the summary's
#      verdict in the message. logs/ in the tarball holds every step's full log, junit xml and the sanitizer output.
#
# Steps (each under `timeout` with its own cap, never past the total budget; a failed step is recorded, the
# script goes on):
#   env        nvidia-smi; python / torch / triton / nvcc / compute-sanitizer versions; pytest plugins present
#   build      the extension for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0, SAML_BUILD_CUDA=1, MAX_JOBS=$(nproc))
#   info       python -m saml_kernels.info (the backend serving each op) and the device copy bandwidth
#   then two lanes at once (tests and sanitizers need correctness, not quiet; GPU_CHECK_SERIAL=1 runs them in turn):
#   tests_new  the GPU tests of the code changed since the last device run: $GPU_CHECK_NEW_TESTS (csrc/cuda's
#              kernel tests, the Triton kernels' GPU tests, graphs / capture-safe); pytest -n <cores>,
#              --timeout-method=thread (pytest-timeout: a hung test kills its xdist worker, which is replaced, and
#              the run goes on); one result line per finished test streamed to logs/tests_new.tsv
#   tests_rest every other test that touches the GPU (selection: benchmarks/gpu_check_lib.py, touches_gpu)
#   memcheck   compute-sanitizer --tool memcheck over benchmarks/gpu_sanitize_driver.py (every CUDA op of the
#              extension once at odd sizes, forward and backward, every dtype, fused updates, the CUDA-graph step):
#              --parts direct,api without the caching allocator (each tensor its own allocation, so an access past
#              its end is caught), then --parts graph with it (CUDA graphs need it)
#   racecheck  the same driver under --tool racecheck; then synccheck and initcheck while time allows (optional)
#   bench:*    every benchmarks/bench_*.py with --gpu --no-compile --budget-s <its cap - margin> (the benchmark
#              starts no new case past it and writes what it measured), serially on a quiet GPU, sharing the time
#              left; results files named by the device (harness.machine_tag: h100, h200)
# Budget: GPU_CHECK_BUDGET (450 s) for everything; the two lanes end by BUDGET - (benchmarks x GPU_CHECK_BENCH_MIN,
# 30 s each), so the benchmarks always get their share. Caps: GPU_CHECK_CAPS="tests_new=150,bench=60,..." (a step's
# name, or its prefix before ':').
#
# Output ($OUT, or ./gpu_results when OUT is unset; the device tool returns at most 8 files): summary.txt,
# all_logs.txt (every log, each cut to its last 2 MB), bench_results.md (the .md results written), gpu_results.tar.gz
# (logs/ and benchmarks/results/<new files>). The summary's last lines: passed / failed / not run / results files /
# RESULT. A step's status: ok | FAILED | TIMEOUT (cut by its cap) | PARTIAL (the sanitizer driver left cases out
# for time) | skipped (asked) | not-run (time budget). Exit status 0 when every step that ran passed and every
# required step ran; 1 otherwise.
#
# Dry run here, without a GPU (tests/test_gpu_check_dry_run.py does this with stubs and tiny caps):
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
# stubs nvidia-smi / nvcc / the build, runs the sanitizer steps as the driver's CPU variant (--dry-run, no
# compute-sanitizer), the benchmarks as --quick --no-compile into logs/results, and pytest on the CPU.
# Other switches: GPU_CHECK_STEPS / GPU_CHECK_SKIP (comma lists of steps or prefixes to run / leave out),
# GPU_CHECK_NEW_TESTS, GPU_CHECK_REST_TESTS (pytest paths), GPU_CHECK_PYTEST_ARGS, GPU_CHECK_ALL_TESTS=1 (no GPU
# selection), GPU_CHECK_WORKERS (xdist workers, 0 = none), GPU_CHECK_TEST_TIMEOUT (per test, s), GPU_CHECK_BENCHES
# (scripts), GPU_CHECK_RESULTS_DIR, GPU_CHECK_DRIVER, GPU_CHECK_DRIVER_ARGS (appended; the last --parts wins),
# GPU_CHECK_SANITIZER (the compute-sanitizer binary), GPU_CHECK_SANITIZERS (tools), GPU_CHECK_SANITIZER_OPTS,
# GPU_CHECK_MIN_STEP (a step is not started with less time left before its deadline), GPU_CHECK_KILL_GRACE,
# GPU_CHECK_SERIAL=1, PYTHON.
# The device machine has no network and no venv: nothing is installed; python3 there holds torch + triton.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0
DRY="${GPU_CHECK_DRY_RUN:-0}"
LIB="$ROOT/benchmarks/gpu_check_lib.py"

if [ -n "${OUT:-}" ]; then
  OUTDIR="$OUT"
  LOGDIR="$(mktemp -d)/logs"      # $OUT returns at most 8 files: the per-step logs travel in the tarball
else
  OUTDIR="$ROOT/gpu_results"
  LOGDIR="$OUTDIR/logs"
fi
rm -rf "$LOGDIR"; mkdir -p "$OUTDIR" "$LOGDIR"
if [ "$DRY" = 1 ]; then RESULTS_DIR="${GPU_CHECK_RESULTS_DIR:-$LOGDIR/results}"
else RESULTS_DIR="${GPU_CHECK_RESULTS_DIR:-$ROOT/benchmarks/results}"; fi
mkdir -p "$RESULTS_DIR"
STEPS="$LOGDIR/steps.tsv"; : >"$STEPS"
BUDGET="${GPU_CHECK_BUDGET:-450}"
MIN_STEP="${GPU_CHECK_MIN_STEP:-5}"       # a step with less time than this left is not started
GRACE="${GPU_CHECK_KILL_GRACE:-5}"        # SIGKILL this long after the cap's SIGTERM
BENCH_MIN="${GPU_CHECK_BENCH_MIN:-30}"    # seconds per benchmark the test lanes must leave
BENCH_MARGIN="${GPU_CHECK_BENCH_MARGIN:-15}"  # a benchmark's --budget-s = its cap - this (start-up, writing files)
T0=$SECONDS
MARK="$LOGDIR/.start"; touch "$MARK"; sleep 1   # result files newer than MARK are this run's
NPROC="$(nproc 2>/dev/null || echo 2)"

# cap NAME DEFAULT: the step's cap from GPU_CHECK_CAPS (exact name first, then the prefix before ':')
cap() {
  local name="$1" def="$2" kv
  for key in "$name" "${name%%:*}"; do
    local caps="${GPU_CHECK_CAPS:-}"
    for kv in ${caps//,/ }; do
      if [ "${kv%%=*}" = "$key" ]; then echo "${kv#*=}"; return; fi
    done
  done
  echo "$def"
}

listed() {  # listed NAME "a,b,c": NAME or its prefix is in the comma list
  [[ ",$2," == *",$1,"* || ",$2," == *",${1%%:*},"* ]]
}

record() {  # record SEQ NAME STATE RC SECS REQUIRED NOTE  (one line: the lanes append concurrently)
  local note; note="$(printf '%s' "$7" | tr '\t\n' '  ' | sed 's/ *$//' | cut -c1-200)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$note" >>"$STEPS"
}

# note_for NAME LOG: the one-line note of a finished step
note_for() {
  local name="$1" log="$2"
  case "$name" in
    tests_*) "$PY" "$LIB" results-counts "$LOGDIR/$name.tsv" 2>/dev/null ;;
    memcheck|racecheck|synccheck|initcheck)
      { grep -hoE '(ERROR|RACECHECK) SUMMARY: [^=]*' "$log"
        grep -hoE 'gpu_sanitize_driver: [0-9]+ cases, [0-9]+ failed, [0-9]+ ops without a case(, [0-9]+ skipped, '\
'[0-9]+ not run)?' "$log" | sed 's/gpu_sanitize_driver: /driver: /'
      } | sed 's/ *$//' | sort | uniq -c | sed 's/^ *1 //; s/^ *\([0-9]*\) /\1x /' | tr '\n' ';' | cut -c1-200 ;;
    bench:*) grep -E 'budget|^wrote|Traceback|Error' "$log" | tail -1 | cut -c1-160 ;;
    env) grep -E '^device' "$log" | head -1 ;;
    info) grep -E '^CUDA kernels|^device copy' "$log" | tr '\n' ';' | cut -c1-160 ;;
    *) tail -n 1 "$log" | cut -c1-160 ;;
  esac
}

# run_step SEQ NAME CAP DEADLINE REQUIRED COMMAND: runs COMMAND under `timeout`, at most CAP seconds and never past
# DEADLINE (seconds since the start; the command sees its cap's end as $STEP_END, epoch seconds). Records ok |
# FAILED | TIMEOUT | PARTIAL (a sanitizer step whose driver stopped starting cases at --stop-at) | skipped | not-run.
run_step() {
  local seq="$1" name="$2" max="$3" deadline="$4" req="$5" cmd="$6"
  local log="$LOGDIR/${name//[:\/]/_}.log"
  if [ -n "${GPU_CHECK_STEPS:-}" ] && ! listed "$name" "$GPU_CHECK_STEPS"; then
    record "$seq" "$name" skipped - 0 "$req" "not in GPU_CHECK_STEPS"; return 0
  fi
  if listed "$name" "${GPU_CHECK_SKIP:-}"; then
    record "$seq" "$name" skipped - 0 "$req" "GPU_CHECK_SKIP"; echo "=== $name: skipped by request"; return 0
  fi
  local left=$(( deadline - (SECONDS - T0) ))
  local lim=$(( max < left ? max : left ))
  if (( left < MIN_STEP )); then
    record "$seq" "$name" not-run - 0 "$req" "time budget"; echo "=== $name: not run (time budget spent)"; return 0
  fi
  echo "=== $name (cap ${lim}s, $(( SECONDS - T0 ))s in)"
  local s0=$SECONDS
  STEP_END=$(( $(date +%s) + lim )) timeout -k "$GRACE" "$lim" bash -c "$cmd" >"$log" 2>&1
  local rc=$?
  local dt=$(( SECONDS - s0 )) state=ok
  if (( rc == 124 || rc == 137 )); then state=TIMEOUT
  elif (( rc == 3 )) && [[ "$name" == *check ]]; then state=PARTIAL   # the driver stopped at --stop-at
  elif (( rc != 0 )); then state=FAILED; fi
  record "$seq" "$name" "$state" "$rc" "$dt" "$req" "$(note_for "$name" "$log")"
  echo "    $name -> $state (rc=$rc, ${dt}s); last lines:"
  tail -n 3 "$log" | cut -c1-160 | sed 's/^/    | /'
}

# ------------------------------------------------------------------------------------------------ phase A: serial
if [ "$DRY" = 1 ]; then
  ENV_CMD="echo '[dry run] nvidia-smi, nvcc, compute-sanitizer: stubbed'; $PY $LIB env-report --dry-run"
  BUILD_CMD="echo '[dry run] stub for: TORCH_CUDA_ARCH_LIST=9.0 SAML_BUILD_CUDA=1 setup.py build_ext --inplace'"
  CEILING=""
else
  # compute-sanitizer: on PATH, else where CUDA toolkits put it (GPU_CHECK_SANITIZER overrides)
  SAN_BIN="${GPU_CHECK_SANITIZER:-$(command -v compute-sanitizer || true)}"
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -z "$SAN_BIN" ] && [ -x "$c" ] && SAN_BIN="$c"
  done
  SAN_BIN="${SAN_BIN:-compute-sanitizer}"
  ENV_CMD="$PY $LIB env-report; nvidia-smi; nvcc --version | tail -2; echo \"sanitizer: $SAN_BIN\"; \
$SAN_BIN --version | tail -1"
  BUILD_CMD="rm -f saml_kernels/_C*.so; TORCH_CUDA_ARCH_LIST=9.0 SAML_BUILD_CUDA=1 MAX_JOBS=$NPROC \
$PY setup.py build_ext --inplace"
  CEILING="$PY - <<'EOF'
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
fi
ENV_CMD="$ENV_CMD; echo cores: $NPROC"

run_step 10 env "$(cap env 30)" "$BUDGET" 1 "$ENV_CMD"
cat "$LOGDIR/env.log" 2>/dev/null | head -40
run_step 20 build "$(cap build 150)" "$BUDGET" 1 "$BUILD_CMD"
run_step 30 info "$(cap info 25)" "$BUDGET" 1 "$PY -m saml_kernels.info${CEILING:+; $CEILING}"

# ------------------------------------------------------------------------------------------------ phase B: two lanes
shopt -s nullglob
BENCHES=(${GPU_CHECK_BENCHES:-benchmarks/bench_*.py})
will_run() {  # will_run NAME: not left out by GPU_CHECK_STEPS / GPU_CHECK_SKIP
  { [ -z "${GPU_CHECK_STEPS:-}" ] || listed "$1" "$GPU_CHECK_STEPS"; } && ! listed "$1" "${GPU_CHECK_SKIP:-}"
}
N_BENCH=0
for b in "${BENCHES[@]}"; do will_run "bench:$(basename "$b" .py)" && N_BENCH=$(( N_BENCH + 1 )); done
DEADLINE_B=$(( BUDGET - N_BENCH * BENCH_MIN ))   # the lanes leave each benchmark that will run its minimum
# the GPU tests of the code changed since the last device run: csrc/cuda's kernels (the *_gpu files, test_cuda_*),
# the Triton kernels (their (cuda, triton) cases are in the same files; partitioned_norm's in its own), graphs and
# capture-safe mode (test_host_syncs, test_fused_training's graph replay), hashed scenario tables, the check
# sites, stochastic rounding
DEFAULT_NEW="tests/test_mbranch_mutual_gpu.py tests/test_scenario_embedding_bag_gpu.py tests/test_cuda_*.py \
tests/test_host_syncs.py tests/test_fused_training.py tests/test_partitioned_norm.py \
tests/test_hashed_scenario_rows.py tests/test_check_sites.py tests/test_stochastic_rounding.py tests/test_eager_ops.py"
NEW_TESTS=(${GPU_CHECK_NEW_TESTS:-$DEFAULT_NEW})
REST_TESTS="${GPU_CHECK_REST_TESTS:-tests}"
IGNORES=""
for f in "${NEW_TESTS[@]}"; do IGNORES="$IGNORES --ignore=$f"; done

LANES_PARALLEL=1; [ "${GPU_CHECK_SERIAL:-0}" = 1 ] && LANES_PARALLEL=0
WORKERS="${GPU_CHECK_WORKERS:-}"
if [ -z "$WORKERS" ]; then
  WORKERS=$(( LANES_PARALLEL ? NPROC - 3 : NPROC )); (( WORKERS < 2 )) && WORKERS=2   # cores left for a sanitizer
fi
XDIST=""
if (( WORKERS > 0 )) && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n $WORKERS"; fi
PTO=""
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  PTO="--timeout=${GPU_CHECK_TEST_TIMEOUT:-90} --timeout-method=thread"
fi

# pytest_cmd NAME PATHS...: the GPU tests of PATHS, results streamed to logs/NAME.tsv; exit 5 (nothing selected) is ok
pytest_cmd() {
  local name="$1"; shift
  echo "GPU_CHECK_RESULTS='$LOGDIR/$name.tsv' PYTHONPATH='$ROOT/benchmarks':\$PYTHONPATH $PY -m pytest -q -rfE \
-p no:cacheprovider -p gpu_check_lib $XDIST $PTO --junitxml='$LOGDIR/$name.xml' ${GPU_CHECK_PYTEST_ARGS:-} $* ; \
rc=\$?; [ \$rc = 5 ] && { echo 'no test selected'; rc=0; }; exit \$rc"
}

lane_tests() {
  if (( ${#NEW_TESTS[@]} )); then
    run_step 40 tests_new "$(cap tests_new 150)" "$DEADLINE_B" 1 "$(pytest_cmd tests_new "${NEW_TESTS[@]}")"
  else
    record 40 tests_new skipped - 0 1 "no file matches GPU_CHECK_NEW_TESTS"
  fi
  run_step 41 tests_rest "$(cap tests_rest 240)" "$DEADLINE_B" 1 \
    "$(pytest_cmd tests_rest $REST_TESTS $IGNORES --ignore=tests/test_gpu_check_dry_run.py)"
}

DRIVER="${GPU_CHECK_DRIVER:-benchmarks/gpu_sanitize_driver.py}"
SAN_OPTS="${GPU_CHECK_SANITIZER_OPTS:---error-exitcode 1 --print-limit 20}"
# san_cmd TOOL PARTS ENV RESERVE: the driver under compute-sanitizer (dry run: the driver alone, on the CPU); it
# starts no case later than RESERVE seconds before the step's cap, so it exits by itself and the tool's summary
# is printed
san_cmd() {
  local tool="$1" parts="$2" env="$3" reserve="$4"
  local args="--parts $parts --stop-at \$(( STEP_END - $reserve )) ${GPU_CHECK_DRIVER_ARGS:-}"
  if [ "$DRY" = 1 ]; then echo "$env $PY $DRIVER --dry-run $args"
  else echo "$env $SAN_BIN --tool $tool $SAN_OPTS $PY $DRIVER $args"; fi
}
NOCACHE="PYTORCH_NO_CUDA_MEMORY_CACHING=1"

lane_sanitize() {
  local seq=50 tool req cmd
  for tool in ${GPU_CHECK_SANITIZERS:-memcheck racecheck synccheck initcheck}; do
    case "$tool" in
      # memcheck: two processes (the graph needs the caching allocator); the first leaves the second >= 45 s
      memcheck)  req=1
                 cmd="$(san_cmd memcheck direct,api "$NOCACHE" 45); a=\$?; $(san_cmd memcheck graph "" 10); b=\$?"
                 cmd="$cmd; exit \$(( a ? a : b ))" ;;
      racecheck) req=1; cmd="$(san_cmd racecheck direct,api,graph "" 20)" ;;
      synccheck) req=0; cmd="$(san_cmd synccheck direct,api,graph "" 20)" ;;
      initcheck) req=0; cmd="$(san_cmd initcheck direct,api "$NOCACHE" 20)" ;;
      *) record "$seq" "$tool" FAILED - 0 1 "unknown sanitizer tool"; continue ;;
    esac
    local def; case "$tool" in memcheck) def=110 ;; racecheck) def=90 ;; *) def=45 ;; esac
    run_step "$seq" "$tool" "$(cap "$tool" "$def")" "$DEADLINE_B" "$req" "$cmd"
    seq=$(( seq + 1 ))
  done
}

if (( LANES_PARALLEL )); then
  lane_tests & P1=$!
  lane_sanitize & P2=$!
  wait "$P1" "$P2"
else
  lane_tests
  lane_sanitize
fi
[ -s "$LOGDIR/tests_new.tsv" ] && "$PY" "$LIB" results-report "$LOGDIR/tests_new.tsv" "$LOGDIR/tests_new.log"
[ -s "$LOGDIR/tests_rest.tsv" ] && "$PY" "$LIB" results-report "$LOGDIR/tests_rest.tsv" "$LOGDIR/tests_rest.log"

# ------------------------------------------------------------------------------------------------ phase C: benchmarks
if [ "$DRY" = 1 ]; then BENCH_MODE="--quick --no-compile"; else BENCH_MODE="--gpu --no-compile"; fi
i=0; done_n=0   # the time left is shared among the benchmarks still to run
for bench in "${BENCHES[@]}"; do
  name="bench:$(basename "$bench" .py)"
  left_n=$(( N_BENCH - done_n )); (( left_n < 1 )) && left_n=1
  share=$(( (BUDGET - (SECONDS - T0)) / left_n ))
  c=$(cap "$name" 60); (( share < c )) && c=$share
  bb=$(( c - BENCH_MARGIN )); (( bb < 1 )) && bb=1
  run_step $(( 60 + i )) "$name" "$c" "$BUDGET" 1 "$PY $bench $BENCH_MODE --budget-s $bb --out-dir '$RESULTS_DIR'"
  will_run "$name" && done_n=$(( done_n + 1 ))
  i=$(( i + 1 ))
done

# ------------------------------------------------------------------------------------------------ collect
NEW_RESULTS=()
while IFS= read -r f; do NEW_RESULTS+=("$f"); done < <(find "$RESULTS_DIR" -type f -newer "$MARK" 2>/dev/null | sort)
{
  for f in "$LOGDIR"/*.log; do echo "################ $(basename "$f")"; tail -c 2000000 "$f"; echo; done
} >"$OUTDIR/all_logs.txt" 2>/dev/null
{
  for f in "${NEW_RESULTS[@]}"; do case "$f" in *.md) echo "################ $f"; cat "$f"; echo ;; esac; done
} >"$OUTDIR/bench_results.md"
REL=()   # result files inside the repository travel as benchmarks/results/<name>; others are already in logs/
for f in "${NEW_RESULTS[@]}"; do case "$f" in "$ROOT"/*) REL+=("${f#"$ROOT"/}") ;; esac; done
TAR_ARGS=(-C "$(dirname "$LOGDIR")" logs)
(( ${#REL[@]} )) && TAR_ARGS+=(-C "$ROOT" "${REL[@]}")
tar czf "$OUTDIR/gpu_results.tar.gz" "${TAR_ARGS[@]}" 2>/dev/null || echo "gpu_check: packing gpu_results.tar.gz failed"

FAILURES="$LOGDIR/failures.txt"; : >"$FAILURES"
for t in tests_new tests_rest; do
  [ -s "$LOGDIR/$t.tsv" ] && "$PY" "$LIB" results-failures "$LOGDIR/$t.tsv" "$LOGDIR/$t.log" >>"$FAILURES" 2>/dev/null
done
DEVICE="$(grep -E '^device' "$LOGDIR/env.log" 2>/dev/null | head -1 | cut -c9-60)"
DRYNOTE=""; [ "$DRY" = 1 ] && DRYNOTE=", DRY RUN (GPU parts stubbed)"
HEADER="gpu_check summary: $(date -u +%FT%TZ), ${DEVICE:-device unknown}, $(( SECONDS - T0 ))s of ${BUDGET}s budget"
HEADER="$HEADER$DRYNOTE; outputs in $OUTDIR"
BASENAMES=(); for f in "${NEW_RESULTS[@]}"; do BASENAMES+=("$(basename "$f")"); done
"$PY" "$LIB" summary "$STEPS" "$HEADER" "$FAILURES" ${BASENAMES[@]+"${BASENAMES[@]}"} >"$OUTDIR/summary.txt" 2>&1
STATUS=$?
if ! grep -q '^RESULT: ' "$OUTDIR/summary.txt"; then   # the summary script broke: the raw table, and fail
  { cat "$STEPS"; echo "RESULT: FAILED (summary script broke, rc=$STATUS)"; } >>"$OUTDIR/summary.txt"; STATUS=1
fi
echo
cat "$OUTDIR/summary.txt"
exit "$STATUS"
