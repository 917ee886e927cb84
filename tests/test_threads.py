"""Thread safety: 4 Python threads calling the ops concurrently (forward + backward, mixed ops and inputs) get
bitwise the same results as serial calls; the backend choice of ``use_backend`` stays thread-local.

The GIL is released inside ATen and the C++ kernels, so the threads really overlap in the kernels; shared
state (layout caches, warn-once flags, backend stacks) is what this guards.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import saml_kernels
import _reliability_cases as R
from saml_kernels import _backend
from test_determinism import _assert_bitwise

THREADS = 4
CPU_BACKENDS = [b for b in ("reference", "cpu") if b in saml_kernels.available_backends("cpu")]


def _tasks(backend):
    """(key, callable) pairs over every landed op, several seeds and sizes, plus the embedding's pooling modes."""
    tasks = []
    for op in R.landed_ops():
        for seed in (1, 2, 3):
            case = R.make_case(op, seed=seed, size="medium" if seed != 2 else "small")
            tasks.append(((op, seed), lambda c=case: c["call"](backend)))
        if op == "scenario_embedding_bag":
            case = R.make_case(op, seed=9, size="medium")
            tasks.append(((op, "mean"), lambda c=case: c["call"](backend, pooling="mean")))
    return tasks


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_concurrent_calls_match_serial(backend, deterministic):
    tasks = _tasks(backend)
    serial = {k: fn() for k, fn in tasks}
    # every thread runs every task, each thread in a different order, twice: many overlapping pairs
    barrier = threading.Barrier(THREADS)

    def worker(t):
        barrier.wait()
        seq = tasks[t:] + tasks[:t]
        return [(k, fn()) for _ in range(2) for k, fn in seq]

    with ThreadPoolExecutor(THREADS) as ex:
        results = list(ex.map(worker, range(THREADS)))
    n = 0
    for t, res in enumerate(results):
        for k, got in res:
            _assert_bitwise(serial[k], got, f"thread {t}, task {k}")
            n += 1
    assert n == THREADS * 2 * len(tasks)


def test_use_backend_is_thread_local():
    """A use_backend() context in one thread does not change the backend another thread resolves."""
    op = "scenario_embedding_bag"
    auto = _backend.resolve(op, "cpu")
    errors = []
    barrier = threading.Barrier(THREADS)

    def worker(t):
        try:
            if t % 2:
                with saml_kernels.use_backend("reference"):
                    barrier.wait()
                    for _ in range(200):
                        assert _backend.resolve(op, "cpu") == "reference"
            else:
                barrier.wait()
                for _ in range(200):
                    assert _backend.resolve(op, "cpu") == auto
        except Exception as exc:  # collected: an assert in a thread would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


@pytest.mark.skipif(not R.model_available(), reason="saml_kernels.nn.SAML has not landed yet")
def test_concurrent_model_forward_backward(deterministic):
    """Four threads, each training its own SAML replica on the same batches, end bitwise equal to a serial run."""
    data, cfg = R.small_saml(seed=2, n=512)
    batches = list(data.batches(128))

    # models are built here, serially: initialisation draws from the global RNG, which threads would interleave
    models = [R.make_saml(cfg, seed=4) for _ in range(THREADS + 1)]

    def train(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for b in batches:
            opt.zero_grad()
            model.loss(b).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    serial = train(models[-1])
    with ThreadPoolExecutor(THREADS) as ex:
        outs = list(ex.map(train, models[:THREADS]))
    for t, o in enumerate(outs):
        _assert_bitwise(serial, o, f"model replica in thread {t}")
