"""Plain-PyTorch mutual unit and mutual_linear: the float64 oracle of the tests and the eager baseline.

Math, for h [M, B, N] and scenario s [B] (own = h[s_b, b]):

    sim[m, b] = <own, h[m,b]> / (max(|own|, 1e-8) * max(|h[m,b]|, 1e-8))   (similarity "cosine")
              = <own, h[m,b]> / sqrt(N)                                      (similarity "dot")
    a[b, :]   = softmax_m(sim[:, b] / temperature)
    out[b]    = sum_m a[b, m] h[m, b]

Gradient semantics: for sample b the other branches h[m, b], m != s_b, are stop-gradient constants; only
own = h[s_b, b] receives gradient (through the a_s * own term and through every sim[m, b]).

``mutual_linear_reference`` = ``mutual_unit_reference(act(x W_m + aux Wa_m + bias_m) for all m)``; since every
non-own branch output is stop-gradient, branch m's parameters get gradient only from scenario-m samples and x
only through the own branch (``mbranch_linear(route="all", grad_mask="own")``).

Two kinds of entry points:
- ``mutual_unit_reference`` / ``mutual_linear_reference``: differentiable through ordinary autograd;
- ``mutual_forward_kernel`` / ``mutual_backward_kernel`` / ``mutual_linear_forward_kernel`` /
  ``mutual_linear_backward_kernel``: the backend-kernel contract (the arguments of the C++ ops
  ``torch.ops.saml_C.mutual_*``, integer codes for similarity and activation): the ``reference`` backend's
  kernel tables, ``KERNELS``.

Overflow: in float32 |h|^2 overflows for |h| > ~1.8e19 (cos = inf/inf = NaN although cosine is scale-invariant).
Every backend therefore computes the cosine on rows scaled by an exact power of two r_m = 2^-e (max|h_m r_m| < 1
for rows with max|h_m| > 1, r_m = 1 otherwise): cos = <o r_o, h_m r_m> / (max(|o r_o|, eps r_o) max(|h_m r_m|,
eps r_m)), identical to the definition (eps semantics included) and finite up to float32's largest values.
"""
from __future__ import annotations

import math

import torch

from .._codes import SIMILARITIES
from . import mbranch_linear as _mbl

EPS = 1e-8
SIMILARITY = SIMILARITIES


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _code(table, value):
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return table[value]


def inv_scale(h):
    """r [M, B, 1]: the power of two 2^-e with max|h[m, b, :]| = f 2^e, f in [0.5, 1), for rows with max > 1, else 1
    (also for non-finite rows, whose NaN/inf then propagates as before). Detached, exact to multiply by."""
    with torch.no_grad():
        amax = h.abs().amax(-1, keepdim=True) if h.shape[-1] else h.new_zeros(h.shape[:-1] + (1,))
        e = torch.frexp(amax)[1]
        big = (amax > 1) & torch.isfinite(amax)
        return torch.where(big, torch.ldexp(torch.ones_like(amax), -e), torch.ones_like(amax))


def _mix(h, scenario, temperature, similarity):
    """(out [B, N], attn [B, M]) in h's dtype; differentiable as written (no stop-gradient here)."""
    M, B, N = h.shape
    sim_code = _code(SIMILARITY, similarity)
    idx = scenario.long().view(1, B, 1).expand(1, B, N)
    own = torch.gather(h, 0, idx)                      # [1, B, N]
    if sim_code == 0:
        # Scaled cosine (module docstring "Overflow"): rows divided by a detached power of two r = inv_scale;
        # cos(h) = cos_r(h r) for every fixed r, so autograd through the scaled rows is exact.
        r = inv_scale(h)                               # [M, B, 1]
        hs = h * r
        os = torch.gather(hs, 0, idx)                  # own * r_own
        norms = torch.maximum(hs.norm(dim=-1), EPS * r.squeeze(-1))        # max(|h|, eps) r   [M, B]
        own_norm = torch.maximum(os.norm(dim=-1), EPS * torch.gather(r, 0, idx[..., :1]).squeeze(-1))
        sim = (hs * os).sum(-1) / (norms * own_norm)
    else:
        sim = (h * own).sum(-1) / math.sqrt(N)
    a = torch.softmax(sim / temperature, dim=0)        # [M, B]
    out = (a.unsqueeze(-1) * h).sum(0)
    return out, a.t()


def _stop_gradient_others(h, scenario):
    """h with every non-own branch output detached: h[m, b] for m != s_b is a constant."""
    M, B = h.shape[0], h.shape[1]
    own_mask = (torch.arange(M, device=h.device).view(M, 1) == scenario.long().view(1, B)).unsqueeze(-1)
    return torch.where(own_mask, h, h.detach())


def mutual_unit_reference(h, scenario, *, temperature=1.0, similarity="cosine", return_attention=False):
    """Differentiable mutual unit on h [M, B, N] with the stop-gradient semantics; returns out [B, N] in h's dtype
    (and attn [B, M] float32/float64 with ``return_attention``). Computed in float32 (float64 for float64 h)."""
    acc = _acc(h.dtype)
    hm = _stop_gradient_others(h, scenario).to(acc)
    out, attn = _mix(hm, scenario, temperature, similarity)
    out = out.to(h.dtype)
    return (out, attn) if return_attention else out


def mutual_linear_reference(x, weight, bias, scenario, *, activation=None, temperature=1.0, similarity="cosine",
                            aux=None, aux_weight=None, return_attention=False):
    """Differentiable mutual_linear, the unfused composition
    ``mutual_unit_reference(mbranch_linear_reference(..., route="all", grad_mask="own"))``: [B, N] in x's dtype.

    Autograd runs through every branch (dense M x B x N backward) with the non-own outputs detached; this is the
    eager baseline of the benchmarks."""
    h = _mbl.mbranch_linear_reference(x, weight, bias, scenario, route="all", activation=activation,
                                      grad_mask="own", aux=aux, aux_weight=aux_weight)
    out = mutual_unit_reference(h, scenario, temperature=temperature, similarity=similarity,
                                return_attention=return_attention)
    if return_attention:
        return out[0].to(x.dtype), out[1]
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------ kernel contract

def _in_range(scenario, M):
    """(scenario clamped into [0, M), ok [B] bool): the unchecked-input contract (docs/design.md section 5) of the
    kernel entry points below: a row whose scenario is outside [0, M) gives zeros (out, attn, gradient); it is
    computed with an in-range stand-in id and then zeroed, so nothing indexes out of bounds."""
    s = scenario.long()
    return s.clamp(0, max(M - 1, 0)), (s >= 0) & (s < M)


def _zero_rows(t, ok):
    return torch.where(ok.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros((), dtype=t.dtype, device=t.device))


def mutual_forward_kernel(h, scenario, temperature, similarity):
    """Contract of ``saml_C.mutual_forward``: (out [B, N] h.dtype, attn [B, M] float32)."""
    s, ok = _in_range(scenario, h.shape[0])
    if h.shape[0] == 0:
        return h.new_zeros(h.shape[1:]), h.new_zeros((h.shape[1], 0), dtype=torch.float32)
    with torch.no_grad():
        out, attn = _mix(h.to(_acc(h.dtype)), s, temperature, similarity)
    return _zero_rows(out, ok).to(h.dtype), _zero_rows(attn, ok).float().contiguous()


def _mix_backward(grad_out, h, scenario, attn, temperature, similarity):
    """dh_own [B, N] from the closed form (custom-op kernels run below autograd, so no autograd here).

    u_m = <g, h_m>, e_m = a_m (u_m - sum_k a_k u_k) c_m / T with c_m = 1 + [m == s] (own is both arguments of
    sim_s); dh_own = a_s g + sum_m e_m d sim_m / d own (first argument). The attention is recomputed (as the C++
    kernel does) so float64 gradients keep float64 precision; ``attn`` is accepted for the contract."""
    M, B, N = h.shape
    idx = scenario.long()
    ar = torch.arange(B, device=h.device)
    own = h[idx, ar]                                                    # [B, N]
    a = _mix(h, scenario, temperature, similarity)[1].t()               # [M, B], recomputed in h's precision
    u = (h * grad_out.unsqueeze(0)).sum(-1)                             # [M, B]
    ga = (a * u).sum(0)
    c = 1.0 + (torch.arange(M, device=h.device).view(M, 1) == idx.view(1, B)).to(h.dtype)
    e = a * (u - ga) * c / temperature
    dh = a[idx, ar].unsqueeze(-1) * grad_out
    if _code(SIMILARITY, similarity) == 0:
        # scaled rows hs = h r (r a power of two, inv_scale): nm, no are the clamped norms times r. Products of
        # two r factors (1e-60 at |h| = 1e30) underflow in float32, so each coefficient is multiplied by one r at a
        # time: (e min(r_o, r_m) / (no nm)) max(r_o, r_m) is the true e / (|o|_eps |h_m|_eps).
        r = inv_scale(h).squeeze(-1)                                    # [M, B]
        hs = h * r.unsqueeze(-1)
        r_o = r[idx, ar]                                                # [B]
        os = hs[idx, ar]                                                # [B, N]
        nm = torch.maximum(hs.norm(dim=-1), EPS * r)
        own_raw = os.norm(dim=-1)
        no = torch.maximum(own_raw, EPS * r_o)
        sim = (hs * os.unsqueeze(0)).sum(-1) / (no * nm)
        own_m = torch.arange(M, device=h.device).view(M, 1) == idx.view(1, B)
        lo, hi = torch.minimum(r, r_o), torch.maximum(r, r_o)   # e = O(|h| / lo): e lo first, hi last
        coef_h = torch.where(own_m, torch.zeros_like(e), ((e * lo) / (no * nm)) * hi)
        dh = dh + (coef_h.unsqueeze(-1) * h).sum(0)
        # own row: coefficient r_o^2 (e_s - [|o| > eps] sum_m e_m sim_m) / no^2 applied as Z (own q), q = r_o / no,
        # |own q| <= 1: at a zero / tiny own next to huge branches e_s / no^2 alone would overflow (inf * 0 = NaN)
        tail = torch.where(own_raw > EPS * r_o, -(e * sim).sum(0), torch.zeros_like(no))
        z = ((e[idx, ar] + tail) / no) * r_o
        dh = dh + z.unsqueeze(-1) * (own * ((1.0 / no) * r_o).unsqueeze(-1))
    else:
        dh = dh + ((e / math.sqrt(N)).unsqueeze(-1) * h).sum(0)
    return dh


def mutual_backward_kernel(grad_out, h, scenario, attn, temperature, similarity):
    """Contract of ``saml_C.mutual_backward``: dh_own [B, N] (h.dtype), the gradient w.r.t. own = h[s_b, b]."""
    acc = _acc(h.dtype)
    s, ok = _in_range(scenario, h.shape[0])
    if h.shape[0] == 0:
        return h.new_zeros(h.shape[1:])
    return _zero_rows(_mix_backward(grad_out.to(acc), h.to(acc), s, attn, temperature, similarity), ok).to(h.dtype)


def _branch_preactivations(x, weight, bias, aux, aux_weight):
    """z [M, B, N] of every branch in float32 (float64 for float64 x), no autograd."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cast = (lambda t: None if t is None else t.to(acc))
    z, _ = _mbl.all_forward_kernel(cast(x), cast(weight), cast(bias), cast(aux), cast(aux_weight), _mbl.NONE)
    return z


def mutual_linear_forward_kernel(x, weight, bias, aux, aux_weight, scenario, activation, temperature, similarity):
    """Contract of ``saml_C.mutual_linear_forward``: (out [B, N] x.dtype, attn [B, M] float32).

    The reference materialises h (it is the oracle, not the fused kernel); h stays in float32 as in the fused
    kernels (no rounding to x's dtype between the GEMM and the mix)."""
    s, ok = _in_range(scenario, weight.shape[0])
    if weight.shape[0] == 0:
        return x.new_zeros((x.shape[0], weight.shape[2])), x.new_zeros((x.shape[0], 0), dtype=torch.float32)
    with torch.no_grad():
        h = _mbl.activate(_branch_preactivations(x, weight, bias, aux, aux_weight), _code(_mbl.ACTIVATIONS, activation))
        out, attn = _mix(h, s, temperature, similarity)
    return _zero_rows(out, ok).to(x.dtype), _zero_rows(attn, ok).float().contiguous()


def mutual_linear_backward_kernel(grad_out, x, weight, bias, aux, aux_weight, scenario, attn, activation,
                                  temperature, similarity):
    """Contract of ``saml_C.mutual_linear_backward``: dz_own [B, N] (x.dtype), the gradient w.r.t. the own
    branch's pre-activation z[s_b, b], with every h[m, b] recomputed (nothing saved by the forward)."""
    act = _code(_mbl.ACTIVATIONS, activation)
    s, ok = _in_range(scenario, weight.shape[0])
    if weight.shape[0] == 0:
        return x.new_zeros((x.shape[0], weight.shape[2]))
    z = _branch_preactivations(x, weight, bias, aux, aux_weight)
    h = _mbl.activate(z, act)
    dh_own = _mix_backward(grad_out.to(z.dtype), h, s, attn, temperature, similarity)
    z_own = z[s, torch.arange(x.shape[0], device=x.device)]
    return _zero_rows(_mbl.activation_backward(dh_own, z_own, act), ok).to(x.dtype)


KERNELS = {"mutual_unit": {"forward": mutual_forward_kernel, "backward": mutual_backward_kernel},
           "mutual_linear": {"forward": mutual_linear_forward_kernel, "backward": mutual_linear_backward_kernel}}
