"""``SAMLConfig``: the configuration of SAML and of the shared-bottom baseline, and the model-input shape checks
shared by ``saml_kernels.nn.SAML`` and its reference twin (docs/design.md section 3)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ._args import size_arg
from .data.batch import FeatureSpec, SequenceSpec
from .ops.scenario_hash import check_scenario_rows


@dataclasses.dataclass
class SAMLConfig:
    """Configuration of SAML (and of the shared-bottom baseline).

    features: FeatureSpec (name, num_embeddings, scenario_aware, pooling) list of the pooled sparse features.
    num_scenarios: M. sequence: the behaviour-sequence SequenceSpec (None = no attention).
    target_feature: name of the feature whose embeddings query the sequence (the target item).
    num_dense: dense input columns. attention_dim: d of the query/key projections.
    aux_hidden / branch_hidden: hidden sizes of the auxiliary network and of every branch (same depth).
    mutual_layers: hidden-layer indices (0-based) where the MutualUnit runs. temperature, similarity: of the
    mutual unit. aux_loss_weight: weight of the auxiliary BCE. dropout: after every hidden layer.
    scenario_rows: hashed scenario tables, None or a mapping from a scenario-aware feature's (or the sequence's)
    name to Rs_f, 1 <= Rs_f <= its num_embeddings: its scenario tables get Rs_f rows, id -> hash(id) mod Rs_f
    (``ScenarioEmbedding(scenario_rows=)``; bodies without scenario tables, e.g. SharedBottom, ignore it).

    Sizes (num_scenarios, embedding_dim, attention_dim, every aux/branch hidden width >= 1; num_dense and
    mutual_layers >= 0) take any integral value (int, numpy integer, 0-dim integer tensor) but not bool; anything
    else raises TypeError / ValueError naming the field and the value.
    """

    features: list
    num_scenarios: int
    embedding_dim: int = 16
    sequence: Optional[SequenceSpec] = None
    target_feature: Optional[str] = None
    num_dense: int = 0
    attention_dim: int = 16
    aux_hidden: tuple = (256, 128)
    branch_hidden: tuple = (256, 128)
    mutual_layers: tuple = (0,)
    temperature: float = 1.0
    similarity: str = "cosine"
    aux_loss_weight: float = 0.3
    dropout: float = 0.0
    scenario_rows: Optional[dict] = None

    def __post_init__(self):
        self.features = [FeatureSpec(*f) for f in self.features]
        # sizes: any integral value (numpy ints, 0-dim int tensors), never bool or float; stored as Python ints
        size = lambda name, v, minimum=1: size_arg("SAMLConfig", name, v, minimum)  # noqa: E731
        self.num_scenarios = size("num_scenarios", self.num_scenarios)
        self.embedding_dim = size("embedding_dim", self.embedding_dim)
        self.attention_dim = size("attention_dim", self.attention_dim)
        self.num_dense = size("num_dense", self.num_dense, 0)
        self.aux_hidden = tuple(size(f"aux_hidden[{i}]", v) for i, v in enumerate(self.aux_hidden))
        self.branch_hidden = tuple(size(f"branch_hidden[{i}]", v) for i, v in enumerate(self.branch_hidden))
        self.mutual_layers = tuple(sorted(set(size(f"mutual_layers[{i}]", m, 0)
                                              for i, m in enumerate(self.mutual_layers))))
        if self.sequence is not None:
            self.sequence = SequenceSpec(*self.sequence)
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"SAMLConfig: feature names must be unique, got {names}")
        if len(self.aux_hidden) != len(self.branch_hidden) or not self.branch_hidden:
            raise ValueError("SAMLConfig: aux_hidden and branch_hidden need the same (non-zero) number of layers, "
                             f"got {self.aux_hidden} and {self.branch_hidden}")
        bad = [m for m in self.mutual_layers if not 0 <= m < len(self.branch_hidden)]
        if bad:
            raise ValueError(f"SAMLConfig: mutual_layers {bad} out of range [0, {len(self.branch_hidden)})")
        if self.similarity not in ("cosine", "dot"):
            raise ValueError(f"SAMLConfig: similarity must be 'cosine' or 'dot', got {self.similarity!r}")
        if self.temperature <= 0:
            raise ValueError(f"SAMLConfig: temperature must be > 0, got {self.temperature}")
        if self.sequence is not None:
            if self.target_feature not in names:
                raise ValueError(f"SAMLConfig: target_feature {self.target_feature!r} must name one of {names}")
            tf = self.features[names.index(self.target_feature)]
            if not (tf.scenario_aware and self.sequence.scenario_aware):
                raise ValueError("SAMLConfig: the local attention needs a scenario-aware target feature and sequence")
        seq = [(self.sequence.name, self.sequence.num_embeddings, self.sequence.scenario_aware)] if self.sequence else []
        self.scenario_rows = check_scenario_rows("SAMLConfig", [tuple(f) for f in self.features] + seq,
                                                 self.scenario_rows) or None
        if self.num_aware == 0 and self.sequence is None:
            raise ValueError("SAMLConfig: at least one scenario-aware feature (or a sequence) is needed")

    @property
    def num_aware(self) -> int:
        return sum(1 for f in self.features if f.scenario_aware)

    @property
    def global_dim(self) -> int:
        """Width of A_0 = [E_g ; att_g ; dense]."""
        return len(self.features) * self.embedding_dim + (self.embedding_dim if self.sequence else 0) + self.num_dense

    @property
    def scenario_dim(self) -> int:
        """Width of H_0 = [E_s ; att_l]."""
        return self.num_aware * self.embedding_dim + (self.embedding_dim if self.sequence else 0)

    def target_slots(self) -> tuple[int, int]:
        """(index of the target feature in E_g, its index in E_s)."""
        names = [f.name for f in self.features]
        f = names.index(self.target_feature)
        return f, sum(1 for g in self.features[:f] if g.scenario_aware)

    def layer_kinds(self) -> list:
        """Per hidden layer: "mutual", "all" (below a mutual layer) or "own"."""
        last = max(self.mutual_layers, default=-1)
        return ["mutual" if l in self.mutual_layers else ("all" if l < last else "own")
                for l in range(len(self.branch_hidden))]

    @classmethod
    def from_data(cls, data, **kw) -> "SAMLConfig":
        """A config matching a ``saml_kernels.data.CTRData`` (features, scenarios, dense, sequence)."""
        names = [f.name for f in data.features]
        target = kw.pop("target_feature", "item" if "item" in names else None)
        return cls(features=list(data.features), num_scenarios=data.num_scenarios, sequence=data.sequence,
                   target_feature=target if data.sequence is not None else None, num_dense=data.num_dense, **kw)


def _is_int_tensor(t) -> bool:
    return isinstance(t, Tensor) and not (t.dtype == torch.bool or t.is_floating_point() or t.is_complex())


def check_model_inputs(who: str, config: SAMLConfig, scenario, seq_ids, seq_lengths, dense) -> tuple[int, int]:
    """Shape checks of the model inputs that the layers cannot make (they only see derived tensors); returns
    (B, L) with B = scenario.shape[0] and L = seq_ids.shape[1] (0 without a sequence). No host sync: only shapes
    and dtypes are read (the value checks are the layers': ids in the embedding op, lengths in the attention).

    scenario [B]; with ``config.sequence``: seq_ids [B, L] integer (L >= 1) and seq_lengths [B] (both required);
    with ``config.num_dense``: dense [B, num_dense]. Raises ValueError naming the argument and the shapes."""
    if not isinstance(scenario, Tensor) or scenario.dim() != 1:
        raise ValueError(f"{who}: scenario must be a [B] tensor, got "
                         f"{list(scenario.shape) if isinstance(scenario, Tensor) else type(scenario).__name__}")
    B, L = scenario.shape[0], 0
    if config.sequence is not None:
        if seq_ids is None or seq_lengths is None:
            raise ValueError(f"{who}: this config has a behaviour sequence; pass seq_ids [B, L] and seq_lengths [B]")
        if not _is_int_tensor(seq_ids) or seq_ids.dim() != 2 or seq_ids.shape[0] != B or seq_ids.shape[1] < 1:
            got = (f"{seq_ids.dtype} of shape {list(seq_ids.shape)}" if isinstance(seq_ids, Tensor)
                   else type(seq_ids).__name__)
            raise ValueError(f"{who}: seq_ids must be a 2-D integer tensor [B, L] with B = scenario.shape[0] = {B} "
                             f"and L >= 1, got {got}")
        L = seq_ids.shape[1]
    if config.num_dense:
        if not isinstance(dense, Tensor) or tuple(dense.shape) != (B, config.num_dense):
            raise ValueError(f"{who}: dense must be [B, num_dense] = [{B}, {config.num_dense}], got "
                             f"{list(dense.shape) if isinstance(dense, Tensor) else dense}")
    return B, L
