// Schemas of the compiled advantage ops (namespace rlhf_fast_C) and their CPU kernels; the CUDA extension adds
// CUDA kernels to the same schemas (cuda_advantages.cpp). The public, validated ops live in
// rlhf_fast/ops/advantages.py.
#include <torch/library.h>

#include "../cpu/advantages.h"

// algorithm: which CUDA kernel runs (0 automatic, 1 a thread per sequence, 2 a warp scan per sequence, 3 a chunked
// scan: several warps per sequence); the CPU kernel has one algorithm and ignores it.
TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, Tensor? gamma_seq, Tensor? lam_seq, float gamma,"
        " float lam, int algorithm=0) -> (Tensor, Tensor)");
  m.def("discounted_returns_fwd(Tensor rewards, Tensor mask, Tensor? gamma_seq, float gamma, int algorithm=0)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("gae_fwd", &rlhf_fast::cpu::gae_fwd_cpu);
  m.impl("discounted_returns_fwd", &rlhf_fast::cpu::discounted_returns_fwd_cpu);
}
