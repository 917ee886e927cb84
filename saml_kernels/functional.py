"""Functional API: ``saml_kernels.<op>``. Each op validates its arguments and dispatches to a backend."""
from .ops.scenario_embedding_bag import scenario_embedding_bag
from .ops.mbranch_linear import mbranch_linear
from .ops.mutual_unit import mutual_unit
from .ops.mutual_linear import mutual_linear
from .ops.partitioned_norm import partitioned_norm

__all__ = ["mbranch_linear", "mutual_unit", "mutual_linear", "scenario_embedding_bag", "partitioned_norm"]
