"""Sharding a SAML-style model with TorchRec: ``shard_saml`` (every ``ScenarioEmbedding`` becomes a
``TorchRecScenarioEmbedding``, the planner places the tables, ``DistributedModelParallel`` shards them with FBGEMM's
fused optimizer and wraps the dense part in DDP), the sharder that also offers row-wise sharding on the CPU, and
the way back (``dense_parameters``, ``unsharded_state_dict``). Public through ``saml_kernels.torchrec``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._torchrec_module import TorchRecScenarioEmbedding
from ._torchrec_tables import OPTIMIZERS, SHARDING_TYPES, table_states, table_weights
from .nn.scenario_embedding import ScenarioEmbedding

# after ._torchrec_tables, whose guarded import explains a missing torchrec / FBGEMM
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.optim.optimizers import in_backward_optimizer_filter


class SAMLEmbeddingBagSharder(EmbeddingBagCollectionSharder):
    """TorchRec's ``EmbeddingBagCollectionSharder`` that also offers row-wise sharding on the CPU.

    TorchRec 1.9 lists ``row_wise`` for cuda / tpu / mtia only (``BaseEmbeddingSharder.sharding_types``), although
    its row-wise path (FBGEMM's CPU ``block_bucketize_sparse_features``, all_to_all of the ids, reduce-scatter of
    the pooled bags, the CPU TBE kernels) runs on gloo; tests/test_torchrec.py checks it against one process.
    On GPUs this class is the stock sharder."""

    def sharding_types(self, compute_device_type: str) -> list:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def _topology(world_size: int, compute_device: str):
    try:  # TorchRec >= 1.9 prefers the factory (the plain constructor warns)
        from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

        return TopologyFactory.create_topology(trainer_config=TrainerConfig(world_size=world_size),
                                               kernel_config=KernelConfig(compute_device=compute_device))
    except (ImportError, TypeError, ValueError):
        return Topology(world_size=world_size, compute_device=compute_device)


def _storage_reservation():
    """TorchRec's recommended reservation (15% of each device kept for the dense part and inputs); None (the
    planner's heuristic default, which warns in TorchRec 1.9) where it does not exist yet."""
    try:
        from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    except ImportError:
        return None
    return FixedPercentageStorageReservation(0.15)


def _scenario_modules(model: nn.Module):
    """(attribute path, ScenarioEmbedding) of every ScenarioEmbedding in ``model``, outermost first."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ScenarioEmbedding)]


def shard_saml(model: nn.Module, *, sharding_types: Optional[Sequence[str]] = None, optimizer: Optional[str] = None,
               lr: Optional[float] = None, eps: Optional[float] = None, group=None, device=None,
               plan=None) -> DistributedModelParallel:
    """Shards the embedding tables of a SAML-style model with TorchRec; the rest trains under DDP.

    Every ``ScenarioEmbedding`` of ``model`` (``SAML.embedding`` and ``SAML.sequence_embedding``) is replaced in
    place by a ``TorchRecScenarioEmbedding`` holding its weights; TorchRec's planner then places the tables
    (``f`` and ``f__scenario``) on the ranks and ``DistributedModelParallel`` shards them (FBGEMM TBE kernels with
    a fused optimizer: the update is applied in the backward, as ``ScenarioEmbedding(optimizer=...)`` does) and
    wraps everything else in ``DistributedDataParallel``. The shards get the model's weights, so every rank
    must pass an identical model (same seed or the same checkpoint). Collective: call it on every rank.

    Args:
        model: e.g. ``saml_kernels.nn.SAML``, on ``device``.
        sharding_types: allowed TorchRec sharding types for every table, a subset of ``SHARDING_TYPES``
            ("table_wise", "row_wise"); None lets the planner choose among them per table.
        optimizer, lr, eps: the tables' fused optimizer ("sgd" | "rowwise_adagrad", FBGEMM EXACT_SGD /
            EXACT_ROWWISE_ADAGRAD: the same math as this package's fused optimizer). None takes them from the
            model's ScenarioEmbedding (``SAML(embedding_optimizer=..., embedding_lr=..., embedding_eps=...)``;
            ``lr`` is the current one, as a scheduler left it).
        group: the process group (default: the world).
        device: the compute device (default: the tables' device).
        plan: a ready ``ShardingPlan`` (then the planner is not run; ``sharding_types`` must be None).

    Returns the ``DistributedModelParallel``; train the dense part with ``dense_parameters(dmp)`` in any torch
    optimizer (the tables have no ``.grad``: their update happened in the backward). Tables and dense part both
    see the mean of the ranks' gradients (module docstring), so a loss that is a mean over the rank's samples
    trains as the global-batch mean would in one process. ``unsharded_state_dict(dmp)`` gives the state_dict
    of the original model (full tables and row-wise Adagrad states) back.

    What carries over from each ``ScenarioEmbedding`` (a trained model continues exactly: its next step sharded
    equals its next step in one process, tests/test_torchrec.py):

    * weights, and the row-wise Adagrad states ``global_state`` / ``scenario_state`` (into FBGEMM's
      ``momentum1``) when both the layer and the sharded optimizer are "rowwise_adagrad";
    * ``skip_nonfinite`` (a step whose gradient is not finite on any rank updates no row on any rank) and
      ``bounds_check`` (see ``TorchRecScenarioEmbedding``); the table dtype (float32 / float16);
      ``stochastic_rounding`` (FBGEMM's option of that name: its own random bits, so a 16-bit table's sharded
      step is unbiased as the layer's but not bitwise equal to it).

    Rejected with a ValueError naming the layer and the option, before anything is changed: ``weight_decay``
    other than 0; a frozen table (``requires_grad=False``: FBGEMM would train it); trained row-wise Adagrad
    states (non-zero) with ``optimizer="sgd"`` (they would be dropped); layers with different fused optimizers.
    Not applicable (FBGEMM's kernels and TorchRec's storage replace them): ``backend``, ``huge_pages``.
    """
    found = _scenario_modules(model)
    if not found:
        raise ValueError("shard_saml: the model has no ScenarioEmbedding to shard")
    first = found[0][1]
    optimizer = optimizer if optimizer is not None else first.optimizer
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"shard_saml: optimizer must be one of {tuple(OPTIMIZERS)} (or None with a model built "
                         f"with embedding_optimizer=...), got {optimizer!r}")
    lr = float(lr if lr is not None else first.lr)
    eps = float(eps if eps is not None else first.eps)
    for name, emb in found:
        if emb.weight_decay:
            raise ValueError(f"shard_saml: {name} has weight_decay={emb.weight_decay}; the adapter does not map "
                             f"weight decay to FBGEMM (set it to 0)")
        for table in ("global_weight", "scenario_weight"):
            w = getattr(emb, table)
            if not w.requires_grad and w.numel():
                raise ValueError(f"shard_saml: {name}.{table} is frozen (requires_grad=False), but FBGEMM's fused "
                                 f"optimizer updates every sharded table; unfreeze it or keep the layer unsharded")
        if emb.global_state is not None and optimizer != "rowwise_adagrad" and (
                bool(emb.global_state.any()) or bool(emb.scenario_state.any())):
            raise ValueError(f"shard_saml: {name} holds trained row-wise Adagrad states, which optimizer="
                             f"{optimizer!r} would drop; shard with optimizer='rowwise_adagrad' (or None)")
        if (emb.optimizer, emb.lr, emb.eps, emb.stochastic_rounding) != (first.optimizer, first.lr, first.eps,
                                                                          first.stochastic_rounding):
            raise ValueError(f"shard_saml: one fused optimizer serves every table, but {name} has "
                             f"({emb.optimizer!r}, lr={emb.lr}, eps={emb.eps}, stochastic_rounding="
                             f"{emb.stochastic_rounding}) and {found[0][0]} ({first.optimizer!r}, lr={first.lr}, "
                             f"eps={first.eps}, stochastic_rounding={first.stochastic_rounding})")
    if sharding_types is not None:
        if plan is not None:
            raise ValueError("shard_saml: pass sharding_types or plan, not both")
        bad = [t for t in sharding_types if t not in SHARDING_TYPES]
        if bad or not sharding_types:
            raise ValueError(f"shard_saml: sharding_types must be a non-empty subset of {SHARDING_TYPES}, got "
                             f"{sharding_types!r}")
    device = torch.device(device) if device is not None else first.global_weight.device
    group = group if group is not None else dist.GroupMember.WORLD
    world = dist.get_world_size(group)
    full, states = {}, {}
    for name, emb in found:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        tr = TorchRecScenarioEmbedding(emb)
        # (the default group is not held: it resolves at each call, and nothing keeps it past its destruction)
        tr.world_size, tr.group, tr.optimizer = world, (None if group is dist.GroupMember.WORLD else group), optimizer
        setattr(parent, name.rpartition(".")[2], tr)
        full[name] = table_weights(emb)
        if optimizer == "rowwise_adagrad":
            states[name] = table_states(emb)  # None: the layer kept none (FBGEMM starts from zero, as it would)
    # FBGEMM's option of the same name (its own generator, not this package's hash: 16-bit shards round
    # stochastically as the layer does, not bitwise as it does)
    fused = dict(optimizer=OPTIMIZERS[optimizer], learning_rate=lr, eps=eps,
                 stochastic_rounding=bool(first.stochastic_rounding))
    sharder = SAMLEmbeddingBagSharder(fused_params=fused)
    if plan is None:
        allowed = list(sharding_types if sharding_types is not None else SHARDING_TYPES)
        names = {k for _, tr in _tr_modules(model) for k in tr.keys}
        constraints = {k: ParameterConstraints(sharding_types=allowed) for k in names}
        planner = EmbeddingShardingPlanner(topology=_topology(world, device.type), constraints=constraints,
                                           storage_reservation=_storage_reservation())
        plan = planner.collective_plan(model, [sharder], group)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(group), device=device, plan=plan,
                                   sharders=[sharder])
    for name, tr in _tr_modules(get_unwrapped_module(dmp)):
        tr.load_tables(full[name])
        if states.get(name) is not None:
            tr.load_states(states[name])
    return dmp


def _tr_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TorchRecScenarioEmbedding)]


def dense_parameters(dmp: nn.Module) -> list:
    """The parameters a torch optimizer trains (everything but the fused-optimizer tables)."""
    return [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]


def unsharded_state_dict(dmp: nn.Module, group=None) -> dict:
    """The state_dict of the model ``shard_saml`` was given (full ``*.global_weight`` / ``*.scenario_weight``
    tables, the dense parameters and buffers under their own names), e.g. to load a plain ``SAML`` for serving
    or to resume training in one process. With a "rowwise_adagrad" fused optimizer it also holds the row-wise
    states ``*.global_state`` [R] / ``*.scenario_state`` [M, Rs] (FBGEMM's ``momentum1``, in the layout of
    ``ScenarioEmbedding``'s buffers, as a model built with ``embedding_optimizer="rowwise_adagrad"`` saves them),
    so the training continues exactly. Collective over ``group`` (default: the group ``shard_saml`` was given):
    every rank must call it (tables and states are all-reduced); every rank gets the full dict."""
    model = get_unwrapped_module(dmp)
    out = {}
    trs = _tr_modules(model)
    for name, tr in trs:
        g = group if group is not None else tr.group  # default: the group shard_saml sharded over
        gw, sw = tr.scenario_embedding_weights(g)
        out[f"{name}.global_weight"], out[f"{name}.scenario_weight"] = gw, sw
        if tr.optimizer == "rowwise_adagrad":
            out[f"{name}.global_state"], out[f"{name}.scenario_state"] = tr.scenario_embedding_states(g)
    skip = tuple(f"{name}." for name, _ in trs)
    for key, v in model.state_dict().items():
        if not key.startswith(skip):
            out[key] = v.detach().clone()
    return out
