"""``KERNEL_LAYERS``: the fused layers of this package as a layer set (see ``saml_kernels._layer_set``)."""
from __future__ import annotations

from .._layer_set import LayerSet
from .attention import ScenarioAttention
from .multi_branch_linear import MultiBranchLinear
from .mutual_unit import MutualUnit
from .partitioned_norm import PartitionedNorm
from .scenario_embedding import ScenarioEmbedding
from .star_linear import StarLinear

KERNEL_LAYERS = LayerSet("kernels", ScenarioEmbedding, ScenarioAttention, MultiBranchLinear, MutualUnit,
                         star_linear=StarLinear, partitioned_norm=PartitionedNorm)
