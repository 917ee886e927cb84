"""Per-device state is keyed by the device a tensor reports: ``torch.device("cuda") != torch.device("cuda:0")``.

After ``prepare_capture_safe("cuda")`` the first flag on ``cuda:0`` used to allocate a second counter (inside a
capture its zero-fill was recorded, so every replay reset it) that ``error_counts("cuda")`` never listed; a
layout cached under ``"cuda"`` was reused after the current device changed.

No GPU here, so these tests stand in for CUDA, and say where: ``torch.cuda.current_device`` is monkeypatched (the
current device), ``torch.zeros`` / ``torch.tensor`` on a CUDA device return CPU tensors and record the device asked
for (the allocation itself), and a check's flag is a small object that reports ``cuda:0``. What is tested is the
keying and the public API's answers, which is all the fix changes; the counters' arithmetic is the same on any device.
"""
from __future__ import annotations

import pytest
import torch

import saml_kernels
from saml_kernels.ops import _checks
from saml_kernels.ops import scenario_embedding_bag as seb

CUDA_NAMES = ["cuda", "cuda:0", torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda:0")]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Current CUDA device settable (``state["current"]``); CUDA allocations recorded and made on the CPU."""
    state = {"current": 0, "allocated": []}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    for name in ("zeros", "tensor"):
        real = getattr(torch, name)

        def fake(*args, _real=real, device=None, **kwargs):
            if device is not None and torch.device(device).type == "cuda":
                state["allocated"].append(torch.device(device))
                device = "cpu"
            return _real(*args, device=device, **kwargs)

        monkeypatch.setattr(torch, name, fake)
    monkeypatch.setattr(_checks, "_COUNTERS", {})
    monkeypatch.setattr(_checks, "_KINDS", [])
    return state


class _Flag:
    """A check's flag as a CUDA op leaves it: one bool element on ``device`` (here backed by a CPU tensor)."""

    def __init__(self, value: bool, device="cuda:0"):
        self.device, self._t = torch.device(device), torch.tensor(value)

    def reshape(self, shape):
        return self._t.reshape(shape)


def test_device_key_fills_the_current_index(fake_cuda):
    for d in CUDA_NAMES:
        assert _checks.device_key(d) == torch.device("cuda:0"), d
    assert _checks.device_key("cuda:1") == torch.device("cuda:1")
    fake_cuda["current"] = 1
    assert _checks.device_key("cuda") == torch.device("cuda:1")
    assert _checks.device_key(torch.device("cuda")) == torch.device("cuda:1")
    assert _checks.device_key("cuda:0") == torch.device("cuda:0")
    # CPU and meta tensors report no index: the key has none either
    for d in ("cpu", "cpu:0", torch.device("cpu", 0)):
        assert _checks.device_key(d) == torch.device("cpu") == torch.empty(0).device
    assert _checks.device_key("meta") == torch.empty(0, device="meta").device


@pytest.mark.parametrize("prepared", CUDA_NAMES, ids=str)
def test_one_counter_per_device_through_the_public_api(fake_cuda, prepared):
    saml_kernels.prepare_capture_safe(prepared)
    for d in CUDA_NAMES:
        saml_kernels.prepare_capture_safe(d)
    assert fake_cuda["allocated"] == [torch.device("cuda:0")]
    with saml_kernels.capture_safe_checks():
        assert _checks.check_value(_Flag(True), lambda: None, "toy: bad value") is True
    assert fake_cuda["allocated"] == [torch.device("cuda:0")], "a flag on cuda:0 allocated a second counter"
    for d in CUDA_NAMES:
        counts = {k: int(v) for k, v in saml_kernels.error_counts(d).items()}
        assert counts == {"toy: bad value": 1}, (d, counts)
        assert int(_checks.error_total(d)) == 1
    assert {k: int(v) for k, v in saml_kernels.error_counts().items()} == {"cuda:0: toy: bad value": 1}
    with pytest.raises(ValueError, match=r"1 x toy: bad value \(on cuda:0\)"):
        saml_kernels.raise_errors()


def test_counters_of_another_current_device(fake_cuda):
    """"cuda" means the current device at the call, as ``torch.zeros(device="cuda")`` would."""
    saml_kernels.prepare_capture_safe("cuda")
    fake_cuda["current"] = 1
    saml_kernels.prepare_capture_safe("cuda")
    assert fake_cuda["allocated"] == [torch.device("cuda:0"), torch.device("cuda:1")]
    with saml_kernels.capture_safe_checks():
        _checks.check_value(_Flag(True, "cuda:1"), lambda: None, "toy")
    assert int(saml_kernels.error_counts("cuda")["toy"]) == 1        # cuda:1, the current one
    assert int(saml_kernels.error_counts("cuda:0")["toy"]) == 0
    with pytest.raises(ValueError, match=r"on cuda:1"):
        saml_kernels.raise_errors()


def test_step_snapshot_is_found_under_any_name(fake_cuda):
    """A model's ``step_errors`` block and its layers' ``errors_before`` name the device differently (the model
    its parameters' device, a layer its table's): both must reach the one snapshot."""
    saml_kernels.prepare_capture_safe("cuda")
    with saml_kernels.capture_safe_checks():
        with _checks.step_errors("cuda"):
            snap = _checks.errors_before(torch.device("cuda", 0))
            assert _checks.errors_before("cuda:0") is snap
            assert _checks.errors_before("cuda") is snap
        with _checks.step_errors(torch.device("cuda:0")):
            assert _checks.errors_before("cuda") is _checks.errors_before("cuda:0")
    assert fake_cuda["allocated"] == [torch.device("cuda:0")]


def test_no_counter_allocated_inside_a_capture(fake_cuda, monkeypatch):
    """Inside a capture the counters must already exist: a late allocation raises a clear error instead of being
    recorded (its zero-fill would reset the count at every replay). ``is_current_stream_capturing`` is mocked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with saml_kernels.capture_safe_checks():
        with pytest.raises(RuntimeError, match=r"prepare_capture_safe\('cuda:0'\) before capturing"):
            _checks.check_value(_Flag(False), lambda: None, "toy")
    assert fake_cuda["allocated"] == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    saml_kernels.prepare_capture_safe("cuda")                          # before the capture: allowed
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with saml_kernels.capture_safe_checks():
        _checks.check_value(_Flag(True), lambda: None, "toy")         # the prepared counter: no allocation
    assert fake_cuda["allocated"] == [torch.device("cuda:0")]
    assert int(saml_kernels.error_counts("cuda")["toy"]) == 1
    _checks._COUNTERS.clear()


def test_table_layout_follows_the_current_device(fake_cuda):
    """The embedding op's cached layout tensors: "cuda" is cached as the current device, so another current
    device gets its own tensors (it used to get the first one's, on the wrong GPU)."""
    seb._layout_cached.cache_clear()
    try:
        a = seb.table_layout([0, 3, 5], [0, 3, 3], 5, 3, "cuda")
        assert seb.table_layout([0, 3, 5], [0, 3, 3], 5, 3, "cuda:0") is a
        assert seb.table_layout([0, 3, 5], [0, 3, 3], 5, 3, torch.device("cuda", 0)) is a
        fake_cuda["current"] = 1
        b = seb.table_layout([0, 3, 5], [0, 3, 3], 5, 3, "cuda")
        assert b is not a
        assert set(fake_cuda["allocated"]) == {torch.device("cuda:0"), torch.device("cuda:1")}
    finally:
        seb._layout_cached.cache_clear()
