"""Plain-PyTorch versions of every op and of the whole model: the test oracle and the benchmark baseline."""
from .scenario_embedding_bag import scenario_embedding_bag_reference
from .mbranch_linear import mbranch_linear_reference
from .mutual_unit import mutual_linear_reference, mutual_unit_reference
from .partitioned_norm import partitioned_norm_reference

__all__ = ["mbranch_linear_reference", "mutual_unit_reference", "mutual_linear_reference", "scenario_embedding_bag_reference",
           "partitioned_norm_reference"]
from .model import SAMLConfig, SAMLReference, TrainingOptimizer  # noqa: E402


def __getattr__(name):
    # The STAR / HMoE twins share their bodies with saml_kernels.nn, which imports the ops, which import this
    # package: loaded on first use, not at import time (no import cycle).
    if name == "STARReference":
        from .star import STARReference

        return STARReference
    if name == "HMoEReference":
        from .hmoe import HMoEReference

        return HMoEReference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
