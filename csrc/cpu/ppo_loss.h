// CPU kernels of the standalone PPO losses (policy and value): one fused pass computes the aggregated loss, the
// diagnostics and the gradient of the loss w.r.t. the first input. Inputs are validated in Python (see
// rlhf_fast/ops/ppo_loss.py for the formulas); these check only invariants.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace rlhf_fast::cpu {

// logp, old_logp, advantages: [B, T] (padded) or [N] (packed), float32/bf16/fp16; mask: same shape, bool;
// seq_ids: int64 [N], the sequence of each packed token (needed by agg seq-mean-token-sum/-mean on [N] input).
// -> (loss: 0-d float32; stats: float32 [5] = clip_frac, dual_clip_frac, approx_kl, ratio_mean, ratio_max;
//     grad: float32 of the input's shape, d loss / d logp, or an empty [0] tensor when need_grad is false).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd_cpu(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& seq_ids, double clip_low, double clip_high, std::optional<double> dual_clip,
    c10::string_view agg, bool need_grad);

// values, old_values, returns: [B, T] or [N]; clip absent: the unclipped 0.5 (v - R)^2.
// -> (loss: 0-d float32; stats: float32 [1] = clip_frac; grad: d loss / d values, float32, or [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
    const std::optional<at::Tensor>& seq_ids, std::optional<double> clip, c10::string_view agg, bool need_grad);

}  // namespace rlhf_fast::cpu
