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

Where it lives (this module is the public face; import from here): ``_torchrec_tables.py`` the table layout
(``embedding_bag_configs``, ``table_weights``, ``table_states``, the constants) and the guarded import of torchrec /
FBGEMM; ``_torchrec_module.py`` ``TorchRecScenarioEmbedding``; ``_torchrec_sharding.py`` ``shard_saml``, the
sharder, ``dense_parameters``, ``unsharded_state_dict``.
"""
from __future__ import annotations

from ._torchrec_tables import (OPTIMIZERS, SCENARIO_SUFFIX, SHARDING_TYPES, WHO, embedding_bag_configs,  # noqa: F401
                               table_states, table_weights)
from ._torchrec_module import TorchRecScenarioEmbedding
from ._torchrec_sharding import SAMLEmbeddingBagSharder, dense_parameters, shard_saml, unsharded_state_dict

__all__ = ["SCENARIO_SUFFIX", "TorchRecScenarioEmbedding", "SAMLEmbeddingBagSharder", "embedding_bag_configs",
           "table_weights", "table_states", "shard_saml", "dense_parameters", "unsharded_state_dict"]
