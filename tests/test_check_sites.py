"""One check site per value (docs/design.md section 5): in a training step every value is checked once, where it
is cheapest on its device, and the ops trust what the model's boundary checked.

The checks are counted by spying on ``_checks.check_value`` (every check of a deferred or capture-safe block goes
through it, named by its kind) and on ``_checks.scenario_range`` (the scenario-range reduction)."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import saml_kernels
from saml_kernels.data import make_synthetic
from saml_kernels.nn import HMoE, HMoEConfig, SAML, SAMLConfig, STAR, STARConfig, TrainingOptimizer
from saml_kernels.ops import _checks

CPU_BACKENDS = [b for b in saml_kernels.available_backends("cpu") if b in ("cpu", "reference")]
MODES = {"deferred": None, "capture_safe": saml_kernels.capture_safe_checks}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(300, num_users=60, num_items=80, num_categories=7, num_contexts=5, num_segments=6,
                          num_tags=11, seq_len=6, seed=3)


class Spy:
    """Counts the value checks: ``kinds`` (check_value's ``what``) and ``scenario`` (scenario_range calls on a
    tensor not checked yet, by op)."""

    def __init__(self, monkeypatch):
        self.kinds, self.scenario = collections.Counter(), collections.Counter()
        check_value, scenario_range = _checks.check_value, _checks.scenario_range

        def spy_value(flag, explain, what, key=None):
            self.kinds[what] += 1
            return check_value(flag, explain, what, key)

        def spy_range(op, scenario, num_scenarios):
            trusted = getattr(_checks, "checked", lambda *a: None)(scenario, "scenario", num_scenarios)
            if trusted is None:  # (a trusted tensor costs nothing)
                self.scenario[op] += 1
            return scenario_range(op, scenario, num_scenarios)

        monkeypatch.setattr(_checks, "check_value", spy_value)
        monkeypatch.setattr(_checks, "scenario_range", spy_range)

    def clear(self):
        self.kinds.clear()
        self.scenario.clear()


def _step(model, opt, batch, mode):
    ctx = MODES[mode]() if MODES[mode] is not None else saml_kernels.deferred_checks()
    with ctx:
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()


def _saml(data, backend):
    cfg = SAMLConfig.from_data(data, embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6),
                               mutual_layers=(0,))
    return SAML(cfg, backend=backend, embedding_optimizer="rowwise_adagrad")


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_saml_step_checks_each_value_once(data, monkeypatch, backend, mode):
    """The scenario once (the model's boundary; no op checks it again), each embedding layer's offsets and ids
    once, the lengths once. On the CPU backend outside capture-safe mode the offsets' site is the kernel's one-pass
    check (no tensor reductions); in capture-safe mode it is the op's entry, which makes the stand-ins the
    backward needs."""
    model = _saml(data, backend)
    opt = TrainingOptimizer(model)
    batch = data.batch(np.arange(48))
    _step(model, opt, batch, mode)  # warm caches
    spy = Spy(monkeypatch)
    _step(model, opt, batch, mode)
    scen = {k: v for k, v in spy.kinds.items() if "scenario id out of range" in k}
    assert scen == {"SAML: scenario id out of range": 1}, spy.kinds
    assert dict(spy.scenario) == {"SAML": 1}, spy.scenario
    assert spy.kinds["ScenarioAttention: seq_lengths out of [0, L]"] == 1, spy.kinds
    seb = {k: v for k, v in spy.kinds.items() if k.startswith("scenario_embedding_bag")}
    layers = 2  # the feature embedding and the sequence embedding
    if backend == "cpu" and mode == "deferred":
        assert seb == {"scenario_embedding_bag: bad offsets, scenario ids or ids": layers}, spy.kinds
    else:
        assert seb == {"scenario_embedding_bag: bad offsets": layers,
                       "scenario_embedding_bag: id out of its feature's range": layers}, spy.kinds
    saml_kernels.raise_errors()  # a clean batch counted nothing


@pytest.mark.parametrize("kind", ["STAR", "HMoE"])
def test_family_step_checks_the_scenario_once(data, monkeypatch, kind):
    """STAR (partitioned norm, star layers, the unrouted auxiliary layer) and HMoE (experts on zeros, gates and
    towers by scenario) check the scenario once, at the boundary."""
    if kind == "STAR":
        model = STAR(STARConfig.from_data(data, hidden=(16, 8), aux_dim=4, aux_hidden=8),
                     embedding_optimizer="rowwise_adagrad")
    else:
        model = HMoE(HMoEConfig.from_data(data, expert_hidden=(16,), tower_hidden=8),
                     embedding_optimizer="rowwise_adagrad")
    opt = TrainingOptimizer(model)
    batch = data.batch(np.arange(48))
    _step(model, opt, batch, "deferred")
    spy = Spy(monkeypatch)
    _step(model, opt, batch, "deferred")
    assert dict(spy.scenario) == {kind: 1}, spy.scenario
    assert {k: v for k, v in spy.kinds.items() if "scenario id out of range" in k} == {f"{kind}: scenario id out of range": 1}


def test_bad_offsets_through_the_model_name_the_entry_and_write_nothing(data):
    """The CPU kernel's one-pass check inside the model's deferred block: the op's error names the bad entry,
    and nothing is written (the block raises before the backward)."""
    model = _saml(data, "cpu")
    batch = data.batch(np.arange(16))
    inputs = list(batch.inputs())
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    off = inputs[1].clone()
    off[3], off[4] = off[4], off[3] - 1  # offsets[4] < offsets[3]
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing, but offsets\[4\] = \d+ < offsets\[3\]"):
        main, aux = model(inputs[0], off, *inputs[2:])
        (main.sum() + aux.sum()).backward()
    bad_len = inputs[0].clone()
    bad_len[2] = 10 ** 6
    with pytest.raises(IndexError, match=r"indices\[2\] = 1000000 is out of range for feature"):
        model(bad_len, *inputs[1:])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snap[k], rtol=0, atol=0, msg=k)


def test_eager_op_checks_the_scenario_once_inside():
    """A bare op call (eager mode): one check, inside the custom op, naming the op, the position and the value."""
    x, w, b = torch.randn(5, 3), torch.randn(2, 3, 4), torch.randn(2, 4)
    sc = torch.tensor([0, 1, 1, 0, 1])
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        saml_kernels.mbranch_linear(x, w, b, sc, activation="relu")
        assert dict(spy.scenario) == {"mbranch_linear": 1}
    with pytest.raises(IndexError, match=r"mbranch_linear: scenario\[2\] = 2 is out of range \[0, 2\)"):
        saml_kernels.mbranch_linear(x, w, b, torch.tensor([0, 1, 2, 0, 1]))


def test_the_token_is_one_tensor_at_one_version_in_one_block():
    """What an op trusts: the checked tensor object, unchanged, in the block that checked it, against a range no
    wider than the checked one. An in-place change, a narrower op or the end of the block voids it."""
    x, w, b = torch.randn(5, 3), torch.randn(3, 3, 4), torch.randn(3, 4)
    with saml_kernels.deferred_checks():
        sc = _checks.model_scenario("Model", torch.tensor([0, 1, 1, 0, 1]), 3)
        assert _checks.op_scenario("op", sc, 3, True) == (sc, False)      # trusted
        assert _checks.op_scenario("op", sc, 4, True) == (sc, False)      # a wider range holds too
        narrow, check = _checks.op_scenario("op", sc, 2, True)            # a narrower one does not
        assert narrow is not sc and check is False
    with pytest.raises(IndexError, match=r"op: scenario\[1\] = 2 is out of range \[0, 2\)"):
        with saml_kernels.deferred_checks():
            sc = _checks.model_scenario("Model", torch.tensor([0, 2, 1, 0, 2]), 3)
            _checks.op_scenario("op", sc, 2, True)
    with pytest.raises(IndexError, match=r"mbranch_linear: scenario\[0\] = 7 is out of range \[0, 3\)"):
        with saml_kernels.deferred_checks():
            sc = _checks.model_scenario("Model", torch.tensor([0, 2, 1, 0, 2]), 3)
            sc[0] = 7  # in place, after the check
            saml_kernels.mbranch_linear(x, w, b, sc)
    assert _checks.checked(sc, "scenario", 3) is None  # the block is over
    with pytest.raises(IndexError, match=r"mbranch_linear: scenario\[0\] = 7"):
        saml_kernels.mbranch_linear(x, w, b, sc)


def test_exported_ops_trust_the_boundary(data):
    """torch.export records the model's boundary check: the exported ops get check=False (the served program
    checks the scenario before the graph, naming the model; a bare module still has the embedding kernel's check,
    naming the op)."""
    from saml_kernels import serving

    model = _saml(data, "cpu").eval()
    program = serving.export_saml(model, data.batch(np.arange(16)))
    ops = ("saml_kernels.mbranch_linear_own.", "saml_kernels.mutual_linear.")
    checks = [n.args[-2] for n in program.graph.nodes if str(n.target).startswith(ops)]  # (..., check, backend)
    # the attention's routed GEMM, the branch layer and head (mbranch_linear_own) and the mutual layer
    assert len(checks) == 4 and not any(checks), checks
    inputs = list(data.batch(np.arange(5)).inputs())
    inputs[2] = inputs[2].clone()
    inputs[2][1] = 9
    with pytest.raises(IndexError, match=r"SAML: scenario\[1\] = 9 is out of range \[0, 4\)"):
        serving.served_module(program)(*inputs)
    with pytest.raises(IndexError, match=r"scenario_embedding_bag: scenario\[1\] = 9 is out of range"):
        program.module()(*inputs)
