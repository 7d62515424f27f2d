// Schema of the compiled sampler (namespace rlhf_fast_C) and its CPU kernel. The CUDA extension adds the CUDA kernel
// (csrc/bindings/cuda_sampling.cpp). The public, validated op is rlhf_fast.sample (rlhf_fast/ops/sampling.py).
#include <torch/library.h>

#include "../cpu/sampling.h"

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  m.def("sample(Tensor logits, Tensor uniforms, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) { m.impl("sample", &rlhf_fast::cpu::sample_cpu); }
