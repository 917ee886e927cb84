// Runs the GEMM engine of csrc/cuda/mbranch_common.cuh and its launchers on the CPU (tests/test_cuda_sync_free.py
// builds it against stub CUDA headers: a thread per CUDA thread, launches rewritten into emu_launch) and
// compares every output element with a float64 reference. Usage: harness gemm|zero|wgrad. Prints one line per
// case; "FAIL" on a mismatch, "ALL OK" at the end when everything passed.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "mbranch_common.cuh"

namespace g = saml_cuda::gemm;
using c10::BFloat16;
using c10::Half;

static int failures = 0;

#define EXPECT(cond, ...)                                 \
  do {                                                    \
    if (!(cond)) {                                        \
      ++failures;                                         \
      std::printf("FAIL " __VA_ARGS__);                   \
      std::printf("\n");                                  \
    }                                                     \
  } while (0)

// 256-byte aligned buffers, as cudaMalloc returns: the sector counts below see the device's alignment.
template <typename T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <typename U> Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(std::max<size_t>(n, 1) * sizeof(T), std::align_val_t(256))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(256)); }
  template <typename U> bool operator==(const Aligned<U>&) const { return true; }
};
template <typename T> using Vec = std::vector<T, Aligned<T>>;

// Error bounds: out_rel for the one rounding to the output type, acc_rel * sum|terms| for the accumulation
// (float32 for every type but float64).
template <typename O> double out_rel() { return sizeof(O) == 8 ? 2.3e-16 : sizeof(O) == 4 ? 1.2e-7 : std::is_same_v<O, Half> ? 9.8e-4 : 7.9e-3; }
template <typename T> double acc_rel() { return sizeof(T) == 8 ? 1e-14 : 2e-5; }
// Most 32-byte sectors a coalesced warp-wide load may touch: 32 lanes of consecutive elements cover
// 32 * sizeof(T) bytes = sizeof(T) sectors, twice that for two runs / misalignment (4 for 16-bit types).
template <typename T> int sector_bound() { return 2 * int(sizeof(T)); }

template <typename T, typename O> bool check(const char* what, O got, double ref, double sc, long idx) {
  const double gd = std::is_same_v<O, double> ? static_cast<double>(got) : static_cast<double>(static_cast<float>(got));
  if (std::isnan(gd) || std::abs(gd - ref) > out_rel<O>() * std::abs(ref) + acc_rel<T>() * sc + 1e-300) {
    if (failures++ < 20) std::printf("FAIL %s at %ld: got %.9g ref %.9g\n", what, idx, gd, ref);
    return false;
  }
  return true;
}

// Scenario mixes. mode 0: group 0 big, group 2 empty, and rows of out-of-range scenarios (-1 and M: unchecked
// input); 1: 70% of the rows in group 0, groups 3 and 5 empty; 2: uniform.
struct Data {
  int M, B, K, N, Ka;
  std::vector<int64_t> s, perm, seg;
  std::mt19937_64 rng{1234};
  std::normal_distribution<double> nd;
  template <typename T> Vec<T> rand(size_t n, double scale = 1) {
    Vec<T> v(n);
    for (auto& e : v) e = static_cast<T>(nd(rng) * scale);
    return v;
  }
  bool in(int b) const { return s[b] >= 0 && s[b] < M; }
  Data(int M_, int B_, int K_, int N_, int Ka_, int mode) : M(M_), B(B_), K(K_), N(N_), Ka(Ka_) {
    for (int b = 0; b < B; ++b) {
      if (mode == 0) s.push_back(b % 23 == 5 ? -1 : b % 29 == 7 ? M : (b * 7) % 10 < 6 ? 0 : (b % 2 ? 1 : 3));
      else if (mode == 1) s.push_back(b % 10 < 7 ? 0 : std::array<int, 5>{1, 2, 4, 6, 7}[b % 5]);
      else s.push_back(b % M);
    }
    std::shuffle(s.begin(), s.end(), rng);
    perm.resize(B);  // sort_by_scenario: stable sort, out-of-range ids at the ends
    std::iota(perm.begin(), perm.end(), 0);
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return s[a] < s[b]; });
    seg.assign(M + 1, 0);
    for (int m = 0; m <= M; ++m) seg[m] = std::count_if(s.begin(), s.end(), [&](int64_t v) { return v < m; });
  }
};

double leaky(double v) { return v > 0 ? v : 0.01 * v; }

// Forward row GEMM: grouped (perm/seg) or dense (grid z = M, all-route [B, M*N] layout); x column-major, bias
// transposed: the strides are exercised. OutT float with a 16-bit T is mutual_linear's float32 z.
template <typename T, typename OutT, bool TC>
void test_forward(const char* name, bool dense) {
  Data d(4, 150, 70, 100, 9, 0);
  const int M = d.M, B = d.B, K = d.K, N = d.N, Ka = d.Ka;
  auto x = d.rand<T>(size_t(B) * K);  // x[b, k] at b + k * B
  auto w = d.rand<T>(size_t(M) * K * N, 0.2);
  auto a = d.rand<T>(size_t(B) * Ka);
  auto wa = d.rand<T>(size_t(M) * Ka * N, 0.3);
  auto bias = d.rand<T>(size_t(M) * N);  // bias[m, n] at m + n * M
  const size_t outn = dense ? size_t(B) * M * N : size_t(B) * N;
  Vec<OutT> y(outn, static_cast<OutT>(NAN)), z(outn, static_cast<OutT>(NAN));
  g::RowGemmArgs<T, OutT> p{};
  p.op[0] = {x.data(), 0, 1, B, w.data(), int64_t(K) * N, N, 1, K};
  p.op[1] = {a.data(), 0, Ka, 1, wa.data(), int64_t(Ka) * N, N, 1, Ka};
  p.nops = 2;
  p.seg = dense ? nullptr : d.seg.data();
  p.perm = dense ? nullptr : d.perm.data();
  p.rows = B;
  p.M = M;
  p.N = N;
  p.bias = bias.data();
  p.sbm = 1;
  p.sbn = M;
  p.y = y.data();
  p.z = z.data();
  p.som = dense ? N : 0;
  p.sor = dense ? int64_t(M) * N : N;
  p.son = 1;
  p.act = 2;
  emu_stats = EmuStats{};
  if (dense)
    g::launch_dense_row_gemm(p, TC, nullptr);
  else
    g::launch_grouped_row_gemm(p, TC, nullptr);
  int bad = 0;
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b) {
      if (!dense && d.s[b] != m) continue;
      for (int n = 0; n < N; ++n) {
        double v = double(bias[m + size_t(n) * M]), sc = std::abs(v);
        for (int k = 0; k < K; ++k) {
          const double t = double(x[b + size_t(k) * B]) * double(w[(size_t(m) * K + k) * N + n]);
          v += t, sc += std::abs(t);
        }
        for (int k = 0; k < Ka; ++k) {
          const double t = double(a[size_t(b) * Ka + k]) * double(wa[(size_t(m) * Ka + k) * N + n]);
          v += t, sc += std::abs(t);
        }
        const size_t off = dense ? size_t(b) * M * N + size_t(m) * N + n : size_t(b) * N + n;
        bad += !check<T>("z", z[off], v, sc, long(off));
        bad += !check<T>("y", y[off], leaky(v), sc, long(off));
      }
    }
  if (!dense)  // unchecked out-of-range scenario: y = z = 0 exactly
    for (int b = 0; b < B; ++b)
      if (!d.in(b))
        for (int n = 0; n < N; ++n)
          if (!(double(y[size_t(b) * N + n]) == 0.0 && double(z[size_t(b) * N + n]) == 0.0)) {
            if (bad++ < 5) std::printf("FAIL row %d of scenario %ld not zero: %g\n", b, long(d.s[b]), double(y[size_t(b) * N + n]));
            ++failures;
          }
  const int sec = emu_stats.max_sectors[g::kSiteRowB];
  EXPECT(sec <= sector_bound<T>(), "%s: a B-tile warp load (W, swn = 1) touches %d sectors > %d", name, sec, sector_bound<T>());
  std::printf("%s %s: %s (B-tile loads: at most %d sectors per warp)\n", bad ? "FAIL" : "ok", name,
              dense ? "dense" : "grouped", sec);
}

// dw / db of d's rows through launch_wgrad with `plan` (dw or db may be null); checks against float64.
template <typename T, bool TC>
int run_wgrad(const Data& d, const Vec<T>& x, const Vec<T>& dz, T* dw, T* db, const g::WgradPlan& plan,
              bool x_col_major) {
  using acc_t = typename g::WgradArgs<T>::acc_t;
  const int M = d.M, B = d.B, K = d.K, N = d.N;
  g::WgradArgs<T> q{x.data(), x_col_major ? 1 : K, x_col_major ? B : 1, K, dz.data(), N, 1, N, d.seg.data(),
                    d.perm.data(), M, dw, db};
  Vec<acc_t> ws(std::max<int64_t>(plan.workspace, 1), acc_t(NAN));
  g::launch_wgrad(q, plan, ws.data(), TC, nullptr);
  int bad = 0;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double vb = 0, sb = 0;
      for (int b = 0; b < B; ++b)
        if (d.s[b] == m) vb += double(dz[size_t(b) * N + n]), sb += std::abs(double(dz[size_t(b) * N + n]));
      if (db != nullptr) {
        bad += !check<T>("db", db[size_t(m) * N + n], vb, sb, long(m) * N + n);
        if (sb == 0 && double(db[size_t(m) * N + n]) != 0.0) ++bad, ++failures, std::printf("FAIL db of empty group\n");
      }
      if (dw == nullptr) continue;
      for (int k = 0; k < K; ++k) {
        double v = 0, sc = 0;
        for (int b = 0; b < B; ++b)
          if (d.s[b] == m) {
            const double xv = double(x[x_col_major ? b + size_t(k) * B : size_t(b) * K + k]);
            const double t = xv * double(dz[size_t(b) * N + n]);
            v += t, sc += std::abs(t);
          }
        const size_t off = (size_t(m) * K + k) * N + n;
        bad += !check<T>("dW", dw[off], v, sc, long(off));
        if (sb == 0 && double(dw[off]) != 0.0) ++bad, ++failures, std::printf("FAIL dW of empty group\n");
      }
    }
  return bad;
}

// dx = dz W^T (transposed weight operand: swk = 1, swn = N) and dW / db / db-only through wgrad, direct and
// split schedules. dz row-major: its A-tile loads and the wgrad G loads are checked for coalescing too.
template <typename T, bool TC>
void test_backward(const char* name, int K, int N) {
  Data d(4, 150, K, N, 0, 0);
  const int M = d.M, B = d.B;
  auto x = d.rand<T>(size_t(B) * K);  // column-major
  auto w = d.rand<T>(size_t(M) * K * N, 0.2);
  auto dz = d.rand<T>(size_t(B) * N);
  Vec<T> dx(size_t(B) * K, T(NAN));
  g::RowGemmArgs<T, T> p{};
  p.op[0] = {dz.data(), 0, N, 1, w.data(), int64_t(K) * N, /*swk=*/1, /*swn=*/N, /*K=*/N};
  p.nops = 1;
  p.seg = d.seg.data();
  p.perm = d.perm.data();
  p.rows = B;
  p.M = M;
  p.N = K;
  p.y = dx.data();
  p.sor = K;
  p.son = 1;
  emu_stats = EmuStats{};
  g::launch_grouped_row_gemm(p, TC, nullptr);
  const int sec_b = emu_stats.max_sectors[g::kSiteRowB], sec_a = emu_stats.max_sectors[g::kSiteRowA];
  int bad = 0;
  for (int b = 0; b < B; ++b)
    for (int k = 0; k < K; ++k) {
      double v = 0, sc = 0;
      if (d.in(b))
        for (int n = 0; n < N; ++n) {
          const double t = double(dz[size_t(b) * N + n]) * double(w[(size_t(d.s[b]) * K + k) * N + n]);
          v += t, sc += std::abs(t);
        }
      if (!d.in(b) && double(dx[size_t(b) * K + k]) != 0.0) ++bad, ++failures, std::printf("FAIL dx of an out-of-range row\n");
      bad += !check<T>("dx", dx[size_t(b) * K + k], v, sc, long(b) * K + k);
    }
  EXPECT(sec_b <= sector_bound<T>(), "%s: a B-tile warp load (W^T, swk = 1) touches %d sectors > %d", name, sec_b,
         sector_bound<T>());
  EXPECT(sec_a <= sector_bound<T>(), "%s: an A-tile warp load (dz) touches %d sectors > %d", name, sec_a, sector_bound<T>());
  Vec<T> dw(size_t(M) * K * N, T(NAN)), db(size_t(M) * N, T(NAN));
  emu_stats = EmuStats{};
  bad += run_wgrad<T, TC>(d, x, dz, dw.data(), db.data(), g::plan_wgrad(B, M, K, N, true), true);
  const int sec_g = emu_stats.max_sectors[g::kSiteWgradG];
  EXPECT(sec_g <= sector_bound<T>(), "%s: a wgrad G-tile warp load touches %d sectors > %d", name, sec_g, sector_bound<T>());
  g::WgradPlan split;  // a small chunk forces the split schedule on these 150 rows
  split.chunk_rows = 32;
  split.chunks = g::grouped_tiles(B, M, 32, false);
  split.workspace = split.chunks * (int64_t(K) * N + N);
  std::fill(dw.begin(), dw.end(), T(NAN));
  std::fill(db.begin(), db.end(), T(NAN));
  bad += run_wgrad<T, TC>(d, x, dz, dw.data(), db.data(), split, true);
  std::fill(db.begin(), db.end(), T(NAN));
  bad += run_wgrad<T, TC>(d, x, dz, nullptr, db.data(), g::plan_wgrad(B, M, K, N, false), true);
  std::printf("%s %s: backward K=%d N=%d (max sectors per warp load: W^T tile %d, dz tile %d, wgrad G %d)\n",
              bad ? "FAIL" : "ok", name, K, N, sec_b, sec_a, sec_g);
}

void case_gemm() {
  test_forward<float, float, false>("float32 fma", false);
  test_forward<float, float, false>("float32 fma", true);
  test_forward<double, double, false>("float64 fma", false);
  test_forward<double, double, false>("float64 fma", true);
  test_forward<Half, Half, true>("float16 wmma", false);
  test_forward<Half, Half, true>("float16 wmma", true);
  test_forward<BFloat16, BFloat16, true>("bfloat16 wmma", false);
  test_forward<BFloat16, BFloat16, true>("bfloat16 wmma", true);
  test_forward<BFloat16, BFloat16, false>("bfloat16 fma", false);
  test_forward<BFloat16, float, true>("bfloat16 wmma -> float32 z", true);
  test_forward<Half, float, false>("float16 fma -> float32 z", true);
  for (auto [K, N] : {std::pair{70, 100}, std::pair{5, 33}, std::pair{100, 7}}) {
    test_backward<float, false>("float32 fma", K, N);
    test_backward<double, false>("float64 fma", K, N);
    test_backward<Half, true>("float16 wmma", K, N);
    test_backward<BFloat16, true>("bfloat16 wmma", K, N);
    test_backward<BFloat16, false>("bfloat16 fma", K, N);
  }
}

// Zero-sized launches through the real launchers (an emulated launch with a 0 grid dimension aborts).
void case_zero() {
  using T = float;
  Vec<T> x(64, T(1)), w(64, T(1)), bias(8, T(0.5f)), y(64, T(NAN));
  std::vector<int64_t> perm{0, 1, 2}, seg{0, 0, 0};  // M = 2, three rows of out-of-range scenarios
  auto args = [&](int64_t rows, int M, int64_t K, int64_t N) {
    g::RowGemmArgs<T, T> p{};
    p.op[0] = {x.data(), 0, K, 1, w.data(), K * N, N, 1, K};
    p.nops = 1;
    p.rows = rows;
    p.M = M;
    p.N = N;
    p.y = y.data();
    p.som = N;
    p.sor = int64_t(M) * N;
    p.son = 1;
    return p;
  };
  g::launch_dense_row_gemm(args(3, 2, 4, 0), false, nullptr);  // N = 0: mutual_linear's chunk_preact
  g::launch_dense_row_gemm(args(0, 2, 4, 5), false, nullptr);  // no rows
  g::launch_dense_row_gemm(args(3, 0, 4, 5), false, nullptr);  // M = 0
  auto pk = args(3, 2, 0, 4);  // K = 0: z = bias
  pk.bias = bias.data();
  pk.sbm = 4;
  pk.sbn = 1;
  g::launch_dense_row_gemm(pk, false, nullptr);
  for (int i = 0; i < 3 * 2 * 4; ++i) EXPECT(y[i] == T(0.5f), "K = 0: y[%d] = %g, expected the bias 0.5", i, double(y[i]));
  auto pg = args(3, 2, 4, 0);  // grouped, N = 0
  pg.seg = seg.data();
  pg.perm = perm.data();
  g::launch_grouped_row_gemm(pg, false, nullptr);
  auto pb = args(0, 2, 4, 4);  // grouped, B = 0: CTAs that find no tile
  pb.seg = seg.data();
  pb.perm = perm.data();
  g::launch_grouped_row_gemm(pb, false, nullptr);
  std::fill(y.begin(), y.end(), T(NAN));
  std::vector<int64_t> seg0{0};  // M = 0: every row out of range -> zeros
  auto pm = args(3, 0, 4, 4);
  pm.seg = seg0.data();
  pm.perm = perm.data();
  pm.som = 0;
  pm.sor = 4;
  g::launch_grouped_row_gemm(pm, false, nullptr);
  for (int i = 0; i < 12; ++i) EXPECT(y[i] == T(0), "M = 0: y[%d] = %g, expected 0", i, double(y[i]));
  Vec<T> dw(64, T(NAN)), db(8, T(NAN)), ws(1);
  for (auto [B, M, K, N] : {std::array<int, 4>{3, 2, 4, 0}, {3, 0, 4, 4}, {0, 2, 4, 4}, {3, 2, 0, 4}}) {
    g::WgradArgs<T> q{x.data(), K, 1, K, x.data(), N, 1, N, seg.data(), perm.data(), M, K > 0 ? dw.data() : nullptr,
                      db.data()};
    g::launch_wgrad(q, g::plan_wgrad(B, M, K, N, K > 0), ws.data(), false, nullptr);
  }
  for (int i = 0; i < 8; ++i) EXPECT(db[i] == T(0), "wgrad of no rows: db[%d] = %g", i, double(db[i]));
  for (int i = 0; i < 32; ++i) EXPECT(dw[i] == T(0), "wgrad of no rows: dw[%d] = %g", i, double(dw[i]));
  std::printf("%s zero-sized launches\n", failures ? "FAIL" : "ok");
}

// The row split: correctness against float64, bitwise repeatability under two CTA orders, rows per CTA.
template <typename T, bool TC>
void test_split(const char* name, int mode, bool balance) {
  Data d(8, 2048, 40, 72, 0, mode);
  const int M = d.M, B = d.B, K = d.K, N = d.N;
  auto x = d.rand<T>(size_t(B) * K);  // row-major, as the op passes it
  auto dz = d.rand<T>(size_t(B) * N);
  const auto plan = g::plan_wgrad(B, M, K, N, true);
  EXPECT(plan.chunk_rows > 0, "%s: plan_wgrad chose the direct schedule for B = %d, K = %d, N = %d", name, B, K, N);
  Vec<T> dw1(size_t(M) * K * N, T(NAN)), db1(size_t(M) * N, T(NAN)), dw2 = dw1, db2 = db1;
  emu_order.seed(1);
  emu_stats = EmuStats{};
  emu_stats.row_base = reinterpret_cast<std::uintptr_t>(dz.data());
  emu_stats.row_bytes = long(N * sizeof(T));
  int bad = run_wgrad<T, TC>(d, x, dz, dw1.data(), db1.data(), plan, false);
  const auto rows_split = emu_stats.cta_rows;
  emu_order.seed(99);
  bad += run_wgrad<T, TC>(d, x, dz, dw2.data(), db2.data(), plan, false);
  const bool same = std::memcmp(dw1.data(), dw2.data(), dw1.size() * sizeof(T)) == 0 &&
                    std::memcmp(db1.data(), db2.data(), db1.size() * sizeof(T)) == 0;
  EXPECT(same, "%s: dW / db differ bitwise between two CTA orders", name);
  Vec<T> db3(size_t(M) * N, T(NAN));
  bad += run_wgrad<T, TC>(d, x, dz, nullptr, db3.data(), g::plan_wgrad(B, M, K, N, false), false);
  auto ratio = [](const std::vector<long>& r) {
    const double mx = double(*std::max_element(r.begin(), r.end()));
    return mx / (double(std::accumulate(r.begin(), r.end(), 0L)) / double(r.size()));
  };
  std::printf("%s %s: wgrad split (%s mix, chunk %ld rows, %ld chunks), bitwise equal across CTA orders: %s\n",
              bad ? "FAIL" : "ok", name, mode == 1 ? "70%-skewed" : "uniform", long(plan.chunk_rows),
              long(plan.chunks), same ? "yes" : "NO");
  if (!balance) return;
  emu_stats = EmuStats{};
  emu_stats.row_base = reinterpret_cast<std::uintptr_t>(dz.data());
  emu_stats.row_bytes = long(N * sizeof(T));
  bad = run_wgrad<T, TC>(d, x, dz, dw2.data(), db2.data(), g::WgradPlan{}, false);  // direct: one CTA per group
  const auto rows_direct = emu_stats.cta_rows;
  const double rs = ratio(rows_split), rd = ratio(rows_direct);
  std::printf("%s rows per CTA (%s mix, CTAs that read rows): direct max %ld mean %.1f max/mean %.2f over %zu CTAs; "
              "split max %ld mean %.1f max/mean %.2f over %zu CTAs\n", bad ? "FAIL" : "ok",
              mode == 1 ? "70%-skewed" : "uniform", *std::max_element(rows_direct.begin(), rows_direct.end()),
              double(std::accumulate(rows_direct.begin(), rows_direct.end(), 0L)) / rows_direct.size(), rd,
              rows_direct.size(), *std::max_element(rows_split.begin(), rows_split.end()),
              double(std::accumulate(rows_split.begin(), rows_split.end(), 0L)) / rows_split.size(), rs,
              rows_split.size());
  EXPECT(rs <= 1.5, "%s: rows per CTA max / mean = %.2f > 1.5 with the split schedule", name, rs);
}

void case_wgrad() {
  test_split<float, false>("float32 fma", 1, true);
  test_split<float, false>("float32 fma", 2, true);
  test_split<double, false>("float64 fma", 1, false);
  test_split<Half, true>("float16 wmma", 1, false);
  test_split<BFloat16, true>("bfloat16 wmma", 2, false);
  test_split<BFloat16, false>("bfloat16 fma", 1, false);
}

int main(int argc, char** argv) {
  const std::string c = argc > 1 ? argv[1] : "gemm";
  if (c == "gemm") case_gemm();
  else if (c == "zero") case_zero();
  else if (c == "wgrad") case_wgrad();
  else return std::printf("unknown case %s\n", c.c_str()), 2;
  std::printf("%s\n", failures ? "FAILURES" : "ALL OK");
  return failures ? 1 : 0;
}
