// CUDA kernel of the rlhf_fast_C::sample op (the schema is defined by the CPU extension: cpu_sampling.cpp).
// Inputs are validated in Python; these checks guard only the invariants the launcher relies on.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../cuda/sampling.h"
#include "cuda_dtype.h"

namespace rlhf_fast::cuda {
namespace {

void check_row_vector(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), name, " must be on the device of logits (", logits.device(), ")");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous() && t.scalar_type() == dtype, name,
              " must be a contiguous 1-D tensor of ", logits.size(0), " elements of type ", dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_cuda(const at::Tensor& logits,
                                                                      const at::Tensor& uniforms,
                                                                      const at::Tensor& temperature,
                                                                      const at::Tensor& top_k, const at::Tensor& top_p,
                                                                      const at::Tensor& min_p) {
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2 && (logits.stride(1) == 1 || logits.size(1) == 1) && logits.size(1) > 0,
              "logits must be 2-D with a non-empty last dimension of unit stride");
  const DType dtype = dtype_of(logits, "logits");
  check_row_vector(uniforms, logits, at::kFloat, "uniforms");
  check_row_vector(temperature, logits, at::kFloat, "temperature");
  check_row_vector(top_k, logits, at::kLong, "top_k");
  check_row_vector(top_p, logits, at::kFloat, "top_p");
  check_row_vector(min_p, logits, at::kFloat, "min_p");
  const int64_t n_rows = logits.size(0);
  const auto float_options = logits.options().dtype(at::kFloat);
  at::Tensor tokens = at::empty({n_rows}, logits.options().dtype(at::kLong));
  at::Tensor logp = at::empty({n_rows}, float_options), filtered = at::empty({n_rows}, float_options);
  at::Tensor threshold = at::empty({n_rows}, float_options);
  if (n_rows == 0) return {tokens, logp, filtered, threshold};
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaError_t err =
      sample(logits.const_data_ptr(), dtype, n_rows, logits.size(1), logits.stride(0), uniforms.const_data_ptr<float>(),
             temperature.const_data_ptr<float>(), top_k.const_data_ptr<int64_t>(), top_p.const_data_ptr<float>(),
             min_p.const_data_ptr<float>(), tokens.data_ptr<int64_t>(), logp.data_ptr<float>(),
             filtered.data_ptr<float>(), threshold.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sample CUDA kernel: ", cudaGetErrorString(err));
  return {tokens, logp, filtered, threshold};
}

}  // namespace
}  // namespace rlhf_fast::cuda

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) { m.impl("sample", &rlhf_fast::cuda::sample_cuda); }
