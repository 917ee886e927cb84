// All C++ operator schemas of saml_kernels, in the torch.ops.saml_C namespace.
// Kernels register themselves per device in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL).
// The public, autograd-aware ops live in Python (saml_kernels/ops/<op>.py) and call these.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(saml_C, m) {
  // ---- scenario_embedding_bag (see saml_kernels/ops/scenario_embedding_bag.py for the contract) ----
  // Fused gather of the global and scenario tables. Returns (global_out, scenario_out, bad_count[1] int64).
  // Invalid ids (outside their feature's rows) read as zero vectors and are counted when check=True.
  m.def(
      "seb_forward(Tensor indices, Tensor offsets, Tensor scenario, Tensor global_weight, "
      "Tensor scenario_weight, Tensor feature_rows, Tensor feature_scenario_rows, Tensor aware_slot, "
      "Tensor? per_sample_weights, int pooling, int bag_len, bool check) -> (Tensor, Tensor, Tensor)");
  // Backward as deduplicated rows: (global_rows int64 [U] sorted, global_vals [U, D],
  // scenario_rows int64 [Us] sorted, flattened as m * Rs + r, scenario_vals [Us, D], grad_psw [nnz] or empty).
  // Deterministic: sort + segment reduce, no atomics.
  m.def(
      "seb_backward_rows(Tensor grad_global, Tensor grad_scenario, Tensor indices, Tensor offsets, "
      "Tensor scenario, Tensor global_weight, Tensor scenario_weight, Tensor feature_rows, "
      "Tensor feature_scenario_rows, Tensor aware_slot, Tensor? per_sample_weights, int pooling, "
      "int bag_len, bool need_psw_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- mbranch_linear / mutual_unit / mutual_linear: schemas added by their issue ----
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
