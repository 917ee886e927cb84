"""``STARReference``: STAR in plain PyTorch (scenario loops, ``torch.where``), the oracle of ``saml_kernels.nn.STAR``
and the eager baseline of the model benchmark. The same body (``saml_kernels.nn.star.STARBody``) built from
``REFERENCE_LAYERS``: identical parameter names, so state_dicts interchange."""
from __future__ import annotations

from typing import Optional

from ..nn.star import STARBody, STARConfig
from .layer_set import REFERENCE_LAYERS
from .model import _check_embedding_optimizer

__all__ = ["STARReference", "STARConfig"]


class STARReference(STARBody):
    """STAR from the reference layers. embedding_optimizer: "rowwise_adagrad" (the default, as ``nn.STAR``'s: the
    row-wise state buffers, which ``TrainingOptimizer`` updates after the backward) or None."""

    def __init__(self, config: STARConfig, *, embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 device=None, dtype=None, embedding_dtype=None):
        _check_embedding_optimizer(type(self).__name__, embedding_optimizer)
        super().__init__(config, REFERENCE_LAYERS, embedding_optimizer=embedding_optimizer, device=device,
                         dtype=dtype, embedding_dtype=embedding_dtype)
