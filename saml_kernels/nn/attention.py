"""``ScenarioAttention``: SAML's scenario-aware target attention over the behaviour sequence (docs/design.md section 1, item 2).

For a sample b of scenario s with target embeddings t_g, t_s [D], sequence embeddings S_g, S_s [L, D] and
``seq_lengths[b]`` real positions (the rest padding):

    global:  w_g = masked_softmax(S_g Wk_g (t_g Wq_g)^T / sqrt(d))         Wq_g, Wk_g [D, d] shared
    local:   w_l = masked_softmax(S_s Wk_s (t_s Wq_s)^T / sqrt(d))         Wq_s, Wk_s [M, D, d] per scenario
    out_g = sum_l w_g[l] V_g S_g[l],   out_l = sum_l w_l[l] V_g S_g[l]      V_g [D, D] shared by both

An all-padding sequence has all-zero weights, so both outputs are zero (no NaN, zero gradient).

How it is computed (same math as the reference, fewer FLOPs): the key projection is moved to the query side,
S (Wk q) instead of (S Wk) q, so no [B, L, d] key tensor is built (the per-scenario ``Wk_s q`` is the routed
M-branch GEMM ``mbranch_linear(route="own")`` with the transposed weights); and V_g is applied after the
weighted sum, V_g (sum_l w[l] S_g[l]), once for both attentions on a [B, 2, D] tensor instead of on [B, L, D].
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _backend

from ..reference.attention import check_seq_lengths, masked_attention, sequence_mask
from .._args import size_arg

__all__ = ["ScenarioAttention"]


class ScenarioAttention(nn.Module):
    """Scenario-aware target attention (drop-in; parameters named as ``reference.attention.RefScenarioAttention``).

    Args:
        embedding_dim: D (target and sequence embeddings, and the output width).
        attention_dim: d of the query/key projections.
        num_scenarios: M (per-scenario local projections).
        (D, d, M: any integral value >= 1, numpy integers and 0-dim integer tensors included, not bool.)
        backend: forced backend of the routed GEMM (None: context / env / automatic).
        device, dtype: factory arguments.

    Parameters: ``global_query.weight [d, D]``, ``global_key.weight [d, D]``, ``value.weight [D, D]`` (nn.Linear
    layout, no bias), ``local_query.weight [M, D, d]``, ``local_key.weight [M, D, d]`` (MultiBranchLinear, no bias:
    a key bias adds one constant to every score of a row, which the softmax cancels).

    forward(target_g [B, D], target_s [B, D], seq_g [B, L, D], seq_s [B, L, D], seq_lengths [B] integer in [0, L],
    scenario [B] int) -> (global_out [B, D], local_out [B, D]). A length outside [0, L], a float or a wrongly shaped
    ``seq_lengths`` raises ValueError naming it (the range check is one device reduction and one host read).
    """

    def __init__(self, embedding_dim: int, attention_dim: int, num_scenarios: int, *, backend=None, device=None,
                 dtype=None):
        super().__init__()
        from . import MultiBranchLinear  # the package's layer (imported late: nn/__init__ lists the layers)

        fk = dict(device=device, dtype=dtype)
        # sizes: any integral value (numpy ints, 0-dim int tensors), never bool; stored as Python ints
        D, d, M = (size_arg("ScenarioAttention", n, v) for n, v in (
            ("embedding_dim", embedding_dim), ("attention_dim", attention_dim), ("num_scenarios", num_scenarios)))
        if backend is not None:  # a bad name fails here, not at the first forward
            _backend.check_name(backend, "ScenarioAttention(backend=...)")
        self.embedding_dim, self.attention_dim, self.num_scenarios, self.backend = D, d, M, backend
        self.global_query = nn.Linear(D, d, bias=False, **fk)
        self.global_key = nn.Linear(D, d, bias=False, **fk)
        self.value = nn.Linear(D, D, bias=False, **fk)
        self.local_query = MultiBranchLinear(D, d, M, bias=False, route="own", backend=backend, **fk)
        self.local_key = MultiBranchLinear(D, d, M, bias=False, route="own", backend=backend, **fk)

    def reset_parameters(self) -> None:
        for m in (self.global_query, self.global_key, self.value, self.local_query, self.local_key):
            m.reset_parameters()

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, attention_dim={self.attention_dim}, " \
               f"num_scenarios={self.num_scenarios}"

    def _check(self, target_g, target_s, seq_g, seq_s, seq_lengths, scenario):
        D = self.embedding_dim
        if seq_g.dim() != 3 or seq_g.shape[-1] != D or seq_s.shape != seq_g.shape:
            raise ValueError(f"ScenarioAttention: seq_g and seq_s must both be [B, L, {D}], got "
                             f"{tuple(seq_g.shape)} and {tuple(seq_s.shape)}")
        B = seq_g.shape[0]
        for name, t in (("target_g", target_g), ("target_s", target_s)):
            if tuple(t.shape) != (B, D):
                raise ValueError(f"ScenarioAttention: {name} must be [B, D] = [{B}, {D}], got {tuple(t.shape)}")
        if scenario.dim() != 1 or scenario.shape[0] != B or scenario.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ScenarioAttention: scenario must be a [B] = [{B}] int32/int64 tensor, got "
                             f"{scenario.dtype} of shape {tuple(scenario.shape)}")
        # lengths outside [0, L] would silently act as full / empty sequences (one reduction, one bool read)
        return check_seq_lengths("ScenarioAttention", seq_lengths, B, seq_g.shape[1])

    def forward(self, target_g: Tensor, target_s: Tensor, seq_g: Tensor, seq_s: Tensor, seq_lengths: Tensor,
                scenario: Tensor) -> tuple[Tensor, Tensor]:
        from ..ops.mbranch_linear import mbranch_linear

        seq_lengths = self._check(target_g, target_s, seq_g, seq_s, seq_lengths, scenario)
        B, L, D = seq_g.shape
        scale = 1.0 / math.sqrt(self.attention_dim)
        mask = sequence_mask(seq_lengths, L)
        # global: scores = S_g (Wk^T (Wq t_g)): u_g [B, D]
        u_g = self.global_query(target_g) @ self.global_key.weight
        # local: q_s = t_s Wq_s (routed GEMM), u_s = q_s Wk_s^T (routed GEMM with the transposed weights)
        q_s = self.local_query(target_s, scenario)
        wk_t = self.local_key.weight.transpose(1, 2).contiguous()
        u_s = mbranch_linear(q_s, wk_t, None, scenario, route="own", backend=self.backend)
        scores_g = torch.bmm(seq_g, u_g.unsqueeze(-1)).squeeze(-1) * scale
        scores_l = torch.bmm(seq_s, u_s.unsqueeze(-1)).squeeze(-1) * scale
        w = torch.stack([masked_attention(scores_g, mask), masked_attention(scores_l, mask)], 1)  # [B, 2, L]
        pooled = self.value(torch.bmm(w, seq_g))                                                 # [B, 2, D]
        return pooled[:, 0], pooled[:, 1]
