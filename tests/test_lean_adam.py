"""``LeanAdam`` (saml_kernels/_lean_adam.py): bitwise ``torch.optim.Adam(fused=True)``, as users drive it (param
groups, frozen parameters, LR schedulers, hooks, closures, checkpoints), and the fast path really runs where the
contract says it does."""
import copy

import pytest
import torch

from saml_kernels._lean_adam import LeanAdam

SHAPES = [(16, 16), (4, 48, 256), (256,), (3, 7), (1,)]


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def _pair(groups_fn, **kw):
    """The same parameters under torch's Adam and LeanAdam."""
    a, b = _params(), _params()
    return a, b, torch.optim.Adam(groups_fn(a), fused=True, **kw), LeanAdam(groups_fn(b), fused=True, **kw)


def _grads(params, seed, skip=()):
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=g, dtype=p.dtype)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _groups(ps):
    return [{"params": ps[:2], "lr": 3e-3, "weight_decay": 0.1}, {"params": ps[2:], "maximize": True}]


@pytest.mark.parametrize("groups_fn", [lambda ps: ps, _groups], ids=["one-group", "two-groups"])
def test_bitwise_torch_adam_with_frozen_params_and_scheduler(groups_fn):
    a, b, oa, ob = _pair(groups_fn, lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    sa, sb = (torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (oa, ob))
    a[1].requires_grad_(False)
    b[1].requires_grad_(False)
    ran = 0
    for step in range(7):
        skip = (1,) if step != 3 else (1, 3)  # a frozen parameter; one more without a gradient at step 3
        _grads(a, step, skip)
        _grads(b, step, skip)
        ran += step > 0 and ob._fast_lists() is not None
        oa.step()
        ob.step()
        sa.step()
        sb.step()
        assert _same(a, b), step
    assert ran == 6  # every step after the first (which creates the state) took the direct call
    assert str(oa.state_dict()) == str(ob.state_dict())
    for x, y in zip(oa.state_dict()["state"].values(), ob.state_dict()["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_resume_from_state_dict_is_bitwise():
    a, b, oa, ob = _pair(lambda ps: ps, lr=1e-2)
    for step in range(3):
        _grads(a, step)
        _grads(b, step)
        oa.step()
        ob.step()
    sd = copy.deepcopy(ob.state_dict())
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    oc = LeanAdam(c, lr=1e-2, fused=True)
    oc.load_state_dict(sd)
    for step in range(3, 6):
        for ps, o in ((a, oa), (c, oc)):
            _grads(ps, step)
            o.step()
    assert _same(a, c)


def test_tensor_lr_on_cpu():
    a, b, oa, ob = _pair(lambda ps: ps, lr=torch.tensor(5e-3))
    for step in range(3):
        _grads(a, step)
        _grads(b, step)
        oa.step()
        ob.step()
    assert ob._fast_lists() is not None
    assert _same(a, b)


@pytest.mark.parametrize("case", ["amsgrad", "hook", "closure", "mixed-dtype"])
def test_fallback_cases_match_torch(case):
    kw = dict(amsgrad=True) if case == "amsgrad" else {}
    a, b, oa, ob = _pair(lambda ps: ps, lr=1e-2, **kw)
    if case == "mixed-dtype":
        for ps in (a, b):
            ps[0].data = ps[0].data.double()
    calls = []
    if case == "hook":
        ob.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    for step in range(3):
        _grads(a, step)
        _grads(b, step)
        if step:
            assert ob._fast_lists() is None or case == "closure"
        if case == "closure":
            assert oa.step(lambda: 1.0) == ob.step(lambda: 1.0) == 1.0
        else:
            oa.step()
            ob.step()
    assert _same(a, b)
    if case == "hook":
        assert calls == [1, 1, 1]


def test_is_an_adam_for_schedulers_and_checks():
    ps = _params()
    opt = LeanAdam(ps, lr=1e-3, fused=True)
    assert isinstance(opt, torch.optim.Adam)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    _grads(ps, 0)
    opt.step()
    sched.step()  # no "scheduler.step() before optimizer.step()" warning path: the step was seen
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    ps = _params()
    opt = LeanAdam(ps, fused=True)
    _grads(ps, 0)
    opt.zero_grad(set_to_none=set_to_none)
    assert all((p.grad is None) if set_to_none else (p.grad is not None and not p.grad.any()) for p in ps)


def test_sparse_gradient_raises_like_adam():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = LeanAdam([p], fused=True)
    p.grad = torch.randn(4, 3)
    opt.step()
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError):
        opt.step()


def test_training_optimizer_uses_it():
    from saml_kernels.data import make_synthetic
    from saml_kernels.nn import SAML, SAMLConfig, TrainingOptimizer

    model = SAML(SAMLConfig.from_data(make_synthetic(64, seed=0)))
    assert isinstance(TrainingOptimizer(model).dense, LeanAdam)
