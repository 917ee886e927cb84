"""Plain-PyTorch scenario-aware attention (the oracle of ``saml_kernels.nn.ScenarioAttention``).

Written the direct way public code writes it: every key and value of the sequence is projected, the
per-scenario key/query projections run every branch on the whole batch and pick rows with ``torch.where``. The
masked softmax is the oracle's own; the ``seq_lengths`` input check is the kernel layer's
(``saml_kernels.nn.attention.check_seq_lengths``), so both twins reject a bad length alike.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn.attention import check_seq_lengths
from .layers import RefMultiBranchLinear, size_arg

__all__ = ["RefScenarioAttention", "check_seq_lengths", "masked_attention", "sequence_mask"]


def masked_attention(scores: Tensor, mask: Tensor) -> Tensor:
    """softmax over positions with padding masked out; an all-padding row gives all-zero weights (never NaN).

    scores [B, L] (any float dtype), mask [B, L] bool (True = a real position). Padded scores become the dtype's
    lowest value, so a row with at least one real position puts exactly 0 on padding; an all-padding row gets
    a uniform softmax that the final ``* mask`` zeroes (its gradient is zero too)."""
    neg = torch.finfo(scores.dtype).min
    w = torch.softmax(scores.masked_fill(~mask, neg), dim=-1)
    return w * mask.to(w.dtype)


def sequence_mask(seq_lengths: Tensor, L: int) -> Tensor:
    """[B, L] bool, True at positions < seq_lengths[b]."""
    return torch.arange(L, device=seq_lengths.device).unsqueeze(0) < seq_lengths.unsqueeze(1)


class RefScenarioAttention(nn.Module):
    """Reference ScenarioAttention; the arguments (but ``backend``) and parameters of ``nn.ScenarioAttention``:

    global_query.weight [d, D], global_key.weight [d, D], value.weight [D, D] (the shared V_g),
    local_query.weight [M, D, d], local_key.weight [M, D, d] (per-scenario projections, no bias).

    forward(target_g [B, D], target_s [B, D], seq_g [B, L, D], seq_s [B, L, D], seq_lengths [B] integer in [0, L]
    (else ValueError), scenario [B]) -> (global_out [B, D], local_out [B, D]) with
      global: w_g = masked_softmax((S_g Wk)(t_g Wq)^T / sqrt(d)),  global_out = sum_l w_g[l] V_g s_g[l]
      local:  w_l = masked_softmax((S_s Wk_s)(t_s Wq_s)^T / sqrt(d)), local_out = sum_l w_l[l] V_g s_g[l]
    """

    def __init__(self, embedding_dim: int, attention_dim: int, num_scenarios: int, *, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        D, d, M = (size_arg(type(self).__name__, n, v) for n, v in (
            ("embedding_dim", embedding_dim), ("attention_dim", attention_dim), ("num_scenarios", num_scenarios)))
        self.embedding_dim, self.attention_dim, self.num_scenarios = D, d, M
        self.global_query = nn.Linear(D, d, bias=False, **fk)
        self.global_key = nn.Linear(D, d, bias=False, **fk)
        self.value = nn.Linear(D, D, bias=False, **fk)
        self.local_query = RefMultiBranchLinear(D, d, M, bias=False, route="own", **fk)
        self.local_key = RefMultiBranchLinear(D, d, M, bias=False, route="own", **fk)

    def reset_parameters(self) -> None:
        for m in (self.global_query, self.global_key, self.value, self.local_query, self.local_key):
            m.reset_parameters()

    def forward(self, target_g, target_s, seq_g, seq_s, seq_lengths, scenario):
        B, L, D = seq_g.shape
        seq_lengths = check_seq_lengths(type(self).__name__, seq_lengths, B, L)
        scale = 1.0 / math.sqrt(self.attention_dim)
        mask = sequence_mask(seq_lengths, L)
        values = self.value(seq_g)                                              # [B, L, D]
        q_g = self.global_query(target_g)                                       # [B, d]
        k_g = self.global_key(seq_g)                                            # [B, L, d]
        w_g = masked_attention((k_g * q_g.unsqueeze(1)).sum(-1) * scale, mask)
        q_l = self.local_query(target_s, scenario)                              # [B, d]
        k_l = self.local_key(seq_s.reshape(B * L, D), scenario.repeat_interleave(L)).reshape(B, L, self.attention_dim)
        w_l = masked_attention((k_l * q_l.unsqueeze(1)).sum(-1) * scale, mask)
        return (w_g.unsqueeze(-1) * values).sum(1), (w_l.unsqueeze(-1) * values).sum(1)
