"""Issue 26: fast by default at production table sizes.

- The models' default embedding optimizer is the fused row-wise Adagrad, and the reference twins' default keeps
  the same states (updated by TrainingOptimizer after the backward), so ``SAML(cfg)`` and ``SAMLReference(cfg)``
  stay twins by default.
- TrainingOptimizer.step() on a non-fused table updates only the rows that can change
  (``training.rowwise_adagrad_rows_``), bitwise equal to the old full-table computation on every row, for dense
  and sparse (coalesced or not) gradients and float32 / float64 / bfloat16 / float16 tables, and without any
  table-sized float tensor (the old step made several).
- A table above ``DENSE_GRAD_WARN_ROWS`` rows with dense gradients warns once; at the threshold it does not.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saml_kernels import training
from saml_kernels.data import make_synthetic
from saml_kernels.nn import HMoE, HMoEConfig, SAML, SAMLConfig, ScenarioEmbedding, SharedBottom, STAR, STARConfig
from saml_kernels.ops.embedding_optimizer import rowwise_adagrad_step
from saml_kernels.reference import HMoEReference, SAMLReference, SharedBottomReference, STARReference
from saml_kernels.training import DenseTableGradientWarning, TrainingOptimizer, rowwise_adagrad_rows_

LR, EPS = 0.07, 1e-8
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so -0.0 != +0.0 and NaN payloads compare)."""
    return t.contiguous().view(_BITS[t.element_size()])


def full_table_step(w: torch.Tensor, grad: torch.Tensor, st: torch.Tensor, lr: float, eps: float) -> None:
    """The full-table form of TrainingOptimizer.step()'s table update (the whole table converted and updated): the
    row-selective step must equal it bit for bit."""
    g = grad.to_dense() if grad.is_sparse else grad
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    w_new, st_new = rowwise_adagrad_step(w.to(acc), g.to(acc), st, lr, eps)
    st.copy_(st_new)
    w.copy_(w_new)


def _table(shape, dtype):
    """A table with some exact -0.0 and +0.0 entries (the sign of zero is where a sloppy skip would show)."""
    w = torch.randn(shape, dtype=torch.float64).to(dtype)
    flat = w.view(-1)
    flat[torch.randperm(flat.numel())[: flat.numel() // 10]] = -0.0
    flat[torch.randperm(flat.numel())[: flat.numel() // 20]] = 0.0
    st = torch.rand(shape[:-1]) * 3  # non-trivial states; a few zero
    st.view(-1)[torch.randperm(st.numel())[: st.numel() // 5]] = 0.0
    return w, st


def _gradient(shape, dtype, kind):
    """A gradient touching ~1/3 of the rows; among the touched rows some all-zero, some with -0.0 entries only,
    some with a mix. kind: "dense" | "sparse" (coalesced, as the layer gives) | "uncoalesced" (repeated rows)."""
    rows_shape, D = shape[:-1], shape[-1]
    R = int(np.prod(rows_shape))
    touched = torch.randperm(R)[: max(R // 3, 4)]
    vals = torch.randn(touched.numel(), D, dtype=torch.float64).to(dtype)
    special = [lambda v: v.fill_(0.0),                  # touched, zero gradient
               lambda v: v.fill_(-0.0),                 # touched, -0.0 everywhere (not skippable bitwise)
               lambda v: v[::2].fill_(-0.0),            # a mix
               lambda v: v[1::2].fill_(0.0)]
    for k, f in enumerate(special[:touched.numel() - 1]):  # (a one-row table keeps a non-zero gradient)
        f(vals[k])
    if kind == "uncoalesced":            # every touched row twice (and the repeats in another order)
        perm = torch.randperm(touched.numel())
        more = torch.randn(touched.numel(), D, dtype=torch.float64).to(dtype)
        touched, vals = torch.cat([touched, touched[perm]]), torch.cat([vals, more])
    idx = torch.stack(torch.unravel_index(touched, rows_shape)) if len(rows_shape) > 1 else touched.unsqueeze(0)
    g = torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True)
    if kind == "sparse":
        return g.coalesce()
    if kind == "uncoalesced":
        assert not g.is_coalesced()
        return g
    return g.to_dense()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["dense", "sparse", "uncoalesced"])
@pytest.mark.parametrize("shape", [(300, 8), (3, 70, 5), (1, 4)], ids=["global", "scenario", "one_row"])
def test_row_step_bitwise_equals_full_table_step(dtype, kind, shape):
    w, st = _table(shape, dtype)
    w_old, st_old = w.clone(), st.clone()
    before_w, before_st = w.clone(), st.clone()
    for _ in range(3):  # a few steps: the states grow and differ per row
        g = _gradient(shape, dtype, kind)
        full_table_step(w_old, g, st_old, LR, EPS)
        rowwise_adagrad_rows_(w, g, st, LR, EPS)
        assert torch.equal(bits(w), bits(w_old)), f"weights differ from the full-table step ({dtype}, {kind})"
        assert torch.equal(bits(st), bits(st_old)), f"states differ from the full-table step ({dtype}, {kind})"
    assert not torch.equal(bits(w), bits(before_w)) and not torch.equal(bits(st), bits(before_st))


def test_rows_without_gradient_stay_untouched_even_with_a_nan_state():
    """The one documented difference from the full-table step: a row nobody touched keeps its values even when its
    state is NaN (the full-table step wrote NaN there: 0 / NaN)."""
    w, st = _table((50, 4), torch.float32)
    st[7] = float("nan")
    g = torch.zeros_like(w)
    g[3] = 1.0
    w0, st0 = w.clone(), st.clone()
    rowwise_adagrad_rows_(w, g, st, LR, EPS)
    keep = torch.ones(50, dtype=torch.bool)
    keep[3] = False
    assert torch.equal(bits(w[keep]), bits(w0[keep])) and torch.equal(bits(st[keep]), bits(st0[keep]))
    assert not torch.equal(w[3], w0[3])


def _optimizer(emb, **kw):
    """TrainingOptimizer of an embedding layer (with a stand-in dense parameter: Adam needs one)."""
    return TrainingOptimizer(torch.nn.ModuleList([emb, torch.nn.Linear(1, 1)]), **kw)


class _BigTensors(TorchDispatchMode):
    """Records every new float tensor (not a view or in-place result) of at least ``limit`` elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values())
                  if isinstance(a, torch.Tensor) and a.layout == torch.strided}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            if t.untyped_storage().data_ptr() in inputs:  # a view or an in-place write, not a new tensor
                continue
            if t.is_floating_point() and t.numel() >= self.limit:
                self.seen.append((str(func), tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("sparse", [True, False])
def test_step_makes_no_table_sized_float_tensor(sparse):
    """The old step converted every table to float32 and wrote whole [R, D] updates (several table-sized
    tensors per table); now a sparse gradient costs O(touched rows), a dense one a bool scan of its bits."""
    emb = ScenarioEmbedding([("user", 20_000, True), ("item", 30_000)], 2, 8, sparse=sparse, optimizer=None,
                            dtype=torch.bfloat16)
    opt = _optimizer(emb, embedding_lr=LR)
    idx = torch.randint(0, 20_000, (64,))
    g, s = emb(torch.cat([idx, idx]), torch.arange(2 * 64 + 1), torch.randint(0, 2, (64,)))
    (g.float().square().sum() + s.float().sum()).backward()
    assert emb.global_weight.grad.is_sparse == sparse
    with _BigTensors(limit=10_000) as seen:
        opt.step()
    assert not seen.seen, f"table-sized float tensors made by the step: {seen.seen}"


def _wide_embedding(rows: int) -> ScenarioEmbedding:
    return ScenarioEmbedding([("id", rows)], 1, 1, optimizer=None)


def _dense_step(emb, opt):
    opt.zero_grad()
    g, _ = emb(torch.tensor([0, 5, rows_last(emb)]), torch.tensor([0, 1, 3]), torch.tensor([0, 0]))
    g.sum().backward()
    opt.step()


def rows_last(emb):
    return emb.global_weight.shape[0] - 1


def test_large_dense_table_warns_once():
    emb = _wide_embedding(training.DENSE_GRAD_WARN_ROWS + 1)
    opt = _optimizer(emb)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            _dense_step(emb, opt)
        _optimizer(emb).step()  # a second optimizer on the same table: still warned already
    msgs = [str(r.message) for r in rec if issubclass(r.category, DenseTableGradientWarning)]
    assert len(msgs) == 1, msgs
    assert "1,000,001 rows" in msgs[0] and "embedding_optimizer='rowwise_adagrad'" in msgs[0]
    assert "sparse=True" in msgs[0]


def test_table_at_the_threshold_or_sparse_does_not_warn():
    at = _wide_embedding(training.DENSE_GRAD_WARN_ROWS)
    big_sparse = ScenarioEmbedding([("id", training.DENSE_GRAD_WARN_ROWS + 1)], 1, 1, sparse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseTableGradientWarning)
        for emb in (at, big_sparse):
            opt = _optimizer(emb)
            for _ in range(2):
                _dense_step(emb, opt)


# ---------------------------------------------------------------------------------------------- the defaults

def _data():
    return make_synthetic(300, num_users=50, num_items=60, num_categories=7, num_contexts=5, num_segments=6,
                          num_tags=11, seq_len=5, seed=3)


def _pairs(d):
    saml = SAMLConfig.from_data(d, embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6),
                                mutual_layers=(0,))
    star = STARConfig.from_data(d, embedding_dim=8, attention_dim=4, hidden=(12,), aux_dim=4, aux_hidden=8)
    hmoe = HMoEConfig.from_data(d, embedding_dim=8, attention_dim=4, expert_hidden=(12,), num_experts=2, tower_hidden=6)
    return [(SAML, SAMLReference, saml), (SharedBottom, SharedBottomReference, saml), (STAR, STARReference, star),
            (HMoE, HMoEReference, hmoe)]


def test_models_default_to_the_fused_rowwise_adagrad_and_the_twins_keep_its_states():
    d = _data()
    for fast_cls, ref_cls, cfg in _pairs(d):
        fast, ref = fast_cls(cfg), ref_cls(cfg)
        embs = [m for m in fast.modules() if isinstance(m, ScenarioEmbedding)]
        assert embs and all(m.optimizer == "rowwise_adagrad" and m.fused_optimizer is not None for m in embs)
        assert all(m.lr == 0.05 and m.eps == 1e-8 for m in embs)
        sf, sr = fast.state_dict(), ref.state_dict()
        assert list(sf) == list(sr) and any(k.endswith("global_state") for k in sf), fast_cls.__name__
        assert not TrainingOptimizer(fast).tables  # nothing left to the optimizer's table step
        # the plain-gradient path stays available
        plain = fast_cls(cfg, embedding_optimizer=None)
        assert all(m.optimizer is None for m in plain.modules() if isinstance(m, ScenarioEmbedding))


def test_default_twins_train_alike():
    """SAML(cfg) (fused in its backward) and SAMLReference(cfg) (dense gradients, TrainingOptimizer's row step)
    with the default optimizers and TrainingOptimizer's default embedding_lr stay equal step after step."""
    d = _data()
    for fast_cls, ref_cls, cfg in _pairs(d):
        ref = ref_cls(cfg)
        fast = fast_cls(cfg)
        fast.load_state_dict(ref.state_dict())
        of, orf = TrainingOptimizer(fast), TrainingOptimizer(ref)
        for rows in (np.arange(0, 120), np.arange(120, 240), np.arange(60, 180)):
            b = d.batch(rows)
            for m, o in ((fast, of), (ref, orf)):
                o.zero_grad()
                m.loss(b).backward()
                o.step()
        sf, sr = fast.state_dict(), ref.state_dict()
        for k in sf:
            torch.testing.assert_close(sf[k], sr[k], atol=1e-4, rtol=1e-3, msg=f"{fast_cls.__name__} {k}")


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_optimizer_on_layer_gradients_bitwise_equals_full_table(sparse, dtype):
    """The layer's own gradients (sparse: coalesced per backward, accumulated uncoalesced over two backward calls;
    or dense), through TrainingOptimizer.step, against the old full-table update on a copy."""
    emb = ScenarioEmbedding([("user", 500, True), ("item", 700)], 3, 8, sparse=sparse, optimizer=None, dtype=dtype)
    opt = _optimizer(emb, embedding_lr=LR)
    tables = [(emb.global_weight, torch.zeros(1200)), (emb.scenario_weight, torch.zeros(3, 500))]
    copies = [(w.detach().clone(), st.clone()) for w, st in tables]
    for _ in range(3):
        opt.zero_grad()
        for _ in range(2):  # two backward calls before one step: the gradients accumulate
            B = 32
            idx = torch.cat([torch.randint(0, 500, (B,)), torch.randint(0, 700, (B,))])
            g, s = emb(idx, torch.arange(2 * B + 1), torch.randint(0, 3, (B,)))
            (g.float().square().sum() + (s.float() * torch.randn_like(s.float())).sum()).backward()
        assert emb.global_weight.grad.is_sparse == sparse
        if sparse:  # the sum of two backward calls' coalesced gradients: repeated rows
            assert not emb.global_weight.grad.is_coalesced()
        grads = [emb.global_weight.grad.clone(), emb.scenario_weight.grad.clone()]
        opt.step()
        for (w_old, st_old), g in zip(copies, grads):
            full_table_step(w_old, g, st_old, LR, EPS)
    own = [st for _, st in opt.tables]  # the states TrainingOptimizer keeps for the two tables, in order
    assert all(a is b for (a, _), b in zip(opt.tables, (emb.global_weight, emb.scenario_weight)))
    for (w, _), st, (w_old, st_old) in zip(tables, own, copies):
        assert torch.equal(bits(w.detach()), bits(w_old)) and torch.equal(bits(st), bits(st_old))
