"""mbranch_linear: every backend against the float64 reference (forward and every gradient), the kernel contract,
scenario gradient masking (exact zeros), gradcheck, opcheck, torch.compile, B = 0 and bad input."""
from __future__ import annotations

import pytest
import torch

import saml_kernels
from saml_kernels import _backend
from saml_kernels.ops import mbranch_linear as mbl_ops
from saml_kernels.ops.mbranch_linear import mbranch_linear
from saml_kernels.reference import mbranch_linear as ref

from conftest import device_backends, interp_covering, tolerance
from oracles import mbranch_oracle

BACKENDS = device_backends("mbranch_linear")
ACTS = [None, "relu", "leaky_relu", "gelu", "silu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ROUTE_MASKS = [("own", "own"), ("all", "own"), ("all", "params"), ("all", "none")]


def make_inputs(M=3, B=29, K=19, N=23, Ka=7, *, shared=True, with_aux=True, with_bias=True, dtype=torch.float32,
                device="cpu", scenario=None):
    """float64 masters rounded to ``dtype`` (so the oracle sees exactly the kernel's inputs), scaled to O(1) outputs."""
    x = torch.randn(B, K, dtype=torch.float64) if shared else torch.randn(M, B, K, dtype=torch.float64)
    w = torch.randn(M, K, N, dtype=torch.float64) / K ** 0.5
    b = torch.randn(M, N, dtype=torch.float64) if with_bias else None
    a = torch.randn(B, Ka, dtype=torch.float64) if with_aux else None
    wa = torch.randn(M, Ka, N, dtype=torch.float64) / Ka ** 0.5 if with_aux else None
    s = torch.randint(0, M, (B,)) if scenario is None else scenario
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return dict(x=cast(x), weight=cast(w), bias=cast(b), aux=cast(a), aux_weight=cast(wa), scenario=s.to(device))


def assert_close(actual, expected, dtype, what):
    """|a - e| <= atol * max(1, |e|_max) + rtol * |e|: sums over many rows scale, so atol scales with the result."""
    tol = tolerance(dtype)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double().cpu() - expected.double().cpu()).abs()
    bound = tol["atol"] * 4 * scale + tol["rtol"] * 4 * expected.double().cpu().abs()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3e} (scale {scale:.3g}, dtype {dtype})"


def run_and_compare(inp, *, backend, route, grad_mask, activation, dtype):
    names = ["x", "weight", "bias", "aux", "aux_weight"]
    leaves = {n: (inp[n].detach().clone().requires_grad_() if inp[n] is not None else None) for n in names}
    y = mbranch_linear(leaves["x"], leaves["weight"], leaves["bias"], inp["scenario"], route=route,
                       activation=activation, grad_mask=grad_mask, aux=leaves["aux"], aux_weight=leaves["aux_weight"],
                       backend=backend)
    gy = torch.randn(y.shape, dtype=torch.float64)
    present = [n for n in names if leaves[n] is not None]
    grads = torch.autograd.grad(y, [leaves[n] for n in present], gy.to(dtype).to(y.device), allow_unused=True)
    ref_leaves = {n: (inp[n].detach().cpu().double().requires_grad_() if inp[n] is not None else None) for n in names}
    y64 = mbranch_oracle(ref_leaves["x"], ref_leaves["weight"], ref_leaves["bias"], inp["scenario"].cpu(),
                         route=route, activation=activation, grad_mask=grad_mask, aux=ref_leaves["aux"],
                         aux_weight=ref_leaves["aux_weight"])
    g64 = torch.autograd.grad(y64, [ref_leaves[n] for n in present], gy.to(dtype).double(), allow_unused=True)
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    for n, g, e in zip(present, grads, g64):
        e = torch.zeros_like(ref_leaves[n]) if e is None else e
        assert g is not None, f"grad {n} missing"
        assert g.dtype == dtype
        assert_close(g, e, dtype, f"grad {n}")


@pytest.mark.parametrize("device,backend,route,grad_mask,activation,dtype",
                         interp_covering(BACKENDS, ROUTE_MASKS, ACTS, DTYPES))
def test_matches_reference(device, backend, route, grad_mask, activation, dtype):
    inp = make_inputs(dtype=dtype, device=device)
    run_and_compare(inp, backend=backend, route=route, grad_mask=grad_mask, activation=activation, dtype=dtype)


@pytest.mark.parametrize("device,backend,route,grad_mask,shared,with_aux,with_bias",
                         interp_covering(BACKENDS, ROUTE_MASKS, [True, False], [True, False], [True, False]))
def test_variants(device, backend, route, grad_mask, shared, with_aux, with_bias):
    inp = make_inputs(M=4, B=33, K=5, N=9, Ka=3, shared=shared, with_aux=with_aux, with_bias=with_bias, device=device)
    run_and_compare(inp, backend=backend, route=route, grad_mask=grad_mask, activation="silu", dtype=torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("route,grad_mask", ROUTE_MASKS)
@pytest.mark.parametrize("case", ["single_scenario", "sorted", "missing_scenarios", "one_row", "int32"])
def test_scenario_patterns(device, backend, route, grad_mask, case):
    M, B = 5, 17
    s = {"single_scenario": torch.full((B,), 3), "sorted": torch.randint(0, M, (B,)).sort().values,
         "missing_scenarios": torch.randint(0, 2, (B,)) * 4, "one_row": torch.tensor([2]),
         "int32": torch.randint(0, M, (B,), dtype=torch.int32)}[case]
    inp = make_inputs(M=M, B=s.numel(), K=6, N=7, Ka=2, device=device, scenario=s)
    run_and_compare(inp, backend=backend, route=route, grad_mask=grad_mask, activation="relu", dtype=torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("route,grad_mask", ROUTE_MASKS)
def test_non_contiguous_inputs(device, backend, route, grad_mask):
    M, B, K, N, Ka = 3, 21, 8, 10, 4
    inp = make_inputs(M=M, B=B, K=K, N=N, Ka=Ka, device=device)
    inp["x"] = inp["x"].t().contiguous().t()                                     # column-major [B, K]
    inp["weight"] = inp["weight"].transpose(1, 2).contiguous().transpose(1, 2)    # [M, K, N] with N-major strides
    inp["bias"] = torch.randn(N, M, device=device).t()                             # transposed [M, N]
    inp["aux"] = torch.randn(B, 2 * Ka, device=device)[:, ::2]                     # strided columns
    inp["aux_weight"] = torch.randn(Ka, M, N, device=device).permute(1, 0, 2) / Ka ** 0.5
    for n in ("x", "weight", "bias", "aux", "aux_weight"):
        assert not inp[n].is_contiguous(), n
    run_and_compare(inp, backend=backend, route=route, grad_mask=grad_mask, activation="gelu", dtype=torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("route,grad_mask", ROUTE_MASKS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "branch_x"])
def test_empty_batch(device, backend, route, grad_mask, shared):
    M, K, N, Ka = 3, 4, 5, 2
    inp = make_inputs(M=M, B=0, K=K, N=N, Ka=Ka, shared=shared, device=device, scenario=torch.zeros(0, dtype=torch.long))
    leaves = [inp[n].requires_grad_() for n in ("x", "weight", "bias", "aux", "aux_weight")]
    y = mbranch_linear(*leaves[:3], inp["scenario"], route=route, grad_mask=grad_mask, activation="gelu",
                       aux=leaves[3], aux_weight=leaves[4], backend=backend)
    assert y.shape == ((0, N) if route == "own" else (M, 0, N))
    y.sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


# Scenario sizes that give the CPU kernel several row tiles per scenario, several backward chunks per scenario
# (partial weight-gradient sums added in chunk order) and the cap on chunks per scenario, next to a one-row and an
# empty scenario; rows in random order.
MANY_TILE_COUNTS = (9000, 700, 1, 0)
# The Triton kernels have no chunks; under the interpreter their row tile is 16 (triton/mbranch_linear.py
# _INTERP_MM), so these counts give the same paths (several tiles per scenario, a partial last tile, a one-row and
# an empty scenario) at 1/80 of the rows: the 9701-row case cost ~30 s of CPU per case there.
INTERP_TILE_COUNTS = (5 * 16 + 3, 2 * 16 + 5, 1, 0)


def many_tile_scenario(counts=MANY_TILE_COUNTS):
    s = torch.cat([torch.full((c,), m) for m, c in enumerate(counts)])
    return s[torch.randperm(s.numel())]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("route,grad_mask", [("own", "own"), ("all", "own"), ("all", "params")])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_many_tiles_and_chunks(device, backend, route, grad_mask, activation):
    counts = INTERP_TILE_COUNTS if (device, backend) == ("cpu", "triton") else MANY_TILE_COUNTS
    inp = make_inputs(M=len(counts), B=sum(counts), K=9, N=7, Ka=3, device=device,
                      scenario=many_tile_scenario(counts))
    run_and_compare(inp, backend=backend, route=route, grad_mask=grad_mask, activation=activation,
                    dtype=torch.float32)


@pytest.mark.parametrize("route,grad_mask", [("own", "own"), ("all", "own")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_results_bitwise_identical_for_any_thread_count(route, grad_mask, dtype):
    """Tiles, chunks and every sum's order depend only on the scenario counts, never on the thread split."""
    if "cpu" not in _backend.available_backends("cpu", "mbranch_linear"):
        pytest.skip("CPU kernels not built")
    inp = make_inputs(M=len(MANY_TILE_COUNTS), B=sum(MANY_TILE_COUNTS), K=9, N=7, Ka=3, dtype=dtype,
                      scenario=many_tile_scenario())
    names = ["x", "weight", "bias", "aux", "aux_weight"]
    gy = torch.randn((inp["x"].shape[0], 7) if route == "own" else (len(MANY_TILE_COUNTS), inp["x"].shape[0], 7))

    def run():
        leaves = {n: inp[n].detach().clone().requires_grad_() for n in names}
        y = mbranch_linear(leaves["x"], leaves["weight"], leaves["bias"], inp["scenario"], route=route,
                           activation="relu", grad_mask=grad_mask, aux=leaves["aux"], aux_weight=leaves["aux_weight"],
                           backend="cpu")
        y.backward(gy.to(dtype))
        return [y.detach()] + [leaves[n].grad for n in names]

    threads = torch.get_num_threads()
    try:
        results = {}
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results[t] = run()
    finally:
        torch.set_num_threads(threads)
    for t in (2, 3):
        for i, (a, b) in enumerate(zip(results[1], results[t])):
            assert torch.equal(a.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               b.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), \
                f"output {i} (y, then grads of {names}) differs between 1 and {t} threads"


# ------------------------------------------------------------------------------------------------ gradient masking

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("route,grad_mask", [("own", "own"), ("all", "own"), ("all", "params")])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "branch_x"])
def test_branch_parameters_get_exactly_zero_gradient_from_other_scenarios(device, backend, route, grad_mask, shared):
    M, B = 4, 40
    s = torch.randint(0, M, (B,))
    s[:M] = torch.arange(M)  # every scenario present
    inp = make_inputs(M=M, B=B, K=6, N=5, Ka=3, shared=shared, device=device, scenario=s)
    for m in range(M):
        leaves = {n: inp[n].detach().clone().requires_grad_() for n in ("x", "weight", "bias", "aux", "aux_weight")}
        y = mbranch_linear(leaves["x"], leaves["weight"], leaves["bias"], inp["scenario"], route=route,
                           grad_mask=grad_mask, activation="silu", aux=leaves["aux"], aux_weight=leaves["aux_weight"],
                           backend=backend)
        # Loss from the samples of every scenario except m (through every branch for route "all").
        other = (inp["scenario"] != m).to(y.dtype)
        (y * (other.view(-1, 1) if route == "own" else other.view(1, -1, 1))).square().sum().backward()
        for n in ("weight", "bias", "aux_weight"):
            g = leaves[n].grad
            assert (g[m] == 0).all(), f"{n}[{m}] got gradient from other scenarios' samples"
            assert (g[torch.arange(M) != m] != 0).any(), f"{n}: no gradient at all (test cannot fail)"
        assert (leaves["x"].grad != 0).any()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "branch_x"])
def test_grad_mask_own_blocks_off_branch_outputs_entirely(device, backend, shared):
    """With grad_mask "own", y[m, b] for m != s_b is a constant: nothing (inputs included) gets gradient from it."""
    M, B = 3, 24
    inp = make_inputs(M=M, B=B, K=5, N=4, Ka=2, shared=shared, device=device)
    leaves = [inp[n].detach().clone().requires_grad_() for n in ("x", "weight", "bias", "aux", "aux_weight")]
    y = mbranch_linear(*leaves[:3], inp["scenario"], route="all", grad_mask="own", activation="relu",
                       aux=leaves[3], aux_weight=leaves[4], backend=backend)
    off = torch.arange(M, device=device).view(M, 1) != inp["scenario"].view(1, B)
    (y * off.unsqueeze(-1)).sum().backward()
    for t in leaves:
        assert (t.grad == 0).all()


# ------------------------------------------------------------------------------------------------ kernel contract

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("activation", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_contract(device, backend, activation, dtype):
    k = _backend.kernels(mbl_ops.OP, backend)
    rk = _backend.kernels(mbl_ops.OP, "reference")
    inp = make_inputs(M=3, B=26, K=7, N=9, Ka=3, dtype=dtype, device=device)
    args = (inp["weight"], inp["bias"], inp["aux"], inp["aux_weight"])
    y, z = k.grouped_forward(inp["x"], *args, inp["scenario"], activation)
    ye, ze = rk.grouped_forward(inp["x"].cpu(), *[a.cpu() for a in args], inp["scenario"].cpu(), activation)
    assert_close(y, ye, dtype, "grouped y")
    assert z.numel() == ze.numel() and (z.numel() == 0 or torch.allclose(z.cpu().double(), ze.double(), atol=5e-2))
    y, z = k.all_forward(inp["x"], *args, activation)
    ye, _ = rk.all_forward(inp["x"].cpu(), *[a.cpu() for a in args], activation)
    assert_close(y, ye, dtype, "all y")
    M, B, N = y.shape
    assert mbl_ops.all_layout(y, True).shape == (M, B, N)
    dz = torch.randn(B, N, device=device).to(dtype)
    got = k.grouped_backward(dz, inp["x"], inp["weight"], inp["aux"], inp["aux_weight"], inp["scenario"],
                             True, True, True, True, True)
    exp = rk.grouped_backward(dz.cpu(), inp["x"].cpu(), inp["weight"].cpu(), inp["aux"].cpu(), inp["aux_weight"].cpu(),
                              inp["scenario"].cpu(), True, True, True, True, True)
    for name, g, e in zip(("dx", "dW", "db", "daux", "dWa"), got, exp):
        assert_close(g, e, dtype, name)
    got = k.grouped_backward(dz, inp["x"], inp["weight"], None, None, inp["scenario"], False, True, False, True, True)
    assert [t.numel() == 0 for t in got] == [True, False, True, True, True]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("dy_dim,x_dim", [(2, 2), (3, 2), (3, 3), (2, 3)])
def test_fused_backward_contract(device, backend, activation, dy_dim, x_dim):
    k = _backend.kernels(mbl_ops.OP, backend)
    if k.grouped_backward_act is None:
        pytest.skip(f"{backend} has no fused grouped_backward_act (optional)")
    rk = _backend.kernels(mbl_ops.OP, "reference")
    M, B, N = 3, 22, 6
    inp = make_inputs(M=M, B=B, K=5, N=N, Ka=3, shared=x_dim == 2, device=device)
    dy = torch.randn((M, B, N) if dy_dim == 3 else (B, N), device=device)
    if dy_dim == 3:
        dy = dy.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # the all-route layout
    saved = torch.randn_like(dy) if activation else dy.new_empty(0)
    args = (inp["x"], inp["weight"], inp["aux"], inp["aux_weight"], inp["scenario"], activation, True, True, True,
            True, True)
    got = k.grouped_backward_act(dy, saved, *args)
    exp = rk.grouped_backward_act(dy.cpu(), saved.cpu(), *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    for name, g, e in zip(("dx", "dW", "db", "daux", "dWa"), got, exp):
        assert_close(g, e, torch.float32, name)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("activation", [1, 2])
def test_fused_backward_branch_outputs_saved(device, backend, activation):
    """saved = every branch's y [M, B, N] (the all-route layout) with a [B, N] dy: the kernel reads y[s_b, b], the
    same as passing the own rows [B, N]; a saved of another shape is refused."""
    k = _backend.kernels(mbl_ops.OP, backend)
    if k.grouped_backward_act is None:
        pytest.skip(f"{backend} has no fused grouped_backward_act (optional)")
    M, B, N = 3, 22, 6
    inp = make_inputs(M=M, B=B, K=5, N=N, Ka=3, device=device)
    dy = torch.randn(B, N, device=device)
    saved = torch.randn(B, M, N, device=device).permute(1, 0, 2)  # [M, B, N], strides (N, M*N, 1)
    own = saved[inp["scenario"].long(), torch.arange(B, device=device)]
    args = (inp["x"], inp["weight"], inp["aux"], inp["aux_weight"], inp["scenario"], activation, True, True, True,
            True, True)
    got = k.grouped_backward_act(dy, saved, *args)
    exp = k.grouped_backward_act(dy, own, *args)
    for name, g, e in zip(("dx", "dW", "db", "daux", "dWa"), got, exp):
        assert torch.equal(g, e), name
    with pytest.raises(RuntimeError, match="saved must be shaped like dy" if backend == "cpu" else ""):
        k.grouped_backward_act(dy, saved[:, :, :-1], *args)


def test_all_route_layout_is_packed_gemm_view():
    inp = make_inputs(M=3, B=5, K=4, N=6)
    y = mbranch_linear(inp["x"], inp["weight"], inp["bias"], inp["scenario"], route="all", backend="cpu")
    assert y.shape == (3, 5, 6) and y.stride() == (6, 18, 1)


# ------------------------------------------------------------------------------------------------ gradcheck / opcheck

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("route,grad_mask", [("own", "own"), ("all", "none")])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "branch_x"])
def test_gradcheck(device, backend, route, grad_mask, shared):
    """True Jacobians where the op is unmasked (grad_mask own/params deliberately differ from the Jacobian; they
    are checked against the float64 reference's masked autograd in the tests above)."""
    inp = make_inputs(M=3, B=7, K=3, N=4, Ka=2, shared=shared, dtype=torch.float64, device=device)
    leaves = [inp[n].requires_grad_() for n in ("x", "weight", "bias", "aux", "aux_weight")]

    def f(x, w, b, a, wa):
        return mbranch_linear(x, w, b, inp["scenario"], route=route, grad_mask=grad_mask, activation="gelu", aux=a,
                              aux_weight=wa, backend=backend)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("activation", [0, 1, 3])
def test_opcheck(device, backend, activation):
    inp = make_inputs(M=3, B=9, K=4, N=5, Ka=2, device=device)
    leaves = [inp[n].requires_grad_() for n in ("x", "weight", "bias", "aux", "aux_weight")]
    xb = torch.randn(3, 9, 4, device=device, requires_grad=True)
    s = inp["scenario"]
    torch.library.opcheck(mbl_ops._own_op.op, (*leaves, s, activation, True, backend))
    torch.library.opcheck(mbl_ops._all_op.op, (*leaves, s, activation, 0, True, backend))
    torch.library.opcheck(mbl_ops._all_op.op, (xb, *leaves[1:], s, activation, 2, True, backend))
    dy_own, dy_all = torch.randn(9, 5, device=device), torch.randn(9, 3, 5, device=device).permute(1, 0, 2)
    y, z = mbl_ops._own_op(*[t.detach() for t in leaves], s, activation, True, backend)
    saved = mbl_ops._saved_activation(y, z, activation)
    torch.library.opcheck(mbl_ops._own_backward_op.op, (dy_own, saved, *[t.detach() for t in (leaves[0], leaves[1],
                          leaves[3], leaves[4])], s, activation, True, True, True, True, True, backend))
    y, z = mbl_ops._all_op(*[t.detach() for t in leaves], s, activation, 1, True, backend)
    saved = mbl_ops._saved_activation(y, z, activation)
    for gm in (0, 1, 2):
        torch.library.opcheck(mbl_ops._all_backward_op.op, (dy_all, saved, *[t.detach() for t in (leaves[0], leaves[1],
                              leaves[3], leaves[4])], s, activation, gm, True, True, False, True, True, backend))


class _Tower(torch.nn.Module):
    """route "all" (grad_mask own) feeding route "own": the layering SAML uses below/above a mutual layer."""

    def __init__(self, backend):
        super().__init__()
        from saml_kernels.nn import MultiBranchLinear

        self.a = MultiBranchLinear(6, 8, 3, aux_features=2, activation="relu", route="all", backend=backend)
        self.b = MultiBranchLinear(8, 4, 3, activation="gelu", route="own", backend=backend)

    def forward(self, x, s, aux):
        h = self.a(x, s, aux)      # [M, B, 8]
        return self.b(h, s)        # per-branch input, own route -> [B, 4]


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile does not run under the Triton interpreter")
    torch._dynamo.reset()
    model = _Tower(backend).to(device)
    x, aux = torch.randn(11, 6, device=device), torch.randn(11, 2, device=device)
    s = torch.randint(0, 3, (11,), device=device)
    eager = model(x, s, aux)
    eager.square().sum().backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, s, aux)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), g_eager):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------------------------------ bad input

def _good():
    return make_inputs(M=3, B=6, K=4, N=5, Ka=2)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(x=a["x"].long()), TypeError, "x must have dtype"),
    (lambda a: a.update(x=a["x"][0]), ValueError, "x must have"),
    (lambda a: a.update(weight=a["weight"][0]), ValueError, "weight must have 3"),
    (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight dtype"),
    (lambda a: a.update(bias=a["bias"].half()), TypeError, "bias dtype"),
    (lambda a: a.update(bias=a["bias"][:, :2]), ValueError, "bias must be"),
    (lambda a: a.update(x=a["x"][:, :3]), ValueError, "features"),
    (lambda a: a.update(x=torch.randn(2, 6, 4)), ValueError, "branches"),
    (lambda a: a.update(scenario=a["scenario"][:4]), ValueError, "scenario must have"),
    (lambda a: a.update(scenario=a["scenario"].float()), TypeError, "scenario must have dtype"),
    (lambda a: a.update(aux=None), ValueError, "together"),
    (lambda a: a.update(aux=a["aux"][:3]), ValueError, "aux must have"),
    (lambda a: a.update(aux_weight=a["aux_weight"][:, :1]), ValueError, "aux_weight must be"),
    (lambda a: a.update(scenario=torch.tensor([0, 1, 2, 3, 0, 1])), IndexError, r"scenario\[3\] = 3"),
    (lambda a: a.update(scenario=torch.tensor([0, 1, -1, 2, 0, 1])), IndexError, r"scenario\[2\] = -1"),
    (lambda a: a.update(weight=torch.randn(0, 4, 5)), ValueError, "at least one branch"),
    (lambda a: a.update(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
])
@pytest.mark.parametrize("route", ["own", "all"])
def test_bad_input(mutate, exc, match, route):
    a = _good()
    mutate(a)
    with pytest.raises(exc, match=match):
        mbranch_linear(a["x"], a["weight"], a["bias"], a["scenario"], route=route, aux=a["aux"],
                       aux_weight=a["aux_weight"])


@pytest.mark.parametrize("kw,match", [(dict(route="some"), "route"), (dict(grad_mask="all"), "grad_mask"),
                                      (dict(activation="tanh"), "activation"), (dict(activation=1), "activation"),
                                      (dict(backend="fpga"), "backend")])
def test_bad_options(kw, match):
    a = _good()
    with pytest.raises(ValueError, match=match):
        mbranch_linear(a["x"], a["weight"], a["bias"], a["scenario"], aux=a["aux"], aux_weight=a["aux_weight"], **kw)


def test_per_branch_x_own_route_bad_scenario():
    a = _good()
    with pytest.raises(IndexError, match="out of range"):
        mbranch_linear(torch.randn(3, 6, 4), a["weight"], None, torch.tensor([0, 1, 2, 3, 0, 1]), route="own")


def test_functional_export():
    assert saml_kernels.mbranch_linear is mbranch_linear
    assert saml_kernels.reference.mbranch_linear_reference is ref.mbranch_linear_reference
    assert ref.ACTIVATIONS["gelu"] == 3


# ------------------------------------------------------------------------------------------------ dot precision

@pytest.fixture
def _restore_matmul_precision():
    """Puts torch's float32 matmul setting back (legacy setter last: it leaves the legacy and new APIs in sync)."""
    pytest.importorskip("triton")
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_dot_precision_follows_torch_legacy_setting(_restore_matmul_precision):
    """float32 GEMMs are exact unless the user allowed TF32 for matmuls; other dtypes are always "ieee"."""
    from saml_kernels.triton import dot_input_precision

    torch.set_float32_matmul_precision("highest")
    assert dot_input_precision(torch.float32) == "ieee"
    for prec in ("high", "medium"):
        torch.set_float32_matmul_precision(prec)
        assert dot_input_precision(torch.float32) == "tf32", prec
        for dt in (torch.float16, torch.bfloat16, torch.float64):
            assert dot_input_precision(dt) == "ieee", (prec, dt)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = True
    assert dot_input_precision(torch.float32) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert dot_input_precision(torch.float32) == "ieee"


def test_dot_precision_follows_torch_new_api():
    """torch >= 2.9 ``fp32_precision`` API, in a subprocess (it changes process-wide state that the legacy
    ``allow_tf32`` getter then refuses to read): "tf32" at matmul or global level -> tf32; a mix of the two APIs
    (where reading ``allow_tf32`` raises) must still be read, never crash the launch."""
    import subprocess
    import sys

    if getattr(torch.backends.cuda.matmul, "fp32_precision", None) is None:
        pytest.skip("torch < 2.9 has no fp32_precision API")
    code = """
import torch
from saml_kernels.triton import dot_input_precision as p
f = torch.float32
out = [p(f)]
torch.backends.cuda.matmul.fp32_precision = "tf32"; out.append(p(f))
torch.backends.cuda.matmul.fp32_precision = "ieee"; out.append(p(f))
torch.backends.cuda.matmul.fp32_precision = "none"; torch.backends.fp32_precision = "tf32"; out.append(p(f))
torch.backends.fp32_precision = "none"; torch.backends.cuda.matmul.fp32_precision = "none"
torch.set_float32_matmul_precision("high"); torch.backends.cuda.matmul.fp32_precision = "ieee"; out.append(p(f))
out.append(p(torch.float64))
print(",".join(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "ieee,tf32,ieee,tf32,ieee,ieee"


def test_triton_launch_uses_chosen_precision(_restore_matmul_precision, monkeypatch):
    """The launchers pass dot_input_precision(dtype) as the PREC constexpr of every GEMM kernel they start."""
    pytest.importorskip("triton")
    from triton.runtime.jit import KernelInterface

    from saml_kernels.triton import mbranch_linear as tk

    seen = []
    monkeypatch.setattr(KernelInterface, "__getitem__", lambda self, grid: lambda *a, **k: seen.append(k.get("PREC")))
    meta = lambda *s: torch.empty(s, device="meta")  # noqa: E731
    for prec, want in (("highest", "ieee"), ("high", "tf32")):
        torch.set_float32_matmul_precision(prec)
        seen.clear()
        s = torch.empty(6, dtype=torch.int64, device="meta")
        tk.grouped_forward(meta(6, 4), meta(2, 4, 5), None, None, None, s, 0)
        tk.all_forward(meta(6, 4), meta(2, 4, 5), None, None, None, 0)
        tk.grouped_backward(meta(6, 5), meta(6, 4), meta(2, 4, 5), None, None, s, True, True, True, False, False)
        assert seen and set(seen) == {want}, (prec, seen)
