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
  ``"fp32"``), with ``"constexpr"`` for the constexpr arguments; built by :func:`kernel_signature` from the
  kernel's own parameter list, so it cannot drift from the kernel;
- ``constexprs``: ``{arg_name: value}`` for every constexpr argument (a ``tl.dtype`` is a valid value);
- ``num_warps``, ``num_stages``: the launch options of that configuration;
- ``divisible_by_16`` (optional): argument names to compile as multiples of 16 (pointers 16-byte aligned,
  integers % 16 == 0), the specialisation the JIT makes for aligned tensors and sizes such as D = 32; it is
  what enables 16-byte vector accesses, so list it for the variant that runs in practice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

__all__ = ["AotSpec", "compile_spec", "kernel_signature", "torch_to_triton_ptr", "torch_allows_tf32",
           "dot_input_precision", "launch_device", "on_tensor_device", "launch_config", "launch"]


# ------------------------------------------------------------------------------------------------ launching

def launch_device(t):
    """Context in which a Triton launch for tensor ``t`` must run: ``t``'s CUDA device made current.

    A Triton launch runs on the *current* device and its current stream, whatever device the pointers belong to,
    so tensors on cuda:1 launched while cuda:0 is current fault (or run on the wrong stream). A no-op for CPU
    tensors (the interpreter) and when ``t``'s device is already current."""
    import torch

    if t is not None and t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_tensor_device(fn):
    """Decorator of every public Triton launcher: runs ``fn`` inside :func:`launch_device` of its first tensor
    argument (every tensor of one launcher call shares a device: the ops check it)."""
    import torch

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        with launch_device(first):
            return fn(*args, **kwargs)

    return launcher


def launch_config(interp, fixed):
    """The ``triton.Config`` a launch uses instead of autotuning, or None to autotune (time every config once per
    autotune key and keep the fastest).

    - under ``TRITON_INTERPRET=1``: ``interp`` (tiny blocks; the CPU interpreter is slow per element);
    - under ``torch.use_deterministic_algorithms(True)``: ``fixed`` (a config chosen from the shapes alone by the
      caller). Autotuning picks by timing, and block sizes change the order of the float reductions (BLOCK_K
      splits K), so two processes could pick different configs and differ in the last bits; with a fixed config
      the result is a function of the inputs (the kernels use no atomics);
    - otherwise None."""
    import torch

    from .. import _backend

    if _backend.triton_interpret():
        return interp
    if torch.are_deterministic_algorithms_enabled():
        return fixed
    return None


def launch(tuned, plain, grid, args, kw, *, interp, fixed) -> None:
    """Launches ``plain`` (the ``@triton.jit`` kernel) with the config of :func:`launch_config`, or its autotuner
    ``tuned`` when that is None. ``grid``: a tuple or a function of the config's meta-parameters."""
    cfg = launch_config(interp, fixed)
    if cfg is None:
        tuned[grid](*args, **kw)
        return
    meta = dict(cfg.kwargs)
    plain[grid(meta) if callable(grid) else grid](*args, **kw, **meta, num_warps=cfg.num_warps,
                                                  num_stages=cfg.num_stages)


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


def kernel_signature(fn, pointer: str, **types: str) -> dict:
    """``{argument: Triton type}`` for every argument of the ``@triton.jit`` function ``fn``, in its order, read
    from the kernel's own parameter list (``fn.params``): a constexpr parameter -> ``"constexpr"``; a name given in
    ``types`` -> that type; a name ending in ``_ptr`` -> ``pointer`` (the data pointer type, e.g. ``"*fp32"``); any
    other (sizes, strides) -> ``"i32"``. A name in ``types`` that is not an argument raises (a stale override)."""
    params = getattr(fn, "params", None)
    if params is None:  # TRITON_INTERPRET=1: an InterpretedFunction wraps the plain Python function
        import inspect
        import types as _types

        params = [_types.SimpleNamespace(name=n, is_constexpr="constexpr" in str(p.annotation))
                  for n, p in inspect.signature(fn.fn).parameters.items()]
    unknown = set(types) - {p.name for p in params}
    if unknown:
        raise ValueError(f"kernel_signature({fn.__name__}): no arguments {sorted(unknown)}")
    sig = {}
    for p in params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in types:
            sig[p.name] = types[p.name]
        else:
            sig[p.name] = pointer if p.name.endswith("_ptr") else "i32"
    return sig


def torch_to_triton_ptr(dtype) -> str:
    """Triton pointer type string (``"*fp32"`` ...) of a torch dtype."""
    import torch

    return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                  torch.int32: "i32", torch.int64: "i64"}[dtype]


def torch_allows_tf32() -> bool:
    """Whether PyTorch's own float32 matmul setting lets matmuls run in TF32 on this process.

    torch >= 2.9 has the ``fp32_precision`` API (``torch.backends.cuda.matmul.fp32_precision`` = "ieee" | "tf32" |
    "none"; "none" inherits ``torch.backends.fp32_precision``); it also reflects the legacy setters
    (``allow_tf32 = True``, ``torch.set_float32_matmul_precision("high" | "medium")``). Reading the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` raises a RuntimeError there once the new API was used, so the new API
    is read first, the legacy flag only on older torch, and ``get_float32_matmul_precision`` as a last resort.
    Any failure to read the setting means "not allowed" (exact is the safe side)."""
    import torch

    mm = torch.backends.cuda.matmul
    try:
        prec = getattr(mm, "fp32_precision", None)
        if prec is not None:
            if prec == "none":
                prec = getattr(torch.backends, "fp32_precision", "none")
            return prec == "tf32"
        return bool(mm.allow_tf32)
    except (RuntimeError, AttributeError):
        pass
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return False


def dot_input_precision(dtype) -> str:
    """The ``input_precision`` constexpr of every ``tl.dot`` that a launcher starts for operands of ``dtype``.

    ``tl.dot`` on float32 operands defaults to TF32 on sm_80+ (10-bit mantissa: ~1e-3 relative error), which
    PyTorch's matmul does only when the user allows it. So float32 gets "ieee" (exact fp32 FMA products) unless
    :func:`torch_allows_tf32`, then "tf32" (tensor cores), following ``torch.backends.cuda.matmul.allow_tf32`` /
    ``torch.set_float32_matmul_precision``. float16/bfloat16 products are exact in the fp32 accumulator and
    float64 runs on fp64 FMA / DMMA, so they always get "ieee" (the only value Triton accepts for float64).
    Read at each launch: changing torch's setting takes effect on the next call (one compile per value)."""
    import torch

    if dtype == torch.float32 and torch_allows_tf32():
        return "tf32"
    return "ieee"


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
