// Maps a tensor's scalar type to the CUDA launchers' DType (shared by the cuda_*.cpp bindings).
#pragma once

#include <ATen/core/Tensor.h>

#include "../cuda/dtype.h"

namespace rlhf_fast::cuda {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kHalf:
      return DType::Float16;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

}  // namespace rlhf_fast::cuda
