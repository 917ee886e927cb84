"""Stochastic rounding of 16-bit tables in the fused embedding update: the Python reference of the kernels' hash and
rounding (csrc/include/saml_common.h, ``sr_*``), used by the eager fused update (``embedding_optimizer._apply_rows``,
the ``reference`` and ``triton`` backends) and by the tests. docs/design.md, "Stochastic rounding", has the contract.

A float32 value x is stored into a bfloat16 / float16 table as one of its two neighbours lo <= x < hi (toward and
away from zero), the one away from zero with probability (|x| - |lo|) / (|hi| - |lo|), so E[stored] = x: updates
smaller than half an ulp survive on average instead of vanishing under round-to-nearest. The randomness is a
counter-based hash, not a generator: with uint32 words and arithmetic mod 2^32,

    mix(x)  = murmur3 fmix32: x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16
    key     = mix(mix(mix(seed ^ 0x9E3779B9 * (table + 1)) ^ step) ^ row_lo32 ^ 0x9E3779B9 * row_hi32)
    r[d]    = (mix(key + 0x9E3779B9 * (d >> 1)) >> (16 * (d & 1))) & 0xFFFF     (column d of the row: one mix per
              pair of columns, its low 16 bits for the even column, its high 16 bits for the odd one)

with table 0 for the global table (row in [0, R)) and 1 for the scenario tables (row = m * Rs + r), step the low 32
bits of the module's fused-update count and seed < 2^32. Then

    bfloat16:  bits = (float32 bits of x + r) >> 16       (NaN: 0x7FC0, c10's round-to-nearest quiet NaN)
    float16:   lo = round-to-nearest(x), stepped one ulp toward zero when that moved away from zero (finite only);
               hi = the next float16 away from zero;  stored = hi if |x| - |lo| > (r * 2^-16) * (|hi| - |lo|)
               else lo (every float32 operation there is exact)

The bfloat16 rule is exactly unbiased; the float16 one exactly where x has at most 16 bits below the float16 grid
(every x in the float16 normal range: 13), else up to 2^-16 of an ulp (float16 subnormals). Same (x, seed, step,
table, row, column) -> the same bits on every backend.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

GOLDEN = 0x9E3779B9
_M32 = 0xFFFFFFFF
#: table dtypes the fused update rounds stochastically (when enabled)
DTYPES = (torch.bfloat16, torch.float16)
GLOBAL_TABLE, SCENARIO_TABLE = 0, 1


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 tensors holding uint32 values, without int64 overflow (16-bit halves of c)."""
    lo = (x * (c & 0xFFFF)) & _M32
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def mix32(x: Tensor) -> Tensor:
    """murmur3's fmix32 on an int64 tensor of uint32 values (returns the same)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _word(v: Union[int, Tensor], device) -> Tensor:
    """A 0-dim int64 tensor of the low 32 bits of an integer (int, or a tensor holding an integer value)."""
    t = v.to(torch.int64) if isinstance(v, Tensor) else torch.tensor(int(v) & _M32, dtype=torch.int64)
    return t.to(device) & _M32


def row_keys(seed: Union[int, Tensor], step: Union[int, Tensor], table: int, rows: Tensor) -> Tensor:
    """int64 [U] keys (uint32 values) of ``rows`` [U] (int64) of ``table`` (0 global, 1 scenario) at (seed, step).
    ``seed`` and ``step`` may be 0-dim tensors (the fused update's hparams on the device: no host sync)."""
    rows = rows.to(torch.int64)
    k = mix32(torch.zeros_like(rows) + (_word(seed, rows.device) ^ ((GOLDEN * (table + 1)) & _M32)))
    k = mix32(k ^ _word(step, rows.device))
    return mix32(k ^ (rows & _M32) ^ _mul32((rows >> 32) & _M32, GOLDEN))


def column_bits(keys: Tensor, D: int) -> Tensor:
    """int64 [U, D] of 16-bit values: r[u, d] = (mix(keys[u] + GOLDEN * (d >> 1)) >> (16 * (d & 1))) & 0xFFFF."""
    cols = torch.arange(D, dtype=torch.int64, device=keys.device)
    h = mix32((keys.unsqueeze(-1) + _mul32(cols >> 1, GOLDEN)) & _M32)
    return (h >> (16 * (cols & 1))) & 0xFFFF


def round_bf16(x: Tensor, r: Tensor) -> Tensor:
    """bfloat16 of float32 ``x`` rounded stochastically with the 16-bit random values ``r`` (int64, x's shape)."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    bits = ((u + r) >> 16) & 0xFFFF
    bits = torch.where(torch.isnan(x), 0x7FC0, bits)  # c10's round-to-nearest NaN (torch's vectorised .to differs)
    return _from_bits(bits, torch.bfloat16)


def _from_bits(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """The 16-bit ``dtype`` values of integer tensors holding uint16 bit patterns (via the int16 pattern)."""
    return (bits - ((bits >> 15) << 16)).to(torch.int16).view(dtype)


def _f16_from_bits(bits: Tensor) -> Tensor:
    return _from_bits(bits, torch.float16)


def round_fp16(x: Tensor, r: Tensor) -> Tensor:
    """float16 of float32 ``x`` rounded stochastically with the 16-bit random values ``r`` (int64, x's shape)."""
    x = x.contiguous()
    lo = x.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    back = (_f16_from_bits(lo).float().abs() > x.abs()) & ((lo & 0x7FFF) < 0x7C00)
    lo = lo - back.to(torch.int32)
    hi = (lo + 1) & 0xFFFF
    alo = _f16_from_bits(lo).float().abs()
    ahi = _f16_from_bits(hi).float().abs()
    u = r.to(torch.float32) * 2.0 ** -16
    up = (x.abs() - alo) > u * (ahi - alo)
    return _f16_from_bits(torch.where(up, hi, lo))


def round_rows(x: Tensor, dtype: torch.dtype, seed: Union[int, Tensor], step: Union[int, Tensor], table: int,
               rows: Tensor) -> Tensor:
    """Rows ``x`` [U, D] (float32) of ``table`` at ``rows`` [U] stored as ``dtype`` (bfloat16 / float16) with
    stochastic rounding at (seed, step)."""
    r = column_bits(row_keys(seed, step, table, rows.to(x.device)), x.shape[-1])
    return round_bf16(x, r) if dtype == torch.bfloat16 else round_fp16(x, r)
