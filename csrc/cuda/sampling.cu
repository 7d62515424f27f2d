// Batched sampling on the GPU: temperature, top-k, top-p and min-p without sorting; a thread block per row.
//
// The block streams its row several times and recomputes e = exp(z - max z), z = logits / T, on the fly (fp32, no
// [B, V] temporary). Passes: max and its first index (cub::BlockReduce), S = sum e, the top-k and top-p thresholds
// by a multi-pivot bisection over the bit patterns of non-negative floats (each pass evaluates kPivots thresholds at
// once, one cub::BlockReduce of a kPivots-wide sum, so ~8 passes reach the exact threshold), the kept mass with the
// kept threshold (the min raw logit over the kept set, one more reduction in that pass; -inf without a filter), and the
// inverse CDF with the row's uniform u: tiles of kThreads * kItems elements, a cub::BlockScan of per-thread sums
// locates the thread whose elements hold the first running kept mass above u * M. Same rule as the CPU kernel
// (csrc/cpu/sampling.cpp) and the Triton one (kernels/sampling.py).
#include "sampling.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>

namespace rlhf_fast::cuda {
namespace {

constexpr int kPivots = 16;
constexpr int kItems = 8;  // consecutive elements per thread in the inverse-CDF tiles
constexpr unsigned kOneBits = 0x3F800000u;  // 1.0f = exp(0), the largest e

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

__device__ __forceinline__ bool finite(float v) { return v == v && fabsf(v) < INFINITY; }

struct ArgMax {
  float value;
  int64_t index;
};

struct ArgMaxOp {  // larger value wins, ties go to the lower index
  __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    return (a.value > b.value || (a.value == b.value && a.index < b.index)) ? a : b;
  }
};

struct PivotSums {
  float f[kPivots];
};

struct PivotSumOp {
  __device__ __forceinline__ PivotSums operator()(const PivotSums& a, const PivotSums& b) const {
    PivotSums out;
#pragma unroll
    for (int j = 0; j < kPivots; ++j) out.f[j] = a.f[j] + b.f[j];
    return out;
  }
};

struct MinOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};

struct MassMin {
  float mass, min_x;
};

struct MassMinOp {
  __device__ __forceinline__ MassMin operator()(const MassMin& a, const MassMin& b) const {
    return {a.mass + b.mass, fminf(a.min_x, b.min_x)};
  }
};

struct MaxOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

template <int kThreads>
struct Shared {
  union {
    typename cub::BlockReduce<ArgMax, kThreads>::TempStorage argmax;
    typename cub::BlockReduce<float, kThreads>::TempStorage sum;
    typename cub::BlockReduce<PivotSums, kThreads>::TempStorage pivots;
    typename cub::BlockReduce<MassMin, kThreads>::TempStorage mass_min;
    typename cub::BlockReduce<int64_t, kThreads>::TempStorage index;
    typename cub::BlockScan<float, kThreads>::TempStorage scan;
  } tmp;
  float value, value2;  // broadcast floats
  int64_t index;        // a broadcast index
  unsigned lo, hi;
};

template <typename T>
// e = exp((x - mx) * inv_t): subtracting the max before scaling makes the max's e exactly 1 (whatever the rounding
// of x * inv_t or its contraction into an FMA) and cannot overflow at a small temperature.
__device__ __forceinline__ float exp_at(const T* x, int64_t i, float inv_t, float mx) {
  return __expf((to_float(x[i]) - mx) * inv_t);
}

// Sum over the row of e (or of e >= tau), broadcast to every thread.
template <typename T, int kThreads>
__device__ float kept_mass(const T* x, int64_t vocab, float inv_t, float mx, float tau, Shared<kThreads>& sh) {
  float local = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float e = exp_at(x, i, inv_t, mx);
    local += e >= tau ? e : 0.f;
  }
  const float total = cub::BlockReduce<float, kThreads>(sh.tmp.sum).Sum(local);
  if (threadIdx.x == 0) sh.value = total;
  __syncthreads();
  const float out = sh.value;
  __syncthreads();
  return out;
}

// The mass of the kept set {e >= tau, e > 0} and the min of x over it (+inf when empty), broadcast to every thread.
template <typename T, int kThreads>
__device__ MassMin kept_mass_and_min(const T* x, int64_t vocab, float inv_t, float mx, float tau,
                                     Shared<kThreads>& sh) {
  MassMin local{0.f, INFINITY};
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = to_float(x[i]), e = exp_at(x, i, inv_t, mx);
    if (e >= tau && e > 0.f) local = {local.mass + e, fminf(local.min_x, v)};
  }
  const MassMin total = cub::BlockReduce<MassMin, kThreads>(sh.tmp.mass_min).Reduce(local, MassMinOp());
  if (threadIdx.x == 0) {
    sh.value = total.mass;
    sh.value2 = total.min_x;
  }
  __syncthreads();
  const MassMin out{sh.value, sh.value2};
  __syncthreads();
  return out;
}

// The largest bit pattern t in [lo, hi] with f(t) >= target, f(t) = count (kMass = false) or mass of e >= t.
// Requires f(lo) >= target. Each pass evaluates kPivots increasing pivots in (lo, hi]; f does not increase with the
// pivot, so the pivots that pass form a prefix and the interval shrinks about kPivots-fold.
template <bool kMass, typename T, int kThreads>
__device__ float bisect(const T* x, int64_t vocab, float inv_t, float mx, float target, unsigned lo, unsigned hi,
                        Shared<kThreads>& sh) {
  while (lo < hi) {
    unsigned piv[kPivots];
    float pf[kPivots];
    PivotSums local;
#pragma unroll
    for (int j = 0; j < kPivots; ++j) {
      piv[j] = lo + static_cast<unsigned>((static_cast<uint64_t>(j + 1) * (hi - lo) + kPivots - 1) / kPivots);
      pf[j] = __uint_as_float(piv[j]);
      local.f[j] = 0.f;
    }
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const float e = exp_at(x, i, inv_t, mx);
#pragma unroll
      for (int j = 0; j < kPivots; ++j) local.f[j] += e >= pf[j] ? (kMass ? e : 1.f) : 0.f;
    }
    const PivotSums f = cub::BlockReduce<PivotSums, kThreads>(sh.tmp.pivots).Reduce(local, PivotSumOp());
    if (threadIdx.x == 0) {
      unsigned new_lo = lo, new_hi = hi;
#pragma unroll
      for (int j = kPivots - 1; j >= 0; --j) {
        if (f.f[j] >= target) {
          new_lo = new_lo > piv[j] ? new_lo : piv[j];
        } else {
          new_hi = piv[j] - 1;
        }
      }
      sh.lo = new_lo;
      sh.hi = new_hi;
    }
    __syncthreads();
    lo = sh.lo;
    hi = sh.hi;
    __syncthreads();
  }
  return __uint_as_float(lo);
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride, const float* __restrict__ uniforms,
                  const float* __restrict__ temperature, const int64_t* __restrict__ top_k,
                  const float* __restrict__ top_p, const float* __restrict__ min_p, int64_t* __restrict__ tokens,
                  float* __restrict__ logp, float* __restrict__ filtered_logp, float* __restrict__ threshold) {
  __shared__ Shared<kThreads> sh;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;

  // 1. max and its first index; NaN tracked apart (comparisons drop it)
  ArgMax best{-INFINITY, 0};
  bool nan_seen = false;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = to_float(x[i]);
    nan_seen |= v != v;
    if (v > best.value) best = {v, i};
  }
  const ArgMax top = cub::BlockReduce<ArgMax, kThreads>(sh.tmp.argmax).Reduce(best, ArgMaxOp());
  const bool any_nan = __syncthreads_or(nan_seen);
  if (threadIdx.x == 0) {
    sh.value = any_nan ? NAN : top.value;
    sh.index = top.index < vocab ? top.index : 0;
  }
  __syncthreads();
  const float mx = sh.value;
  const int64_t argmax = sh.index;
  __syncthreads();

  const float temp = temperature[row];
  if (!(temp > 0.f)) {  // greedy
    if (threadIdx.x == 0) {
      tokens[row] = argmax;
      logp[row] = filtered_logp[row] = finite(mx) ? 0.f : NAN;
      threshold[row] = finite(mx) ? mx : NAN;
    }
    return;
  }
  const float inv_t = 1.f / temp;
  if (!finite(mx)) {
    if (threadIdx.x == 0) {
      tokens[row] = argmax;
      logp[row] = filtered_logp[row] = threshold[row] = NAN;
    }
    return;
  }

  // 2-3. S and the thresholds
  const float total = kept_mass(x, vocab, inv_t, mx, 0.f, sh);
  const int64_t k = top_k[row];
  float tau_k = 0.f;
  if (k > 0 && k < vocab) tau_k = bisect<false>(x, vocab, inv_t, mx, static_cast<float>(k), 0u, kOneBits, sh);
  const float p = top_p[row];
  float tau_p = 0.f;
  if (p < 1.f) {
    const float target = fmaxf(p, 0.f) * kept_mass(x, vocab, inv_t, mx, tau_k, sh);
    tau_p = bisect<true>(x, vocab, inv_t, mx, target, __float_as_uint(tau_k), kOneBits, sh);
  }
  const float mp = min_p[row];
  const float tau = fminf(fmaxf(fmaxf(tau_k, tau_p), mp > 0.f ? mp : 0.f), 1.f);  // the max (e = 1) is kept
  const bool filtered = (k > 0 && k < vocab) || p < 1.f || mp > 0.f;

  // 4. kept mass and threshold, inverse CDF
  const MassMin kept_set = kept_mass_and_min(x, vocab, inv_t, mx, tau, sh);
  const float kept = kept_set.mass;
  const float target = fminf(fmaxf(uniforms[row], 0.f), 0.99999994f) * kept;
  float cum = 0.f;
  int64_t last = -1;
  if (threadIdx.x == 0) sh.index = -1;
  __syncthreads();
  for (int64_t start = 0; start < vocab; start += static_cast<int64_t>(kThreads) * kItems) {
    const int64_t first_i = start + static_cast<int64_t>(threadIdx.x) * kItems;
    float w[kItems];
    float local = 0.f;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const float e = first_i + j < vocab ? exp_at(x, first_i + j, inv_t, mx) : 0.f;
      w[j] = e >= tau && e > 0.f ? e : 0.f;
      local += w[j];
      if (w[j] > 0.f) last = first_i + j;
    }
    float before, tile_total;
    cub::BlockScan<float, kThreads>(sh.tmp.scan).ExclusiveSum(local, before, tile_total);
    __syncthreads();
    int64_t hit = LLONG_MAX;
    float c = cum + before;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      c += w[j];
      if (hit == LLONG_MAX && w[j] > 0.f && c > target) hit = first_i + j;
    }
    const int64_t first = cub::BlockReduce<int64_t, kThreads>(sh.tmp.index).Reduce(hit, MinOp());
    if (threadIdx.x == 0 && first != LLONG_MAX) sh.index = first;
    __syncthreads();
    if (sh.index >= 0) break;
    cum += tile_total;
  }
  const int64_t found = sh.index;
  __syncthreads();
  const int64_t last_kept = cub::BlockReduce<int64_t, kThreads>(sh.tmp.index).Reduce(last, MaxOp());
  if (threadIdx.x == 0) {
    int64_t token = found >= 0 ? found : last_kept;  // not found: rounding put the target past the end
    if (token < 0) token = argmax;
    const float z = (to_float(x[token]) - mx) * inv_t;
    tokens[row] = token;
    logp[row] = z - logf(total);
    filtered_logp[row] = z - logf(kept);
    threshold[row] = filtered ? kept_set.min_x : -INFINITY;
  }
}

template <typename T>
cudaError_t launch(const void* logits, int64_t n_rows, int64_t vocab, int64_t row_stride, const float* uniforms,
                   const float* temperature, const int64_t* top_k, const float* top_p, const float* min_p,
                   int64_t* tokens, float* logp, float* filtered_logp, float* threshold, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  if (vocab >= 16384) {
    sample_kernel<T, 512><<<n_rows, 512, 0, stream>>>(x, vocab, row_stride, uniforms, temperature, top_k, top_p,
                                                      min_p, tokens, logp, filtered_logp, threshold);
  } else {
    sample_kernel<T, 128><<<n_rows, 128, 0, stream>>>(x, vocab, row_stride, uniforms, temperature, top_k, top_p,
                                                      min_p, tokens, logp, filtered_logp, threshold);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t sample(const void* logits, DType dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                   const float* uniforms, const float* temperature, const int64_t* top_k, const float* top_p,
                   const float* min_p, int64_t* tokens, float* logp, float* filtered_logp, float* threshold,
                   cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch<float>(logits, n_rows, vocab, row_stride, uniforms, temperature, top_k, top_p, min_p, tokens,
                           logp, filtered_logp, threshold, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(logits, n_rows, vocab, row_stride, uniforms, temperature, top_k, top_p, min_p,
                                   tokens, logp, filtered_logp, threshold, stream);
    case DType::Float16:
      return launch<__half>(logits, n_rows, vocab, row_stride, uniforms, temperature, top_k, top_p, min_p, tokens,
                            logp, filtered_logp, threshold, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rlhf_fast::cuda
