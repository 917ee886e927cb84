"""CPU-side checks of the sync-free CUDA grouped GEMM (csrc/cuda/mbranch_common.cuh, section "gemm").

- The device tile schedule (``find_tile`` / ``grouped_tiles``), mirrored line by line in Python: for any segment
  sizes the host-side grid bound ceil(B / tile) + M covers every tile, every row is computed by exactly one CTA and
  the surplus CTAs find no tile (they exit). The host sizes the grid without reading the data: that is what makes
  the op sync-free.
- A source scan of the CUDA mbranch / mutual files: no host synchronisation outside the explicit cuBLAS
  benchmarking path (``SAML_CUDA_GROUPED=cublas``, functions named ``*_cublas``).

The kernels themselves run on a GPU in tests/test_mbranch_mutual_gpu.py (sync-debug mode and CUDA-graph tests).
"""
from __future__ import annotations

import pathlib
import random
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BM = 64  # gemm::kBM


def find_tile(seg, tile, t):
    """Mirror of saml_cuda::gemm::find_tile: tile t -> (group, lo, hi) or None."""
    for m in range(len(seg) - 1):
        a, b = seg[m], seg[m + 1]
        n = (b - a + tile - 1) // tile if b > a else 0
        if t < n:
            lo = a + t * tile
            return m, lo, min(b, lo + tile)
        t -= n
    return None


def grouped_tiles(B, M, tile):
    """Mirror of saml_cuda::gemm::grouped_tiles: the grid size along x, from B and M only."""
    return (B + tile - 1) // tile + M


def check_schedule(counts, tile=BM):
    M, B = len(counts), sum(counts)
    seg = [0]
    for c in counts:
        seg.append(seg[-1] + c)
    owner = [None] * B
    found = 0
    for t in range(grouped_tiles(B, M, tile)):
        hit = find_tile(seg, tile, t)
        if hit is None:
            continue
        found += 1
        m, lo, hi = hit
        assert seg[m] <= lo < hi <= seg[m + 1] and hi - lo <= tile
        for p in range(lo, hi):
            assert owner[p] is None, f"row {p} computed twice"
            owner[p] = m
    assert found == sum((c + tile - 1) // tile for c in counts)
    assert all(o is not None for o in owner), "a row was never computed: grid bound too small"
    assert [owner[seg[m]:seg[m + 1]] for m in range(M)] == [[m] * c for m, c in enumerate(counts)]
    # sum_g ceil(c_g / tile) < B / tile + M: the last CTA of the grid never has a tile (it exits)
    assert find_tile(seg, tile, grouped_tiles(B, M, tile) - 1) is None


@pytest.mark.parametrize("counts", [
    [0], [1], [64], [65], [0, 0, 0], [63, 1, 64, 65, 0], [1] * 200, [63] * 7, [65] * 7, [128, 0, 0, 1],
    [0, 4096, 0], [64 * 5 + 63, 1, 0, 64],
])
def test_tile_schedule_covers_every_row_once(counts):
    check_schedule(counts)


def test_tile_schedule_random():
    rng = random.Random(1234)
    for _ in range(300):
        M = rng.randint(1, 40)
        counts = [rng.choice([0, 1, rng.randint(0, 300), 64 * rng.randint(0, 4) + rng.choice([-1, 0, 1])])
                  for _ in range(M)]
        check_schedule([max(0, c) for c in counts])


def test_grid_bound_is_tight_enough():
    """Worst case of the bound: every segment one row past a tile boundary; the grid still suffices."""
    for M in (1, 3, 17):
        counts = [BM + 1] * M
        B = sum(counts)
        assert sum((c + BM - 1) // BM for c in counts) <= grouped_tiles(B, M, BM)
        check_schedule(counts)


# ------------------------------------------------------------------------------------------------ source scan

FILES = ["csrc/cuda/mbranch_linear.cu", "csrc/cuda/mutual_unit.cu", "csrc/cuda/mbranch_common.cuh"]
SYNCS = [r"\.to\(\s*at::kCPU", r"\.cpu\(\)", r"\.item\s*[<(]", r"\bnonzero\b", r"cudaMemcpy(?!Async)",
         r"cudaStreamSynchronize", r"cudaDeviceSynchronize", r"\.tolist\(", r"at::unique", r"masked_select",
         r"host_segments\("]


def _functions(src: str):
    """(name, start, end) of the functions defined at column 0 (brace matching; enough for these files)."""
    out = []
    for m in re.finditer(r"\n(?=[A-Za-z_])[\w:<>,\s\*&]*?\b(\w+)\s*\([^;{]*?\)\s*(?:const\s*)?\{", src):
        depth, i = 1, m.end()
        while depth and i < len(src):
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
        out.append((m.group(1), m.start(), i))
    return out


def _allowed(name: str) -> bool:
    return name.endswith("_cublas") or name == "host_segments"


@pytest.mark.parametrize("path", FILES)
def test_no_host_sync_outside_the_cublas_switch(path):
    code = re.sub(r"//[^\n]*", "", (ROOT / path).read_text())  # comments may name the forbidden calls
    funcs = _functions(code)
    assert len(funcs) >= 3, "function scan found nothing: update the regex"
    rest = code
    for name, a, b in sorted(funcs, key=lambda f: -f[1]):  # blank out the allowed functions, back to front
        if _allowed(name):
            rest = rest[:a] + " " * (b - a) + rest[b:]
    for pat in SYNCS:
        hit = re.search(pat, rest)
        assert not hit, f"{path}: host-syncing call {pat!r} at char {hit.start()} outside the *_cublas path"
    callers = [name for name, a, b in funcs if "host_segments(" in code[a:b] and name != "host_segments"]
    assert all(c.endswith("_cublas") for c in callers), callers
    if "mbranch_linear" in path:
        assert {"grouped_forward_cublas", "grouped_backward_cublas"} <= {f[0] for f in funcs}


def test_cublas_path_is_opt_in():
    src = (ROOT / "csrc/cuda/mbranch_common.cuh").read_text()
    assert 'getenv("SAML_CUDA_GROUPED")' in src
    # default (unset / "auto") is the tiled engine
    assert re.search(r'e == nullptr \|\| \*e == \'\\0\' \|\| std::strcmp\(e, "auto"\) == 0\) return Engine::kAuto', src)
