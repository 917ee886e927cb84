"""Drop-in layers and the models built from them (docs/design.md section 3). Each layer has device/dtype factory
arguments and reset_parameters(), and shares its constructor arguments and parameter names with its plain-PyTorch
twin in saml_kernels.reference (``KERNEL_LAYERS`` / ``REFERENCE_LAYERS``)."""
from .scenario_embedding import EmbeddingFeature, ScenarioEmbedding
from .multi_branch_linear import MultiBranchLinear
from .mutual_unit import MutualUnit
from .attention import ScenarioAttention
from .layer_set import KERNEL_LAYERS
from .saml import SAML, SAMLConfig, TrainingOptimizer
from .shared_bottom import SharedBottom
from .star_linear import StarLinear
from .partitioned_norm import PartitionedNorm
from .star import STAR, STARConfig
from .hmoe import HMoE, HMoEConfig

__all__ = ["EmbeddingFeature", "ScenarioEmbedding", "MultiBranchLinear", "MutualUnit", "ScenarioAttention",
           "StarLinear", "PartitionedNorm", "KERNEL_LAYERS", "SAML", "SAMLConfig", "SharedBottom",
           "TrainingOptimizer", "STAR", "STARConfig", "HMoE", "HMoEConfig"]
