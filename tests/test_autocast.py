"""torch.autocast through every layer and the full SAML (saml_kernels/ops/_autocast.py): under autocast each
layer stays within bf16/fp16 tolerance of the same float32 module without autocast, outputs come out in the
documented dtypes, gradients reach the parameters in the parameters' dtype, and each op casts its inputs at most
once (never to float64). The CUDA cases are parametrised and skip without a GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import saml_kernels as sk
from conftest import device_backends
from saml_kernels.data import make_synthetic
from saml_kernels.nn import SAML, MultiBranchLinear, MutualUnit, SAMLConfig, ScenarioAttention, ScenarioEmbedding
from saml_kernels.ops import _autocast
from saml_kernels.reference import SAMLReference

CASES = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
         pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
         pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu)]
M, B = 3, 37
TOL = dict(atol=6e-2, rtol=6e-2)
GRAD_TOL = 5e-2


def _backends(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return [p.values[1] for p in device_backends("mbranch_linear") if p.values[0] == device
            and not (p.values[1] == "triton" and device == "cpu")]


def _autocast_errors(module, device, dtype, inputs, out_dtypes=None):
    """Runs ``module`` in float32 and under autocast on the same inputs. Checks the outputs (close, of
    ``out_dtypes``) and that every parameter gradient has the parameter's dtype; returns {parameter: relative
    norm error of its gradient} (an element whose relu flips between the two runs may differ by its full size,
    so gradients are compared by norm)."""
    def run(enabled):
        module.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            out = module(*inputs)
            out = out if isinstance(out, tuple) else (out,)
            loss = sum(o.float().sum() * (k + 1) for k, o in enumerate(out))
        loss.backward()
        return out, {n: p.grad.clone() for n, p in module.named_parameters()}

    ref, ref_grads = run(False)
    out, grads = run(True)
    if out_dtypes is not None:
        assert [o.dtype for o in out] == out_dtypes
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.float(), r, **TOL)
    for n, p in module.named_parameters():
        assert grads[n].dtype == p.dtype, n
    return {n: float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-6)) for n in grads}


def _compare(module, device, dtype, make_inputs, out_dtypes):
    errors = _autocast_errors(module, device, dtype, make_inputs(), out_dtypes)
    assert max(errors.values()) < GRAD_TOL, errors


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("route", ["own", "all"])
def test_multi_branch_linear(device, dtype, route):
    for backend in _backends(device):
        layer = MultiBranchLinear(24, 16, M, aux_features=9, activation="gelu", route=route, backend=backend,
                                  device=device)
        x, aux = torch.randn(B, 24, device=device), torch.randn(B, 9, device=device)
        s = torch.randint(0, M, (B,), device=device)
        _compare(layer, device, dtype, lambda: (x, s, aux), [dtype])


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("save", [False, True])
def test_mutual_unit_layer(device, dtype, save):
    for backend in _backends(device):
        layer = MutualUnit(24, 16, M, aux_features=9, activation="gelu", save_branch_outputs=save, backend=backend, device=device)
        x, aux = torch.randn(B, 24, device=device), torch.randn(B, 9, device=device)
        s = torch.randint(0, M, (B,), device=device)
        _compare(layer, device, dtype, lambda: (x, s, aux), [dtype])


@pytest.mark.parametrize("device, dtype", CASES)
def test_scenario_embedding_keeps_table_dtype(device, dtype):
    for backend in _backends(device):
        layer = ScenarioEmbedding([("user", 50, True, "sum"), ("tag", 30, False, "mean")], M, 8, backend=backend,
                                  device=device)
        lengths = torch.randint(0, 4, (2 * B,))
        idx = torch.cat([torch.randint(0, 50, (int(lengths[:B].sum()),)),
                         torch.randint(0, 30, (int(lengths[B:].sum()),))]).to(device)
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
        s = torch.randint(0, M, (B,), device=device)
        _compare(layer, device, dtype, lambda: (idx, off, s), [torch.float32, torch.float32])


@pytest.mark.parametrize("device, dtype", CASES)
def test_scenario_attention(device, dtype):
    for backend in _backends(device):
        layer = ScenarioAttention(8, 4, M, backend=backend, device=device)
        L = 5
        t_g, t_s = torch.randn(B, 8, device=device), torch.randn(B, 8, device=device)
        s_g, s_s = torch.randn(B, L, 8, device=device), torch.randn(B, L, 8, device=device)
        lengths = torch.randint(0, L + 1, (B,), device=device)
        s = torch.randint(0, M, (B,), device=device)
        _compare(layer, device, dtype, lambda: (t_g, t_s, s_g, s_s, lengths, s), [dtype, dtype])


def _data():
    return make_synthetic(300, num_users=60, num_items=80, num_categories=7, num_contexts=5, num_segments=6,
                          num_tags=11, seq_len=6, seed=5)


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("mutual", [(0,), (1,), ()], ids=lambda m: "mutual" + "".join(map(str, m)))
def test_saml_model(device, dtype, mutual):
    d = _data()
    cfg = SAMLConfig.from_data(d, embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6),
                               mutual_layers=mutual, dropout=0.0)
    for backend in _backends(device):
        # plain gradients (not the default fused optimizer): the test compares every parameter's gradient
        model = SAML(cfg, backend=backend, embedding_optimizer=None, device=device)
        twin = SAMLReference(cfg, embedding_optimizer=None, device=device)
        twin.load_state_dict(model.state_dict())
        batch = d.batch(np.arange(64)).to(device)
        ours = _autocast_errors(model, device, dtype, batch.inputs(), [dtype, dtype])
        # relu flips through the MLPs make some table gradients move by up to ~20 % under bf16 in plain
        # PyTorch too: the bound is what the plain-PyTorch twin gets under the same autocast
        plain = _autocast_errors(twin, device, dtype, batch.inputs())
        for name, err in ours.items():
            assert err < max(GRAD_TOL, 1.5 * plain[name] + 0.01), (name, err, plain[name])
        with torch.autocast(device, dtype=dtype):  # the BCE loss is computed in float32 by autocast
            loss = model.loss(batch)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


class _CastCounter(TorchDispatchMode):
    """Counts dtype conversions (``aten._to_copy``) dispatched below autocast, by target dtype."""

    def __init__(self):
        super().__init__()
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and "dtype" in kwargs:
            self.casts.append(kwargs["dtype"])
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_each_input_cast_once_and_never_to_float64(backend):
    if backend not in sk.available_backends("cpu", "mbranch_linear"):
        pytest.skip(f"{backend} not built")
    x, w, b = torch.randn(B, 6), torch.randn(M, 6, 5), torch.randn(M, 5)
    aux, wa = torch.randn(B, 4), torch.randn(M, 4, 5)
    s = torch.randint(0, M, (B,))
    with torch.autocast("cpu", dtype=torch.bfloat16), _CastCounter() as counter:
        y = sk.mbranch_linear(x, w, b, s, route="all", activation="relu", aux=aux, aux_weight=wa, backend=backend)
    assert y.dtype == torch.bfloat16
    assert counter.casts == [torch.bfloat16] * 5  # x, weight, bias, aux, aux_weight: one cast each, in front
    low = [t.to(torch.bfloat16) for t in (x, w, b, aux, wa)]
    with torch.autocast("cpu", dtype=torch.bfloat16), _CastCounter() as counter:
        out = sk.mutual_linear(low[0], low[1], low[2], s, activation="relu", aux=low[3], aux_weight=low[4],
                               backend=backend)
        h = sk.mutual_unit(y, s, backend=backend)
    assert counter.casts == [] and out.dtype == h.dtype == torch.bfloat16  # already in the autocast dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left alone, as torch's autocast does
        y64 = sk.mbranch_linear(x.double(), w.double(), b.double(), s, backend=backend)
    assert y64.dtype == torch.float64


def test_policy_covers_every_custom_op():
    ours = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("saml_kernels::")}
    assert ours == set(_autocast.POLICY)
    assert {p for p in _autocast.POLICY.values()} <= {"cast", "promote", "keep"}
    assert {n for n, p in _autocast.POLICY.items() if p == "promote"} == set(_autocast.PROMOTED)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_partitioned_norm_promotes_under_autocast(backend, low):
    """A 16-bit x (an autocast GEMM's output) with float32 parameters: normalised in float32, equal to the float32
    call on the same x; gradients in each tensor's own dtype. All-16-bit and all-float32 calls are not cast."""
    if backend not in sk.available_backends("cpu", "partitioned_norm"):
        pytest.skip(f"{backend} not built")
    from saml_kernels.nn import PartitionedNorm

    torch.manual_seed(0)
    norm = PartitionedNorm(6, M, backend=backend)
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(B, 6).to(low).requires_grad_()
    s = torch.randint(0, M, (B,))
    x_full = x.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16), _CastCounter() as base:
        norm(x_full, s)  # the casts of an all-float32 call (the running statistics' count -> float)
    with torch.autocast("cpu", dtype=torch.bfloat16), _CastCounter() as counter:
        y = norm(x, s)
    assert y.dtype == torch.float32 and counter.casts == base.casts + [torch.float32]  # x, once
    norm.reset_running_stats()
    y.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in norm.named_parameters()}
    assert x.grad.dtype == low and all(g.dtype == torch.float32 for g in grads.values())
    norm.zero_grad()
    x32 = x.detach().float().requires_grad_()
    y32 = norm(x32, s)
    y32.pow(2).sum().backward()
    torch.testing.assert_close(y, y32, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, x32.grad.to(low), atol=0, rtol=0)
    for n, p in norm.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=0, rtol=0, msg=n)
    low_norm = PartitionedNorm(6, M, backend=backend, dtype=low)
    with torch.autocast("cpu", dtype=torch.bfloat16), _CastCounter() as counter:
        assert low_norm(x.detach(), s).dtype == low and counter.casts == base.casts  # nothing cast
    with pytest.raises(TypeError, match="weight dtype torch.float32 differs from x dtype"):
        norm(x.detach(), s)  # without autocast the dtypes must agree


def test_star_under_autocast_runs_partitioned_norm_on_bf16_activations():
    """STAR with bfloat16 tables (and so a bfloat16 x_0 when only the attention's autocast output and the tables
    meet) under CPU autocast: partitioned_norm's dtype check must accept the promoted dtypes."""
    from saml_kernels.nn import STAR, STARConfig

    d = _data()
    cfg = STARConfig.from_data(d, embedding_dim=8, attention_dim=4, hidden=(12, 6), aux_dim=3, aux_hidden=5)
    model = STAR(cfg, embedding_dtype=torch.bfloat16)
    batch = d.batch(np.arange(40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or p.grad.dtype == p.dtype for p in model.parameters())


def test_mixed_dtypes_still_rejected_without_autocast():
    x, w = torch.randn(4, 3), torch.randn(2, 3, 5, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="weight dtype torch.bfloat16 differs from x dtype torch.float32"):
        sk.mbranch_linear(x, w, None, torch.zeros(4, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="differs from x dtype"):
        sk.mbranch_linear(x.double(), w, None, torch.zeros(4, dtype=torch.long))  # float64 is never cast
