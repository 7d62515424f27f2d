// GAE and discounted returns on the CPU: sequences run in parallel (at::parallel_for over B; contiguous float32 rows
// 8 at a time in SIMD lanes), each one a single fp32 pass from t = T-1 down to 0 (the recurrence is serial in t).
// Positions with mask 0 are skipped: the next value and the running advantage carry over them unchanged, and their
// outputs are 0 (docs/formulas.md, "GAE").
#include "advantages.h"
#include "memory.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace rlhf_fast::cpu {
namespace {

// A [B, T] input read in place, whatever its strides.
template <typename T>
struct Rows {
  const T* data;
  int64_t stride_b, stride_t;
  const T* row(int64_t b) const { return data + b * stride_b; }
};

template <typename T>
Rows<T> rows(const at::Tensor& x) {
  return {x.const_data_ptr<T>(), x.stride(0), x.stride(1)};
}

// One row's state as the scan runs from t = T-1 down: the running advantage and the value of the next kept step.
struct Carry {
  float running = 0.f, next_v = 0.f;
};

// Row b from step `until` - 1 down to 0, one step after the other.
// kValues = false is the discounted return: values are 0 and lam is 1, so A_t = r_t + gamma * A.
template <typename T, bool kValues>
void scan_row(Rows<T> rewards, Rows<T> values, Rows<bool> mask, int64_t b, int64_t until, int64_t n_steps, float g,
              float gl, Carry c, float* adv, float* ret) {
  const T* r = rewards.row(b);
  const T* v = kValues ? values.row(b) : nullptr;
  const bool* m = mask.row(b);
  const int64_t sr = rewards.stride_t, sv = values.stride_t, sm = mask.stride_t;
  float* adv_row = adv + b * n_steps;
  float* ret_row = kValues ? ret + b * n_steps : nullptr;
  for (int64_t t = until - 1; t >= 0; --t) {
    const bool keep = m[t * sm];
    const float vt = kValues ? static_cast<float>(v[t * sv]) : 0.f;
    const float delta = kValues ? static_cast<float>(r[t * sr]) + g * c.next_v - vt : static_cast<float>(r[t * sr]);
    const float a = delta + gl * c.running;
    // Selects, not multiplies by the mask: whatever sits at a masked position (even inf/NaN) is never read.
    c.running = keep ? a : c.running;
    adv_row[t] = keep ? a : 0.f;
    if constexpr (kValues) {
      c.next_v = keep ? vt : c.next_v;
      ret_row[t] = keep ? a + vt : 0.f;
    }
  }
}

#if defined(__AVX2__)
// x[k] holds 8 consecutive steps of row k; afterwards x[j] holds step j of the 8 rows.
inline void transpose8x8(__m256 x[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(x[2 * i], x[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(x[2 * i], x[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    x[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Rows b0..b0+7 of contiguous float32 rows at once: each tile of 8 steps is transposed in registers so that the scan
// runs on one 8-row vector per step, then transposed back. One row at a time is latency-bound (the multiply-add
// chain, ~6 cycles a step); this path is ~8 rows a step. Same operations in the same order as scan_row, so the
// results are bit-identical. The first T % 8 steps finish in scan_row.
template <bool kValues>
void scan_8_rows(Rows<float> rewards, Rows<float> values, Rows<bool> mask, int64_t b0, int64_t n_steps,
                 const float* g8, const float* gl8, float* adv, float* ret) {
  const __m256 g = _mm256_loadu_ps(g8), gl = _mm256_loadu_ps(gl8), zero = _mm256_setzero_ps();
  __m256 running = zero, next_v = zero;
  const int64_t head = n_steps % 8;
  for (int64_t t0 = n_steps - 8; t0 >= head; t0 -= 8) {
    __m256 r[8], v[8], keep[8], a[8], rt[8];
    for (int k = 0; k < 8; ++k) {
      r[k] = _mm256_loadu_ps(rewards.row(b0 + k) + t0);
      if constexpr (kValues) v[k] = _mm256_loadu_ps(values.row(b0 + k) + t0);
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask.row(b0 + k) + t0));
      keep[k] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_setzero_si256()));
    }
    transpose8x8(r);
    if constexpr (kValues) transpose8x8(v);
    transpose8x8(keep);
    for (int j = 7; j >= 0; --j) {
      const __m256 delta = kValues ? _mm256_sub_ps(_mm256_add_ps(r[j], _mm256_mul_ps(g, next_v)), v[j]) : r[j];
      const __m256 aj = _mm256_add_ps(delta, _mm256_mul_ps(gl, running));
      running = _mm256_blendv_ps(running, aj, keep[j]);
      a[j] = _mm256_and_ps(aj, keep[j]);
      if constexpr (kValues) {
        next_v = _mm256_blendv_ps(next_v, v[j], keep[j]);
        rt[j] = _mm256_and_ps(_mm256_add_ps(aj, v[j]), keep[j]);
      }
    }
    transpose8x8(a);
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(adv + (b0 + k) * n_steps + t0, a[k]);
    if constexpr (kValues) {
      transpose8x8(rt);
      for (int k = 0; k < 8; ++k) _mm256_storeu_ps(ret + (b0 + k) * n_steps + t0, rt[k]);
    }
  }
  alignas(32) float running8[8], next_v8[8];
  _mm256_store_ps(running8, running);
  _mm256_store_ps(next_v8, next_v);
  for (int k = 0; k < 8; ++k) {
    scan_row<float, kValues>(rewards, values, mask, b0 + k, head, n_steps, g8[k], gl8[k], {running8[k], next_v8[k]},
                             adv, ret);
  }
}
#endif

template <typename T, bool kValues>
void gae_kernel(Rows<T> rewards, Rows<T> values, Rows<bool> mask, int64_t n_rows, int64_t n_steps,
                const float* gamma_seq, const float* lam_seq, float gamma, float lam, float* adv, float* ret) {
  const auto factors = [&](int64_t b) {
    const float g = gamma_seq ? gamma_seq[b] : gamma;
    return std::pair<float, float>{g, kValues ? g * (lam_seq ? lam_seq[b] : lam) : g};
  };
#if defined(__AVX2__)
  const bool rows_of_8 = std::is_same_v<T, float> && rewards.stride_t == 1 && (!kValues || values.stride_t == 1) &&
                         mask.stride_t == 1;
#endif
  // Tasks of >= 2^16 steps (~0.1 ms): a smaller batch runs on one thread, as one parallel region costs more than it
  // saves there, and far more on an oversubscribed machine (threads waiting to be scheduled).
  const int64_t grain = std::max<int64_t>(8, (int64_t{1} << 16) / std::max<int64_t>(n_steps, 1));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    int64_t b = begin;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<T, float>) {
      for (; rows_of_8 && b + 8 <= end; b += 8) {
        float g8[8], gl8[8];
        for (int k = 0; k < 8; ++k) std::tie(g8[k], gl8[k]) = factors(b + k);
        scan_8_rows<kValues>(rewards, values, mask, b, n_steps, g8, gl8, adv, ret);
      }
    }
#endif
    for (; b < end; ++b) {
      const auto [g, gl] = factors(b);
      scan_row<T, kValues>(rewards, values, mask, b, n_steps, n_steps, g, gl, Carry{}, adv, ret);
    }
  });
}

void check_rows(const at::Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.sizes() == shape, name, " must have shape ", shape, ", got ", x.sizes());
}

const float* seq_factor(const std::optional<at::Tensor>& x, int64_t n_rows, const char* name) {
  if (!x) return nullptr;
  TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat && x->dim() == 1 && x->size(0) == n_rows &&
                  x->is_contiguous(),
              name, " must be a contiguous float32 CPU tensor of shape [", n_rows, "]");
  return x->const_data_ptr<float>();
}

void check_inputs(const at::Tensor& rewards, const at::Tensor& mask) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be 2-D [B, T], got ", rewards.sizes());
  check_rows(rewards, "rewards", rewards.sizes());
  check_rows(mask, "mask", rewards.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_fwd_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, const std::optional<at::Tensor>& gamma_seq,
                                               const std::optional<at::Tensor>& lam_seq, double gamma, double lam,
                                               int64_t /*algorithm*/) {
  check_inputs(rewards, mask);
  check_rows(values, "values", rewards.sizes());
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "values must have the dtype of rewards");
  const int64_t n_rows = rewards.size(0), n_steps = rewards.size(1);
  const float* g = seq_factor(gamma_seq, n_rows, "gamma_seq");
  const float* l = seq_factor(lam_seq, n_rows, "lam_seq");
  at::Tensor adv = empty_output({n_rows, n_steps}, rewards.options().dtype(at::kFloat));
  at::Tensor ret = empty_output({n_rows, n_steps}, rewards.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae_fwd_cpu", [&] {
    gae_kernel<scalar_t, true>(rows<scalar_t>(rewards), rows<scalar_t>(values), rows<bool>(mask), n_rows, n_steps, g,
                               l, static_cast<float>(gamma), static_cast<float>(lam), adv.data_ptr<float>(),
                               ret.data_ptr<float>());
  });
  return {adv, ret};
}

at::Tensor discounted_returns_fwd_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                                      const std::optional<at::Tensor>& gamma_seq, double gamma,
                                      int64_t /*algorithm*/) {
  check_inputs(rewards, mask);
  const int64_t n_rows = rewards.size(0), n_steps = rewards.size(1);
  const float* g = seq_factor(gamma_seq, n_rows, "gamma_seq");
  at::Tensor ret = empty_output({n_rows, n_steps}, rewards.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "discounted_returns_fwd_cpu", [&] {
    gae_kernel<scalar_t, false>(rows<scalar_t>(rewards), rows<scalar_t>(rewards), rows<bool>(mask), n_rows, n_steps,
                                g, nullptr, static_cast<float>(gamma), 1.f, ret.data_ptr<float>(), nullptr);
  });
  return ret;
}

}  // namespace rlhf_fast::cpu
