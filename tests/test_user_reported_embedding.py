"""The embedding-side findings of the new-user report (issue "Silent wrong numbers and rough edges"), each a test
that failed before its fix, plus the contracts that came with them:

- the fused optimizer updates a non-contiguous table (it used to update a private contiguous copy);
- ``requires_grad_(False)`` freezes a table under the fused optimizer (weights and state);
- the fused optimizer's lr follows a torch LR scheduler, L2 weight decay, opt-in skip of non-finite steps;
- backend names: BackendUnavailableError, checked at layer construction, ``info`` honours the env request;
- KeyedJaggedTensor keys matched by name (any order, extra keys ignored, variable batch rejected);
- no sparse-invariant warning from ``sparse=True``;
- the check modes of ops/_checks.py: one host sync per op (eager), one per block (deferred), none (capture-safe).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import saml_kernels
from saml_kernels import _backend
from saml_kernels.nn import ScenarioEmbedding
from saml_kernels.ops import _checks

from conftest import SyncCounter, device_backends
from test_scenario_embedding import FakeKJT

FEATURES = [("user", 7, True, "sum"), ("item", 9, False, "sum"), ("cat", 5, True, "sum")]
OP = "scenario_embedding_bag"


def batch(layer, B=6, max_bag=3, seed=None):
    device = layer.global_weight.device
    F = layer.num_features
    lengths = torch.randint(0, max_bag + 1, (F * B,))
    offsets = torch.zeros(F * B + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    ids = [torch.randint(0, f.num_embeddings, (int(lengths[k * B:(k + 1) * B].sum()),))
           for k, f in enumerate(layer.features)]
    return (torch.cat(ids).to(device), offsets.to(device), torch.randint(0, layer.num_scenarios, (B,), device=device))


def train(layer, batches, upstream):
    for (idx, off, sc), (ug, us) in zip(batches, upstream):
        g, s = layer(idx, off, sc)
        torch.autograd.backward([g, s], [ug, us])


def upstreams(layer, batches, D):
    out = []
    for idx, off, sc in batches:
        B = sc.numel()
        out.append((torch.randn(B, layer.num_features, D, device=sc.device),
                    torch.randn(B, layer.num_aware, D, device=sc.device)))
    return out


def twin(layer, **kw):
    """A layer with the same settings and a contiguous copy of ``layer``'s tables and states."""
    args = dict(optimizer=layer.optimizer, lr=layer.lr, eps=layer.eps, backend=layer.backend)
    args.update(kw)
    other = ScenarioEmbedding(FEATURES, layer.num_scenarios, layer.embedding_dim, **args)
    with torch.no_grad():
        other.global_weight.copy_(layer.global_weight)
        other.scenario_weight.copy_(layer.scenario_weight)
    return other


# ------------------------------------------------------------------------------------------------ 1. non-contiguous

@pytest.mark.parametrize("device,backend", device_backends(OP))
def test_fused_adagrad_updates_a_column_slice_loaded_with_assign(device, backend):
    D = 8
    layer = ScenarioEmbedding(FEATURES, 3, D, optimizer="rowwise_adagrad", lr=0.1, backend=backend)
    pretrained = torch.randn(layer.global_weight.shape[0], 2 * D)
    sd = layer.state_dict()
    sd["global_weight"] = pretrained[:, :D]
    layer.load_state_dict(sd, assign=True)
    assert not layer.global_weight.is_contiguous()
    ref = twin(layer)  # same values, contiguous
    batches = [batch(layer) for _ in range(3)]
    ups = upstreams(layer, batches, D)
    before = layer.global_weight.detach().clone()
    train(layer, batches, ups)
    train(ref, batches, ups)
    assert not torch.equal(layer.global_weight, before), "the table never changed"
    torch.testing.assert_close(layer.global_weight, ref.global_weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.global_state, ref.global_state, rtol=0, atol=0)
    torch.testing.assert_close(layer.scenario_weight, ref.scenario_weight, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", device_backends(OP))
def test_fused_sgd_updates_a_transposed_parameter(device, backend):
    D = 4
    layer = ScenarioEmbedding(FEATURES, 2, D, optimizer="sgd", lr=0.5, backend=backend)
    R = layer.global_weight.shape[0]
    layer.global_weight = torch.nn.Parameter(torch.randn(D, R).t())
    ref = twin(layer)
    batches = [batch(layer) for _ in range(2)]
    ups = upstreams(layer, batches, D)
    train(layer, batches, ups)
    train(ref, batches, ups)
    torch.testing.assert_close(layer.global_weight, ref.global_weight, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ 2. frozen tables

@pytest.mark.parametrize("device,backend", device_backends(OP))
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_requires_grad_false_freezes_fused_tables(device, backend, optimizer):
    D = 4
    layer = ScenarioEmbedding(FEATURES, 3, D, optimizer=optimizer, lr=0.2, backend=backend)
    batches = [batch(layer) for _ in range(2)]
    ups = upstreams(layer, batches, D)
    snap = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.requires_grad_(False)
    for (idx, off, sc), (ug, us) in zip(batches, ups):
        g, s = layer(idx, off, sc)
        assert not g.requires_grad and not s.requires_grad
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, snap[k], rtol=0, atol=0, msg=f"{k} changed while frozen")

    # only the global table frozen: the scenario table trains exactly as in an unfrozen twin
    layer.scenario_weight.requires_grad_(True)
    ref = twin(layer)
    train(layer, batches, ups)
    train(ref, batches, ups)
    torch.testing.assert_close(layer.global_weight, snap["global_weight"], rtol=0, atol=0)
    torch.testing.assert_close(layer.scenario_weight, ref.scenario_weight, rtol=0, atol=0)
    assert not torch.equal(layer.scenario_weight, snap["scenario_weight"])
    if optimizer == "rowwise_adagrad":
        torch.testing.assert_close(layer.global_state, snap["global_state"], rtol=0, atol=0)
        torch.testing.assert_close(layer.scenario_state, ref.scenario_state, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ 3. lr, wd, NaN

def test_lr_scheduler_drives_the_fused_optimizer():
    D = 4
    a = ScenarioEmbedding(FEATURES, 2, D, optimizer="rowwise_adagrad", lr=0.4)
    b, c = twin(a), twin(a)
    sched = torch.optim.lr_scheduler.StepLR(a.fused_optimizer, step_size=1, gamma=0.25)
    batches = [batch(a) for _ in range(2)]
    ups = upstreams(a, batches, D)
    for i, (bt, up) in enumerate(zip(batches, ups)):
        train(a, [bt], [up])
        a.fused_optimizer.step()
        sched.step()
        train(b, [bt], [up])
        b.lr = 0.4 * 0.25 ** (i + 1)
        train(c, [bt], [up])  # lr stays 0.4
    assert a.lr == pytest.approx(0.4 * 0.25 ** 2)
    torch.testing.assert_close(a.global_weight, b.global_weight, rtol=0, atol=0)
    assert not torch.allclose(a.global_weight, c.global_weight)
    # lr 0 leaves the tables unchanged: the kernels read the value set last
    a.lr = 0.0
    snap = a.global_weight.detach().clone()
    train(a, batches[:1], ups[:1])
    torch.testing.assert_close(a.global_weight, snap, rtol=0, atol=0)
    # the scheduler's state round-trips through the optimizer handle
    sd = a.fused_optimizer.state_dict()
    a.fused_optimizer.load_state_dict(sd)
    a.fused_optimizer.param_groups[0]["lr"] = 0.3
    assert a.lr == 0.3 and float(a._fused_hparams[0]) == 0.3


@pytest.mark.parametrize("device,backend", device_backends(OP))
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_weight_decay_matches_the_formula(device, backend, optimizer):
    """g' = g + wd * w on the touched rows; SGD w -= lr g'; Adagrad state += mean(g'^2), w -= lr g'/(sqrt(s)+eps)."""
    D, lr, eps, wd = 5, 0.3, 1e-3, 0.7
    layer = ScenarioEmbedding(FEATURES, 3, D, optimizer=optimizer, lr=lr, eps=eps, weight_decay=wd, backend=backend,
                              dtype=torch.float64)
    idx, off, sc = batch(layer, B=9)
    ug = torch.randn(9, 3, D, dtype=torch.float64)
    us = torch.randn(9, 2, D, dtype=torch.float64)
    # dense gradients from the plain op (float64), the update by the formula
    gw = layer.global_weight.detach().clone().requires_grad_()
    sw = layer.scenario_weight.detach().clone().requires_grad_()
    g, s = saml_kernels.scenario_embedding_bag(idx, off, sc, gw, sw, layer.feature_rows, layer.feature_scenario_rows,
                                               backend="reference")
    torch.autograd.backward([g, s], [ug, us])
    expected = []
    for w, grad in ((gw, gw.grad), (sw, sw.grad.reshape(-1, D))):
        w = w.detach().reshape(-1, D)
        touched = grad.abs().sum(1) > 0
        gp = grad + wd * w
        if optimizer == "sgd":
            new = w - lr * gp
        else:
            state = (gp * gp).mean(1).float().double()  # the row state is float32 by contract
            new = w - (lr / (state.sqrt() + eps)).unsqueeze(1) * gp
        expected.append(torch.where(touched.unsqueeze(1), new, w))
    assert bool((gw.grad.abs().sum(1) > 0).any())
    train(layer, [(idx, off, sc)], [(ug, us)])
    torch.testing.assert_close(layer.global_weight.detach(), expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.scenario_weight.detach().reshape(-1, D), expected[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", device_backends(OP))
def test_skip_nonfinite_leaves_tables_untouched(device, backend):
    D = 4
    layer = ScenarioEmbedding(FEATURES, 2, D, optimizer="rowwise_adagrad", skip_nonfinite=True, backend=backend)
    bt = batch(layer)
    (ug, us), = upstreams(layer, [bt], D)
    ug[0, 0, 0] = float("nan")
    snap = {k: v.clone() for k, v in layer.state_dict().items()}
    train(layer, [bt], [(ug, us)])
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, snap[k], rtol=0, atol=0, equal_nan=False)
    assert int(layer.nonfinite_steps) == 1
    # a finite step trains again
    (ug, us), = upstreams(layer, [bt], D)
    train(layer, [bt], [(ug, us)])
    assert not torch.equal(layer.global_weight, snap["global_weight"])
    assert int(layer.nonfinite_steps) == 1
    # without the option a NaN gradient reaches the touched rows, as with any optimizer (documented)
    plain = ScenarioEmbedding(FEATURES, 2, D, optimizer="sgd", backend=backend)
    ug.fill_(float("inf"))
    train(plain, [bt], [(ug, us)])
    assert not torch.isfinite(plain.global_weight).all()


# ------------------------------------------------------------------------------------------------ 4. backends

def test_unknown_backend_names_raise_backend_unavailable():
    G, S = torch.randn(5, 2), torch.randn(1, 5, 2)
    args = (torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([0]), G, S, [0, 5], [0, 5])
    with pytest.raises(_backend.BackendUnavailableError, match="bogus"):
        saml_kernels.scenario_embedding_bag(*args, backend="bogus")
    with pytest.raises(_backend.BackendUnavailableError, match="bogus"):
        with saml_kernels.use_backend("bogus"):
            pass
    with pytest.raises(_backend.BackendUnavailableError, match="bogus"):
        ScenarioEmbedding(FEATURES, 2, 4, backend="bogus")
    with pytest.raises(ValueError):  # still a ValueError for code written against earlier versions
        ScenarioEmbedding(FEATURES, 2, 4, backend="bogus")
    from saml_kernels.nn import MultiBranchLinear, MutualUnit, ScenarioAttention

    for make in (lambda: MultiBranchLinear(3, 4, 2, backend="bogus"), lambda: MutualUnit(3, 4, 2, backend="bogus"),
                 lambda: ScenarioAttention(4, 4, 2, backend="bogus")):
        with pytest.raises(_backend.BackendUnavailableError, match="bogus"):
            make()


def test_info_honours_the_env_request():
    env = dict(os.environ, SAML_KERNELS_BACKEND="reference", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "saml_kernels.info"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "'reference' from SAML_KERNELS_BACKEND" in out
    assert "cpu   SAML_KERNELS_BACKEND -> reference" in out
    assert "cpu   automatic ->" not in out


# ------------------------------------------------------------------------------------------------ 5. KJT by name

class KJT(FakeKJT):
    """FakeKJT (tests/test_scenario_embedding.py) that can also say it is variable-batch."""

    variable = False

    def variable_stride_per_key(self):
        return self.variable


def _kjt_from(layer, idx, off, order, extra=None, w=None):
    """A KJT holding the layer's features in ``order`` (plus an ``extra`` feature of random ids)."""
    F, B = layer.num_features, (off.numel() - 1) // layer.num_features
    names = layer.feature_names
    parts, lens, ws = [], [], []
    for name in order:
        if name == "extra":
            l = torch.randint(0, 3, (B,))
            parts.append(torch.randint(0, 1000, (int(l.sum()),)))
            lens.append(l)
            ws.append(torch.rand(int(l.sum())))
            continue
        f = names.index(name)
        a, b = int(off[f * B]), int(off[(f + 1) * B])
        parts.append(idx[a:b])
        lens.append(off[f * B + 1:(f + 1) * B + 1] - off[f * B:(f + 1) * B])
        ws.append(w[a:b] if w is not None else None)
    lengths = torch.cat(lens)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    weights = torch.cat(ws) if w is not None else None
    return KJT(order, torch.cat(parts), offsets, weights)


def test_kjt_keys_matched_by_name():
    layer = ScenarioEmbedding(FEATURES, 3, 4)
    idx, off, sc = batch(layer)
    w = torch.rand(idx.numel())
    expected = layer(idx, off, sc, per_sample_weights=w)
    for order in (["cat", "user", "item"], ["item", "extra", "cat", "user"]):
        got = layer(_kjt_from(layer, idx, off, order, w=w), sc)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"lack the layer's feature\(s\) \['item'\]"):
        layer(_kjt_from(layer, idx, off, ["cat", "user"]), sc)
    kjt = _kjt_from(layer, idx, off, ["user", "item", "cat"])
    kjt.variable = True
    with pytest.raises(ValueError, match="variable-batch"):
        layer(kjt, sc)


# ------------------------------------------------------------------------------------------------ 6. warnings

def test_sparse_gradients_emit_no_warning():
    layer = ScenarioEmbedding(FEATURES, 2, 4, sparse=True)
    idx, off, sc = batch(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g, s = layer(idx, off, sc)
        (g.sum() + s.sum()).backward()
        torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert layer.global_weight.grad.is_sparse


# ------------------------------------------------------------------------------------------------ 7. check modes

def _op_args(B=5, bad_id=False, bad_scenario=False):
    G, S = torch.randn(12, 4), torch.randn(3, 12, 4)
    idx = torch.randint(0, 6, (2 * B,))
    if bad_id:
        idx[3] = 6
    off = torch.arange(0, 2 * B + 1)
    sc = torch.randint(0, 3, (B,))
    if bad_scenario:
        sc[1] = 3
    return idx, off, sc, G, S, [0, 6, 12], [0, 6, 12]


@pytest.mark.parametrize("backend", ["cpu"])  # (the reference backend's own kernel reads the layout on the host)
def test_one_host_sync_per_op_call_and_one_per_deferred_block(backend):
    args = _op_args()
    saml_kernels.scenario_embedding_bag(*args, backend=backend)  # warm caches (layout tensors)
    # (a bare call on a GPU runs in its own deferred block; on the CPU, where reads are free, it reads at once)
    with SyncCounter() as c:
        with _checks.deferred_checks():
            saml_kernels.scenario_embedding_bag(*args, backend=backend)
    assert c.count == 1
    with SyncCounter() as c:
        with _checks.deferred_checks():
            for _ in range(3):
                saml_kernels.scenario_embedding_bag(*args, backend=backend)
    assert c.count == 1
    with SyncCounter() as c:
        with _checks.capture_safe_checks():
            saml_kernels.scenario_embedding_bag(*args, backend=backend)
    assert c.count == 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_deferred_block_raises_the_ops_own_error(backend):
    with pytest.raises(IndexError, match=r"indices\[3\] = 6 is out of range for feature 0"):
        with _checks.deferred_checks():
            saml_kernels.scenario_embedding_bag(*_op_args(bad_id=True), backend=backend)
    with pytest.raises(IndexError, match=r"scenario\[1\] = 3 is out of range \[0, 3\)"):
        with _checks.deferred_checks():
            saml_kernels.scenario_embedding_bag(*_op_args(bad_scenario=True), backend=backend)
    idx, off, sc, G, S, fr, fsr = _op_args()
    off[2] = 0
    with pytest.raises(ValueError, match="non-decreasing"):
        with _checks.deferred_checks():
            saml_kernels.scenario_embedding_bag(idx, off, sc, G, S, fr, fsr, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_capture_safe_counts_and_makes_inputs_safe(backend):
    _checks.raise_errors()  # start from zero counters
    idx, off, sc, G, S, fr, fsr = _op_args(bad_id=True, bad_scenario=True)
    with _checks.capture_safe_checks():
        g, s = saml_kernels.scenario_embedding_bag(idx, off, sc, G, S, fr, fsr, backend=backend)
    zero_g, zero_s = saml_kernels.scenario_embedding_bag(idx, off, sc.clamp(0, 2), G, S, fr, fsr,
                                                         bounds_check="zero", backend=backend)
    torch.testing.assert_close(g, zero_g, rtol=0, atol=0)
    torch.testing.assert_close(s, zero_s, rtol=0, atol=0)
    counts = {k: int(v) for k, v in _checks.error_counts("cpu").items() if int(v)}
    assert any("scenario id out of range" in k for k in counts) and any("feature's range" in k for k in counts)
    with pytest.raises(ValueError, match="capture-safe"):
        _checks.raise_errors()
    _checks.raise_errors()  # reset: nothing left


def test_capture_safe_fused_update_skips_a_step_with_bad_input():
    _checks.raise_errors()
    layer = ScenarioEmbedding([("a", 6, True), ("b", 6, True)], 3, 4, optimizer="rowwise_adagrad", backend="cpu")
    idx, off, sc, *_ = _op_args(bad_scenario=True)
    snap = {k: v.clone() for k, v in layer.state_dict().items()}
    with _checks.capture_safe_checks():
        g, s = layer(idx, off, sc)
        (g.sum() + s.sum()).backward()
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, snap[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="scenario id out of range"):
        _checks.raise_errors()
    idx, off, sc, *_ = _op_args()
    with _checks.capture_safe_checks():
        g, s = layer(idx, off, sc)
        (g.sum() + s.sum()).backward()
    assert not torch.equal(layer.global_weight, snap["global_weight"])
