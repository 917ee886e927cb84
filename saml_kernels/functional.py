"""Functional API: ``saml_kernels.<op>``. Each op validates its arguments and dispatches to a backend."""
from .ops.scenario_embedding_bag import scenario_embedding_bag
from .ops.mbranch_linear import mbranch_linear

__all__ = ["mbranch_linear", "scenario_embedding_bag"]
