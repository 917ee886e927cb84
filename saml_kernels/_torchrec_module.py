"""``TorchRecScenarioEmbedding``: a ``ScenarioEmbedding`` whose lookups run through a TorchRec
``EmbeddingBagCollection`` (the id transform of ``saml_kernels/torchrec.py``'s module docstring, the host-side input
checks, the forward with its gradient scale and non-finite skip), and the full-table / optimizer-state reads and
writes of its possibly sharded tables. Public through ``saml_kernels.torchrec``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _kjt
from ._torchrec_tables import WHO, _blocks, _from_tables, embedding_bag_configs, table_weights
from .nn.scenario_embedding import FeatureListProperties, ScenarioEmbedding
from .ops import _checks
from .ops.scenario_hash import id_hash

# after ._torchrec_tables, whose guarded import explains a missing torchrec / FBGEMM
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, PoolingType
from torchrec.distributed.comm_ops import get_gradient_division

_warned_zero = False  # bounds_check="zero" warns once per process, as the fused op does


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
            offsets, scenario = _kjt.split_call(WHO, offsets, scenario)
            kjt = indices
            if _kjt.check_keys(WHO, kjt, self.feature_names) != self.feature_names:
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
