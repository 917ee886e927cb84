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
