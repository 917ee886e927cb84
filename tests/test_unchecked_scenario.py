"""The unchecked-input contract (docs/design.md section 5), on every backend here.

With ``check_scenario=False`` a row whose scenario id is outside [0, M) is defined, not an error: its outputs
are zeros (mbranch_linear route "own": y; mutual_unit / mutual_linear: out and attn), it gets no gradient (dx /
daux / dh rows zero) and adds nothing to any parameter gradient. So every other row's results equal those of the
same call without the bad rows, and nothing is NaN. (The scenario embedding already reads such ids as zero
vectors.) The CUDA kernels follow it too: tests/test_cuda_sync_free.py runs the GEMM engine's part on the CPU.
"""
from __future__ import annotations

import pytest
import torch

import saml_kernels as sk

from conftest import device_backends, tolerance

M, B, K, N = 3, 11, 5, 6
BAD = {1: -1, 4: M, 7: M + 4}  # row -> out-of-range id


def _scenario(device):
    s = torch.randint(0, M, (B,), device=device)
    for r, v in BAD.items():
        s[r] = v
    return s


def _good(device):
    return torch.tensor([b for b in range(B) if b not in BAD], device=device)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _compare(full_out, full_grads, sub_out, sub_grads, row_grad_ids, good, dtype):
    """full_out [B, ...] rows of bad ids zero, good rows == sub; row gradients likewise; parameter grads equal."""
    tol = tolerance(dtype)
    bad = torch.tensor(sorted(BAD), device=full_out.device)
    assert not torch.isnan(full_out).any()
    assert torch.equal(full_out[bad], torch.zeros_like(full_out[bad])), "outputs of out-of-range rows not zero"
    torch.testing.assert_close(full_out[good], sub_out, **tol)
    for i, (g, gs) in enumerate(zip(full_grads, sub_grads)):
        assert g is not None and not torch.isnan(g).any()
        if i in row_grad_ids:  # a row gradient [B, ...] (or [M, B, ...] for a per-branch x: dim 1)
            dim = 1 if g.dim() == 3 else 0
            gb, gg = g.index_select(dim, bad), g.index_select(dim, good)
            assert torch.equal(gb, torch.zeros_like(gb)), f"gradient {i} of out-of-range rows not zero"
            torch.testing.assert_close(gg, gs, **tol)
        else:
            torch.testing.assert_close(g, gs, **tol)


@pytest.mark.parametrize("device,backend", device_backends("mbranch_linear"))
@pytest.mark.parametrize("route,grad_mask,per_branch_x",
                         [("own", "own", False), ("own", "own", True), ("all", "own", False),
                          ("all", "params", False), ("all", "own", True)])
def test_mbranch_linear_out_of_range_rows(device, backend, route, grad_mask, per_branch_x):
    dtype = torch.float32
    x = torch.randn((M, B, K) if per_branch_x else (B, K), device=device, dtype=dtype)
    w, b = torch.randn(M, K, N, device=device), torch.randn(M, N, device=device)
    aux, wa = torch.randn(B, 2, device=device), torch.randn(M, 2, N, device=device)
    s, good = _scenario(device), _good(device)

    def run(x, w, b, aux, wa, s):
        y = sk.mbranch_linear(x, w, b, s, route=route, activation="relu", grad_mask=grad_mask, aux=aux,
                              aux_weight=wa, backend=backend, check_scenario=False)
        return y.transpose(0, 1) if route == "all" else y  # rows first

    leaves = _leaves(x, w, b, aux, wa)
    y = run(*leaves, s)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    sub = _leaves(x.index_select(1 if per_branch_x else 0, good), w, b, aux[good], wa)
    ys = run(*sub, s[good])
    (ys * gy[good]).sum().backward()
    if route == "all":  # the all-route forward ignores the scenario: bad rows are ordinary outputs
        torch.testing.assert_close(y[good], ys, **tolerance(dtype))
        y = torch.zeros_like(y).index_copy(0, good, y[good])  # only the gradients are compared below
    if grad_mask == "params":  # x / aux gradients come from every branch (dense); parameters from own rows only
        for t, ts in zip(leaves[1:3] + leaves[4:], sub[1:3] + sub[4:]):
            torch.testing.assert_close(t.grad, ts.grad, **tolerance(dtype))
        return
    _compare(y, [t.grad for t in leaves], ys, [t.grad for t in sub], {0, 3}, good, dtype)


@pytest.mark.parametrize("device,backend", device_backends("mutual_unit"))
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_mutual_unit_out_of_range_rows(device, backend, similarity):
    h = torch.randn(M, B, N, device=device)
    s, good = _scenario(device), _good(device)
    (hl,) = _leaves(h)
    out, attn = sk.mutual_unit(hl, s, similarity=similarity, return_attention=True, backend=backend,
                               check_scenario=False)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (hs,) = _leaves(h[:, good])
    outs, attns = sk.mutual_unit(hs, s[good], similarity=similarity, return_attention=True, backend=backend)
    (outs * g[good]).sum().backward()
    bad = torch.tensor(sorted(BAD), device=device)
    assert torch.equal(attn[bad], torch.zeros_like(attn[bad])) and not torch.isnan(attn).any()
    torch.testing.assert_close(attn[good], attns.to(attn.dtype), **tolerance(torch.float32))
    _compare(out, [hl.grad], outs, [hs.grad], {0}, good, torch.float32)


@pytest.mark.parametrize("device,backend", device_backends("mutual_linear"))
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mutual_linear_out_of_range_rows(device, backend, activation):
    x, w, b = torch.randn(B, K, device=device), torch.randn(M, K, N, device=device), torch.randn(M, N, device=device)
    s, good = _scenario(device), _good(device)
    leaves = _leaves(x, w, b)
    out = sk.mutual_linear(*leaves, s, activation=activation, backend=backend, check_scenario=False)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    sub = _leaves(x[good], w, b)
    outs = sk.mutual_linear(*sub, s[good], activation=activation, backend=backend)
    (outs * g[good]).sum().backward()
    _compare(out, [t.grad for t in leaves], outs, [t.grad for t in sub], {0}, good, torch.float32)
