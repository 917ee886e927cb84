# Quick start: `make run` (set-up + the main job), `make test` (set-up + the tests).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
# Builds are cached in build/ (ninja, incremental); the lock keeps concurrent builds from clashing.
BUILD_LOCK := /tmp/saml_kernels_build.lock

.PHONY: setup build run test test-fast test-interp bench clean info

$(VENV)/.installed: requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed build

build: $(VENV)/.installed
	flock $(BUILD_LOCK) $(VPY) setup.py --quiet build_ext --inplace

run: setup
	$(VPY) python/train_saml.py

info: setup
	$(VPY) -m saml_kernels.info

# Two pytest runs: the normal suite, then the Triton kernels under the CPU interpreter
# (TRITON_INTERPRET must be set before triton is imported, so it is a separate process).
test: setup
	$(VPY) -m saml_kernels.info
	$(VPY) -m pytest -q -x tests
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -m triton_interp tests

test-fast: setup
	$(VPY) -m pytest -q -x tests -m "not slow"

bench: setup
	$(VPY) benchmarks/run_all.py

clean:
	rm -rf build saml_kernels/*.so
