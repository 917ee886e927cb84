"""StarLinear, STAR and HMoE: against their plain-PyTorch twins in float64 on every backend, gradient isolation
between scenarios, state_dict interchange, training steps in lockstep, empty batches and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from saml_kernels.data import make_synthetic
from saml_kernels.nn import HMoE, HMoEConfig, STAR, STARConfig, StarLinear, TrainingOptimizer
from saml_kernels.reference import HMoEReference, STARReference
from saml_kernels.reference.star_layers import RefStarLinear

from conftest import device_backends

PAIRS = device_backends("mbranch_linear")
F64 = torch.float64


# ------------------------------------------------------------------------------------------------ StarLinear

def _star_pair(K, N, M, backend, device, activation="relu", bias=True):
    a = StarLinear(K, N, M, bias=bias, activation=activation, backend=backend, device=device, dtype=F64)
    r = RefStarLinear(K, N, M, bias=bias, activation=activation, device=device, dtype=F64)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    r.load_state_dict(a.state_dict())
    return a, r


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("B,K,N,M", [(0, 3, 4, 2), (1, 5, 3, 1), (37, 7, 5, 3)])
def test_star_linear_matches_float64_twin(device, backend, activation, idx_dtype, B, K, N, M):
    a, r = _star_pair(K, N, M, backend, device, activation)
    x = torch.randn(B, K, device=device, dtype=F64)
    s = torch.randint(0, M, (B,), device=device).to(idx_dtype)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yr = a(xa, s), r(xr, s)
    torch.testing.assert_close(ya, yr)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(xa.grad, xr.grad)
    for (n, p), q in zip(a.named_parameters(), r.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_star_linear_shared_gradient_formula(device, backend):
    """dW_shared = sum_m dW_eff_m * W_m, dW_m = dW_eff_m * W_shared, with dW_eff_m = X_m^T dY_m (own rows)."""
    a, _ = _star_pair(4, 3, 3, backend, device, activation=None)
    x = torch.randn(20, 4, device=device, dtype=F64)
    s = torch.randint(0, 3, (20,), device=device)
    g = torch.randn(20, 3, device=device, dtype=F64)
    (a(x, s) * g).sum().backward()
    d_eff = torch.stack([x[s == m].t() @ g[s == m] for m in range(3)])
    torch.testing.assert_close(a.shared_weight.grad, (d_eff * a.weight.detach()).sum(0))
    torch.testing.assert_close(a.weight.grad, d_eff * a.shared_weight.detach())
    db = torch.stack([g[s == m].sum(0) for m in range(3)])
    torch.testing.assert_close(a.bias.grad, db)
    torch.testing.assert_close(a.shared_bias.grad, g.sum(0))


def test_star_linear_init_and_bad_arguments():
    layer = StarLinear(6, 2, 3)
    assert torch.equal(layer.weight, torch.ones(3, 6, 2)) and torch.equal(layer.bias, torch.zeros(3, 2))
    assert layer.shared_weight.abs().max() <= 1 / 6 ** 0.5
    assert StarLinear(6, 2, 3, bias=False).bias is None
    for kw, exc, msg in ((dict(in_features=0), ValueError, "in_features"), (dict(num_branches=1.5), TypeError,
                         "num_branches"), (dict(activation="tanh"), ValueError, "activation"),
                         (dict(backend="fortran"), ValueError, "unknown backend")):
        args = dict(in_features=4, out_features=2, num_branches=2)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            StarLinear(**args)
    with pytest.raises(IndexError, match=r"scenario\[1\] = 3"):
        layer(torch.randn(2, 6), torch.tensor([0, 3]))


# ------------------------------------------------------------------------------------------------ models

DATA = make_synthetic(600, seed=5)
SMALL = dict(embedding_dim=4, attention_dim=4)
MODELS = {
    "STAR": (STAR, STARReference, lambda: STARConfig.from_data(DATA, hidden=(16, 8), aux_dim=3, aux_hidden=5, **SMALL)),
    "HMoE": (HMoE, HMoEReference, lambda: HMoEConfig.from_data(DATA, num_experts=3, expert_hidden=(16, 12),
                                                              tower_hidden=8, **SMALL)),
}


def _batch(rows, dtype=F64):
    b = DATA.batch(np.asarray(rows))
    if b.dense is not None:
        b.dense = b.dense.to(dtype)
    return b


def _pair(name, backend, embedding_optimizer=None, seed=0):
    kernel_cls, ref_cls, cfg = MODELS[name]
    torch.manual_seed(seed)
    a = kernel_cls(cfg(), backend=backend, embedding_optimizer=embedding_optimizer, dtype=F64)
    with torch.no_grad():  # away from the identity init of the scenario parts: every parameter matters
        for p in a.parameters():
            p.add_(0.2 * torch.randn_like(p))
    r = ref_cls(cfg(), embedding_optimizer=embedding_optimizer, dtype=F64)
    r.load_state_dict(a.state_dict())
    return a, r


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_twin_in_float64(name, backend):
    a, r = _pair(name, backend)
    b = _batch(np.arange(200))
    la, lr = a.loss(b), r.loss(b)
    torch.testing.assert_close(la, lr)
    la.backward()
    lr.backward()
    ga, gr = _grads(a), _grads(r)
    for n in ga:
        if gr[n] is None:  # the unused local half of the attention (no gradient in either)
            assert ga[n] is None or not ga[n].any(), n
            continue
        torch.testing.assert_close(ga[n], gr[n], msg=lambda m, n=n: f"{n}: {m}")
    rb = dict(r.named_buffers())
    for n, x in a.named_buffers():
        if n.endswith("running_mean") or n.endswith("running_var"):
            torch.testing.assert_close(x, rb[n], msg=lambda m, n=n: f"buffer {n}: {m}")
    a.eval()
    r.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(*b.inputs()), r(*b.inputs()))


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_interchange(name):
    a, r = _pair(name, "cpu")
    assert list(a.state_dict()) == list(r.state_dict())
    a2, _ = _pair(name, "cpu", seed=1)
    a2.load_state_dict(r.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(a2.state_dict()[k], v), k
    # the row-wise optimizer states are optional in both directions, as for SAML
    a3, r3 = _pair(name, "cpu", embedding_optimizer="rowwise_adagrad")
    a3.load_state_dict(r.state_dict())
    r.load_state_dict(a3.state_dict())


def _scenario_param_slices(name, model, t):
    """(parameter name, the slices of scenario m != t) of every scenario-owned parameter."""
    M = model.config.num_scenarios
    other = [m for m in range(M) if m != t]
    out = []
    for n, p in model.named_parameters():
        if name == "STAR" and (n.startswith(("star_layers.", "head.")) and n.rsplit(".", 1)[1] in ("weight", "bias")
                               or n in ("norm.scenario_weight", "norm.scenario_bias", "aux_embedding.weight")):
            out.append((n, p, other))
        if name == "HMoE" and n.startswith(("towers.", "tower_heads.", "expert_gates.", "score_gate.")):
            out.append((n, p, other))
    assert out
    return out


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("twin", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_isolation(name, backend, twin):
    """All samples in scenario t: no parameter of another scenario gets gradient; the shared ones do."""
    a, r = _pair(name, backend)
    model = r if twin else a
    t = 1
    rows = np.flatnonzero(DATA.scenario == t)[:64]
    model.loss(_batch(rows)).backward()
    for n, p, other in _scenario_param_slices(name, model, t):
        g = p.grad
        assert g is not None and g[t].abs().sum() > 0, f"{n}: scenario {t} got no gradient"
        assert not g[other].any(), f"{n}: other scenarios got gradient"
    shared = {"STAR": ["star_layers.0.shared_weight", "norm.weight", "head.shared_bias", "aux_layer.weight",
                       "aux_head.weight"],
              "HMoE": ["experts.0.weight", "experts.1.bias"]}[name]
    params = dict(model.named_parameters())
    for n in shared:
        assert params[n].grad is not None and params[n].grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", list(MODELS))
def test_training_steps_in_lockstep(name):
    """Kernel model (fused row-wise Adagrad on the tables) and twin (the same math after the backward) stay equal."""
    a, r = _pair(name, "cpu", embedding_optimizer="rowwise_adagrad")
    oa, orr = TrainingOptimizer(a, 1e-2, 0.05), TrainingOptimizer(r, 1e-2, 0.05)
    for step in range(3):
        b = _batch(np.arange(step * 150, step * 150 + 150))
        for m, o in ((a, oa), (r, orr)):
            o.zero_grad()
            m.loss(b).backward()
            o.step()
    for (n, p), q in zip(a.state_dict().items(), r.state_dict().values()):
        torch.testing.assert_close(p, q, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", list(MODELS))
def test_empty_batch(name):
    a, _ = _pair(name, "cpu")
    loss = a.loss(_batch(np.arange(0)))
    assert loss.item() == 0
    loss.backward()


@pytest.mark.parametrize("name", list(MODELS))
def test_bad_scenario_raises_and_modifies_nothing(name):
    a, _ = _pair(name, "cpu", embedding_optimizer="rowwise_adagrad")
    before = {k: v.clone() for k, v in a.state_dict().items()}
    b = _batch(np.arange(20))
    b.scenario = b.scenario.clone()
    b.scenario[7] = a.config.num_scenarios
    with pytest.raises(IndexError, match=rf"scenario\[7\] = {a.config.num_scenarios} is out of range"):
        a.loss(b).backward()
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_configs_from_data_and_bad_values():
    c = STARConfig.from_data(DATA)
    assert c.num_scenarios == DATA.num_scenarios and c.target_feature == "item"
    h = HMoEConfig.from_data(DATA, expert_hidden=(8,))
    assert (h.num_experts, h.expert_hidden) == (4, (8,))
    for cls, kw, exc, msg in ((STARConfig, dict(hidden=()), ValueError, "hidden"),
                              (STARConfig, dict(hidden=(8, 0)), ValueError, r"hidden\[1\]"),
                              (STARConfig, dict(norm_eps=0.0), ValueError, "eps"),
                              (STARConfig, dict(aux_dim=True), TypeError, "aux_dim"),
                              (HMoEConfig, dict(tower_hidden=0), ValueError, "tower_hidden"),
                              (HMoEConfig, dict(expert_hidden=()), ValueError, "expert_hidden"),
                              (HMoEConfig, dict(num_experts=0), ValueError, "num_experts"),
                              (HMoEConfig, dict(dropout=1.0), ValueError, "dropout"),
                              (HMoEConfig, dict(target_feature="nope"), ValueError, "target_feature")):
        with pytest.raises(exc, match=msg):
            cls.from_data(DATA, **kw)
    with pytest.raises(TypeError, match="must be a STARConfig"):
        STAR(h)
    with pytest.raises(ValueError, match="unknown backend"):
        HMoE(h, backend="fortran")


@pytest.mark.parametrize("name", list(MODELS))
def test_body_shares_saml_options_and_checked_forward(name, monkeypatch):
    """The bodies take SAML's layer options (kernel-only options stay on the kernel side) and forward under its
    checked_forward: only the kernel model defers its value checks; both check the scenario at the boundary."""
    from saml_kernels.nn import saml as saml_body
    from saml_kernels.reference import REFERENCE_LAYERS

    kernel_cls, ref_cls, cfg = MODELS[name]
    body = kernel_cls.__mro__[1]
    with pytest.raises(ValueError, match="backend='cpu' selects kernels, but the reference layers have none"):
        body(cfg(), REFERENCE_LAYERS, backend="cpu")
    with pytest.raises(ValueError, match=rf"{ref_cls.__name__}: embedding_optimizer must be None or "
                                         r"'rowwise_adagrad', got 'sgd'"):
        ref_cls(cfg(), embedding_optimizer="sgd")
    fast, ref = _pair(name, "cpu")
    entered = []
    real = saml_body._checks.deferred_checks
    monkeypatch.setattr(saml_body._checks, "deferred_checks", lambda: entered.append(1) or real())
    b = _batch(np.arange(20))
    ref(*b.inputs())
    assert not entered
    fast(*b.inputs())
    assert len(entered) == 1
    bad = b.scenario.clone()
    bad[3] = fast.config.num_scenarios
    for model in (fast, ref):
        with pytest.raises(IndexError, match=rf"{type(model).__name__}: scenario\[3\] = {fast.config.num_scenarios} "
                                             rf"is out of range"):
            model(b.indices, b.offsets, bad, b.seq_ids, b.seq_lengths, b.dense)
