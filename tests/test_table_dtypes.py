"""Table dtypes in the models: 16-bit embedding tables beside float32 dense layers (FBGEMM's usual set-up) in every
model, with and without torch.autocast, and the fused embedding layers' weight decay / non-finite skip
on the models' constructors.

The 16-bit models are compared with the float32 model holding the same tables rounded to 16 bits (its state_dict
loaded from the 16-bit model). What differs between the two is the rounding of the embedding outputs (pooled in
float32, stored in the table dtype) and of the table gradients (cast back through the output cast), both
relative errors of one 16-bit rounding (bfloat16 2^-8, float16 2^-11) that the dense layers carry to the logits,
and the rounding of the updated rows to the table dtype. Tolerances (stated per dtype in TOL):
- logits: atol = rtol = 2e-2 (bfloat16), 3e-3 (float16);
- dense-parameter gradients: relative norm error of the whole dense gradient below 3e-2 (bfloat16), 5e-3
  (float16), and elementwise within rtol = that bound, atol = that bound times the largest gradient entry (a
  per-parameter relative bound fails on small cancelling gradients such as HMoE's attention keys, where one relu
  that flips between the two runs moves them by ~10 %);
- tables after one fused row-wise Adagrad step, against the float32 model's table rounded to the table dtype:
  rows outside the batch unchanged; every element within lr sqrt(D) + 2 ulps (the largest first Adagrad move);
  at least 94 % of the touched elements within 2 ulps (ulp = 2^-8 bfloat16, 2^-11 float16, i.e. at |w| < 1/2).
  Adagrad's first step normalises every row, so a row whose gradient is a small cancelling sum changes
  direction with one relu flip (~5 % of HMoE's elements in bfloat16, none elsewhere).
Known weakness (``test_float16_tables_lose_gradients_below_the_float16_range``, xfail): the per-sample table
gradients are rounded to the table dtype before the row reduction, so in float16 gradients below 2^-14 lose
precision and below 2^-24 vanish; SAML's sequence scenario table (gradients ~1e-8 at init) then trains on
noise. bfloat16 has float32's range. FBGEMM reduces float32 gradients into float16 rows.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from saml_kernels.data import make_synthetic
from saml_kernels.nn import (HMoE, HMoEConfig, SAML, SAMLConfig, STAR, STARConfig, ScenarioEmbedding, SharedBottom,
                             TrainingOptimizer)
from saml_kernels.nn.saml import dense_dtype
from saml_kernels.reference import SAMLReference, STARReference
from saml_kernels.reference.layer_set import REFERENCE_LAYERS

DATA = make_synthetic(200, num_users=40, num_items=50, num_categories=6, num_contexts=4, num_segments=5,
                      num_tags=9, seq_len=5, seed=11)
SMALL = dict(embedding_dim=8, attention_dim=4, dropout=0.0)
MODELS = {
    "SAML": (SAML, lambda: SAMLConfig.from_data(DATA, aux_hidden=(12, 7), branch_hidden=(10, 6), mutual_layers=(0,),
                                                **SMALL)),
    "STAR": (STAR, lambda: STARConfig.from_data(DATA, hidden=(16, 8), aux_dim=3, aux_hidden=5, **SMALL)),
    "HMoE": (HMoE, lambda: HMoEConfig.from_data(DATA, expert_hidden=(16,), num_experts=2, tower_hidden=8, **SMALL)),
    "SharedBottom": (SharedBottom, lambda: SAMLConfig.from_data(DATA, aux_hidden=(12, 7), branch_hidden=(10, 6),
                                                                **SMALL)),
}
TOL = {torch.bfloat16: dict(logit=2e-2, grad=3e-2, ulp=2.0 ** -8),
       torch.float16: dict(logit=3e-3, grad=5e-3, ulp=2.0 ** -11)}
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _tables(model):
    return {f"{mn}.{pn}": p for mn, m in model.named_modules() if isinstance(m, ScenarioEmbedding)
            for pn, p in m.named_parameters()}


def _logits(out):
    return out if isinstance(out, tuple) else (out,)


def _step(model, batch, autocast_dtype=None):
    """One training step (forward, backward, TrainingOptimizer.step); returns (logits, dense gradients)."""
    opt = TrainingOptimizer(model)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = _logits(model(*batch.inputs()))
        loss = model.loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return tuple(o.detach() for o in out), grads


def _pair(name, dtype):
    cls, make_cfg = MODELS[name]
    torch.manual_seed(0)
    low = cls(make_cfg(), embedding_optimizer="rowwise_adagrad", embedding_dtype=dtype)
    full = cls(make_cfg(), embedding_optimizer="rowwise_adagrad")
    full.load_state_dict(low.state_dict())  # the float32 model with the tables rounded to 16 bits
    return low, full


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_16bit_tables_with_float32_dense_layers_train_like_float32(name, dtype):
    low, full = _pair(name, dtype)
    for n, p in low.named_parameters():
        assert p.dtype == (dtype if n in _tables(low) else torch.float32), n
    assert dense_dtype(low) == torch.float32
    before = {n: p.detach().clone() for n, p in _tables(low).items()}
    batch = DATA.batch(np.arange(48))
    representable = _representable_rows(name, full, dtype, batch)
    tol = TOL[dtype]
    out_low, g_low = _step(low, batch)
    out_full, g_full = _step(full, batch)
    for a, b in zip(out_low, out_full):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=tol["logit"], rtol=tol["logit"])
    assert set(g_low) == set(g_full) and g_low  # dense parameters only: the fused tables get no .grad
    flat = lambda g: torch.cat([g[n].reshape(-1) for n in sorted(g)])  # noqa: E731
    err = float((flat(g_low) - flat(g_full)).norm() / flat(g_full).norm())
    assert err < tol["grad"], err  # the dense step direction
    gmax = float(flat(g_full).abs().max())
    for n in g_full:  # elementwise, with an absolute floor: a relu flip moves a small cancelling gradient a lot
        assert g_low[n].dtype == torch.float32, n
        torch.testing.assert_close(g_low[n], g_full[n], rtol=tol["grad"], atol=tol["grad"] * gmax, msg=n)
    full_tables = _tables(full)
    lr, D = TrainingOptimizer(low).embedding_lr, MODELS[name][1]().embedding_dim
    for n, w in _tables(low).items():
        assert w.dtype == dtype
        if w.numel() == 0:  # STAR / HMoE / SharedBottom have no scenario-aware rows
            continue
        w, w32 = w.detach(), full_tables[n].detach()
        touched = (w32 != before[n].float()).any(-1)
        assert touched.any(), n
        assert torch.equal(w[~touched], before[n][~touched]), n  # rows outside the batch never move
        diff = (w.float() - w32.to(dtype).float()).abs()[touched]
        # a row-wise Adagrad first step moves an element by at most lr sqrt(D)
        assert float(diff.max()) <= lr * D ** 0.5 + 2 * tol["ulp"], n
        # most elements within 2 ulps (a row whose gradient is a small cancelling sum changes direction with one
        # relu flip, and the Adagrad step normalises every row: HMoE's gate at init gives ~5 % such elements in
        # bfloat16); rows whose float32 gradient is below float16's normal range are left out (see the xfail test)
        rows = representable[n][touched]
        within = (diff[rows] <= 2 * tol["ulp"]).float().mean()
        assert rows.sum() == 0 or within >= 0.94, (n, float(within))


def _representable_rows(name, model, dtype, batch):
    """{table name: [rows] bool}: rows whose float32 gradient (a non-fused float32 copy of ``model``) has every
    entry within the normal range of ``dtype`` (or zero); float16 flushes smaller per-sample gradients."""
    cls, make_cfg = MODELS[name]
    plain = cls(make_cfg(), embedding_optimizer=None)
    plain.load_state_dict(model.state_dict())
    plain.loss(batch).backward()
    tiny = torch.finfo(dtype).tiny
    return {n: ((p.grad.abs() >= tiny) | (p.grad == 0)).all(-1) for n, p in _tables(plain).items()}


@pytest.mark.xfail(strict=True, reason="per-sample gradients are rounded to float16 before the row reduction "
                                      "(the embedding backward kernels take the table dtype): tiny gradients vanish")
def test_float16_tables_lose_gradients_below_the_float16_range():
    low, full = _pair("SAML", torch.float16)
    batch = DATA.batch(np.arange(48))
    name = "sequence_embedding.scenario_weight"
    before = _tables(low)[name].detach().clone()
    _step(low, batch)
    _step(full, batch)
    w32 = _tables(full)[name].detach()
    touched = (w32 != before.float()).any(-1)
    diff = (_tables(low)[name].float() - w32.half().float()).abs()[touched]
    assert (diff <= 2 * TOL[torch.float16]["ulp"]).float().mean() >= 0.94


@pytest.mark.parametrize("name", sorted(MODELS))
def test_to_recipe_equals_embedding_dtype(name):
    """``model.embedding.to(torch.bfloat16)`` on a float32 model is the same model as ``embedding_dtype=``."""
    low, full = _pair(name, torch.bfloat16)
    for m in full.modules():
        if isinstance(m, ScenarioEmbedding):
            m.to(torch.bfloat16)
    batch = DATA.batch(np.arange(20))
    with torch.no_grad():
        for a, b in zip(_logits(low.eval()(*batch.inputs())), _logits(full.eval()(*batch.inputs()))):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["SAML", "STAR"])
def test_16bit_tables_under_cpu_autocast(name):
    """bf16 tables + float32 dense layers under torch.autocast("cpu", bfloat16): a training step runs (STAR's
    partitioned_norm meets the autocast GEMMs' bfloat16 output there), the logits are close to the float32 model
    without autocast (6e-2, tests/test_autocast.py's bound) and the dense gradients are float32."""
    low, full = _pair(name, torch.bfloat16)
    batch = DATA.batch(np.arange(48))
    out_low, g_low = _step(low, batch, autocast_dtype=torch.bfloat16)
    out_full, _ = _step(full, batch)
    for a, b in zip(out_low, out_full):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=6e-2, rtol=6e-2)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in g_low.values())


def test_reference_twins_take_embedding_dtype():
    cfg = MODELS["SAML"][1]()
    twin = SAMLReference(cfg, embedding_dtype=torch.bfloat16)
    assert twin.embedding.global_weight.dtype == torch.bfloat16 and twin.aux_head.weight.dtype == torch.float32
    model = SAML(cfg, embedding_dtype=torch.bfloat16)
    model.load_state_dict(twin.state_dict())
    batch = DATA.batch(np.arange(16))
    with torch.no_grad():
        for a, b in zip(model(*batch.inputs()), twin(*batch.inputs())):
            # the twin pools in bfloat16 arithmetic, the kernel in float32 before one rounding
            torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    star = STARReference(MODELS["STAR"][1](), embedding_dtype=torch.float16)
    assert star.inputs.embedding.global_weight.dtype == torch.float16 and star.norm.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="embedding_dtype must be one of"):
        SAML(cfg, embedding_dtype=torch.int8)


# ---------------------------------------------------------------------------------- fused-layer options

def _embedding_layers(model):
    return [m for m in model.modules() if isinstance(m, ScenarioEmbedding)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weight_decay_and_skip_nonfinite_reach_every_fused_layer(name):
    cls, make_cfg = MODELS[name]
    model = cls(make_cfg(), embedding_optimizer="sgd", embedding_weight_decay=0.25, embedding_skip_nonfinite=True)
    layers = _embedding_layers(model)
    assert len(layers) == 2  # embedding and sequence_embedding
    for m in layers:
        assert m.weight_decay == 0.25 and m.skip_nonfinite and m.fused_optimizer.param_groups[0]["weight_decay"] == 0.25


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_weight_decay_is_fbgemm_l2_on_touched_rows(name):
    """SGD with weight decay wd: w' = w - lr (g + wd w) on the touched rows. Against the same model with wd = 0
    (same g): the difference is -lr wd w on the rows of the batch, 0 elsewhere."""
    cls, make_cfg = MODELS[name]
    lr, wd = 0.1, 0.5
    torch.manual_seed(1)
    plain = cls(make_cfg(), embedding_optimizer="sgd", embedding_lr=lr)
    decayed = cls(make_cfg(), embedding_optimizer="sgd", embedding_lr=lr, embedding_weight_decay=wd)
    decayed.load_state_dict(plain.state_dict())
    w0 = {n: p.detach().clone() for n, p in _tables(plain).items()}
    batch = DATA.batch(np.arange(32))
    for m in (plain, decayed):
        m.loss(batch).backward()
    for n, w in _tables(decayed).items():
        if w.numel() == 0:  # no scenario-aware rows
            continue
        # rows of the batch: the decay moves them even where g = 0 (e.g. the padding id of the sequence)
        touched = ((_tables(plain)[n] != w0[n]) | (w != w0[n])).any(-1, keepdim=True)
        assert touched.any(), n
        expect = torch.where(touched, -lr * wd * w0[n], torch.zeros_like(w0[n]))
        torch.testing.assert_close(w.detach() - _tables(plain)[n].detach(), expect, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_skip_nonfinite_skips_every_fused_update(name):
    cls, make_cfg = MODELS[name]
    model = cls(make_cfg(), embedding_optimizer="rowwise_adagrad", embedding_skip_nonfinite=True)
    w0 = {n: p.detach().clone() for n, p in _tables(model).items()}
    out = _logits(model(*DATA.batch(np.arange(16)).inputs()))
    (out[0].sum() * float("nan")).backward()
    for n, w in _tables(model).items():
        assert torch.equal(w, w0[n]), n
    assert [int(m.nonfinite_steps) for m in _embedding_layers(model)] == [1, 1]


@pytest.mark.parametrize("kwargs", [dict(embedding_weight_decay=0.1), dict(embedding_skip_nonfinite=True)])
def test_fused_only_options_rejected_with_reference_layers(kwargs):
    cfg = MODELS["SAML"][1]()
    with pytest.raises(ValueError, match=f"SAML: {next(iter(kwargs))}=.* configure the fused embedding update, but "
                                         "the reference layers fuse none"):
        SAML(cfg, layers=REFERENCE_LAYERS, **kwargs)
    with pytest.raises(TypeError):  # the twins' constructors do not take kernel-only options at all
        SAMLReference(cfg, **kwargs)


def test_bad_option_values():
    cfg = MODELS["STAR"][1]()
    with pytest.raises(ValueError, match="STAR: embedding_weight_decay must be a float >= 0, got -1"):
        STAR(cfg, embedding_optimizer="sgd", embedding_weight_decay=-1)
    with pytest.raises(ValueError, match="HMoE: embedding_weight_decay=0.1 / embedding_skip_nonfinite=False act in "
                                         "the fused embedding update; pass embedding_optimizer="):
        HMoE(MODELS["HMoE"][1](), embedding_optimizer=None, embedding_weight_decay=0.1)
    with pytest.raises(ValueError, match="SAML: .*embedding_skip_nonfinite=True act in the fused"):
        SAML(MODELS["SAML"][1](), embedding_optimizer=None, embedding_skip_nonfinite=True)
    with pytest.raises(TypeError, match="STAR: embedding_skip_nonfinite must be a bool, got 'yes'"):
        STAR(cfg, embedding_skip_nonfinite="yes")
