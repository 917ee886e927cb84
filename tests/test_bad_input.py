"""Bad-input suite: every malformed argument -> the documented exception, with a message naming the argument.

Conventions (TEAM.md, saml_kernels/ops/_checks.py): a wrong dtype or a non-tensor -> TypeError; a wrong rank,
shape, length, option or device -> ValueError; an id or scenario id out of range -> IndexError; an unavailable
backend -> BackendUnavailableError. The user's tensors are never modified by a failing call.

Layout: one test class per op (``TestScenarioEmbeddingBag`` below); each class has a ``valid(device)`` input maker,
a ``call(...)`` and a table of ``Case(id, mutate, exception, names)``, checked by the shared ``expect_rejected``.
Add a class per new op. ``test_file_runs_clean_in_subprocess`` runs this whole file in a child process, so a
kernel that crashes (segfault/abort) on bad input fails that test instead of killing the test run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import saml_kernels
from conftest import device_backends

CHILD = os.environ.get("SAML_BAD_INPUT_CHILD") == "1"


@dataclass
class Case:
    id: str
    mutate: Callable  # mutate(args: dict) -> None, changes one argument of a valid call
    exc: type
    names: tuple  # the message must contain at least one of these (the argument's name)


def expect_rejected(fn, kwargs: dict, exc: type, names: tuple):
    """``fn(**kwargs)`` raises ``exc`` naming one of ``names``, and leaves every tensor argument unmodified."""
    snap = [(t, t.detach().clone()) for t in kwargs.values()
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout == torch.strided]
    with pytest.raises(exc) as info:
        fn(**kwargs)
    msg = str(info.value)
    assert any(n in msg for n in names), f"message does not name {names}: {msg!r}"
    for t, before in snap:
        assert torch.equal(t, before), "a failing call modified a user tensor"
    return msg


def cases_ids(cases):
    return [c.id for c in cases]


# ---------------------------------------------------------------------------------- scenario_embedding_bag

def _set(key, fn):
    return lambda a: a.__setitem__(key, fn(a))


def _edit(key, fn):
    """Edits a clone of tensor ``key`` in place via ``fn(t)`` (so the fixture's tensors stay intact)."""
    def m(a):
        t = a[key].clone()
        fn(t, a)
        a[key] = t
    return m


def _bag_start(a, f, b=0):
    B = a["scenario"].numel()
    return int(a["offsets"][f * B + b])


class TestScenarioEmbeddingBag:
    OP = "scenario_embedding_bag"
    PAIRS = device_backends(OP)
    ROWS, AWARE = (4, 3, 5), (True, False, True)

    @classmethod
    def valid(cls, device, idx_dtype=torch.int64):
        """A valid call: B=3 samples, 3 features of 4/3/5 rows (1st and 3rd aware), M=2, D=4; every bag non-empty."""
        B, M, D = 3, 2, 4
        F = len(cls.ROWS)
        fr, fsr = [0], [0]
        for r, aw in zip(cls.ROWS, cls.AWARE):
            fr.append(fr[-1] + r)
            fsr.append(fsr[-1] + (r if aw else 0))
        lengths = torch.randint(1, 4, (F * B,))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        indices = torch.cat([torch.randint(0, cls.ROWS[f], (int(lengths[f * B:(f + 1) * B].sum()),))
                             for f in range(F)])
        return dict(indices=indices.to(idx_dtype).to(device), offsets=offsets.to(idx_dtype).to(device),
                    scenario=torch.randint(0, M, (B,), device=device), global_weight=torch.randn(fr[-1], D,
                                                                                                 device=device),
                    scenario_weight=torch.randn(M, fsr[-1], D, device=device), feature_rows=fr,
                    feature_scenario_rows=fsr)

    @staticmethod
    def call(**kw):
        return saml_kernels.scenario_embedding_bag(**kw)

    def _offsets_nonmonotone(t, a):
        t[2] = t[3] + 1

    def _id(f, value):
        def fn(t, a):
            t[_bag_start(a, f)] = value(TestScenarioEmbeddingBag.ROWS[f])
        return _edit("indices", fn)

    CASES = [
        # indices
        Case("indices-float", _set("indices", lambda a: a["indices"].float()), TypeError, ("indices",)),
        Case("indices-int16", _set("indices", lambda a: a["indices"].to(torch.int16)), TypeError, ("indices",)),
        Case("indices-2d", _set("indices", lambda a: a["indices"][None]), ValueError, ("indices",)),
        Case("indices-list", _set("indices", lambda a: a["indices"].tolist()), TypeError, ("indices",)),
        Case("indices-none", _set("indices", lambda a: None), TypeError, ("indices",)),
        Case("id-one-past-feature-0", _id(0, lambda r: r), IndexError, ("indices",)),
        Case("id-one-past-feature-1", _id(1, lambda r: r), IndexError, ("indices",)),
        Case("id-one-past-last-feature", _id(2, lambda r: r), IndexError, ("indices",)),
        Case("id-negative", _id(1, lambda r: -1), IndexError, ("indices",)),
        Case("id-int32-max", _id(2, lambda r: 2**31 - 1), IndexError, ("indices",)),
        # offsets
        Case("offsets-float", _set("offsets", lambda a: a["offsets"].float()), TypeError, ("offsets",)),
        Case("offsets-dtype-differs", _set("offsets", lambda a: a["offsets"].int() if a["offsets"].dtype ==
                                           torch.int64 else a["offsets"].long()), TypeError, ("offsets",)),
        Case("offsets-2d", _set("offsets", lambda a: a["offsets"][None]), ValueError, ("offsets",)),
        Case("offsets-empty", _set("offsets", lambda a: a["offsets"][:0]), ValueError, ("offsets",)),
        Case("offsets-one-long", _set("offsets", lambda a: torch.cat([a["offsets"], a["offsets"][-1:]])), ValueError,
             ("offsets",)),
        Case("offsets-one-short", _set("offsets", lambda a: a["offsets"][:-1]), ValueError, ("offsets",)),
        Case("offsets-non-monotone", _edit("offsets", _offsets_nonmonotone), ValueError, ("offsets",)),
        Case("offsets-not-starting-at-0", _edit("offsets", lambda t, a: t.__setitem__(0, 1)), ValueError,
             ("offsets",)),
        Case("offsets-ending-before-nnz", _edit("offsets", lambda t, a: t.__setitem__(-1, t[-1] - 1)), ValueError,
             ("offsets",)),
        Case("offsets-ending-after-nnz", _edit("offsets", lambda t, a: t.__setitem__(-1, t[-1] + 5)), ValueError,
             ("offsets",)),
        # scenario
        Case("scenario-float", _set("scenario", lambda a: a["scenario"].float()), TypeError, ("scenario",)),
        Case("scenario-2d", _set("scenario", lambda a: a["scenario"][None]), ValueError, ("scenario",)),
        Case("scenario-short", _set("scenario", lambda a: a["scenario"][:-1]), ValueError, ("scenario",)),
        Case("scenario-equal-M", _edit("scenario", lambda t, a: t.__setitem__(1, 2)), IndexError, ("scenario",)),
        Case("scenario-negative", _edit("scenario", lambda t, a: t.__setitem__(0, -1)), IndexError, ("scenario",)),
        # tables
        Case("global-weight-int", _set("global_weight", lambda a: a["global_weight"].long()), TypeError,
             ("global_weight",)),
        Case("global-weight-1d", _set("global_weight", lambda a: a["global_weight"].flatten()), ValueError,
             ("global_weight",)),
        Case("global-weight-3d", _set("global_weight", lambda a: a["global_weight"][None]), ValueError,
             ("global_weight",)),
        Case("global-weight-numpy", _set("global_weight", lambda a: a["global_weight"].cpu().numpy()), TypeError,
             ("global_weight",)),
        Case("global-weight-sparse", _set("global_weight", lambda a: a["global_weight"].to_sparse()), TypeError,
             ("global_weight",)),
        Case("global-weight-too-few-rows", _set("global_weight", lambda a: a["global_weight"][:-1]), ValueError,
             ("feature_rows",)),
        Case("scenario-weight-2d", _set("scenario_weight", lambda a: a["scenario_weight"][0]), ValueError,
             ("scenario_weight",)),
        Case("scenario-weight-dtype-differs", _set("scenario_weight", lambda a: a["scenario_weight"].half()),
             TypeError, ("scenario_weight",)),
        Case("scenario-weight-D-differs", _set("scenario_weight", lambda a: a["scenario_weight"][..., :3]),
             ValueError, ("scenario_weight",)),
        Case("scenario-weight-no-tables", _set("scenario_weight", lambda a: a["scenario_weight"][:0]), ValueError,
             ("scenario_weight",)),
        Case("scenario-weight-too-few-rows", _set("scenario_weight", lambda a: a["scenario_weight"][:, :-1]),
             ValueError, ("feature_scenario_rows",)),
        # layout
        Case("feature-rows-single-entry", _set("feature_rows", lambda a: [0]), ValueError, ("feature_rows",)),
        Case("feature-rows-decreasing", _set("feature_rows", lambda a: [0, 4, 3, 12]), ValueError,
             ("feature_rows",)),
        Case("feature-rows-negative-start", _set("feature_rows", lambda a: [-1, 4, 7, 12]), ValueError,
             ("feature_rows",)),
        Case("feature-rows-float-tensor", _set("feature_rows", lambda a: torch.tensor(a["feature_rows"],
                                                                                     dtype=torch.float)),
             TypeError, ("feature_rows",)),
        Case("feature-rows-2d-tensor", _set("feature_rows", lambda a: torch.tensor([a["feature_rows"]])), TypeError,
             ("feature_rows",)),
        Case("feature-rows-strings", _set("feature_rows", lambda a: ["a", "b"]), TypeError, ("feature_rows",)),
        Case("feature-rows-not-matching-offsets", _set("feature_rows", lambda a: [0, 4, 12]), ValueError,
             ("feature_scenario_rows", "offsets")),
        Case("feature-scenario-rows-short", _set("feature_scenario_rows", lambda a: a["feature_scenario_rows"][:-1]),
             ValueError, ("feature_scenario_rows",)),
        Case("feature-scenario-rows-decreasing", _set("feature_scenario_rows", lambda a: [0, 4, 3, 9]), ValueError,
             ("feature_scenario_rows",)),
        Case("aware-range-not-global-size", _set("feature_scenario_rows", lambda a: [0, 3, 3, 8]), ValueError,
             ("feature_scenario_rows",)),
        # per_sample_weights
        Case("psw-with-mean", lambda a: a.update(pooling="mean", per_sample_weights=torch.rand(
            a["indices"].numel(), device=a["indices"].device)), ValueError, ("per_sample_weights",)),
        Case("psw-with-none-pooling", lambda a: a.update(pooling="none", per_sample_weights=torch.rand(
            a["indices"].numel(), device=a["indices"].device)), ValueError, ("per_sample_weights",)),
        Case("psw-one-short", _set("per_sample_weights", lambda a: torch.rand(a["indices"].numel() - 1,
                                                                              device=a["indices"].device)),
             ValueError, ("per_sample_weights",)),
        Case("psw-2d", _set("per_sample_weights", lambda a: torch.rand(1, a["indices"].numel(),
                                                                       device=a["indices"].device)),
             ValueError, ("per_sample_weights",)),
        Case("psw-int", _set("per_sample_weights", lambda a: torch.ones(a["indices"].numel(), dtype=torch.long,
                                                                        device=a["indices"].device)),
             TypeError, ("per_sample_weights",)),
        # options
        Case("pooling-unknown", _set("pooling", lambda a: "max"), ValueError, ("pooling",)),
        Case("pooling-none-ragged", _set("pooling", lambda a: "none"), ValueError, ("pooling",)),
        Case("bounds-check-unknown", _set("bounds_check", lambda a: "clip"), ValueError, ("bounds_check",)),
        Case("sparse-not-bool", _set("sparse", lambda a: "yes"), TypeError, ("sparse",)),
        Case("backend-unknown", _set("backend", lambda a: "tpu"), ValueError, ("backend",)),
        Case("backend-unavailable", _set("backend", lambda a: "cuda"), saml_kernels.BackendUnavailableError,
             ("cuda",)),
        # devices (the meta device stands in for a second device)
        Case("device-global-weight", _set("global_weight", lambda a: a["global_weight"].to("meta")), ValueError,
             ("global_weight",)),
        Case("device-scenario-weight", _set("scenario_weight", lambda a: a["scenario_weight"].to("meta")),
             ValueError, ("scenario_weight",)),
        Case("device-offsets", _set("offsets", lambda a: a["offsets"].to("meta")), ValueError, ("offsets",)),
        Case("device-scenario", _set("scenario", lambda a: a["scenario"].to("meta")), ValueError, ("scenario",)),
        Case("device-psw", _set("per_sample_weights", lambda a: torch.rand(a["indices"].numel(), device="meta")),
             ValueError, ("per_sample_weights",)),
    ]

    @pytest.mark.parametrize("device,backend", PAIRS)
    @pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
    def test_valid_call_passes(self, device, backend, idx_dtype):
        """The unmutated input is accepted, so each case below fails because of its one mutation."""
        g, s = self.call(**self.valid(device, idx_dtype), backend=backend)
        assert g.shape == (3, 3, 4) and s.shape == (3, 2, 4)

    @pytest.mark.parametrize("device,backend", PAIRS)
    @pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
    @pytest.mark.parametrize("case", CASES, ids=cases_ids(CASES))
    def test_rejected(self, device, backend, idx_dtype, case):
        if case.id == "backend-unavailable" and device == "cuda":
            pytest.skip("cuda is available on a cuda device")
        args = self.valid(device, idx_dtype)
        args["backend"] = backend
        case.mutate(args)
        expect_rejected(self.call, args, case.exc, case.names)

    @pytest.mark.parametrize("device,backend", PAIRS)
    def test_error_names_feature_position_value(self, device, backend):
        args = self.valid(device)
        pos = _bag_start(args, 2, 1)
        args["indices"][pos] = 5  # feature 2 has 5 rows: one past its end
        msg = expect_rejected(self.call, dict(args, backend=backend), IndexError, ("indices",))
        assert f"indices[{pos}] = 5" in msg and "feature 2" in msg and "sample 1" in msg

    @pytest.mark.parametrize("device,backend", PAIRS)
    def test_rejected_before_any_gradient(self, device, backend):
        """A rejected call under autograd leaves no partial gradient behind."""
        args = self.valid(device)
        args["global_weight"].requires_grad_()
        args["indices"][0] = 99
        with pytest.raises(IndexError):
            self.call(**args, backend=backend)
        assert args["global_weight"].grad is None


# ---------------------------------------------------------------------------------- crash-proofing

@pytest.mark.slow
@pytest.mark.triton_interp  # also in the interpreter pass, where the child runs the Triton cases
@pytest.mark.skipif(CHILD, reason="already inside the subprocess run")
def test_file_runs_clean_in_subprocess():
    """This whole file in a child process exits normally (no signal, no failure): bad input never crashes it."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, SAML_BAD_INPUT_CHILD="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)]
    if os.environ.get("TRITON_INTERPRET") == "1":
        cmd += ["-m", "triton_interp"]
    proc = subprocess.run(cmd, cwd=os.path.dirname(here), env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode} (a crash):\n{tail}"
    assert proc.returncode == 0, f"rc={proc.returncode}:\n{tail}"
    assert " passed" in proc.stdout, tail
