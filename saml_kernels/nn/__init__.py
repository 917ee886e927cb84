"""Drop-in layers (docs/design.md section 3). Each has device/dtype factory arguments and reset_parameters(), and shares
its parameter names with the reference model in saml_kernels.reference."""
from .scenario_embedding import EmbeddingFeature, ScenarioEmbedding
from .multi_branch_linear import MultiBranchLinear
from .mutual_unit import MutualUnit
from .attention import ScenarioAttention
from .saml import SAML, SAMLConfig, SharedBottom, TrainingOptimizer
from .star_linear import StarLinear
from .partitioned_norm import PartitionedNorm
from .star import STAR, STARConfig
from .hmoe import HMoE, HMoEConfig
