// CUDA launchers of masked GAE and discounted returns on raw device pointers (no torch types: the binding in
// csrc/bindings/cuda_advantages.cpp adapts tensors). Semantics: rlhf_fast/ops/advantages.py and docs/formulas.md.
//
// Inputs are [n_rows, n_steps] with element strides (any layout). gamma_seq / lam_seq are float32 [n_rows] per-
// sequence factors, or nullptr to use the scalars. Outputs are contiguous float32 [n_rows, n_steps]. Arithmetic is
// fp32. Each launcher enqueues on `stream`, does not synchronise, and returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace rlhf_fast::cuda {


// Auto picks by shape; the others force a kernel (for tests and benchmarks). ChunkedScan splits each sequence into
// chunks scanned by different warps (for few, long sequences): it needs a workspace (scan_workspace_bytes).
enum class ScanAlgorithm : int { Auto = 0, ThreadPerSequence = 1, WarpScan = 2, ChunkedScan = 3 };

// A [n_rows, n_steps] input: rewards/values in the DType, or the mask as bytes (0 = a skipped position).
struct StridedRows {
  const void* data;
  int64_t stride_row;
  int64_t stride_step;
};

// Bytes of device workspace (4-byte aligned) the launchers below need for this shape and algorithm; 0: none.
size_t scan_workspace_bytes(int64_t n_rows, int64_t n_steps, ScanAlgorithm algorithm);

// -> advantages, returns: float32 [n_rows, n_steps]. workspace: scan_workspace_bytes(...) bytes, or nullptr if 0.
cudaError_t gae_fwd(StridedRows rewards, StridedRows values, DType dtype, StridedRows mask, int64_t n_rows,
                    int64_t n_steps, const float* gamma_seq, const float* lam_seq, float gamma, float lam,
                    ScanAlgorithm algorithm, void* workspace, float* advantages, float* returns, cudaStream_t stream);

// -> returns: float32 [n_rows, n_steps], R[t] = r[t] + gamma * R_next over kept positions.
cudaError_t discounted_returns_fwd(StridedRows rewards, DType dtype, StridedRows mask, int64_t n_rows,
                                   int64_t n_steps, const float* gamma_seq, float gamma, ScanAlgorithm algorithm,
                                   void* workspace, float* returns, cudaStream_t stream);

}  // namespace rlhf_fast::cuda
