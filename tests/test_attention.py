"""nn.ScenarioAttention against the plain-PyTorch RefScenarioAttention: values, gradients, masking, all-padding."""
from __future__ import annotations

import pytest
import torch

from conftest import device_backends
from saml_kernels.nn import ScenarioAttention
from saml_kernels.reference.attention import RefScenarioAttention, masked_attention

M, D, d = 3, 8, 5


def _pair(device, backend, dtype=torch.float32):
    ref = RefScenarioAttention(D, d, M, device=device, dtype=dtype)
    fast = ScenarioAttention(D, d, M, backend=backend, device=device, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def _inputs(B, L, device, dtype=torch.float32, lengths=None):
    g = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    if lengths is None:
        lengths = torch.randint(0, L + 1, (B,), device=device)
    scen = torch.randint(0, M, (B,), device=device)
    return g(B, D), g(B, D), g(B, L, D), g(B, L, D), lengths, scen


def test_parameter_names_match_reference():
    fast, ref = _pair("cpu", None)
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert set(dict(fast.named_parameters())) == {"global_query.weight", "global_key.weight", "value.weight",
                                                  "local_query.weight", "local_key.weight"}


@pytest.mark.parametrize("device, backend", device_backends("mbranch_linear"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_reference(device, backend, dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("triton kernels take float32/16/bf16")
    fast, ref = _pair(device, backend, dtype)
    B, L = 13, 6
    inp = _inputs(B, L, device, dtype)
    inp[4][0] = 0  # at least one all-padding sequence
    inp[4][1] = L
    out_f = fast(*inp)
    grads_f = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out_f, (1.0, -0.7))),
                                  [*inp[:4], *fast.parameters()])
    out_r = ref(*inp)
    grads_r = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out_r, (1.0, -0.7))),
                                  [*inp[:4], *ref.parameters()])
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    for a, b in zip(out_f, out_r):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(grads_f, grads_r):
        torch.testing.assert_close(a, b, **tol)
    assert out_f[0].shape == (B, D) and out_f[1].shape == (B, D)


@pytest.mark.parametrize("device, backend", device_backends("mbranch_linear"))
def test_padding_is_ignored_and_all_padding_gives_zeros(device, backend):
    fast, _ = _pair(device, backend)
    B, L = 7, 5
    lengths = torch.tensor([0, 1, 5, 3, 0, 2, 4], device=device)
    tg, ts, sg, ss, _, scen = _inputs(B, L, device, lengths=lengths)
    out = fast(tg, ts, sg, ss, lengths, scen)
    # change every padded position: outputs must not move
    pad = (torch.arange(L, device=device)[None] >= lengths[:, None]).unsqueeze(-1)
    sg2 = torch.where(pad, torch.randn_like(sg) * 1e3, sg)
    ss2 = torch.where(pad, torch.full_like(ss, float("nan")), ss)  # even NaN padding must not leak
    out2 = fast(tg, ts, sg2, ss2, lengths, scen)
    for a, b in zip(out, out2):
        torch.testing.assert_close(a, b)
    empty = lengths == 0
    for o in out:
        assert torch.isfinite(o).all()
        assert (o[empty] == 0).all()
    (out[0].sum() + out[1].sum()).backward()
    for t in (tg, ts, sg, ss):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[empty] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())


def test_masked_attention_edges():
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, -1e30, 7.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, True]])
    w = masked_attention(scores, mask)
    torch.testing.assert_close(w[0], torch.cat([torch.softmax(torch.tensor([1.0, 2.0]), 0), torch.zeros(1)]))
    assert (w[1] == 0).all() and torch.isfinite(w).all()
    torch.testing.assert_close(w[2], torch.tensor([0.5, 0.0, 0.5]))


def test_zero_batch_and_bad_shapes():
    fast, _ = _pair("cpu", None)
    out = fast(*_inputs(0, 4, "cpu"))
    assert out[0].shape == (0, D) and out[1].shape == (0, D)
    tg, ts, sg, ss, ln, sc = _inputs(4, 3, "cpu")
    with pytest.raises(ValueError, match="seq_g and seq_s"):
        fast(tg, ts, sg, ss[:, :2], ln, sc)
    with pytest.raises(ValueError, match="target_s"):
        fast(tg, ts[:3], sg, ss, ln, sc)
    with pytest.raises(ValueError, match="seq_lengths"):
        fast(tg, ts, sg, ss, ln.float(), sc)
    with pytest.raises(ValueError, match="attention_dim"):
        ScenarioAttention(D, 0, M)


# ------------------------------------------------------------------------------------------------ seq_lengths

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
