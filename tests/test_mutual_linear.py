"""mutual_linear (fused all-branch GEMM + mutual unit) and the MutualUnit layer: every backend against the
float64 reference, gradients and the scenario stop-gradient, both backward modes, gradcheck, opcheck,
torch.compile, the no-[M, B, N]-allocation property of the fused forward, bad input."""
from __future__ import annotations

import math

import pytest
import torch

import saml_kernels
from saml_kernels.nn import MultiBranchLinear, MutualUnit

from conftest import device_backends, interp_covering, tolerance
from oracles import mbranch_oracle, mutual_linear_oracle, mutual_oracle

PAIRS = device_backends("mutual_linear")
ACTS = [None, "relu", "leaky_relu", "gelu", "silu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(M=3, B=10, K=6, N=5, Ka=0, bias=True, dtype=torch.float32, device="cpu", idx_dtype=torch.int64):
    r = lambda *shape: (torch.randn(*shape, dtype=torch.float64) / math.sqrt(shape[-2] if len(shape) > 1 else 1)  # noqa: E731
                        ).to(device=device, dtype=dtype)
    inp = dict(x=r(B, K) * math.sqrt(K), weight=r(M, K, N), bias=r(M, N) if bias else None,
               aux=r(B, Ka) * math.sqrt(Ka) if Ka else None, aux_weight=r(M, Ka, N) if Ka else None,
               scenario=torch.randint(0, M, (B,)).to(device=device, dtype=idx_dtype))
    return inp


def params(inp):
    return [k for k in ("x", "weight", "bias", "aux", "aux_weight") if inp[k] is not None]


def run(inp, backend, f64=False, **kw):
    c = (lambda t: None if t is None else t.double()) if f64 else (lambda t: t)
    args = dict(aux=c(inp["aux"]), aux_weight=c(inp["aux_weight"]), **kw)
    if backend == "oracle":
        return mutual_linear_oracle(c(inp["x"]), c(inp["weight"]), c(inp["bias"]), inp["scenario"], **args)
    return saml_kernels.mutual_linear(c(inp["x"]), c(inp["weight"]), c(inp["bias"]), inp["scenario"],
                                      backend=backend, **args)


def grads(inp, backend, g, f64=False, **kw):
    leaves = {k: (inp[k].detach().double() if f64 else inp[k].detach()).requires_grad_() for k in params(inp)}
    full = dict(inp, **leaves)
    out = run(full, backend, **kw)
    gs = torch.autograd.grad(out, list(leaves.values()), g.to(out.dtype))
    return out, dict(zip(leaves, gs))


def loose(dtype, factor=4):
    t = tolerance(dtype)
    return t if dtype in (torch.float32, torch.float64) else dict(atol=factor * t["atol"], rtol=factor * t["rtol"])


# ------------------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("device,backend,activation,similarity,dtype",
                         interp_covering(PAIRS, ACTS, ["cosine", "dot"], DTYPES))
def test_forward_matrix(device, backend, activation, similarity, dtype):
    inp = make(Ka=3, dtype=dtype, device=device)
    kw = dict(activation=activation, similarity=similarity, temperature=0.7)
    out, attn = run(inp, backend, return_attention=True, **kw)
    ro, ra = run(inp, "oracle", f64=True, return_attention=True, **kw)
    assert out.dtype == dtype and out.shape == ro.shape and attn.dtype == torch.float32
    torch.testing.assert_close(out.double(), ro, **loose(dtype, 2))
    torch.testing.assert_close(attn.double(), ra, **loose(dtype, 2))


@pytest.mark.parametrize("device,backend,Ka,bias,temperature,idx_dtype",
                         interp_covering(PAIRS, [0, 4], [False, True], [0.3, 2.0], [torch.int32, torch.int64]))
def test_aux_bias(device, backend, Ka, bias, temperature, idx_dtype):
    inp = make(Ka=Ka, bias=bias, device=device, idx_dtype=idx_dtype)
    kw = dict(activation="relu", temperature=temperature)
    torch.testing.assert_close(run(inp, backend, **kw).double(), run(inp, "oracle", f64=True, **kw),
                               **tolerance(torch.float32))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("M,B,K,N", [(1, 7, 5, 3), (2, 1, 1, 1), (4, 37, 9, 33), (3, 300, 16, 31)])
def test_shapes(device, backend, M, B, K, N):
    """Odd sizes, a single scenario (M = 1: the output is the own branch), B not a multiple of the row block."""
    inp = make(M=M, B=B, K=K, N=N, Ka=2, device=device)
    kw = dict(activation="silu", similarity="cosine")
    out = run(inp, backend, **kw)
    torch.testing.assert_close(out.double(), run(inp, "oracle", f64=True, **kw), **tolerance(torch.float32))
    if M == 1:
        h = torch.nn.functional.silu(inp["x"] @ inp["weight"][0] + inp["aux"] @ inp["aux_weight"][0] + inp["bias"][0])
        torch.testing.assert_close(out, h)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_contiguous_inputs(device, backend):
    inp = make(M=3, B=8, K=6, N=5, Ka=3, device=device)
    nc = dict(inp)
    nc["x"] = inp["x"].t().contiguous().t()
    nc["weight"] = inp["weight"].transpose(1, 2).contiguous().transpose(1, 2)
    nc["bias"] = inp["bias"].t().contiguous().t()
    nc["aux"] = torch.stack([inp["aux"], inp["aux"]], -1)[..., 0]
    nc["aux_weight"] = inp["aux_weight"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    nc["scenario"] = torch.stack([inp["scenario"], inp["scenario"]], 1)[:, 0]
    assert not any(nc[k].is_contiguous() for k in nc)
    g = torch.randn(8, 5, device=device)
    out, gr = grads(nc, backend, g, activation="relu", similarity="dot")
    ro, rg = grads(inp, "oracle", g, f64=True, activation="relu", similarity="dot")
    torch.testing.assert_close(out.double(), ro, **tolerance(torch.float32))
    for k in rg:
        torch.testing.assert_close(gr[k].double(), rg[k], atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("save", [False, True])
def test_batch_zero(device, backend, save):
    inp = make(B=0, Ka=2, device=device)
    out, g = grads(inp, backend, torch.zeros(0, 5, device=device), activation="relu", save_branch_outputs=save)
    assert out.shape == (0, 5)
    assert (g["weight"] == 0).all() and (g["bias"] == 0).all() and g["x"].shape == (0, 6)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_dead_relu_sample(device, backend, similarity):
    """A sample whose own branch is all zero after relu (cosine eps path): finite values and gradients."""
    inp = make(M=3, B=6, device=device)
    s0 = int(inp["scenario"][0])
    inp["bias"][s0] = -100.0  # branch s0 dead for every sample
    g = torch.randn(6, 5, device=device)
    for save in (False, True):
        out, gr = grads(inp, backend, g, activation="relu", similarity=similarity, save_branch_outputs=save)
        ro, rg = grads(inp, "oracle", g, f64=True, activation="relu", similarity=similarity)
        assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in gr.values())
        torch.testing.assert_close(out.double(), ro, **tolerance(torch.float32))
        for k in gr:
            torch.testing.assert_close(gr[k].double(), rg[k], rtol=1e-4, atol=1e-4 * max(1.0, float(rg[k].abs().max())))


# ------------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("device,backend,activation,similarity,save",
                         interp_covering(PAIRS, ACTS, ["cosine", "dot"], [False, True]))
def test_gradients(device, backend, activation, similarity, save):
    inp = make(M=4, B=13, Ka=3, device=device)
    g = torch.randn(13, 5, device=device)
    kw = dict(activation=activation, similarity=similarity, temperature=0.8)
    out, gr = grads(inp, backend, g, save_branch_outputs=save, **kw)
    _, rg = grads(inp, "oracle", g, f64=True, **kw)
    for k in rg:
        torch.testing.assert_close(gr[k].double(), rg[k], atol=3e-5, rtol=3e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("device,backend", [p for p in PAIRS if tuple(p.values) != ("cpu", "triton")])  # the C++ blocking;
@pytest.mark.parametrize("activation", ["relu", "gelu"])  # the Triton interpreter takes minutes at these shapes
def test_column_tiles_and_row_blocks(device, backend, activation):
    """Shapes where the CPU kernel cuts the branches into column tiles and the batch into row blocks (blocking()
    in csrc/cpu/mutual_unit.cpp: here 2 tiles of 6 branches, 4 blocks of 80 rows, the last one short): output
    and gradients against float64; rows of an out-of-range scenario (check_scenario=False) give zeros and leave
    the other rows' outputs and gradients as without them."""
    M, B, K, Ka, N = 12, 300, 48, 16, 256
    inp = make(M=M, B=B, K=K, N=N, Ka=Ka, device=device)
    g = torch.randn(B, N, device=device)
    kw = dict(activation=activation, similarity="cosine", temperature=0.8)
    out, gr = grads(inp, backend, g, **kw)
    ro, rg = grads(inp, "oracle", g, f64=True, **kw)
    torch.testing.assert_close(out.double(), ro, **tolerance(torch.float32))
    for k in rg:
        scale = max(1.0, float(rg[k].abs().max()))
        torch.testing.assert_close(gr[k].double(), rg[k], atol=1e-4 * scale, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    bad = torch.tensor([0, 81, 299], device=device)  # first row, a row of the second block, the last row
    unchecked = dict(inp, scenario=inp["scenario"].clone().index_fill_(0, bad, M))
    out_u, gr_u = grads(unchecked, backend, g, check_scenario=False, **kw)
    good = torch.ones(B, dtype=torch.bool, device=device).index_fill_(0, bad, False)
    sub = dict(inp, x=inp["x"][good], aux=inp["aux"][good], scenario=inp["scenario"][good])
    out_s, gr_s = grads(sub, backend, g[good], **kw)
    assert torch.equal(out_u[bad], torch.zeros_like(out_u[bad]))
    torch.testing.assert_close(out_u[good], out_s, **tolerance(torch.float32))
    assert torch.equal(gr_u["x"][bad], torch.zeros_like(gr_u["x"][bad]))
    for k in ("weight", "bias", "aux_weight"):
        torch.testing.assert_close(gr_u[k], gr_s[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("save", [False, True])
def test_gradients_low_precision(device, backend, dtype, save):
    inp = make(M=3, B=12, K=8, N=6, Ka=2, dtype=dtype, device=device)
    g = torch.randn(12, 6, device=device).to(dtype)
    out, gr = grads(inp, backend, g, activation="gelu", save_branch_outputs=save)
    _, rg = grads(inp, "oracle", g, f64=True, activation="gelu")
    for k in rg:
        scale = max(1.0, float(rg[k].abs().max()))
        torch.testing.assert_close(gr[k].double(), rg[k], atol=loose(dtype)["atol"] * scale, rtol=loose(dtype)["rtol"])


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("save", [False, True])
def test_stop_gradient(device, backend, save):
    """Branch m's parameters get exactly zero gradient from samples of other scenarios; x only via its own branch."""
    M = 3
    inp = make(M=M, B=12, Ka=2, device=device)
    inp["scenario"] = torch.arange(12, device=device) % M
    for m in range(M):
        g = torch.randn(12, 5, device=device)
        g[inp["scenario"] == m] = 0  # the loss sees only samples of other scenarios
        _, gr = grads(inp, backend, g, activation="relu", save_branch_outputs=save)
        assert (gr["weight"][m] == 0).all() and (gr["bias"][m] == 0).all() and (gr["aux_weight"][m] == 0).all()
        assert (gr["x"][inp["scenario"] == m] == 0).all()
        others = [k for k in range(M) if k != m]
        assert (gr["weight"][others] != 0).any()


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("save", [False, True])
def test_gradcheck_single_branch(device, backend, save):
    """M = 1: no other branch, so the stop-gradient is void and torch's gradcheck applies to every input."""
    inp = make(M=1, B=4, K=3, N=3, Ka=2, dtype=torch.float64, device=device)
    names = params(inp)

    def fn(*ts):
        return run(dict(inp, **dict(zip(names, ts))), backend, activation="silu", similarity="cosine",
                   temperature=0.9, save_branch_outputs=save)

    leaves = [inp[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_gradcheck_stop_gradient(device, backend, save, similarity):
    """M = 3, float64: directional finite differences of the frozen-others function F(theta) (own branch from
    theta, other branches from theta_0: the stop-gradient semantics) against the op's analytic gradient."""
    inp = make(M=3, B=5, K=4, N=3, Ka=2, dtype=torch.float64, device=device)
    names = params(inp)
    kw = dict(activation="gelu", temperature=0.7)
    B, M = 5, 3
    own = (torch.arange(M, device=device).view(M, 1) == inp["scenario"].view(1, B)).unsqueeze(-1)

    def h_of(p):
        return mbranch_oracle(p["x"], p["weight"], p["bias"], inp["scenario"], route="all",
                              grad_mask="none", aux=p["aux"], aux_weight=p["aux_weight"],
                              activation=kw["activation"])

    h0 = h_of(inp)

    def frozen(p):
        return mutual_oracle(torch.where(own, h_of(p), h0), inp["scenario"], similarity=similarity,
                             temperature=kw["temperature"])

    g = torch.randn(B, 3, dtype=torch.float64, device=device)
    _, analytic = grads(inp, backend, g, similarity=similarity, save_branch_outputs=save, **kw)
    for _ in range(4):
        v = {k: torch.randn_like(inp[k]) for k in names}
        eps = 1e-6
        plus = frozen(dict(inp, **{k: inp[k] + eps * v[k] for k in names}))
        minus = frozen(dict(inp, **{k: inp[k] - eps * v[k] for k in names}))
        numeric = float(((plus - minus) * g).sum()) / (2 * eps)
        exact = sum(float((analytic[k] * v[k]).sum()) for k in names)
        assert abs(numeric - exact) <= 1e-6 * max(1.0, abs(exact)), (numeric, exact)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("save", [False, True])
def test_opcheck(device, backend, save):
    inp = make(M=3, B=5, K=4, N=3, Ka=2, device=device)
    ts = [inp[k].clone().requires_grad_() for k in ("x", "weight", "bias", "aux", "aux_weight")]
    args = (*ts, inp["scenario"], 3, 0.7, 0, save, True, backend)
    torch.library.opcheck(torch.ops.saml_kernels.mutual_linear.default, args)
    out, attn, sh, sz = torch.ops.saml_kernels.mutual_linear(*args)
    bargs = (torch.randn_like(out), *[t.detach() for t in ts], inp["scenario"], attn.detach(), sh.detach(),
             sz.detach(), 3, 0.7, 0, save, True, True, True, True, True, backend)
    torch.library.opcheck(torch.ops.saml_kernels.mutual_linear_backward.default, bargs)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("save", [False, True])
def test_torch_compile_fullgraph(device, backend, save):
    torch._dynamo.reset()
    torch.manual_seed(1)
    eager = MutualUnit(6, 5, 3, aux_features=2, activation="gelu", backend=backend, save_branch_outputs=save,
                       device=device)
    comp = MutualUnit(6, 5, 3, aux_features=2, activation="gelu", backend=backend, save_branch_outputs=save,
                      device=device)
    comp.load_state_dict(eager.state_dict())
    inp = make(M=3, B=7, K=6, N=5, Ka=2, device=device)
    cf = torch.compile(comp, fullgraph=True, backend="aot_eager")
    ye, yc = eager(inp["x"], inp["scenario"], inp["aux"]), cf(inp["x"], inp["scenario"], inp["aux"])
    torch.testing.assert_close(yc, ye)
    ye.pow(2).sum().backward()
    yc.pow(2).sum().backward()
    for (n, p), q in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("save", [False, True])
def test_torch_compile_inductor(save):
    """The default (inductor) compiler on the automatic backend, forward + backward (~20 s of compiling)."""
    torch._dynamo.reset()
    m = MutualUnit(8, 6, 3, aux_features=2, activation="gelu", save_branch_outputs=save)
    c = torch.compile(m, fullgraph=True)
    inp = make(M=3, B=10, K=8, N=6, Ka=2)
    ye, yc = m(inp["x"], inp["scenario"], inp["aux"]), c(inp["x"], inp["scenario"], inp["aux"])
    torch.testing.assert_close(yc, ye)
    ge = torch.autograd.grad(ye.sum(), list(m.parameters()))
    gc = torch.autograd.grad(yc.sum(), list(m.parameters()))
    for p, q in zip(ge, gc):
        torch.testing.assert_close(q, p)


# ------------------------------------------------------------------------------------------------ memory

def _largest_cpu_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) made while ``fn`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert sizes, "the profiler recorded no allocation: the check would be vacuous"
    return max(sizes)


@pytest.mark.parametrize("backend", [b.values[1] for b in PAIRS if b.values[1] in ("cpu", "reference")])
def test_fused_forward_allocates_no_branch_outputs(backend):
    """The fused forward never allocates an [M, B, N] tensor (only row-block scratch); the unfused composition
    (and save_branch_outputs=True) does, which shows the check can fail."""
    M, B, K, N = 4, 2048, 64, 128
    inp = make(M=M, B=B, K=K, N=N, device="cpu")
    full = M * B * N * 4
    kw = dict(activation="relu", temperature=0.5)
    with torch.no_grad():
        unfused = _largest_cpu_allocation(lambda: run(inp, "oracle", **kw))
        saved = _largest_cpu_allocation(lambda: run(inp, backend, save_branch_outputs=True, **kw))
        fused = _largest_cpu_allocation(lambda: run(inp, backend, **kw))
    assert unfused >= full and saved >= full  # the detector sees [M, B, N] tensors when they exist
    if backend == "cpu":
        assert fused < full // 2, f"fused forward allocated {fused} bytes; [M, B, N] is {full}"


# ------------------------------------------------------------------------------------------------ layer

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("Ka,bias", [(0, True), (3, False)])
def test_layer_matches_multibranch_plus_mutual(device, backend, Ka, bias):
    torch.manual_seed(3)
    layer = MutualUnit(6, 5, 3, aux_features=Ka, activation="silu", temperature=0.5, similarity="dot", bias=bias,
                       device=device, backend=backend)
    mbl = MultiBranchLinear(6, 5, 3, aux_features=Ka, bias=bias, activation="silu", route="all", grad_mask="own",
                            device=device)
    assert list(layer.state_dict()) == list(mbl.state_dict())
    assert [p.shape for p in layer.parameters()] == [p.shape for p in mbl.parameters()]
    mbl.load_state_dict(layer.state_dict())
    inp = make(M=3, B=9, K=6, N=5, Ka=Ka, device=device)
    y = layer(inp["x"], inp["scenario"], inp["aux"])
    h = mbl(inp["x"], inp["scenario"], inp["aux"])
    yr = saml_kernels.mutual_unit(h, inp["scenario"], temperature=0.5, similarity="dot")
    torch.testing.assert_close(y, yr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    for (n, p), q in zip(layer.named_parameters(), mbl.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{n}: {m}")


def test_layer_init_and_factory():
    torch.manual_seed(0)
    layer = MutualUnit(40, 30, 4, aux_features=24, dtype=torch.float64)
    bound = 1 / math.sqrt(64)
    for p in layer.parameters():
        assert p.dtype == torch.float64 and p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert layer.weight.shape == (4, 40, 30) and layer.bias.shape == (4, 30) and layer.aux_weight.shape == (4, 24, 30)
    assert "temperature=1.0" in repr(layer)
    with pytest.raises(ValueError, match="activation"):
        MutualUnit(4, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="temperature"):
        MutualUnit(4, 4, 2, temperature=0)
    with pytest.raises(ValueError, match="similarity"):
        MutualUnit(4, 4, 2, similarity="l2")
    with pytest.raises(ValueError, match="aux must be given"):
        MutualUnit(4, 4, 2, aux_features=2)(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("device,backend", PAIRS)
def test_bad_input(device, backend):
    inp = make(M=3, B=4, Ka=2, device=device)

    def f(**kw):
        a = dict(inp, **{k: kw.pop(k) for k in list(kw) if k in inp})
        return saml_kernels.mutual_linear(a["x"], a["weight"], a["bias"], a["scenario"], aux=a["aux"],
                                          aux_weight=a["aux_weight"], backend=backend, **kw)

    with pytest.raises(ValueError, match="x must be \\[B, K\\]"):
        f(x=inp["x"].expand(3, 4, 6))
    with pytest.raises(ValueError, match="x has 5 features"):
        f(x=inp["x"][:, :5])
    with pytest.raises(TypeError, match="weight dtype"):
        f(weight=inp["weight"].double())
    with pytest.raises(TypeError, match="scenario must have dtype"):
        f(scenario=inp["scenario"].float())
    with pytest.raises(ValueError, match="bias must be"):
        f(bias=inp["bias"][:2])
    with pytest.raises(ValueError, match="aux and aux_weight"):
        f(aux=None)
    bad = inp["scenario"].clone()
    bad[1] = 5
    with pytest.raises(IndexError, match=r"scenario\[1\] = 5 is out of range \[0, 3\)"):
        f(scenario=bad)
    for t in (0, -2.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            f(temperature=t)
    with pytest.raises(ValueError, match="similarity"):
        f(similarity="cos")
    with pytest.raises(ValueError, match="activation"):
        f(activation="tanh")
    with pytest.raises(TypeError, match="save_branch_outputs"):
        f(save_branch_outputs=1)
    with pytest.raises(ValueError, match="on meta"):
        f(bias=inp["bias"].to("meta"))
