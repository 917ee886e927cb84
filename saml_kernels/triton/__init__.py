"""Triton kernels and launchers; one module per op. Imported lazily (only by the triton backend).

Ahead-of-time compilation contract (used by tests/test_gpu_compile.py, which needs no GPU):
every module here that launches Triton kernels defines ``aot_specs() -> list[AotSpec]`` listing each kernel
in each configuration it can launch (every block-size config, and the constexpr variants that change the
generated code: pooling modes, optional operands, dtypes). The test discovers the modules with ``pkgutil``
and compiles every spec for sm_80 and sm_90 with :func:`compile_spec`.

``AotSpec`` fields:
- ``name``: unique readable id, e.g. ``"seb_fwd[sum,fp16,i32,B32xD32,w4]"``;
- ``fn``: the ``@triton.jit`` function (not an autotuner wrapper);
- ``signature``: ``{arg_name: type}`` for EVERY argument of ``fn`` in order, Triton type strings
  (``"*fp32"``, ``"*fp16"``, ``"*bf16"``, ``"*fp64"``, ``"*i32"``, ``"*i64"``, ``"i32"``, ``"i64"``,
  ``"fp32"``), with ``"constexpr"`` for the constexpr arguments;
- ``constexprs``: ``{arg_name: value}`` for every constexpr argument (a ``tl.dtype`` is a valid value);
- ``num_warps``, ``num_stages``: the launch options of that configuration;
- ``divisible_by_16`` (optional): argument names to compile as multiples of 16 (pointers 16-byte aligned,
  integers % 16 == 0), the specialisation the JIT makes for aligned tensors and sizes such as D = 32; it is
  what enables 16-byte vector accesses, so list it for the variant that runs in practice.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["AotSpec", "compile_spec", "torch_to_triton_ptr"]


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """Everything ``triton.compile`` needs to build one kernel configuration ahead of time."""

    name: str
    fn: Callable
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    divisible_by_16: tuple = ()


def torch_to_triton_ptr(dtype) -> str:
    """Triton pointer type string (``"*fp32"`` ...) of a torch dtype."""
    import torch

    return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                  torch.int32: "i32", torch.int64: "i64"}[dtype]


def compile_spec(spec: AotSpec, capability: int) -> Any:
    """Compiles ``spec`` for CUDA compute capability ``capability`` (80, 90 ...); no GPU needed.

    Returns the compiled kernel; ``.asm`` holds "ptx" and "cubin". Handles the API drift between
    triton 3.3 and 3.8: both take ``ASTSource(fn, signature, constexprs)`` with constexprs keyed by name and
    ``"constexpr"`` entries in the signature; very old releases wanted constexprs keyed by argument index,
    which is tried as a fallback.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.fn
    names = list(fn.arg_names)
    missing = [n for n in names if n not in spec.signature]
    if missing:
        raise ValueError(f"AotSpec {spec.name}: signature lacks arguments {missing}")
    sig = {n: spec.signature[n] for n in names}
    target = GPUTarget("cuda", capability, 32)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    # Same format as triton/tools/compile.py: {(arg index,): [["tt.divisibility", 16]]}.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible_by_16}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
    except (TypeError, AssertionError):  # releases whose constexprs are keyed by argument-index tuples
        src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                        constexprs={(names.index(k),): v for k, v in spec.constexprs.items()})
    return triton.compile(src, target=target, options=options)
