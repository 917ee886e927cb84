"""One model body, two layer sets: SAML / SharedBottom built from KERNEL_LAYERS and their twins SAMLReference /
SharedBottomReference built from REFERENCE_LAYERS.

- the twin layers take the same constructor arguments (names, order, defaults; the kernel layers add only the
  documented kernel-only options) and hold the same parameter names;
- the reference models are the kernel bodies with the reference layers (same module tree, layer for layer;
  `SAML(cfg, layers=REFERENCE_LAYERS)` is SAMLReference), and both handle an empty batch alike;
- for every SAMLConfig variant the tests use: state_dicts interchange both ways (bitwise equal weights), the
  forwards agree within float32 rounding, and a few training steps stay equal (every backend here);
- the kernel-only options stay on the kernel side: a backend with the reference layers raises, the reference
  forward runs without deferred checks, the reference embedding keeps row-wise states but fuses no update.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import device_backends
from saml_kernels import _backend
from saml_kernels._layer_set import LayerSet
from saml_kernels.data import load_ali_ccp, make_synthetic
from saml_kernels.nn import KERNEL_LAYERS, SAML, SAMLConfig, SharedBottom, TrainingOptimizer
from saml_kernels.nn import saml as saml_body
from saml_kernels.reference import REFERENCE_LAYERS, SAMLReference, SharedBottomReference

ROOT = Path(__file__).resolve().parents[1]
LAYER_FIELDS = ("scenario_embedding", "attention", "multi_branch_linear", "mutual_unit")
# keyword options only the kernel layers take (docs/design.md section 3)
KERNEL_ONLY = {"backend", "save_branch_outputs", "sparse", "lr", "eps", "weight_decay", "skip_nonfinite",
               "bounds_check", "huge_pages", "stochastic_rounding", "rounding_seed"}
EMB_LR = 0.1
FWD_TOL = dict(atol=2e-5, rtol=2e-4)     # float32 rounding of differently ordered sums
STEP_TOL = dict(atol=1e-4, rtol=1e-3)    # after Adam + row-wise Adagrad steps


def _synthetic(seed):
    return make_synthetic(400, num_users=60, num_items=80, num_categories=7, num_contexts=5, num_segments=6,
                          num_tags=11, seq_len=6, seed=seed)


def _small(**kw):
    return dict(embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6), aux_loss_weight=0.4,
                **kw)


# every SAMLConfig variant of the model tests (test_model, test_checkpoint, test_host_syncs, the
# reliability cases), plus dropout: the twins draw the same masks from one seed where their layer outputs share a
# memory layout (a route-"all" output of the kernel layer is a strided view, so masks differ below a mutual layer)
VARIANTS = {
    "mutual0-cosine": lambda d: SAMLConfig.from_data(d, **_small(mutual_layers=(0,))),
    "mutual1-dot": lambda d: SAMLConfig.from_data(d, **_small(mutual_layers=(1,), similarity="dot", temperature=0.7)),
    "mutual01-cosine": lambda d: SAMLConfig.from_data(d, **_small(mutual_layers=(0, 1), temperature=0.7)),
    "no-mutual": lambda d: SAMLConfig.from_data(d, **_small(mutual_layers=())),
    "host-syncs": lambda d: SAMLConfig.from_data(d, aux_hidden=(24, 16), branch_hidden=(24, 16), mutual_layers=(0,)),
    "dropout": lambda d: SAMLConfig.from_data(d, **_small(mutual_layers=(0,), dropout=0.3)),
}


def _variant(name, seed=0):
    if name == "ali-ccp":  # no sequence, dense inputs
        d, _ = load_ali_ccp(ROOT / "data" / "ali_ccp" / "ali_ccp_train_sample.csv")
        return d, SAMLConfig.from_data(d, embedding_dim=4, aux_hidden=(8,), branch_hidden=(8,))
    d = _synthetic(seed)
    return d, VARIANTS[name](d)


ALL_VARIANTS = [*VARIANTS, "ali-ccp"]


def _twins(kind, cfg, emb_opt, device="cpu", backend=None):
    kernel_cls, ref_cls = {"SAML": (SAML, SAMLReference), "SharedBottom": (SharedBottom, SharedBottomReference)}[kind]
    ref = ref_cls(cfg, embedding_optimizer=emb_opt, device=device)
    fast = kernel_cls(cfg, backend=backend, embedding_optimizer=emb_opt, embedding_lr=EMB_LR, device=device)
    return fast, ref


def _outputs(model, batch, seed):
    torch.manual_seed(seed)  # the same dropout masks for both twins
    out = model(*batch.inputs())
    return out if isinstance(out, tuple) else (out,)


def _rows(d, n, k):
    return [np.arange(i * n, (i + 1) * n, k) % len(d) for i in range(3)]


# ------------------------------------------------------------------------------------------------ the contract

@pytest.mark.parametrize("field", LAYER_FIELDS)
def test_twin_layers_take_the_same_constructor_arguments(field):
    """Every argument of the reference twin is the kernel layer's, with the same kind, default and relative order;
    the kernel layer adds only kernel-only options."""
    ours = inspect.signature(getattr(KERNEL_LAYERS, field)).parameters
    ref = inspect.signature(getattr(REFERENCE_LAYERS, field)).parameters
    assert set(ref) <= set(ours), set(ref) - set(ours)
    assert set(ours) - set(ref) <= KERNEL_ONLY, set(ours) - set(ref) - KERNEL_ONLY
    assert [n for n in ours if n in ref] == list(ref)  # same order
    for i, (name, p) in enumerate(ref.items()):
        q = ours[name]
        assert p.default == q.default, (name, p.default, q.default)
        if p.kind == p.POSITIONAL_OR_KEYWORD:  # positional in the twin: at the same position in ours
            assert q.kind == q.POSITIONAL_OR_KEYWORD and list(ours).index(name) == i, name
        else:
            assert p.kind == p.KEYWORD_ONLY and q.kind in (q.KEYWORD_ONLY, q.POSITIONAL_OR_KEYWORD), name


TWIN_ARGS = {
    "scenario_embedding": [((([("a", 7, True, "sum"), ("b", 5, False, "sum")]), 3, 4), {}),
                           ((([("a", 7, True, "none")]), 2, 6), dict(optimizer="rowwise_adagrad"))],
    "attention": [((8, 4, 3), {})],
    "multi_branch_linear": [((6, 5, 3), dict(aux_features=2)), ((6, 5, 3), dict(bias=False, route="all"))],
    "mutual_unit": [((6, 5, 3), dict(aux_features=4, temperature=0.5)), ((6, 5, 1), dict(bias=False))],
}


@pytest.mark.parametrize("field", LAYER_FIELDS)
def test_twin_layers_hold_the_same_parameters(field):
    for args, kw in TWIN_ARGS[field]:
        ours = getattr(KERNEL_LAYERS, field)(*args, **kw)
        ref = getattr(REFERENCE_LAYERS, field)(*args, **kw)
        so, sr = ours.state_dict(), ref.state_dict()
        assert list(so) == list(sr)
        assert all(so[k].shape == sr[k].shape and so[k].dtype == sr[k].dtype for k in so)
        ours.load_state_dict(sr)
        ref.load_state_dict(so)


@pytest.mark.parametrize("kind", ["SAML", "SharedBottom"])
def test_reference_models_are_the_bodies_with_reference_layers(kind):
    d, cfg = _variant("mutual1-dot")
    fast, ref = _twins(kind, cfg, None)
    assert isinstance(ref, type(fast)) and fast.layer_set is KERNEL_LAYERS and ref.layer_set is REFERENCE_LAYERS
    twin = {getattr(KERNEL_LAYERS, f): getattr(REFERENCE_LAYERS, f) for f in LAYER_FIELDS}
    mods_f, mods_r = dict(fast.named_modules()), dict(ref.named_modules())
    assert list(mods_f)[1:] == list(mods_r)[1:]  # one module tree
    kernel_classes = 0
    for name, m in list(mods_f.items())[1:]:
        r = mods_r[name]
        if type(m) in twin:
            kernel_classes += 1
            assert type(r) is twin[type(m)], name
        else:
            assert type(r) is type(m), name  # torch modules: the same in both
    assert kernel_classes >= 5
    # the kernel body given the reference layers is the reference model
    body = type(fast)(cfg, layers=REFERENCE_LAYERS)
    body.load_state_dict(ref.state_dict())
    b = d.batch(np.arange(60))
    for x, y in zip(_outputs(body, b, 0), _outputs(ref, b, 0)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("emb_opt", [None, "rowwise_adagrad"], ids=str)
@pytest.mark.parametrize("kind", ["SAML", "SharedBottom"])
def test_empty_batch_in_both_twins(kind, emb_opt):
    d, cfg = _variant("mutual1-dot")
    fast, ref = _twins(kind, cfg, emb_opt)
    fast.load_state_dict(ref.state_dict())
    empty = d.batch(np.zeros(0, dtype=np.int64))
    for model in (fast, ref):
        for o in _outputs(model, empty, 0):
            assert o.shape == (0,)
        loss = model.loss(empty)
        assert loss.item() == 0.0
        loss.backward()
        assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ interchange

@pytest.mark.parametrize("emb_opt", [None, "rowwise_adagrad"], ids=str)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("kind", ["SAML", "SharedBottom"])
def test_state_dicts_interchange_bitwise_and_forwards_agree(kind, variant, emb_opt):
    d, cfg = _variant(variant, seed=len(variant))
    fast, ref = _twins(kind, cfg, emb_opt)
    sf, sr = fast.state_dict(), ref.state_dict()
    assert list(sf) == list(sr)
    assert all(sf[k].shape == sr[k].shape and sf[k].dtype == sr[k].dtype for k in sf)
    # reference -> kernel, then kernel -> a fresh reference: every tensor arrives bitwise
    fast.load_state_dict(sr)
    for k, v in fast.state_dict().items():
        assert torch.equal(v, sr[k]), k
    back = type(ref)(cfg, embedding_optimizer=emb_opt)
    back.load_state_dict(fast.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, sr[k]), k
    b = d.batch(np.arange(min(len(d), 150)))
    for x, y, z in zip(_outputs(fast, b, 7), _outputs(ref, b, 7), _outputs(back, b, 7)):
        assert x.shape == y.shape == (b.scenario.shape[0],)
        torch.testing.assert_close(x, y, **FWD_TOL)
        assert torch.equal(y, z)


@pytest.mark.parametrize("device, backend", device_backends("mbranch_linear"))
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("kind", ["SAML", "SharedBottom"])
def test_training_steps_stay_equal(device, backend, kind, variant):
    """Adam + row-wise Adagrad (fused in the kernel model's backward, after the backward for the reference):
    parameters and optimizer states stay equal step after step."""
    d, cfg = _variant(variant, seed=3)
    fast, ref = _twins(kind, cfg, "rowwise_adagrad", device, backend)
    fast.load_state_dict(ref.state_dict())
    of, orf = TrainingOptimizer(fast, 1e-2, EMB_LR), TrainingOptimizer(ref, 1e-2, EMB_LR)
    k = 4 if (backend == "triton" and device == "cpu") else 1  # the Triton interpreter is slow: fewer rows
    for step, rows in enumerate(_rows(d, min(len(d) // 3, 120), k)):
        b = d.batch(rows).to(device)
        for m, o in ((fast, of), (ref, orf)):
            o.zero_grad()
            torch.manual_seed(step)  # the same dropout masks
            m.loss(b).backward()
            o.step()
    sr = ref.state_dict()
    for key, v in fast.state_dict().items():
        torch.testing.assert_close(v, sr[key], **STEP_TOL, msg=key)
    opt_f, opt_r = of.state_dict()["embedding_state"], orf.state_dict()["embedding_state"]
    for key in opt_f:
        torch.testing.assert_close(opt_f[key], opt_r[key], **STEP_TOL, msg=key)
    init = type(ref)(cfg, embedding_optimizer="rowwise_adagrad", device=device)
    moved = sum(not torch.equal(v, sr[key]) for key, v in init.state_dict().items())
    assert moved > len(sr) // 2  # the steps changed the model


# ------------------------------------------------------------------------------------------------ kernel-only

@pytest.mark.parametrize("cls", [SAML, SharedBottom])
def test_kernel_only_options_stay_on_the_kernel_side(cls):
    d, cfg = _variant("mutual0-cosine")
    with pytest.raises(ValueError, match="backend='cpu' selects kernels, but the reference layers have none"):
        cls(cfg, layers=REFERENCE_LAYERS, backend="cpu")
    with pytest.raises(_backend.BackendUnavailableError, match=rf"{cls.__name__}\(backend=...\): unknown backend"):
        cls(cfg, backend="fast")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        cls(cfg, layers=REFERENCE_LAYERS, embedding_optimizer="sgd")  # the reference fuses no update
    built = cls(cfg, layers=REFERENCE_LAYERS, embedding_optimizer="rowwise_adagrad")
    assert built.backend is None and built.embedding.global_state is not None
    opt = TrainingOptimizer(built, 1e-2, EMB_LR)
    assert len(opt.tables) == 2 * (1 + (cfg.sequence is not None))  # updated after the backward, not fused


@pytest.mark.parametrize("cls", [SAMLReference, SharedBottomReference])
def test_reference_models_reject_a_fused_sgd(cls):
    _, cfg = _variant("no-mutual")
    with pytest.raises(ValueError, match=rf"{cls.__name__}: embedding_optimizer must be None or 'rowwise_adagrad'"):
        cls(cfg, embedding_optimizer="sgd")
    with pytest.raises(TypeError):
        cls(cfg, backend="cpu")  # no kernel options in the reference constructors


@pytest.mark.parametrize("kind", ["SAML", "SharedBottom"])
def test_only_the_kernel_forward_defers_its_checks(kind, monkeypatch):
    d, cfg = _variant("mutual0-cosine")
    fast, ref = _twins(kind, cfg, None)
    entered = []
    real = saml_body._checks.deferred_checks

    def spy():
        entered.append(1)
        return real()

    monkeypatch.setattr(saml_body._checks, "deferred_checks", spy)
    b = d.batch(np.arange(20))
    ref(*b.inputs())
    assert not entered
    fast(*b.inputs())
    assert len(entered) == 1
    bad = b.scenario.clone()
    bad[3] = cfg.num_scenarios
    for model in (fast, ref):  # both check the scenario range at the boundary
        with pytest.raises(IndexError, match=rf"{type(model).__name__}: scenario\[3\] = {cfg.num_scenarios} is out "
                                             rf"of range \[0, {cfg.num_scenarios}\)"):
            model(b.indices, b.offsets, bad, b.seq_ids, b.seq_lengths, b.dense)


def test_layer_set_names():
    with pytest.raises(ValueError, match="name must be one of"):
        LayerSet("fast", *(getattr(KERNEL_LAYERS, f) for f in LAYER_FIELDS))
    assert KERNEL_LAYERS.kernels and not REFERENCE_LAYERS.kernels
