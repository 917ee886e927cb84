"""GPU code is built here, without a GPU:

1. Every Triton kernel in every configuration that a module of ``saml_kernels.triton`` declares in
   ``aot_specs()`` (format: ``saml_kernels.triton.AotSpec``) is compiled ahead of time for sm_80 and sm_90 with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``; PTX and a cubin must come out.
2. The CUDA extension: when nvcc and a CUDA build of torch are present, the extension must have been built with
   its CUDA kernels, and each CUDA op must be registered for the CUDA dispatch key, so CI proves that the .cu
   files compile and link.

Compiled kernels land in Triton's cache (~/.triton/cache), so reruns are fast.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import shutil

import pytest
import torch

triton = pytest.importorskip("triton")

import saml_kernels.triton as tpkg  # noqa: E402
from saml_kernels.triton import AotSpec, compile_spec  # noqa: E402

CAPS = (80, 90)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="AOT compilation needs the real compiler (TRITON_INTERPRET unset)")


def _modules():
    """(name, module) of every saml_kernels.triton submodule that defines aot_specs()."""
    found = []
    for info in pkgutil.iter_modules(tpkg.__path__):
        mod = importlib.import_module(f"{tpkg.__name__}.{info.name}")
        if callable(getattr(mod, "aot_specs", None)):
            found.append((info.name, mod))
    return found


MODULES = _modules()


def _specs():
    params = []
    for name, mod in MODULES:
        for spec in mod.aot_specs():
            for cap in CAPS:
                params.append(pytest.param(spec, cap, id=f"{name}:{spec.name}:sm{cap}"))
    return params


def test_discovers_modules():
    names = [n for n, _ in MODULES]
    assert "scenario_embedding_bag" in names, names


@pytest.mark.parametrize("name,mod", [pytest.param(n, m, id=n) for n, m in MODULES])
def test_specs_well_formed(name, mod):
    """Names unique; the signature covers every argument; constexpr arguments typed "constexpr" and given."""
    specs = mod.aot_specs()
    assert specs, f"{name}.aot_specs() is empty"
    seen = set()
    for s in specs:
        assert isinstance(s, AotSpec), f"{name}: {s!r} is not an AotSpec"
        assert s.name not in seen, f"{name}: duplicate spec name {s.name}"
        seen.add(s.name)
        args = list(s.fn.arg_names)
        assert set(s.signature) == set(args), f"{s.name}: signature {sorted(s.signature)} != arguments {args}"
        ce = {a for a in args if s.signature[a] == "constexpr"}
        assert ce == set(s.constexprs), f"{s.name}: constexpr args {sorted(ce)} != constexprs {sorted(s.constexprs)}"
        assert s.num_warps in (1, 2, 4, 8, 16, 32) and s.num_stages >= 1


@pytest.mark.parametrize("spec,cap", _specs())
def test_triton_aot(spec, cap):
    kernel = compile_spec(spec, cap)
    asm = kernel.asm
    assert "ptx" in asm and f".target sm_{cap}" in asm["ptx"], f"{spec.name}: no PTX for sm_{cap}"
    assert asm.get("cubin"), f"{spec.name}: no cubin for sm_{cap}"
    assert kernel.metadata.num_warps == spec.num_warps


# ------------------------------------------------------------------------------------------------ CUDA extension

def _cuda_toolchain() -> bool:
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def _cuda_impls():
    """Every op that a csrc/cuda/*.cu file registers with m.impl("name", ...), as (file, op)."""
    import glob
    import re

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")
    found = []
    for path in sorted(glob.glob(os.path.join(root, "*.cu"))):
        with open(path) as fh:
            for op in re.findall(r'm\.impl\(\s*"([A-Za-z0-9_]+)"', fh.read()):
                found.append((os.path.basename(path), op))
    return found


CUDA_IMPLS = _cuda_impls()
CUDA_OPS = sorted({op for _, op in CUDA_IMPLS} | {"seb_forward", "seb_backward_rows", "seb_backward_update_"})


@pytest.mark.skipif(not _cuda_toolchain(), reason="no nvcc or no CUDA build of torch: CUDA kernels are not built")
def test_cuda_extension_built():
    from saml_kernels import _ext

    assert _ext.has_cpu_ext(), f"extension failed to load: {_ext.LOAD_ERROR}"
    assert _ext.has_cuda_ext(), "nvcc and a CUDA torch are present but the extension was built without CUDA kernels"
    assert _ext.cuda_archs(), "extension reports no CUDA archs"


@pytest.mark.skipif(not _cuda_toolchain(), reason="no nvcc or no CUDA build of torch: CUDA kernels are not built")
@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_kernels_registered(op):
    from saml_kernels import _ext

    assert _ext.has_cuda_ext()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"saml_C::{op}", "CUDA"), f"saml_C::{op} has no CUDA kernel"


@pytest.mark.parametrize("cap", CAPS)
def test_seb_aligned_variants_use_16_byte_accesses(cap):
    """The embedding gather is memory bound: with aligned tensors and D % 4 == 0 (fp32), the JIT's variant of the
    forward and segment-sum kernels must load and store 16 bytes per access (ld/st.global.v4), never single words."""
    from saml_kernels.triton import scenario_embedding_bag as seb

    specs = [s for s in seb.aot_specs() if s.name.endswith("[aligned]") and "D16]" not in s.name]
    assert specs
    for spec in specs:
        ptx = compile_spec(spec, cap).asm["ptx"]
        assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, spec.name
        assert "ld.global.b32 " not in ptx, f"{spec.name}: scalar 4-byte loads of table rows"


# ------------------------------------------------------------------------------------------------ dot precision

_MMA_F64 = r"mma[^\n]*\.f64"


def _precision_specs():
    """(spec, cap) of every AOT spec with a dot-precision constexpr (the GEMM kernels), plus the float64 specs."""
    params = []
    for name, mod in MODULES:
        for spec in mod.aot_specs():
            if "PREC" in spec.constexprs or "fp64" in spec.name:
                for cap in CAPS:
                    params.append(pytest.param(spec, cap, id=f"{name}:{spec.name}:sm{cap}"))
    return params


@pytest.mark.parametrize("spec,cap", _precision_specs())
def test_dot_precision_in_ptx(spec, cap):
    """What the GPU runs, read off the PTX (the interpreter multiplies exactly whatever the kernel asks for):
    PREC "ieee" -> no TF32 instruction at all (fp32 FMA products, as torch's default matmul); "tf32" -> TF32 MMA;
    float64 operands -> fp64 MMA (mma ... .f64) and no TF32: the accumulator is float64 (out_dtype=acc.dtype;
    triton 3.6 refused the float64 accumulator without it, so every float64 GEMM failed to compile on the GPU)."""
    import re

    ptx = compile_spec(spec, cap).asm["ptx"]
    prec = spec.constexprs.get("PREC")
    is64 = any(t == "*fp64" for t in spec.signature.values())
    if prec == "tf32":
        assert "tf32" in ptx, f"{spec.name}: PREC tf32 but no TF32 instruction"
    else:
        assert "tf32" not in ptx, f"{spec.name}: TF32 instructions although PREC is {prec!r}"
    if is64 and prec is not None:
        assert re.search(_MMA_F64, ptx), f"{spec.name}: float64 dot without fp64 MMA"


def test_float64_gemm_kernels_are_compiled():
    """The float64 GEMM and mutual kernels are part of the AOT set (they were not, and failed only on the GPU)."""
    names = [s.name for _, mod in MODULES for s in mod.aot_specs()]
    for prefix in ("mbl_grouped_mm[fp64", "mbl_all_mm[fp64", "mbl_wgrad[fp64", "mutual_fwd[fp64", "mutual_bwd[fp64"):
        assert any(n.startswith(prefix) for n in names), prefix
    for prefix in ("mbl_grouped_mm[fp32,tf32", "mbl_all_mm[fp32,tf32", "mbl_wgrad[fp32,tf32",
                   "mutual_linear_fwd[fp32,tf32", "mutual_linear_bwd[fp32,tf32"):
        assert any(n.startswith(prefix) for n in names), prefix


def test_every_dot_names_its_precision_and_accumulator():
    """Source check of every ``tl.dot`` in saml_kernels/triton: ``input_precision=`` (tl.dot's default is TF32 on
    float32) and ``out_dtype=`` (triton <= 3.6 defaults it to float32 and rejects a float64 accumulator) are explicit.
    Catches a new dot without them on any triton version (triton 3.8 alone would compile the float64 case)."""
    import ast
    import inspect

    found = 0
    for name, mod in MODULES:
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"):
                found += 1
                missing = {"input_precision", "out_dtype"} - {k.arg for k in node.keywords}
                assert not missing, f"{name}.py line {node.lineno}: tl.dot without {sorted(missing)}"
    assert found >= 2
