"""Custom ops (torch.library) with autograd; one module per op.

Importing this package defines every custom op (each op module registers its own) and then registers each op's
torch.autocast policy (``_autocast.register``), which needs the ops to exist: the op modules import ``_autocast``
for its helpers, never the other way round."""
from . import (scenario_embedding_bag, scenario_embedding_bag_8bit, embedding_optimizer,  # noqa: F401
               mbranch_linear, mutual_unit, mutual_linear, partitioned_norm)
from . import _autocast

_autocast.register()
