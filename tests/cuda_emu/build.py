"""Builds the CPU emulation of csrc/cuda (tests/cuda_emu/README.md) and loads it.

``build(*variants)`` rewrites csrc/cuda into ``build/cuda_emu/src`` (rewrite.py), writes one ninja file for the
requested variants and runs it (the translation units of every variant compile in parallel; unchanged files are
not rebuilt, header dependencies tracked). Variants:

- ``plain``: -O1, loaded into the test process (``load()``): ops in ``torch.ops.saml_C_emu``.
- ``asan``: -fsanitize=address; run in a subprocess with libasan preloaded (``sanitizer_env``), so torch's CPU
  tensors are ASan-tracked allocations of their exact host-side size.
- ``tsan``: -fsanitize=thread; every CUDA thread is a std::thread, so a race between two threads of a CTA (shared
  or global memory, no barrier between) is reported.

Command line: ``python tests/cuda_emu/build.py [variant ...]`` builds and prints the libraries' paths.
"""
from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import subprocess
import sysconfig
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = pathlib.Path(os.environ.get("SAML_EMU_BUILD", ROOT / "build" / "cuda_emu"))

FLAGS = {
    "plain": ["-O1"],
    "asan": ["-O1", "-fsanitize=address", "-fno-omit-frame-pointer", "-DSAML_EMU_FEW_TYPES"],
    "tsan": ["-O1", "-fsanitize=thread", "-DSAML_EMU_FEW_TYPES"],
}
SANITIZER_LIB = {"asan": "libasan.so", "tsan": "libtsan.so"}


def _cxx() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no host C++ compiler (g++) for the CUDA emulation")
    return cxx


def _ninja() -> str:
    n = shutil.which("ninja")
    if n is None:
        try:
            import ninja  # noqa: F401  (the pip package ships the binary)
            n = str(pathlib.Path(ninja.BIN_DIR) / "ninja")
        except ImportError as e:
            raise RuntimeError("ninja is needed to build the CUDA emulation") from e
    return n


def _ninja_file(units: list[pathlib.Path], v: str) -> str:
    """The ninja file of one variant (its own directory and lock: variants build independently)."""
    from torch.utils.cpp_extension import include_paths, library_paths
    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    inc = [f"-I{HERE / 'include'}", f"-I{OUT / 'src'}", f"-I{ROOT / 'csrc/include'}"]
    inc += [f"-isystem {p}" for p in include_paths()] + [f"-isystem {sysconfig.get_path('include')}"]
    common = (["-std=c++20", "-fPIC", "-g0", "-w", "-pthread", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               "-include", str(HERE / "include/emu_runtime.h")] + inc)
    libs = [f"-L{p}" for p in library_paths()] + [f"-Wl,-rpath,{p}" for p in library_paths()]
    libs += ["-lc10", "-ltorch", "-ltorch_cpu"]
    lines = [f"cxx = {_cxx()}", "",
             "rule cc_shared",  # the schemas and the emulator's state: no sanitizer needed
             f"  command = $cxx -MMD -MF $out.d {' '.join(common + FLAGS['plain'])} -c $in -o $out",
             "  depfile = $out.d", "  deps = gcc", f"  description = emu[{v}] $in",
             "rule cc",
             f"  command = $cxx -MMD -MF $out.d {' '.join(common + FLAGS[v])} -c $in -o $out",
             "  depfile = $out.d", "  deps = gcc", f"  description = emu[{v}] $in",
             "rule link",
             f"  command = $cxx -shared {' '.join(FLAGS[v])} $in -o $out {' '.join(libs)}",
             f"  description = emu[{v}] link", ""]
    objs = []
    for u in units + [HERE / "emu_runtime.cpp"]:
        o = OUT / v / (u.stem + ".o")
        objs.append(str(o))
        rule = "cc_shared" if u.name in ("registry.cpp", "emu_runtime.cpp") else "cc"
        lines.append(f"build {o}: {rule} {u}")
    lines += [f"build {library(v)}: link {' '.join(objs)}", ""]
    return "\n".join(lines) + "\n"


def library(variant: str) -> pathlib.Path:
    return OUT / variant / f"saml_emu_{variant}.so"


def _locked(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w")
    fcntl.flock(f, fcntl.LOCK_EX)  # parallel pytest workers / sessions: one writer at a time
    return f


def build(*variants: str, jobs: int | None = None) -> dict:
    """Builds the variants (default: plain); returns {variant: path of the shared library}."""
    from rewrite import rewrite_tree  # noqa: E402  (sibling module; sys.path set below)

    variants = variants or ("plain",)
    for v in variants:
        if v not in FLAGS:
            raise ValueError(f"unknown emulation variant {v!r}; expected one of {sorted(FLAGS)}")
    with _locked(OUT / ".src.lock"):
        units, _ = rewrite_tree(ROOT, OUT / "src", [HERE / "selftest.cu"])
    for v in variants:
        with _locked(OUT / v / ".lock"):
            text = _ninja_file(units, v)
            nf = OUT / v / "build.ninja"
            if not nf.exists() or nf.read_text() != text:
                nf.write_text(text)
            cmd = [_ninja(), "-C", str(OUT / v), f"-j{jobs or os.cpu_count() or 2}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"CUDA emulation build ({v}) failed:\n" + (r.stdout + r.stderr)[-6000:])
    return {v: library(v) for v in variants}


def rewrite_report() -> dict:
    from rewrite import rewrite_tree

    return rewrite_tree(ROOT, OUT / "src", [HERE / "selftest.cu"])[1]


_loaded = False


def load():
    """Builds the plain variant and loads it into this process: ``torch.ops.saml_C_emu``."""
    global _loaded
    import torch

    if not _loaded:
        torch.ops.load_library(str(build("plain")["plain"]))
        _loaded = True
    return torch.ops.saml_C_emu


def sanitizer_env(variant: str) -> dict:
    """Environment of a subprocess that loads the ``variant`` library (sanitizer runtime preloaded)."""
    env = dict(os.environ)
    lib = subprocess.run([_cxx(), f"-print-file-name={SANITIZER_LIB[variant]}"], capture_output=True,
                         text=True).stdout.strip()
    env["LD_PRELOAD"] = lib
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0"
    env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=66:report_signal_unsafe=0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


sys.path.insert(0, str(HERE))

if __name__ == "__main__":
    print("\n".join(f"{k}: {v}" for k, v in build(*(sys.argv[1:] or ["plain"])).items()))
