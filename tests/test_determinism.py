"""Determinism: under ``torch.use_deterministic_algorithms(True)`` every op's outputs and gradients, and a SAML
training step, are bitwise identical across 5 runs, and every op bitwise identical across
``torch.set_num_threads(1)`` vs 2 (CPU backend; the reference backend too, as the baseline users compare against).
A whole training step is compared across thread counts within float32 rounding only: its plain ``nn.Linear``
layers run torch's BLAS GEMMs, which may split a reduction by thread count on some CPUs (seen on an Intel Xeon:
``aux_head.weight``'s gradient 1.5e-8 apart).

Sizes are large enough that ATen's parallel_for actually splits the work over 2 threads (so a reduction order
that depends on the thread count would show up), small enough to keep the file at a few seconds.
"""
from __future__ import annotations

import pytest
import torch

import _reliability_cases as R

RUNS = 5
CPU_BACKENDS = [b for b in ("reference", "cpu") if b in __import__("saml_kernels").available_backends("cpu")]


def _assert_bitwise(a, b, what):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None, f"{what}: tensor {i} is None in one run only"
            continue
        x = x.to_dense() if x.is_sparse else x
        y = y.to_dense() if y.is_sparse else y
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}: tensor {i} shape/dtype differs"
        # bitwise (NaN-safe): compare the raw bits
        xb = x.contiguous().reshape(-1).view(torch.uint8)
        yb = y.contiguous().reshape(-1).view(torch.uint8)
        if not torch.equal(xb, yb):
            diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else "n/a"
            raise AssertionError(f"{what}: tensor {i} (of {len(a)}: outputs then grads) not bitwise equal; max |diff| = {diff}")


def _check(call, what, across_threads="bitwise"):
    """RUNS runs at 2 threads bitwise equal, then one at 1 thread: bitwise equal too, or (``across_threads="close"``,
    for a whole model whose plain ``nn.Linear`` layers run torch's BLAS GEMMs, which may split a reduction by
    thread count on some CPUs) equal within float32 rounding."""
    torch.set_num_threads(2)
    first = call()
    for r in range(1, RUNS):
        _assert_bitwise(first, call(), f"{what}: run {r} vs run 0 (2 threads)")
    torch.set_num_threads(1)
    one = call()
    if across_threads == "bitwise":
        _assert_bitwise(first, one, f"{what}: 1 thread vs 2 threads")
    else:
        for i, (x, y) in enumerate(zip(first, one)):
            if x is not None or y is not None:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{what}: 1 thread vs 2 threads, tensor {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", R.ALL_OPS)
def test_op_deterministic(op, backend, dtype, deterministic):
    if not R.op_available(op):
        pytest.skip(f"{op} has not landed yet")
    case = R.make_case(op, seed=11, size="large", dtype=dtype)
    _check(lambda: case["call"](backend), f"{op}[{backend}, {dtype}]")


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_embedding_sparse_grad_deterministic(backend, pooling, deterministic):
    """sparse=True (COO gradients) is as repeatable as the dense path."""
    case = R.make_case("scenario_embedding_bag", seed=5, size="large")
    inp = case["inputs"]

    def call():
        leaf = {k: (v.detach().clone().requires_grad_(True) if k in ("global_weight", "scenario_weight") else v)
                for k, v in inp.items()}
        leaf["per_sample_weights"] = None
        go, so = R.seb_call(leaf, backend, pooling=pooling, sparse=True)
        (go.square().sum() + so.sum()).backward()
        return [go.detach(), so.detach(), leaf["global_weight"].grad, leaf["scenario_weight"].grad]
    _check(call, f"sparse embedding[{backend}, {pooling}]")


def _train_steps(cfg, batches, backend, steps=3):
    model = R.make_saml(cfg, seed=3, backend=backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for b in batches[:steps]:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(b)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses + [p.detach().clone() for p in model.parameters()] + [p.grad for p in model.parameters()]


@pytest.mark.skipif(not R.model_available(), reason="saml_kernels.nn.SAML has not landed yet")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_saml_training_step_deterministic(backend, deterministic):
    data, cfg = R.small_saml(seed=1, n=768)
    batches = list(data.batches(256))
    # across thread counts within rounding only: the dense layers' GEMMs are torch's (MKL may split a reduction
    # by thread count); the package's own kernels are checked bitwise across threads by the op tests above
    _check(lambda: _train_steps(cfg, batches, backend), f"SAML training steps[{backend}]", across_threads="close")


def test_bitwise_comparator_detects_one_ulp():
    """Control: the comparison used above fails on a single-ulp difference (and on -0.0 vs 0.0)."""
    x = torch.randn(100)
    y = x.clone()
    y[37] = torch.nextafter(y[37], torch.tensor(float("inf")))
    with pytest.raises(AssertionError):
        _assert_bitwise([x], [y], "control")
    with pytest.raises(AssertionError):
        _assert_bitwise([torch.zeros(3)], [-torch.zeros(3)], "control")
    _assert_bitwise([x], [x.clone()], "control")
