"""CPU-side checks of the sync-free CUDA grouped GEMM (csrc/cuda/mbranch_common.cuh, section "gemm").

- The device tile schedule (``find_tile`` / ``grouped_tiles``), mirrored line by line in Python: for any segment
  sizes the host-side grid bound ceil(B / tile) + M covers every tile, every row is computed by exactly one CTA and
  the surplus CTAs find no tile (they exit). The host sizes the grid without reading the data: that is what makes
  the op sync-free.
- A source scan of the CUDA mbranch / mutual files: no host synchronisation outside the explicit cuBLAS
  benchmarking path (``SAML_CUDA_GROUPED=cublas``, functions named ``*_cublas``).
- The GEMM kernels and their launchers themselves (row GEMM: grouped and dense schedules, transposed weights,
  float32 z out of 16-bit inputs, out-of-range rows zeroed; weight gradient with db, direct and row-split),
  compiled by the host C++ compiler against stub CUDA headers (each <<< >>> launch rewritten into
  ``emu_launch``; the C++ is tests/cuda_sync_free_harness.cpp): one std::thread per CUDA thread, std::barrier for
  __syncthreads, CTAs in shuffled order, a launch with a zero grid dimension aborts (as CUDA refuses it), a
  whole-tile WMMA emulation that asserts the WMMA pointer/ldm rules, and a trace of the tile loaders' global loads
  (32-byte sectors per warp-wide load: coalescing; rows per CTA: load balance). Every output element is compared
  with a float64 reference within the bound of one rounding plus float32 accumulation. This checks the index
  math, the tile schedule, the loaders' access pattern, the epilogues and the barriers' placement; it cannot check
  the GPU's memory model, real WMMA fragments or speed (the GPU tests and benchmarks do).

The kernels themselves run on a GPU in tests/test_mbranch_mutual_gpu.py (sync-debug mode and CUDA-graph tests).
"""
from __future__ import annotations

import os
import pathlib
import random
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BM = 64  # gemm::kBM


def find_tile(seg, tile, t, B=None):
    """Mirror of saml_cuda::gemm::find_tile: tile t -> (group, lo, hi) or None. With B (``outside``), group -1
    owns [0, seg[0]) and group M owns [seg[M], B): the rows of out-of-range scenarios."""
    M = len(seg) - 1
    for m in range(-1 if B is not None else 0, M + 1 if B is not None else M):
        a = 0 if m < 0 else seg[m]
        b = seg[m + 1] if m < M else B
        n = (b - a + tile - 1) // tile if b > a else 0
        if t < n:
            lo = a + t * tile
            return m, lo, min(b, lo + tile)
        t -= n
    return None


def grouped_tiles(B, M, tile, outside):
    """Mirror of saml_cuda::gemm::grouped_tiles: the grid size along x, from B and M only."""
    return (B + tile - 1) // tile + M + (2 if outside else 0)


def check_schedule(counts, tile=BM, below=0, above=0):
    """counts per scenario, plus `below` / `above` rows of out-of-range scenarios (< 0, >= M) at the ends."""
    M, B = len(counts), below + sum(counts) + above
    seg = [below]
    for c in counts:
        seg.append(seg[-1] + c)
    for outside in (False, True):
        owner = [None] * B
        found = 0
        for t in range(grouped_tiles(B, M, tile, outside)):
            hit = find_tile(seg, tile, t, B if outside else None)
            if hit is None:
                continue
            found += 1
            m, lo, hi = hit
            a, b = (0 if m < 0 else seg[m]), (seg[m + 1] if m < M else B)
            assert a <= lo < hi <= b and hi - lo <= tile
            for p in range(lo, hi):
                assert owner[p] is None, f"row {p} computed twice"
                owner[p] = m
        groups = [below] * outside + list(counts) + [above] * outside
        assert found == sum((c + tile - 1) // tile for c in groups)
        expect = [-1] * below + [m for m, c in enumerate(counts) for _ in range(c)] + [M] * above
        if not outside:
            expect = [None] * below + expect[below:B - above] + [None] * above
        assert owner == expect, "a row was never computed (grid bound too small) or in the wrong group"
        # sum_g ceil(c_g / tile) < B / tile + #groups: the last CTA of the grid never has a tile (it exits)
        assert find_tile(seg, tile, grouped_tiles(B, M, tile, outside) - 1, B if outside else None) is None


@pytest.mark.parametrize("counts", [
    [0], [1], [64], [65], [0, 0, 0], [63, 1, 64, 65, 0], [1] * 200, [63] * 7, [65] * 7, [128, 0, 0, 1],
    [0, 4096, 0], [64 * 5 + 63, 1, 0, 64],
])
@pytest.mark.parametrize("below,above", [(0, 0), (1, 0), (0, 65), (64, 129)])
def test_tile_schedule_covers_every_row_once(counts, below, above):
    check_schedule(counts, below=below, above=above)


def test_tile_schedule_random():
    rng = random.Random(1234)
    for _ in range(300):
        M = rng.randint(1, 40)
        counts = [rng.choice([0, 1, rng.randint(0, 300), 64 * rng.randint(0, 4) + rng.choice([-1, 0, 1])])
                  for _ in range(M)]
        check_schedule([max(0, c) for c in counts], below=rng.choice([0, 0, 1, 70]), above=rng.choice([0, 0, 3]))
        check_schedule([max(0, c) for c in counts], tile=256)


def test_grid_bound_is_tight_enough():
    """Worst case of the bound: every segment one row past a tile boundary; the grid still suffices."""
    for M in (1, 3, 17):
        counts = [BM + 1] * M
        B = sum(counts)
        assert sum((c + BM - 1) // BM for c in counts) <= grouped_tiles(B, M, BM, False)
        check_schedule(counts, below=BM + 1, above=BM + 1)


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


# ------------------------------------------------------------------------------------------------ CPU emulation

EMU_STUBS = {  # stub CUDA headers, shadowing the real ones in the host build
    "cuda_runtime.h": r"""
#pragma once
// Host emulation of the few CUDA names the GEMM engine uses: one std::thread per CUDA thread, a std::barrier
// for __syncthreads, blockIdx shared by the CTA (CTAs run one after another, in a shuffled order). A launch with
// a grid or block dimension of 0 aborts, as CUDA rejects it ("invalid configuration argument"). Every global
// load of the tile loaders is traced (SAML_EMU_LOAD): per warp-wide load instruction, the distinct 32-byte
// sectors its lanes touch, and per CTA the distinct rows it reads at the weight-gradient G site.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <tuple>
#include <vector>
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef void* cudaStream_t;
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;
inline std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline void __trap() { std::abort(); }
template <typename T> T __shfl_xor_sync(unsigned, T v, int) { return v; }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct EmuLoad { int site, seq; std::uintptr_t addr; };
inline thread_local std::vector<EmuLoad> emu_loads;
inline thread_local int emu_seq[4];
#define SAML_EMU_LOAD(site, ptr) \
  emu_loads.push_back({int(site), emu_seq[int(site)]++, reinterpret_cast<std::uintptr_t>(ptr)})
struct EmuStats {
  int max_sectors[4] = {0, 0, 0, 0};  // per site: most distinct 32-byte sectors of one warp-wide load
  long warp_loads[4] = {0, 0, 0, 0};
  std::uintptr_t row_base = 0;        // rows read at site 3 (wgrad G): (addr - row_base) / row_bytes
  long row_bytes = 0;
  std::vector<long> cta_rows;         // per CTA that read a row at site 3
};
inline EmuStats emu_stats;
inline std::mt19937 emu_order(7);

// Sectors per warp-wide load and rows read at site 3 of one finished CTA (its threads' traces in recs).
inline void emu_analyse(std::vector<std::vector<EmuLoad>>& recs) {
  std::map<std::tuple<int, int, unsigned>, std::set<std::uintptr_t>> sectors;  // (site, seq, warp)
  std::set<long> rows;
  for (unsigned t = 0; t < recs.size(); ++t) {
    for (const EmuLoad& r : recs[t]) {
      auto& set = sectors[{r.site, r.seq, t / 32}];
      if (r.addr == 0) continue;  // masked lane
      set.insert(r.addr / 32);
      if (r.site == 3 && emu_stats.row_bytes > 0) rows.insert(long((r.addr - emu_stats.row_base) / emu_stats.row_bytes));
    }
    recs[t].clear();
  }
  for (const auto& [key, set] : sectors) {
    const int site = std::get<0>(key);
    emu_stats.max_sectors[site] = std::max<int>(emu_stats.max_sectors[site], int(set.size()));
    emu_stats.warp_loads[site] += !set.empty();
  }
  if (!rows.empty()) emu_stats.cta_rows.push_back(long(rows.size()));
}

// One launch: `block` threads (created once per launch) run the CTAs one after another in a shuffled order; a
// barrier between CTAs analyses the finished CTA's loads and moves blockIdx on.
template <typename F>
void emu_launch(dim3 grid, unsigned block, size_t, cudaStream_t, F&& kernel) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block == 0) {
    std::fprintf(stderr, "invalid configuration argument: grid (%u, %u, %u), block %u\n", grid.x, grid.y, grid.z,
                 block);
    std::abort();
  }
  gridDim = grid;
  blockDim = dim3(block);
  std::vector<dim3> ctas;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) ctas.emplace_back(x, y, z);
  std::shuffle(ctas.begin(), ctas.end(), emu_order);
  std::vector<std::vector<EmuLoad>> recs(block);
  size_t next = 0;
  blockIdx = ctas[0];
  auto finish_cta = [&]() noexcept {
    emu_analyse(recs);
    if (++next < ctas.size()) blockIdx = ctas[next];
  };
  std::barrier<> bar(block);
  emu_barrier = &bar;
  std::barrier<decltype(finish_cta)> between(block, finish_cta);
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < block; ++t)
    ts.emplace_back([&, t] {
      threadIdx = dim3(t);
      for (size_t i = 0; i < ctas.size(); ++i) {
        emu_loads.clear();
        for (int& q : emu_seq) q = 0;
        kernel();
        recs[t].swap(emu_loads);
        between.arrive_and_wait();
      }
    });
  for (auto& t : ts) t.join();
}
""",
    "cuda_fp16.h": r"""
#pragma once
#include <c10/util/Half.h>
using __half = c10::Half;
""",
    "cuda_bf16.h": r"""
#pragma once
#include <c10/util/BFloat16.h>
using __nv_bfloat16 = c10::BFloat16;
""",
    "ATen/cuda/CUDAContext.h": r"""
#pragma once
struct EmuDeviceProps { int major = 9; };
namespace at { namespace cuda {
inline EmuDeviceProps* getCurrentDeviceProperties() { static EmuDeviceProps p; return &p; }
} }
""",
    "mma.h": r"""
#pragma once
// WMMA emulation: every lane holds the whole 16x16 tile (same results, same pointer / ldm contract). The real
// API's requirements are asserted: 256-bit aligned pointers, ldm a multiple of 16 bytes.
#include <cstdint>
#include <cstdlib>
#include <cstdio>
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment { float v[16][16]; };
inline void emu_check(const void* p, unsigned ldm, unsigned elem) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0 || (ldm * elem) % 16 != 0) {
    std::fprintf(stderr, "WMMA contract violated: ptr %p ldm %u\n", p, ldm);
    std::abort();
  }
}
template <typename F> void fill_fragment(F& f, float x) {
  for (auto& r : f.v) for (auto& e : r) e = x;
}
template <typename U, typename T, typename L>
void load_matrix_sync(fragment<U, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  emu_check(p, ldm, sizeof(T));
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) f.v[i][j] = static_cast<float>(p[i * ldm + j]);
}
template <typename A, typename B, typename C>
void mma_sync(C& d, const A& a, const B& b, const C& c) {
  C t;
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) {
    float s = c.v[i][j];
    for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
    t.v[i][j] = s;
  }
  d = t;
}
template <typename F> void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t) {
  emu_check(p, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;  // one lane writes the warp's tile (the others hold the same values)
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.v[i][j];
}
} }
""",
}

EMU_HARNESS = (ROOT / "tests" / "cuda_sync_free_harness.cpp")


def emulated_header() -> str:
    """csrc/cuda/mbranch_common.cuh with its launchers kept (``defined(__CUDACC__)`` -> 1) and every
    ``kernel<...><<<grid, block, smem, stream>>>(args);`` rewritten into ``emu_launch(...)``."""
    src = (ROOT / "csrc/cuda/mbranch_common.cuh").read_text().replace("defined(__CUDACC__)", "1")
    src, n = re.subn(r"([A-Za-z_][\w:]*(?:<[^;<>]*>)?)<<<([^;]*?)>>>\(([^;]*?)\);", r"emu_launch(\2, [&] { \1(\3); });",
                     src)
    assert n == 5 and "<<<" not in re.sub(r"//[^\n]*", "", src), f"launch rewrite found {n} launches: update it"
    return src


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    from torch.utils.cpp_extension import include_paths

    d = tmp_path_factory.mktemp("gemm_emu")
    for name, text in EMU_STUBS.items():
        f = d / "inc" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    (d / "inc" / "mbranch_common.cuh").write_text(emulated_header())
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-w", f"-I{d / 'inc'}", f"-I{ROOT / 'csrc/include'}"] + \
        [f"-I{p}" for p in include_paths()] + [str(EMU_HARNESS), "-o", str(d / "harness")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "emulation build failed:\n" + r.stderr[-4000:]
    return d / "harness"


def run_emulator(emulator, case):
    r = subprocess.run([str(emulator), case], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "ALL OK" in out, out[-4000:]
    return r.stdout


def test_gemm_kernels_in_cpu_emulation(emulator):
    """Row GEMM (grouped / dense, transposed weights, K and N tails, K < BK, every dtype, WMMA and FMA) and
    weight gradient (direct and split schedules, db-only) against float64; rows of out-of-range scenarios are
    zeros (y, z, dx) and add nothing to dW / db; every B-tile load of both weight layouts touches at most
    2 * sizeof(T) sectors of 32 bytes per warp (4 for 16-bit types; 32 when lanes go along W's strided dim)."""
    run_emulator(emulator, "gemm")


def test_launchers_skip_zero_grids(emulator):
    """N = 0 (mutual_linear's chunk_preact), K = 0, B = 0, M = 0 through the real launchers: the emulated launch
    aborts on a zero grid dimension as CUDA does; the results are the empty / zero / bias-only ones."""
    run_emulator(emulator, "zero")


def test_wgrad_row_split(emulator):
    """Weight gradient of 2048 rows: 70% skewed and uniform mixes with empty scenarios, every dtype, db-only,
    against float64; bitwise equal across two shuffled CTA orders; the rows per CTA of the 70% skew: max / mean
    <= 1.5 with the split (the direct schedule, one CTA per scenario and tile, is reported for comparison)."""
    out = run_emulator(emulator, "wgrad")
    print(out)
