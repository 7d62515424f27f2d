// Log-prob / entropy over the vocabulary of each row of logits, on the GPU.
//
// A group of threads owns a row: a warp for short rows (several rows per block), the whole block otherwise. The row is
// read with 16-byte loads (a few scalar elements before and after align them). Forward: each thread keeps an online
// softmax state in base 2 (u = z log2 e, so exponentials are single ex2 instructions); the states are merged with
// warp shuffles, then through shared memory. Backward: elementwise over the same row split. All math is fp32.
// With a kept threshold (kKept), the state carries one more sum, the kept mass sk = sum_{x >= threshold} 2^(u-m),
// rescaled exactly as s (with everything kept, sk == s bit for bit); logp = z_y - lse_kept.
#include "logprobs.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace rlhf_fast::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread per step

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector

// 2^x, denormal results flushed to 0; 2^-inf = 0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float* out) {
  T e[kVec<T>];
  memcpy(e, &raw, sizeof(raw));
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float* in) {
  T e[kVec<T>];
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) e[i] = from_float<T>(in[i]);
  uint4 raw;
  memcpy(&raw, e, sizeof(raw));
  return raw;
}

// A row as [head scalars][n_vec 16-byte-aligned vectors][tail scalars].
struct RowSplit {
  int64_t head, n_vec;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* x, int64_t vocab, bool vectorize) {
  const auto addr = reinterpret_cast<uintptr_t>(x);
  if (!vectorize || addr % sizeof(T) != 0) return {vocab, 0};
  int64_t head = static_cast<int64_t>((16 - addr % 16) % 16 / sizeof(T));
  if (head > vocab) head = vocab;
  return {head, (vocab - head) / kVec<T>};
}

// Softmax state of a set of scaled logits u relative to their max m: s = sum 2^(u-m), t = sum 2^(u-m) (u-m), and
// (used with kKept only) the kept sum sk = sum over raw logits >= threshold of 2^(u-m).
// m is never NaN (fmaxf drops NaN); a NaN logit turns s (and so lse, entropy) into NaN instead.
struct State {
  float m, s, t, sk;
};

__device__ __forceinline__ State empty_state() { return {-INFINITY, 0.f, 0.f, 0.f}; }

// Adds b to r, rescaling b's sums from b.m to r.m (requires r.m >= b.m).
template <bool kKept>
__device__ __forceinline__ void add_rebased(State& r, const State& b) {
  if (b.m == -INFINITY) {  // b holds no finite entry: its sums are 0 (or NaN) and need no rescale
    r.s += b.s;
    r.t += b.t;
    if constexpr (kKept) r.sk += b.sk;
    return;
  }
  const float d = b.m - r.m, f = ex2(d);
  r.s = fmaf(f, b.s, r.s);
  r.t = fmaf(f, fmaf(d, b.s, b.t), r.t);
  if constexpr (kKept) r.sk = fmaf(f, b.sk, r.sk);
}

template <bool kKept>
__device__ __forceinline__ State merge(const State& a, const State& b) {
  State r{fmaxf(a.m, b.m), 0.f, 0.f, 0.f};
  add_rebased<kKept>(r, a);
  add_rebased<kKept>(r, b);
  return r;
}

template <bool kKept>
__device__ __forceinline__ State warp_merge(State st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const State other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
                      __shfl_xor_sync(0xffffffffu, st.t, offset),
                      kKept ? __shfl_xor_sync(0xffffffffu, st.sk, offset) : 0.f};
    st = merge<kKept>(st, other);
  }
  return st;
}

// Adds the logits x[0, N) (unscaled; u = x k with k > 0) to the state, rebasing it once to the batch max; kKept:
// the entries with x >= threshold (raw logits) also go to sk.
template <bool kEntropy, bool kKept, int N>
__device__ __forceinline__ void accumulate(State& st, const float (&x)[N], float k, float threshold) {
  float xmax = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) xmax = fmaxf(xmax, x[i]);
  const float bmax = xmax * k;
  if (bmax > st.m) {
    const State old = st;
    st = {bmax, 0.f, 0.f, 0.f};
    add_rebased<kKept>(st, old);
  }
  const float ref = st.m == -INFINITY ? 0.f : st.m;  // all -inf so far: keeps u - ref = -inf rather than NaN
  float s = 0.f, t = 0.f, sk = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float d = fmaf(x[i], k, -ref), e = ex2(d);
    s += e;
    // -inf entries add 0 (e = 0, and 0 * -inf would be NaN); below -256, e is 0 anyway.
    if constexpr (kEntropy) t = fmaf(e, fmaxf(d, -256.f), t);
    if constexpr (kKept) sk += x[i] >= threshold ? e : 0.f;
  }
  st.s += s;
  st.t += t;
  if constexpr (kKept) st.sk += sk;
}

template <typename T, int kThreads, int kRowThreads, bool kEntropy, bool kKept>
__global__ void __launch_bounds__(kThreads)
    logprobs_fwd_kernel(const T* __restrict__ logits, int64_t n_rows, int64_t vocab, int64_t row_stride,
                        const int64_t* __restrict__ labels, const float* __restrict__ kept_threshold, float inv_t,
                        int64_t ignore_index, float* __restrict__ logp, float* __restrict__ entropy,
                        float* __restrict__ lse, float* __restrict__ lse_kept) {
  static_assert(kRowThreads == 32 || kRowThreads == kThreads, "a row is owned by a warp or by the whole block");
  constexpr int V = kVec<T>;
  const int lane = threadIdx.x % kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / kRowThreads) + threadIdx.x / kRowThreads;
  if (row >= n_rows) return;  // only whole warps of warp-per-row blocks: no __syncthreads waits for them
  const T* x = logits + row * row_stride;
  const float k = inv_t * kLog2e;

  // The labelled logit, loaded first so that its latency hides behind the row.
  const int64_t y = labels != nullptr ? labels[row] : ignore_index;
  const bool has_label = y != ignore_index, in_range = y >= 0 && y < vocab;
  float xy = 0.f;
  if (lane == 0 && has_label && in_range) xy = to_float(x[y]);
  const float thr = kKept ? kept_threshold[row] : -INFINITY;

  State st = empty_state();
  const RowSplit sp = split_row(x, vocab, true);
  for (int64_t j = lane; j < sp.head; j += kRowThreads) {
    const float v[1] = {to_float(x[j])};
    accumulate<kEntropy, kKept>(st, v, k, thr);
  }
  for (int64_t j = sp.head + sp.n_vec * V + lane; j < vocab; j += kRowThreads) {
    const float v[1] = {to_float(x[j])};
    accumulate<kEntropy, kKept>(st, v, k, thr);
  }
  float inf_v[V];
#pragma unroll
  for (int i = 0; i < V; ++i) inf_v[i] = -INFINITY;
  const uint4 pad = pack<T>(inf_v);
  const uint4* xv = reinterpret_cast<const uint4*>(x + sp.head);
  for (int64_t i0 = lane; i0 < sp.n_vec; i0 += kUnroll * kRowThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kRowThreads;
      raw[u] = i < sp.n_vec ? __ldg(xv + i) : pad;
    }
    float v[kUnroll * V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) unpack<T>(raw[u], v + u * V);
    accumulate<kEntropy, kKept>(st, v, k, thr);
  }

  st = warp_merge<kKept>(st);
  if constexpr (kRowThreads > 32) {
    __shared__ State partial[kRowThreads / 32];
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) partial[warp] = st;
    __syncthreads();
    if (warp != 0) return;
    st = warp_merge<kKept>(threadIdx.x < kRowThreads / 32 ? partial[threadIdx.x] : empty_state());
  }
  if (lane != 0) return;

  const float log2s = log2f(st.s);  // -inf when the row is all -inf
  lse[row] = (st.m + log2s) * kLn2;
  entropy[row] = !kEntropy ? 0.f : st.s > 0.f ? (log2s - st.t / st.s) * kLn2 : NAN;
  float log2_denominator = log2s;
  if constexpr (kKept) {  // a NaN row (s NaN) stays NaN
    log2_denominator = st.s == st.s ? log2f(st.sk) : NAN;
    if (has_label && in_range && !(xy >= thr)) {
      // the label below the threshold joins K (the union rule), log-added in units relative to m: the rest of K is
      // empty or holds the row's max, so alone the label gives logp = 0 exactly, whatever its distance to m.
      const float a = log2_denominator, b = fmaf(xy, k, -st.m);
      log2_denominator = a == -INFINITY ? b : fmaxf(a, b) + log2f(1.f + ex2(-fabsf(a - b)));
    }
    lse_kept[row] = (st.m + log2_denominator) * kLn2;
  }
  // z_y - lse, taking u_y - m first (exactly ~0 for the argmax).
  logp[row] = !has_label ? 0.f : in_range ? (fmaf(xy, k, -st.m) - log2_denominator) * kLn2 : NAN;
}

// grad_x_j = (p_j (c - gH lp_j) + g [j == y]) / T with c = gL - g - gH H, lp_j = z_j - lse, p_j = exp(lp_j),
// z_j = x_j / T. Using lp_j (not z_j) keeps large logits (1e4) from cancelling catastrophically in fp32.
// kKept: logp = z_y - lse_kept moves the -g onto q_j = [j in K] exp(z_j - lse_kept): c = gL - gH H, plus q_j (gK - g);
// a row with threshold -inf keeps everything (q = p) and takes the plain formula with c = gL + gK - g - gH H; a row
// with c = gH = 0 (log-probs alone) skips the p term.
template <typename T, int kThreads, int kRowThreads, bool kKept>
__global__ void __launch_bounds__(kThreads)
    logprobs_bwd_kernel(const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                        const float* __restrict__ grad_lse, const float* __restrict__ grad_lse_kept,
                        const T* __restrict__ logits, int64_t n_rows, int64_t vocab, int64_t row_stride,
                        const int64_t* __restrict__ labels, const float* __restrict__ kept_threshold,
                        const float* __restrict__ lse, const float* __restrict__ lse_kept,
                        const float* __restrict__ entropy, float inv_t, int64_t ignore_index, T* __restrict__ grad) {
  constexpr int V = kVec<T>;
  const int lane = threadIdx.x % kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / kRowThreads) + threadIdx.x / kRowThreads;
  if (row >= n_rows) return;
  const T* x = logits + row * row_stride;
  T* gx = grad + row * vocab;

  const int64_t y = labels != nullptr ? labels[row] : ignore_index;
  const bool has_label = y != ignore_index && y >= 0 && y < vocab;
  const int64_t label = has_label ? y : -1;
  const float g = has_label ? grad_logp[row] : 0.f;
  const float gh = grad_entropy[row], row_lse = lse[row];
  const float thr = kKept ? kept_threshold[row] : -INFINITY;
  const bool full = !kKept || thr == -INFINITY;  // everything kept: the plain formula
  const float c = !kKept ? grad_lse[row] - g - gh * entropy[row]
                  : full ? grad_lse[row] + grad_lse_kept[row] - g - gh * entropy[row]
                         : grad_lse[row] - gh * entropy[row];
  // grad_x_j = 2^lp2_j (a + b lp2_j) + [j in K] 2^(u_j - lse_kept2) ak + [j == y] gy, with lp2_j = lp_j log2 e
  const float k = inv_t * kLog2e, lse2 = row_lse * kLog2e;
  const float a = c * inv_t, b = -gh * inv_t * kLn2, gy = g * inv_t;
  const bool with_p = full || a != 0.f || b != 0.f;
  const float ak = full ? 0.f : (grad_lse_kept[row] - g) * inv_t, lsek2 = full ? 0.f : lse_kept[row] * kLog2e;
  const auto grad_of = [&](float xj, bool is_label) {
    const float lp2 = fmaf(xj, k, -lse2);
    float out = with_p ? ex2(lp2) * fmaf(b, lp2, a) : 0.f;
    if (kKept && !full && (xj >= thr || is_label)) out = fmaf(ex2(fmaf(xj, k, -lsek2)), ak, out);
    return xj == -INFINITY ? 0.f : out;
  };
  const auto scalar = [&](int64_t j) {
    gx[j] = from_float<T>(grad_of(to_float(x[j]), j == label) + (j == label ? gy : 0.f));
  };

  // Vectors need x and gx equally misaligned; otherwise the row goes scalar.
  const RowSplit sp =
      split_row(x, vocab, (reinterpret_cast<uintptr_t>(x) - reinterpret_cast<uintptr_t>(gx)) % 16 == 0);
  for (int64_t j = lane; j < sp.head; j += kRowThreads) scalar(j);
  for (int64_t j = sp.head + sp.n_vec * V + lane; j < vocab; j += kRowThreads) scalar(j);
  const uint4* xv = reinterpret_cast<const uint4*>(x + sp.head);
  uint4* gv = reinterpret_cast<uint4*>(gx + sp.head);
  const int64_t label_v = label - sp.head;  // label's position in the vector body (negative when none)
  for (int64_t i0 = lane; i0 < sp.n_vec; i0 += kUnroll * kRowThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kRowThreads;
      raw[u] = i < sp.n_vec ? __ldg(xv + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kRowThreads;
      if (i >= sp.n_vec) break;
      float v[V];
      unpack<T>(raw[u], v);
      const int64_t off = label_v - i * V;
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = grad_of(v[e], e == off);
      if (off >= 0 && off < V) {
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] += e == off ? gy : 0.f;
      }
      gv[i] = pack<T>(v);
    }
  }
}

template <int N>
using Int = std::integral_constant<int, N>;

// Calls f(threads per block, threads per row): a warp per row for short rows, else a block per row.
template <typename F>
cudaError_t with_config(int64_t vocab, F&& f) {
  if (vocab <= 4096) return f(Int<256>{}, Int<32>{});
  if (vocab <= 32768) return f(Int<256>{}, Int<256>{});
  return f(Int<512>{}, Int<512>{});
}

template <int kThreads, int kRowThreads, typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, int64_t n_rows, cudaStream_t stream, Args... args) {
  constexpr int kRows = kThreads / kRowThreads;
  const int64_t blocks = (n_rows + kRows - 1) / kRows;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args...);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const void* logits, int64_t n_rows, int64_t vocab, int64_t row_stride, const int64_t* labels,
                      const float* kept_threshold, float inv_t, int64_t ignore_index, bool compute_entropy,
                      float* logp, float* entropy, float* lse, float* lse_kept, cudaStream_t stream) {
  return with_config(vocab, [&](auto threads, auto row_threads) {
    constexpr int kT = decltype(threads)::value, kR = decltype(row_threads)::value;
    const bool kept = kept_threshold != nullptr;
    const auto kernel = compute_entropy ? (kept ? logprobs_fwd_kernel<T, kT, kR, true, true>
                                                : logprobs_fwd_kernel<T, kT, kR, true, false>)
                                        : (kept ? logprobs_fwd_kernel<T, kT, kR, false, true>
                                                : logprobs_fwd_kernel<T, kT, kR, false, false>);
    return launch<kT, kR>(kernel, n_rows, stream, static_cast<const T*>(logits), n_rows, vocab, row_stride, labels,
                          kept_threshold, inv_t, ignore_index, logp, entropy, lse, lse_kept);
  });
}

template <typename T>
cudaError_t bwd_typed(const float* grad_logp, const float* grad_entropy, const float* grad_lse,
                      const float* grad_lse_kept, const void* logits, int64_t n_rows, int64_t vocab,
                      int64_t row_stride, const int64_t* labels, const float* kept_threshold, const float* lse,
                      const float* lse_kept, const float* entropy, float inv_t, int64_t ignore_index,
                      void* grad_logits, cudaStream_t stream) {
  return with_config(vocab, [&](auto threads, auto row_threads) {
    constexpr int kT = decltype(threads)::value, kR = decltype(row_threads)::value;
    const auto kernel = kept_threshold != nullptr ? logprobs_bwd_kernel<T, kT, kR, true>
                                                  : logprobs_bwd_kernel<T, kT, kR, false>;
    return launch<kT, kR>(kernel, n_rows, stream, grad_logp, grad_entropy, grad_lse, grad_lse_kept,
                          static_cast<const T*>(logits), n_rows, vocab, row_stride, labels, kept_threshold, lse,
                          lse_kept, entropy, inv_t, ignore_index, static_cast<T*>(grad_logits));
  });
}

}  // namespace

cudaError_t logprobs_fwd(const void* logits, DType dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                         const int64_t* labels, const float* kept_threshold, float temperature, int64_t ignore_index,
                         bool compute_entropy, float* logp, float* entropy, float* lse, float* lse_kept,
                         cudaStream_t stream) {
  if (n_rows <= 0 || vocab < 0) return n_rows == 0 && vocab >= 0 ? cudaSuccess : cudaErrorInvalidValue;
  const float inv_t = 1.f / temperature;
  const auto run = [&](auto tag) {
    return fwd_typed<decltype(tag)>(logits, n_rows, vocab, row_stride, labels, kept_threshold, inv_t, ignore_index,
                                    compute_entropy, logp, entropy, lse, lse_kept, stream);
  };
  switch (dtype) {
    case DType::Float32:
      return run(float{});
    case DType::BFloat16:
      return run(__nv_bfloat16{});
    case DType::Float16:
      return run(__half{});
  }
  return cudaErrorInvalidValue;
}

cudaError_t logprobs_bwd(const float* grad_logp, const float* grad_entropy, const float* grad_lse,
                         const float* grad_lse_kept, const void* logits, DType dtype, int64_t n_rows, int64_t vocab,
                         int64_t row_stride, const int64_t* labels, const float* kept_threshold, const float* lse,
                         const float* lse_kept, const float* entropy, float temperature, int64_t ignore_index,
                         void* grad_logits, cudaStream_t stream) {
  if (n_rows <= 0 || vocab < 0) return n_rows == 0 && vocab >= 0 ? cudaSuccess : cudaErrorInvalidValue;
  const float inv_t = 1.f / temperature;
  const auto run = [&](auto tag) {
    return bwd_typed<decltype(tag)>(grad_logp, grad_entropy, grad_lse, grad_lse_kept, logits, n_rows, vocab,
                                    row_stride, labels, kept_threshold, lse, lse_kept, entropy, inv_t, ignore_index,
                                    grad_logits, stream);
  };
  switch (dtype) {
    case DType::Float32:
      return run(float{});
    case DType::BFloat16:
      return run(__nv_bfloat16{});
    case DType::Float16:
      return run(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace rlhf_fast::cuda
