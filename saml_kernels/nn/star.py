"""``STAR``: the Star Topology Adaptive Recommender (Sheng et al., CIKM 2021) on the package's kernels, and the
body it shares with its plain-PyTorch twin ``saml_kernels.reference.STARReference`` (docs/design.md section 9).

    x_0 = [E_g ; att_g ; dense]                        shared embeddings (every feature in the global table)
    h_0 = PartitionedNorm(x_0, s)                      statistics, scale and shift per scenario
    h_l = dropout(StarLinear_l(h_{l-1}, s), relu)      W_eff = W_s * W_shared, b_eff = b_s + b_shared
    a_b = relu(x_0b Wx + Embedding(s_b) We + c)       STAR's auxiliary network: the scenario indicator (its
    logit = StarLinear_head(h_L, s) + a Wo + c_o       embedding) and the features, two layers -> [B]
    loss = BCE(logit, y)

The auxiliary network's first layer is [x_0 ; Embedding(s)] @ [Wx ; We] + c on the package's M-branch GEMM
(one branch, the indicator embedding as its second operand: no concatenation); its output is added to the star
network's logit, as in the paper (there the network sees the domain indicator and the features that describe the
domain; this package's data marks no such subset, so it sees x_0, every shared feature).

Parameter names (shared with the twin): inputs.embedding.{global_weight, scenario_weight},
inputs.sequence_embedding.*, inputs.attention.*, norm.{weight, bias, scenario_weight, scenario_bias} (buffers
running_mean, running_var), star_layers.<l>.{shared_weight, shared_bias, weight, bias}, head.*,
aux_embedding.weight, aux_layer.{weight, aux_weight, bias} ([1, global_dim, aux_hidden], [1, aux_dim, aux_hidden],
[1, aux_hidden]), aux_head.{weight, bias}.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch import Tensor, nn

from .._args import size_arg
from ..config import FamilyConfig
from ._family import FamilyBody, unrouted
from .partitioned_norm import check_norm_args

__all__ = ["STAR", "STARConfig", "STARBody"]


@dataclasses.dataclass
class STARConfig(FamilyConfig):
    """STAR's configuration: the input fields of ``FamilyConfig`` and

    hidden: widths of the star (StarLinear) layers. aux_dim: width of the scenario-indicator embedding of the
    auxiliary network (which also sees the features x_0); aux_hidden: its hidden width. norm_eps, norm_momentum:
    of the partitioned normalisation.
    ``STARConfig.from_data(data, **fields)`` reads the inputs from a ``saml_kernels.data.CTRData``."""

    hidden: tuple = (256, 128)
    aux_dim: int = 8
    aux_hidden: int = 32
    norm_eps: float = 1e-5
    norm_momentum: float = 0.1

    def __post_init__(self):
        self._check("STARConfig")
        if not self.hidden:
            raise ValueError("STARConfig: hidden needs at least one layer width")
        self.hidden = tuple(size_arg("STARConfig", f"hidden[{i}]", v) for i, v in enumerate(self.hidden))
        self.aux_dim = size_arg("STARConfig", "aux_dim", self.aux_dim)
        self.aux_hidden = size_arg("STARConfig", "aux_hidden", self.aux_hidden)
        self.norm_eps, self.norm_momentum = check_norm_args("STARConfig", self.norm_eps, self.norm_momentum)


class STARBody(FamilyBody):
    """STAR written once over a ``LayerSet`` (``star_linear``, ``partitioned_norm``, ``scenario_embedding``,
    ``attention``). Use :class:`STAR` or ``saml_kernels.reference.STARReference``.

    forward(indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None) -> logit [B] (inputs as
    ``SAML``'s: a ``saml_kernels.data.Batch``'s ``inputs()``). ``loss(batch)``: mean BCE (0 for B = 0).
    A bad input (a scenario id outside [0, M) at the boundary, an id, offset or length at its layer) raises its
    named error before anything is updated: the weights, the fused embedding tables and the normalisation's
    running statistics (with the kernel layers, when the step's one deferred check is read; see
    :class:`~saml_kernels.nn._family.FamilyBody`)."""

    config_type = STARConfig

    def __init__(self, config: STARConfig, layers, *, backend: Optional[str] = None,
                 embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 embedding_lr: float = 0.05, embedding_eps: float = 1e-8,
                 device=None, dtype=None, **embedding_options):
        super().__init__(config, layers, backend=backend, embedding_optimizer=embedding_optimizer,
                         embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device, dtype=dtype,
                         **embedding_options)
        c, kw = self.config, self.options
        fk = dict(device=device, dtype=dtype)
        M = c.num_scenarios
        self.norm = layers.partitioned_norm(c.global_dim, M, eps=c.norm_eps, momentum=c.norm_momentum, **kw)
        self.star_layers = nn.ModuleList()
        k = c.global_dim
        for n in c.hidden:
            self.star_layers.append(layers.star_linear(k, n, M, bias=True, activation="relu", **kw))
            k = n
        self.head = layers.star_linear(k, 1, M, bias=True, activation=None, **kw)
        self.aux_embedding = nn.Embedding(M, c.aux_dim, **fk)
        # one branch: the auxiliary network is shared by the scenarios; the indicator enters as its embedding
        self.aux_layer = layers.multi_branch_linear(c.global_dim, c.aux_hidden, 1, aux_features=c.aux_dim,
                                                    bias=True, activation="relu", route="all", grad_mask="none",
                                                    **kw)
        self.aux_head = nn.Linear(c.aux_hidden, 1, **fk)
        self.dropout = nn.Dropout(c.dropout)

    def _forward(self, x0: Tensor, scenario: Tensor) -> Tensor:
        h = self.norm(x0, scenario)
        for layer in self.star_layers:
            h = self.dropout(layer(h, scenario))
        return (self.head(h, scenario) + self.auxiliary(x0, scenario)).squeeze(-1)

    def auxiliary(self, x0: Tensor, scenario: Tensor) -> Tensor:
        """STAR's auxiliary network [B, 1]: relu([x_0 ; Embedding(s)] @ [Wx ; We] + c) -> Linear."""
        a = self.aux_layer(x0, unrouted(scenario), self.aux_embedding(scenario.long()))[0]
        return self.aux_head(a)


class STAR(STARBody):
    """STAR on the package's kernels (grouped-GEMM ``StarLinear``, segmented-statistics ``PartitionedNorm``,
    fused embedding bags); see :class:`STARBody` and the module docstring.

    Args: config (:class:`STARConfig`); backend (forced backend of every op); embedding_optimizer None | "sgd" |
    "rowwise_adagrad" (fused into the embedding backward, as ``SAML``), embedding_lr, embedding_eps,
    embedding_weight_decay, embedding_skip_nonfinite, embedding_stochastic_rounding; device, dtype; embedding_dtype (16-bit tables beside float32
    dense layers: the embedding outputs are cast to the dense dtype). All as :class:`~saml_kernels.nn.SAML`.
    """

    def __init__(self, config: STARConfig, *, backend: Optional[str] = None,
                 embedding_optimizer: Optional[str] = "rowwise_adagrad",
                 embedding_lr: float = 0.05, embedding_eps: float = 1e-8,
                 embedding_weight_decay: float = 0.0, embedding_skip_nonfinite: bool = False, device=None,
                 dtype=None, embedding_dtype=None, embedding_stochastic_rounding: bool = True):
        from .layer_set import KERNEL_LAYERS

        super().__init__(config, KERNEL_LAYERS, backend=backend, embedding_optimizer=embedding_optimizer,
                         embedding_lr=embedding_lr, embedding_eps=embedding_eps, device=device, dtype=dtype,
                         embedding_weight_decay=embedding_weight_decay,
                         embedding_skip_nonfinite=embedding_skip_nonfinite, embedding_dtype=embedding_dtype,
                         embedding_stochastic_rounding=embedding_stochastic_rounding)
