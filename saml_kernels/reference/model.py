"""The plain-PyTorch models: ``SAMLReference`` and ``SharedBottomReference``, the bodies of
``saml_kernels.nn.SAML`` / ``SharedBottom`` built with ``REFERENCE_LAYERS`` (scenario loops and ``torch.where``,
dense table gradients). They are the oracle of the accelerated models and the eager baseline of the model
benchmark; their parameter names (listed on ``nn.SAML`` / ``nn.SharedBottom``) and state_dicts are those of the
kernel models, so a state_dict moves between the twins unchanged.

``SAMLConfig``, ``TrainingOptimizer`` and the losses live in ``saml_kernels.config`` / ``saml_kernels.training`` and
are re-exported here.
"""
from __future__ import annotations

from typing import Optional

from ..config import SAMLConfig  # noqa: F401  (re-exported)
from ..nn.saml import SAML
from ..nn.shared_bottom import SharedBottom
from ..training import (OPTIMIZER_STATE_NAMES, TrainingOptimizer, bce_loss,  # noqa: F401  (re-exported)
                        optimizer_state_keys_optional, saml_loss)
from .layer_set import REFERENCE_LAYERS

__all__ = ["SAMLReference", "SharedBottomReference"]


def _check_embedding_optimizer(who: str, embedding_optimizer) -> None:
    if embedding_optimizer not in (None, "rowwise_adagrad"):
        raise ValueError(f"{who}: embedding_optimizer must be None or 'rowwise_adagrad', got {embedding_optimizer!r}")


class SAMLReference(SAML):
    """SAML in plain PyTorch: ``nn.SAML``'s body with ``REFERENCE_LAYERS`` (same forward, loss, parameter names).

    embedding_optimizer: "rowwise_adagrad" (the default, as ``nn.SAML``'s) or None: the former registers the
    row-wise Adagrad state buffers (``global_state``, ``scenario_state``) of ``nn.SAML``'s fused optimizer, which
    :class:`TrainingOptimizer` then updates with the same math after the backward (dense gradients, not fused),
    so ``SAML(cfg)`` and ``SAMLReference(cfg)`` are twins by default (same state_dict keys, same training).

    embedding_dtype: dtype of the tables (None = ``dtype``), a factory argument as in ``nn.SAML``: 16-bit tables
    beside float32 dense layers, the embedding outputs cast to the dense dtype.

    forward / loss / state_dict rules: as ``nn.SAML``; bad inputs raise at once (no deferred checks).
    """

    def __init__(self, config: SAMLConfig, *, embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 device=None, dtype=None, embedding_dtype=None):
        _check_embedding_optimizer(type(self).__name__, embedding_optimizer)
        super().__init__(config, layers=REFERENCE_LAYERS, embedding_optimizer=embedding_optimizer, device=device,
                         dtype=dtype, embedding_dtype=embedding_dtype)


class SharedBottomReference(SharedBottom):
    """The shared-bottom baseline in plain PyTorch: ``nn.SharedBottom``'s body with ``REFERENCE_LAYERS``.

    embedding_optimizer: "rowwise_adagrad" (the default) or None (state buffers for :class:`TrainingOptimizer`, as
    :class:`SAMLReference`). forward / loss / state_dict rules: as ``nn.SharedBottom``."""

    def __init__(self, config: SAMLConfig, *, embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 device=None, dtype=None, embedding_dtype=None):
        _check_embedding_optimizer(type(self).__name__, embedding_optimizer)
        super().__init__(config, layers=REFERENCE_LAYERS, embedding_optimizer=embedding_optimizer, device=device,
                         dtype=dtype, embedding_dtype=embedding_dtype)
