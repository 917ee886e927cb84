"""Shared test helpers: which (device, backend) pairs exist on this machine, and random-input makers.

The normal run covers every backend available here. The Triton kernels run on CPU tensors only under
``TRITON_INTERPRET=1`` (set before triton is imported), in a second pytest run: ``pytest -m triton_interp``
(see the Makefile). Those (cpu, triton) cases carry the ``triton_interp`` mark.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import saml_kernels
from saml_kernels import _backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INTERPRET = _backend.triton_interpret()


def device_backends(op: str, *, include_reference: bool = True):
    """pytest params (device, backend) for every backend that can serve ``op`` here."""
    params = []
    for dev in DEVICES:
        for b in _backend.available_backends(dev, op):
            if b == "reference" and not include_reference:
                continue
            marks = [pytest.mark.triton_interp] if (b == "triton" and dev == "cpu") else []
            params.append(pytest.param(dev, b, id=f"{dev}-{b}", marks=marks))
    return params


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of NaNs shaped like ``t``: outputs written into it must overwrite every element."""
    return torch.full_like(t, float("nan"))


def tolerance(dtype: torch.dtype) -> dict:
    """atol/rtol for comparing a ``dtype`` result to the float64 reference (float32 accumulation)."""
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=1e-5, rtol=1e-5),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    }[dtype]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (derived from its id) so tests never share inputs, yet reruns reproduce."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


class SyncCounter:
    """Counts Python-level host reads of tensor data (bool/int/float/index/item/tolist) inside a ``with`` block:
    each one is a device sync on a GPU. (The C++ CPU kernels never read device data back.)"""

    NAMES = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")

    def __enter__(self):
        self.count, self.saved = 0, {}
        for n in self.NAMES:
            orig = self.saved[n] = getattr(torch.Tensor, n)

            def wrapped(t, *a, _orig=orig, **k):
                self.count += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, n, wrapped)
        return self

    def __exit__(self, *exc):
        for n, orig in self.saved.items():
            setattr(torch.Tensor, n, orig)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous port of a spawned gloo group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_checked(worker, args: tuple, world: int, done_dir) -> None:
    """``torch.multiprocessing.spawn(worker, args + (str(done_dir),), nprocs=world)`` for gloo tests whose workers
    write a marker file ``done_dir/<rank>`` after their last assertion.

    In full-suite runs a rank sometimes aborts at gloo teardown ("terminate called without an active exception",
    SIGABRT) after every check has passed; the cause is not known. Only that case is tolerated: an abort with
    every rank's marker present. A failed assertion (ProcessRaisedException), any other signal, or a missing
    marker still fails the test."""
    import pathlib

    import torch.multiprocessing as mp

    try:
        mp.spawn(worker, args=tuple(args) + (str(done_dir),), nprocs=world, join=True)
    except mp.ProcessExitedException as exc:
        done = sorted(p.name for p in pathlib.Path(done_dir).iterdir())
        if exc.signal_name != "SIGABRT" or done != sorted(str(r) for r in range(world)):
            raise
