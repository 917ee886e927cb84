"""``ScenarioAttention``: SAML's scenario-aware target attention over the behaviour sequence (docs/design.md
section 1, item 2).

For a sample b of scenario s with target embeddings t_g, t_s [D], sequence embeddings S_g, S_s [L, D] and
``seq_lengths[b]`` real positions (the rest padding):

    global:  w_g = masked_softmax(S_g Wk_g (t_g Wq_g)^T / sqrt(d))         Wq_g, Wk_g [D, d] shared
    local:   w_l = masked_softmax(S_s Wk_s (t_s Wq_s)^T / sqrt(d))         Wq_s, Wk_s [M, D, d] per scenario
    out_g = sum_l w_g[l] V_g S_g[l],   out_l = sum_l w_l[l] V_g S_g[l]      V_g [D, D] shared by both

An all-padding sequence has all-zero weights, so both outputs are zero (no NaN, zero gradient).

How it is computed (same math as the reference, fewer FLOPs): the key projection is moved to the query side,
S (Wk q) instead of (S Wk) q, so no [B, L, d] key tensor is built (the per-scenario ``t_s Wq_s Wk_s^T`` is one
routed M-branch GEMM ``mbranch_linear(route="own")`` with the weights Wq_s Wk_s^T [M, D, D], a bmm of the two
parameters); both score rows share one masked softmax on [B, 2, L]; and V_g is applied after the weighted sum,
V_g (sum_l w[l] S_g[l]), once for both attentions on a [B, 2, D] tensor instead of on [B, L, D].
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _backend
from .._args import size_arg
from ..ops import _checks
from ..ops.mbranch_linear import mbranch_linear
from .multi_branch_linear import MultiBranchLinear

__all__ = ["ScenarioAttention", "check_seq_lengths", "masked_attention", "sequence_mask"]


def masked_attention(scores: Tensor, mask: Tensor) -> Tensor:
    """softmax over positions with padding masked out; an all-padding row gives all-zero weights (never NaN).

    scores [..., L] (any float dtype), mask bool broadcastable to it (True = a real position). Padded scores become the dtype's
    lowest value, so a row with at least one real position puts exactly 0 on padding; an all-padding row gets
    a uniform softmax that the final ``* mask`` zeroes (its gradient is zero too)."""
    neg = torch.finfo(scores.dtype).min
    w = torch.softmax(scores.masked_fill(~mask, neg), dim=-1)
    return w * mask.to(w.dtype)


def sequence_mask(seq_lengths: Tensor, L: int) -> Tensor:
    """[B, L] bool, True at positions < seq_lengths[b]."""
    return torch.arange(L, device=seq_lengths.device).unsqueeze(0) < seq_lengths.unsqueeze(1)


def check_seq_lengths(who: str, seq_lengths, B: int, L: int) -> Tensor:
    """Checks that ``seq_lengths`` is an integer tensor of shape [B] with every value in [0, L]; returns the
    lengths to use. Shared by ``ScenarioAttention`` and its reference twin, so both reject alike.

    A length above L (or below 0) would silently read as a full (or empty) sequence, so it is an error
    (ValueError) that names the first bad position and its value. Cost: one fused device reduction; the host read
    of its flag follows the check mode of ``saml_kernels.ops._checks`` (at once; once per block inside a model's
    deferred checks, which then use the lengths clamped to [0, L] until the flag is read; never in capture-safe
    mode, which counts the error and clamps). Under ``torch.compile`` the range check is a device-side assert
    (RuntimeError without the position), so the graph does not break."""
    if not isinstance(seq_lengths, Tensor):
        raise TypeError(f"{who}: seq_lengths must be a [B] = [{B}] integer tensor, got {type(seq_lengths).__name__}")
    if seq_lengths.dtype == torch.bool or seq_lengths.is_floating_point() or seq_lengths.is_complex():
        raise ValueError(f"{who}: seq_lengths must be an integer tensor, got {seq_lengths.dtype}")
    if tuple(seq_lengths.shape) != (B,):
        raise ValueError(f"{who}: seq_lengths must have shape [B] = [{B}], got {list(seq_lengths.shape)}")
    bad = (seq_lengths < 0) | (seq_lengths > L)
    if torch.compiler.is_compiling():  # no host read inside a compiled graph: a device-side assert instead
        torch._assert_async(~bad.any(), f"{who}: seq_lengths out of the valid range [0, L] = [0, {L}]")
        return seq_lengths

    def explain():
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"{who}: seq_lengths[{b}] = {int(seq_lengths[b])} is out of the valid range [0, L] = "
                         f"[0, {L}] (L = the sequence length)")

    if B and _checks.check_value(bad.any(), explain, f"{who}: seq_lengths out of [0, L]",
                                 key=("seq_lengths", L) + _checks.tensor_key(seq_lengths)):
        return seq_lengths.clamp(0, L)
    return seq_lengths


class ScenarioAttention(nn.Module):
    """Scenario-aware target attention (drop-in; its twin ``saml_kernels.reference.attention.RefScenarioAttention``
    takes the same arguments but ``backend`` and has the same parameter names).

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
        seq_lengths = self._check(target_g, target_s, seq_g, seq_s, seq_lengths, scenario)
        B, L, D = seq_g.shape
        scale = 1.0 / math.sqrt(self.attention_dim)
        mask = sequence_mask(seq_lengths, L)
        # global: scores = S_g (Wk^T (Wq t_g)): u_g [B, D]
        u_g = self.global_query(target_g) @ self.global_key.weight
        # local: u_s = t_s (Wq_s Wk_s^T), one routed GEMM with each scenario's [D, D] product of the two
        # projections (formed once per call: M D^2 d flops), instead of two routed GEMMs in a row
        w_qk = torch.bmm(self.local_query.weight, self.local_key.weight.transpose(1, 2))          # [M, D, D]
        u_s = mbranch_linear(target_s, w_qk, None, scenario, route="own", backend=self.backend)
        scores = torch.stack([torch.bmm(seq_g, u_g.unsqueeze(-1)).squeeze(-1),
                              torch.bmm(seq_s, u_s.unsqueeze(-1)).squeeze(-1)], 1) * scale       # [B, 2, L]
        w = masked_attention(scores, mask.unsqueeze(1))                                          # [B, 2, L]
        pooled = self.value(torch.bmm(w, seq_g))                                                 # [B, 2, D]
        return pooled[:, 0], pooled[:, 1]
