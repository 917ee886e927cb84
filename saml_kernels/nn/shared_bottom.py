"""``SharedBottom``: the shared-bottom baseline, a family body (``nn/_family.py``) over the shared input.

    x_0 = [E_g ; att_g ; dense]                       every feature in the global table (``SharedInputLayers``)
    h   = bottom(x_0)                                 shared MLP: Linear, relu, dropout per ``branch_hidden[:-1]``
    logit = head(tower(h, s), s)                      per-scenario tower (``branch_hidden[-1]``, relu) and logit,
                                                      ``multi_branch_linear`` route "own"
    loss = BCE(logit, y)

It has SAML's embedding budget (the same tables, widths and ``SAMLConfig``) but no scenario structure in the
representation. Its input layers sit at the top of the module (``inline_inputs``), so its parameter names are
SAML's: embedding.*, sequence_embedding.*, attention.*, then bottom.<3 i>.{weight, bias}, tower.{weight, bias},
head.{weight, bias}.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._layer_set import LayerSet
from ..config import SAMLConfig
from ._family import FamilyBody
from .layer_set import KERNEL_LAYERS

__all__ = ["SharedBottom"]


class SharedBottom(FamilyBody):
    """Shared-bottom baseline with SAML's embedding budget: the same tables and widths, no scenario structure in
    the representation (only the global embeddings E_g, global attention and dense go in), one shared bottom MLP
    (``config.branch_hidden[:-1]``) and a per-scenario tower (last hidden layer + logit, own route).

    Arguments as :class:`~saml_kernels.nn.SAML` (``layers``, ``backend``, ``embedding_optimizer``, ...,
    ``embedding_dtype``); ``backend`` applies to every op, the tower's included. forward(...) -> logit [B] (same
    inputs and input checks as SAML); loss(batch) = BCE(logit) (0 with zero gradients for an empty batch). Its
    state_dict follows SAML's rule: row-wise Adagrad states are optimizer state (optional in a strict load).
    Parameter names: embedding.*, sequence_embedding.*, attention.* (as SAML), bottom.<3 i>.{weight, bias},
    tower.{weight, bias}, head.{weight, bias}.
    """

    config_type = SAMLConfig
    inline_inputs = True

    def __init__(self, config: SAMLConfig, *, layers: LayerSet = KERNEL_LAYERS, backend: Optional[str] = None,
                 embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 embedding_lr: float = 0.05, embedding_eps: float = 1e-8,
                 embedding_weight_decay: float = 0.0, embedding_skip_nonfinite: bool = False, device=None, dtype=None,
                 embedding_dtype: Optional[torch.dtype] = None, embedding_stochastic_rounding: bool = True):
        super().__init__(config, layers, backend=backend, embedding_optimizer=embedding_optimizer,
                         embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device, dtype=dtype,
                         embedding_weight_decay=embedding_weight_decay,
                         embedding_skip_nonfinite=embedding_skip_nonfinite, embedding_dtype=embedding_dtype,
                         embedding_stochastic_rounding=embedding_stochastic_rounding)
        c, kw = self.config, self.options
        fk = dict(device=device, dtype=dtype)
        M, k = c.num_scenarios, c.global_dim
        bottom = []
        for n in c.branch_hidden[:-1]:
            bottom += [nn.Linear(k, n, **fk), nn.ReLU(), nn.Dropout(c.dropout)]
            k = n
        self.bottom = nn.Sequential(*bottom)
        self.tower = layers.multi_branch_linear(k, c.branch_hidden[-1], M, bias=True, activation="relu", route="own",
                                                **kw)
        self.head = layers.multi_branch_linear(c.branch_hidden[-1], 1, M, bias=True, activation=None, route="own",
                                               **kw)

    def _forward(self, x0: Tensor, scenario: Tensor) -> Tensor:
        return self.head(self.tower(self.bottom(x0), scenario), scenario).squeeze(-1)
