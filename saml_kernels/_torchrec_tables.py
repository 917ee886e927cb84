"""The TorchRec table layout of a ``ScenarioEmbedding`` (the module docstring of ``saml_kernels/torchrec.py`` states
it): one ``EmbeddingBagConfig`` per table (``f`` and ``f__scenario``), the maps between the layer's
(global [R, ...], scenario [M, Rs, ...]) row blocks and {table name: rows}, the blocks of a (possibly sharded)
table, and the constants of the adapter (table-name suffix, dtypes, the fused optimizers and sharding types it
offers). Also the one guarded import of torchrec / FBGEMM: importing any part of the adapter without them raises
the ImportError that says how to install them.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .nn.scenario_embedding import ScenarioEmbedding

try:
    from torchrec import EmbeddingBagConfig, PoolingType
    from torchrec.distributed.types import ShardingType
    from torchrec.modules.embedding_configs import DataType
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    # the rest of the adapter's imports, here so that a missing piece gives the message below
    import torchrec.distributed.comm_ops  # noqa: F401
    import torchrec.distributed.embeddingbag  # noqa: F401
    import torchrec.distributed.model_parallel  # noqa: F401
    import torchrec.distributed.planner  # noqa: F401
    import torchrec.optim.optimizers  # noqa: F401
except (ImportError, OSError, RuntimeError) as e:  # missing, or FBGEMM's CUDA build without a driver (OSError)
    raise ImportError(
        f"saml_kernels.torchrec needs torchrec and FBGEMM ({e}). Without CUDA install them beside torch with "
        "`pip install --no-deps -r requirements-torchrec.txt` (FBGEMM's CPU build; plain `pip install torchrec` "
        "pulls the CUDA build, which does not load without the NVIDIA driver); with CUDA `pip install torchrec` "
        "(docs/distributed.md)") from e

SCENARIO_SUFFIX = "__scenario"
WHO = "TorchRecScenarioEmbedding"
_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN, "none": PoolingType.SUM}
_DATA_TYPE = {torch.float32: DataType.FP32, torch.float16: DataType.FP16}
OPTIMIZERS = {"sgd": EmbOptimType.EXACT_SGD, "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
# The sharding types whose update is this package's fused-optimizer math (tests/test_torchrec.py). Not offered:
# column-wise (FBGEMM's row-wise Adagrad would average g^2 over each column shard, not over D) and data-parallel
# (replicated tables get ordinary gradients and would be trained by the dense optimizer).
SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value)


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
