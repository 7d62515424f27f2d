// Small helpers shared by the CPU kernels: fp32 loads/stores of float, bfloat16 and float16 rows.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

// The logits dtypes every kernel accepts: float32, bfloat16, float16 (as `scalar_t` inside).
#define RLHF_FAST_DISPATCH_LOGITS(TYPE, NAME, ...)                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)               \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace rlhf_fast::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Loads Vec::size() consecutive elements of `p` as fp32.
template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

// Stores 2 * Vec::size() fp32 values to `p` in T.
template <typename T>
inline void store_float2(T* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + Vec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// max that propagates NaN, like at::vec::maximum.
inline float nan_max(float a, float b) {
  return (std::isnan(a) || a > b) ? a : b;
}

}  // namespace rlhf_fast::cpu
