"""User-reported model/layer bugs, one test group per report; every test failed before its fix.

1. resume from TrainingOptimizer.state_dict() is bitwise equal to an uninterrupted run; learning rates are drivable;
2. seq_lengths outside [0, L] (or of a wrong dtype / shape) raise, in the layer and in the models;
3. an empty batch gives [0] logits, a loss of 0 with zero gradients, and a training step that moves nothing;
4. strict load_state_dict across embedding optimizers and twins (row-wise Adagrad states are optimizer state);
5. a seq_ids of the wrong batch size / rank / dtype raises an error naming seq_ids;
6. size arguments accept any integral (numpy, 0-dim tensors) but not bool, 0, negatives or floats;
7. SharedBottom(backend=...) puts its tower on that backend too;
8. python/train_saml.py writes under the current directory by default.

Inputs are fresh random data (the seed comes from torch's generator, seeded per test by conftest).
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import saml_kernels
from saml_kernels.data import make_synthetic
from saml_kernels.nn import (SAML, MultiBranchLinear, MutualUnit, SAMLConfig, ScenarioAttention, SharedBottom,
                             TrainingOptimizer)
from saml_kernels.reference import SAMLReference
from saml_kernels.reference.attention import RefScenarioAttention

ROOT = Path(__file__).resolve().parents[1]
EMB_OPTS = (None, "rowwise_adagrad")
TWINS = (SAML, SAMLReference)
EMB_LR = 0.1


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _data(n=300, seq_len=6):
    return make_synthetic(n, num_users=50, num_items=70, num_categories=7, num_contexts=5, num_segments=6,
                          num_tags=11, seq_len=seq_len, seed=_seed())


def _config(d, **kw):
    base = dict(embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6), aux_loss_weight=0.4)
    base.update(kw)
    return SAMLConfig.from_data(d, **base)


def _build(cls, cfg, emb_opt, **kw):
    if cls is SAMLReference:
        return SAMLReference(cfg, embedding_optimizer=emb_opt, **kw)
    return cls(cfg, embedding_optimizer=emb_opt, embedding_lr=EMB_LR, **kw)


def _train(model, opt, batches):
    for b in batches:
        opt.zero_grad()
        model.loss(b).backward()
        opt.step()


def _assert_state_equal(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what a user gets from torch.load by default


# ------------------------------------------------------------------------------------------- 1. resume exactly

@pytest.mark.parametrize("emb_opt", EMB_OPTS, ids=str)
@pytest.mark.parametrize("cls", TWINS, ids=lambda c: c.__name__)
def test_resume_from_checkpoint_equals_uninterrupted_run(cls, emb_opt):
    d = _data()
    cfg = _config(d)
    batches = [d.batch(np.sort(np.random.default_rng(_seed()).choice(len(d), 96, replace=False))) for _ in range(3)]
    straight = _build(cls, cfg, emb_opt)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    opt = TrainingOptimizer(straight, 1e-2, EMB_LR)
    _train(straight, opt, batches)

    first = _build(cls, cfg, emb_opt)
    first.load_state_dict(init)
    opt1 = TrainingOptimizer(first, 1e-2, EMB_LR)
    _train(first, opt1, batches[:2])
    ckpt = _save_load({"model": first.state_dict(), "opt": opt1.state_dict()})
    assert set(ckpt["opt"]["embedding_state"]) == {
        "embedding.global_weight", "embedding.scenario_weight", "sequence_embedding.global_weight",
        "sequence_embedding.scenario_weight"}

    resumed = _build(cls, cfg, emb_opt)  # fresh weights, fresh optimizer: everything comes from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = TrainingOptimizer(resumed, 5e-2, EMB_LR)  # another Adam lr: the checkpoint's hyper-parameters win
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.dense.param_groups[0]["lr"] == 1e-2
    _train(resumed, opt2, batches[2:])
    _assert_state_equal(resumed.state_dict(), straight.state_dict())
    s_opt, r_opt = opt.state_dict(), opt2.state_dict()
    for name in s_opt["embedding_state"]:
        assert torch.equal(r_opt["embedding_state"][name], s_opt["embedding_state"][name]), name
        assert r_opt["embedding_state"][name].abs().sum() > 0, name  # the row-wise states did move
    for name, st in s_opt["dense"]["state"].items():
        for k in st:
            assert torch.equal(torch.as_tensor(r_opt["dense"]["state"][name][k]), torch.as_tensor(st[k])), (name, k)


def test_optimizer_state_moves_between_twins_and_embedding_optimizers():
    """The row-wise states are optimizer state keyed by table name: SAML's fused ones load into the reference's."""
    d = _data()
    cfg = _config(d)
    b0, b1 = d.batch(np.arange(0, 120)), d.batch(np.arange(120, 240))
    fast = SAML(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=EMB_LR)
    of = TrainingOptimizer(fast, 1e-2, EMB_LR)
    _train(fast, of, [b0])
    ref = SAMLReference(cfg)  # no state buffers: its optimizer keeps the states itself
    ref.load_state_dict(fast.state_dict())
    orf = TrainingOptimizer(ref, 1e-2, EMB_LR)
    orf.load_state_dict(_save_load(of.state_dict()))
    _train(fast, of, [b1])
    _train(ref, orf, [b1])
    sr = ref.state_dict()
    for k, v in fast.state_dict().items():
        if k in sr:
            torch.testing.assert_close(v, sr[k], atol=1e-4, rtol=1e-3, msg=k)
    with pytest.raises(ValueError, match="differ"):
        TrainingOptimizer(SharedBottom(cfg), 1e-2, EMB_LR).load_state_dict(of.state_dict())


@pytest.mark.parametrize("cls, emb_opt", [(SAML, "rowwise_adagrad"), (SAML, None), (SAMLReference, None)],
                         ids=["SAML-fused", "SAML-dense-grads", "SAMLReference"])
def test_embedding_lr_and_dense_lr_can_be_scheduled(cls, emb_opt):
    """Setting opt.embedding_lr (by hand or from a schedule) changes the next step exactly as building with that
    lr would; opt.dense is a torch optimizer that torch's LR schedulers drive."""
    d = _data()
    cfg = _config(d)
    b = d.batch(np.arange(150))
    a = _build(cls, cfg, emb_opt)
    init = {k: v.clone() for k, v in a.state_dict().items()}
    oa = TrainingOptimizer(a, 1e-2, EMB_LR)
    sched = torch.optim.lr_scheduler.StepLR(oa.dense, step_size=1, gamma=0.5)
    oa.embedding_lr = EMB_LR / 4  # set after construction
    if cls is SAMLReference:
        want = SAMLReference(cfg, embedding_optimizer=emb_opt)
    else:
        want = cls(cfg, embedding_optimizer=emb_opt, embedding_lr=EMB_LR / 4)
    want.load_state_dict(init)
    ow = TrainingOptimizer(want, 1e-2, EMB_LR / 4)  # built with that lr
    same = _build(cls, cfg, emb_opt)
    same.load_state_dict(init)
    os_ = TrainingOptimizer(same, 1e-2, EMB_LR)
    for m, o in ((a, oa), (want, ow), (same, os_)):
        _train(m, o, [b])
    _assert_state_equal(a.state_dict(), want.state_dict())
    assert not torch.equal(a.embedding.global_weight, same.embedding.global_weight)  # the lr change mattered
    with pytest.raises(ValueError, match="embedding_lr"):
        oa.embedding_lr = -1.0

    before = {k: v.clone() for k, v in a.state_dict().items()}
    sched.step()
    assert oa.dense.param_groups[0]["lr"] == pytest.approx(5e-3)
    oa.embedding_lr = 0.0  # frozen tables from now on
    _train(a, oa, [b])
    after = a.state_dict()
    assert torch.equal(after["embedding.global_weight"], before["embedding.global_weight"])
    assert not torch.equal(after["aux_head.weight"], before["aux_head.weight"])


# ------------------------------------------------------------------------------------------- 2. seq_lengths

@pytest.mark.parametrize("layer_cls", [ScenarioAttention, RefScenarioAttention], ids=lambda c: c.__name__)
def test_attention_rejects_out_of_range_seq_lengths(layer_cls):
    M, D, d, B, L = 3, 8, 4, 9, 5
    layer = layer_cls(D, d, M)
    tg, ts, sg, ss = torch.randn(B, D), torch.randn(B, D), torch.randn(B, L, D), torch.randn(B, L, D)
    scen = torch.randint(0, M, (B,))
    lengths = torch.randint(0, L + 1, (B,))
    lengths[0], lengths[1] = 0, L  # both ends are valid
    out = layer(tg, ts, sg, ss, lengths, scen)
    assert out[0].shape == (B, D)
    for bad in (L + 1, 100, -1):
        pos = int(torch.randint(2, B, ()))
        ln = lengths.clone()
        ln[pos] = bad
        with pytest.raises(ValueError, match=rf"seq_lengths\[{pos}\] = {bad} .*\[0, {L}\]"):
            layer(tg, ts, sg, ss, ln, scen)
    for ln, what in ((lengths.float(), "integer"), (lengths[:-1], "shape"), (lengths.view(B, 1), "shape"),
                     (lengths.bool(), "integer")):
        with pytest.raises(ValueError, match=f"seq_lengths.*{what}"):
            layer(tg, ts, sg, ss, ln, scen)


@pytest.mark.parametrize("cls", [SAML, SAMLReference, SharedBottom], ids=lambda c: c.__name__)
def test_models_reject_out_of_range_seq_lengths(cls):
    d = _data(seq_len=7)
    cfg = _config(d)
    model = cls(cfg)
    b = d.batch(np.arange(40))
    L = b.seq_ids.shape[1]
    full = b.seq_lengths.clone().fill_(L)
    ok = model(b.indices, b.offsets, b.scenario, b.seq_ids, full, b.dense)  # L itself is valid
    for bad in (L + 1, 100, -3):
        pos = int(torch.randint(0, 40, ()))
        ln = b.seq_lengths.clone()
        ln[pos] = bad
        with pytest.raises(ValueError, match=rf"seq_lengths\[{pos}\] = {bad}.*\[0, {L}\]"):
            model(b.indices, b.offsets, b.scenario, b.seq_ids, ln, b.dense)
    assert (ok[0] if isinstance(ok, tuple) else ok).shape == (40,)


# ------------------------------------------------------------------------------------------- 3. empty batches

@pytest.mark.parametrize("mutual", [(0,), (1,), ()], ids=lambda m: "mutual" + "".join(map(str, m)))
@pytest.mark.parametrize("emb_opt", EMB_OPTS, ids=str)
@pytest.mark.parametrize("cls", [SAML, SAMLReference, SharedBottom], ids=lambda c: c.__name__)
def test_empty_batch_forward_backward_and_step(cls, emb_opt, mutual):
    d = _data()
    cfg = _config(d, mutual_layers=mutual)
    model = _build(cls, cfg, emb_opt)
    empty = d.batch(np.zeros(0, dtype=np.int64))
    out = model(*empty.inputs())
    for o in (out if isinstance(out, tuple) else (out,)):
        assert o.shape == (0,)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = TrainingOptimizer(model, 1e-2, EMB_LR)
    opt.zero_grad()
    loss = model.loss(empty)
    assert loss.shape == () and loss.item() == 0.0  # defined: 0, not NaN
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or (p.grad == 0).all(), name
    opt.step()
    _assert_state_equal(model.state_dict(), before)  # a step on an empty batch moved nothing
    # and the model still trains on a real batch afterwards
    _train(model, opt, [d.batch(np.arange(64))])
    assert not torch.equal(model.state_dict()["embedding.global_weight"], before["embedding.global_weight"])


def test_empty_batch_outputs_equal_between_twins():
    d = _data()
    cfg = _config(d)
    ref = SAMLReference(cfg)
    fast = SAML(cfg)
    fast.load_state_dict(ref.state_dict())
    empty = d.batch(np.zeros(0, dtype=np.int64))
    for x, y in zip(fast(*empty.inputs()), ref(*empty.inputs())):
        assert x.shape == y.shape == (0,)
    assert fast.loss(empty).item() == ref.loss(empty).item() == 0.0


# ------------------------------------------------------------------------------------------- 4. strict loading

@pytest.mark.parametrize("dst_cls", TWINS, ids=lambda c: "to" + c.__name__)
@pytest.mark.parametrize("src_cls", TWINS, ids=lambda c: "from" + c.__name__)
@pytest.mark.parametrize("src_opt, dst_opt", [("rowwise_adagrad", None), (None, "rowwise_adagrad"),
                                              ("rowwise_adagrad", "rowwise_adagrad"), (None, None)],
                         ids=["adagrad-to-none", "none-to-adagrad", "adagrad-to-adagrad", "none-to-none"])
def test_strict_load_state_dict_across_optimizers_and_twins(src_cls, dst_cls, src_opt, dst_opt):
    d = _data()
    cfg = _config(d)
    src = _build(src_cls, cfg, src_opt)
    if src_opt is not None:  # some training, so the row-wise states are not zero
        _train(src, TrainingOptimizer(src, 1e-2, EMB_LR), [d.batch(np.arange(100))])
    dst = _build(dst_cls, cfg, dst_opt)
    sd = src.state_dict()
    result = dst.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    src.eval()
    dst.eval()
    b = d.batch(np.arange(100, 180))
    for x, y in zip(src(*b.inputs()), dst(*b.inputs())):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-4)
    dst_sd = dst.state_dict()
    for k in dst_sd:
        if k.endswith(("global_state", "scenario_state")):
            if k in sd:
                assert torch.equal(dst_sd[k], sd[k]), k  # present in both: loaded
            else:
                assert (dst_sd[k] == 0).all(), k  # absent from the dict: left as it was
    # strictness is kept for every other key
    with pytest.raises(RuntimeError, match="Unexpected key"):
        dst.load_state_dict({**sd, "embedding.bogus": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Missing key"):
        dst.load_state_dict({k: v for k, v in sd.items() if k != "aux_head.bias"})


def test_shared_bottom_strict_load_across_optimizers():
    d = _data()
    cfg = _config(d)
    a = SharedBottom(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=EMB_LR)
    b = SharedBottom(cfg)
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())
    wrapped = torch.nn.Sequential(b)  # a wrapper prefix ("0.") as DDP's "module."
    wrapped.load_state_dict(torch.nn.Sequential(a).state_dict())


# ------------------------------------------------------------------------------------------- 5. seq_ids

@pytest.mark.parametrize("cls", [SAML, SAMLReference, SharedBottom], ids=lambda c: c.__name__)
def test_models_reject_bad_seq_ids(cls):
    d = _data()
    model = cls(_config(d))
    B = int(torch.randint(5, 30, ()))
    b = d.batch(np.arange(B))
    for seq_ids in (b.seq_ids[:-1], b.seq_ids[:, :0], b.seq_ids.reshape(-1), b.seq_ids.unsqueeze(0),
                    b.seq_ids.float(), torch.cat([b.seq_ids, b.seq_ids[:2]])):
        shape = re.escape(str(list(seq_ids.shape)))
        with pytest.raises(ValueError, match=rf"seq_ids .*B = scenario.shape\[0\] = {B}.*{shape}"):
            model(b.indices, b.offsets, b.scenario, seq_ids, b.seq_lengths, b.dense)
    with pytest.raises(ValueError, match="seq_ids"):
        model(b.indices, b.offsets, b.scenario, None, b.seq_lengths, b.dense)


# ------------------------------------------------------------------------------------------- 6. size arguments

SIZE_LAYERS = [
    pytest.param(cls, args, names, id=cls.__name__) for cls, args, names in (
        (MultiBranchLinear, (5, 3, 2), ("in_features", "out_features", "num_branches")),
        (MutualUnit, (5, 3, 2), ("in_features", "out_features", "num_branches")),
        (ScenarioAttention, (6, 4, 3), ("embedding_dim", "attention_dim", "num_scenarios")),
        (RefScenarioAttention, (6, 4, 3), ("embedding_dim", "attention_dim", "num_scenarios")))]


@pytest.mark.parametrize("cls, args, names", SIZE_LAYERS)
def test_layer_size_arguments(cls, args, names):
    for i, name in enumerate(names):
        for ok in (np.int64(args[i]), np.int32(args[i]), torch.tensor(args[i])):
            a = list(args)
            a[i] = ok
            layer = cls(*a)
            assert type(getattr(layer, name)) is int and getattr(layer, name) == args[i]
        for bad, err in ((True, TypeError), (np.bool_(True), TypeError), (2.5, TypeError), ("4", TypeError),
                         (0, ValueError), (-1, ValueError)):
            a = list(args)
            a[i] = bad
            with pytest.raises(err, match=name):
                cls(*a)
    if cls in (MultiBranchLinear, MutualUnit):
        assert cls(*args, aux_features=np.int64(2)).aux_features == 2
        assert cls(*args, aux_features=0).aux_weight is None
        for bad, err in ((True, TypeError), (-1, ValueError), (1.0, TypeError)):
            with pytest.raises(err, match="aux_features"):
                cls(*args, aux_features=bad)


def test_size_arguments_from_numpy_run_forward():
    layer = MultiBranchLinear(np.int64(4), np.int64(3), np.int64(2), aux_features=np.int64(2))
    x, aux, s = torch.randn(5, 4), torch.randn(5, 2), torch.randint(0, 2, (5,))
    assert layer(x, s, aux).shape == (5, 3)


def test_config_size_fields():
    d = _data()
    cfg = _config(d, embedding_dim=np.int64(8), attention_dim=torch.tensor(4), aux_hidden=(np.int32(12), 7),
                  branch_hidden=(10, np.int64(6)), mutual_layers=(np.int64(1),))
    assert (cfg.embedding_dim, cfg.attention_dim, cfg.aux_hidden, cfg.branch_hidden, cfg.mutual_layers) == (
        8, 4, (12, 7), (10, 6), (1,))
    assert all(type(v) is int for v in (cfg.embedding_dim, cfg.attention_dim, *cfg.aux_hidden, *cfg.branch_hidden))
    SAML(cfg)
    for field, bad, err in (("embedding_dim", True, TypeError), ("embedding_dim", 2.5, TypeError),
                            ("embedding_dim", 0, ValueError), ("attention_dim", -1, ValueError),
                            ("aux_hidden", (12, True), TypeError), ("branch_hidden", (0, 6), ValueError),
                            ("branch_hidden", (10, 6.5), TypeError), ("mutual_layers", (0.5,), TypeError)):
        with pytest.raises(err, match=field):
            _config(d, **{field: bad})
    kw = dict(features=cfg.features, sequence=cfg.sequence, target_feature=cfg.target_feature)
    assert SAMLConfig(num_scenarios=np.int64(4), **kw).num_scenarios == 4
    for bad, err in ((True, TypeError), (0, ValueError), (-1, ValueError), (2.5, TypeError)):
        with pytest.raises(err, match="num_scenarios"):
            SAMLConfig(num_scenarios=bad, **kw)


# ------------------------------------------------------------------------------------------- 7. SharedBottom backend

def test_shared_bottom_backend_reaches_the_tower():
    d = _data()
    cfg = _config(d)
    model = SharedBottom(cfg, backend="reference")
    assert model.tower.backend == "reference" and model.head.backend == "reference"
    assert model.attention.backend == "reference" and model.embedding.backend == "reference"
    b = d.batch(np.arange(30))
    want = model(*b.inputs())
    # a context asking for a backend that cannot serve CPU tensors: every op must keep the forced "reference"
    with saml_kernels.use_backend("cuda"):
        got = model(*b.inputs())
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- 8. train_saml outputs

def test_train_saml_writes_under_the_current_directory(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    before = sorted(p.name for p in (ROOT / "runs").iterdir()) if (ROOT / "runs").exists() else []
    r = subprocess.run([sys.executable, str(ROOT / "python" / "train_saml.py"), "--data", "synthetic", "--samples",
                        "1500", "--specific-strength", "1", "--epochs", "1",
                        "--batch-size", "256", "--hidden", "8", "4", "--embedding-dim", "4", "--throughput-steps", "1",
                        "--no-progress", "--threads", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run,) = list((tmp_path / "saml_run").iterdir())
    assert (run / "summary.json").exists() and (run / "report.png").exists()
    after = sorted(p.name for p in (ROOT / "runs").iterdir()) if (ROOT / "runs").exists() else []
    assert after == before  # nothing written into the source tree
