"""TorchRec adapter (saml_kernels/torchrec.py, docs/distributed.md).

* Layout: a ScenarioEmbedding's tables become TorchRec tables ``f`` / ``f__scenario`` and back, bitwise.
* The id transform: an (unsharded) EmbeddingBagCollection lookup of the remapped KeyedJaggedTensor equals the
  fused op's (E_g, E_s) for sum / mean / none pooling, per-sample weights, int32 / int64 ids, empty bags, KJT
  input; its table gradients are the fused op's gradients in the TorchRec layout. Bad inputs raise naming the
  argument, position and value.
* Sharded (2 processes, gloo, CPU): ``shard_saml`` with table-wise and row-wise sharding gives the forward outputs
  of single-process ``SAML`` and, after a few steps with the same optimizer (fused SGD + SGD; FBGEMM's fused
  row-wise Adagrad + Adam vs ``TrainingOptimizer``), the same parameters within fp32 rounding, also with
  TorchRec's gradient division off; a mean-pooled layer sharded both ways and as the planner chooses matches one
  process.
* A trained model sharded (1 and 2 processes): several fused row-wise Adagrad steps in one process, then
  ``shard_saml``: weights and row-wise states round-trip bitwise through ``unsharded_state_dict``, and the next
  step equals a float64 oracle (written apart from the kernels) within fp32 rounding, for table- and row-wise
  sharding. The layer options ``skip_nonfinite`` (a NaN on one rank skips the step everywhere) and
  ``bounds_check="zero"`` carry over; the others are rejected naming the option.

Skipped with the reason when torchrec / FBGEMM do not import (requirements-torchrec.txt installs them).
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import free_port as _free_port, spawn_checked

try:
    import saml_kernels.torchrec as T
except ImportError as e:  # torchrec / fbgemm missing or not loadable beside this torch
    pytest.skip(f"saml_kernels.torchrec unavailable: {e}", allow_module_level=True)

from saml_kernels.nn import SAML, ScenarioEmbedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
SIZES = (11, 5, 7)
AWARE = (True, False, True)
M, D = 3, 4


def _layer(pooling, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ScenarioEmbedding([(n, s, a, pooling) for n, s, a in zip("abc", SIZES, AWARE)], M, D, dtype=dtype)


def _inputs(pooling, B=6, L=3, index_dtype=torch.int64, seed=1):
    """Random feature-major ids with empty bags (not for "none"), scenario ids, weights."""
    g = torch.Generator().manual_seed(seed)
    F = len(SIZES)
    lens = torch.full((F * B,), L) if pooling == "none" else torch.randint(0, 4, (F * B,), generator=g)
    if pooling != "none" and F * B:
        lens[0] = 0
    ids = torch.cat([torch.randint(0, n, (int(lens[f * B:(f + 1) * B].sum()),), generator=g)
                     for f, n in enumerate(SIZES)])
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    return (ids.to(index_dtype), off.to(index_dtype), torch.randint(0, M, (B,), generator=g).to(index_dtype),
            torch.rand(ids.numel(), generator=g) + 0.5)


# ====================================================================================== single process

def test_configs_names_and_round_trip():
    emb = _layer("sum")
    cfgs = T.embedding_bag_configs(emb)
    assert [(c.name, c.num_embeddings, c.feature_names) for c in cfgs] == [
        ("a", 11, ["a"]), ("b", 5, ["b"]), ("c", 7, ["c"]), ("a__scenario", 33, ["a__scenario"]),
        ("c__scenario", 21, ["c__scenario"])]
    tr = T.TorchRecScenarioEmbedding(emb)
    w = dict(tr.ebc.named_parameters())
    assert torch.equal(w["embedding_bags.a__scenario.weight"][2 * 11 + 4], emb.scenario_weight[2, 4])
    assert torch.equal(w["embedding_bags.c__scenario.weight"][1 * 7 + 6], emb.scenario_weight[1, 11 + 6])
    assert torch.equal(w["embedding_bags.c.weight"][3], emb.global_weight[11 + 5 + 3])
    gw, sw = tr.scenario_embedding_weights()
    assert torch.equal(gw, emb.global_weight) and torch.equal(sw, emb.scenario_weight)
    # load_tables writes the weights the lookup reads
    new = {k: torch.randn_like(v) for k, v in T.table_weights(emb).items()}
    tr.load_tables(new)
    assert all(torch.equal(tr.tables()[k], v) for k, v in new.items())


def test_unsupported_layouts_raise():
    with pytest.raises(ValueError, match="collides"):
        T.embedding_bag_configs(ScenarioEmbedding([("a", 3, True), ("a__scenario", 4)], 2, 4))
    with pytest.raises(ValueError, match="cannot contain '.'"):
        T.embedding_bag_configs(ScenarioEmbedding([("user.id", 3, True)], 2, 4))
    with pytest.raises(ValueError, match="dtype"):
        T.embedding_bag_configs(_layer("sum", torch.bfloat16))
    with pytest.raises(ValueError, match="weighted=True needs pooling 'sum'"):
        T.TorchRecScenarioEmbedding(_layer("mean"), weighted=True)
    with pytest.raises(TypeError, match="ScenarioEmbedding"):
        T.TorchRecScenarioEmbedding(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False), ("none", False)])
def test_lookup_and_gradients_match_fused_op(pooling, weighted, index_dtype, dtype):
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    emb = _layer(pooling, dtype)
    tr = T.TorchRecScenarioEmbedding(emb, weighted=weighted)
    ids, off, sc, psw = _inputs(pooling, index_dtype=index_dtype)
    psw = psw if weighted else None
    out = tr(ids, off, sc, psw)
    ref = emb(ids, off, sc, psw)
    # float64 oracle of the fused op on the same tables
    ref64 = ScenarioEmbedding(emb.features, M, D, dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in emb.state_dict().items()})
    oracle = ref64(ids, off, sc, None if psw is None else psw.double())
    for name, o, r, r64 in zip(("E_g", "E_s"), out, ref, oracle):
        assert o.shape == r.shape and o.dtype == r.dtype == dtype, f"{name}: {o.shape}/{o.dtype} vs {r.shape}/{r.dtype}"
        torch.testing.assert_close(o.double(), r64, **tol, msg=lambda m: f"{pooling} {name}: {m}")
        torch.testing.assert_close(o, r, **tol)
    gy = [torch.randn_like(o) for o in out]
    torch.autograd.backward(out, gy)
    torch.autograd.backward(ref, gy)
    grad_layer = ScenarioEmbedding(emb.features, M, D, dtype=dtype)
    with torch.no_grad():  # the fused op's table gradients, put in the TorchRec layout
        grad_layer.global_weight.copy_(emb.global_weight.grad)
        grad_layer.scenario_weight.copy_(emb.scenario_weight.grad)
    want = T.table_weights(grad_layer)
    got = {n.split(".")[-2]: p.grad for n, p in tr.ebc.named_parameters()}
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=10 * tol["atol"], rtol=10 * tol["rtol"],
                                   msg=lambda m: f"grad of table {k}: {m}")


def test_kjt_input_any_key_order_and_empty_batch():
    from torchrec import KeyedJaggedTensor

    emb = _layer("sum")
    tr = T.TorchRecScenarioEmbedding(emb)
    ids, off, sc, _ = _inputs("sum")
    B = sc.numel()
    lengths = off.diff().view(3, B)
    cuts = off[torch.arange(4) * B].tolist()
    # keys in another order plus an extra key the layer ignores
    kjt = KeyedJaggedTensor(keys=["c", "a", "extra", "b"],
                            values=torch.cat([ids[cuts[2]:cuts[3]], ids[cuts[0]:cuts[1]], torch.tensor([7, 8]),
                                              ids[cuts[1]:cuts[2]]]),
                            lengths=torch.cat([lengths[2], lengths[0], torch.tensor([2] + [0] * (B - 1)), lengths[1]]))
    for o, r in zip(tr(kjt, sc), emb(ids, off, sc)):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-6)
    vbe = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.tensor([1, 2, 3, 4]),
                            lengths=torch.tensor([1, 1, 1, 0, 1, 0]), stride_per_key_per_rank=[[1], [2], [3]])
    with pytest.raises(ValueError, match="variable-batch"):
        tr(vbe, sc[:1])
    e_g, e_s = tr(torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert e_g.shape == (0, 3, D) and e_s.shape == (0, 2, D)


def test_non_contiguous_inputs():
    emb = _layer("sum")
    tr = T.TorchRecScenarioEmbedding(emb, weighted=True)
    ids, off, sc, psw = _inputs("sum")
    spread = lambda t: torch.stack([t, torch.full_like(t, -7)], 1)[:, 0]  # noqa: E731  (stride 2, poisoned gaps)
    args = [spread(t) for t in (ids, off, sc, psw)]
    assert not any(a.is_contiguous() for a in args)
    for o, r in zip(tr(*args), emb(ids, off, sc, psw)):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case,match", [
    ("id_high", r"indices\[\d+\] = 11 is out of range for feature 'a'"),
    ("id_negative", r"indices\[\d+\] = -1 is out of range for feature 'b'"),
    ("scenario", r"scenario\[2\] = 3 is out of range \[0, 3\)"),
    ("offsets_len", r"offsets must have F\*B \+ 1 = 19 entries"),
    ("offsets_end", r"offsets must run from 0 to indices.numel\(\)"),
    ("offsets_decreasing", r"offsets must be non-decreasing"),
    ("weights_unweighted", r"built without weighted=True"),
    ("float_ids", r"indices must have dtype"),
])
def test_bad_inputs_raise_and_change_nothing(case, match):
    emb = _layer("sum")
    tr = T.TorchRecScenarioEmbedding(emb)
    before = {k: v.clone() for k, v in tr.tables().items()}
    ids, off, sc, psw = _inputs("sum")
    psw = None
    if case == "id_high":
        ids[int(off[1])] = 11  # feature a, sample 1 (bag 0 is empty)
    elif case == "id_negative":
        assert int(off[12]) > int(off[6]), "the test input needs an id of feature b (bags 6..11)"
        ids[int(off[6])] = -1
    elif case == "scenario":
        sc[2] = 3
    elif case == "offsets_len":
        off = off[:-1]
    elif case == "offsets_end":
        off = off.clone()
        off[-1] += 1
    elif case == "offsets_decreasing":
        off = off.clone()
        off[3] = off[4] + 1
    elif case == "weights_unweighted":
        psw = torch.ones(ids.numel())
    elif case == "float_ids":
        ids = ids.float()
    with pytest.raises((ValueError, TypeError), match=match):
        tr(ids, off, sc, psw)
    for k, v in tr.tables().items():
        assert torch.equal(v, before[k]), f"table {k} changed by a rejected input"


def test_pooling_none_needs_fixed_length():
    tr = T.TorchRecScenarioEmbedding(_layer("none"))
    ids, off, sc, _ = _inputs("none")
    off = off.clone()
    off[1:4] += torch.tensor([1, 1, 0])  # bag 0 one longer, bag 2 one shorter
    with pytest.raises(ValueError, match=r"pooling 'none' needs every bag of one length"):
        tr(ids, off, sc)


def test_shard_saml_rejects_bad_arguments_before_any_collective():
    from saml_kernels.nn import SAMLConfig

    cfg = SAMLConfig(features=[("u", 5, True), ("i", 6, False)], num_scenarios=2, embedding_dim=4,
                     aux_hidden=(8,), branch_hidden=(8,), mutual_layers=())
    with pytest.raises(ValueError, match="no ScenarioEmbedding"):
        T.shard_saml(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        T.shard_saml(SAML(cfg, embedding_optimizer=None))  # built without a fused optimizer, none passed
    with pytest.raises(ValueError, match="sharding_types must be"):
        T.shard_saml(SAML(cfg, embedding_optimizer="sgd"), sharding_types=["diagonal"])
    with pytest.raises(ValueError, match="sharding_types must be"):  # not the fused-optimizer math (docstring)
        T.shard_saml(SAML(cfg, embedding_optimizer="sgd"), sharding_types=["column_wise"])
    model = SAML(cfg, embedding_optimizer="sgd")
    model.embedding.fused_optimizer.param_groups[0]["weight_decay"] = 0.1
    with pytest.raises(ValueError, match="weight_decay"):
        T.shard_saml(model)
    assert isinstance(model.embedding, ScenarioEmbedding), "a rejected call must leave the model unchanged"
    model = SAML(cfg, embedding_optimizer="sgd")
    model.embedding.scenario_weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"embedding.scenario_weight is frozen \(requires_grad=False\)"):
        T.shard_saml(model)
    model = SAML(cfg, embedding_optimizer="rowwise_adagrad")
    with torch.no_grad():
        model.embedding.global_state[3] = 0.5  # a trained state that sharding with SGD would drop
    with pytest.raises(ValueError, match="embedding holds trained row-wise Adagrad states, which optimizer='sgd'"):
        T.shard_saml(model, optimizer="sgd")
    assert isinstance(model.embedding, ScenarioEmbedding), "a rejected call must leave the model unchanged"


# ====================================================================================== two processes

def _example():
    """python/ddp_example.py as module ``ddp_example`` (its dir goes on sys.path, which spawned children inherit)."""
    path = os.path.join(ROOT, "python")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("ddp_example")


def _recipes(model, optimizer, lr, embedding_lr, dense_params=None):
    """The dense optimizer of each recipe: SGD beside fused SGD; TrainingOptimizer's Adam beside fused row-wise
    Adagrad (``dense_params`` given: the sharded model's dense parameters, same Adam settings)."""
    from saml_kernels.training import TrainingOptimizer

    if optimizer == "sgd":
        params = dense_params if dense_params is not None else [
            p for n, p in model.named_parameters() if not n.endswith(("global_weight", "scenario_weight"))]
        return torch.optim.SGD(params, lr=lr)
    if dense_params is None:
        return TrainingOptimizer(model, lr=lr, embedding_lr=embedding_lr)
    ref = TrainingOptimizer(torch.nn.Linear(1, 1), lr=lr).dense  # the recipe's Adam flavour (fused or foreach)
    flavour = {k: ref.defaults[k] for k in ("fused", "foreach") if ref.defaults.get(k)}
    return torch.optim.Adam(dense_params, lr=lr, **flavour)


CASES = [  # (sharding, fused optimizer, TorchRec's gradient division)
    ("table_wise", "sgd", True), ("row_wise", "sgd", True), ("table_wise", "rowwise_adagrad", True),
    ("row_wise", "rowwise_adagrad", True), ("row_wise", "sgd", False)]


def _sharded_worker(rank, world, port):
    from torchrec.distributed import comm_ops

    ex = _example()
    ex._setup(rank, world, port)
    try:
        data, cfg = ex.make_problem(0, n=256)
        batches = list(data.batches(64))[:3]
        elr = 0.1
        torch.manual_seed(0)
        init = SAML(cfg).state_dict()
        for sharding, optimizer, division in CASES:
            tag = f"{sharding}/{optimizer}/gradient_division={division} rank {rank}"
            lr = 0.05 if optimizer == "sgd" else 0.01
            comm_ops.set_gradient_division(division)
            torch.manual_seed(0)
            single = SAML(cfg, embedding_optimizer=optimizer, embedding_lr=elr)
            torch.manual_seed(0)
            dmp = T.shard_saml(SAML(cfg, embedding_optimizer=optimizer, embedding_lr=elr), sharding_types=[sharding])
            kinds = {p.sharding_type for plan in dmp.plan.plan.values() for p in plan.values()}
            assert kinds == {sharding}, f"{tag}: the plan uses {kinds}"
            opt_single = _recipes(single, optimizer, lr, elr)
            opt_dmp = _recipes(None, optimizer, lr, elr, T.dense_parameters(dmp))
            for step, gb in enumerate(batches):
                b = ex._slice(gb, rank, world)
                main, aux = dmp(*b.inputs())
                main_1, aux_1 = single(*gb.inputs())
                lo, hi = rank * len(b), (rank + 1) * len(b)
                for name, o, r in (("main", main, main_1), ("aux", aux, aux_1)):
                    torch.testing.assert_close(o, r[lo:hi].detach(), atol=2e-5, rtol=2e-5,
                                               msg=lambda m: f"{tag} step {step} {name} logits: {m}")
                for opt, m, a, label in ((opt_dmp, main, aux, b.label), (opt_single, main_1, aux_1, gb.label)):
                    opt.zero_grad()
                    ex.saml_loss(m, a, label, cfg.aux_loss_weight).backward()
                    opt.step()
            got = T.unsharded_state_dict(dmp)
            want = dict(single.state_dict())  # row-wise Adagrad states included
            assert set(got) == set(want), f"{tag}: keys differ {sorted(set(got) ^ set(want))}"
            for k in want:  # every parameter (and state) moved, else equality proves nothing about it
                before = init.get(k, torch.zeros_like(want[k]))  # (states start at zero)
                assert not torch.equal(want[k], before), f"{tag}: training did not move {k}"
                torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=2e-5,
                                           msg=lambda m: f"{tag}: parameter {k} after {len(batches)} steps: {m}")
        _check_sharded_mean_pooling(rank, world)
        dist.barrier()
    finally:
        comm_ops.set_gradient_division(True)
        dist.destroy_process_group()


class _Holder(torch.nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb

    def forward(self, *args):
        return self.emb(*args)


def _check_sharded_mean_pooling(rank, world):
    """Mean pooling (SAML's features sum) sharded row- and table-wise: outputs on each rank's own batch, and the
    fused SGD update equals one process's update from the mean of the ranks' losses."""
    def loss(out):
        return out[0].square().sum() + 0.5 * out[1].sum()

    for sharding in ("row_wise", "table_wise", None):  # None: the planner's choice among SHARDING_TYPES
        torch.manual_seed(0)
        single = ScenarioEmbedding([(n, s, a, "mean") for n, s, a in zip("abc", SIZES, AWARE)], M, D,
                                   optimizer="sgd", lr=0.5)
        torch.manual_seed(0)
        dmp = T.shard_saml(_Holder(ScenarioEmbedding(single.features, M, D, optimizer="sgd", lr=0.5)),
                           sharding_types=[sharding] if sharding else None)
        kinds = {p.sharding_type for plan in dmp.plan.plan.values() for p in plan.values()}
        assert kinds <= set(T.SHARDING_TYPES) and (sharding is None or kinds == {sharding}), kinds
        before = single.global_weight.detach().clone()
        ids, off, sc, _ = _inputs("mean", seed=10 + rank)
        out = dmp(ids, off, sc)
        for o, r in zip(out, single(ids, off, sc)):
            torch.testing.assert_close(o, r.detach(), atol=1e-6, rtol=1e-6, msg=lambda m: f"{sharding} mean: {m}")
        loss(out).backward()
        # one process: every rank's batch, loss averaged over the ranks, one backward (one fused update)
        (sum(loss(single(*_inputs("mean", seed=10 + r)[:3])) for r in range(world)) / world).backward()
        got = T.unsharded_state_dict(dmp)
        assert not torch.equal(single.global_weight, before), "the step must move the tables"
        for k in ("global_weight", "scenario_weight"):  # lr 0.5 on unit-order rows: fp32 rounding ~1e-6
            torch.testing.assert_close(got[f"emb.{k}"], getattr(single, k).detach(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{sharding} mean pooling, {k} after one step: {m}")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed/gloo missing")
def test_sharded_saml_matches_single_process(tmp_path):
    _example()
    spawn_checked(_sharded_worker, (WORLD, _free_port()), WORLD, tmp_path)


# ============================================================ a trained model sharded: states and layer options

LR, EPS = 0.1, 1e-8
GLOBAL_B = 8  # global batch; every rank takes a contiguous share


class _Pair(torch.nn.Module):
    """Two fused row-wise Adagrad layers as in SAML (``embedding`` sum-pooled, ``sequence_embedding`` mean-pooled,
    distinct feature names) on the same ids."""

    def __init__(self, dtype=torch.float32, optimizer="rowwise_adagrad", **options):
        super().__init__()
        kw = dict(dtype=dtype, optimizer=optimizer, lr=LR, eps=EPS, **options) if optimizer else dict(
            dtype=dtype, **{k: v for k, v in options.items() if k == "bounds_check"})
        self.embedding = ScenarioEmbedding([(n, s, a, "sum") for n, s, a in zip("abc", SIZES, AWARE)], M, D, **kw)
        self.sequence_embedding = ScenarioEmbedding([(n, s, a, "mean") for n, s, a in zip("xyz", SIZES, AWARE)], M,
                                                    D, **kw)

    def forward(self, ids, off, sc):
        return self.embedding(ids, off, sc) + self.sequence_embedding(ids, off, sc)


def _pair_loss(outs, scale=1.0):
    """Mean over the samples of a loss with a state-dependent gradient (squares) touching every output."""
    per_sample = sum(o.double().square().sum(tuple(range(1, o.dim()))) * (k + 1) + 0.3 * o.double().sum(
        tuple(range(1, o.dim()))) for k, o in enumerate(outs))
    return (per_sample.mean() * scale).to(outs[0].dtype)


def _global_batch(step, bad_id=False):
    ids, off, sc, _ = _inputs("sum", B=GLOBAL_B, seed=100 + step)
    if bad_id:  # an id of feature "a" past its rows, in sample 1 (rank 0's share): a zero vector, no gradient
        k = int(off[1])
        assert int(off[2]) > k, "the test batch needs a non-empty bag (feature a, sample 1)"
        ids[k] = SIZES[0] + 3
    return ids, off, sc


def _share(ids, off, sc, rank, world):
    """Rank ``rank``'s contiguous samples of a feature-major global batch, offsets re-based."""
    F, B = len(SIZES), sc.numel()
    b = B // world
    lo, hi = rank * b, (rank + 1) * b
    parts, lens = [], []
    for f in range(F):
        parts.append(ids[int(off[f * B + lo]):int(off[f * B + hi])])
        lens.append(off[f * B + lo + 1:f * B + hi + 1] - off[f * B + lo:f * B + hi])
    lens = torch.cat(lens)
    return torch.cat(parts), torch.cat([lens.new_zeros(1), lens.cumsum(0)]), sc[lo:hi]


def _adagrad64_step(state, batch, bounds_check="error"):
    """The float64 oracle of one fused row-wise Adagrad step of ``_Pair`` from ``state`` on a global batch: table
    gradients by autograd through the float64 layers, then state += mean_d(g^2), w -= lr * g / (sqrt(state) + eps)
    (untouched rows have g = 0 and do not move). Written apart from the kernels and FBGEMM."""
    ref = _Pair(torch.float64, optimizer=None, bounds_check=bounds_check)
    ref.load_state_dict({k: v.double() for k, v in state.items() if not k.endswith("_state")})
    _pair_loss(ref(*batch)).backward()
    out = {}
    for name in ("embedding", "sequence_embedding"):
        layer = getattr(ref, name)
        for w, s in (("global_weight", "global_state"), ("scenario_weight", "scenario_state")):
            g = getattr(layer, w).grad
            st = state[f"{name}.{s}"].double() + g.square().mean(-1)
            out[f"{name}.{s}"] = st
            out[f"{name}.{w}"] = getattr(layer, w).detach() - LR * g / (st.sqrt() + EPS)[..., None]
    return out


def _assert_state_close(got, want, tag, atol=2e-6, rtol=1e-5):
    assert set(got) == set(want), f"{tag}: keys differ {sorted(set(got) ^ set(want))}"
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{tag}: {k}: {m}")


def _trained(steps=3, **options):
    """A _Pair after ``steps`` fused row-wise Adagrad steps (identical on every rank: same seed, same batches)."""
    torch.manual_seed(0)
    model = _Pair(**options)
    for step in range(steps):
        _pair_loss(model(*_global_batch(step))).backward()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sharded_copy(state, sharding, **options):
    torch.manual_seed(1)  # another init: every table must come from the state
    model = _Pair(**options)
    model.load_state_dict(state)
    return T.shard_saml(model, sharding_types=[sharding])


def _check_trained_model_continues(rank, world):
    """Several fused row-wise Adagrad steps in one process, then sharded: the round trip of weights and states
    is exact, and the next step equals the float64 oracle's (and the unsharded model's) within fp32 rounding."""
    _, trained = _trained()
    assert all(bool(v.any()) for k, v in trained.items() if k.endswith("_state")), "states must be trained"
    batch = _global_batch(3)
    want = _adagrad64_step(trained, batch)
    from_zero = _adagrad64_step({k: (torch.zeros_like(v) if k.endswith("_state") else v)
                                 for k, v in trained.items()}, batch)
    gap = max(float((want[k] - from_zero[k]).abs().max()) for k in want if k.endswith("weight"))
    assert gap > 1e-2, f"dropping the states must show ({gap:.2e}), else the test proves nothing"
    unsharded = _Pair()
    unsharded.load_state_dict(trained)
    _pair_loss(unsharded(*batch)).backward()
    _assert_state_close(dict(unsharded.state_dict()), want, "unsharded fp32 vs float64 oracle")
    for sharding in ("row_wise", "table_wise"):
        tag = f"{sharding} world={world} rank {rank}"
        dmp = _sharded_copy(trained, sharding)
        back = T.unsharded_state_dict(dmp)
        assert set(back) == set(trained), f"{tag}: keys differ {sorted(set(back) ^ set(trained))}"
        for k in trained:  # the states went into FBGEMM's momentum1 and come back bitwise
            assert torch.equal(back[k], trained[k]), f"{tag}: {k} changed by the round trip through sharding"
        _pair_loss(dmp(*_share(*batch, rank, world))).backward()
        _assert_state_close(T.unsharded_state_dict(dmp), want, f"{tag}: next step vs float64 oracle")


def _check_skip_nonfinite(rank, world):
    """skip_nonfinite carried: a NaN gradient on rank 0 alone skips the step of every table on every rank (as the
    unsharded layer skips it for the global batch), counted once; the next finite step is the oracle's."""
    _, trained = _trained(skip_nonfinite=True)
    for sharding in ("row_wise", "table_wise"):
        tag = f"{sharding} world={world} rank {rank}"
        dmp = _sharded_copy(trained, sharding, skip_nonfinite=True)
        scale = float("nan") if rank == 0 else 1.0
        _pair_loss(dmp(*_share(*_global_batch(3), rank, world)), scale).backward()
        after = T.unsharded_state_dict(dmp)
        for k in trained:
            assert torch.equal(after[k], trained[k]), f"{tag}: {k} changed by a step with a NaN gradient"
        layers = [m for m in dmp.modules() if isinstance(m, T.TorchRecScenarioEmbedding)]
        assert [int(m.nonfinite_steps) for m in layers] == [1, 1], f"{tag}: nonfinite_steps"
        batch = _global_batch(4)
        _pair_loss(dmp(*_share(*batch, rank, world))).backward()
        _assert_state_close(T.unsharded_state_dict(dmp), _adagrad64_step(trained, batch),
                            f"{tag}: finite step after the skipped one")
    # the unsharded layer does the same with the NaN in the global batch's loss
    model, _ = _trained(skip_nonfinite=True)
    _pair_loss(model(*_global_batch(3)), float("nan")).backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), f"unsharded skip_nonfinite moved {k}"


def _check_bounds_zero(rank, world):
    """bounds_check="zero" carried: an out-of-range id gives the unsharded layer's outputs (a zero vector; a mean
    bag still divides by its full length) and no gradient; the step is the oracle's."""
    _, trained = _trained(bounds_check="zero")
    batch = _global_batch(3, bad_id=True)
    want = _adagrad64_step(trained, batch, bounds_check="zero")
    for sharding in ("row_wise", "table_wise"):
        tag = f"{sharding} world={world} rank {rank}"
        dmp = _sharded_copy(trained, sharding, bounds_check="zero")
        local = _share(*batch, rank, world)
        outs = dmp(*local)
        ref = _Pair(torch.float64, optimizer=None, bounds_check="zero")
        ref.load_state_dict({k: v.double() for k, v in trained.items() if not k.endswith("_state")})
        for j, (o, r) in enumerate(zip(outs, ref(*local))):
            torch.testing.assert_close(o.double(), r.detach(), atol=1e-6, rtol=1e-6,
                                       msg=lambda m: f"{tag}: output {j} with an out-of-range id: {m}")
        _pair_loss(outs).backward()
        _assert_state_close(T.unsharded_state_dict(dmp), want, f"{tag}: step with an out-of-range id")


def _trained_model_worker(rank, world, port):
    ex = _example()
    ex._setup(rank, world, port)
    try:
        import warnings

        warnings.simplefilter("ignore", RuntimeWarning)  # bounds_check="zero" warns once by design
        _check_trained_model_continues(rank, world)
        _check_skip_nonfinite(rank, world)
        _check_bounds_zero(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_trained_model_sharded_continues_exactly(world, tmp_path):
    _example()
    spawn_checked(_trained_model_worker, (world, _free_port()), world, tmp_path)
