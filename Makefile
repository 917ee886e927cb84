# Quick start: `make run` (set-up + the main job), `make test` (set-up + the tests).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: setup build run test test-fast test-interp bench clean info

# Set-up (scripts/setup.sh): one progress line per stage (venv, packages, build), each stage's output in a log
# under build/ whose path is printed if the stage fails. `make run` builds the C++ CPU kernels only when no GPU is
# visible; `make test` (and so CI) builds the CUDA kernels too wherever nvcc exists, so the GPU build is proven on
# every test run. Either order of the two works: each mode keeps its own build directory.
setup:
	@PY=$(PY) scripts/setup.sh test

build:
	@PY=$(PY) scripts/setup.sh build

# The main job: the four models on MovieLens-100K (fetched into ~/.cache/saml_kernels/movielens by the data stage;
# synthetic data, with one line saying why, when it cannot be had), one seed. `python/train_saml.py --seeds 3` gives
# the full table. One torch thread: on a small shared machine two threads' barriers wait on each other under
# contention (benchmarks/results/main_job_cpu2.md is measured with one).
run:
	@PY=$(PY) scripts/setup.sh run
	@scripts/setup.sh data
	@echo "[5/5] main job: python/train_saml.py --threads 1"
	@$(VPY) python/train_saml.py --threads 1

info:
	@PY=$(PY) scripts/setup.sh run
	$(VPY) -m saml_kernels.info

# Two pytest runs: the normal suite, then the Triton kernels under the CPU interpreter
# (TRITON_INTERPRET must be set before triton is imported, so it is a separate process).
test:
	@PY=$(PY) scripts/setup.sh test
	$(VPY) -m saml_kernels.info
	$(VPY) -m pytest -q -x tests
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -m triton_interp tests

test-fast:
	@PY=$(PY) scripts/setup.sh test
	$(VPY) -m pytest -q -x tests -m "not slow"

bench:
	@PY=$(PY) scripts/setup.sh run
	$(VPY) benchmarks/run_all.py

clean:
	rm -rf build saml_kernels/*.so
