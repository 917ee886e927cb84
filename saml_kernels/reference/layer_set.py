"""``REFERENCE_LAYERS``: the plain-PyTorch twins as a layer set (see ``saml_kernels._layer_set``)."""
from __future__ import annotations

from .._layer_set import LayerSet
from .attention import RefScenarioAttention
from .layers import RefMultiBranchLinear, RefMutualUnit, RefScenarioEmbedding
from .star_layers import RefPartitionedNorm, RefStarLinear

REFERENCE_LAYERS = LayerSet("reference", RefScenarioEmbedding, RefScenarioAttention, RefMultiBranchLinear,
                            RefMutualUnit, star_linear=RefStarLinear, partitioned_norm=RefPartitionedNorm)
