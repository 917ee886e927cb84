"""nn.MultiBranchLinear: initialisation statistics, parameter names, equality with a loop of per-branch nn.Linear."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from saml_kernels.nn import MultiBranchLinear

from conftest import device_backends

BACKENDS = device_backends("mbranch_linear")


def test_parameters_and_state_dict_names():
    layer = MultiBranchLinear(6, 4, 3, aux_features=2)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "weight": (3, 6, 4), "bias": (3, 4), "aux_weight": (3, 2, 4)}
    plain = MultiBranchLinear(6, 4, 3, bias=False)
    assert list(plain.state_dict()) == ["weight"] and plain.bias is None and plain.aux_weight is None
    assert "num_branches=3" in repr(layer) and "aux_features=2" in repr(layer)


def test_state_dict_round_trip_gives_same_outputs():
    a = MultiBranchLinear(5, 3, 2, aux_features=2, activation="relu")
    b = MultiBranchLinear(5, 3, 2, aux_features=2, activation="relu")
    b.load_state_dict(a.state_dict())
    x, aux, s = torch.randn(7, 5), torch.randn(7, 2), torch.randint(0, 2, (7,))
    torch.testing.assert_close(a(x, s, aux), b(x, s, aux), rtol=0, atol=0)


@pytest.mark.parametrize("aux_features", [0, 64])
def test_init_statistics_match_nn_linear(aux_features):
    K, N, M = 192, 256, 4
    layer = MultiBranchLinear(K, N, M, aux_features=aux_features)
    bound = 1.0 / math.sqrt(K + aux_features)
    ref = nn.Linear(K + aux_features, N).weight  # U(-bound, bound)
    params = [layer.weight, layer.bias] + ([layer.aux_weight] if aux_features else [])
    for p in params:
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.95 * bound                                  # fills the interval
        assert abs(p.mean().item()) < 0.05 * bound
        assert abs(p.std().item() - bound / math.sqrt(3)) < 0.05 * bound     # std of U(-b, b)
    assert abs(ref.std().item() - layer.weight.std().item()) < 0.05 * bound
    for m in range(M):                                                        # every branch initialised
        assert layer.weight[m].std() > 0.5 * bound / math.sqrt(3)
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)


def test_factory_kwargs():
    layer = MultiBranchLinear(3, 2, 2, aux_features=1, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in layer.parameters())


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("route,grad_mask", [("own", "own"), ("all", "none"), ("all", "own")])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_equals_loop_of_nn_linear(device, backend, route, grad_mask, activation):
    """Branch m of the layer is nn.Linear(K + Ka, N) with weight [W_m ; Wa_m]^T on the concatenated input."""
    M, K, Ka, N, B = 3, 5, 2, 4, 19
    layer = MultiBranchLinear(K, N, M, aux_features=Ka, activation=activation, route=route, grad_mask=grad_mask,
                              dtype=torch.float64, device=device, backend=backend)
    linears = nn.ModuleList(nn.Linear(K + Ka, N, dtype=torch.float64, device=device) for _ in range(M))
    with torch.no_grad():
        for m, lin in enumerate(linears):
            lin.weight.copy_(torch.cat([layer.weight[m], layer.aux_weight[m]]).t())
            lin.bias.copy_(layer.bias[m])
    act = {None: nn.Identity(), "relu": nn.ReLU(), "gelu": nn.GELU()}[activation]
    x = torch.randn(B, K, dtype=torch.float64, device=device)
    aux = torch.randn(B, Ka, dtype=torch.float64, device=device)
    s = torch.randint(0, M, (B,), device=device)
    y = layer(x, s, aux)
    xa = torch.cat([x, aux], 1)
    all_y = torch.stack([act(lin(xa)) for lin in linears])      # [M, B, N]
    expected = all_y[s, torch.arange(B, device=device)] if route == "own" else all_y
    torch.testing.assert_close(y, expected)
    # Gradients: with route "own" (or grad_mask "own" on the own entries), branch m's nn.Linear sees only
    # scenario-m rows.
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    for m, lin in enumerate(linears):
        rows = s == m
        if route == "own":
            out = act(lin(xa[rows]))
            g = gy[rows]
        elif grad_mask == "own":
            out = act(lin(xa[rows]))
            g = gy[m][rows]
        else:
            out = act(lin(xa))
            g = gy[m]
        (out * g).sum().backward()
        torch.testing.assert_close(layer.weight.grad[m], lin.weight.grad.t()[:K])
        torch.testing.assert_close(layer.aux_weight.grad[m], lin.weight.grad.t()[K:])
        torch.testing.assert_close(layer.bias.grad[m], lin.bias.grad)


def test_bad_constructor_and_forward_arguments():
    with pytest.raises(ValueError, match="in_features"):
        MultiBranchLinear(0, 2, 2)
    with pytest.raises(ValueError, match="route"):
        MultiBranchLinear(2, 2, 2, route="mine")
    with pytest.raises(ValueError, match="grad_mask"):
        MultiBranchLinear(2, 2, 2, grad_mask="x")
    with pytest.raises(ValueError, match="activation"):
        MultiBranchLinear(2, 2, 2, activation="tanh")
    layer = MultiBranchLinear(2, 2, 2, aux_features=1)
    with pytest.raises(ValueError, match="aux"):
        layer(torch.randn(3, 2), torch.zeros(3, dtype=torch.long))
