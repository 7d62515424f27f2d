// Masked GAE and discounted returns on the GPU. Two kernels:
//
// * thread per sequence: the serial loop of the CPU kernel, one thread per row. Enough parallelism only when B is
//   very large (a warp reads 32 rows at once, uncoalesced, so each load relies on L1 for the neighbouring steps).
// * warp scan per sequence (a chunked parallel scan): a warp walks its row from the end in tiles of 32 * K steps;
//   lane l holds K consecutive steps. Each step is a map of the state after t+1 to the state after t,
//   x -> c * x + s (next value: c = 0, s = V[t] where kept, else identity; advantage: c = gamma*lam, s = delta_t
//   where kept, else identity). Each lane composes its K maps, the warp composes the lanes' maps with a shuffle
//   scan, the state carried in from the tile to the right is applied, and each lane replays its K steps from its
//   incoming state.
//
// Masked positions are never loaded (they may hold padding, even inf/NaN), and their outputs are 0.
#include "advantages.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rlhf_fast::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpScanK = 8;  // steps per lane: a tile of 256 steps per warp iteration
constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
struct Params {
  const T* rewards;
  int64_t r_row, r_step;
  const T* values;
  int64_t v_row, v_step;
  const uint8_t* mask;
  int64_t m_row, m_step;
  int64_t n_rows, n_steps;
  const float* gamma_seq;
  const float* lam_seq;
  float gamma, lam;
  float* adv;
  float* ret;
};

// gamma and gamma * lam of row b (discounted returns: lam = 1).
template <typename T, bool kValues>
__device__ __forceinline__ void row_factors(const Params<T>& p, int64_t b, float& g, float& gl) {
  g = p.gamma_seq ? p.gamma_seq[b] : p.gamma;
  gl = kValues ? g * (p.lam_seq ? p.lam_seq[b] : p.lam) : g;
}

template <typename T, bool kValues>
__global__ void gae_thread_kernel(Params<T> p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.n_rows) return;
  float g, gl;
  row_factors<T, kValues>(p, b, g, gl);
  const T* r = p.rewards + b * p.r_row;
  const T* v = p.values + b * p.v_row;
  const uint8_t* m = p.mask + b * p.m_row;
  float* adv = p.adv + b * p.n_steps;
  float* ret = p.ret + b * p.n_steps;
  float next_v = 0.f, running = 0.f;
  for (int64_t t = p.n_steps - 1; t >= 0; --t) {
    if (m[t * p.m_step]) {
      float a = to_float(r[t * p.r_step]);
      if constexpr (kValues) {
        const float vt = to_float(v[t * p.v_step]);
        a = a + g * next_v - vt + gl * running;
        next_v = vt;
        ret[t] = a + vt;
      } else {
        a = a + gl * running;
      }
      running = a;
      adv[t] = a;
    } else {
      adv[t] = 0.f;
      if constexpr (kValues) ret[t] = 0.f;
    }
  }
}

// The incoming state of lane l: the maps (c, s) of lanes l+1 .. 31 applied, lane 31's first, to `carry` (the state
// entering the tile from its right).
__device__ __forceinline__ float warp_incoming_state(float c, float s, float carry, int lane) {
  // Inclusive suffix composition: lane l ends with M_l o M_{l+1} o ... (M_l applied last).
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float c_next = __shfl_down_sync(kFullMask, c, offset);
    const float s_next = __shfl_down_sync(kFullMask, s, offset);
    if (lane + offset < 32) {
      s = c * s_next + s;
      c = c * c_next;
    }
  }
  // Exclusive: lane l takes lane l+1's composition; lane 31 the identity.
  float c_in = __shfl_down_sync(kFullMask, c, 1);
  float s_in = __shfl_down_sync(kFullMask, s, 1);
  if (lane == 31) {
    c_in = 1.f;
    s_in = 0.f;
  }
  return c_in * carry + s_in;
}

// kUnit: every input has unit stride along the steps (the common, contiguous case: simpler addressing).
template <typename T, bool kValues, bool kUnit, int K>
__global__ void __launch_bounds__(kThreads) gae_warp_kernel(Params<T> p) {
  const int lane = threadIdx.x & 31;
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (b >= p.n_rows) return;  // b is uniform across a warp: whole warps leave together
  float g, gl;
  row_factors<T, kValues>(p, b, g, gl);
  const T* r = p.rewards + b * p.r_row;
  const T* vals = p.values + b * p.v_row;
  const uint8_t* m = p.mask + b * p.m_row;
  float* adv = p.adv + b * p.n_steps;
  float* ret = p.ret + b * p.n_steps;
  const int64_t r_step = kUnit ? 1 : p.r_step, v_step = kUnit ? 1 : p.v_step, m_step = kUnit ? 1 : p.m_step;
  constexpr int kTile = 32 * K;
  float carry_nv = 0.f, carry_a = 0.f;
  for (int64_t end = p.n_steps; end > 0; end -= kTile) {
    const int64_t first = end - kTile + static_cast<int64_t>(lane) * K;  // this lane's steps: [first, first + K)
    bool keep[K];
    float delta[K], v[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int64_t t = first + j;
      keep[j] = t >= 0 && m[t * m_step] != 0;
      delta[j] = keep[j] ? to_float(r[t * r_step]) : 0.f;
      v[j] = (kValues && keep[j]) ? to_float(vals[t * v_step]) : 0.f;
    }
    if constexpr (kValues) {
      // Next value: the lane's composed map is a constant (its earliest kept value) or the identity.
      float c = 1.f, s = 0.f;
#pragma unroll
      for (int j = K - 1; j >= 0; --j) {
        if (keep[j]) {
          c = 0.f;
          s = v[j];
        }
      }
      float x = warp_incoming_state(c, s, carry_nv, lane);
#pragma unroll
      for (int j = K - 1; j >= 0; --j) {
        delta[j] = delta[j] + g * x - v[j];  // x: the next value seen from step first + j
        if (keep[j]) x = v[j];
      }
      carry_nv = __shfl_sync(kFullMask, x, 0);
    }
    float c = 1.f, s = 0.f;
#pragma unroll
    for (int j = K - 1; j >= 0; --j) {
      if (keep[j]) {
        s = delta[j] + gl * s;
        c = gl * c;
      }
    }
    float x = warp_incoming_state(c, s, carry_a, lane);
#pragma unroll
    for (int j = K - 1; j >= 0; --j) {
      const int64_t t = first + j;
      if (keep[j]) x = delta[j] + gl * x;
      if (t >= 0) {
        adv[t] = keep[j] ? x : 0.f;
        if constexpr (kValues) ret[t] = keep[j] ? x + v[j] : 0.f;
      }
    }
    carry_a = __shfl_sync(kFullMask, x, 0);
  }
}

ScanAlgorithm choose(ScanAlgorithm algorithm, int64_t n_rows, int64_t n_steps) {
  if (algorithm != ScanAlgorithm::Auto) return algorithm;
  // Untuned guess (no GPU was available when this was written): a thread per row only when rows alone fill the GPU
  // or rows are shorter than a lane's share of a tile; measure with benchmarks/bench_advantages.py --device cuda.
  return (n_steps <= 32 || n_rows >= (int64_t{1} << 17)) ? ScanAlgorithm::ThreadPerSequence : ScanAlgorithm::WarpScan;
}

template <typename T, bool kValues>
cudaError_t launch(const Params<T>& p, ScanAlgorithm algorithm, cudaStream_t stream) {
  if (p.n_rows == 0 || p.n_steps == 0) return cudaSuccess;
  if (choose(algorithm, p.n_rows, p.n_steps) == ScanAlgorithm::ThreadPerSequence) {
    const int64_t blocks = (p.n_rows + kThreads - 1) / kThreads;
    gae_thread_kernel<T, kValues><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  } else {
    constexpr int kRowsPerBlock = kThreads / 32;
    const unsigned blocks = static_cast<unsigned>((p.n_rows + kRowsPerBlock - 1) / kRowsPerBlock);
    if (p.r_step == 1 && p.m_step == 1 && (!kValues || p.v_step == 1)) {
      gae_warp_kernel<T, kValues, true, kWarpScanK><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      gae_warp_kernel<T, kValues, false, kWarpScanK><<<blocks, kThreads, 0, stream>>>(p);
    }
  }
  return cudaGetLastError();
}

template <typename T, bool kValues>
cudaError_t run(StridedRows rewards, StridedRows values, StridedRows mask, int64_t n_rows, int64_t n_steps,
                const float* gamma_seq, const float* lam_seq, float gamma, float lam, ScanAlgorithm algorithm,
                float* adv, float* ret, cudaStream_t stream) {
  const Params<T> p{static_cast<const T*>(rewards.data), rewards.stride_row, rewards.stride_step,
                    static_cast<const T*>(values.data), values.stride_row, values.stride_step,
                    static_cast<const uint8_t*>(mask.data), mask.stride_row, mask.stride_step,
                    n_rows, n_steps, gamma_seq, lam_seq, gamma, lam, adv, ret};
  return launch<T, kValues>(p, algorithm, stream);
}

template <bool kValues>
cudaError_t dispatch(ScanDType dtype, StridedRows rewards, StridedRows values, StridedRows mask, int64_t n_rows,
                     int64_t n_steps, const float* gamma_seq, const float* lam_seq, float gamma, float lam,
                     ScanAlgorithm algorithm, float* adv, float* ret, cudaStream_t stream) {
  switch (dtype) {
    case ScanDType::Float32:
      return run<float, kValues>(rewards, values, mask, n_rows, n_steps, gamma_seq, lam_seq, gamma, lam, algorithm,
                                 adv, ret, stream);
    case ScanDType::BFloat16:
      return run<__nv_bfloat16, kValues>(rewards, values, mask, n_rows, n_steps, gamma_seq, lam_seq, gamma, lam,
                                         algorithm, adv, ret, stream);
    case ScanDType::Float16:
      return run<__half, kValues>(rewards, values, mask, n_rows, n_steps, gamma_seq, lam_seq, gamma, lam, algorithm,
                                  adv, ret, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t gae_fwd(StridedRows rewards, StridedRows values, ScanDType dtype, StridedRows mask, int64_t n_rows,
                    int64_t n_steps, const float* gamma_seq, const float* lam_seq, float gamma, float lam,
                    ScanAlgorithm algorithm, float* advantages, float* returns, cudaStream_t stream) {
  return dispatch<true>(dtype, rewards, values, mask, n_rows, n_steps, gamma_seq, lam_seq, gamma, lam, algorithm,
                        advantages, returns, stream);
}

cudaError_t discounted_returns_fwd(StridedRows rewards, ScanDType dtype, StridedRows mask, int64_t n_rows,
                                   int64_t n_steps, const float* gamma_seq, float gamma, ScanAlgorithm algorithm,
                                   float* returns, cudaStream_t stream) {
  // Values are never read (kValues = false) and lam = 1: the advantage recurrence with delta = r.
  return dispatch<false>(dtype, rewards, rewards, mask, n_rows, n_steps, gamma_seq, nullptr, gamma, 1.f, algorithm,
                         returns, returns, stream);
}

}  // namespace rlhf_fast::cuda
