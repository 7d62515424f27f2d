// CPU kernel of the batched sampler. Inputs are validated in Python; this checks only the invariants it relies on.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace rlhf_fast::cpu {

// logits [B, V] (unit stride in V, any row stride, 0 included) float32/bf16/fp16; uniforms float32 [B] in [0, 1);
// temperature, top_p, min_p float32 [B]; top_k int64 [B]
// -> (tokens int64 [B], logprobs float32 [B], filtered_logprobs float32 [B], kept_threshold float32 [B]: the min raw
// logit over the kept set, -inf without an active filter, the max logit for greedy rows, NaN without a distribution).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits,
                                                                     const at::Tensor& uniforms,
                                                                     const at::Tensor& temperature,
                                                                     const at::Tensor& top_k, const at::Tensor& top_p,
                                                                     const at::Tensor& min_p);

}  // namespace rlhf_fast::cpu
