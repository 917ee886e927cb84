"""Triton kernels of the mutual unit and of the fused mutual_linear forward.

Contracts (csrc/registry.cpp), for h [M,B,N], scenario s [B], own = h[s_b, b]:

    sim[m,b] = <own, h[m,b]> / (max(|own|,1e-8) max(|h[m,b]|,1e-8))   (cosine)
             = <own, h[m,b]> / sqrt(N)                                  (dot)
    a[b] = softmax_m(sim[:, b] / T);  out[b] = sum_m a[b,m] h[m,b]

    mutual_forward(h, s, T, sim)                   -> (out [B,N] h.dtype, attn [B,M] float32)
    mutual_backward(g, h, s, attn, T, sim)         -> dh_own [B,N]: the gradient w.r.t. own (other branches are
                                                      stop-gradient; own is also the s_b-th term of h). The
                                                      softmax weights are recomputed from h (M values per row,
                                                      free next to the pass over h), so float64 stays exact.
    mutual_linear_forward(x, W, bias, aux, Wa, s, act, T, sim) -> (out, attn) with h[m,b] = act(x W_m + aux Wa_m
                                                      + bias_m) computed in registers, never written to memory.

Backward math (o = own, g = grad_out, u_m = <g, h_m>, c_m = a_m (u_m - sum_j a_j u_j) / T, n_o = max(|o|, eps),
n_m = max(|h_m|, eps), I = [|o| > eps]):
    dot:    do = a_s g + sum_m c_m h_m / sqrt(N) + c_s o / sqrt(N)
    cosine: do = a_s g + sum_m c_m h_m / (n_o n_m) - (sum_m c_m sim_m) I o / (n_o |o|)
                 + c_s (o / n_o^2 - sim_s I o / (n_o |o|))
(the c_s terms come from own being both arguments of sim_s; for cosine they vanish when |o| > eps).

Overflow: |h|^2 overflows float32 for |h| > ~1.8e19. The cosine therefore runs on rows scaled by an exact power of
two r_m (``_inv_scale``, from the exponent bits of max|h_m|; 1 for max|h_m| < 2): dots <o r_o, h_m r_m>, norms
|h_m r_m|^2, eps r_m in the clamp, the same value with the same eps semantics. Gradient coefficients take one r
factor at a time after the O(|h|) factor c (r_o r_m underflows at |h| = 1e30). Rows longer than one tile get an
extra pass for max|h_m| (cosine only).

Precision: the mutual kernels compute in float32 (float64 for float64 h); 1/T reaches them as a float32 pair
(hi, lo) summed in that dtype (``_inv_temperature``: Triton passes a Python float as float32, whose 6e-8 relative
error float64 would otherwise carry). The fused GEMMs use ``dot_input_precision`` like mbranch_linear (exact fp32 unless torch
allows TF32); the fused path is float32/half only, float64 runs all_forward (fp64 dots) + the mutual kernels.

Layout: one program per BLOCK_B rows holds a [MP, BLOCK_B, BLOCK_N] register tile (all M branches, MP = M
rounded up to a power of two); rows longer than BLOCK_N are handled by two passes over N tiles (dot products
and norms first, then the mix), so any N works. Reductions run in a fixed order: deterministic.

The fused mutual_linear forward keeps all M branch tiles of a row block in registers, so it needs the whole
row: N <= 256 and MP * BLOCK_N <= 1024 (e.g. M <= 4 at N = 256, M <= 8 at N = 128). Larger shapes fall back
to the unfused pair all_forward + mutual_forward (h [M,B,N] is materialised then; documented, not silent in
the code: see ``fused_supported``).

This module holds the host side (launchers, block sizes, autotuning, AOT specs); the jit functions and kernels
are in ``_mutual_kernels.py``.
"""
from __future__ import annotations

import math

import torch
import triton

from .. import _backend
from .._codes import SIMILARITIES
from ..ops._activation import activation_backward, needs_preactivation
from . import AotSpec, dot_input_precision, kernel_signature, launch, on_tensor_device
from ._mutual_kernels import (_mutual_bwd_kernel, _mutual_fwd_kernel, _mutual_linear_bwd_kernel,
                              _mutual_linear_fwd_kernel)
from .mbranch_linear import ACT_GELU, _pow2, all_forward

__all__ = ["mutual_forward", "mutual_backward", "mutual_linear_forward", "mutual_linear_backward", "fused_supported",
           "aot_specs"]

EPS = 1e-8
COSINE = SIMILARITIES["cosine"]
FUSED_MAX_N = 256
FUSED_MAX_MN = 1024
_ELEMS = 2048          # register-tile budget MP * BLOCK_B * BLOCK_N of the mutual kernels (4 warps: 16 values
                       # per thread per 3-D temporary; 8192 spilled kilobytes in the backward, seen with ptxas -v)


# ------------------------------------------------------------------------------------------------ launchers

def _inv_temperature(temperature: float):
    """1/T as two float32 kernel arguments (hi, lo) with hi + lo = 1/T to ~48 bits.

    Triton passes a Python float to a kernel as float32: 1/0.7 would carry a 6e-8 relative error into every float64
    softmax (a device-only error: the interpreter keeps the Python float). The kernels add hi and lo in their
    accumulator dtype, so float64 gets 1/T to ~2^-48 and float32 gets hi (lo is below half an ulp of hi)."""
    inv = 1.0 / float(temperature)
    hi = torch.tensor(inv, dtype=torch.float32).item()         # round to nearest float32 (inf past its range)
    lo = torch.tensor(inv - hi, dtype=torch.float32).item() if math.isfinite(hi) else 0.0
    return hi, lo


def _mix_blocks(M: int, N: int):
    """(MP, BLOCK_B, BLOCK_N, num_warps) for the mutual kernels: the [MP, BB, BN] tile within _ELEMS."""
    MP = _pow2(max(M, 1))
    if _backend.triton_interpret():
        return MP, 4, 16, 1
    BN = min(_pow2(max(N, 16)), 256)
    while MP * BN > _ELEMS and BN > 32:
        BN //= 2
    BB = max(1, min(32, _ELEMS // (MP * BN)))
    return MP, BB, BN, 4


@on_tensor_device
def mutual_forward(h, scenario, temperature: float, similarity: int):
    """(out [B,N] h.dtype, attn [B,M] float32) of the mutual unit on h [M,B,N]; see the module docstring."""
    M, B, N = h.shape
    out = torch.empty((B, N), device=h.device, dtype=h.dtype)
    attn = torch.empty((B, M), device=h.device, dtype=torch.float32)
    if B == 0 or M == 0:
        return out, attn
    MP, BB, BN, nw = _mix_blocks(M, N)
    _mutual_fwd_kernel[(triton.cdiv(B, BB),)](
        h, scenario, out, attn, M, B, N, *_inv_temperature(temperature), h.stride(0), h.stride(1), h.stride(2),
        out.stride(0), out.stride(1), attn.stride(0), attn.stride(1),
        SIM=similarity, MP=MP, BLOCK_B=BB, BLOCK_N=BN, SINGLE=N <= BN, num_warps=nw)
    return out, attn


@on_tensor_device
def mutual_backward(grad_out, h, scenario, attn, temperature: float, similarity: int):
    """dh_own [B,N] (h.dtype): gradient w.r.t. own = h[s_b, b], the other branches held constant."""
    M, B, N = h.shape
    dh = torch.empty((B, N), device=h.device, dtype=h.dtype)
    if B == 0 or M == 0:
        return dh
    MP, BB, BN, nw = _mix_blocks(M, N)
    _mutual_bwd_kernel[(triton.cdiv(B, BB),)](
        grad_out, h, scenario, attn, dh, M, B, N, *_inv_temperature(temperature),
        grad_out.stride(0), grad_out.stride(1), h.stride(0), h.stride(1), h.stride(2),
        attn.stride(0), attn.stride(1), dh.stride(0), dh.stride(1),
        SIM=similarity, MP=MP, BLOCK_B=BB, BLOCK_N=BN, num_warps=nw)
    return dh


def fused_supported(M: int, N: int, dtype) -> bool:
    """Whether mutual_linear_forward runs the fused kernel (else all_forward + mutual_forward)."""
    BN = _pow2(max(N, 16))
    return N <= FUSED_MAX_N and _pow2(max(M, 1)) * BN <= FUSED_MAX_MN and dtype != torch.float64


# (BLOCK_K, num_warps, num_stages); BLOCK_B follows from the register budget (see _fused_blocks).
_FUSED_CONFIGS = [(32, 8, 2), (16, 8, 3), (32, 16, 2)]   # BLOCK_K 64 spilled for float32 (ptxas -v); 16 warps
# halve the per-thread share of the [MP, 16, BLOCK_N] register tile (255 registers and small spills at 8 warps)


def _fused_blocks(M: int, N: int):
    MP = _pow2(max(M, 1))
    BN = _pow2(max(N, 16))
    if _backend.triton_interpret():
        return MP, 16, BN
    BB = 16 if MP * BN > 256 else (32 if MP * BN > 128 else 64)
    return MP, BB, BN


def _cfg(c):
    return triton.Config({"BLOCK_K": c[0]}, num_warps=c[1], num_stages=c[2])


_fused_tuned = triton.autotune([_cfg(c) for c in _FUSED_CONFIGS], key=["M", "N", "K", "K2"])(
    _mutual_linear_fwd_kernel)
_fused_bwd_tuned = triton.autotune([_cfg(c) for c in _FUSED_CONFIGS], key=["M", "N", "K", "K2"])(
    _mutual_linear_bwd_kernel)


def _linear_args(x, weight, bias, aux, aux_weight, dummy):
    """Pointer/stride arguments shared by the fused kernels (x ... w2 pointers, then strides)."""
    ptrs = (x, weight, bias if bias is not None else dummy, aux if aux is not None else dummy,
            aux_weight if aux is not None else dummy)
    strides = (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
               bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
               aux.stride(0) if aux is not None else 0, aux.stride(1) if aux is not None else 0,
               *((aux_weight.stride(0), aux_weight.stride(1), aux_weight.stride(2)) if aux is not None
                 else (0, 0, 0)))
    return ptrs, strides


# Under deterministic algorithms (no timing, see saml_kernels.triton.launch_config): the first config, the one
# without spills for every (M, N) the fused path takes (a choice, not a measured optimum).
FIXED_FUSED_CONFIG = _FUSED_CONFIGS[0]
_INTERP_FUSED = (16, 1, 1)


def _launch_fused(plain, tuned, grid, args, kw):
    launch(tuned, plain, grid, args, kw, interp=_cfg(_INTERP_FUSED), fixed=_cfg(FIXED_FUSED_CONFIG))


@on_tensor_device
def mutual_linear_forward(x, weight, bias, aux, aux_weight, scenario, activation: int, temperature: float,
                          similarity: int):
    """(out [B,N] x.dtype, attn [B,M] float32) = mutual_unit(act(x W_m + aux Wa_m + bias_m) for all m).

    Fused (h never in memory) when ``fused_supported(M, N)``; else the unfused pair (h materialised)."""
    M, K, N = weight.shape
    B = x.shape[0]
    if not fused_supported(M, N, x.dtype):
        h, _ = all_forward(x, weight, bias, aux, aux_weight, activation)
        return mutual_forward(h, scenario, temperature, similarity)
    out = torch.empty((B, N), device=x.device, dtype=x.dtype)
    attn = torch.empty((B, M), device=x.device, dtype=torch.float32)
    if B == 0 or M == 0:
        return out, attn
    MP, BB, BN = _fused_blocks(M, N)
    K2 = aux.shape[1] if aux is not None else 0
    ptrs, strides = _linear_args(x, weight, bias, aux, aux_weight, out)
    args = (*ptrs, scenario, out, attn, M, B, N, K, K2, *_inv_temperature(temperature), *strides,
            out.stride(0), out.stride(1), attn.stride(0), attn.stride(1))
    kw = dict(HAS_BIAS=bias is not None, HAS_AUX=aux is not None, ACT=activation, SIM=similarity,
              PREC=dot_input_precision(x.dtype), MP=MP, BLOCK_B=BB, BLOCK_N=BN)
    _launch_fused(_mutual_linear_fwd_kernel, _fused_tuned, (triton.cdiv(B, BB),), args, kw)
    return out, attn


@on_tensor_device
def mutual_linear_backward(grad_out, x, weight, bias, aux, aux_weight, scenario, attn, activation: int,
                           temperature: float, similarity: int):
    """dz_own [B,N] (x.dtype) = dL/dz[s_b, b] of mutual_linear, recomputing h (never stored) from x.

    Fused: one kernel recomputes the row block's M branch tiles in registers (one extra GEMM of the forward's
    size), runs the mutual backward with the forward's attn and multiplies by act'(z_own). Outside the fused
    limits (``fused_supported``): all_forward (h, z in memory) + mutual_backward + act' in PyTorch."""
    M, K, N = weight.shape
    B = x.shape[0]
    if not fused_supported(M, N, x.dtype):
        h, z = all_forward(x, weight, bias, aux, aux_weight, activation)
        dh = mutual_backward(grad_out, h, scenario, attn, temperature, similarity)
        ar = torch.arange(B, device=x.device)
        # clamped: an out-of-range row's dh is zero (the unchecked-input contract), its saved row any in range
        saved = (z if needs_preactivation(activation) else h)[scenario.long().clamp(0, max(M - 1, 0)), ar]
        return activation_backward(dh, saved, activation).contiguous()
    dz = torch.empty((B, N), device=x.device, dtype=x.dtype)
    if B == 0 or M == 0:
        return dz.zero_()
    MP, BB, BN = _fused_blocks(M, N)
    K2 = aux.shape[1] if aux is not None else 0
    ptrs, strides = _linear_args(x, weight, bias, aux, aux_weight, dz)
    args = (grad_out, *ptrs, scenario, attn, dz, M, B, N, K, K2, *_inv_temperature(temperature),
            grad_out.stride(0), grad_out.stride(1), *strides, attn.stride(0), attn.stride(1),
            dz.stride(0), dz.stride(1))
    kw = dict(HAS_BIAS=bias is not None, HAS_AUX=aux is not None, ACT=activation, SIM=similarity,
              PREC=dot_input_precision(x.dtype), MP=MP, BLOCK_B=BB, BLOCK_N=BN)
    _launch_fused(_mutual_linear_bwd_kernel, _fused_bwd_tuned, (triton.cdiv(B, BB),), args, kw)
    return dz


# ------------------------------------------------------------------------------------------------ AOT specs

def aot_specs() -> list:
    """Each mutual kernel x block configuration x dtype (and each fused GEMM config) for AOT compilation.

    The block shapes of the mutual kernels follow from (M, N) (_mix_blocks): (4, 64) is the single-tile path,
    (8, 512) the two-pass path. Both similarity codes are compiled for float32, cosine for half types (the
    similarity changes a few scalar ops only). Kept small: these 3-D tile kernels take ~5-15 s each to compile."""
    specs = []
    dts = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    for dt, name in dts.items():
        p = "*" + name
        for sim in (tuple(SIMILARITIES.values()) if dt in (torch.float32, torch.float64) else (COSINE,)):
            for M, N in ((4, 64), (8, 512)):
                MP, BB, BN, nw = _mix_blocks(M, N)
                const = dict(SIM=sim, MP=MP, BLOCK_B=BB, BLOCK_N=BN, SINGLE=N <= BN)
                sig = kernel_signature(_mutual_fwd_kernel, p, s_ptr="*i64", attn_ptr="*fp32", inv_t_hi="fp32",
                                       inv_t_lo="fp32")
                specs.append(AotSpec(f"mutual_fwd[{name},sim{sim},M{M},N{N}]", _mutual_fwd_kernel, sig, const, nw))
                const = dict(SIM=sim, MP=MP, BLOCK_B=BB, BLOCK_N=BN)
                sig = kernel_signature(_mutual_bwd_kernel, p, s_ptr="*i64", attn_ptr="*fp32", inv_t_hi="fp32",
                                       inv_t_lo="fp32")
                specs.append(AotSpec(f"mutual_bwd[{name},sim{sim},M{M},N{N}]", _mutual_bwd_kernel, sig, const, nw))
        if dt == torch.float64:     # the fused kernels never run in float64 (fused_supported)
            continue
        # (shape, config, dot precision): float32 also with "tf32" (used when torch allows TF32 matmuls)
        shapes = [((4, 256), c, "ieee") for c in _FUSED_CONFIGS]
        if dt == torch.float32:
            shapes += [((4, 64), _FUSED_CONFIGS[0], "ieee")] + [((4, 256), c, "tf32") for c in _FUSED_CONFIGS]
        for (M, N), c, prec in shapes:
            MP, BB, BN = _fused_blocks(M, N)
            const = dict(HAS_BIAS=True, HAS_AUX=True, ACT=ACT_GELU, SIM=COSINE, PREC=prec, MP=MP, BLOCK_B=BB,
                         BLOCK_N=BN, BLOCK_K=c[0])
            scalars = dict(s_ptr="*i64", attn_ptr="*fp32", inv_t_hi="fp32", inv_t_lo="fp32")
            sig = kernel_signature(_mutual_linear_fwd_kernel, p, **scalars)
            specs.append(AotSpec(f"mutual_linear_fwd[{name},{prec},M{M},N{N},k{c[0]},w{c[1]}]",
                                 _mutual_linear_fwd_kernel, sig, const, c[1], c[2]))
            sig = kernel_signature(_mutual_linear_bwd_kernel, p, **scalars)
            specs.append(AotSpec(f"mutual_linear_bwd[{name},{prec},M{M},N{N},k{c[0]},w{c[1]}]",
                                 _mutual_linear_bwd_kernel, sig, const, c[1], c[2]))
    return specs


KERNELS = {"mutual_unit": {"forward": mutual_forward, "backward": mutual_backward},
           "mutual_linear": {"forward": mutual_linear_forward, "backward": mutual_linear_backward}}
