"""Scale-out on TorchRec: a ``ScenarioEmbedding`` as TorchRec tables, sharded by TorchRec's planner and
``DistributedModelParallel`` (FBGEMM's table-batched kernels with a fused optimizer), the dense SAML part on this
package's kernels under DDP (docs/distributed.md).

Table layout (names are stable; ``f`` is a feature name, ``n_f`` its rows, M scenarios, D the dimension):

    table f               [n_f, D]      = global_weight[feature_rows[f] : feature_rows[f+1]]
    table f__scenario     [M * s_f, D]  row s * s_f + r = scenario_weight[s, feature_scenario_rows[f] + r]
                                        (aware features only; s_f = the feature's scenario rows: n_f, or fewer
                                        for hashed scenario tables; scenario-major, so row-wise sharding splits
                                        scenarios, table-wise keeps a feature's M scenario tables together)

Id transform (``TorchRecScenarioEmbedding.remap``): the KeyedJaggedTensor gets every feature's ids unchanged
under key ``f`` and, for an aware feature, a second copy under ``f__scenario`` with id i of sample b remapped
to ``scenario[b] * s_f + local(i)`` (local(i) = i, or hash(i) mod s_f for hashed tables: ops/scenario_hash.py,
the same hash as every kernel). Pooling each key's bag over its table then gives exactly

    E_g[b, f] = pool_i w_i global_weight[feature_rows[f] + i]
    E_s[b, j] = pool_i w_i scenario_weight[scenario[b], feature_scenario_rows[f_j] + local(i)]

the result of ``saml_kernels.scenario_embedding_bag`` (sum / mean; pooling "none" with fixed length L runs as
B * L one-id sum bags). So the sharded lookup, its backward and FBGEMM's fused SGD / row-wise Adagrad update
touch the same rows with the same gradients as the fused op and ``ScenarioEmbedding(optimizer=...)``.

Gradient scale: DDP *averages* the dense gradients over the ranks, and TorchRec's collectives divide the
pooled embeddings' gradient by the world size in their backward (``torchrec.distributed.comm_ops``
``GRADIENT_DIVISION``, on by default), so the tables also get the mean over the ranks: with a loss that is a mean
over the rank's samples, both parts train on the gradient of the global-batch mean, as one process would. With
``set_gradient_division(False)`` TorchRec would *sum*; ``TorchRecScenarioEmbedding`` then scales the gradient by
1 / world_size itself, so the result does not depend on that switch.

Needs ``torchrec`` and FBGEMM (``fbgemm-gpu``; on a machine without CUDA ``fbgemm-gpu-cpu``). The rest of the
package does not import this module.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .nn.scenario_embedding import FeatureListProperties, ScenarioEmbedding
from .ops import _checks
from .ops.scenario_hash import id_hash

try:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
    from torchrec.distributed.comm_ops import get_gradient_division
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv, ShardingType
    from torchrec.modules.embedding_configs import DataType
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
except (ImportError, OSError, RuntimeError) as e:  # missing, or FBGEMM's CUDA build without a driver (OSError)
    raise ImportError(
        f"saml_kernels.torchrec needs torchrec and FBGEMM ({e}). Without CUDA install them beside torch with "
        "`pip install --no-deps -r requirements-torchrec.txt` (FBGEMM's CPU build; plain `pip install torchrec` "
        "pulls the CUDA build, which does not load without the NVIDIA driver); with CUDA `pip install torchrec` "
        "(docs/distributed.md)") from e

__all__ = ["SCENARIO_SUFFIX", "TorchRecScenarioEmbedding", "SAMLEmbeddingBagSharder", "embedding_bag_configs",
           "table_weights", "table_states", "shard_saml", "dense_parameters", "unsharded_state_dict"]

SCENARIO_SUFFIX = "__scenario"
WHO = "TorchRecScenarioEmbedding"
_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN, "none": PoolingType.SUM}
_DATA_TYPE = {torch.float32: DataType.FP32, torch.float16: DataType.FP16}
OPTIMIZERS = {"sgd": EmbOptimType.EXACT_SGD, "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
# The sharding types whose update is this package's fused-optimizer math (tests/test_torchrec.py). Not offered:
# column-wise (FBGEMM's row-wise Adagrad would average g^2 over each column shard, not over D) and data-parallel
# (replicated tables get ordinary gradients and would be trained by the dense optimizer).
SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value)
_warned_zero = False  # bounds_check="zero" warns once per process, as the fused op does


def _check_names(emb: ScenarioEmbedding) -> None:
    names = set(emb.feature_names)
    for f in emb.features:
        if "." in f.name:
            raise ValueError(f"{WHO}: feature {f.name!r}: TorchRec table names cannot contain '.'")
        if f.scenario_aware and f.name + SCENARIO_SUFFIX in names:
            raise ValueError(f"{WHO}: feature {f.name + SCENARIO_SUFFIX!r} collides with the scenario table name "
                             f"of the aware feature {f.name!r}; rename it")


def embedding_bag_configs(emb: ScenarioEmbedding) -> list:
    """The TorchRec ``EmbeddingBagConfig`` of every table of ``emb``: ``f`` [n_f, D] for each feature, then
    ``f__scenario`` [M * s_f, D] for each aware feature (s_f its scenario rows) (one feature per table, same name as the table)."""
    _check_names(emb)
    if emb.global_weight.dtype not in _DATA_TYPE:
        raise ValueError(f"{WHO}: table dtype must be one of {[str(d) for d in _DATA_TYPE]} for TorchRec (its "
                         f"unsharded EmbeddingBagCollection builds BF16 tables as float16), got "
                         f"{emb.global_weight.dtype}")
    dt, D, M = _DATA_TYPE[emb.global_weight.dtype], emb.embedding_dim, emb.num_scenarios

    def cfg(name, rows, pooling):
        return EmbeddingBagConfig(name=name, embedding_dim=D, num_embeddings=rows, feature_names=[name],
                                  pooling=_POOLING[pooling], data_type=dt)

    fsr = emb.feature_scenario_rows
    return ([cfg(f.name, f.num_embeddings, f.pooling) for f in emb.features]
            + [cfg(f.name + SCENARIO_SUFFIX, M * (fsr[k + 1] - fsr[k]), f.pooling)
               for k, f in enumerate(emb.features) if f.scenario_aware])


def _to_tables(emb, g: Tensor, s: Tensor) -> dict:
    """{table name: rows} of per-row data in ``emb``'s layout (g [R, ...] global, s [M, Rs, ...] scenario) in the
    TorchRec layout above: table ``f`` = g[feature_rows[f]:feature_rows[f+1]], table ``f__scenario`` = s[:, f's
    scenario rows] flattened scenario-major. Views where the layout allows."""
    out = {f.name: g[emb.feature_rows[k]:emb.feature_rows[k + 1]] for k, f in enumerate(emb.features)}
    for k, f in enumerate(emb.features):
        if f.scenario_aware:
            lo, hi = emb.feature_scenario_rows[k], emb.feature_scenario_rows[k + 1]
            out[f.name + SCENARIO_SUFFIX] = s[:, lo:hi].reshape(-1, *s.shape[2:])
    return out


def _from_tables(emb, t: dict, empty: Tensor) -> tuple:
    """The inverse of ``_to_tables``: (g [R, ...], s [M, Rs, ...]) from {table name: rows}; ``empty`` is the
    [0, ...] block that stands in for no aware feature."""
    M = emb.num_scenarios
    g = torch.cat([t[f.name] for f in emb.features])
    fsr = emb.feature_scenario_rows
    aware = [t[f.name + SCENARIO_SUFFIX].reshape(M, fsr[k + 1] - fsr[k], *empty.shape[1:])
             for k, f in enumerate(emb.features) if f.scenario_aware]
    return g, (torch.cat(aware, 1) if aware else empty.new_zeros(M, 0, *empty.shape[1:]))


def table_weights(emb: ScenarioEmbedding) -> dict:
    """{table name: weight} of ``emb`` in the TorchRec layout above (views where the layout allows)."""
    return _to_tables(emb, emb.global_weight.detach(), emb.scenario_weight.detach())


def table_states(emb: ScenarioEmbedding) -> Optional[dict]:
    """{table name: row-wise Adagrad state [rows] float32} of ``emb`` in the TorchRec layout (FBGEMM's
    ``momentum1`` of EXACT_ROWWISE_ADAGRAD: the same running sum of mean_d(g^2) per row), or None when the layer
    keeps no states (optimizer None or "sgd")."""
    if emb.global_state is None:
        return None
    return _to_tables(emb, emb.global_state.detach(), emb.scenario_state.detach())


def _blocks(name: str, v) -> tuple:
    """(full size, [((row, column) offset, tensor)]) of a table as a collection's state_dict holds it: a plain
    tensor (unsharded, or data-parallel replica) or a ShardedTensor (this rank's shards; none is possible)."""
    if type(v) in (Tensor, nn.Parameter):
        return tuple(v.shape), [((0, 0), v.detach())]
    if hasattr(v, "local_shards"):
        with warnings.catch_warnings():  # torch deprecates ShardedTensor; TorchRec 1.9 still returns it
            warnings.simplefilter("ignore", FutureWarning)
            return tuple(v.size()), [(tuple(s.metadata.shard_offsets), s.tensor) for s in v.local_shards()]
    raise NotImplementedError(f"{WHO}: table {name!r} is held as {type(v).__name__}; plain tensors and "
                              f"ShardedTensor (table-, row-, column-wise sharding) are supported")


class _SkipNonfinite(torch.autograd.Function):
    """Identity forward. The backward zeroes the whole gradient of the layer's lookups on every rank when it is not
    finite on any rank (one all_reduce of a flag), and counts the step in ``layer.nonfinite_steps``: FBGEMM's
    SGD and row-wise Adagrad leave a row unchanged for a zero gradient (state += 0, w -= lr * 0), so the step of
    the sharded tables is skipped as a whole, as ``ScenarioEmbedding(skip_nonfinite=True)`` skips it for the
    gradient of the global batch (non-finite when any rank's part is)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        ok = torch.isfinite(grad).all().to(torch.int64).reshape(1)
        if layer.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=layer.group)
        layer.nonfinite_steps.add_(1 - ok[0])
        return torch.where(ok.bool(), grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class TorchRecScenarioEmbedding(FeatureListProperties, nn.Module):
    """A ``ScenarioEmbedding`` whose lookups run through a TorchRec ``EmbeddingBagCollection`` (``self.ebc``), so
    ``DistributedModelParallel`` can shard its tables. Same forward contract as the layer it was built from:
    ``forward(indices, offsets, scenario, per_sample_weights=None)`` or ``forward(kjt, scenario)`` ->
    (E_g [B, F, D], E_s [B, Fs, D]) ([B, F, L, D], [B, Fs, L, D] for pooling "none").

    Args:
        emb: the layer to convert; its weights are copied into the new tables (``emb`` itself is not kept).
        weighted: the tables take per-sample weights (TorchRec's ``is_weighted``; needs pooling "sum"); a call
            without weights then uses weight 1. Without it, passing weights raises.

    Inputs are checked on the host before the lookup (ids in [0, n_f), offsets, scenario ids in [0, M), fixed
    bag length for "none"): a ValueError names the argument, the position and the value. On the CPU the reads
    are free; on a GPU they cost one host sync per forward.

    Options carried from ``emb`` (same contract as there):

    * ``bounds_check``: "error" raises on an id outside [0, n_f) (as above); "zero" drops it from its bag, so it
      adds a zero vector and gets no gradient (a "mean" bag still divides by its full length: the pooled result
      is rescaled by kept / full length); "off" promises valid ids and is checked like "error" (the check is
      on the host anyway, and FBGEMM must never read outside a table). Scenario ids are always checked.
    * ``skip_nonfinite``: a backward whose gradient of the layer's outputs holds a NaN or Inf on any rank
      updates no row on any rank (``_SkipNonfinite``: one all_reduce of a flag per backward when sharded over
      several ranks); ``nonfinite_steps`` counts those steps (starts at ``emb.nonfinite_steps``).
    """

    def __init__(self, emb: ScenarioEmbedding, *, weighted: bool = False):
        super().__init__()
        if not isinstance(emb, ScenarioEmbedding):
            raise TypeError(f"{WHO}: expected a saml_kernels.nn.ScenarioEmbedding, got {type(emb).__name__}")
        configs = embedding_bag_configs(emb)
        self.features, self.num_scenarios, self.embedding_dim = emb.features, emb.num_scenarios, emb.embedding_dim
        self.dtype = emb.global_weight.dtype  # TorchRec pools into float32; outputs come back in the table dtype
        self.feature_rows, self.feature_scenario_rows = emb.feature_rows, emb.feature_scenario_rows
        self.pooling_none = emb.features[0].pooling == "none"  # "none" is all features or none
        if weighted and any(f.pooling != "sum" for f in emb.features):
            raise ValueError(f"{WHO}: weighted=True needs pooling 'sum' on every feature, got "
                             f"{[f.pooling for f in emb.features]}")
        self.weighted = bool(weighted)
        self.bounds_check, self.skip_nonfinite = emb.bounds_check, bool(emb.skip_nonfinite)
        # set by shard_saml: the ranks the tables are sharded over (None: the default group) and the fused optimizer
        self.world_size, self.group, self.optimizer = 1, None, None
        self.keys = [c.name for c in configs]  # KJT keys = table names
        self.table_rows = {c.name: c.num_embeddings for c in configs}
        dev = emb.global_weight.device
        self.register_buffer("nonfinite_steps", emb.nonfinite_steps.detach().clone().to(dev), persistent=False)
        self.register_buffer("_rows", torch.tensor([f.num_embeddings for f in emb.features], device=dev),
                             persistent=False)
        self.register_buffer("_aware", torch.tensor([f.scenario_aware for f in emb.features], device=dev),
                             persistent=False)
        fsr = emb.feature_scenario_rows  # each feature's scenario rows (fewer than its ids: hashed)
        self.register_buffer("_srows", torch.tensor([fsr[k + 1] - fsr[k] for k in range(len(emb.features))],
                                                    device=dev), persistent=False)
        self.register_buffer("_mean_key", torch.tensor([c.pooling == PoolingType.MEAN for c in configs], device=dev),
                             persistent=False)
        self.ebc = EmbeddingBagCollection(tables=configs, is_weighted=self.weighted, device=dev)
        self.load_tables(table_weights(emb))

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, num_aware={self.num_aware}, num_scenarios={self.num_scenarios}, "
                f"embedding_dim={self.embedding_dim}, tables={self.keys}")

    # ------------------------------------------------------------------------------------------ weights

    def _table_tensors(self) -> dict:
        """{table name: state_dict value} of the (possibly sharded) collection."""
        out = {}
        for key, v in self.ebc.state_dict().items():
            parts = key.split(".")
            if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in self.keys:
                out[parts[-2]] = v
        return out

    @torch.no_grad()
    def load_tables(self, tables: dict) -> None:
        """Copies full tables {name: [rows, D]} (``table_weights`` layout) into this rank's part of each table
        (the whole table when unsharded or replicated)."""
        for name, v in self._table_tensors().items():
            if name not in tables:
                raise KeyError(f"{WHO}.load_tables: no weight for table {name!r}")
            full = tables[name]
            size, blocks = _blocks(name, v)
            if tuple(full.shape) != size:
                raise ValueError(f"{WHO}.load_tables: table {name!r} has shape {size}, got {tuple(full.shape)}")
            for (r, c), block in blocks:
                block.copy_(full[r:r + block.shape[0], c:c + block.shape[1]])

    @torch.no_grad()
    def tables(self, group=None) -> dict:
        """{table name: full weight [rows, D]} on every rank. Collective when sharded (every rank must call it):
        each rank writes its blocks into zeros and one all_reduce sums them (exact: the blocks are disjoint)."""
        out = {}
        for name, v in self._table_tensors().items():
            size, blocks = _blocks(name, v)
            if not hasattr(v, "local_shards"):  # unsharded or replicated (decided by type: every rank agrees)
                out[name] = blocks[0][1].clone()
                continue
            full = torch.zeros(size, dtype=self.dtype, device=self._rows.device)
            for (r, c), block in blocks:
                full[r:r + block.shape[0], c:c + block.shape[1]] = block
            dist.all_reduce(full, group=group)
            out[name] = full
        return out

    def scenario_embedding_weights(self, group=None) -> tuple:
        """(global_weight [R, D], scenario_weight [M, Rs, D]) in ``ScenarioEmbedding``'s layout (collective when
        sharded, see ``tables``)."""
        return _from_tables(self, self.tables(group), torch.zeros(0, self.embedding_dim, dtype=self.dtype))

    # ------------------------------------------------------------------------------------------ optimizer states

    def _state_tensors(self) -> dict:
        """{table name: row-wise state (ShardedTensor of this rank's rows)} held by the sharded collection's fused
        optimizer: FBGEMM's ``momentum1`` per table, views of the TBE's state buffer (writes reach the kernels).
        Tables with no rows on this rank are absent; an unsharded collection (no fused optimizer) gives {}."""
        opt = getattr(self.ebc, "fused_optimizer", None)
        if opt is None:
            return {}
        out = {}
        for key, param in opt.params.items():
            table = key.split(".")[-2]
            v = opt.state.get(param, {}).get(f"{table}.momentum1")
            if table in self.table_rows and v is not None:
                out[table] = v
        return out

    @torch.no_grad()
    def load_states(self, states: dict) -> None:
        """Copies full row-wise Adagrad states {table: [rows]} (``table_states`` layout) into this rank's rows of
        the fused optimizer's state. Not collective."""
        if self.optimizer != "rowwise_adagrad":
            raise ValueError(f"{WHO}.load_states: the tables' fused optimizer is {self.optimizer!r}, which keeps no "
                             f"row-wise states")
        for name, v in self._state_tensors().items():
            full = states[name]
            if tuple(full.shape) != (self.table_rows[name],):
                raise ValueError(f"{WHO}.load_states: table {name!r} has {self.table_rows[name]} rows, got a state "
                                 f"of shape {tuple(full.shape)}")
            for (r,), block in _blocks(name, v)[1]:
                block.copy_(full[r:r + block.shape[0]])

    @torch.no_grad()
    def states(self, group=None) -> dict:
        """{table name: full row-wise Adagrad state [rows] float32} on every rank (every table, zeros where the
        optimizer keeps none). Collective when sharded over several ranks (every rank must call it): each rank
        writes its rows into zeros and one all_reduce per table sums them (exact: the blocks are disjoint)."""
        held = self._state_tensors()
        out = {}
        for name in self.keys:  # one fixed order on every rank: the all_reduces pair up
            full = torch.zeros(self.table_rows[name], dtype=torch.float32, device=self._rows.device)
            if name in held:
                for (r,), block in _blocks(name, held[name])[1]:
                    full[r:r + block.shape[0]] = block
            if self.world_size > 1:
                dist.all_reduce(full, group=group)
            out[name] = full
        return out

    def scenario_embedding_states(self, group=None) -> tuple:
        """(global_state [R], scenario_state [M, Rs]) float32 in ``ScenarioEmbedding``'s layout (collective when
        sharded, see ``states``)."""
        return _from_tables(self, self.states(group), torch.zeros(0))

    # ------------------------------------------------------------------------------------------ forward

    def _inputs(self, indices, offsets, scenario, per_sample_weights):
        """Checked (indices int64, offsets int64, scenario int64, psw) from tensors or a KeyedJaggedTensor."""
        if isinstance(indices, KeyedJaggedTensor):
            if scenario is None:  # forward(kjt, scenario)
                offsets, scenario = None, offsets
            if offsets is not None:
                raise TypeError(f"{WHO}: with a KeyedJaggedTensor pass forward(kjt, scenario)")
            kjt = indices
            if kjt.variable_stride_per_key():
                raise ValueError(f"{WHO}: variable-batch KeyedJaggedTensors (a stride per key) are not supported: "
                                 f"every feature needs the same batch size B (one scenario id per sample)")
            missing = [n for n in self.feature_names if n not in kjt.keys()]
            if missing:
                raise ValueError(f"{WHO}: KeyedJaggedTensor keys {kjt.keys()} lack the feature(s) {missing}")
            if kjt.keys() != self.feature_names:
                kjt = kjt.permute([kjt.keys().index(n) for n in self.feature_names])
            indices, offsets = kjt.values(), kjt.offsets()
            if per_sample_weights is None:
                per_sample_weights = kjt.weights_or_none()
        for name, t in (("indices", indices), ("offsets", offsets), ("scenario", scenario)):
            _checks.tensor(WHO, name, t, ndim=1, dtypes=_checks.INDEX_DTYPES)
        _checks.tensor(WHO, "per_sample_weights", per_sample_weights, ndim=1, dtypes=_checks.FLOAT_DTYPES,
                       optional=True)
        _checks.same_device(WHO, indices=indices, offsets=offsets, scenario=scenario,
                            per_sample_weights=per_sample_weights, tables=self._rows)
        F, B, nnz = self.num_features, scenario.numel(), indices.numel()
        if offsets.numel() != F * B + 1:
            raise ValueError(f"{WHO}: offsets must have F*B + 1 = {F * B + 1} entries (F = {F} features, B = {B} "
                             f"scenario ids), got {offsets.numel()}")
        offsets, indices, scenario = offsets.long(), indices.long(), scenario.long()
        if int(offsets[0]) != 0 or int(offsets[-1]) != nnz:
            raise ValueError(f"{WHO}: offsets must run from 0 to indices.numel() = {nnz}, got offsets[0] = "
                             f"{int(offsets[0])}, offsets[-1] = {int(offsets[-1])}")
        lengths = offsets.diff()
        bad = (lengths < 0).nonzero()
        if bad.numel():
            k = int(bad[0, 0])
            raise ValueError(f"{WHO}: offsets must be non-decreasing, but offsets[{k + 1}] = {int(offsets[k + 1])} "
                             f"< offsets[{k}] = {int(offsets[k])}")
        if self.pooling_none and F * B:
            L = nnz // (F * B)
            bad = (lengths != L).nonzero()
            if bad.numel() or L * F * B != nnz:
                k = int(bad[0, 0]) if bad.numel() else 0
                raise ValueError(f"{WHO}: pooling 'none' needs every bag of one length L = nnz / (F*B), but bag "
                                 f"(feature {k // B}, sample {k % B}) has length {int(lengths[k])} (nnz = {nnz})")
        feat = torch.arange(F, device=indices.device).repeat_interleave(B).repeat_interleave(lengths, output_size=nnz)
        invalid = (indices < 0) | (indices >= self._rows[feat])
        bad = invalid.nonzero()
        valid = None
        if bad.numel():
            i = int(bad[0, 0])
            f = self.features[int(feat[i])]
            msg = (f"{WHO}: indices[{i}] = {int(indices[i])} is out of range for feature {f.name!r} "
                   f"(num_embeddings = {f.num_embeddings})")
            if self.bounds_check != "zero":
                raise ValueError(msg)
            global _warned_zero
            if not _warned_zero:
                _warned_zero = True
                warnings.warn(f"{msg}; {bad.shape[0]} invalid id(s) in all; bounds_check='zero' maps them to zero "
                              f"vectors with no gradient (warned once)", RuntimeWarning, stacklevel=4)
            valid = ~invalid
        bad = ((scenario < 0) | (scenario >= self.num_scenarios)).nonzero()
        if bad.numel():
            b = int(bad[0, 0])
            raise ValueError(f"{WHO}: scenario[{b}] = {int(scenario[b])} is out of range [0, {self.num_scenarios})")
        if per_sample_weights is not None:
            if not self.weighted:
                raise ValueError(f"{WHO}: per_sample_weights given, but the tables were built without "
                                 f"weighted=True (TorchRec's is_weighted)")
            if per_sample_weights.numel() != nnz:
                raise ValueError(f"{WHO}: per_sample_weights must have indices.numel() = {nnz} entries, got "
                                 f"{per_sample_weights.numel()}")
        return indices, lengths, scenario, feat, per_sample_weights, valid

    def remap(self, indices, offsets=None, scenario: Optional[Tensor] = None,
              per_sample_weights: Optional[Tensor] = None) -> KeyedJaggedTensor:
        """The id transform: the KeyedJaggedTensor (keys ``self.keys``, stride B; B * L for pooling "none") whose
        per-table lookups are the fused op's E_g and E_s. Aware feature f's ids appear twice: unchanged under ``f``
        and as ``scenario[b] * s_f + local(id)`` under ``f__scenario`` (s_f its scenario rows; local(id) = id, or
        its hash mod s_f for hashed scenario tables). Arguments as ``forward``. With
        ``bounds_check="zero"`` out-of-range ids are left out of their bags (see the class docstring)."""
        return self._remap(indices, offsets, scenario, per_sample_weights)[0]

    def _remap(self, indices, offsets, scenario, per_sample_weights) -> tuple:
        """(KeyedJaggedTensor of ``remap``, mean rescale [B, K] or None): with bounds_check "zero" and pooling
        "mean", bag (b, k)'s pooled row times rescale[b, k] = kept ids / all ids is the mean over the full bag."""
        indices, lengths, scenario, feat, psw, valid = self._inputs(indices, offsets, scenario, per_sample_weights)
        F, B, nnz = self.num_features, scenario.numel(), indices.numel()
        sample = torch.arange(B, device=indices.device).repeat(F).repeat_interleave(lengths, output_size=nnz)
        aware = self._aware[feat]
        ids, fa = indices[aware], feat[aware]
        srows = self._srows[fa]
        local = torch.where(srows == self._rows[fa], ids, id_hash(ids) % srows.clamp(min=1))  # hashed tables
        scen_ids = local + scenario[sample[aware]] * srows
        values = torch.cat([indices, scen_ids])
        if self.weighted:
            # the unsharded collection (torch's embedding_bag) wants weights in the table dtype, FBGEMM's TBE float32
            wdt = self.dtype if isinstance(self.ebc, EmbeddingBagCollection) else torch.float32
            psw = torch.ones(nnz, dtype=wdt, device=indices.device) if psw is None else psw.to(wdt)
        weights = torch.cat([psw, psw[aware]]) if psw is not None else None
        if self.pooling_none:  # B * L one-id bags: bag (b, l) of feature f is id f*B*L + b*L + l
            stride = nnz // F if F else 0
            lengths = torch.ones_like(values)
        else:
            stride = B
            lengths = torch.cat([lengths, lengths.view(F, B)[self._aware].reshape(-1)])
        rescale = None
        if valid is not None:  # bounds_check "zero": the invalid ids leave their bags (zero vector, no gradient)
            keep = torch.cat([valid, valid[aware]])
            values = values[keep]
            weights = weights[keep] if weights is not None else None
            bag = torch.arange(lengths.numel(), device=values.device).repeat_interleave(lengths,
                                                                                       output_size=keep.numel())
            kept = torch.zeros_like(lengths).index_add_(0, bag, keep.to(lengths.dtype))
            if any(f.pooling == "mean" for f in self.features):
                ratio = (kept.double() / lengths.clamp(min=1)).view(len(self.keys), stride)
                rescale = torch.where(self._mean_key[:, None], ratio, torch.ones_like(ratio)).t()
            lengths = kept
        kjt = KeyedJaggedTensor(keys=list(self.keys), values=values, lengths=lengths, weights=weights, stride=stride)
        return kjt, rescale

    def forward(self, indices, offsets=None, scenario: Optional[Tensor] = None,
                per_sample_weights: Optional[Tensor] = None) -> tuple:
        """(E_g [B, F, D], E_s [B, Fs, D]) as ``ScenarioEmbedding.forward`` (see the class docstring)."""
        if isinstance(indices, KeyedJaggedTensor) and scenario is None:
            offsets, scenario = None, offsets
        kjt, rescale = self._remap(indices, offsets, scenario, per_sample_weights)
        B, F, D = scenario.numel(), self.num_features, self.embedding_dim
        K = len(self.keys)
        kt = self.ebc(kjt)
        if hasattr(kt, "wait"):  # a sharded collection returns an awaitable
            kt = kt.wait()
        keys = list(kt.keys())
        vals = kt.values()
        if self.skip_nonfinite and vals.requires_grad:
            vals = _SkipNonfinite.apply(vals, self)
        vals = vals.view(kjt.stride(), len(keys), D)
        if keys != self.keys:
            vals = vals[:, [keys.index(k) for k in self.keys]]
        if rescale is not None:
            vals = vals * rescale.to(vals.dtype)[:, :, None]
        vals = vals.to(self.dtype)
        if self.world_size > 1 and vals.requires_grad and not get_gradient_division():
            vals = _ScaleGrad.apply(vals, 1.0 / self.world_size)  # TorchRec sums: take the mean (module docstring)
        e_g, e_s = vals[:, :F], vals[:, F:K]
        if self.pooling_none:
            L = kjt.stride() // B if B else 0
            e_g = e_g.reshape(B, L, F, D).transpose(1, 2)
            e_s = e_s.reshape(B, L, K - F, D).transpose(1, 2)
        return e_g, e_s


# ============================================================================================== sharding

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
