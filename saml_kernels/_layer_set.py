"""The layer sets a model body is built from.

A model (``SAML``, ``SharedBottom``, ``STAR``, ``HMoE``) is written once, as a body that takes its layer classes
from a :class:`LayerSet`: ``saml_kernels.nn.layer_set.KERNEL_LAYERS`` (this package's fused layers) or
``saml_kernels.reference.layer_set.REFERENCE_LAYERS`` (the plain-PyTorch twins, the tests' oracle and the benchmarks'
eager baseline). The twins of a layer take the same constructor arguments and hold the same parameter names, so
the two models built from one body cannot drift and their state_dicts interchange.

Kernel-only options (``backend=``, the fused embedding optimizer's ``lr`` / ``eps``, ``save_branch_outputs``) are
keyword arguments of the kernel layers only; a body passes them only when :attr:`LayerSet.kernels` is true, and
only then runs its forward under ``saml_kernels.deferred_checks`` (docs/design.md section 3).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

NAMES = ("kernels", "reference")


@dataclasses.dataclass(frozen=True)
class LayerSet:
    """Layer classes of one implementation. ``name``: "kernels" or "reference"."""

    name: str
    scenario_embedding: type
    attention: type
    multi_branch_linear: type
    mutual_unit: type
    star_linear: Optional[type] = None
    partitioned_norm: Optional[type] = None

    def __post_init__(self):
        if self.name not in NAMES:
            raise ValueError(f"LayerSet: name must be one of {NAMES}, got {self.name!r}")

    @property
    def kernels(self) -> bool:
        """True for the package's kernel layers: they take the kernel-only options, and a model built from them
        runs its forward under deferred value checks."""
        return self.name == "kernels"
