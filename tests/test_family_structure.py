"""HMoE and STAR as their papers define them, checked against float64 formulas written here apart from the
package (from the parameters, not from the model body): HMoE's experts, per-scenario expert gates, towers and
per-scenario score gate with the task-constrained stop-gradient (Li et al., CIKM 2020); the prediction depends on
the scenario id; a scenario's gates learn only from its own samples; STAR's auxiliary network sees the scenario
indicator and the features; a StarLinear starts as its shared layer (W_m = 1, b_m = 0)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from saml_kernels.data import make_synthetic
from saml_kernels.nn import HMoE, HMoEConfig, STAR, STARConfig, StarLinear
from saml_kernels.nn.saml import dense_dtype
from saml_kernels.reference import HMoEReference, STARReference

F64 = torch.float64
DATA = make_synthetic(600, seed=11)
SMALL = dict(embedding_dim=4, attention_dim=4)
BACKENDS = ["reference", "cpu"]


def _batch(rows):
    b = DATA.batch(np.asarray(rows))
    b.dense = b.dense.to(F64)
    return b


def _perturbed(model, seed=0):
    """Away from the init (W_m = 1 and friends): every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _hmoe(kind, backend="cpu", seed=0):
    torch.manual_seed(seed)
    cfg = HMoEConfig.from_data(DATA, num_experts=3, expert_hidden=(10, 7), tower_hidden=6, **SMALL)
    if kind == "twin":
        return _perturbed(HMoEReference(cfg, dtype=F64, embedding_optimizer=None), seed)
    return _perturbed(HMoE(cfg, backend=backend, dtype=F64, embedding_optimizer=None), seed)


def _x0(model, b):
    return model.inputs(type(model).__name__, *b.inputs(), dense_dtype(model))


# ------------------------------------------------------------------------------------------------ HMoE

def hmoe_formula(model, x0, s):
    """logit [B] of HMoE in float64 from the parameters (einsum over every expert / scenario, stop-gradient by
    detach): experts e_k, gates softmax(x0 Gx_m + gx_m) over them, tower m on its mixture, the score gate of the
    sample's own scenario over all the towers' scores, the other scenarios' scores constants."""
    P = dict(model.named_parameters())
    M = model.config.num_scenarios
    s = s.long()
    e = x0
    for l in range(len(model.config.expert_hidden)):
        W, b = P[f"experts.{l}.weight"], P[f"experts.{l}.bias"]  # [K, k, n], [K, n]
        e = torch.relu((torch.einsum("bi,kio->kbo", e, W) if e.dim() == 2 else torch.einsum("kbi,kio->kbo", e, W))
                       + b[:, None])
    gate = torch.softmax(torch.einsum("bi,mik->mbk", x0, P["expert_gates.weight"]) + P["expert_gates.bias"][:, None],
                         dim=-1)
    f = torch.einsum("mbk,kbh->mbh", gate, e)
    t = torch.relu(torch.einsum("mbh,mht->mbt", f, P["towers.weight"]) + P["towers.bias"][:, None])
    score = torch.einsum("mbt,mt->mb", t, P["tower_heads.weight"][..., 0]) + P["tower_heads.bias"][:, :1]
    own = torch.arange(M)[:, None] == s[None]
    score = torch.where(own, score, score.detach())
    w = torch.softmax(torch.einsum("bi,bim->bm", x0, P["score_gate.weight"][s]) + P["score_gate.bias"][s], dim=1)
    return (w * score.t()).sum(1)


@pytest.mark.parametrize("kind", ["kernel:cpu", "kernel:reference", "twin"])
def test_hmoe_matches_float64_formula_outputs_and_gradients(kind):
    model = _hmoe(kind.split(":")[0], backend=kind.split(":")[-1])
    b = _batch(np.arange(150))
    g = torch.randn(150, dtype=F64)
    out = model(*b.inputs())
    (out * g).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want_out = hmoe_formula(model, _x0(model, b), b.scenario)
    (want_out * g).sum().backward()
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    for n, p in model.named_parameters():
        if p.grad is None:
            assert n not in got or not got[n].any(), n
            continue
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hmoe_prediction_depends_on_the_scenario_id(backend):
    """The same features scored as another scenario get another score (the old shared gate gave max |dp| = 0)."""
    for model in (_hmoe("kernel", backend), _hmoe("twin")):
        model.eval()
        b = _batch(np.arange(200))
        M = model.config.num_scenarios
        with torch.no_grad():
            p = torch.sigmoid(model(*b.inputs()))
            for shift in range(1, M):
                rot = (b.scenario + shift) % M
                q = torch.sigmoid(model(b.indices, b.offsets, rot, b.seq_ids, b.seq_lengths, b.dense))
                assert (p - q).abs().min() > 0 and (p - q).abs().max() > 1e-3, (shift, (p - q).abs().max())


def _scenario_owned(name):
    return name.startswith(("expert_gates.", "score_gate.", "towers.", "tower_heads."))


@pytest.mark.parametrize("kind", ["kernel:cpu", "kernel:reference", "twin"])
def test_hmoe_gate_isolation_in_a_mixed_batch(kind):
    """In a batch of every scenario, the loss of the samples outside scenario m gives scenario m's gates (expert
    gate and score gate) and tower exactly zero gradient; m's own samples give them gradient."""
    model = _hmoe(kind.split(":")[0], backend=kind.split(":")[-1])
    b = _batch(np.arange(240))
    s = b.scenario.long()
    M = model.config.num_scenarios
    assert len(set(s.tolist())) == M
    for m in range(M):
        for mine in (False, True):
            model.zero_grad(set_to_none=True)
            sel = (s == m) if mine else (s != m)
            out = model(*b.inputs())
            torch.nn.functional.binary_cross_entropy_with_logits(out[sel], b.label.to(F64)[sel]).backward()
            for n, p in model.named_parameters():
                if not _scenario_owned(n):
                    continue
                gm = p.grad[m]
                if mine:
                    assert gm.abs().sum() > 0, f"{n}[{m}]: no gradient from scenario {m}'s own samples"
                else:
                    assert not gm.any(), f"{n}[{m}]: gradient from other scenarios' samples"


def test_hmoe_experts_are_shared_and_the_config_shapes_the_parameters():
    model = _hmoe("kernel")
    P = dict(model.named_parameters())
    M, K = model.config.num_scenarios, model.config.num_experts
    D0 = model.config.global_dim
    assert P["experts.0.weight"].shape == (K, D0, 10) and P["experts.1.weight"].shape == (K, 10, 7)
    assert P["expert_gates.weight"].shape == (M, D0, K) and P["score_gate.weight"].shape == (M, D0, M)
    assert P["towers.weight"].shape == (M, 7, 6) and P["tower_heads.weight"].shape == (M, 6, 1)
    b = _batch(np.flatnonzero(DATA.scenario == 0)[:40])  # one scenario only: the experts still learn
    model.loss(b).backward()
    for n in ("experts.0.weight", "experts.1.weight"):
        assert (P[n].grad.flatten(1).abs().sum(1) > 0).all(), n  # every expert


# ------------------------------------------------------------------------------------------------ STAR

def _star(kind, backend="cpu", seed=0):
    torch.manual_seed(seed)
    cfg = STARConfig.from_data(DATA, hidden=(12, 6), aux_dim=3, aux_hidden=5, **SMALL)
    if kind == "twin":
        return _perturbed(STARReference(cfg, dtype=F64, embedding_optimizer=None), seed)
    return _perturbed(STAR(cfg, backend=backend, dtype=F64, embedding_optimizer=None), seed)


@pytest.mark.parametrize("kind", ["kernel:cpu", "kernel:reference", "twin"])
def test_star_auxiliary_network_formula_outputs_and_gradients(kind):
    """a = relu([x_0 ; E[s]] @ [Wx ; We] + c) @ Wo^T + c_o, in float64 with a concatenation; gradients to every
    auxiliary parameter and to x_0."""
    model = _star(kind.split(":")[0], backend=kind.split(":")[-1])
    P = dict(model.named_parameters())
    b = _batch(np.arange(120))
    s = b.scenario
    x0 = _x0(model, b).detach().requires_grad_()
    got = model.auxiliary(x0, s)
    x0w = x0.detach().clone().requires_grad_()
    W = torch.cat([P["aux_layer.weight"][0], P["aux_layer.aux_weight"][0]], 0)
    h = torch.relu(torch.cat([x0w, P["aux_embedding.weight"][s.long()]], 1) @ W + P["aux_layer.bias"][0])
    want = h @ P["aux_head.weight"].t() + P["aux_head.bias"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    names = ["aux_embedding.weight", "aux_layer.weight", "aux_layer.aux_weight", "aux_layer.bias",
             "aux_head.weight", "aux_head.bias"]
    ga = torch.autograd.grad((got * g).sum(), [x0] + [P[n] for n in names])
    gw = torch.autograd.grad((want * g).sum(), [x0w] + [P[n] for n in names])
    for n, a, w in zip(["x0"] + names, ga, gw):
        assert a.abs().sum() > 0, n
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["kernel:cpu", "twin"])
def test_star_auxiliary_network_sees_the_features(kind):
    """Within one scenario the auxiliary output varies with the features (it saw only the indicator before)."""
    model = _star(kind.split(":")[0], backend=kind.split(":")[-1]).eval()
    b = _batch(np.flatnonzero(DATA.scenario == 1)[:50])
    with torch.no_grad():
        a = model.auxiliary(_x0(model, b), b.scenario)
    assert a.std() > 1e-3, a.std()


@pytest.mark.parametrize("backend", BACKENDS)
def test_star_linear_starts_as_its_shared_layer(backend):
    """W_m = 1 and b_m = 0 at init: every scenario's effective layer is the shared one (the star topology starts at
    the shared network; docs/design.md section 9)."""
    torch.manual_seed(3)
    layer = StarLinear(7, 5, 4, activation="relu", backend=backend, dtype=F64)
    x = torch.randn(30, 7, dtype=F64)
    s = torch.arange(30) % 4
    want = torch.relu(x @ layer.shared_weight + layer.shared_bias)
    torch.testing.assert_close(layer(x, s), want, rtol=1e-12, atol=1e-12)
