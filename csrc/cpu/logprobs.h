// CPU kernels of the log-prob / entropy / KL ops. Inputs are validated in Python; these check only invariants.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlhf_fast::cpu {

// logits [N, V] (unit stride in V), kept_threshold float32 [N] or none -> (logp, entropy, lse, lse_kept), each
// float32 [N]; lse_kept is [0] without kept_threshold, and with it logp = z_y - lse_kept.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& kept_threshold,
    double temperature, int64_t ignore_index, bool compute_entropy);
// -> grad_logits [N, V] in the dtype of logits. grad_lse_kept, kept_threshold, lse_kept: all three or none.
at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& grad_lse,
                            const std::optional<at::Tensor>& grad_lse_kept, const at::Tensor& logits,
                            const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& kept_threshold,
                            const at::Tensor& lse, const std::optional<at::Tensor>& lse_kept,
                            const at::Tensor& entropy, double temperature, int64_t ignore_index);
// The same gradient written into ``grad`` (contiguous, the shape and dtype of logits), which may be logits itself:
// each row is read before it is overwritten, so a caller done with the logits reuses their memory.
void logprobs_bwd_into_cpu(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& grad_lse,
                           const std::optional<at::Tensor>& grad_lse_kept, const at::Tensor& logits,
                           const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& kept_threshold,
                           const at::Tensor& lse, const std::optional<at::Tensor>& lse_kept, const at::Tensor& entropy,
                           double temperature, int64_t ignore_index, const at::Tensor& grad);
// -> (kl, max_p, max_q, log_s_p, mean_d), each float32 [N]: KL(p || q) and the state its backward needs (see
// logprobs.cpp: the raw row maxima of logits and ref_logits, log sum e^((x - max_p) / T), and sum p (dz - dw)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_div_fwd_cpu(const at::Tensor& logits,
                                                                                     const at::Tensor& ref_logits,
                                                                                     double temperature);
// -> grad_logits [N, V] in the dtype of logits.
at::Tensor kl_div_bwd_cpu(const at::Tensor& grad_kl, const at::Tensor& logits, const at::Tensor& ref_logits,
                          const at::Tensor& max_p, const at::Tensor& max_q, const at::Tensor& log_s_p,
                          const at::Tensor& mean_d, double temperature);

}  // namespace rlhf_fast::cpu
