// CPU kernels of the standalone PPO losses (policy and value): one pass over the tokens forward (the weighted loss
// sum_t w_t l_t and the diagnostics) and one backward (the gradient w.r.t. the first input). Inputs are validated in
// Python (see rlhf_fast/ops/ppo_loss.py and docs/formulas.md for the formulas); these check only invariants.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlhf_fast::cpu {

// logp, old_logp, advantages: [B, T] (padded) or [N] (packed), float32/bf16/fp16 (mixed dtypes run in float32);
// weights: same shape, float32, the per-token loss weights (0 = masked: contributes 0, gets 0 gradient).
// -> (loss: 0-d float32; stats: float32 [5] = clip_frac, dual_clip_frac, approx_kl, ratio_mean, ratio_max, means
// over the tokens with w != 0).
std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd_cpu(const at::Tensor& logp, const at::Tensor& old_logp,
                                                           const at::Tensor& advantages, const at::Tensor& weights,
                                                           double clip_low, double clip_high,
                                                           std::optional<double> dual_clip);

// grad_loss: 0-d float32 -> grad_loss * w * d loss / d logp, contiguous, logp's dtype and shape.
at::Tensor ppo_policy_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                   const at::Tensor& advantages, const at::Tensor& weights, double clip_low,
                                   double clip_high, std::optional<double> dual_clip);

// values, old_values, returns: [B, T] or [N]; clip absent: the unclipped 0.5 (v - R)^2.
// -> (loss: 0-d float32; stats: float32 [1] = clip_frac).
std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                          const at::Tensor& returns, const at::Tensor& weights,
                                                          std::optional<double> clip);

// -> grad_loss * w * d loss / d values, contiguous, values' dtype and shape.
at::Tensor ppo_value_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& values, const at::Tensor& old_values,
                                  const at::Tensor& returns, const at::Tensor& weights, std::optional<double> clip);

}  // namespace rlhf_fast::cpu
