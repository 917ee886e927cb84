"""The MutualUnit layer and its twin RefMutualUnit on a per-branch input x [M, B, K] (the output of a route-"all"
layer below): every backend against the float64 twin (values and gradients), the twin against the formula, the
scenario stop-gradient, odd and empty sizes, int32/int64 scenarios, non-contiguous inputs, every float dtype,
agreement with the shared-input (fused) path, and bad input."""
from __future__ import annotations

import pytest
import torch

from saml_kernels import _backend
from saml_kernels.nn import MutualUnit
from saml_kernels.reference.layers import RefMutualUnit

from conftest import device_backends, tolerance

# the per-branch path runs mbranch_linear then mutual_unit: every backend that serves both
PAIRS = [p for p in device_backends("mbranch_linear")
         if p.values[1] in _backend.available_backends(p.values[0], "mutual_unit")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def layers(M, K, N, Ka, bias=True, activation="relu", temperature=0.7, similarity="cosine", dtype=torch.float32,
           device="cpu", backend=None):
    """(kernel layer in ``dtype`` on ``backend``, its float64 RefMutualUnit twin holding the same weights)."""
    kw = dict(aux_features=Ka, activation=activation, temperature=temperature, similarity=similarity, bias=bias)
    ours = MutualUnit(K, N, M, **kw, backend=backend, device=device, dtype=dtype)
    ref = RefMutualUnit(K, N, M, **kw, device=device, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, ref


def inputs(M, B, K, Ka, dtype=torch.float32, device="cpu", idx_dtype=torch.int64):
    x = torch.randn(M, B, K, dtype=torch.float64, device=device).to(dtype)
    aux = torch.randn(B, Ka, dtype=torch.float64, device=device).to(dtype) if Ka else None
    scenario = torch.randint(0, M, (B,), device=device, dtype=idx_dtype)
    return x, scenario, aux


def run_with_grads(layer, x, scenario, aux, g):
    """(out, {name: gradient}) for the inputs and the layer's parameters."""
    leaves = {"x": x.detach().requires_grad_()}
    if aux is not None:
        leaves["aux"] = aux.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(leaves["x"], scenario, leaves.get("aux"))
    out.backward(g.to(out.dtype))
    grads = {k: v.grad for k, v in leaves.items()}
    grads.update({k: p.grad for k, p in layer.named_parameters()})
    return out, grads


def loose(dtype):
    t = tolerance(dtype)
    return t if dtype in (torch.float32, torch.float64) else dict(atol=4 * t["atol"], rtol=4 * t["rtol"])


def assert_matches_twin(ours, ref, x, scenario, aux, dtype):
    g = torch.randn(x.shape[1], ours.out_features, dtype=torch.float64, device=x.device)
    out, gr = run_with_grads(ours, x, scenario, aux, g)
    want, gw = run_with_grads(ref, x.double(), scenario, None if aux is None else aux.double(), g)
    assert out.dtype == dtype and out.shape == want.shape == (x.shape[1], ours.out_features)
    torch.testing.assert_close(out.double(), want, **loose(dtype))
    assert set(gr) == set(gw)
    for k in gw:
        scale = max(1.0, float(gw[k].abs().max())) if gw[k].numel() else 1.0
        tol = loose(dtype)
        torch.testing.assert_close(gr[k].double(), gw[k], atol=tol["atol"] * scale, rtol=tol["rtol"],
                                   msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------ against the twin

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation, similarity", [("relu", "cosine"), ("gelu", "dot"), (None, "cosine")])
def test_per_branch_input_matches_float64_twin(device, backend, dtype, activation, similarity):
    M, B, K, N, Ka = 3, 11, 6, 5, 4
    ours, ref = layers(M, K, N, Ka, activation=activation, similarity=similarity, dtype=dtype, device=device,
                       backend=backend)
    x, scenario, aux = inputs(M, B, K, Ka, dtype, device)
    assert_matches_twin(ours, ref, x, scenario, aux, dtype)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("M,B,K,N,Ka,bias", [(1, 7, 5, 3, 2, True), (2, 1, 1, 1, 0, False), (4, 37, 9, 33, 3, True),
                                             (3, 0, 4, 6, 2, True), (5, 20, 3, 2, 0, True)])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
def test_per_branch_odd_and_empty_sizes(device, backend, M, B, K, N, Ka, bias, idx_dtype):
    ours, ref = layers(M, K, N, Ka, bias=bias, activation="silu", device=device, backend=backend)
    x, scenario, aux = inputs(M, B, K, Ka, device=device, idx_dtype=idx_dtype)
    assert_matches_twin(ours, ref, x, scenario, aux, torch.float32)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_per_branch_non_contiguous_inputs(device, backend):
    M, B, K, N, Ka = 3, 9, 6, 5, 3
    ours, ref = layers(M, K, N, Ka, device=device, backend=backend)
    x = torch.randn(B, M, K, device=device).transpose(0, 1)              # [M, B, K] view of a [B, M, K] buffer
    aux = torch.randn(B, 2 * Ka, device=device)[:, ::2]                 # column-strided
    scenario = torch.randint(0, M, (B, 2), device=device)[:, 0]         # strided
    assert not (x.is_contiguous() or aux.is_contiguous() or scenario.is_contiguous())
    assert_matches_twin(ours, ref, x, scenario, aux, torch.float32)


def test_twin_per_branch_input_is_the_formula():
    """The float64 oracle itself: h[m, b] = act(x[m, b] W_m + aux_b Wa_m + bias_m), then the mutual mix."""
    M, B, K, N, Ka = 4, 10, 5, 6, 3
    ref = RefMutualUnit(K, N, M, aux_features=Ka, activation="relu", temperature=0.6, similarity="cosine",
                        dtype=torch.float64)
    x, scenario, aux = inputs(M, B, K, Ka, torch.float64)
    h = torch.relu(torch.einsum("mbk,mkn->mbn", x, ref.weight) + torch.einsum("bk,mkn->mbn", aux, ref.aux_weight)
                   + ref.bias[:, None])
    own = h[scenario, torch.arange(B)]                                                       # [B, N]
    norm = lambda t: t / t.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # noqa: E731
    a = torch.softmax((norm(h) * norm(own)[None]).sum(-1).t() / 0.6, dim=1)                 # [B, M]
    want = (a.t()[..., None] * h).sum(0)
    torch.testing.assert_close(ref(x, scenario, aux), want, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ properties

@pytest.mark.parametrize("device,backend", PAIRS)
def test_per_branch_stop_gradient(device, backend):
    """x[m, b] gets gradient only for m = s_b; branch m's parameters only from scenario-m samples."""
    M, B, K, N, Ka = 3, 12, 4, 5, 2
    ours, _ = layers(M, K, N, Ka, activation=None, device=device, backend=backend)  # no dead units
    x, _, aux = inputs(M, B, K, Ka, device=device)
    scenario = torch.arange(B, device=device) % M
    for m in range(M):
        g = torch.randn(B, N, device=device)
        g[scenario == m] = 0  # the loss sees only samples of other scenarios
        _, gr = run_with_grads(ours, x, scenario, aux, g)
        for name in ("weight", "bias", "aux_weight"):
            assert (gr[name][m] == 0).all(), name
        assert (gr["weight"][[k for k in range(M) if k != m]] != 0).any()
        not_own = torch.arange(M, device=device)[:, None] != scenario[None]
        assert (gr["x"][not_own] == 0).all()
        own_rows = gr["x"][scenario, torch.arange(B, device=device)]                         # [B, K]
        assert (own_rows.abs().sum(-1)[scenario != m] > 0).all()


@pytest.mark.parametrize("device,backend", PAIRS)
def test_per_branch_equals_shared_input_when_branches_see_the_same_x(device, backend):
    """x.expand(M, B, K) through the per-branch path equals x [B, K] through the fused mutual_linear."""
    M, B, K, N, Ka = 3, 10, 6, 4, 2
    ours, _ = layers(M, K, N, Ka, activation="leaky_relu", similarity="dot", device=device, backend=backend)
    x, scenario, aux = inputs(1, B, K, Ka, device=device)
    shared = ours(x[0], scenario, aux)
    per_branch = ours(x[0].expand(M, B, K), scenario, aux)
    torch.testing.assert_close(per_branch, shared, **tolerance(torch.float32))


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("device,backend", PAIRS)
def test_per_branch_bad_input(device, backend):
    M, B, K, N, Ka = 3, 6, 4, 5, 2
    ours, ref = layers(M, K, N, Ka, device=device, backend=backend)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x, scenario, aux = inputs(M, B, K, Ka, device=device)
    with pytest.raises(ValueError, match=r"per-branch x \[M, B, K\] has 4 branches but weight has M = 3"):
        ours(torch.randn(M + 1, B, K, device=device), scenario, aux)
    with pytest.raises(ValueError, match="x has 3 features"):
        ours(x[..., :3], scenario, aux)
    with pytest.raises(ValueError, match="scenario must have B = 6"):
        ours(x, scenario[:-1], aux)
    with pytest.raises(ValueError, match="aux must have B = 6 rows"):
        ours(x, scenario, aux[:-1])
    with pytest.raises(ValueError, match="aux must be given"):
        ours(x, scenario)
    with pytest.raises(TypeError, match="dtype"):
        ours(x.double(), scenario, aux)
    bad = scenario.clone()
    bad[4] = M
    with pytest.raises((IndexError, ValueError), match=r"scenario\[4\] = 3"):
        ours(x, bad, aux)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.isfinite(ours(x, scenario, aux)).all()  # the layer still works after the rejected calls


def test_save_branch_outputs_auto_keeps_small_batches_only(monkeypatch):
    """save_branch_outputs=None (the default): the branch outputs are kept for the backward while M*B*N <=
    SAVE_AUTO_ELEMENTS and recomputed above; True / False force it; anything else is a TypeError. The values and
    gradients do not depend on the choice."""
    from saml_kernels.nn import mutual_unit as mu_layer

    seen = []
    real = mu_layer.mutual_linear

    def spy(*args, **kw):
        seen.append(kw["save_branch_outputs"])
        return real(*args, **kw)

    monkeypatch.setattr(mu_layer, "mutual_linear", spy)
    M, N = 4, 8
    limit = mu_layer.SAVE_AUTO_ELEMENTS // (M * N)
    grads = {}
    for save in (None, True, False):
        torch.manual_seed(0)
        layer = MutualUnit(5, N, M, aux_features=3, save_branch_outputs=save)
        for B in (limit, limit + 1):
            x, a = torch.randn(B, 5, requires_grad=True), torch.randn(B, 3)
            s = torch.arange(B) % M
            layer(x, s, a).square().sum().backward()
            grads[(save, B)] = (x.grad, layer.weight.grad.clone())
            layer.zero_grad()
    assert seen == [True, False, True, True, False, False]
    for B in (limit, limit + 1):
        for save in (True, False):
            # saved and recomputed paths sum in different orders: float32 rounding apart
            torch.testing.assert_close(grads[(None, B)][0], grads[(save, B)][0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(grads[(None, B)][1], grads[(save, B)][1], rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="save_branch_outputs"):
        MutualUnit(5, N, M, save_branch_outputs=1)
