// Masked GAE and discounted returns on the GPU.
//
// Going backwards in t, each step maps the state after t+1 to the state after t. The state is (A, nv): the running
// advantage and the next value. A kept step (mask 1) is the affine map
//   A' = gamma*lam * A + gamma * nv + (r[t] - V[t]),   nv' = V[t]
// and a skipped step (mask 0) is the identity. (Discounted returns: V = 0 and lam = 1.) Three kernels:
//
// * thread per sequence: the serial loop of the CPU kernel, one thread per row. Enough parallelism only when B is
//   very large (a warp reads 32 rows at once, uncoalesced, so each load relies on L1 for the neighbouring steps).
// * warp scan: a warp walks a row (or a chunk of it) from the end in tiles of 32 * K steps; lane l holds K consecutive
//   steps. nv is scanned first (each lane's composed map is a constant or the identity), which gives every delta_t;
//   then A, whose maps are x -> gamma*lam * x + delta_t. Each lane composes its K maps, the warp composes the lanes'
//   maps with a shuffle scan, the state carried in from the tile to the right is applied, and each lane replays its
//   K steps from its incoming state.
// * chunked scan (few, long rows): each row is cut into chunks of whole tiles. Pass 1: a warp per chunk composes the
//   chunk's maps of the joint state (A, nv) into one (a 2x2 upper-triangular matrix and an offset). Pass 2: a thread
//   per row applies them right to left to find each chunk's incoming state. Pass 3: the warp scan of each chunk,
//   started from that state. Rewards, values and mask are read twice, in exchange for B * chunks warps instead of B.
//
// Masked positions are never loaded (they may hold padding, even inf/NaN), and their outputs are 0.
#include "advantages.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rlhf_fast::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpScanK = 8;                 // steps per lane
constexpr int64_t kTile = 32 * kWarpScanK;    // steps per warp iteration
constexpr int kThreads = 256;
constexpr int64_t kWarpsPerBlock = kThreads / 32;
constexpr int64_t kTargetWarps = 8192;        // about one full H100/H200 (132 SMs x 64 warps)
constexpr int64_t kMinChunkTiles = 4;         // chunks of at least 1024 steps: the extra pass stays small
constexpr int kJointFloats = 5;               // a composed joint map (see JointMap)

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
  // Chunking: row b's chunk c covers steps [c * chunk_len, min((c + 1) * chunk_len, n_steps)); warp w handles
  // row w / n_chunks, chunk w % n_chunks. Without chunking n_chunks = 1 and chunk_len = n_steps.
  int64_t chunk_len, n_chunks;
  float* aggregates;  // [n_rows * n_chunks][kJointFloats], or nullptr
  float* carries;     // [n_rows * n_chunks][2]: (A, nv) entering each chunk from its right, or nullptr
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

// The incoming state of lane l: the maps x -> c * x + s of lanes l+1 .. 31 applied, lane 31's first, to `carry`
// (the state entering the tile from its right).
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

// The warp's row and step range [begin, stop) (a chunk, or the whole row); false for a warp past the last row.
template <typename T>
__device__ __forceinline__ bool warp_range(const Params<T>& p, int64_t& b, int64_t& chunk, int64_t& begin,
                                           int64_t& stop) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (w >= p.n_rows * p.n_chunks) return false;  // w is uniform across a warp: whole warps leave together
  b = w / p.n_chunks;
  chunk = w % p.n_chunks;
  begin = chunk * p.chunk_len;
  stop = begin + p.chunk_len < p.n_steps ? begin + p.chunk_len : p.n_steps;
  return true;
}

// kUnit: every input has unit stride along the steps (the common, contiguous case: simpler addressing).
template <typename T, bool kValues, bool kUnit, int K>
__global__ void __launch_bounds__(kThreads) gae_warp_kernel(Params<T> p) {
  const int lane = threadIdx.x & 31;
  int64_t b, chunk, begin, stop;
  if (!warp_range(p, b, chunk, begin, stop)) return;
  float g, gl;
  row_factors<T, kValues>(p, b, g, gl);
  const T* r = p.rewards + b * p.r_row;
  const T* vals = p.values + b * p.v_row;
  const uint8_t* m = p.mask + b * p.m_row;
  float* adv = p.adv + b * p.n_steps;
  float* ret = p.ret + b * p.n_steps;
  const int64_t r_step = kUnit ? 1 : p.r_step, v_step = kUnit ? 1 : p.v_step, m_step = kUnit ? 1 : p.m_step;
  float carry_a = 0.f, carry_nv = 0.f;
  if (p.carries) {
    carry_a = p.carries[2 * (b * p.n_chunks + chunk)];
    carry_nv = p.carries[2 * (b * p.n_chunks + chunk) + 1];
  }
  for (int64_t end = stop; end > begin; end -= K * 32) {
    const int64_t first = end - K * 32 + static_cast<int64_t>(lane) * K;  // this lane's steps: [first, first + K)
    bool keep[K];
    float delta[K], v[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int64_t t = first + j;
      keep[j] = t >= begin && m[t * m_step] != 0;
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
      if (t >= begin) {
        adv[t] = keep[j] ? x : 0.f;
        if constexpr (kValues) ret[t] = keep[j] ? x + v[j] : 0.f;
      }
    }
    carry_a = __shfl_sync(kFullMask, x, 0);
  }
}

// A map of the joint state: A' = a A + c nv + pa, nv' = d nv + pn.
struct JointMap {
  float a, c, pa, d, pn;
};

// left o right: `right` applied first.
__device__ __forceinline__ JointMap compose(const JointMap& left, const JointMap& right) {
  return {left.a * right.a, left.a * right.c + left.c * right.d, left.a * right.pa + left.c * right.pn + left.pa,
          left.d * right.d, left.d * right.pn + left.pn};
}

__device__ __forceinline__ JointMap shfl_down(const JointMap& m, int offset) {
  return {__shfl_down_sync(kFullMask, m.a, offset), __shfl_down_sync(kFullMask, m.c, offset),
          __shfl_down_sync(kFullMask, m.pa, offset), __shfl_down_sync(kFullMask, m.d, offset),
          __shfl_down_sync(kFullMask, m.pn, offset)};
}

// Chunked scan, pass 1: each warp composes the joint maps of its chunk into p.aggregates.
template <typename T, bool kValues, bool kUnit, int K>
__global__ void __launch_bounds__(kThreads) gae_chunk_aggregate_kernel(Params<T> p) {
  const int lane = threadIdx.x & 31;
  int64_t b, chunk, begin, stop;
  if (!warp_range(p, b, chunk, begin, stop)) return;
  float g, gl;
  row_factors<T, kValues>(p, b, g, gl);
  const T* r = p.rewards + b * p.r_row;
  const T* vals = p.values + b * p.v_row;
  const uint8_t* m = p.mask + b * p.m_row;
  const int64_t r_step = kUnit ? 1 : p.r_step, v_step = kUnit ? 1 : p.v_step, m_step = kUnit ? 1 : p.m_step;
  const JointMap identity{1.f, 0.f, 0.f, 1.f, 0.f};
  JointMap total = identity;  // on lane 0
  for (int64_t end = stop; end > begin; end -= K * 32) {
    const int64_t first = end - K * 32 + static_cast<int64_t>(lane) * K;
    JointMap acc = identity;
#pragma unroll
    for (int j = K - 1; j >= 0; --j) {
      const int64_t t = first + j;
      if (t >= begin && m[t * m_step] != 0) {
        const float vt = kValues ? to_float(vals[t * v_step]) : 0.f;
        const JointMap step{gl, kValues ? g : 0.f, to_float(r[t * r_step]) - vt, kValues ? 0.f : 1.f, vt};
        acc = compose(step, acc);
      }
    }
    // The tile's map, lane 0 applied last: after the loop lane 0 holds lane 0 o lane 1 o ... o lane 31.
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const JointMap next = shfl_down(acc, offset);
      if (lane + offset < 32) acc = compose(acc, next);
    }
    total = compose(acc, total);
  }
  if (lane == 0) {
    float* out = p.aggregates + kJointFloats * (b * p.n_chunks + chunk);
    out[0] = total.a;
    out[1] = total.c;
    out[2] = total.pa;
    out[3] = total.d;
    out[4] = total.pn;
  }
}

// Chunked scan, pass 2: a thread per row applies the chunks' maps right to left, recording each chunk's incoming
// state (A, nv) in p.carries.
template <typename T>
__global__ void gae_chunk_carry_kernel(Params<T> p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.n_rows) return;
  float a = 0.f, nv = 0.f;
  for (int64_t chunk = p.n_chunks - 1; chunk >= 0; --chunk) {
    const int64_t i = b * p.n_chunks + chunk;
    p.carries[2 * i] = a;
    p.carries[2 * i + 1] = nv;
    const float* map = p.aggregates + kJointFloats * i;
    const float a_next = map[0] * a + map[1] * nv + map[2];
    nv = map[3] * nv + map[4];
    a = a_next;
  }
}

ScanAlgorithm choose(ScanAlgorithm algorithm, int64_t n_rows, int64_t n_steps) {
  if (algorithm != ScanAlgorithm::Auto) return algorithm;
  // Untuned guess (no GPU was available when this was written); measure with bench_advantages.py --device cuda.
  if (n_steps <= 32 || n_rows >= (int64_t{1} << 17)) return ScanAlgorithm::ThreadPerSequence;
  if (n_rows < kTargetWarps / 2 && n_steps >= 2 * kMinChunkTiles * kTile) return ScanAlgorithm::ChunkedScan;
  return ScanAlgorithm::WarpScan;
}

// Chunk length (whole tiles, at least kMinChunkTiles) that gives about kTargetWarps warps in all.
int64_t chunk_length(int64_t n_rows, int64_t n_steps) {
  const int64_t tiles = (n_steps + kTile - 1) / kTile;
  const int64_t want_chunks = (kTargetWarps + n_rows - 1) / n_rows;
  int64_t tiles_per_chunk = (tiles + want_chunks - 1) / want_chunks;
  if (tiles_per_chunk < kMinChunkTiles) tiles_per_chunk = kMinChunkTiles;
  return tiles_per_chunk * kTile;
}

int64_t chunk_count(int64_t n_rows, int64_t n_steps) {
  const int64_t len = chunk_length(n_rows, n_steps);
  return (n_steps + len - 1) / len;
}

template <typename T, bool kValues>
cudaError_t launch(Params<T> p, ScanAlgorithm algorithm, void* workspace, cudaStream_t stream) {
  if (p.n_rows == 0 || p.n_steps == 0) return cudaSuccess;
  algorithm = choose(algorithm, p.n_rows, p.n_steps);
  if (algorithm == ScanAlgorithm::ThreadPerSequence) {
    const int64_t blocks = (p.n_rows + kThreads - 1) / kThreads;
    gae_thread_kernel<T, kValues><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  p.chunk_len = p.n_steps;
  p.n_chunks = 1;
  if (algorithm == ScanAlgorithm::ChunkedScan) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    p.chunk_len = chunk_length(p.n_rows, p.n_steps);
    p.n_chunks = chunk_count(p.n_rows, p.n_steps);
    p.aggregates = static_cast<float*>(workspace);
    p.carries = p.aggregates + kJointFloats * p.n_rows * p.n_chunks;
  }
  const bool unit = p.r_step == 1 && p.m_step == 1 && (!kValues || p.v_step == 1);
  const unsigned blocks = static_cast<unsigned>((p.n_rows * p.n_chunks + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (algorithm == ScanAlgorithm::ChunkedScan) {
    if (unit) {
      gae_chunk_aggregate_kernel<T, kValues, true, kWarpScanK><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      gae_chunk_aggregate_kernel<T, kValues, false, kWarpScanK><<<blocks, kThreads, 0, stream>>>(p);
    }
    const unsigned row_blocks = static_cast<unsigned>((p.n_rows + kThreads - 1) / kThreads);
    gae_chunk_carry_kernel<T><<<row_blocks, kThreads, 0, stream>>>(p);
  }
  if (unit) {
    gae_warp_kernel<T, kValues, true, kWarpScanK><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    gae_warp_kernel<T, kValues, false, kWarpScanK><<<blocks, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, bool kValues>
cudaError_t run(StridedRows rewards, StridedRows values, StridedRows mask, int64_t n_rows, int64_t n_steps,
                const float* gamma_seq, const float* lam_seq, float gamma, float lam, ScanAlgorithm algorithm,
                void* workspace, float* adv, float* ret, cudaStream_t stream) {
  const Params<T> p{static_cast<const T*>(rewards.data), rewards.stride_row, rewards.stride_step,
                    static_cast<const T*>(values.data), values.stride_row, values.stride_step,
                    static_cast<const uint8_t*>(mask.data), mask.stride_row, mask.stride_step,
                    n_rows, n_steps, gamma_seq, lam_seq, gamma, lam, adv, ret,
                    n_steps, 1, nullptr, nullptr};
  return launch<T, kValues>(p, algorithm, workspace, stream);
}

template <bool kValues>
cudaError_t dispatch(ScanDType dtype, StridedRows rewards, StridedRows values, StridedRows mask, int64_t n_rows,
                     int64_t n_steps, const float* gamma_seq, const float* lam_seq, float gamma, float lam,
                     ScanAlgorithm algorithm, void* workspace, float* adv, float* ret, cudaStream_t stream) {
  switch (dtype) {
    case ScanDType::Float32:
      return run<float, kValues>(rewards, values, mask, n_rows, n_steps, gamma_seq, lam_seq, gamma, lam, algorithm,
                                 workspace, adv, ret, stream);
    case ScanDType::BFloat16:
      return run<__nv_bfloat16, kValues>(rewards, values, mask, n_rows, n_steps, gamma_seq, lam_seq, gamma, lam,
                                         algorithm, workspace, adv, ret, stream);
    case ScanDType::Float16:
      return run<__half, kValues>(rewards, values, mask, n_rows, n_steps, gamma_seq, lam_seq, gamma, lam, algorithm,
                                  workspace, adv, ret, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t scan_workspace_bytes(int64_t n_rows, int64_t n_steps, ScanAlgorithm algorithm) {
  if (n_rows == 0 || n_steps == 0 || choose(algorithm, n_rows, n_steps) != ScanAlgorithm::ChunkedScan) return 0;
  return sizeof(float) * (kJointFloats + 2) * n_rows * chunk_count(n_rows, n_steps);
}

cudaError_t gae_fwd(StridedRows rewards, StridedRows values, ScanDType dtype, StridedRows mask, int64_t n_rows,
                    int64_t n_steps, const float* gamma_seq, const float* lam_seq, float gamma, float lam,
                    ScanAlgorithm algorithm, void* workspace, float* advantages, float* returns,
                    cudaStream_t stream) {
  return dispatch<true>(dtype, rewards, values, mask, n_rows, n_steps, gamma_seq, lam_seq, gamma, lam, algorithm,
                        workspace, advantages, returns, stream);
}

cudaError_t discounted_returns_fwd(StridedRows rewards, ScanDType dtype, StridedRows mask, int64_t n_rows,
                                   int64_t n_steps, const float* gamma_seq, float gamma, ScanAlgorithm algorithm,
                                   void* workspace, float* returns, cudaStream_t stream) {
  // Values are never read (kValues = false) and lam = 1: the advantage recurrence with delta = r.
  return dispatch<false>(dtype, rewards, rewards, mask, n_rows, n_steps, gamma_seq, nullptr, gamma, 1.f, algorithm,
                         workspace, returns, returns, stream);
}

}  // namespace rlhf_fast::cuda
