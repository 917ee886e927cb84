"""Plain-PyTorch versions of every op, layer and model: the test oracle and the benchmark baseline.

The op references load with the package; the layer set and the models (``REFERENCE_LAYERS``, ``SAMLReference``,
``SharedBottomReference``) load on first use, because they are built on ``saml_kernels.nn``, which needs the ops
package fully imported first."""
import importlib

from .scenario_embedding_bag import scenario_embedding_bag_reference
from .mbranch_linear import mbranch_linear_reference
from .mutual_unit import mutual_linear_reference, mutual_unit_reference
from .partitioned_norm import partitioned_norm_reference

_ON_FIRST_USE = {"REFERENCE_LAYERS": ".layer_set", "SAMLReference": ".model", "SharedBottomReference": ".model",
                 "SAMLConfig": ".model", "TrainingOptimizer": ".model", "STARReference": ".star",
                 "HMoEReference": ".hmoe"}

__all__ = ["mbranch_linear_reference", "mutual_unit_reference", "mutual_linear_reference",
           "scenario_embedding_bag_reference", "partitioned_norm_reference", "REFERENCE_LAYERS", "SAMLReference",
           "SharedBottomReference", "STARReference", "HMoEReference"]


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        return getattr(importlib.import_module(_ON_FIRST_USE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
