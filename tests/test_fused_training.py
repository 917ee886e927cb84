"""The fused embedding optimizers inside model training (the layers' update in the backward, TrainingOptimizer):

- capture-safe mode: a bad input anywhere in a model's forward skips the fused update of every fused layer of
  that step (the model takes one error snapshot before its first check); bounds_check="zero" is no error there;
- a backward in eval() runs the fused update (as FBGEMM / TorchRec), so SAML and SAMLReference stay twins;
- resume with an LR scheduler on the fused optimizers is bitwise equal to an uninterrupted run;
- several backwards before one TrainingOptimizer.step() warn (once per optimizer);
- eps set through fused_optimizer (param group, load_state_dict) reaches the kernels;
- torch.save / torch.load, pickle and deepcopy of a fused-optimizer model load and train identically;
- no "lr_scheduler.step() before optimizer.step()" warning; TrainingOptimizer accepts fused SGD models.

Inputs are fresh random data (the seed comes from torch's generator, seeded per test by conftest).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import pickle
import warnings

import numpy as np
import pytest
import torch

import saml_kernels
from saml_kernels.data import make_synthetic
from saml_kernels.nn import (HMoE, HMoEConfig, SAML, SAMLConfig, ScenarioEmbedding, SharedBottom, STAR, STARConfig,
                             TrainingOptimizer)
from saml_kernels.ops import _checks
from saml_kernels.reference import SAMLReference
from saml_kernels.training import saml_loss

EMB_LR = 0.1


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _data(n=240, seq_len=6):
    return make_synthetic(n, num_users=40, num_items=50, num_categories=7, num_contexts=5, num_segments=6,
                          num_tags=11, seq_len=seq_len, seed=_seed())


SMALL = dict(embedding_dim=4, attention_dim=4)
CONFIGS = {
    "SAML": (SAML, lambda d: SAMLConfig.from_data(d, aux_hidden=(8, 5), branch_hidden=(8, 4), **SMALL)),
    "SharedBottom": (SharedBottom, lambda d: SAMLConfig.from_data(d, aux_hidden=(8, 5), branch_hidden=(8, 4),
                                                                  **SMALL)),
    "STAR": (STAR, lambda d: STARConfig.from_data(d, hidden=(8, 4), aux_dim=3, aux_hidden=5, **SMALL)),
    "HMoE": (HMoE, lambda d: HMoEConfig.from_data(d, expert_hidden=(8,), num_experts=2, tower_hidden=4, **SMALL)),
}


def _model(name, d, emb_opt="rowwise_adagrad", lr=EMB_LR):
    cls, cfg = CONFIGS[name]
    return cls(cfg(d), embedding_optimizer=emb_opt, embedding_lr=lr)


def _batches(d, k, size=64):
    rng = np.random.default_rng(_seed())
    return [d.batch(np.sort(rng.choice(len(d), size, replace=False))) for _ in range(k)]


def _train(model, opt, batches, scheds=()):
    for b in batches:
        opt.zero_grad()
        model.loss(b).backward()
        opt.step()
        for s in scheds:
            s.step()


def _fused_modules(model):
    return {n: m for n, m in model.named_modules() if getattr(m, "fused_optimizer", None) is not None}


def _tables(model) -> dict:
    """Every fused table and its row-wise state, cloned."""
    out = {}
    for n, m in _fused_modules(model).items():
        for k in ("global_weight", "scenario_weight", "global_state", "scenario_state"):
            t = getattr(m, k)
            if t is not None:
                out[f"{n}.{k}"] = t.detach().clone()
    return out


def _assert_state_equal(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------- capture-safe: skip the whole step

def _bad(batch, kind, M):
    """``batch`` with one bad entry of ``kind``."""
    if kind == "scenario":
        sc = torch.zeros_like(batch.scenario)
        sc[3] = M + 95  # the report: ids all 0 except one 99 (clamped to M - 1, whose rows must stay)
        return dataclasses.replace(batch, scenario=sc)
    if kind == "feature_id":
        idx = batch.indices.clone()
        idx[-1] = 10**6  # in the last feature
        return dataclasses.replace(batch, indices=idx)
    if kind == "offsets":
        off = batch.offsets.clone()
        off[1] = off[-1] + 3  # past nnz and above offsets[2]
        return dataclasses.replace(batch, offsets=off)
    if kind == "seq_ids":
        s = batch.seq_ids.clone()
        s[0, 0] = 10**6
        return dataclasses.replace(batch, seq_ids=s)
    if kind == "seq_lengths":
        s = batch.seq_lengths.clone()
        s[1] = batch.seq_ids.shape[1] + 3
        return dataclasses.replace(batch, seq_lengths=s)
    raise AssertionError(kind)


@pytest.mark.parametrize("emb_opt", ["rowwise_adagrad", "sgd"])
@pytest.mark.parametrize("kind", ["scenario", "feature_id", "offsets", "seq_ids", "seq_lengths"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_capture_safe_bad_input_skips_every_fused_update_of_the_step(name, kind, emb_opt):
    d = _data()
    model = _model(name, d, emb_opt)
    assert set(_fused_modules(model)) >= {"embedding", "sequence_embedding"} or \
        set(_fused_modules(model)) >= {"inputs.embedding", "inputs.sequence_embedding"}
    clean, = _batches(d, 1)
    bad = _bad(clean, kind, model.config.num_scenarios)
    _checks.raise_errors()  # zero counters
    before = _tables(model)
    with _checks.capture_safe_checks():
        model.loss(bad).backward()
    _assert_state_equal(_tables(model), before)
    with pytest.raises(ValueError, match="capture-safe"):
        _checks.raise_errors()
    with _checks.capture_safe_checks():  # a clean step right after updates every fused table
        model.loss(clean).backward()
    after = _tables(model)
    for k, v in after.items():
        if k.endswith("global_weight"):
            assert not torch.equal(v, before[k]), k
    _checks.raise_errors()  # nothing counted by the clean step


def test_capture_safe_bounds_zero_is_no_error_and_trains_the_valid_rows():
    """bounds_check="zero" maps a bad id to a zero vector in every mode: capture-safe mode counts no error and
    applies the update of the valid rows, as eager mode does (which warns)."""
    feats = [("a", 6, True), ("b", 5, False)]
    eager = ScenarioEmbedding(feats, 3, 4, optimizer="rowwise_adagrad", lr=EMB_LR, bounds_check="zero")
    safe = copy.deepcopy(eager)
    idx = torch.tensor([0, 7, 2, 3, 4, -1])
    off = torch.tensor([0, 2, 3, 5, 6])
    sc = torch.tensor([1, 2])
    up = (torch.randn(2, 2, 4), torch.randn(2, 1, 4))
    before = eager.global_weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # eager mode warns about the zeroed ids
        torch.autograd.backward(list(eager(idx, off, sc)), list(up))
    _checks.raise_errors()
    with _checks.capture_safe_checks():
        torch.autograd.backward(list(safe(idx, off, sc)), list(up))
    _checks.raise_errors()  # no error counted
    assert not torch.equal(eager.global_weight, before)
    _assert_state_equal(safe.state_dict(), eager.state_dict())


def test_capture_safe_counts_one_per_failing_check_call():
    """The counters count failing checks (one per op call), not bad entries (the documented contract)."""
    _checks.raise_errors()
    layer = ScenarioEmbedding([("a", 6, True)], 3, 4)
    idx = torch.tensor([9, 9, 9, 1])
    off = torch.tensor([0, 2, 4])
    with _checks.capture_safe_checks():
        layer(idx, off, torch.tensor([0, 1]))
    counts = {k: int(v) for k, v in saml_kernels.error_counts("cpu").items() if int(v)}
    assert list(counts.values()) == [1], counts
    with pytest.raises(ValueError, match="1 x"):
        _checks.raise_errors()


# ----------------------------------------------------------------------- eval-mode backward

def test_eval_mode_backward_updates_fused_tables_and_twins_agree():
    d = _data()
    cfg = SAMLConfig.from_data(d, aux_hidden=(8, 5), branch_hidden=(8, 4), **SMALL)
    fast = SAML(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=EMB_LR)
    ref = SAMLReference(cfg, embedding_optimizer="rowwise_adagrad")
    ref.load_state_dict(fast.state_dict())
    init = fast.embedding.global_weight.detach().clone()
    opts = [TrainingOptimizer(m, 1e-2, EMB_LR) for m in (fast, ref)]
    batches = _batches(d, 3)
    for m, o in zip((fast, ref), opts):
        m.eval()  # fine-tuning with frozen statistics / no dropout
        _train(m, o, batches)
    assert (fast.embedding.global_weight - init).abs().max() > 1e-3  # the tables moved
    assert fast.embedding.global_weight.grad is None  # fused: no dense gradient left behind
    sr = ref.state_dict()
    for k, v in fast.state_dict().items():
        torch.testing.assert_close(v, sr[k], atol=1e-5, rtol=1e-4, msg=k)


def test_no_grad_runs_no_update():
    layer = ScenarioEmbedding([("a", 6, True)], 3, 4, optimizer="sgd", lr=EMB_LR).eval()
    with torch.no_grad():
        g, s = layer(torch.tensor([1, 2]), torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    assert not g.requires_grad and not s.requires_grad


# ----------------------------------------------------------------------- resume with a scheduler; no scheduler warning

def _schedulers(model, kind):
    mods = _fused_modules(model).values()
    if kind == "step":
        return [torch.optim.lr_scheduler.StepLR(m.fused_optimizer, step_size=1, gamma=0.5) for m in mods]
    return [torch.optim.lr_scheduler.LambdaLR(m.fused_optimizer, lambda e: 1.0 / (1 + e)) for m in mods]


def _save_load(obj, weights_only=True):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


@pytest.mark.parametrize("sched", ["step", "lambda"])
def test_resume_with_a_scheduler_on_the_fused_optimizers_is_exact(sched):
    d = _data()
    batches = _batches(d, 4)
    straight = _model("SAML", d)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    opt = TrainingOptimizer(straight, 1e-2, EMB_LR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 12: no "lr_scheduler.step() before optimizer.step()"
        _train(straight, opt, batches, _schedulers(straight, sched))

    first = _model("SAML", d)
    first.load_state_dict(init)
    opt1 = TrainingOptimizer(first, 1e-2, EMB_LR)
    s1 = _schedulers(first, sched)
    _train(first, opt1, batches[:2], s1)
    assert first.embedding.lr < EMB_LR  # mid-schedule
    ckpt = _save_load({"model": first.state_dict(), "opt": opt1.state_dict(),
                       "sched": [s.state_dict() for s in s1]}, weights_only=sched == "step")

    resumed = _model("SAML", d)
    resumed.load_state_dict(ckpt["model"])
    opt2 = TrainingOptimizer(resumed, 1e-2, EMB_LR)
    s2 = _schedulers(resumed, sched)
    opt2.load_state_dict(ckpt["opt"])
    for s, sd in zip(s2, ckpt["sched"]):
        s.load_state_dict(sd)
    assert resumed.embedding.lr == first.embedding.lr
    assert resumed.embedding._fused_hparams[0].item() == first.embedding.lr
    _train(resumed, opt2, batches[2:], s2)
    _assert_state_equal(resumed.state_dict(), straight.state_dict())


def test_an_optimizer_state_dict_without_fused_entries_still_loads():
    """A dict written before the fused modules' hyper-parameters were saved (or by the reference twin, whose
    tables are not fused) gives the Adagrad fused modules the recipe's embedding_lr / eps."""
    d = _data()
    model = _model("SAML", d)
    opt = TrainingOptimizer(model, 1e-2, EMB_LR)
    _train(model, opt, _batches(d, 1))
    sd = opt.state_dict()
    del sd["fused"]
    sd["embedding_lr"], sd["eps"] = 0.02, 1e-6
    other = _model("SAML", d)
    o2 = TrainingOptimizer(other, 1e-2, EMB_LR)
    o2.load_state_dict(sd)
    for m in _fused_modules(other).values():
        assert (m.lr, m.eps) == (0.02, 1e-6)
        assert m._fused_hparams[:2].tolist() == [0.02, 1e-6]


def test_scheduler_on_a_bare_layer_sees_the_step():
    """The README pattern on a bare layer: fused_optimizer.step() (a no-op on the weights) ends the step."""
    layer = ScenarioEmbedding([("a", 6, True)], 3, 4, optimizer="rowwise_adagrad", lr=EMB_LR)
    sched = torch.optim.lr_scheduler.StepLR(layer.fused_optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            g, s = layer(torch.tensor([1, 2]), torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
            (g.sum() + s.sum()).backward()
            layer.fused_optimizer.step()
            sched.step()
    assert layer.lr == pytest.approx(EMB_LR / 4)
    assert layer._fused_hparams[0].item() == pytest.approx(EMB_LR / 4)


# ----------------------------------------------------------------------- one backward per step

@pytest.mark.parametrize("how", ["accumulation", "retain_graph"])
def test_two_backwards_before_one_step_warn_once(how):
    d = _data()
    model = _model("SAML", d)
    opt = TrainingOptimizer(model, 1e-2, EMB_LR)
    b0, b1 = _batches(d, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, [b0, b1])  # one backward per step: silent

    def two_backwards():
        opt.zero_grad()
        if how == "accumulation":
            model.loss(b0).backward()
            model.loss(b1).backward()
        else:
            loss = model.loss(b0)
            loss.backward(retain_graph=True)
            loss.backward()
        opt.step()

    with pytest.warns(RuntimeWarning, match=r"ran 2 backward passes since the last step.*summed gradient"):
        two_backwards()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two_backwards()  # warned once per optimizer
        _train(model, opt, [b0])


def test_one_backward_through_a_layer_used_twice_does_not_warn():
    layer = ScenarioEmbedding([("a", 6, True)], 3, 4, optimizer="rowwise_adagrad", lr=EMB_LR)
    opt = TrainingOptimizer(torch.nn.ModuleDict(dict(emb=layer, head=torch.nn.Linear(4, 1))), embedding_lr=EMB_LR)
    args = (torch.tensor([1, 2]), torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g1, _ = layer(*args)
        g2, _ = layer(*args)
        (g1.sum() + g2.sum()).backward()
        opt.step()


# ----------------------------------------------------------------------- eps reaches the kernels

def _layer_step(layer, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 6, (8,), generator=gen)
    off = torch.tensor([0, 2, 4, 6, 8])
    sc = torch.randint(0, 3, (4,), generator=gen)
    g, s = layer(idx, off, sc)
    torch.autograd.backward([g, s], [torch.randn(g.shape, generator=gen), torch.randn(s.shape, generator=gen)])


@pytest.mark.parametrize("how", ["param_group", "load_state_dict", "attribute"])
def test_eps_set_through_the_fused_optimizer_reaches_the_kernels(how):
    feats = [("a", 6, True)]
    want = ScenarioEmbedding(feats, 3, 4, optimizer="rowwise_adagrad", lr=EMB_LR, eps=0.25)
    got = ScenarioEmbedding(feats, 3, 4, optimizer="rowwise_adagrad", lr=EMB_LR)  # eps 1e-8
    got.load_state_dict(want.state_dict())
    if how == "param_group":
        got.fused_optimizer.param_groups[0]["eps"] = 0.25
    elif how == "load_state_dict":
        got.fused_optimizer.load_state_dict(want.fused_optimizer.state_dict())
    else:
        got.eps = 0.25
    seed = _seed()
    _layer_step(want, seed)
    _layer_step(got, seed)
    assert got.eps == 0.25
    _assert_state_equal(got.state_dict(), want.state_dict())
    with pytest.raises(ValueError, match="eps must be > 0"):
        got.fused_optimizer.param_groups[0]["eps"] = 0.0
    sd = got.fused_optimizer.state_dict()
    sd["param_groups"][0]["eps"] = -1.0
    with pytest.raises(ValueError, match="eps must be > 0"):
        got.fused_optimizer.load_state_dict(sd)
    assert got.eps == 0.25 and got._fused_hparams[1].item() == 0.25  # nothing written


# ----------------------------------------------------------------------- pickle / torch.save / deepcopy

def _pickle_copy(model):
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pickled_and_deep_copied_models_load_and_train_identically(name):
    d = _data()
    model = _model(name, d)
    _train(model, TrainingOptimizer(model, 1e-2, EMB_LR), _batches(d, 1))
    for m in _fused_modules(model).values():
        m.fused_optimizer.param_groups[0]["weight_decay"] = 0.01  # a non-default hyper-parameter travels too
    copies = [_save_load(model, weights_only=False), _pickle_copy(model), copy.deepcopy(model)]
    batches = _batches(d, 2)
    states = []
    for m in [model] + copies:
        for mod in _fused_modules(m).values():
            assert mod.fused_optimizer._layer is mod and mod.fused_optimizer.param_groups[0]._layer is mod
            assert mod.weight_decay == 0.01 and mod._fused_hparams[2].item() == 0.01
        _train(m, TrainingOptimizer(m, 1e-2, EMB_LR), batches)
        states.append(m.state_dict())
    for st in states[1:]:
        _assert_state_equal(st, states[0])


# ----------------------------------------------------------------------- fused SGD models

def test_training_optimizer_accepts_fused_sgd_models_and_keeps_their_lr():
    d = _data()
    batches = _batches(d, 3)
    model = _model("SAML", d, emb_opt="sgd", lr=0.2)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = TrainingOptimizer(model, 1e-2, EMB_LR)  # the recipe's embedding_lr is not the SGD tables' lr
    assert model.embedding.lr == 0.2
    opt.embedding_lr = 0.01  # drives the recipe's (Adagrad) tables only
    assert model.embedding.lr == 0.2 and model.sequence_embedding.lr == 0.2
    model.embedding.lr = 0.3  # by hand, as a scheduler would
    _train(model, opt, batches[:1])
    sd = _save_load(opt.state_dict())
    assert sd["fused"]["embedding"]["optimizer"] == "sgd" and sd["fused"]["embedding"]["lr"] == 0.3

    other = _model("SAML", d, emb_opt="sgd", lr=0.2)
    other.load_state_dict(model.state_dict())
    o2 = TrainingOptimizer(other, 1e-2, EMB_LR)
    o2.load_state_dict(sd)
    assert other.embedding.lr == 0.3 and other.sequence_embedding.lr == 0.2
    _train(model, opt, batches[1:])
    _train(other, o2, batches[1:])
    _assert_state_equal(other.state_dict(), model.state_dict())

    want = _model("SAML", d, emb_opt="sgd", lr=0.2)  # the SGD math with lr 0.2, not the recipe's
    want.load_state_dict(init)
    got = _model("SAML", d, emb_opt="sgd", lr=0.2)
    got.load_state_dict(init)
    ow, og = torch.optim.Adam([p for n, p in want.named_parameters() if "embedding" not in n], lr=1e-2), \
        TrainingOptimizer(got, 1e-2, EMB_LR)
    for m, o in ((want, ow), (got, og)):
        _train(m, o, batches[:1])
    torch.testing.assert_close(got.embedding.global_weight, want.embedding.global_weight, rtol=0, atol=0)

    adagrad = _model("SAML", d)
    with pytest.raises(ValueError, match="differ"):
        TrainingOptimizer(adagrad, 1e-2, EMB_LR).load_state_dict(sd)


# ----------------------------------------------------------------------- capture-safe on a GPU: a replayed CUDA graph

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
@pytest.mark.parametrize("kind", ["scenario", "feature_id"])
def test_cuda_graph_replay_with_bad_input_writes_no_fused_table(kind):
    from saml_kernels.graphs import CapturedTrainingStep

    d = _data()
    model = _model("SAML", d).cuda()
    opt = TrainingOptimizer(model, 1e-2, EMB_LR, capturable=True)
    clean, = _batches(d, 1)
    bad = _bad(clean, kind, model.config.num_scenarios)
    to_t = lambda b: [t.cuda() for t in b.inputs()] + [b.label.cuda()]  # noqa: E731

    def loss_fn(m, *t):
        main, aux = m(*t[:-1])
        return saml_loss(main, aux, t[-1], m.config.aux_loss_weight)

    step = CapturedTrainingStep(model, opt, to_t(clean), loss_fn=loss_fn)
    saml_kernels.raise_errors()
    before = _tables(model)
    step(*to_t(bad))
    torch.cuda.synchronize()
    _assert_state_equal(_tables(model), before)
    with pytest.raises(ValueError, match="capture-safe"):
        saml_kernels.raise_errors()
    step(*to_t(clean))
    assert not torch.equal(model.embedding.global_weight, before["embedding.global_weight"])
