"""Bad-input suite, the functional ops (scenario_embedding_bag, the branch GEMMs): every op x malformed argument
-> the documented exception naming the argument.

Conventions (saml_kernels/ops/_checks.py): a wrong dtype or a non-tensor -> TypeError; a wrong rank, shape,
length, option or device -> ValueError; an id or scenario out of range -> IndexError. The message names the
offending argument, and the user's tensors are left unmodified.

Part of the one bad-input suite: these cases run in the fresh child process of
``test_bad_input.py::test_bad_input_suite_in_a_fresh_process`` (see there), not in the parent pytest run.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import _reliability_cases as R
from conftest import device_backends



# ------------------------------------------------------------------------------------------- harness

def _snapshot(args, kwargs):
    ts = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor) and v.device.type != "meta"]
    return [(t, t.detach().clone()) for t in ts]


def _expect(fn, args, kwargs, exc, names):
    snap = _snapshot(args, kwargs)
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert any(n in msg for n in names), f"message does not name {names}: {msg!r}"
    assert len(msg) < 2000, "message should be short"
    for t, before in snap:
        assert torch.equal(t, before), "a user tensor was modified by a failing call"


# ------------------------------------------------------------------------------- scenario_embedding_bag

SEB = "scenario_embedding_bag"
ROWS = [4, 3, 5]
AWARE = [True, False, True]


def _seb_base(device, idx=torch.int64, B=3, M=2):
    g = torch.Generator().manual_seed(1)
    inp = R.seb_inputs(g, B=B, rows=ROWS, aware=AWARE, D=4, M=M, bag_max=3, idx_dtype=idx, device=device)
    # at least one id per feature so an out-of-range id can be placed in every feature
    return inp


def _seb_args(inp):
    return [inp["indices"], inp["offsets"], inp["scenario"], inp["global_weight"], inp["scenario_weight"],
            inp["feature_rows"], inp["feature_scenario_rows"]]


def _first_pos_of_feature(inp, f):
    B = inp["scenario"].numel()
    off = inp["offsets"]
    lo, hi = int(off[f * B]), int(off[(f + 1) * B])
    return lo if hi > lo else None


def _seb_cases():
    """(id, mutate(inp, kwargs) -> None, exception, argument names that the message may use)."""
    def set_(k, fn):
        return lambda inp, kw: inp.__setitem__(k, fn(inp))

    def kw_(k, v):
        return lambda inp, kw: kw.__setitem__(k, v(inp) if callable(v) else v)

    def bad_id(f, delta):
        def m(inp, kw):
            p = _first_pos_of_feature(inp, f)
            assert p is not None, "fixture must have a non-empty bag in every feature"
            inp["indices"] = inp["indices"].clone()
            inp["indices"][p] = ROWS[f] - 1 + delta if delta > 0 else delta
        return m

    def off_(fn):
        def m(inp, kw):
            inp["offsets"] = fn(inp["offsets"].clone())
        return m

    def nonmono(o):
        o[2] = o[3] + 1  # offsets[3] < offsets[2]
        return o

    return [
        ("indices-float", set_("indices", lambda i: i["indices"].float()), TypeError, ("indices",)),
        ("indices-2d", set_("indices", lambda i: i["indices"][None]), ValueError, ("indices",)),
        ("indices-not-tensor", set_("indices", lambda i: i["indices"].tolist()), TypeError, ("indices",)),
        ("offsets-dtype-mismatch", set_("offsets", lambda i: i["offsets"].int() if i["offsets"].dtype == torch.int64
                                        else i["offsets"].long()), TypeError, ("offsets",)),
        ("offsets-2d", set_("offsets", lambda i: i["offsets"][None]), ValueError, ("offsets",)),
        ("offsets-wrong-length", set_("offsets", lambda i: torch.cat([i["offsets"], i["offsets"][-1:]])), ValueError,
         ("offsets",)),
        ("offsets-empty", set_("offsets", lambda i: i["offsets"][:0]), ValueError, ("offsets",)),
        ("offsets-non-monotone", off_(nonmono), ValueError, ("offsets",)),
        ("offsets-last-not-nnz", off_(lambda o: torch.cat([o[:-1], o[-1:] - 1])), ValueError, ("offsets",)),
        ("offsets-first-not-zero", off_(lambda o: torch.cat([o[:1] + 1, o[1:]])), ValueError, ("offsets",)),
        ("id-one-past-feature0", bad_id(0, 1), IndexError, ("indices",)),
        ("id-one-past-last-feature", bad_id(2, 1), IndexError, ("indices",)),
        ("id-negative", bad_id(1, -1), IndexError, ("indices",)),
        ("id-huge", bad_id(2, 2**30), IndexError, ("indices",)),
        ("scenario-out-of-range", set_("scenario", lambda i: torch.full_like(i["scenario"], 2)), IndexError,
         ("scenario",)),
        ("scenario-negative", set_("scenario", lambda i: torch.full_like(i["scenario"], -1)), IndexError, ("scenario",)),
        ("scenario-wrong-length", set_("scenario", lambda i: i["scenario"][:-1]), ValueError, ("scenario",)),
        ("scenario-float", set_("scenario", lambda i: i["scenario"].float()), TypeError, ("scenario",)),
        ("scenario-2d", set_("scenario", lambda i: i["scenario"][None]), ValueError, ("scenario",)),
        ("global-weight-1d", set_("global_weight", lambda i: i["global_weight"].flatten()), ValueError,
         ("global_weight",)),
        ("global-weight-int", set_("global_weight", lambda i: i["global_weight"].long()), TypeError, ("global_weight",)),
        ("global-weight-too-few-rows", set_("global_weight", lambda i: i["global_weight"][:-1]), ValueError,
         ("feature_rows", "global_weight")),
        ("scenario-weight-2d", set_("scenario_weight", lambda i: i["scenario_weight"][0]), ValueError,
         ("scenario_weight",)),
        ("scenario-weight-dtype", set_("scenario_weight", lambda i: i["scenario_weight"].half()), TypeError,
         ("scenario_weight",)),
        ("scenario-weight-dim", set_("scenario_weight", lambda i: i["scenario_weight"][..., :-1]), ValueError,
         ("scenario_weight",)),
        ("scenario-weight-no-scenarios", set_("scenario_weight", lambda i: i["scenario_weight"][:0]), ValueError,
         ("scenario_weight",)),
        ("scenario-weight-too-few-rows", set_("scenario_weight", lambda i: i["scenario_weight"][:, :-1]), ValueError,
         ("feature_scenario_rows", "scenario_weight")),
        ("feature-rows-wrong-length", set_("feature_scenario_rows", lambda i: i["feature_scenario_rows"][:-1]),
         ValueError, ("feature_scenario_rows",)),
        ("feature-rows-decreasing", set_("feature_rows", lambda i: [0, 4, 3, 12]), ValueError, ("feature_rows",)),
        ("feature-rows-float-tensor", set_("feature_rows", lambda i: torch.tensor(i["feature_rows"], dtype=torch.float)),
         TypeError, ("feature_rows",)),
        ("aware-range-above-global-size", set_("feature_scenario_rows", lambda i: [0, 5, 5, 9]), ValueError,
         ("feature", "scenario")),
        ("psw-with-mean", kw_("per_sample_weights", lambda i: torch.ones(i["indices"].numel())), ValueError,
         ("per_sample_weights",)),
        ("psw-wrong-length", kw_("per_sample_weights", lambda i: torch.ones(i["indices"].numel() + 1)), ValueError,
         ("per_sample_weights",)),
        ("psw-int", kw_("per_sample_weights", lambda i: torch.ones(i["indices"].numel(), dtype=torch.long)), TypeError,
         ("per_sample_weights",)),
        ("pooling-unknown", kw_("pooling", "max"), ValueError, ("pooling",)),
        ("bounds-check-unknown", kw_("bounds_check", "clip"), ValueError, ("bounds_check",)),
        ("sparse-not-bool", kw_("sparse", "yes"), TypeError, ("sparse",)),
        ("backend-unknown", kw_("backend", "tpu"), ValueError, ("backend",)),
        ("meta-global-weight", set_("global_weight", lambda i: i["global_weight"].to("meta")), ValueError,
         ("global_weight",)),
        ("meta-scenario", set_("scenario", lambda i: i["scenario"].to("meta")), ValueError, ("scenario",)),
        ("meta-psw", kw_("per_sample_weights", lambda i: torch.ones(i["indices"].numel(), device="meta")), ValueError,
         ("per_sample_weights",)),
    ]


@pytest.mark.parametrize("case", _seb_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("idx", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("device,backend", device_backends(SEB))
def test_seb_bad_input(device, backend, idx, case):
    name, mutate, exc, names = case
    inp = _seb_base(device, idx)
    kw = dict(backend=backend)
    if name == "psw-with-mean":
        kw["pooling"] = "mean"
    mutate(inp, kw)
    if "per_sample_weights" in kw and isinstance(kw["per_sample_weights"], torch.Tensor) and \
            kw["per_sample_weights"].device.type != "meta":
        kw["per_sample_weights"] = kw["per_sample_weights"].to(device)
    _expect(R.op_fn(SEB), _seb_args(inp), kw, exc, names)


@pytest.mark.parametrize("device,backend", device_backends(SEB))
def test_seb_pooling_none_ragged(device, backend):
    inp = _seb_base(device)
    _expect(R.op_fn(SEB), _seb_args(inp), dict(backend=backend, pooling="none"), ValueError, ("pooling", "bag"))


@pytest.mark.parametrize("device,backend", device_backends(SEB))
def test_seb_bounds_zero_does_not_modify_inputs(device, backend):
    """bounds_check='zero' with a bad id: no exception, zero contribution, and the user's indices untouched."""
    inp = _seb_base(device)
    inp["indices"] = inp["indices"].clone()
    p = _first_pos_of_feature(inp, 0)
    inp["indices"][p] = ROWS[0]
    before = inp["indices"].clone()
    with warnings.catch_warnings():  # warns once per process, so the warning itself is not asserted here
        warnings.simplefilter("ignore")
        R.op_fn(SEB)(*_seb_args(inp), backend=backend, bounds_check="zero")
    assert torch.equal(inp["indices"], before)


# ---------------------------------------------------------------------------- mbranch / mutual ops

def _gemm_base(op, device, M=3, B=5, K=4, N=6, Ka=2):
    g = torch.Generator().manual_seed(2)
    sc = torch.randint(0, M, (B,), generator=g).to(device)
    if op == "mutual_unit":
        return dict(h=torch.randn(M, B, N, generator=g).to(device), scenario=sc)
    return dict(x=torch.randn(B, K, generator=g).to(device), weight=torch.randn(M, K, N, generator=g).to(device),
                bias=torch.randn(M, N, generator=g).to(device), scenario=sc,
                aux=torch.randn(B, Ka, generator=g).to(device), aux_weight=torch.randn(M, Ka, N, generator=g).to(device))


def _gemm_cases(op):
    def set_(k, fn):
        return (lambda inp: inp.__setitem__(k, fn(inp)))

    sc = [
        ("scenario-out-of-range", set_("scenario", lambda i: torch.full_like(i["scenario"], 3)), IndexError, ("scenario",)),
        ("scenario-negative", set_("scenario", lambda i: torch.full_like(i["scenario"], -1)), IndexError, ("scenario",)),
        ("scenario-wrong-length", set_("scenario", lambda i: i["scenario"][:-1]), ValueError, ("scenario",)),
        ("scenario-float", set_("scenario", lambda i: i["scenario"].float()), TypeError, ("scenario",)),
        ("scenario-2d", set_("scenario", lambda i: i["scenario"][None]), ValueError, ("scenario",)),
        ("backend-unknown", set_("backend", lambda i: "tpu"), ValueError, ("backend",)),
    ]
    if op == "mutual_unit":
        return sc + [
            ("h-2d", set_("h", lambda i: i["h"][0]), ValueError, ("h",)),
            ("h-int", set_("h", lambda i: i["h"].long()), TypeError, ("h",)),
            ("h-not-tensor", set_("h", lambda i: i["h"].tolist()), TypeError, ("h",)),
            ("temperature-zero", set_("temperature", lambda i: 0.0), ValueError, ("temperature",)),
            ("temperature-negative", set_("temperature", lambda i: -1.0), ValueError, ("temperature",)),
            ("similarity-unknown", set_("similarity", lambda i: "l2"), ValueError, ("similarity",)),
            ("meta-scenario", set_("scenario", lambda i: i["scenario"].to("meta")), ValueError, ("scenario",)),
        ]
    cases = sc + [
        ("x-1d", set_("x", lambda i: i["x"][0]), ValueError, ("x",)),
        ("x-4d", set_("x", lambda i: i["x"][None, None]), ValueError, ("x",)),
        ("x-int", set_("x", lambda i: i["x"].long()), TypeError, ("x",)),
        ("x-not-tensor", set_("x", lambda i: i["x"].tolist()), TypeError, ("x",)),
        ("x-per-branch-wrong-M", set_("x", lambda i: i["x"][None].expand(2, -1, -1).contiguous()), ValueError, ("x",)),
        ("x-wrong-K", set_("x", lambda i: i["x"][:, :-1]), ValueError, ("x", "weight")),
        ("x-dtype-mismatch", set_("x", lambda i: i["x"].half()), TypeError, ("x", "weight")),
        ("weight-2d", set_("weight", lambda i: i["weight"][0]), ValueError, ("weight",)),
        ("weight-int", set_("weight", lambda i: i["weight"].long()), TypeError, ("weight",)),
        ("bias-wrong-N", set_("bias", lambda i: i["bias"][:, :-1]), ValueError, ("bias",)),
        ("bias-wrong-M", set_("bias", lambda i: i["bias"][:-1]), ValueError, ("bias",)),
        ("bias-1d", set_("bias", lambda i: i["bias"][0]), ValueError, ("bias",)),
        ("bias-dtype", set_("bias", lambda i: i["bias"].double()), TypeError, ("bias",)),
        ("aux-without-aux-weight", set_("aux_weight", lambda i: None), ValueError, ("aux",)),
        ("aux-weight-without-aux", set_("aux", lambda i: None), ValueError, ("aux",)),
        ("aux-wrong-B", set_("aux", lambda i: i["aux"][:-1]), ValueError, ("aux",)),
        ("aux-weight-wrong-Ka", set_("aux_weight", lambda i: i["aux_weight"][:, :-1]), ValueError, ("aux",)),
        ("aux-weight-wrong-N", set_("aux_weight", lambda i: i["aux_weight"][..., :-1]), ValueError, ("aux_weight",)),
        ("activation-unknown", set_("activation", lambda i: "tanhh"), ValueError, ("activation",)),
        ("meta-weight", set_("weight", lambda i: i["weight"].to("meta")), ValueError, ("weight",)),
        ("meta-aux", set_("aux", lambda i: i["aux"].to("meta")), ValueError, ("aux",)),
        ("meta-scenario", set_("scenario", lambda i: i["scenario"].to("meta")), ValueError, ("scenario",)),
    ]
    if op == "mbranch_linear":
        cases += [("route-unknown", set_("route", lambda i: "some"), ValueError, ("route",)),
                  ("grad-mask-unknown", set_("grad_mask", lambda i: "all"), ValueError, ("grad_mask",))]
    else:
        cases += [("temperature-zero", set_("temperature", lambda i: 0.0), ValueError, ("temperature",)),
                  ("similarity-unknown", set_("similarity", lambda i: "l2"), ValueError, ("similarity",))]
    return cases


def _gemm_invoke(op, inp):
    fn = R.op_fn(op)
    kw = {k: v for k, v in inp.items() if k not in ("x", "weight", "bias", "scenario", "h")}
    if op == "mutual_unit":
        return fn, [inp["h"], inp["scenario"]], kw
    return fn, [inp["x"], inp["weight"], inp["bias"], inp["scenario"]], kw


def _gemm_test(op):
    cases = _gemm_cases(op)

    @pytest.mark.skipif(not R.op_available(op), reason=f"saml_kernels.{op} has not landed yet")
    @pytest.mark.parametrize("case", cases, ids=lambda c: c[0])
    @pytest.mark.parametrize("device,backend", device_backends(op))
    def t(device, backend, case):
        name, mutate, exc, names = case
        inp = _gemm_base(op, device)
        inp["backend"] = backend
        if op == "mbranch_linear":
            inp["route"] = "all"
        mutate(inp)
        fn, args, kw = _gemm_invoke(op, inp)
        _expect(fn, args, kw, exc, names)
    return t


test_mbranch_linear_bad_input = _gemm_test("mbranch_linear")
test_mutual_unit_bad_input = _gemm_test("mutual_unit")
test_mutual_linear_bad_input = _gemm_test("mutual_linear")


@pytest.mark.parametrize("op", ["mbranch_linear", "mutual_unit", "mutual_linear"])
def test_gemm_empty_batch_is_not_an_error(op):
    """B = 0 is valid input (docs/design.md): empty outputs, no exception."""
    if not R.op_available(op):
        pytest.skip(f"{op} has not landed yet")
    inp = _gemm_base(op, "cpu", B=0)
    fn, args, kw = _gemm_invoke(op, inp)
    out = fn(*args, **kw)
    assert out.shape[-2] == 0 if op == "mbranch_linear" else out.shape[0] == 0
