// The floating-point element types the CUDA launchers accept for their main input (a plain enum: no torch types).
#pragma once

namespace rlhf_fast::cuda {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

}  // namespace rlhf_fast::cuda
