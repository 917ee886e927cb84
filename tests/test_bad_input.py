"""Bad-input suite: every malformed argument -> the documented exception, with a message naming the argument.

Conventions (saml_kernels/ops/_checks.py): a wrong dtype or a non-tensor -> TypeError; a wrong rank,
shape, length, option or device -> ValueError; an id or scenario id out of range -> IndexError; an unavailable
backend -> BackendUnavailableError. The user's tensors are never modified by a failing call.

Layout: one test class per op (``TestScenarioEmbeddingBag`` below); each class has a ``valid(device)`` input maker,
a ``call(...)`` and a table of ``Case(id, mutate, exception, names)``, checked by the shared ``expect_rejected``.
Add a class per new op. The cases of this file and of test_bad_input_ops.py run once, in a fresh child process
(``test_bad_input_suite_in_a_fresh_process`` at the end): a kernel that crashes (segfault/abort) on bad input
fails that test instead of killing the test run.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import saml_kernels
from conftest import device_backends

HERE = os.path.dirname(os.path.abspath(__file__))
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
        Case("aware-range-above-global-size", _set("feature_scenario_rows", lambda a: [0, 5, 5, 9]), ValueError,
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


# ---------------------------------------------------------------------------------- partitioned_norm

class TestPartitionedNorm:
    OP = "partitioned_norm"
    PAIRS = device_backends(OP)

    @staticmethod
    def valid(device, idx_dtype=torch.int64):
        """A valid training call: B=5 rows of N=3 features, M=2 scenarios, running statistics given."""
        B, N, M = 5, 3, 2
        r = lambda *s: torch.randn(*s, device=device)  # noqa: E731
        return dict(x=r(B, N), scenario=torch.tensor([0, 1, 1, 0, 1], dtype=idx_dtype, device=device), weight=r(N),
                    bias=r(N), scenario_weight=r(M, N), scenario_bias=r(M, N), running_mean=r(M, N),
                    running_var=torch.rand(M, N, device=device) + 0.5)

    @staticmethod
    def call(**kw):
        return saml_kernels.partitioned_norm(**kw)

    CASES = [
        Case("x-int", _set("x", lambda a: a["x"].long()), TypeError, ("x",)),
        Case("x-1d", _set("x", lambda a: a["x"].flatten()), ValueError, ("x",)),
        Case("x-list", _set("x", lambda a: a["x"].tolist()), TypeError, ("x",)),
        Case("x-none", _set("x", lambda a: None), TypeError, ("x",)),
        Case("x-sparse", _set("x", lambda a: a["x"].to_sparse()), TypeError, ("x",)),
        Case("scenario-float", _set("scenario", lambda a: a["scenario"].float()), TypeError, ("scenario",)),
        Case("scenario-2d", _set("scenario", lambda a: a["scenario"][None]), ValueError, ("scenario",)),
        Case("scenario-short", _set("scenario", lambda a: a["scenario"][:-1]), ValueError, ("scenario",)),
        Case("scenario-equal-M", _edit("scenario", lambda t, a: t.__setitem__(1, 2)), IndexError, ("scenario[1] = 2",)),
        Case("scenario-negative", _edit("scenario", lambda t, a: t.__setitem__(0, -1)), IndexError,
             ("scenario[0] = -1",)),
        Case("weight-dtype-differs", _set("weight", lambda a: a["weight"].double()), TypeError, ("weight",)),
        Case("weight-N-differs", _set("weight", lambda a: a["weight"][:-1]), ValueError, ("weight",)),
        Case("bias-2d", _set("bias", lambda a: a["bias"][None]), ValueError, ("bias",)),
        Case("scenario-weight-1d", _set("scenario_weight", lambda a: a["scenario_weight"][0]), ValueError,
             ("scenario_weight",)),
        Case("scenario-weight-no-scenarios", _set("scenario_weight", lambda a: a["scenario_weight"][:0]), ValueError,
             ("scenario_weight",)),
        Case("scenario-bias-M-differs", _set("scenario_bias", lambda a: a["scenario_bias"][:1]), ValueError,
             ("scenario_bias",)),
        Case("running-mean-shape", _set("running_mean", lambda a: a["running_mean"][:, :-1]), ValueError,
             ("running_mean",)),
        Case("running-var-half", _set("running_var", lambda a: a["running_var"].half()), TypeError, ("running_var",)),
        Case("running-var-missing", _set("running_var", lambda a: None), ValueError, ("running_mean",)),
        Case("momentum-above-1", _set("momentum", lambda a: 1.5), ValueError, ("momentum",)),
        Case("momentum-nan", _set("momentum", lambda a: float("nan")), ValueError, ("momentum",)),
        Case("momentum-string", _set("momentum", lambda a: "0.1"), TypeError, ("momentum",)),
        Case("eps-zero", _set("eps", lambda a: 0.0), ValueError, ("eps",)),
        Case("eps-bool", _set("eps", lambda a: True), TypeError, ("eps",)),
        Case("backend-unknown", _set("backend", lambda a: "tpu"), ValueError, ("backend",)),
        Case("device-running-mean", _set("running_mean", lambda a: a["running_mean"].to("meta")), ValueError,
             ("running_mean",)),
        Case("device-scenario", _set("scenario", lambda a: a["scenario"].to("meta")), ValueError, ("scenario",)),
    ]

    @pytest.mark.parametrize("device,backend", PAIRS)
    def test_valid_call_passes(self, device, backend):
        assert self.call(**self.valid(device), backend=backend).shape == (5, 3)

    @pytest.mark.parametrize("device,backend", PAIRS)
    @pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
    @pytest.mark.parametrize("case", CASES, ids=cases_ids(CASES))
    def test_rejected(self, device, backend, idx_dtype, case):
        """Named error; no tensor argument (the running statistics included) modified."""
        args = self.valid(device, idx_dtype)
        args["backend"] = backend
        case.mutate(args)
        expect_rejected(self.call, args, case.exc, case.names)

    @pytest.mark.parametrize("device,backend", PAIRS)
    def test_bad_scenario_in_a_deferred_block(self, device, backend):
        """The same error when the block's one check is read; the running statistics untouched meanwhile."""
        args = dict(self.valid(device), backend=backend)
        args["scenario"][3] = 7
        msg = expect_rejected(lambda **kw: _deferred(self.call, kw), args, IndexError, ("scenario",))
        assert "partitioned_norm: scenario[3] = 7 is out of range [0, 2)" in msg


def _deferred(fn, kw):
    snap = [(t, t.clone()) for t in kw.values() if isinstance(t, torch.Tensor)]
    try:
        with saml_kernels.deferred_checks():
            fn(**kw)
    finally:
        for t, before in snap:
            assert torch.equal(t, before), "a deferred call modified a tensor before its check raised"


# ---------------------------------------------------------------------------------- STAR / HMoE layers and models

def _layer(kind, device, backend):
    from saml_kernels.nn import PartitionedNorm, StarLinear

    if kind == "StarLinear":
        return StarLinear(3, 4, 2, activation="relu", backend=backend, device=device)
    return PartitionedNorm(3, 2, backend=backend, device=device)


LAYER_CASES = [  # (id, mutate(x, scenario) -> (x, scenario), exception, text the message must hold)
    ("scenario-equal-M", lambda x, s: (x, s.index_fill(0, torch.tensor([2], device=s.device), 2)), IndexError,
     "scenario[2] = 2 is out of range [0, 2)"),
    ("scenario-negative", lambda x, s: (x, s.index_fill(0, torch.tensor([0], device=s.device), -3)), IndexError,
     "scenario[0] = -3"),
    ("scenario-float", lambda x, s: (x, s.float()), TypeError, "scenario"),
    ("scenario-short", lambda x, s: (x, s[:-1]), ValueError, "scenario"),
    ("x-int", lambda x, s: (x.long(), s), TypeError, "x"),
    ("x-width", lambda x, s: (x[:, :2], s), ValueError, "x"),
    ("x-3d", lambda x, s: (x[None], s), ValueError, "x"),
]


@pytest.mark.parametrize("kind", ["StarLinear", "PartitionedNorm"])
@pytest.mark.parametrize("device,backend", device_backends("partitioned_norm"))
@pytest.mark.parametrize("deferred", [False, True], ids=["eager", "deferred"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_star_layer_rejects_and_modifies_nothing(kind, device, backend, deferred, case):
    """Every bad input of StarLinear / PartitionedNorm (training mode): a named error, the parameters, running
    statistics and gradients untouched, also when the scenario check is deferred to the end of a block."""
    _, mutate, exc, text = case
    layer = _layer(kind, device, backend).train()
    x, s = mutate(torch.randn(5, 3, device=device), torch.tensor([0, 1, 1, 0, 1], device=device))
    snap = {k: v.clone() for k, v in layer.state_dict().items()}

    with pytest.raises(exc) as info:
        if deferred:  # as a model runs it: the forward in the block, the backward after its check is read
            with saml_kernels.deferred_checks():
                y = layer(x, s)
        else:
            y = layer(x, s)
        y.sum().backward()
    assert text in str(info.value), info.value
    for k, v in layer.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} modified"
    assert all(p.grad is None for p in layer.parameters())


def _family(kind):
    from saml_kernels.data import make_synthetic
    from saml_kernels.nn import HMoE, HMoEConfig, STAR, STARConfig

    data = make_synthetic(200, seed=7)
    if kind == "STAR":
        return data, STAR(STARConfig.from_data(data, hidden=(8,), embedding_dim=4, attention_dim=4),
                          embedding_optimizer="rowwise_adagrad")
    return data, HMoE(HMoEConfig.from_data(data, expert_hidden=(8,), tower_hidden=4, embedding_dim=4,
                                           attention_dim=4), embedding_optimizer="rowwise_adagrad")


def _model_cases(batch, M):
    """(id, inputs, exception, text) over (indices, offsets, scenario, seq_ids, seq_lengths, dense)."""
    i = list(batch.inputs())

    def with_(pos, value):
        out = list(i)
        out[pos] = value
        return out

    def edit(pos, fn):
        t = i[pos].clone()
        fn(t)
        return with_(pos, t)

    L = i[3].shape[1]
    return [
        ("id-out-of-feature", edit(0, lambda t: t.__setitem__(4, 10 ** 6)), IndexError, "indices[4] = 1000000"),
        ("id-negative", edit(0, lambda t: t.__setitem__(0, -1)), IndexError, "indices[0] = -1"),
        ("indices-float", with_(0, i[0].float()), TypeError, "indices"),
        ("offsets-non-monotone", edit(1, lambda t: t.__setitem__(2, t[3] + 1)), ValueError, "offsets"),
        ("offsets-short", with_(1, i[1][:-1]), ValueError, "offsets"),
        ("scenario-equal-M", edit(2, lambda t: t.__setitem__(6, M)), IndexError, f"scenario[6] = {M}"),
        ("scenario-float", with_(2, i[2].float()), TypeError, "scenario"),
        ("seq-ids-1d", with_(3, i[3].flatten()), ValueError, "seq_ids"),
        ("seq-id-out-of-range", edit(3, lambda t: t.__setitem__((1, 0), 10 ** 6)), IndexError, "1000000"),
        ("seq-length-above-L", edit(4, lambda t: t.__setitem__(2, L + 1)), ValueError, f"seq_lengths[2] = {L + 1}"),
        ("seq-lengths-missing", with_(4, None), ValueError, "seq_lengths"),
        ("dense-width", with_(5, i[5][:, :1]), ValueError, "dense"),
    ]


@pytest.mark.parametrize("kind", ["STAR", "HMoE"])
def test_star_hmoe_reject_every_bad_input_and_modify_nothing(kind):
    """Through a training step (forward, backward, optimizer step): each bad input raises its named error, and the
    weights, the fused embedding tables and their row-wise states, PartitionedNorm's running statistics and the
    optimizer's state are exactly as before."""
    from saml_kernels.nn import TrainingOptimizer
    from saml_kernels.training import bce_loss

    data, model = _family(kind)
    opt = TrainingOptimizer(model)
    batch = data.batch(list(range(32)))
    opt.zero_grad()
    model.loss(batch).backward()
    opt.step()  # running statistics and optimizer state away from their initial values
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    opt_snap = repr(opt.state_dict())  # tensors print their values
    for cid, inputs, exc, text in _model_cases(batch, model.config.num_scenarios):
        opt.zero_grad()
        with pytest.raises(exc) as info:
            bce_loss(model(*inputs), batch.label).backward()
            opt.step()
        assert text in str(info.value), f"{cid}: {info.value}"
        for k, v in model.state_dict().items():
            assert torch.equal(v, snap[k]), f"{cid}: {k} modified"
        assert repr(opt.state_dict()) == opt_snap, f"{cid}: optimizer state modified"


# ---------------------------------------------------------------------------------- the suite's one run

@pytest.mark.slow
@pytest.mark.triton_interp  # also in the interpreter pass, where the child runs the (disjoint) Triton cases
@pytest.mark.skipif(CHILD, reason="already inside the child process")
def test_bad_input_suite_in_a_fresh_process():
    """Every case of tests/test_bad_input*.py, run once, in a fresh child pytest process that must exit normally.

    Why a child: a kernel that segfaults or aborts on bad input would kill the test run itself; the child turns
    that into this test's failure, and it feeds every bad input to a process that has run nothing else (first
    calls: lazy kernel registration, empty caches). The parent run deselects the cases (conftest.py), so each
    runs once; in the interpreter pass the child selects the Triton cases (``-m triton_interp``).
    ``SAML_BAD_INPUT_CHILD=1 pytest tests/test_bad_input*.py`` runs the cases in-process while debugging."""
    files = sorted(glob.glob(os.path.join(HERE, "test_bad_input*.py")))
    env = dict(os.environ, SAML_BAD_INPUT_CHILD="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider", *files]
    if os.environ.get("TRITON_INTERPRET") == "1":
        cmd += ["-m", "triton_interp"]
    proc = subprocess.run(cmd, cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode >= 0, f"bad-input suite killed by signal {-proc.returncode} (a crash):\n{tail}"
    assert proc.returncode == 0, f"bad-input suite failed (rc={proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout, tail
