"""Memory: 300 training steps of SAML (small config) keep resident memory flat after warm-up; every op's
forward + backward in a loop does too.

Resident memory is read from /proc/self/statm (psutil is not installed). Each step draws a fresh batch (new
tensors, as a data loader gives), so a leak of anything per step (a batch, a saved activation, a C++ buffer,
an autograd graph kept alive) accumulates. The threshold is half of what leaking one batch per step over the
measured steps would add, and a control run that deliberately leaks exactly that proves the test can fail.
"""
from __future__ import annotations

import ctypes
import gc
import os

import numpy as np
import pytest
import torch

import _reliability_cases as R

PAGE = os.sysconf("SC_PAGE_SIZE")
WARMUP, MEASURED, EVERY = 100, 200, 20
BATCH = 256
FLOOR = 2 << 20  # RSS noise of a non-leaking run here: < 0.1 MiB


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: RSS does not depend on it, and on a loaded 2-core machine OpenMP's spin-waiting
    made 2-thread steps ~40x slower (measured: 20 ms vs 840 ms per step)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc
    _LIBC = None


def rss() -> int:
    """Resident bytes after gc and glibc's malloc_trim(0): freed heap pages go back to the OS, so RSS follows the
    live allocations. Without the trim, a leak can hide in free heap left by earlier tests in the process."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _batch_bytes(batch) -> int:
    return sum(t.numel() * t.element_size() for t in vars(batch).values() if isinstance(t, torch.Tensor))


def _train(model, opt, data, steps, *, leak=None):
    """Runs ``steps`` training steps on fresh batches; RSS samples every EVERY steps after warm-up."""
    rng = np.random.default_rng(0)
    samples, per_batch = [], 0
    for i in range(steps):
        batch = data.batch(np.sort(rng.choice(len(data), BATCH, replace=False)))
        per_batch = max(per_batch, _batch_bytes(batch))
        opt.zero_grad(set_to_none=True)
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        if leak is not None:
            leak.append(batch)  # the control: keeps every batch alive
        del batch, loss
        if i + 1 >= WARMUP and (i + 1 - WARMUP) % EVERY == 0:
            gc.collect()
            samples.append(rss())
    return samples, per_batch


def _growth(samples):
    """RSS growth over the measured window (last samples vs the first, robust to one noisy sample)."""
    return int(np.median(samples[-3:]) - samples[0])


def _model_and_opt(embedding_optimizer):
    data, cfg = R.small_saml(seed=5, n=4096)
    torch.manual_seed(0)
    from saml_kernels.nn import SAML

    model = SAML(cfg, embedding_optimizer=embedding_optimizer) if embedding_optimizer else SAML(cfg)
    params = [p for n, p in model.named_parameters() if not (embedding_optimizer and "embedding" in n)]
    return data, model, torch.optim.Adam(params, lr=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(not R.model_available(), reason="saml_kernels.nn.SAML has not landed yet")
@pytest.mark.parametrize("embedding_optimizer", [None, "rowwise_adagrad"], ids=["dense-grads", "fused-adagrad"])
def test_saml_training_rss_flat(embedding_optimizer):
    data, model, opt = _model_and_opt(embedding_optimizer)
    samples, per_batch = _train(model, opt, data, WARMUP + MEASURED)
    growth = _growth(samples)
    threshold = max(MEASURED * per_batch // 2, FLOOR)
    assert growth < threshold, (f"RSS grew by {growth / 2**20:.1f} MiB over {MEASURED} steps after warm-up "
                                f"(threshold {threshold / 2**20:.1f} MiB = half of one leaked batch per step); "
                                f"samples (MiB): {[round(s / 2**20, 1) for s in samples]}")


@pytest.mark.slow
@pytest.mark.skipif(not R.model_available(), reason="saml_kernels.nn.SAML has not landed yet")
def test_leaking_control_trips_the_threshold():
    """Control: the same loop, keeping every batch alive, must exceed the threshold used above."""
    data, model, opt = _model_and_opt(None)
    leak = []
    samples, per_batch = _train(model, opt, data, WARMUP + MEASURED, leak=leak)
    growth = _growth(samples)
    threshold = max(MEASURED * per_batch // 2, FLOOR)
    assert MEASURED * per_batch >= 2 * FLOOR, f"batch too small ({per_batch} B) for the control to be meaningful"
    assert growth > threshold, f"a real leak of {MEASURED * per_batch / 2**20:.1f} MiB grew RSS by only {growth / 2**20:.1f} MiB"
    del leak


@pytest.mark.parametrize("op", R.ALL_OPS)
def test_op_loop_rss_flat(op):
    """300 forward+backward calls of an op (fresh inputs each call) keep RSS flat on the default CPU backend."""
    if not R.op_available(op):
        pytest.skip(f"{op} has not landed yet")
    cases = [R.make_case(op, seed=s, size="medium") for s in range(4)]
    samples = []
    for i in range(300):
        out = cases[i % 4]["call"](None)
        del out
        if i + 1 >= 100 and (i + 1) % 20 == 0:
            gc.collect()
            samples.append(rss())
    growth = _growth(samples)
    assert growth < FLOOR, f"{op}: RSS grew {growth / 2**20:.1f} MiB over 200 calls: {[s >> 20 for s in samples]}"
