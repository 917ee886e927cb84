"""``HMoEReference``: HMoE in plain PyTorch (every tower looped over the full batch, stop-gradient by
``torch.where(own, y, y.detach())``), the oracle of ``saml_kernels.nn.HMoE`` and the eager baseline of the model
benchmark. The same body (``saml_kernels.nn.hmoe.HMoEBody``) built from ``REFERENCE_LAYERS``."""
from __future__ import annotations

from typing import Optional

from ..nn.hmoe import HMoEBody, HMoEConfig
from .layer_set import REFERENCE_LAYERS
from .model import _check_embedding_optimizer

__all__ = ["HMoEReference", "HMoEConfig"]


class HMoEReference(HMoEBody):
    """HMoE from the reference layers (embedding_optimizer "rowwise_adagrad", the default, or None, as
    ``STARReference``)."""

    def __init__(self, config: HMoEConfig, *, embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 device=None, dtype=None, embedding_dtype=None):
        _check_embedding_optimizer(type(self).__name__, embedding_optimizer)
        super().__init__(config, REFERENCE_LAYERS, embedding_optimizer=embedding_optimizer, device=device,
                         dtype=dtype, embedding_dtype=embedding_dtype)
