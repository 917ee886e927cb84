"""What the CPU emulation of csrc/cuda (tests/cuda_emu) checks beyond the numbers, each proven on an injected bug
(tests/cuda_emu/selftest.cu) and then run over every op (tests/cuda_emu/drive.py):

- coverage: the kernels the emulation launched are exactly the ``__global__`` functions of csrc/cuda, so a new
  kernel cannot skip it; the rewriter found every launch;
- launch configuration: a grid / block CUDA rejects raises like cudaErrorInvalidConfiguration;
- warp semantics: sub-warp shuffles (width, group masks) give the hardware's values; a shuffle whose mask names
  a lane that has exited is a fault (reported, process aborted as a device fault would);
- shared memory is fresh per CTA and poisoned (NaN): a CTA reading what it did not write gets NaN;
- out-of-bounds global reads and writes: an AddressSanitizer build, in a subprocess with libasan preloaded, so
  the bounds are torch's host-side allocation sizes; every op then runs clean under it;
- races: a ThreadSanitizer build (every CUDA thread is a std::thread): a missing __syncthreads is reported; every
  op then runs clean under it.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch

from cuda_emu import build as emu_build
from cuda_emu.drive import run_all
from cuda_emu.harness import emu_ops

ROOT = pathlib.Path(__file__).resolve().parent.parent
DRIVE = ROOT / "tests/cuda_emu/drive.py"


@pytest.fixture(scope="module")
def emu():
    return emu_ops()


def global_kernels() -> set:
    names = set()
    for f in (ROOT / "csrc/cuda").iterdir():
        code = re.sub(r"//[^\n]*", "", f.read_text())
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", code))
    return names


def test_every_kernel_runs(emu):
    run_all(emu)
    launched = {k for k in emu.emu_launched() if not k.startswith("emu_selftest")}
    kernels = global_kernels()
    assert len(kernels) >= 9, kernels
    assert launched == kernels, (f"kernels never run in the emulation: {sorted(kernels - launched)}; "
                                 f"launched but not found as __global__: {sorted(launched - kernels)}")


def test_rewriter_found_every_launch():
    report = emu_build.rewrite_report()
    for f in (ROOT / "csrc/cuda").iterdir():
        code = re.sub(r"//[^\n]*", "", f.read_text())
        r = report[f"csrc/cuda/{f.name}"]
        assert r["launch"] == code.count("<<<"), (f.name, r)
        assert r["shared"] == len(re.findall(r"\b__shared__\b", code)), (f.name, r)
        assert r["library"] == code.count("TORCH_LIBRARY_IMPL"), (f.name, r)


def test_invalid_launch_configuration_raises(emu):
    with pytest.raises(RuntimeError, match=r"cudaErrorInvalidConfiguration.*grid \(1,0,1\)"):
        emu.emu_selftest("bad_config", torch.zeros(32))


def test_warp_shuffles_with_width(emu):
    x = torch.randn(48)
    out = emu.emu_selftest("shuffles", x).view(-1, 2)
    groups = x.view(-1, 8)
    assert torch.allclose(out[:, 0].view(-1, 8), groups.sum(1, keepdim=True).expand(-1, 8), atol=1e-6)
    down = torch.cat([groups[:, 1:], groups[:, 7:]], 1)  # lane 7 of a group keeps its own value
    assert torch.equal(out[:, 1].view(-1, 8), down)


def test_shared_memory_fresh_and_poisoned_per_cta(emu):
    out = emu.emu_selftest("smem_leak", torch.zeros(32))
    assert torch.equal(out[:32], torch.arange(32.0))
    assert bool(torch.isnan(out[32:]).all()), "CTA 1 read shared memory written by CTA 0"


def _run(variant, case, timeout=600):
    env = emu_build.sanitizer_env(variant) if variant != "plain" else None
    r = subprocess.run([sys.executable, str(DRIVE), variant, case], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=ROOT)
    return r.returncode, r.stdout + r.stderr


def test_exited_lane_in_mask_is_a_fault(emu):
    rc, out = _run("plain", "exited_lane")
    assert rc != 0 and re.search(r"CUDA EMULATION FAULT: __shfl_xor_sync with mask 0xffffffff names lanes that "
                                 r"have exited \(0x[0-9a-f]*0000\) \(kernel emu_selftest_exited_lane", out), out[-3000:]


@pytest.fixture(scope="module")
def asan():
    emu_ops()
    return emu_build.build("asan")


@pytest.fixture(scope="module")
def tsan():
    emu_ops()
    return emu_build.build("tsan")


@pytest.mark.parametrize("case,kind", [("oob_read", "READ"), ("oob_write", "WRITE")])
def test_asan_catches_out_of_bounds(asan, case, kind):
    rc, out = _run("asan", case)
    assert rc != 0 and "heap-buffer-overflow" in out and f"{kind} of size 4" in out, out[-3000:]
    # the bound is the tensor's host allocation: 32 float32 elements
    assert "0 bytes to the right of 128-byte region" in out and "emu_selftest" in out, out[-3000:]


def test_every_op_clean_under_asan(asan):
    rc, out = _run("asan", "all")
    assert rc == 0 and "DRIVE OK" in out and "AddressSanitizer" not in out, out[-4000:]


def test_tsan_catches_missing_syncthreads(tsan):
    rc, out = _run("tsan", "race")
    assert rc != 0 and "data race" in out and "emu_selftest_race" in out, out[-3000:]
    rc, out = _run("tsan", "race_fixed")
    assert rc == 0 and "DRIVE OK" in out and "data race" not in out, out[-3000:]


def test_every_op_clean_under_tsan(tsan):
    rc, out = _run("tsan", "all")
    assert rc == 0 and "DRIVE OK" in out and "ThreadSanitizer" not in out, out[-4000:]
