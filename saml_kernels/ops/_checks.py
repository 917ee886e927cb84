"""Argument checks shared by the ops: each raises with the op, the argument and the offending value.

Value checks (ids, offsets, scenario ids, lengths: anything that needs the tensor's data) are reductions on the
tensor's device that leave one boolean flag; reading that flag on the host is a sync. ``check_value`` decides
when it is read, by the check mode:

- ``"eager"`` (default outside a model): each op reads its flags at once, one host sync per op call;
- ``deferred_checks()`` (what ``nn.SAML`` does around its forward): the flags of every op inside are collected
  and read together once when the block ends, one host sync per training step. A bad input still raises the op's
  own clear error (recomputed on this slow path) before any backward, so nothing is written to the tables.
  Because the kernels run before the flags are read, each check hands its kernels safe stand-ins meanwhile (as in
  the capture-safe mode), so no kernel reads out of bounds; the CPU embedding kernel needs none (it validates
  offsets and scenario ids in its own pass and gathers nothing when they fail);
- ``capture_safe_checks()``: no host sync at all (CUDA-graph capture, ``set_sync_debug_mode("error")``). Flags
  are added to per-device error counters (``error_counts()``) and inputs are made safe instead of raising: an id
  outside its feature reads as a zero vector with no gradient, a scenario id outside [0, M) is clamped into
  range for the gather, and a fused embedding optimizer skips its update when an error was counted in its step
  (see ``step_errors``). ``raise_errors()`` reads the counters later (one sync) and raises. The counters count
  failed *checks* (one per op call that saw a bad input, whatever the number of bad entries in it), not entries.

One check site per value. Inside a deferred or capture-safe block a check records the tensor it checked (and the
stand-in it made) as *checked* (:func:`mark_checked`): the token later ops trust. A model's forward checks the
scenario once at its boundary (:func:`model_scenario`) and hands its layers the checked tensor; every op given
that tensor neither checks it again nor passes a check to its custom op (:func:`op_scenario`). The token lives
as long as the block (a tensor object at one version, so an in-place change voids it); in eager mode there is
none, and each op checks its own arguments once, inside its custom op. Under ``torch.export`` (not under
TorchDynamo) the token works too: the exported graph's ops trust the model's boundary, which
``serving.ServedProgram`` runs before the graph.

The step of a fused update (capture-safe mode): a model's forward (``nn.saml.checked_forward``) opens a
``step_errors`` block that snapshots the error counters before its first check, and every fused embedding layer
inside compares the counters against that one snapshot in its backward. So an error anywhere in the model's
forward (the boundary's scenario check, another layer's ids, offsets or lengths) skips the fused update of every
fused layer of that step. A layer called outside a model takes its own snapshot at its forward.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(op: str, name: str, t, *, ndim=None, dtypes=None, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{op}: {name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.is_sparse:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")


def same_device(op: str, **tensors):
    named = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    if not named:
        return
    ref_name, ref = named[0]
    for n, t in named[1:]:
        if t.device != ref.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {ref_name} is on {ref.device}; all tensors must share a device")


def choice(op: str, name: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {tuple(allowed)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ check modes

_local = threading.local()
# per device: int64 [len(_KINDS)] counters of the capture-safe mode, and the kinds (what was wrong, where)
_COUNTERS: dict = {}
_KINDS: list[str] = []
_MAX_KINDS = 64


class _Frame:
    """One deferred or capture-safe block: the flags not read yet (deferred mode), the keys of the checks made
    once per block (``seen``), and the tensors checked in it (``checked``: see :func:`mark_checked`)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.pending: list[tuple[torch.Tensor, Callable[[], None]]] = []
        self.seen: set = set()
        self.checked: dict = {}  # (id(t), kind) -> (t, version, bound, what the kernels get)


def _stack() -> list:
    st = getattr(_local, "stack", None)
    if st is None:
        st = _local.stack = []
    return st


def check_mode() -> str:
    """"eager", "deferred" or "capture_safe": the innermost active mode of this thread."""
    st = _stack()
    return st[-1][0] if st else "eager"


@contextlib.contextmanager
def deferred_checks():
    """Collect the value checks of every op inside and read them with one host sync when the block ends; the
    first failing check then raises its own error. Nested inside another deferred or capture-safe block it joins
    the outer one."""
    if _stack():
        yield
        return
    frame = _Frame("deferred")
    _stack().append(("deferred", frame))
    ok = False
    try:
        yield
        ok = True
    finally:
        _stack().pop()
    if ok and frame.pending:
        flags = torch.stack([f.reshape(()) for f, _ in frame.pending])
        if bool(flags.any()):  # the one host sync of the block
            for flag, explain in frame.pending:
                if bool(flag):
                    explain()


@contextlib.contextmanager
def capture_safe_checks():
    """No host syncs from value checks inside: bad inputs are counted on the device (``error_counts``) and made
    safe instead of raising (see the module docstring); ``raise_errors()`` reports them later."""
    _stack().append(("capture_safe", _Frame("capture_safe")))
    try:
        yield
    finally:
        _stack().pop()


def _kind(what: str) -> int:
    if what not in _KINDS:
        if len(_KINDS) >= _MAX_KINDS:  # the counters are preallocated (graph capture): a bounded set of checks
            raise RuntimeError(f"saml_kernels: more than {_MAX_KINDS} kinds of input check; raise _MAX_KINDS")
        _KINDS.append(what)
    return _KINDS.index(what)


def device_key(device) -> torch.device:
    """The canonical ``torch.device`` of ``device`` (a str, ``torch.device`` or int as torch accepts), the key of
    every per-device state here: what ``tensor.device`` reports for a tensor created on ``device``.

    ``torch.device("cuda") != torch.device("cuda:0")``, while every CUDA tensor reports an indexed device, so an
    unindexed accelerator device gets the index of its type's current device ("cuda" -> "cuda:<current>"; a type
    with no ``torch.<type>.current_device`` gets 0, as its tensors report). ``cpu`` and ``meta`` tensors report no
    index, so "cpu:0" -> "cpu"."""
    d = device if isinstance(device, torch.device) else torch.device(device)
    if d.type in ("cpu", "meta"):
        return torch.device(d.type) if d.index is not None else d
    if d.index is not None:
        return d
    current = getattr(getattr(torch, d.type, None), "current_device", None)
    return torch.device(d.type, int(current()) if current is not None else 0)


def _new_counters(key: torch.device) -> torch.Tensor:
    return torch.zeros(_MAX_KINDS, dtype=torch.int64, device=key)


def _capturing(key: torch.device) -> bool:
    """Whether a CUDA-graph capture is under way on the current stream (a capture records the current device's
    current stream, so an allocation on ``key`` then would be recorded)."""
    return key.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _counters(device) -> torch.Tensor:
    key = device_key(device)
    c = _COUNTERS.get(key)
    if c is None:
        # Allocated inside a capture, the zero-fill would be recorded into the graph and reset the counters at
        # every replay: the counters must exist before the capture begins.
        if _capturing(key):
            raise RuntimeError(f"saml_kernels: the capture-safe error counters of {key} were first needed inside a "
                               f"CUDA-graph capture; call saml_kernels.prepare_capture_safe({str(key)!r}) before "
                               "capturing (CapturedTrainingStep does it for its inputs' device)")
        # preallocated (kinds are few), so the first error under graph capture needs no new allocation
        c = _COUNTERS[key] = _new_counters(key)
    return c


def prepare_capture_safe(device) -> None:
    """Allocate the error counters of ``device`` before a CUDA-graph capture (an allocation inside is refused).
    ``"cuda"`` means the current CUDA device (:func:`device_key`)."""
    _counters(device)


def error_counts(device=None) -> dict:
    """{kind: int64 0-dim device tensor} of the capture-safe mode's counters (reading a value syncs). Each counts
    the failing check *calls* of its kind (an op call with three bad ids adds 1), not the bad entries. ``device``
    None: every device's, keyed ``"<device>: <kind>"``; ``"cuda"`` means the current CUDA device."""
    out = {}
    want = device_key(device) if device is not None else None
    for dev, c in _COUNTERS.items():
        if want is None or dev == want:
            for i, what in enumerate(_KINDS):
                out[what if want is not None else f"{dev}: {what}"] = c[i]
    return out


def error_total(device) -> torch.Tensor:
    """0-dim int64 device tensor: all errors counted so far on ``device`` (no sync)."""
    return _counters(device).sum()


@contextlib.contextmanager
def step_errors(device):
    """One training step's "errors before" snapshot (capture-safe mode only; elsewhere a no-op): inside the block,
    :func:`errors_before` on ``device`` returns the counters' total as it was when the block was entered. Entered
    by a model's forward before its first check; nested blocks (a model inside a model) keep the outermost
    snapshot. Costs one device reduction, no host sync."""
    st = getattr(_local, "step", None)
    if st is not None or check_mode() != "capture_safe" or device is None:
        yield
        return
    _local.step = {device_key(device): error_total(device).clone()}
    try:
        yield
    finally:
        _local.step = None


def errors_before(device) -> Optional[torch.Tensor]:
    """The snapshot a fused update compares against (0-dim int64 on ``device``) in capture-safe mode, else None:
    the enclosing :func:`step_errors` block's (so every layer of a model's step shares one), or a fresh one."""
    if check_mode() != "capture_safe":
        return None
    device = device_key(device)
    st = getattr(_local, "step", None)
    if st is not None and device in st:
        return st[device]
    return error_total(device).clone()


def raise_errors(reset: bool = True) -> None:
    """Read the capture-safe counters (one host sync per device) and raise ValueError listing every kind of bad
    input counted since the last reset; ``reset`` zeroes them."""
    found = []
    for dev, c in _COUNTERS.items():
        host = c.tolist()
        found += [f"{host[i]} x {what} (on {dev})" for i, what in enumerate(_KINDS) if host[i]]
        if reset:
            c.zero_()
    if found:
        raise ValueError("saml_kernels: bad inputs were seen in capture-safe mode (their outputs were computed "
                         "from safe stand-ins, see saml_kernels.ops._checks): " + "; ".join(found))


def check_value(flag: torch.Tensor, explain: Callable[[], None], what: str, key: Optional[tuple] = None) -> bool:
    """Report a value check. ``flag``: bool tensor (any shape with one element) on the data's device, True when
    the input is bad. ``explain()``: raises (or warns) with the detailed message; it runs only when the flag is
    set and may sync. ``what``: a short name of the check for the capture-safe counters. ``key``: checks with an
    equal key inside one deferred block run once (e.g. the same lengths tensor in several layers).

    Returns True when the flag is not read yet (deferred and capture-safe modes): the caller must then hand its
    kernels safe stand-ins for the checked inputs. False in eager mode (the input is known good here)."""
    mode = check_mode()
    if mode == "capture_safe":
        c = _counters(flag.device)
        c[_kind(what)] += flag.reshape(()).to(torch.int64)
        return True
    if mode == "deferred":
        frame = _stack()[-1][1]
        if key is None or key not in frame.seen:
            if key is not None:
                frame.seen.add(key)
            frame.pending.append((flag, explain))
        return True
    if bool(flag.reshape(())):
        explain()
    return False


def tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's current contents for ``check_value(key=...)`` (storage, view, version)."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device, t._version)


# ------------------------------------------------------------------------------------------------ checked tokens

_MAX_CHECKED = 64  # a long capture-safe block forgets older tokens (they are only a saving, never needed)


def _version(t: torch.Tensor):
    try:
        return t._version
    except (RuntimeError, AttributeError):  # a traced tensor without a version counter
        return None


def _registry() -> Optional[dict]:
    """The innermost block's checked-tensor registry; None in eager mode and while TorchDynamo traces (its
    graphs check inside the custom ops at run time, as in eager mode)."""
    st = _stack()
    if not st or torch.compiler.is_dynamo_compiling():
        return None
    return st[-1][1].checked


def mark_checked(t: torch.Tensor, kind: str, bound: int = 0, result: Optional[torch.Tensor] = None) -> None:
    """Records in the innermost deferred / capture-safe block that ``t`` (this tensor object, at its current
    version) passed the check ``kind`` (for "scenario": ids in [0, ``bound``)), and that the kernels get
    ``result`` for it (its stand-in; ``t`` itself by default). A no-op in eager mode."""
    reg = _registry()
    if reg is None:
        return
    if len(reg) >= _MAX_CHECKED:
        reg.clear()
    reg[(id(t), kind)] = (t, _version(t), bound, t if result is None else result)


def checked(t: torch.Tensor, kind: str, bound: int = 0) -> Optional[torch.Tensor]:
    """What the kernels get for ``t`` when ``t`` was checked for ``kind`` in this block (for "scenario": against
    a range no wider than [0, ``bound``)), else None."""
    reg = _registry()
    e = reg.get((id(t), kind)) if reg is not None else None
    if e is None or e[0] is not t or e[1] != _version(t) or e[2] > bound:
        return None
    return e[3]


# ------------------------------------------------------------------------------------------------ scenario ids

def _raise_scenario(op: str, scenario: torch.Tensor, num_scenarios: int) -> None:
    bad = (scenario < 0) | (scenario >= num_scenarios)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(f"{op}: scenario[{pos}] = {int(scenario[pos])} is out of range [0, {num_scenarios})")


def scenario_range(op: str, scenario: torch.Tensor, num_scenarios: int) -> torch.Tensor:
    """Checks that every scenario id is in [0, num_scenarios) (IndexError naming the position and value).

    Returns the scenario tensor the kernels get: itself in eager mode (checked: one reduction, one host read),
    else a copy clamped into range (so no kernel reads outside its tables before the flag is read), recorded as
    checked for the block (:func:`mark_checked`), so the same tensor or its stand-in is not checked again.
    Traced (torch.compile / torch.export) it returns ``scenario`` unchecked: a graph has no host read (the
    custom ops check at run time unless an entry checked it, see :func:`op_scenario`)."""
    if torch.compiler.is_compiling() or scenario.numel() == 0:
        return scenario
    known = checked(scenario, "scenario", num_scenarios)
    if known is not None:
        return known
    if check_mode() == "eager":  # read at once: no stand-in
        if bool((scenario.clamp(0, num_scenarios - 1) != scenario).any()):
            _raise_scenario(op, scenario, num_scenarios)
        return scenario
    safe = scenario.clamp(0, num_scenarios - 1)
    check_value((safe != scenario).any(), lambda: _raise_scenario(op, scenario, num_scenarios),
                f"{op}: scenario id out of range")
    mark_checked(scenario, "scenario", num_scenarios, safe)
    mark_checked(safe, "scenario", num_scenarios)
    return safe


def model_scenario(who: str, scenario: torch.Tensor, num_scenarios: int) -> torch.Tensor:
    """A model's one scenario check, at its boundary (IndexError naming the model): returns the tensor its layers
    get (clamped while the check is pending), recorded as checked, so every op below trusts it. Under
    ``torch.export`` it is recorded unchecked: the exported graph's ops then trust the boundary, which
    ``serving.ServedProgram`` runs before the graph (the embedding kernel still validates the ids it gathers)."""
    scenario = scenario_range(who, scenario, num_scenarios)
    if checked(scenario, "scenario", num_scenarios) is None:
        mark_checked(scenario, "scenario", num_scenarios)
    return scenario


def op_scenario(op: str, scenario: torch.Tensor, num_scenarios: int, check: bool) -> tuple[torch.Tensor, bool]:
    """At an op's public entry: (the scenario tensor its custom op gets (forward and saved for backward), whether
    the custom op must check it itself).

    - ``check`` False: unchecked by request (docs/design.md section 5, "Unchecked input");
    - a tensor checked in this block (a model's boundary, an earlier op): trusted, no check at all;
    - eager mode, or traced: the custom op checks it (one site; a traced graph then checks at run time);
    - deferred / capture-safe: checked here (the clamped stand-in is also what the backward sees), the custom op
      trusts it."""
    if not check:
        return scenario, False
    known = checked(scenario, "scenario", num_scenarios)
    if known is not None:
        return known, False
    if check_mode() == "eager" or torch.compiler.is_compiling():
        return scenario, True
    return scenario_range(op, scenario, num_scenarios), False
