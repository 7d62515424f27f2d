// CUDA kernels of the rlhf_fast_C ops (the schemas are defined by the CPU extension, rlhf_fast._C, loaded first).
// Inputs are validated in Python; these checks guard only the invariants the launchers rely on.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../cuda/logprobs.h"
#include "cuda_dtype.h"

namespace rlhf_fast::cuda {
namespace {

void check_logits(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "logits must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, "logits must be 2-D with unit stride in the last dimension");
}

void check_vector(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), name, " must be on the device of logits (", logits.device(), ")");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous() && t.scalar_type() == dtype, name,
              " must be a contiguous 1-D tensor of ", logits.size(0), " elements of type ", dtype);
}

const int64_t* labels_ptr(const std::optional<at::Tensor>& labels, const at::Tensor& logits) {
  if (!labels) return nullptr;
  check_vector(*labels, logits, at::kLong, "labels");
  return labels->const_data_ptr<int64_t>();
}

const float* optional_vector(const std::optional<at::Tensor>& t, const at::Tensor& logits, const char* name) {
  if (!t) return nullptr;
  check_vector(*t, logits, at::kFloat, name);
  return t->const_data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& kept_threshold,
    double temperature, int64_t ignore_index, bool compute_entropy) {
  check_logits(logits);
  const DType dtype = dtype_of(logits, "logits");
  const int64_t* label_data = labels_ptr(labels, logits);
  const float* threshold_data = optional_vector(kept_threshold, logits, "kept_threshold");
  const auto options = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({logits.size(0)}, options), entropy = at::empty({logits.size(0)}, options),
             lse = at::empty({logits.size(0)}, options),
             lse_kept = at::empty({kept_threshold ? logits.size(0) : 0}, options);
  if (logits.size(0) == 0) return {logp, entropy, lse, lse_kept};
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaError_t err = logprobs_fwd(logits.const_data_ptr(), dtype, logits.size(0), logits.size(1),
                                       logits.stride(0), label_data, threshold_data, static_cast<float>(temperature),
                                       ignore_index, compute_entropy, logp.data_ptr<float>(), entropy.data_ptr<float>(),
                                       lse.data_ptr<float>(), kept_threshold ? lse_kept.data_ptr<float>() : nullptr,
                                       c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "logprobs_fwd CUDA kernel: ", cudaGetErrorString(err));
  return {logp, entropy, lse, lse_kept};
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& grad_lse,
                             const std::optional<at::Tensor>& grad_lse_kept, const at::Tensor& logits,
                             const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& kept_threshold,
                             const at::Tensor& lse, const std::optional<at::Tensor>& lse_kept,
                             const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  check_logits(logits);
  const DType dtype = dtype_of(logits, "logits");
  for (const auto& [t, name] : {std::pair{&grad_logp, "grad_logp"}, {&grad_entropy, "grad_entropy"},
                                {&grad_lse, "grad_lse"}, {&lse, "lse"}, {&entropy, "entropy"}}) {
    check_vector(*t, logits, at::kFloat, name);
  }
  const bool kept = kept_threshold.has_value();
  TORCH_CHECK(kept == grad_lse_kept.has_value() && kept == lse_kept.has_value(),
              "kept_threshold, grad_lse_kept and lse_kept must be given together");
  const int64_t* label_data = labels_ptr(labels, logits);
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  if (logits.size(0) == 0) return grad;
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaError_t err = logprobs_bwd(
      grad_logp.const_data_ptr<float>(), grad_entropy.const_data_ptr<float>(), grad_lse.const_data_ptr<float>(),
      optional_vector(grad_lse_kept, logits, "grad_lse_kept"), logits.const_data_ptr(), dtype, logits.size(0),
      logits.size(1), logits.stride(0), label_data, optional_vector(kept_threshold, logits, "kept_threshold"),
      lse.const_data_ptr<float>(), optional_vector(lse_kept, logits, "lse_kept"), entropy.const_data_ptr<float>(),
      static_cast<float>(temperature), ignore_index, grad.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "logprobs_bwd CUDA kernel: ", cudaGetErrorString(err));
  return grad;
}

}  // namespace
}  // namespace rlhf_fast::cuda

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) {
  m.impl("logprobs_fwd", &rlhf_fast::cuda::logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &rlhf_fast::cuda::logprobs_bwd_cuda);
}

// Importing rlhf_fast._C_cuda loads this library, which registers the kernels above; the module itself is empty.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "rlhf_fast compiled CUDA kernels"; }
