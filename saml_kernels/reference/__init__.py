"""Plain-PyTorch versions of every op and of the whole model: the test oracle and the benchmark baseline."""
from .scenario_embedding_bag import scenario_embedding_bag_reference
from .mbranch_linear import mbranch_linear_reference
from .mutual_unit import mutual_linear_reference, mutual_unit_reference

__all__ = ["mbranch_linear_reference", "mutual_unit_reference", "mutual_linear_reference", "scenario_embedding_bag_reference"]
from .model import SAMLConfig, SAMLReference, TrainingOptimizer  # noqa: E402
