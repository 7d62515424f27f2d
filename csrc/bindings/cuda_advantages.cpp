// CUDA kernels of the compiled advantage ops (schemas in cpu_advantages.cpp, loaded first with rlhf_fast._C).
// Inputs are validated in Python; these checks guard only the invariants the launchers rely on.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../cuda/advantages.h"

namespace rlhf_fast::cuda {
namespace {

ScanDType scan_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScanDType::Float32;
    case at::kBFloat16:
      return ScanDType::BFloat16;
    case at::kHalf:
      return ScanDType::Float16;
    default:
      TORCH_CHECK(false, "rewards must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

StridedRows strided_rows(const at::Tensor& t, const at::Tensor& rewards, const char* name) {
  TORCH_CHECK(t.device() == rewards.device(), name, " must be on the device of rewards (", rewards.device(), ")");
  TORCH_CHECK(t.sizes() == rewards.sizes(), name, " must have the shape of rewards ", rewards.sizes());
  return {t.const_data_ptr(), t.stride(0), t.stride(1)};
}

void check_inputs(const at::Tensor& rewards, const at::Tensor& mask) {
  TORCH_CHECK(rewards.is_cuda(), "rewards must be a CUDA tensor");
  TORCH_CHECK(rewards.dim() == 2, "rewards must be 2-D [B, T], got ", rewards.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
}

const float* seq_factor(const std::optional<at::Tensor>& x, const at::Tensor& rewards, const char* name) {
  if (!x) return nullptr;
  TORCH_CHECK(x->device() == rewards.device() && x->scalar_type() == at::kFloat && x->dim() == 1 &&
                  x->size(0) == rewards.size(0) && x->is_contiguous(),
              name, " must be a contiguous float32 tensor of shape [", rewards.size(0), "] on ", rewards.device());
  return x->const_data_ptr<float>();
}

ScanAlgorithm scan_algorithm(int64_t algorithm) {
  TORCH_CHECK(algorithm >= 0 && algorithm <= 3, "algorithm must be 0 (auto), 1 (thread per sequence), 2 (warp scan)"
              " or 3 (chunked scan), got ", algorithm);
  return static_cast<ScanAlgorithm>(algorithm);
}

// The launchers' scratch memory (chunked scan only), from the caching allocator.
at::Tensor workspace(const at::Tensor& rewards, ScanAlgorithm algorithm) {
  const size_t bytes = scan_workspace_bytes(rewards.size(0), rewards.size(1), algorithm);
  return at::empty({static_cast<int64_t>(bytes)}, rewards.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> gae_fwd_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                const at::Tensor& mask, const std::optional<at::Tensor>& gamma_seq,
                                                const std::optional<at::Tensor>& lam_seq, double gamma, double lam,
                                                int64_t algorithm) {
  check_inputs(rewards, mask);
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "values must have the dtype of rewards");
  const StridedRows r = strided_rows(rewards, rewards, "rewards"), v = strided_rows(values, rewards, "values"),
                    m = strided_rows(mask, rewards, "mask");
  const float* g = seq_factor(gamma_seq, rewards, "gamma_seq");
  const float* l = seq_factor(lam_seq, rewards, "lam_seq");
  const ScanAlgorithm algo = scan_algorithm(algorithm);
  at::Tensor adv = at::empty({rewards.size(0), rewards.size(1)}, rewards.options().dtype(at::kFloat));
  at::Tensor ret = at::empty({rewards.size(0), rewards.size(1)}, rewards.options().dtype(at::kFloat));
  if (adv.numel() == 0) return {adv, ret};
  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor scratch = workspace(rewards, algo);
  const cudaError_t err = gae_fwd(r, v, scan_dtype(rewards), m, rewards.size(0), rewards.size(1), g, l,
                                  static_cast<float>(gamma), static_cast<float>(lam), algo, scratch.data_ptr(),
                                  adv.data_ptr<float>(), ret.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gae_fwd CUDA kernel: ", cudaGetErrorString(err));
  return {adv, ret};
}

at::Tensor discounted_returns_fwd_cuda(const at::Tensor& rewards, const at::Tensor& mask,
                                       const std::optional<at::Tensor>& gamma_seq, double gamma, int64_t algorithm) {
  check_inputs(rewards, mask);
  const StridedRows r = strided_rows(rewards, rewards, "rewards"), m = strided_rows(mask, rewards, "mask");
  const float* g = seq_factor(gamma_seq, rewards, "gamma_seq");
  const ScanAlgorithm algo = scan_algorithm(algorithm);
  at::Tensor ret = at::empty({rewards.size(0), rewards.size(1)}, rewards.options().dtype(at::kFloat));
  if (ret.numel() == 0) return ret;
  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor scratch = workspace(rewards, algo);
  const cudaError_t err = discounted_returns_fwd(r, scan_dtype(rewards), m, rewards.size(0), rewards.size(1), g,
                                                 static_cast<float>(gamma), algo, scratch.data_ptr(),
                                                 ret.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "discounted_returns_fwd CUDA kernel: ", cudaGetErrorString(err));
  return ret;
}

}  // namespace
}  // namespace rlhf_fast::cuda

TORCH_LIBRARY_IMPL(rlhf_fast_C, CUDA, m) {
  m.impl("gae_fwd", &rlhf_fast::cuda::gae_fwd_cuda);
  m.impl("discounted_returns_fwd", &rlhf_fast::cuda::discounted_returns_fwd_cuda);
}
