"""partitioned_norm (STAR's scenario-wise batch norm): every backend against the float64 oracle, the 0- and 1-row
scenarios, running statistics, eval, autograd (gradcheck, opcheck, torch.compile) and bad input."""
from __future__ import annotations

import pytest
import torch

import saml_kernels
from saml_kernels.nn import PartitionedNorm
from saml_kernels.reference.star_layers import RefPartitionedNorm

from conftest import device_backends, tolerance
from oracles import partitioned_norm_oracle

PAIRS = device_backends("partitioned_norm")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make(B=37, N=11, M=4, dtype=torch.float32, device="cpu", idx_dtype=torch.int64, offset=1.0):
    """Inputs with scenario 0 empty and scenario 2 holding exactly one row (when M >= 3, B >= 6)."""
    x = (torch.randn(B, N, dtype=torch.float64) * 3 + offset).to(dtype).to(device)
    s = torch.randint(0, M, (B,))
    if M >= 3 and B >= 6:
        s[s == 0] = 1
        s[s == 2] = 1
        s[5] = 2
    s = s.to(idx_dtype).to(device)
    params = [torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64),
              torch.randn(M, N, dtype=torch.float64), torch.randn(M, N, dtype=torch.float64)]
    return x, s, [p.to(dtype).to(device) for p in params]


def stats(M, N, device, dtype=torch.float32):
    return torch.randn(M, N, device=device).to(dtype), (torch.rand(M, N, device=device) + 0.5).to(dtype)


def run_pair(x, s, params, backend, training=True, with_stats=True, momentum=0.1):
    """(y, grads, running stats) of the op and of the float64 oracle on the same inputs."""
    M, N = params[2].shape
    rm, rv = stats(M, N, x.device)
    out = []
    for fn, cast in ((lambda *a, **k: saml_kernels.partitioned_norm(*a, backend=backend, **k), lambda t: t),
                     (partitioned_norm_oracle, lambda t: t.double())):
        ins = [cast(t).detach().clone().requires_grad_() for t in [x] + params]
        r = (rm.clone(), rv.clone()) if with_stats else (None, None)
        y = fn(ins[0], s, *ins[1:], running_mean=r[0], running_var=r[1], training=training, momentum=momentum)
        g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(y.device)
        (y.double() * g).sum().backward()
        out.append((y, [t.grad for t in ins], r))
    return out


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_float64_oracle(device, backend, dtype, training):
    x, s, params = make(dtype=dtype, device=device)
    (y, grads, (rm, rv)), (yr, gr, (rmr, rvr)) = run_pair(x, s, params, backend, training=training)
    tol = tolerance(dtype)
    scale = 1 if dtype in (torch.float32, torch.float64) else 4
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), yr, atol=tol["atol"] * 10 * scale, rtol=tol["rtol"] * 10 * scale)
    for name, a, b in zip(("x", "weight", "bias", "scenario_weight", "scenario_bias"), grads, gr):
        torch.testing.assert_close(a.double(), b, atol=tol["atol"] * 50 * scale, rtol=tol["rtol"] * 50 * scale,
                                   msg=lambda m, n=name: f"grad {n}: {m}")
    torch.testing.assert_close(rm, rmr.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv, rvr.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_zero_and_one_row_scenarios(device, backend):
    """Scenario 0 has no row, scenario 2 one row: its output is the shift beta + beta_2, its dx 0; the running
    statistics of scenario 0 stay, of scenario 2 only the mean moves (no unbiased variance from one row)."""
    x, s, (w, b, sw, sb) = make(device=device, dtype=torch.float64)
    M, N = sw.shape
    rm, rv = stats(M, N, device, torch.float64)
    rm0, rv0 = rm.clone(), rv.clone()
    xg = x.clone().requires_grad_()
    y = saml_kernels.partitioned_norm(xg, s, w, b, sw, sb, running_mean=rm, running_var=rv, momentum=0.25,
                                      backend=backend)
    torch.testing.assert_close(y[5], b + sb[2])
    y.pow(2).sum().backward()
    assert torch.all(xg.grad[5] == 0)
    torch.testing.assert_close(rm[0], rm0[0], rtol=0, atol=0)
    torch.testing.assert_close(rv[0], rv0[0], rtol=0, atol=0)
    torch.testing.assert_close(rm[2], 0.75 * rm0[2] + 0.25 * x[5])
    torch.testing.assert_close(rv[2], rv0[2], rtol=0, atol=0)
    rows = s == 1
    n = int(rows.sum())
    torch.testing.assert_close(rv[1], 0.75 * rv0[1] + 0.25 * x[rows].var(0, unbiased=True))
    assert n >= 2


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("B,N,M", [(0, 5, 3), (1, 1, 1), (3, 130, 2), (700, 9, 5), (1100, 3, 1)])
def test_shapes_and_index_dtypes(device, backend, idx_dtype, B, N, M):
    """Empty batches, one row, N over a tile, several row blocks of the segmented sums."""
    x, s, params = make(B=B, N=N, M=M, device=device, idx_dtype=idx_dtype, offset=100.0, dtype=torch.float64)
    (y, grads, (rm, rv)), (yr, gr, (rmr, rvr)) = run_pair(x, s, params, backend)
    torch.testing.assert_close(y, yr)
    for a, b in zip(grads, gr):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(rm, rmr.float())


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_contiguous_and_unsorted(device, backend):
    x, s, params = make(B=40, N=6, device=device, dtype=torch.float64)
    xt = x.t().contiguous().t()  # column-major view
    perm = torch.randperm(40, device=device)
    y1 = saml_kernels.partitioned_norm(xt[perm], s[perm], *params, backend=backend)
    y2 = saml_kernels.partitioned_norm(x, s, *params, backend=backend)[perm]
    torch.testing.assert_close(y1, y2)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_no_running_stats_uses_batch_statistics_in_eval(device, backend):
    x, s, params = make(device=device, dtype=torch.float64)
    (y, *_), (yr, *_) = run_pair(x, s, params, backend, training=False, with_stats=False)
    torch.testing.assert_close(y, yr)
    ytrain = saml_kernels.partitioned_norm(x, s, *params, backend=backend)
    torch.testing.assert_close(y, ytrain)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_gradcheck(device, backend):
    x, s, params = make(B=12, N=3, M=3, device=device, dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in [x] + params]
    assert torch.autograd.gradcheck(lambda *t: saml_kernels.partitioned_norm(t[0], s, *t[1:], backend=backend),
                                    ins, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_opcheck(device, backend):
    from saml_kernels.ops import partitioned_norm as op

    x, s, (w, b, sw, sb) = make(B=9, N=4, M=3, device=device)
    mean, var, count = op._stats_op(x, s, 3, backend)
    torch.library.opcheck(torch.ops.saml_kernels.partitioned_norm_stats.default, (x, s, 3, backend))
    rstd = torch.rsqrt(var + 1e-5)
    scale, shift = (w * sw).requires_grad_(), (b + sb).requires_grad_()
    args = (x.clone().requires_grad_(), s, mean, rstd, scale, shift, count, True, backend)
    torch.library.opcheck(torch.ops.saml_kernels.partitioned_norm.default, args)
    bargs = (torch.randn_like(x), x, s, mean, rstd, scale.detach(), count, True, backend)
    torch.library.opcheck(torch.ops.saml_kernels.partitioned_norm_backward.default, bargs)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    x, s, params = make(B=20, N=5, device=device)
    rm, rv = stats(4, 5, device)

    def f(x, rm, rv):
        return saml_kernels.partitioned_norm(x * 2, s, *params, running_mean=rm, running_var=rv,
                                             backend=backend, check_scenario=False).pow(2).sum()

    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    rme, rve, rmc, rvc = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    ye = f(xe, rme, rve)
    yc = torch.compile(f, fullgraph=True, backend="aot_eager")(xc, rmc, rvc)
    torch.testing.assert_close(yc, ye)
    ye.backward()
    yc.backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(rmc, rme)
    torch.testing.assert_close(rvc, rve)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_deterministic(device, backend):
    x, s, params = make(B=1500, N=7, device=device)
    a = saml_kernels.partitioned_norm(x, s, *params, backend=backend)
    b = saml_kernels.partitioned_norm(x, s, *params, backend=backend)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("device,backend", PAIRS)
def test_bad_input_raises_and_modifies_nothing(device, backend):
    x, s, (w, b, sw, sb) = make(B=8, N=3, M=3, device=device)
    rm, rv = stats(3, 3, device)
    rm0, rv0 = rm.clone(), rv.clone()

    def f(**kw):
        a = dict(x=x, scenario=s, weight=w, bias=b, scenario_weight=sw, scenario_bias=sb)
        a.update({k: kw.pop(k) for k in list(kw) if k in a})
        return saml_kernels.partitioned_norm(a["x"], a["scenario"], a["weight"], a["bias"], a["scenario_weight"],
                                             a["scenario_bias"], running_mean=kw.pop("running_mean", rm),
                                             running_var=kw.pop("running_var", rv), backend=backend, **kw)

    cases = [
        (ValueError, "x must have 2", dict(x=x[0])),
        (TypeError, "x must have dtype", dict(x=x.long())),
        (TypeError, "scenario must have dtype", dict(scenario=s.float())),
        (ValueError, "scenario must have B = 8", dict(scenario=s[:5])),
        (ValueError, r"weight must be \[3\]", dict(weight=w[:2])),
        (ValueError, r"scenario_bias must be \[3, 3\]", dict(scenario_bias=sb[:, :2])),
        (TypeError, "bias dtype torch.float64 differs", dict(bias=b.double())),
        (ValueError, r"running_var must be \[3, 3\]", dict(running_var=rv[:2])),
        (ValueError, "given together", dict(running_var=None)),
        (ValueError, "momentum must be in", dict(momentum=1.5)),
        (TypeError, "momentum must be a float", dict(momentum="0.1")),
        (ValueError, "eps must be > 0", dict(eps=0.0)),
        (ValueError, "eps must be finite", dict(eps=float("nan"))),
        (ValueError, "on meta", dict(scenario=s.to("meta"))),
        (ValueError, "at least one scenario", dict(scenario_weight=sw[:0], scenario_bias=sb[:0])),
    ]
    bad = s.clone()
    bad[6] = 3
    cases.append((IndexError, r"scenario\[6\] = 3 is out of range \[0, 3\)", dict(scenario=bad)))
    bad = s.clone()
    bad[1] = -1
    cases.append((IndexError, r"scenario\[1\] = -1", dict(scenario=bad)))
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            f(**kw)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0), msg
    with pytest.raises(ValueError, match="unknown backend"):
        saml_kernels.partitioned_norm(x, s, w, b, sw, sb, backend="fortran")


# ------------------------------------------------------------------------------------------------ layer

@pytest.mark.parametrize("device,backend", PAIRS)
def test_layer_matches_twin_train_then_eval(device, backend):
    torch.manual_seed(3)
    a = PartitionedNorm(6, 3, momentum=0.3, backend=backend, device=device, dtype=torch.float64)
    r = RefPartitionedNorm(6, 3, momentum=0.3, device=device, dtype=torch.float64)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    r.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == set(r.state_dict()) == {"weight", "bias", "scenario_weight", "scenario_bias",
                                                          "running_mean", "running_var"}
    for _ in range(3):
        x, s, _ = make(B=30, N=6, M=3, device=device, dtype=torch.float64)
        torch.testing.assert_close(a(x, s), r(x, s))
    torch.testing.assert_close(a.running_mean, r.running_mean)
    torch.testing.assert_close(a.running_var, r.running_var)
    a.eval()
    r.eval()
    x, s, _ = make(B=30, N=6, M=3, device=device, dtype=torch.float64)
    torch.testing.assert_close(a(x, s), r(x, s))


def test_layer_bad_arguments():
    for kw, exc, msg in ((dict(num_features=0), ValueError, "num_features"), (dict(num_scenarios=True), TypeError,
                         "num_scenarios"), (dict(eps=-1.0), ValueError, "eps"), (dict(momentum=2), ValueError,
                         "momentum"), (dict(backend="fortran"), ValueError, "unknown backend")):
        args = dict(num_features=4, num_scenarios=2)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            PartitionedNorm(**args)


def test_cuda_backend_is_the_triton_table():
    """No CUDA C++ kernel: the cuda backend of partitioned_norm runs the Triton kernels (so backend="cuda" models work)."""
    pytest.importorskip("triton")
    from saml_kernels.ops import partitioned_norm as op

    assert op.kernels("cuda").stats is op.kernels("triton").stats
    assert "cuda" in saml_kernels._backend.registered_ops()["partitioned_norm"]
