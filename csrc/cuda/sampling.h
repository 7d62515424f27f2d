// CUDA launcher of the batched sampler on raw device pointers (no torch types: the binding adapts tensors).
//
// logits: [n_rows, vocab] with unit stride in vocab and row_stride elements between rows (0 allowed). Per-row inputs:
// uniforms in [0, 1), temperature (<= 0: greedy), top_k (<= 0 or >= vocab: off), top_p (>= 1: off), min_p (<= 0: off).
// Outputs: tokens int64, logp (log-prob under the unfiltered temperature-scaled distribution; 0 for greedy rows) and
// filtered_logp (under the renormalised kept set), threshold (the min raw logit over the kept set; -inf without an
// active filter; the max logit for greedy rows), NaN for a row without a distribution (NaN / +inf / no finite logit). The launcher enqueues on `stream`, does not synchronise, and returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "logprobs.h"  // DType

namespace rlhf_fast::cuda {

cudaError_t sample(const void* logits, DType dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                   const float* uniforms, const float* temperature, const int64_t* top_k, const float* top_p,
                   const float* min_p, int64_t* tokens, float* logp, float* filtered_logp, float* threshold,
                   cudaStream_t stream);

}  // namespace rlhf_fast::cuda
