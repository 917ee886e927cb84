"""The custom ops' eager path (saml_kernels/ops/_eager.py): in plain eager mode an op runs its own Python body
(directly, or through one autograd.Function built from its registered setup_context / backward), bitwise what
the dispatcher path (the torch.library custom op) computes; every tracing / mode / subclass / autocast context
takes the dispatcher path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import saml_kernels
from saml_kernels.data import make_synthetic
from saml_kernels.nn import SAML, SAMLConfig, TrainingOptimizer
from saml_kernels.ops import _eager
from saml_kernels.ops import mbranch_linear as mbl_ops

from conftest import gpu_backends

CPU_BACKENDS = [b for b in saml_kernels.available_backends("cpu") if b in ("cpu", "reference")]
# every op of _op_cases on the CPU backends, and on the GPU ones (CUDA tensors; triton under the interpreter)
PAIRS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in CPU_BACKENDS] + gpu_backends("mbranch_linear")


@pytest.fixture
def dispatcher_only(monkeypatch):
    """Every op call goes through the torch.library custom op, as before the eager path existed."""
    monkeypatch.setattr(_eager, "plain_eager", lambda args: False)


def _inputs(M=3, B=11, K=7, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(B, K), weight=r(M, K, N), bias=r(M, N), scenario=torch.randint(0, M, (B,), generator=g),
                dy=r(B, N), dh=r(M, B, N))


def _op_cases(backend, device="cpu"):
    """name -> (function of fresh leaves -> output, leaves): one per custom op with autograd."""
    i = {k: v.to(device) for k, v in _inputs().items()}
    s = i["scenario"]
    cases = {
        "mbranch_linear own": lambda x, w, b: saml_kernels.mbranch_linear(x, w, b, s, activation="relu",
                                                                           backend=backend),
        "mbranch_linear all": lambda x, w, b: saml_kernels.mbranch_linear(x, w, b, s, route="all", activation="gelu",
                                                                           grad_mask="params", backend=backend),
        "mutual_linear": lambda x, w, b: saml_kernels.mutual_linear(x, w, b, s, activation="relu", backend=backend),
        "mutual_unit": lambda x, w, b: saml_kernels.mutual_unit(
            saml_kernels.mbranch_linear(x, w, b, s, route="all", backend=backend), s, backend=backend),
        "partitioned_norm": lambda x, w, b: saml_kernels.partitioned_norm(
            x @ w[0], s, b[0], b[1], w[:, 0], w[:, 1], backend=backend),
    }
    return cases, (i["x"], i["weight"], i["bias"])


def _run(fn, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.device))
    return out.detach(), [t.grad for t in leaves], out.grad_fn


@pytest.mark.parametrize("device,backend", PAIRS)
def test_ops_bitwise_the_dispatcher_path(device, backend, monkeypatch):
    cases, leaves = _op_cases(backend, device)
    for name, fn in cases.items():
        out, grads, grad_fn = _run(fn, leaves)
        with monkeypatch.context() as mp:
            mp.setattr(_eager, "plain_eager", lambda args: False)
            ref, ref_grads, ref_fn = _run(fn, leaves)
        assert torch.equal(out, ref), name
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g, r), name
        # the graphs differ only in who recorded them: the eager Function vs the custom op's generated one
        names = lambda f: {type(n).__name__ for n in _nodes(f)}  # noqa: E731
        assert any(n.startswith("Eager_") for n in names(grad_fn)), name
        assert not any(n.startswith("Eager_") for n in names(ref_fn)), name


def _nodes(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return seen
    seen.add(fn)
    for nxt, _ in fn.next_functions:
        _nodes(nxt, seen)
    return seen


def test_no_grad_calls_the_body_directly():
    i = _inputs()
    with torch.no_grad():
        y = saml_kernels.mbranch_linear(i["x"], i["weight"].requires_grad_(), i["bias"], i["scenario"])
    assert y.grad_fn is None and not y.requires_grad
    y2 = saml_kernels.mbranch_linear(i["x"], i["weight"].detach(), i["bias"], i["scenario"])
    assert torch.equal(y, y2) and y2.grad_fn is None


def test_double_backward_raises_on_both_paths(monkeypatch):
    i = _inputs()
    for plain in (True, False):
        with monkeypatch.context() as mp:
            if not plain:
                mp.setattr(_eager, "plain_eager", lambda args: False)
            x = i["x"].clone().requires_grad_()
            y = saml_kernels.mbranch_linear(x, i["weight"], i["bias"], i["scenario"], activation="relu")
            (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            with pytest.raises(RuntimeError):
                gx.sum().backward()


def test_plain_eager_predicate():
    x = torch.randn(3)
    p = torch.nn.Parameter(torch.randn(3))
    assert _eager.plain_eager((x, p, None, 1, "cpu"))
    assert _eager.plain_eager((1, "no tensors"))
    with torch.device("cpu"):  # a torch-function mode
        assert not _eager.plain_eager((x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _eager.plain_eager((x,))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert not _eager.plain_eager((fx,))
    seen = []
    torch.func.grad(lambda t: (seen.append(_eager.plain_eager((t,))), t.sum())[1])(x)
    assert seen == [False]


def test_fake_tensor_and_autocast_reach_the_custom_op():
    i = _inputs()
    with FakeTensorMode() as mode:
        x, w, b, s = (mode.from_tensor(i[k]) for k in ("x", "weight", "bias", "scenario"))
        y = saml_kernels.mbranch_linear(x, w, b, s, check_scenario=False)
        assert y.shape == (11, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the custom op's autocast policy casts the inputs
        y = saml_kernels.mbranch_linear(i["x"], i["weight"], i["bias"], i["scenario"])
    assert y.dtype == torch.bfloat16


def test_custom_op_rejects_mutating_definitions():
    with pytest.raises(ValueError, match="mutates"):
        _eager.custom_op("saml_kernels::never_defined", mutates_args=("x",))


@pytest.fixture(scope="module")
def data():
    return make_synthetic(200, num_users=50, num_items=60, num_categories=7, num_contexts=5, num_segments=6,
                          num_tags=11, seq_len=6, seed=3)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", None])
def test_saml_training_bitwise_the_dispatcher_path(data, optimizer, monkeypatch):
    """Three SAML training steps (fused row-wise Adagrad tables, or plain gradients) on both paths: same loss,
    same parameters, bit for bit."""
    def train():
        torch.manual_seed(0)
        cfg = SAMLConfig.from_data(data)
        m = SAML(cfg, embedding_optimizer=optimizer, embedding_lr=0.05)
        opt = TrainingOptimizer(m, 1e-3, 0.05)
        losses = []
        for k in range(3):
            batch = data.batch(np.arange(k * 40, k * 40 + 40))
            opt.zero_grad()
            loss = m.loss(batch)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses), m.state_dict()

    losses, sd = train()
    with monkeypatch.context() as mp:
        mp.setattr(_eager, "plain_eager", lambda args: False)
        ref_losses, ref_sd = train()
    assert torch.equal(losses, ref_losses)
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k


def test_every_op_module_uses_the_eager_definition():
    """A custom op defined with torch.library directly would silently keep the dispatcher cost."""
    import pathlib
    root = pathlib.Path(saml_kernels.__file__).parent / "ops"
    for path in root.glob("*.py"):
        assert "@torch.library.custom_op" not in path.read_text(), path.name
    assert isinstance(mbl_ops._own_op, _eager.EagerOp)


def test_served_program_binds_its_ops_to_the_eager_path(data, tmp_path, monkeypatch):
    """A loaded exported program calls the ops' eager path (serving binds them at load), with the values of the
    graph as exported: bitwise equal to the same program run through the dispatcher."""
    from saml_kernels import serving

    torch.manual_seed(0)
    model = SAML(SAMLConfig.from_data(data)).eval()
    path = tmp_path / "saml.pt2"
    serving.export_saml(model, data.batch(np.arange(16)), path)
    served = serving.load_exported(path)
    names = {str(n.target) for n in served.graph.graph.nodes if n.op == "call_function"}
    assert any(n.startswith("<function eager_") for n in names)
    assert not any("saml_kernels." in n for n in names), names  # every package op call was bound
    inputs = data.batch(np.arange(40, 45)).inputs()
    with torch.no_grad():
        out = served(*inputs)
        with monkeypatch.context() as mp:
            mp.setattr(_eager, "plain_eager", lambda args: False)
            ref = served(*inputs)
        eager = model(*inputs)
    for o, r, e in zip(out, ref, eager):
        assert torch.equal(o, r)
        torch.testing.assert_close(o, e)
