// CPU kernels of the standalone PPO losses (policy and value): one pass over the tokens forward (the aggregated
// loss and the diagnostics) and one backward (the gradient w.r.t. the first input). Inputs are validated in Python
// (see rlhf_fast/ops/ppo_loss.py for the formulas); these check only invariants.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlhf_fast::cpu {

// logp, old_logp, advantages: [B, T] (padded) or [N] (packed), float32/bf16/fp16 (mixed dtypes run in float32);
// mask: same shape, bool; seq_ids: int64 [N], the sequence of each packed token (used by agg seq-mean-token-sum /
// seq-mean-token-mean; without it each row of the last dimension is a sequence).
// -> (loss: 0-d float32; stats: float32 [5] = clip_frac, dual_clip_frac, approx_kl, ratio_mean, ratio_max).
std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd_cpu(const at::Tensor& logp, const at::Tensor& old_logp,
                                                           const at::Tensor& advantages, const at::Tensor& mask,
                                                           const std::optional<at::Tensor>& seq_ids, double clip_low,
                                                           double clip_high, std::optional<double> dual_clip,
                                                           c10::string_view agg);

// grad_loss: 0-d float32 -> grad_loss * d loss / d logp, contiguous, logp's dtype and shape.
at::Tensor ppo_policy_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                   const at::Tensor& advantages, const at::Tensor& mask,
                                   const std::optional<at::Tensor>& seq_ids, double clip_low, double clip_high,
                                   std::optional<double> dual_clip, c10::string_view agg);

// values, old_values, returns: [B, T] or [N]; clip absent: the unclipped 0.5 (v - R)^2.
// -> (loss: 0-d float32; stats: float32 [1] = clip_frac).
std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                          const at::Tensor& returns, const at::Tensor& mask,
                                                          const std::optional<at::Tensor>& seq_ids,
                                                          std::optional<double> clip, c10::string_view agg);

// -> grad_loss * d loss / d values, contiguous, values' dtype and shape.
at::Tensor ppo_value_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& values, const at::Tensor& old_values,
                                  const at::Tensor& returns, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& seq_ids, std::optional<double> clip,
                                  c10::string_view agg);

}  // namespace rlhf_fast::cpu
