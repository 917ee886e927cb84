"""Shared test helpers: which (device, backend) pairs exist on this machine, and random-input makers.

The normal run covers every backend available here. The Triton kernels run on CPU tensors only under
``TRITON_INTERPRET=1`` (set before triton is imported), in a second pytest run: ``pytest -m triton_interp``
(see the Makefile). Those (cpu, triton) cases carry the ``triton_interp`` mark.
"""
from __future__ import annotations

import os
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


def gpu_backends(op: str):
    """pytest params (device, backend) for the GPU backends (triton, cuda) that can serve ``op`` here: the CUDA
    ones (mark ``gpu``) and, under TRITON_INTERPRET=1, triton on CPU tensors (mark ``triton_interp``); one
    skipped placeholder when there is none, so a GPU test file never collects nothing silently."""
    params = []
    for dev in DEVICES:
        for be in ("triton", "cuda"):
            if _backend.why_unavailable(be, dev, op) is None:
                marks = [pytest.mark.triton_interp] if dev == "cpu" else [pytest.mark.gpu]
                params.append(pytest.param(dev, be, id=f"{dev}-{be}", marks=marks))
    if not params:
        params.append(pytest.param("cuda", "cuda", id="no-gpu-backend",
                                   marks=pytest.mark.skip(reason="no GPU, and triton runs on CPU only under "
                                                          "TRITON_INTERPRET=1")))
    return params


def _covering_rows(axes):
    """Rows (index tuples) of the product of ``axes`` in which every pair of values of any two axes occurs at least
    once: greedy, deterministic (the first row that covers the most uncovered pairs, in product order)."""
    import itertools

    product = list(itertools.product(*[range(len(a)) for a in axes]))
    if len(axes) < 3:
        return product

    def pairs(row):
        return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(row)), 2)}

    todo = set().union(*(pairs(r) for r in product))
    rows = []
    while todo:
        best = max(product, key=lambda r: len(pairs(r) & todo))
        rows.append(best)
        todo -= pairs(best)
    return sorted(rows)


def interp_covering(pairs, *axes):
    """pytest params (device, backend, *values) over ``pairs`` (from device_backends / gpu_backends) and the value
    lists ``axes`` (tuples are spread into several arguments): the whole product for every backend, except Triton
    under the CPU interpreter (seconds per case), which gets a pairwise covering subset -- every pair of values of
    any two axes occurs (each axis here selects an independent kernel branch: a constexpr activation, a dtype's
    load/store casts, an optional operand), so every branch and every two-way interaction still runs."""
    import itertools

    params = []
    for p in pairs:
        dev, be = p.values[:2]
        if dev == "cpu" and be == "triton":
            rows = _covering_rows(axes)
        else:
            rows = list(itertools.product(*[range(len(a)) for a in axes]))
        for row in rows:
            vals, ids = [], [p.id]
            for axis, k in zip(axes, row):
                v = axis[k]
                vals.extend(v if isinstance(v, tuple) else (v,))
                ids.append("-".join(_id(x) for x in (v if isinstance(v, tuple) else (v,))))
            params.append(pytest.param(dev, be, *vals, id="-".join(ids), marks=p.marks))
    return params


def _id(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return str(v)


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


# The bad-input suite (tests/test_bad_input*.py) runs once, in the fresh child process of its runner test; the
# parent run deselects the cases. SAML_BAD_INPUT_CHILD=1 marks that child (or runs the cases in-process by hand).
BAD_INPUT_CHILD = os.environ.get("SAML_BAD_INPUT_CHILD") == "1"
BAD_INPUT_RUNNER = "test_bad_input_suite_in_a_fresh_process"


def pytest_collection_modifyitems(config, items):
    if BAD_INPUT_CHILD:
        return
    keep, cases = [], []
    for item in items:
        in_suite = item.path.name.startswith("test_bad_input")
        (cases if in_suite and item.originalname != BAD_INPUT_RUNNER else keep).append(item)
    if cases:
        config.hook.pytest_deselected(items=cases)
        items[:] = keep


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (derived from its id) so tests never share inputs, yet reruns reproduce."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test; the previous mode and thread count are restored."""
    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev_det)
    torch.set_num_threads(prev_threads)


# The shared small synthetic data set and SAML configuration of the model tests: big enough that every feature,
# scenario and the sequence occur in a 64-row batch, small enough that building a model takes milliseconds; a
# non-zero aux loss weight so the aux head trains too.
SMALL_VOCAB = dict(num_users=60, num_items=80, num_categories=7, num_contexts=5, num_segments=6, num_tags=11)
SMALL_SAML = dict(embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6), aux_loss_weight=0.4)


def small_data(n: int = 300, *, seq_len: int = 6, seed: int | None = None, **kw):
    """make_synthetic with the small vocabulary; ``seed`` None draws it from torch's generator (seeded per test
    by ``_fresh_seed``), so each test gets its own data and reruns reproduce it."""
    from saml_kernels.data import make_synthetic

    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    return make_synthetic(n, **{**SMALL_VOCAB, **kw}, seq_len=seq_len, seed=seed)


def small_config(data, **kw):
    """SAMLConfig.from_data(data) with the small dimensions (SMALL_SAML), overridden by ``kw``."""
    from saml_kernels.nn import SAMLConfig

    return SAMLConfig.from_data(data, **{**SMALL_SAML, **kw})


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


# Thread names torch gives a process group's threads: gloo's worker threads and its TCP event loop, the TCPStore
# daemon (libuv or classic). On a torch that leaves them unnamed the check below is vacuous.
_GROUP_THREAD_PREFIXES = ("pt_gloo", "gloo_tcp", "pt_tcpstore")


def process_group_threads() -> list[str]:
    """Names of this process's threads that belong to a torch.distributed process group (Linux /proc; [] when
    the names cannot be read)."""
    import os

    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(_GROUP_THREAD_PREFIXES):
            names.append(name)
    return names


def _checked_rank(rank, worker, args, done_dir):
    """One spawned rank: ``worker(rank, *args)``, the collection of its garbage, the clean-teardown check, then
    the marker."""
    import gc
    import os

    worker(rank, *args)
    # TorchRec's sharded modules hold their process group in reference cycles: collected here, the group's
    # threads end before the process exits rather than during interpreter shutdown
    gc.collect()
    left = process_group_threads()
    assert not left, (
        f"rank {rank}: process-group threads still run after the worker returned: {left}. A process group "
        f"outlived destroy_process_group (something holds it, e.g. torch.distributed.nn.functional imported "
        f"after init_process_group), so gloo's threads would run into interpreter shutdown, where one releasing a "
        f"finished collective's tensors needs the GIL and aborts the process ('terminate called without an "
        f"active exception').")
    open(os.path.join(done_dir, str(rank)), "w").close()


def spawn_checked(worker, args: tuple, world: int, done_dir) -> None:
    """Runs ``worker(rank, *args)`` on ``world`` spawned processes (gloo tests) and fails on anything but a clean
    run of every rank: a failed assertion (ProcessRaisedException), any signal or non-zero exit
    (ProcessExitedException), a rank whose process-group threads outlive the worker (an AssertionError from that
    rank: those threads would run into interpreter shutdown, where they can abort the process), or a rank that
    exited 0 without reaching the end of the worker (its marker ``done_dir/<rank>`` is missing)."""
    import pathlib

    import torch.multiprocessing as mp

    mp.spawn(_checked_rank, args=(worker, tuple(args), str(done_dir)), nprocs=world, join=True)
    done = sorted(p.name for p in pathlib.Path(done_dir).iterdir())
    missing = sorted(set(str(r) for r in range(world)) - set(done))
    assert not missing, f"ranks {missing} exited 0 without finishing their worker"
