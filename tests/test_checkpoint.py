"""Checkpoints of the models and their training optimizer: resume from TrainingOptimizer.state_dict() is bitwise
equal to an uninterrupted run; the row-wise Adagrad states are optimizer state keyed by table name, so they move
between the fused layers and the twins; the embedding and dense learning rates can be scheduled; strict
load_state_dict across embedding optimizers and twins.

Inputs are fresh random data (the seed comes from torch's generator, seeded per test by conftest).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from conftest import small_config, small_data
from test_model import _assert_state_equal, _build, _train  # the model tests' builders (same EMB_LR)
from saml_kernels.nn import SAML, SharedBottom, TrainingOptimizer
from saml_kernels.reference import SAMLReference

EMB_OPTS = (None, "rowwise_adagrad")
TWINS = (SAML, SAMLReference)
EMB_LR = 0.1


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what a user gets from torch.load by default


# ------------------------------------------------------------------------------------------- resume exactly

@pytest.mark.parametrize("emb_opt", EMB_OPTS, ids=str)
@pytest.mark.parametrize("cls", TWINS, ids=lambda c: c.__name__)
def test_resume_from_checkpoint_equals_uninterrupted_run(cls, emb_opt):
    d = small_data()
    cfg = small_config(d)
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
    d = small_data()
    cfg = small_config(d)
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
    d = small_data()
    cfg = small_config(d)
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


# ------------------------------------------------------------------------------------------- strict loading

@pytest.mark.parametrize("dst_cls", TWINS, ids=lambda c: "to" + c.__name__)
@pytest.mark.parametrize("src_cls", TWINS, ids=lambda c: "from" + c.__name__)
@pytest.mark.parametrize("src_opt, dst_opt", [("rowwise_adagrad", None), (None, "rowwise_adagrad"),
                                              ("rowwise_adagrad", "rowwise_adagrad"), (None, None)],
                         ids=["adagrad-to-none", "none-to-adagrad", "adagrad-to-adagrad", "none-to-none"])
def test_strict_load_state_dict_across_optimizers_and_twins(src_cls, dst_cls, src_opt, dst_opt):
    d = small_data()
    cfg = small_config(d)
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
    d = small_data()
    cfg = small_config(d)
    a = SharedBottom(cfg, embedding_optimizer="rowwise_adagrad", embedding_lr=EMB_LR)
    b = SharedBottom(cfg)
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())
    wrapped = torch.nn.Sequential(b)  # a wrapper prefix ("0.") as DDP's "module."
    wrapped.load_state_dict(torch.nn.Sequential(a).state_dict())
