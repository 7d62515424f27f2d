// CUDA launchers of the log-prob / entropy ops on raw device pointers (no torch types: the binding adapts tensors).
//
// logits: [n_rows, vocab] with unit stride in vocab and row_stride elements between rows. Per-row vectors are fp32.
// labels may be nullptr (then logp = 0 and grad_logp is ignored). temperature must be > 0.
// Each launcher enqueues on `stream`, does not synchronise, and returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace rlhf_fast::cuda {

// -> logp, entropy (0 unless compute_entropy), lse: float32 [n_rows] each. kept_threshold (float32 [n_rows]) may be
// nullptr; when given, lse_kept [n_rows] receives the log-sum-exp over the kept set and logp = z_y - lse_kept.
cudaError_t logprobs_fwd(const void* logits, DType dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                         const int64_t* labels, const float* kept_threshold, float temperature, int64_t ignore_index,
                         bool compute_entropy, float* logp, float* entropy, float* lse, float* lse_kept,
                         cudaStream_t stream);

// -> grad_logits: contiguous [n_rows, vocab] in the dtype of logits. grad_lse_kept, kept_threshold, lse_kept: all
// three or none (nullptr).
cudaError_t logprobs_bwd(const float* grad_logp, const float* grad_entropy, const float* grad_lse,
                         const float* grad_lse_kept, const void* logits, DType dtype, int64_t n_rows, int64_t vocab,
                         int64_t row_stride, const int64_t* labels, const float* kept_threshold, const float* lse,
                         const float* lse_kept, const float* entropy, float temperature, int64_t ignore_index,
                         void* grad_logits, cudaStream_t stream);

}  // namespace rlhf_fast::cuda
