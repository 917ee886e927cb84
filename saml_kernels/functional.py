"""Functional API: ``saml_kernels.<op>``. Each op validates its arguments and dispatches to a backend."""
from .ops.scenario_embedding_bag import scenario_embedding_bag

__all__ = ["scenario_embedding_bag"]
