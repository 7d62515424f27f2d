// CPU kernels of the advantage ops (GAE, discounted returns). Inputs are validated in Python; these check only
// invariants.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlhf_fast::cpu {

// rewards, values: [B, T] float32/bf16/fp16 (one dtype, any strides); mask: [B, T] bool (any strides);
// gamma_seq, lam_seq: contiguous float32 [B] per-sequence factors, or absent to use the scalars gamma, lam.
// -> (advantages, returns), contiguous float32 [B, T] each. `algorithm` selects a CUDA kernel; ignored here.
std::tuple<at::Tensor, at::Tensor> gae_fwd_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, const std::optional<at::Tensor>& gamma_seq,
                                               const std::optional<at::Tensor>& lam_seq, double gamma, double lam,
                                               int64_t algorithm);

// rewards [B, T], mask [B, T] bool, gamma_seq float32 [B] or absent -> returns, contiguous float32 [B, T].
at::Tensor discounted_returns_fwd_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                                      const std::optional<at::Tensor>& gamma_seq, double gamma, int64_t algorithm);

}  // namespace rlhf_fast::cpu
