"""Builds saml_kernels._C: C++ CPU kernels always, CUDA kernels when a toolkit and a CUDA torch are present.

SAML_BUILD_CUDA=auto (default) | 0 | 1.  TORCH_CUDA_ARCH_LIST is respected (default "8.0;9.0").
SAML_BUILD_FBGEMM=auto (default) | 0: 0 leaves FBGEMM's embedding kernels out of the CPU forward.
A compile error fails the build; nothing is downgraded silently.
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup

# nvcc may sit in /usr/local/bin while the toolkit lives in /usr/local/cuda: point torch at the toolkit.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("SAML_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"SAML_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not have:
        sys.exit(f"SAML_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, "
                 f"CUDA_HOME={cpp_extension.CUDA_HOME!r}")
    return have if mode == "auto" else mode == "1"


def _nvidia_wheel_includes():
    """CUDA headers (cusparse, cublas ...) shipped in the nvidia-* wheels that a pip torch pulls in."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _cuda_library_dirs():
    """Where libcudart lives: the toolkit's lib64 or lib, and the nvidia wheels torch pulled in."""
    dirs = [os.path.join(cpp_extension.CUDA_HOME, d) for d in ("lib64", "lib")]
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "lib"))
    return [d for d in dirs if os.path.isdir(d)]


def extensions():
    with_cuda = _want_cuda()
    sources = ["csrc/registry.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: the ISA clones of csrc/cpu/common/multiversion.h round exactly like the baseline
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-DSAML_WITH_CUDA=%d" % with_cuda]
    x86 = platform.machine() in ("x86_64", "AMD64")
    if x86:  # SSE4.2 baseline on x86; other CPUs use their compiler's defaults
        cxx.append("-march=x86-64-v2")
    # FBGEMM's JIT embedding kernels (x86) where libtorch ships them; SAML_BUILD_FBGEMM=0: portable path only.
    if (x86 and os.environ.get("SAML_BUILD_FBGEMM", "auto") != "0"
            and "fbgemm" in torch.backends.quantized.supported_engines):
        cxx.append("-DSAML_CPU_WITH_FBGEMM=1")
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    if not with_cuda:
        return [cpp_extension.CppExtension("saml_kernels._C", sources, include_dirs=include_dirs,
                                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    cxx.append(f'-DSAML_CUDA_ARCHS="{archs}"')
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += _nvidia_wheel_includes()
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-DSAML_WITH_CUDA=1",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    return [cpp_extension.CUDAExtension("saml_kernels._C", sources, include_dirs=include_dirs,
                                        library_dirs=_cuda_library_dirs(),
                                        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                        extra_link_args=["-fopenmp"])]


setup(
    packages=find_packages(include=["saml_kernels", "saml_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
