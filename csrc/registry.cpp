// All C++ operator schemas of saml_kernels, in the torch.ops.saml_C namespace.
// Kernels register themselves per device in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL).
// The public, autograd-aware ops live in Python (saml_kernels/ops/<op>.py) and call these.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(saml_C, m) {
  // ---- scenario_embedding_bag (see saml_kernels/ops/scenario_embedding_bag.py for the contract) ----
  // Fused gather of the global and scenario tables. Returns (global_out, scenario_out, bad_count[1] int64).
  // Invalid ids (outside their feature's rows) read as zero vectors and are counted when check=True.
  // CPU with check=True also validates offsets (offsets[0] = 0, offsets[-1] = nnz, non-decreasing, every bag
  // bag_len long for pooling none) and scenario ids (in [0, M)); if any fails it gathers nothing, leaves the
  // outputs undefined and returns bad_count = -1 (the Python op then names the bad entry).
  // Layout: feature f owns global rows [feature_rows[f], feature_rows[f+1]) (Rg_f = its ids) and, when aware, scenario
  // rows [feature_scenario_rows[f], feature_scenario_rows[f+1]) (Rs_f, 1 <= Rs_f <= Rg_f) of every scenario table.
  // A valid id's scenario row is scenario[b] * Rs + feature_scenario_rows[f] + local(id), local(id) = id when
  // Rs_f == Rg_f, else seb_id_hash(id) mod Rs_f (hashed scenario tables; saml_common.h: seb_id_hash(id) =
  // mix(mix(lo32(id)) ^ hi32(id)), mix = murmur3's fmix32). Every kernel below (forward, backward rows / dense /
  // fused update) uses that row: colliding ids share a scenario row, its gradient and its one update per step.
  // num_aware = Fs (the number of aware features, which sizes scenario_out); -1 = derive it from aware_slot,
  // which is a host read on CUDA (the public op always passes it: no sync).
  // per_sample_weights (w [nnz] or None), contract of every seb_* kernel below: with pooling sum a bag is
  // sum_i w_i row_i, its rows' gradients carry w_i, and grad_psw_i = <dOut_g[bag], G[row_i]> + <dOut_s[bag],
  // S[srow_i]> (the second term for aware features; 0 for an invalid id). With pooling mean every backend computes
  // the forward (1/len) sum_i w_i row_i and row gradients w_i / len, but grad_psw is NOT specified: the CPU kernel
  // and the reference return the un-divided dot product above (not divided by the bag length), the CUDA and Triton
  // kernels divide it by the bag length. The public ops accept per_sample_weights with pooling "sum" only and
  // raise a ValueError otherwise (ops/scenario_embedding_bag.py check_bag_layout; tests/test_bad_input_ops.py and
  // tests/test_bad_input.py, case psw-with-mean), so no public result depends on it: a direct caller of these
  // operators must pass per_sample_weights with pooling sum only.
  m.def(
      "seb_forward(Tensor indices, Tensor offsets, Tensor scenario, Tensor global_weight, "
      "Tensor scenario_weight, Tensor feature_rows, Tensor feature_scenario_rows, Tensor aware_slot, "
      "Tensor? per_sample_weights, int pooling, int bag_len, bool check, int num_aware=-1) "
      "-> (Tensor, Tensor, Tensor)");
  // Backward as deduplicated rows: (global_rows int64 [U] sorted, global_vals [U, D],
  // scenario_rows int64 [Us] sorted, flattened as m * Rs + r, scenario_vals [Us, D], grad_psw [nnz] or empty).
  // Deterministic: sort + segment reduce, no atomics.
  m.def(
      "seb_backward_rows(Tensor grad_global, Tensor grad_scenario, Tensor indices, Tensor offsets, "
      "Tensor scenario, Tensor global_weight, Tensor scenario_weight, Tensor feature_rows, "
      "Tensor feature_scenario_rows, Tensor aware_slot, Tensor? per_sample_weights, int pooling, "
      "int bag_len, bool need_psw_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Dense gradients (dG [R, D], dS [M, Rs, D], grad_psw [nnz] or empty) with no host read (CUDA; the other
  // backends build them from seb_backward_rows). Same math as seb_backward_rows.
  m.def(
      "seb_backward_dense(Tensor grad_global, Tensor grad_scenario, Tensor indices, Tensor offsets, "
      "Tensor scenario, Tensor global_weight, Tensor scenario_weight, Tensor feature_rows, "
      "Tensor feature_scenario_rows, Tensor aware_slot, Tensor? per_sample_weights, int pooling, "
      "int bag_len, bool need_psw_grad) -> (Tensor, Tensor, Tensor)");
  // Fused optimizer in the backward (FBGEMM style): applies the update to the touched rows in place and
  // materialises no gradient. optimizer (saml::FusedOptimizer): 1 = SGD, 2 = row-wise Adagrad; with g the row's summed gradient,
  // g' = g + weight_decay * w, SGD w -= lr * g', Adagrad state[row] += mean_d(g'^2), w -= lr * g' / (sqrt(state[row])
  // + eps); states are float32 [R] and [M * Rs]. hparams: float64 [7] on the weights' device = [lr, eps,
  // weight_decay, apply, stochastic_rounding, seed, step], read by the kernel (apply == 0 skips the whole update: no
  // weight or state changes; stochastic_rounding != 0 stores 16-bit rows with saml::sr_round, hashed on seed, step,
  // table (0 global, 1 scenario), row and column; the caller advances step).
  // update_global / update_scenario = false leaves that table and its state untouched (a frozen table).
  m.def(
      "seb_backward_update_(Tensor grad_global, Tensor grad_scenario, Tensor indices, Tensor offsets, "
      "Tensor scenario, Tensor(a!) global_weight, Tensor(b!) scenario_weight, Tensor feature_rows, "
      "Tensor feature_scenario_rows, Tensor aware_slot, Tensor? per_sample_weights, int pooling, int bag_len, "
      "Tensor(c!)? global_state, Tensor(d!)? scenario_state, int optimizer, Tensor hparams, bool update_global, "
      "bool update_scenario) -> ()");

  // ---- scenario_embedding_bag_8bit (saml_kernels/ops/scenario_embedding_bag_8bit.py; CPU only) ----
  // seb_forward on 8-bit row-wise tables (inference: no backward): global_packed [R, D + 8] and scenario_packed
  // [M, Rs, D + 8] uint8, every row [q_0 .. q_{D-1} | scale float32 | bias float32] (FBGEMM's fused 8-bit row-wise
  // layout, the floats unaligned when D % 4 != 0) read as v_d = scale * q_d + bias. Everything else is seb_forward's
  // contract above: the same bags, rows (hashed scenario rows included), pooling codes, per_sample_weights (any
  // float dtype, used as float32), num_aware, and check (with check=True: offsets and scenario ids validated first,
  // bad_count = -1 and outputs undefined if they fail, else the number of invalid ids; check=False: bad_count = 0).
  // Invalid ids read as zero vectors (counted in a mean's length); a sample whose scenario is outside [0, M) reads
  // zero scenario rows (only reachable with check=False). Returns (global_out, scenario_out, bad_count[1] int64),
  // outputs float32 [B, F, D] / [B, Fs, D] ([B, F, bag_len, D] / [B, Fs, bag_len, D] for pooling none), float32
  // accumulation (FBGEMM's 8-bit EmbeddingSpMDM where the build has it), bitwise the same for any thread count.
  m.def(
      "seb_forward_8bit(Tensor indices, Tensor offsets, Tensor scenario, Tensor global_packed, "
      "Tensor scenario_packed, Tensor feature_rows, Tensor feature_scenario_rows, Tensor aware_slot, "
      "Tensor? per_sample_weights, int pooling, int bag_len, bool check, int num_aware=-1) "
      "-> (Tensor, Tensor, Tensor)");

  // The hashed-row map itself (the CPU build of saml::seb_scenario_local on int32/int64 ids, for tests of the
  // twins): local(id) of every id for a feature of rows ids and scenario_rows scenario rows, int64.
  m.def("seb_scenario_local(Tensor ids, int rows, int scenario_rows) -> Tensor");

  // ---- mbranch_linear / mutual_unit / mutual_linear (saml_kernels/ops/mbranch_linear.py, mutual_*.py) ----
  // activation codes (saml::Activation, include/saml_common.h; saml_kernels/_codes.py): 0 none, 1 relu,
  //   2 leaky_relu (slope kLeakyReluSlope = 0.01), 3 gelu (exact, erf), 4 silu.
  // similarity codes (saml::Similarity): 0 cosine (<a,b> / (max(|a|,1e-8) * max(|b|,1e-8))), 1 dot (<a,b> / sqrt(N)).
  // Every GEMM accumulates in float32; outputs have the input dtype.
  // Unchecked input (the public ops check the range unless check_scenario=False; docs/design.md section 5): a row
  //   whose scenario is outside [0, M) gives zero output rows (own route y and z; mutual out and attn), zero row
  //   gradients (dx, daux, dh_own, dz_own) and no term in dW / db / dWa, on every backend, without a host sync.
  //
  // Own route (grouped GEMM by scenario, rows in any order, no host sync):
  //   y[b] = act(z[b]),  z[b] = x[b] @ W[s_b] + aux[b] @ Wa[s_b] + bias[s_b]
  //   x [B,K], weight [M,K,N], bias [M,N]?, aux [B,Ka]?, aux_weight [M,Ka,N]?, scenario [B] int32/int64.
  //   Returns (y [B,N], z [B,N] when activation is gelu/silu (needed by the backward), else an empty tensor).
  m.def(
      "mbl_grouped_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? aux, Tensor? aux_weight, "
      "Tensor scenario, int activation) -> (Tensor, Tensor)");
  // All route: y[m,b] = act(x[b] @ W[m] + aux[b] @ Wa[m] + bias[m]); x [B,K] shared or [M,B,K] per branch.
  //   Returns (y [M,B,N], z [M,B,N] or empty as above).
  m.def(
      "mbl_all_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? aux, Tensor? aux_weight, int activation) "
      "-> (Tensor, Tensor)");
  // Grouped backward (own rows only), given dz = dL/dz [B,N] (activation already applied by the caller):
  //   dW[m] = X_m^T dZ_m, db[m] = sum dZ_m, dWa[m] = Aux_m^T dZ_m over the rows of scenario m (no rows: 0);
  //   deterministic (a fixed reduction order that depends on the shapes only);
  //   dx[b] = dz[b] @ W[s_b]^T, daux[b] = dz[b] @ Wa[s_b]^T. Outputs not needed are returned empty.
  //   Returns (dx [B,K], dW [M,K,N] float32-accumulated in weight dtype, db [M,N], daux [B,Ka], dWa [M,Ka,N]).
  m.def(
      "mbl_grouped_backward(Tensor dz, Tensor x, Tensor weight, Tensor? aux, Tensor? aux_weight, Tensor scenario, "
      "bool need_dx, bool need_dweight, bool need_dbias, bool need_daux, bool need_daux_weight) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Optional fused variant (CPU; a backend without it gets the unfused path): the own-rows backward with the
  //   activation backward and the own-row pick folded into the row gather. dy [B,N] or [M,B,N] (row b read at
  //   (s_b, b); any strides with stride(-1) == 1); saved: y for relu/leaky_relu (dy's shape, or [M,B,N] for a [B,N]
  //   dy: row b read at (s_b, b)), else empty;
  //   activation in {0 none, 1 relu, 2 leaky_relu} (for gelu/silu the caller passes dz and 0). x [B,K] or
  //   [M,B,K] (row b at (s_b, b); dx then [M,B,K], zero off the own rows). Otherwise as mbl_grouped_backward.
  m.def(
      "mbl_grouped_backward_act(Tensor dy, Tensor saved, Tensor x, Tensor weight, Tensor? aux, Tensor? aux_weight, "
      "Tensor scenario, int activation, bool need_dx, bool need_dweight, bool need_dbias, bool need_daux, "
      "bool need_daux_weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Mutual unit on h [M,B,N] (any strides on dims 0, 1 with stride(2) == 1, e.g. the all-route view of [B,M,N]):
  //   own = h[s_b, b]; sim[m] = similarity(own, h[m, b]);
  //   a = softmax(sim / temperature) over m; out[b] = sum_m a[m] h[m, b].
  //   Returns (out [B,N], attn [B,M] float32).
  m.def("mutual_forward(Tensor h, Tensor scenario, float temperature, int similarity) -> (Tensor, Tensor)");
  // Backward with the other branches stop-gradient for each sample: only dh[s_b, b] is non-zero. attn is the
  //   forward's output; a kernel may recompute it instead (the CPU kernel does, for float64-exact gradients).
  //   Returns dh_own [B,N] (the gradient w.r.t. own = h[s_b, b]); the caller scatters it.
  m.def(
      "mutual_backward(Tensor grad_out, Tensor h, Tensor scenario, Tensor attn, float temperature, int similarity) "
      "-> Tensor");
  // Fused mutual_linear forward: h[m,b] = act(x[b] @ W[m] + aux[b] @ Wa[m] + bias[m]) for all m, mixed by the
  //   mutual unit, without writing h [M,B,N] to memory. Returns (out [B,N], attn [B,M] float32).
  m.def(
      "mutual_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? aux, Tensor? aux_weight, "
      "Tensor scenario, int activation, float temperature, int similarity) -> (Tensor, Tensor)");
  // Fused mutual_linear backward, recompute variant: recomputes h[m,b] for all
  //   m block by block (never [M,B,N] in memory), runs the mutual backward (attn as in mutual_backward) and the
  //   own branch's activation derivative. Returns dz_own [B,N] (x dtype) = dL/dz[s_b, b]; the caller passes it
  //   to mbl_grouped_backward for dx, dW, db, daux, dWa.
  m.def(
      "mutual_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? aux, "
      "Tensor? aux_weight, Tensor scenario, Tensor attn, int activation, float temperature, int similarity) "
      "-> Tensor");

  // ---- partitioned_norm (saml_kernels/ops/partitioned_norm.py): STAR's scenario-wise batch normalisation ----
  // x [B, N] contiguous, rows of any scenarios in any order, scenario [B] int32/int64 in [0, M). "acc" is float32
  // (float64 for float64 x). Segmented sums over fixed row blocks, added in order (deterministic).
  // Statistics per scenario: mean, biased var [M, N] acc; count [M] int64; 0 for a scenario with no rows.
  m.def("pn_stats(Tensor x, Tensor scenario, int num_scenarios) -> (Tensor, Tensor, Tensor)");
  // y[b] = (x[b] - mean[s_b]) * rstd[s_b] * scale[s_b] + shift[s_b]; mean, rstd [M, N] acc; scale, shift [M, N]
  //   in x's dtype. Returns y [B, N] in x's dtype.
  m.def("pn_forward(Tensor x, Tensor scenario, Tensor mean, Tensor rstd, Tensor scale, Tensor shift) -> Tensor");
  // With xhat = (x - mean[s]) rstd[s]: dscale[m] = sum dy xhat, dshift[m] = sum dy over the rows of m;
  //   dx = scale[s] rstd[s] (dy - (dshift[s] + xhat dscale[s]) / max(count[s], 1)) when batch_stats (mean and rstd
  //   are the batch's), scale[s] rstd[s] dy otherwise. Returns (dx [B, N] x dtype, dscale, dshift [M, N] in scale's
  //   dtype).
  m.def(
      "pn_backward(Tensor dy, Tensor x, Tensor scenario, Tensor mean, Tensor rstd, Tensor scale, Tensor count, "
      "bool batch_stats) -> (Tensor, Tensor, Tensor)");
}

static bool built_with_cuda() { return SAML_WITH_CUDA != 0; }

static std::string cuda_archs() {
#ifdef SAML_CUDA_ARCHS
  return SAML_CUDA_ARCHS;
#else
  return SAML_WITH_CUDA ? "see TORCH_CUDA_ARCH_LIST at build time" : "";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "saml_kernels C++/CUDA kernels; operators are in torch.ops.saml_C";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in");
  m.def("cuda_archs", &cuda_archs, "The CUDA architectures the kernels were compiled for");
}
