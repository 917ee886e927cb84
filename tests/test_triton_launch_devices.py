"""Every tensor a Triton launcher hands to a kernel is on the launcher's inputs' device: a guard that runs without a GPU.

Why: under TRITON_INTERPRET every tensor is on the CPU, so a stand-in created with the CPU default (``torch.zeros(1)``,
``torch.empty(0)``, ``device="cpu"``) for an absent operand passes every interpreter test, and only a real GPU launch
fails ("Pointer argument (at 8) cannot be accessed from Triton (cpu tensor?)"; seen on an H200 with the embedding
forward without per_sample_weights).

How: the inputs live on the ``meta`` device (no data, nothing computes) and ``KernelInterface.__getitem__`` (the
``kernel[grid](...)`` launch of plain, autotuned and interpreted kernels alike) is replaced by a recorder that keeps
the arguments and runs nothing. Every tensor argument of every recorded launch must be on ``meta``; a CPU stand-in
shows up as ``cpu``. The few host reads of data-dependent sizes in the embedding backward (a sync on a GPU, impossible
on meta) are stubbed with fixed sizes.

The current device: a Triton launch runs on the *current* CUDA device and its stream, not on its pointers' device,
so every launcher must make its tensors' device current (``saml_kernels.triton.launch_device``). Checked without a
GPU by running every case on fake tensors on ``cuda:1`` (``FakeTensorMode``: shapes and devices, no data) while
``cuda:0`` is current, with ``torch.cuda.device`` replaced by a recorder of the current device (a mock of torch.cuda:
the real one would initialise CUDA); each recorded launch must see ``cuda:1`` current.

Completeness: the launchers checked must be exactly the public functions each ``saml_kernels.triton`` module defines
(minus a short, explained list of helpers that launch nothing), and every ``*_kernel`` of a module must be launched by
some case, so a new launcher or kernel cannot be forgotten. Runs in the normal and the interpreter test runs.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

triton = pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

import saml_kernels.triton as tpkg  # noqa: E402
from saml_kernels.triton import mbranch_linear as mbl  # noqa: E402
from saml_kernels.triton import mutual_unit as mu  # noqa: E402
from saml_kernels.triton import partitioned_norm as pn  # noqa: E402
from saml_kernels.triton import scenario_embedding_bag as seb  # noqa: E402
from saml_kernels.triton import scenario_embedding_bag_8bit as seb8  # noqa: E402

pytestmark = pytest.mark.triton_interp

META = torch.device("meta")
CUDA1 = torch.device("cuda", 1)
_ON = {"device": META}  # the device of the cases' inputs (cuda:1 fake tensors in the current-device test)

# Public functions that launch no kernel (pure host-side planning / spec listing), per module.
NOT_LAUNCHERS = {
    "mbranch_linear": {"aot_specs", "sort_by_scenario", "fixed_mm_config", "fixed_wg_config"},
    "mutual_unit": {"aot_specs", "fused_supported"},
    "_mutual_kernels": set(),  # the mutual kernels' device code; mutual_unit launches them
    "partitioned_norm": {"aot_specs"},
    "scenario_embedding_bag": {"aot_specs", "pick_config", "sorted_segments", "split_segments", "segment_sizes"},
    "scenario_embedding_bag_8bit": {"aot_specs"},
}


def _modules():
    return {i.name: importlib.import_module(f"{tpkg.__name__}.{i.name}") for i in pkgutil.iter_modules(tpkg.__path__)}


def _public_functions(mod):
    return {n for n, f in vars(mod).items()
            if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == mod.__name__}


def _base_fn(obj):
    """The @triton.jit function object behind a launch target (autotuner / heuristics wrappers unwrapped)."""
    while not hasattr(obj, "arg_names") and isinstance(getattr(obj, "fn", None), KernelInterface):
        obj = obj.fn
    return obj


def _kernel_name(obj) -> str:
    obj = _base_fn(obj)
    return getattr(getattr(obj, "fn", None), "__name__", None) or obj.__name__


def _module_kernels(mod):
    """Names of the kernels (``*_kernel`` jit functions) a module defines."""
    return {n for n, v in vars(mod).items() if isinstance(v, KernelInterface) and n.endswith("_kernel")
            and _kernel_name(v) == n}


# ------------------------------------------------------------------------------------------------ recorder

@pytest.fixture
def launches(monkeypatch):
    """Replaces every ``kernel[grid](...)`` by a recorder: list of (kernel name, {arg: value}) ."""
    seen = []

    def getitem(self, grid):
        def record(*args, **kwargs):
            fn = _base_fn(self)
            names = list(getattr(fn, "arg_names", []))
            bound = dict(zip(names, args))
            bound.update(kwargs)
            if len(args) > len(names):
                bound.update({f"arg{i}": a for i, a in enumerate(args[len(names):], len(names))})
            seen.append((_kernel_name(self), bound))
        return record

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    return seen


def _assert_on(device, launches, outputs=()):
    assert launches, "the case launched no kernel (nothing was checked)"
    wrong = [f"{k}: {a} on {v.device}" for k, bound in launches for a, v in bound.items()
             if isinstance(v, torch.Tensor) and v.device != device]
    assert not wrong, f"kernel arguments not on the inputs' device {device}:\n" + "\n".join(wrong)
    for t in outputs:
        if isinstance(t, torch.Tensor):
            assert t.device == device, f"a launcher output is on {t.device}, inputs on {device}"


def _m(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=_ON["device"])


# ------------------------------------------------------------------------------------------------ cases
# Each case: fn(monkeypatch) -> launcher outputs; runs one launcher on meta inputs (optional operands absent and
# present, both code paths where the launcher branches).

def _mbl_grouped_forward(mp):
    M, B, K, N, Ka = 3, 10, 5, 7, 2
    outs = []
    for aux, act, bias in ((True, 3, True), (False, 0, False)):
        outs += mbl.grouped_forward(_m(B, K), _m(M, K, N), _m(M, N) if bias else None, _m(B, Ka) if aux else None,
                                    _m(M, Ka, N) if aux else None, _m(B, dtype=torch.int64), act)
    return outs


def _mbl_all_forward(mp):
    M, B, K, N, Ka = 3, 10, 5, 7, 2
    outs = []
    for x, aux, act, bias in ((_m(B, K), True, 4, True), (_m(M, B, K), False, 1, False)):
        outs += mbl.all_forward(x, _m(M, K, N), _m(M, N) if bias else None, _m(B, Ka) if aux else None,
                                _m(M, Ka, N) if aux else None, act)
    return outs


def _mbl_grouped_backward(mp):
    M, B, K, N, Ka = 3, 10, 5, 7, 2
    s = _m(B, dtype=torch.int64)
    outs = list(mbl.grouped_backward(_m(B, N), _m(B, K), _m(M, K, N), _m(B, Ka), _m(M, Ka, N), s,
                                     True, True, True, True, True))
    outs += mbl.grouped_backward(_m(B, N), _m(B, K), _m(M, K, N), None, None, s, True, False, True, False, False)
    return outs


def _mu_forward(mp):
    outs = []
    for N in (7, 300):                                     # single-tile and two-pass paths
        for sim in (0, 1):
            outs += mu.mutual_forward(_m(3, 6, N), _m(6, dtype=torch.int64), 0.7, sim)
    return outs


def _mu_backward(mp):
    return [mu.mutual_backward(_m(6, N), _m(3, 6, N), _m(6, dtype=torch.int64), _m(6, 3), 0.7, sim)
            for N in (7, 300) for sim in (0, 1)]


def _linear_inputs(M, B, K, N, Ka, dtype=torch.float32, aux=True):
    return (_m(B, K, dtype=dtype), _m(M, K, N, dtype=dtype), _m(M, N, dtype=dtype) if aux else None,
            _m(B, Ka, dtype=dtype) if aux else None, _m(M, Ka, N, dtype=dtype) if aux else None,
            _m(B, dtype=torch.int64))


def _mu_linear_forward(mp):
    outs = []
    for N, aux, dtype in ((8, True, torch.float32), (8, False, torch.float32), (300, True, torch.float32),
                          (8, True, torch.float64)):                  # fused; fused no aux; unfused (N, float64)
        assert mu.fused_supported(3, N, dtype) == (N == 8 and dtype == torch.float32)
        outs += mu.mutual_linear_forward(*_linear_inputs(3, 6, 5, N, 2, dtype, aux), 3, 0.7, 0)
    return outs


def _mu_linear_backward(mp):
    outs = []
    for N, aux, dtype in ((8, True, torch.float32), (8, False, torch.float32), (300, True, torch.float32),
                          (8, True, torch.float64)):
        x, w, b, a, wa, s = _linear_inputs(3, 6, 5, N, 2, dtype, aux)
        outs.append(mu.mutual_linear_backward(_m(6, N, dtype=dtype), x, w, b, a, wa, s, _m(6, 3), 3, 0.7, 0))
    return outs


def _seb_inputs(Fs, psw):
    B, F, D, R, M, Rs, nnz = 4, 2, 16, 30, 3, 20, 9
    idx = _m(nnz, dtype=torch.int64)
    return dict(indices=idx, offsets=_m(F * B + 1, dtype=torch.int64), scenario=_m(B, dtype=torch.int64),
                global_weight=_m(R, D), scenario_weight=_m(M, Rs if Fs else 0, D),
                feature_rows=_m(F + 1, dtype=torch.int64), feature_scenario_rows=_m(F + 1, dtype=torch.int64),
                aware_slot=_m(F, dtype=torch.int64), per_sample_weights=_m(nnz) if psw else None), (B, F, D, nnz)


def _seb_forward(mp):
    outs = []
    for Fs, psw, pooling, check in ((1, False, seb.SUM, True), (1, True, seb.MEAN, False), (0, False, seb.NONE, True)):
        mp.setattr(seb, "_num_aware", lambda _slot, fs=Fs: fs)          # a host read of aware_slot.max()
        kw, _ = _seb_inputs(Fs, psw)
        outs += seb.forward(**kw, pooling=pooling, bag_len=2 if pooling == seb.NONE else 0, check=check)
    return outs


def _seb8_forward(mp):
    outs = []
    for Fs, psw, pooling, check in ((1, False, seb8.SUM, True), (1, True, seb8.MEAN, False),
                                    (0, False, seb8.NONE, True)):
        kw, _ = _seb_inputs(Fs, psw)
        kw["global_packed"] = _m(*kw.pop("global_weight").shape[:-1], 16 + 8, dtype=torch.uint8)
        kw["scenario_packed"] = _m(*kw.pop("scenario_weight").shape[:-1], 16 + 8, dtype=torch.uint8)
        outs += seb8.forward(**kw, pooling=pooling, bag_len=2 if pooling == seb8.NONE else 0, check=check,
                             num_aware=Fs)
    return outs


def _seb_backward_rows(mp):
    outs = []
    for Fs, psw, longest in ((1, False, 3), (1, True, seb.PIECE + 5), (0, False, 2)):
        kw, (B, F, D, nnz) = _seb_inputs(Fs, psw)
        U, npieces = 7, 9
        # Data-dependent sizes (host reads on a GPU) stubbed: U unique keys, all real, the longest segment given.
        mp.setattr(seb, "sorted_segments", lambda keys, U=U: (_m(U, dtype=torch.int64), _m(keys.numel(), dtype=torch.int64),
                                                               _m(U + 1, dtype=torch.int64)))
        mp.setattr(seb, "segment_sizes", lambda uniq, seg, ng_, nr_, lg=longest: (4, uniq.numel(), lg))
        mp.setattr(seb, "split_segments", lambda seg, piece, n=npieces: (_m(n, dtype=torch.int64),
                                                                        _m(n, dtype=torch.int64),
                                                                        _m(seg.numel() - 1, dtype=torch.int64),
                                                                        _m(seg.numel() - 1, dtype=torch.int64)))
        outs += seb.backward_rows(_m(B, F, D), _m(B, Fs, D), **kw, pooling=seb.SUM, bag_len=0, need_psw_grad=psw)
    return outs


def _seb_scenario_local(mp):
    return [seb.scenario_local_rows(_m(9, dtype=dt), 30, 7) for dt in (torch.int64, torch.int32)]


def _pn_stats(mp):
    return list(pn.pn_stats(_m(10, 7), _m(10, dtype=torch.int64), 3))


def _pn_forward(mp):
    return [pn.pn_forward(_m(10, 7), _m(10, dtype=torch.int64), _m(3, 7), _m(3, 7), _m(3, 7), _m(3, 7))]


def _pn_backward(mp):
    outs = []
    for batch_stats in (True, False):                     # batch statistics and running statistics
        outs += pn.pn_backward(_m(10, 7), _m(10, 7), _m(10, dtype=torch.int64), _m(3, 7), _m(3, 7), _m(3, 7),
                               _m(3, dtype=torch.int64), batch_stats)
    return outs


CASES = {
    ("mbranch_linear", "grouped_forward"): _mbl_grouped_forward,
    ("mbranch_linear", "all_forward"): _mbl_all_forward,
    ("mbranch_linear", "grouped_backward"): _mbl_grouped_backward,
    ("mutual_unit", "mutual_forward"): _mu_forward,
    ("mutual_unit", "mutual_backward"): _mu_backward,
    ("mutual_unit", "mutual_linear_forward"): _mu_linear_forward,
    ("mutual_unit", "mutual_linear_backward"): _mu_linear_backward,
    ("scenario_embedding_bag", "forward"): _seb_forward,
    ("scenario_embedding_bag", "backward_rows"): _seb_backward_rows,
    ("scenario_embedding_bag", "scenario_local_rows"): _seb_scenario_local,
    ("scenario_embedding_bag_8bit", "forward"): _seb8_forward,
    ("partitioned_norm", "pn_stats"): _pn_stats,
    ("partitioned_norm", "pn_forward"): _pn_forward,
    ("partitioned_norm", "pn_backward"): _pn_backward,
}


# ------------------------------------------------------------------------------------------------ tests

def test_every_public_launcher_has_a_case():
    """The cases cover exactly the public launchers: a new public function is either a launcher with a case here or
    listed in NOT_LAUNCHERS with the reason it launches nothing."""
    mods = _modules()
    assert set(NOT_LAUNCHERS) == set(mods), f"modules {sorted(mods)} vs NOT_LAUNCHERS {sorted(NOT_LAUNCHERS)}"
    expected = {(name, f) for name, mod in mods.items() for f in _public_functions(mod) - NOT_LAUNCHERS[name]}
    assert set(CASES) == expected, (f"launchers without a case: {sorted(expected - set(CASES))}; "
                                    f"cases without a launcher: {sorted(set(CASES) - expected)}")
    for name, mod in mods.items():
        missing = NOT_LAUNCHERS[name] - _public_functions(mod)
        assert not missing, f"{name}: NOT_LAUNCHERS names no longer defined: {sorted(missing)}"


@pytest.mark.parametrize("key", sorted(CASES), ids=lambda k: f"{k[0]}.{k[1]}")
def test_launcher_passes_only_input_device_tensors(key, launches, monkeypatch):
    outs = CASES[key](monkeypatch)
    _assert_on(META, launches, outs)


def test_every_kernel_is_launched_by_some_case(monkeypatch):
    """Each ``*_kernel`` of each module is reached by the cases above (so its arguments were checked)."""
    seen = []

    def getitem(self, grid):
        return lambda *a, **k: seen.append(_kernel_name(self))

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    for key in sorted(CASES):
        CASES[key](monkeypatch)
    for name, mod in _modules().items():
        missing = _module_kernels(mod) - set(seen)
        assert not missing, f"{name}: kernels no case launches: {sorted(missing)}"
    assert _module_kernels(seb) >= {"_seb_fwd_kernel", "_seb_bwd_keys_kernel", "_seb_segment_sum_kernel"}


def test_guard_catches_a_cpu_stand_in(launches, monkeypatch):
    """The check itself: a launcher that hands a CPU stand-in for an absent operand (the H200 bug: ``_ptr(None)``
    made its stand-in on the CPU) must be reported."""
    real = seb._ptr

    def cpu_stand_in(t, device, dtype=None):
        return real(t, "cpu" if (t is None or t.numel() == 0) else device, dtype)

    monkeypatch.setattr(seb, "_ptr", cpu_stand_in)
    with pytest.raises(AssertionError, match="psw_ptr on cpu"):
        launches.clear()
        _seb_forward(monkeypatch)
        _assert_on(META, launches)


@pytest.fixture
def on_cuda1(monkeypatch):
    """The cases' inputs become fake tensors on cuda:1 while cuda:0 is current; yields the current-device stack
    that the ``torch.cuda.device`` stand-in maintains (mock: the real one needs a GPU)."""
    current = [torch.device("cuda", 0)]

    class DeviceContext:
        def __init__(self, device):
            self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()
            return False

    monkeypatch.setattr(torch.cuda, "device", DeviceContext)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1].index)
    monkeypatch.setattr(seb, "_dummies", {})          # stand-ins made here are fake: never cache them
    monkeypatch.setitem(_ON, "device", CUDA1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield current


@pytest.mark.parametrize("key", sorted(CASES), ids=lambda k: f"{k[0]}.{k[1]}")
def test_launcher_launches_on_its_tensors_device(key, on_cuda1, monkeypatch):
    """Every kernel launch of every launcher happens with its tensors' device (cuda:1) current, and gets only
    cuda:1 tensors; the current device is restored afterwards."""
    seen = []

    def getitem(self, grid):
        def record(*args, **kwargs):
            fn = _base_fn(self)
            bound = dict(zip(list(getattr(fn, "arg_names", [])), args), **kwargs)
            seen.append((_kernel_name(self), on_cuda1[-1], bound))
        return record

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    outs = CASES[key](monkeypatch)
    assert seen, "the case launched no kernel (nothing was checked)"
    wrong = [f"{k} launched while {d} was current" for k, d, _ in seen if d != CUDA1]
    assert not wrong, "launches not on the tensors' device cuda:1:\n" + "\n".join(wrong)
    _assert_on(CUDA1, [(k, b) for k, _, b in seen], outs)
    assert on_cuda1 == [torch.device("cuda", 0)], "the launcher left another device current"
