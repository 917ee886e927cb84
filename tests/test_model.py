"""SAML (accelerated layers) against SAMLReference (plain PyTorch): state_dict transfer, outputs, gradients and
parameters after optimizer steps on every available backend; loss; gradient masking; a short training run (the
scripts' smoke runs are in test_train_saml.py); and the models' inputs and sizes: seq_lengths
outside [0, L] and a bad seq_ids raise, an empty batch gives [0] logits, a zero loss and a step that moves nothing,
size arguments accept any integral but not bool / 0 / negatives / floats, SharedBottom(backend=...) reaches its
tower."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import saml_kernels
from conftest import device_backends, small_config, small_data
from saml_kernels.data import make_synthetic
from saml_kernels.nn import (SAML, MultiBranchLinear, MutualUnit, SAMLConfig, ScenarioAttention, SharedBottom,
                             TrainingOptimizer)
from saml_kernels.reference import SAMLReference
from saml_kernels.reference.attention import RefScenarioAttention

ROOT = Path(__file__).resolve().parents[1]


def _data(n=400, seed=0, **kw):
    return make_synthetic(n, num_users=60, num_items=80, num_categories=7, num_contexts=5, num_segments=6,
                          num_tags=11, seq_len=6, seed=seed, **kw)


def _config(d, **kw):
    base = dict(embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6), aux_loss_weight=0.4)
    base.update(kw)
    return SAMLConfig.from_data(d, **base)


def _models(cfg, device, backend, dtype=torch.float32, emb_opt=None, emb_lr=0.1):
    ref = SAMLReference(cfg, embedding_optimizer=emb_opt, device=device, dtype=dtype)
    fast = SAML(cfg, backend=backend, embedding_optimizer=emb_opt, embedding_lr=emb_lr, device=device, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def _tol(dtype):
    return dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)


MUTUAL = [(0,), (1,), (0, 1), ()]


def test_state_dict_names_and_shapes_match():
    d = _data()
    for mutual in MUTUAL:
        for emb_opt in (None, "rowwise_adagrad"):
            cfg = _config(d, mutual_layers=mutual)
            fast, ref = SAML(cfg, embedding_optimizer=emb_opt), SAMLReference(cfg, embedding_optimizer=emb_opt)
            sf, sr = fast.state_dict(), ref.state_dict()
            assert list(sf) == list(sr)
            assert all(sf[k].shape == sr[k].shape and sf[k].dtype == sr[k].dtype for k in sf)
            # and back: the reference's weights load into SAML unchanged, and SAML's into the reference
            fast.load_state_dict(sr)
            ref.load_state_dict(fast.state_dict())


@pytest.mark.parametrize("device, backend", device_backends("mbranch_linear"))
@pytest.mark.parametrize("mutual", MUTUAL, ids=lambda m: "mutual" + "".join(map(str, m)))
def test_outputs_and_gradients_match_reference(device, backend, mutual):
    dtype = torch.float32
    d = _data(seed=len(mutual))
    cfg = _config(d, mutual_layers=mutual, similarity="cosine" if len(mutual) != 1 else "dot", temperature=0.7)
    fast, ref = _models(cfg, device, backend, dtype)
    n = 40 if (backend == "triton" and device == "cpu") else 150  # the Triton interpreter is slow: fewer rows
    b = d.batch(np.arange(0, n)).to(device)
    main_f, aux_f = fast(*b.inputs())
    main_r, aux_r = ref(*b.inputs())
    assert main_f.shape == (n,) and aux_f.shape == (n,)
    torch.testing.assert_close(main_f, main_r, **_tol(dtype))
    torch.testing.assert_close(aux_f, aux_r, **_tol(dtype))
    fast.loss(b).backward()
    ref.loss(b).backward()
    pr = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        scale = max(pr[name].grad.abs().max().item(), 1e-6)
        torch.testing.assert_close(p.grad / scale, pr[name].grad / scale, atol=2e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("device, backend", device_backends("mbranch_linear"))
def test_parameters_match_after_optimizer_steps(device, backend):
    """Adam on the dense parameters + row-wise Adagrad on the tables: fused in SAML's backward, after the
    backward for the reference; the two must stay equal, optimizer states included."""
    d = _data(600, seed=5)
    cfg = _config(d, mutual_layers=(0,))
    fast, ref = _models(cfg, device, backend, emb_opt="rowwise_adagrad")
    of, orf = TrainingOptimizer(fast, 1e-2, 0.1), TrainingOptimizer(ref, 1e-2, 0.1)
    assert not of.tables and len(orf.tables) == 4  # fused in SAML; 4 tables updated by the reference's optimizer
    with pytest.raises(ValueError, match="differs"):
        TrainingOptimizer(fast, 1e-2, 0.2)
    k = 4 if (backend == "triton" and device == "cpu") else 1  # the Triton interpreter is slow: fewer rows
    for step, rows in enumerate((np.arange(0, 200, k), np.arange(200, 400, k), np.arange(100, 300, k))):
        b = d.batch(rows).to(device)
        for m, o in ((fast, of), (ref, orf)):
            o.zero_grad()
            m.loss(b).backward()
            o.step()
        assert fast.embedding.global_weight.grad is None  # fused: no gradient tensor was made
    sf, sr = fast.state_dict(), ref.state_dict()
    moved = 0
    for k in sf:
        torch.testing.assert_close(sf[k], sr[k], atol=1e-4, rtol=1e-3, msg=k)
    init = SAMLReference(cfg, embedding_optimizer="rowwise_adagrad")
    for k, v in init.state_dict().items():
        moved += int(not torch.equal(v, sr[k].cpu()))
    assert moved > 10  # the steps changed (almost) everything


def test_loss_is_bce_plus_weighted_aux_bce():
    d = _data()
    cfg = _config(d, aux_loss_weight=0.25)
    fast, _ = _models(cfg, "cpu", None)
    b = d.batch(np.arange(64))
    main, aux = fast(*b.inputs())
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(fast.loss(b), bce(main, b.label) + 0.25 * bce(aux, b.label))


def test_branch_parameters_only_trained_by_their_scenario():
    d = _data(800, seed=3)
    cfg = _config(d, mutual_layers=(1,))
    fast, _ = _models(cfg, "cpu", None)
    rows = np.nonzero(d.scenario != 2)[0][:200]
    fast.loss(d.batch(rows)).backward()
    for name, p in fast.named_parameters():
        if name.startswith(("branch_layers", "branch_head")):
            assert (p.grad[2] == 0).all(), name
            assert p.grad[0].abs().sum() > 0, name
    assert (fast.embedding.scenario_weight.grad[2] == 0).all()
    assert (fast.attention.local_query.weight.grad[2] == 0).all()


def test_config_validation():
    d = _data()
    with pytest.raises(ValueError, match="same"):
        _config(d, aux_hidden=(4,), branch_hidden=(4, 4))
    with pytest.raises(ValueError, match="mutual_layers"):
        _config(d, mutual_layers=(2,))
    with pytest.raises(ValueError, match="similarity"):
        _config(d, similarity="l2")
    with pytest.raises(ValueError, match="temperature"):
        _config(d, temperature=0.0)
    with pytest.raises(ValueError, match="target_feature"):
        _config(d, target_feature="nope")
    assert _config(d, mutual_layers=(1,)).layer_kinds() == ["all", "mutual"]
    assert _config(d, mutual_layers=()).layer_kinds() == ["own", "own"]


def test_short_training_run_decreases_loss():
    torch.manual_seed(0)
    d = _data(6000, seed=11)
    cfg = _config(d, aux_hidden=(32, 16), branch_hidden=(32, 16))
    model = SAML(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=0.1)
    opt = TrainingOptimizer(model, 5e-3, 0.1)
    losses = []
    for epoch in range(3):
        for b in d.batches(256, shuffle=True, seed=epoch):
            opt.zero_grad()
            loss = model.loss(b)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05
    base = SharedBottom(cfg)
    lb = base.loss(d.batch(np.arange(128)))
    assert torch.isfinite(lb) and base(*d.batch(np.arange(5)).inputs()).shape == (5,)


def test_ali_ccp_config_without_sequence():
    path = ROOT / "data" / "ali_ccp" / "ali_ccp_train_sample.csv"
    from saml_kernels.data import load_ali_ccp

    d, _ = load_ali_ccp(path)
    cfg = SAMLConfig.from_data(d, embedding_dim=4, aux_hidden=(8,), branch_hidden=(8,))
    assert cfg.sequence is None and cfg.num_dense == 8
    fast, ref = _models(cfg, "cpu", None)
    b = d.batch(np.arange(len(d)))
    for x, y in zip(fast(*b.inputs()), ref(*b.inputs())):
        torch.testing.assert_close(x, y, **_tol(torch.float32))


def test_auc_helper():
    sys.path.insert(0, str(ROOT / "python"))
    from train_saml import auc

    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 500), rng.normal(size=500)
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]])
    assert abs(auc(y, s) - brute) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_backward_close_to_fp32(dtype):
    d = _data(seed=9)
    cfg = _config(d, mutual_layers=(0,))
    fast32, _ = _models(cfg, "cpu", None)
    low = SAML(cfg, embedding_optimizer=None, dtype=dtype)  # plain gradients: every parameter gets one
    low.load_state_dict({k: v.to(dtype) for k, v in fast32.state_dict().items()})
    b = d.batch(np.arange(120))
    b.dense = b.dense.to(dtype)
    main_l, aux_l = low(*b.inputs())
    main_f, aux_f = fast32(*d.batch(np.arange(120)).inputs())
    assert main_l.dtype == dtype
    torch.testing.assert_close(main_l.float(), main_f, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(aux_l.float(), aux_f, atol=5e-2, rtol=5e-2)
    low.loss(b).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in low.parameters())


# ------------------------------------------------------------------------------------------- inputs and sizes

EMB_OPTS = (None, "rowwise_adagrad")
EMB_LR = 0.1


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


@pytest.mark.parametrize("cls", [SAML, SAMLReference, SharedBottom], ids=lambda c: c.__name__)
def test_models_reject_out_of_range_seq_lengths(cls):
    d = small_data(seq_len=7)
    cfg = small_config(d)
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

# ------------------------------------------------------------------------------------------- empty batches

@pytest.mark.parametrize("mutual", [(0,), (1,), ()], ids=lambda m: "mutual" + "".join(map(str, m)))
@pytest.mark.parametrize("emb_opt", EMB_OPTS, ids=str)
@pytest.mark.parametrize("cls", [SAML, SAMLReference, SharedBottom], ids=lambda c: c.__name__)
def test_empty_batch_forward_backward_and_step(cls, emb_opt, mutual):
    d = small_data()
    cfg = small_config(d, mutual_layers=mutual)
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
    d = small_data()
    cfg = small_config(d)
    ref = SAMLReference(cfg)
    fast = SAML(cfg)
    fast.load_state_dict(ref.state_dict())
    empty = d.batch(np.zeros(0, dtype=np.int64))
    for x, y in zip(fast(*empty.inputs()), ref(*empty.inputs())):
        assert x.shape == y.shape == (0,)
    assert fast.loss(empty).item() == ref.loss(empty).item() == 0.0
# ------------------------------------------------------------------------------------------- seq_ids

@pytest.mark.parametrize("cls", [SAML, SAMLReference, SharedBottom], ids=lambda c: c.__name__)
def test_models_reject_bad_seq_ids(cls):
    d = small_data()
    model = cls(small_config(d))
    B = int(torch.randint(5, 30, ()))
    b = d.batch(np.arange(B))
    for seq_ids in (b.seq_ids[:-1], b.seq_ids[:, :0], b.seq_ids.reshape(-1), b.seq_ids.unsqueeze(0),
                    b.seq_ids.float(), torch.cat([b.seq_ids, b.seq_ids[:2]])):
        shape = re.escape(str(list(seq_ids.shape)))
        with pytest.raises(ValueError, match=rf"seq_ids .*B = scenario.shape\[0\] = {B}.*{shape}"):
            model(b.indices, b.offsets, b.scenario, seq_ids, b.seq_lengths, b.dense)
    with pytest.raises(ValueError, match="seq_ids"):
        model(b.indices, b.offsets, b.scenario, None, b.seq_lengths, b.dense)
# ------------------------------------------------------------------------------------------- size arguments

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
    d = small_data()
    cfg = small_config(d, embedding_dim=np.int64(8), attention_dim=torch.tensor(4), aux_hidden=(np.int32(12), 7),
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
            small_config(d, **{field: bad})
    kw = dict(features=cfg.features, sequence=cfg.sequence, target_feature=cfg.target_feature)
    assert SAMLConfig(num_scenarios=np.int64(4), **kw).num_scenarios == 4
    for bad, err in ((True, TypeError), (0, ValueError), (-1, ValueError), (2.5, TypeError)):
        with pytest.raises(err, match="num_scenarios"):
            SAMLConfig(num_scenarios=bad, **kw)
# ------------------------------------------------------------------------------------------- SharedBottom backend

def test_shared_bottom_backend_reaches_the_tower():
    d = small_data()
    cfg = small_config(d)
    model = SharedBottom(cfg, backend="reference")
    assert model.tower.backend == "reference" and model.head.backend == "reference"
    assert model.attention.backend == "reference" and model.embedding.backend == "reference"
    b = d.batch(np.arange(30))
    want = model(*b.inputs())
    # a context asking for a backend that cannot serve CPU tensors: every op must keep the forced "reference"
    with saml_kernels.use_backend("cuda"):
        got = model(*b.inputs())
    torch.testing.assert_close(got, want, atol=0, rtol=0)
