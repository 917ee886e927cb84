"""Custom ops (torch.library) with autograd; one module per op."""
from . import _autocast  # noqa: F401  (registers every op's torch.autocast policy)
