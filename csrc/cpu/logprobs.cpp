// Log-prob / entropy / KL over the vocabulary of each row of logits, on the CPU.
//
// One streaming pass per row: the row is converted to fp32 (and divided by the temperature) in chunks that stay
// in L1, the chunk max updates an online log-sum-exp, and the same chunk feeds the entropy (or KL) sums. Rows run
// in parallel with at::parallel_for; no [N, V] temporary is ever allocated.
#include "logprobs.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "vec_utils.h"

namespace rlhf_fast::cpu {
namespace {

constexpr int64_t kChunk = 2048;  // fp32 elements per chunk: 8 KiB, resident in L1

// Running softmax state of a row relative to its running max m: s = sum e^(z-m), t = sum e^(z-m) (z-m).
struct SoftmaxState {
  float m = kNegInf;
  float s = 0.f;
  float t = 0.f;

  // Moves the reference point to a new max (no-op unless it grows).
  void rebase(float new_max) {
    if (!(new_max > m)) return;
    if (s > 0.f) {
      const float scale = std::exp(m - new_max);
      t = scale * (t + (m - new_max) * s);
      s *= scale;
    }
    m = new_max;
  }
  float lse() const { return m + std::log(s); }
  float entropy() const { return std::log(s) - t / s; }
};

// Copies x[0, n) * inv_t into buf as fp32, pads buf with -inf to a multiple of Vec::size(); returns the max.
template <typename T>
inline float load_scaled(const T* x, int64_t n, float inv_t, float* buf) {
  const Vec vinv(inv_t);
  Vec vmax(kNegInf);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec z = load_float(x + i) * vinv;
    z.store(buf + i);
    vmax = at::vec::maximum(vmax, z);
  }
  float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; i < n; ++i) {
    buf[i] = static_cast<float>(x[i]) * inv_t;
    mx = nan_max(mx, buf[i]);
  }
  for (; i % Vec::size() != 0; ++i) buf[i] = kNegInf;
  return mx;
}

// Adds a loaded chunk to the state: s += sum e^(z-m); with_t: t += sum e^(z-m)(z-m), where -inf entries add 0.
template <bool with_t>
inline void accumulate(SoftmaxState& st, const float* buf, int64_t n_padded) {
  const Vec vm(st.m), zero(0.f), neg_inf(kNegInf);
  Vec vs(0.f), vt(0.f);
  for (int64_t i = 0; i < n_padded; i += Vec::size()) {
    const Vec z = Vec::loadu(buf + i);
    const Vec d = z - vm;
    const Vec e = d.exp_u20();
    vs = vs + e;
    if constexpr (with_t) vt = at::vec::fmadd(e, Vec::blendv(d, zero, z == neg_inf), vt);
  }
  st.s += at::vec::vec_reduce_all<float>(std::plus<Vec>(), vs);
  if constexpr (with_t) st.t += at::vec::vec_reduce_all<float>(std::plus<Vec>(), vt);
}

template <typename T, bool with_entropy>
SoftmaxState row_softmax_state(const T* x, int64_t vocab, float inv_t, float* buf) {
  SoftmaxState st;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const float cmax = load_scaled(x + start, n, inv_t, buf);
    if (cmax == kNegInf) continue;  // contributes nothing
    st.rebase(cmax);
    accumulate<with_entropy>(st, buf, (n + Vec::size() - 1) / Vec::size() * Vec::size());
  }
  return st;
}

inline int64_t rows_per_task(int64_t vocab) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1)); }

template <typename T, bool with_entropy>
void logprobs_fwd_kernel(const at::Tensor& logits, const int64_t* labels, float inv_t, int64_t ignore_index,
                         float* logp, float* entropy, float* lse) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  const T* data = logits.const_data_ptr<T>();
  at::parallel_for(0, n_rows, rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kChunk + Vec::size()];
    for (int64_t r = begin; r < end; ++r) {
      const T* x = data + r * stride;
      const SoftmaxState st = row_softmax_state<T, with_entropy>(x, vocab, inv_t, buf);
      const float row_lse = st.lse();
      lse[r] = row_lse;
      entropy[r] = with_entropy ? st.entropy() : 0.f;
      float lp = 0.f;
      if (labels != nullptr) {
        const int64_t y = labels[r];
        if (y != ignore_index) {
          lp = (y >= 0 && y < vocab) ? static_cast<float>(x[y]) * inv_t - row_lse
                                     : std::numeric_limits<float>::quiet_NaN();
        }
      }
      logp[r] = lp;
    }
  });
}

// grad_z_j = g [j == y] + p_j (c - gH lp_j), lp_j = z_j - lse, c = gL - g - gH H; grad_x = grad_z / T.
// (Written with lp_j rather than z_j so that large logits, e.g. 1e4, do not cancel catastrophically.)
// -inf entries get 0.
template <typename T>
void logprobs_bwd_kernel(const float* grad_logp, const float* grad_entropy, const float* grad_lse,
                         const at::Tensor& logits, const int64_t* labels, const float* lse, const float* entropy,
                         float inv_t, int64_t ignore_index, T* grad) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  const T* data = logits.const_data_ptr<T>();
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, n_rows, rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = data + r * stride;
      T* gx = grad + r * vocab;
      int64_t y = labels != nullptr ? labels[r] : ignore_index;
      const bool has_label = y != ignore_index && y >= 0 && y < vocab;
      const float g = has_label ? grad_logp[r] : 0.f;
      const float gh = grad_entropy[r];
      const float c = grad_lse[r] - g - gh * entropy[r];
      const auto element = [&](float z) {
        const float lp = z - lse[r];
        return z == kNegInf ? 0.f : std::exp(lp) * (c - gh * lp) * inv_t;
      };
      const Vec vinv(inv_t), vlse(lse[r]), vc(c), vgh(gh), zero(0.f), neg_inf(kNegInf);
      const auto vec_element = [&](const Vec& xv) {
        const Vec z = xv * vinv;
        const Vec lp = z - vlse;
        return Vec::blendv(lp.exp_u20() * (vc - vgh * lp) * vinv, zero, z == neg_inf);
      };
      int64_t j = 0;
      for (; j + 2 * W <= vocab; j += 2 * W) {
        store_float2(gx + j, vec_element(load_float(x + j)), vec_element(load_float(x + j + W)));
      }
      for (; j < vocab; ++j) gx[j] = static_cast<T>(element(static_cast<float>(x[j]) * inv_t));
      if (has_label) gx[y] = static_cast<T>(element(static_cast<float>(x[y]) * inv_t) + g * inv_t);
    }
  });
}

// KL(p||q) = sum p (z - w) - lse_p + lse_q, with sum p (z - w) = (sum e^(z-m) (z - w)) / s_p, one pass over both rows.
template <typename T>
void kl_div_fwd_kernel(const at::Tensor& logits, const at::Tensor& ref, float inv_t, float* kl, float* lse_p,
                       float* lse_q) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1);
  const T* p_data = logits.const_data_ptr<T>();
  const T* q_data = ref.const_data_ptr<T>();
  at::parallel_for(0, n_rows, rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float zbuf[kChunk + Vec::size()];
    alignas(64) float wbuf[kChunk + Vec::size()];
    for (int64_t r = begin; r < end; ++r) {
      const T* x = p_data + r * logits.stride(0);
      const T* xr = q_data + r * ref.stride(0);
      SoftmaxState p, q;  // p.t holds sum e^(z-m)(z - w) instead of (z - m): rescaled the same way on rebase.
      for (int64_t start = 0; start < vocab; start += kChunk) {
        const int64_t n = std::min(kChunk, vocab - start);
        const int64_t n_padded = (n + Vec::size() - 1) / Vec::size() * Vec::size();
        const float zmax = load_scaled(x + start, n, inv_t, zbuf);
        const float wmax = load_scaled(xr + start, n, inv_t, wbuf);
        if (wmax != kNegInf) {
          q.rebase(wmax);
          accumulate<false>(q, wbuf, n_padded);
        }
        if (zmax == kNegInf) continue;
        if (zmax > p.m) {
          if (p.s > 0.f) {
            const float scale = std::exp(p.m - zmax);
            p.t *= scale;
            p.s *= scale;
          }
          p.m = zmax;
        }
        const Vec vm(p.m), zero(0.f);
        Vec vs(0.f), vt(0.f);
        for (int64_t i = 0; i < n_padded; i += Vec::size()) {
          const Vec z = Vec::loadu(zbuf + i), w = Vec::loadu(wbuf + i);
          const Vec e = (z - vm).exp_u20();
          vs = vs + e;
          vt = at::vec::fmadd(e, Vec::blendv(z - w, zero, e == zero), vt);
        }
        p.s += at::vec::vec_reduce_all<float>(std::plus<Vec>(), vs);
        p.t += at::vec::vec_reduce_all<float>(std::plus<Vec>(), vt);
      }
      lse_p[r] = p.lse();
      lse_q[r] = q.lse();
      kl[r] = p.t / p.s - lse_p[r] + lse_q[r];
    }
  });
}

// grad_z_j = g p_j ((z_j - lse_p) - (w_j - lse_q) - KL); grad_x = grad_z / T. Each log-prob is formed before the
// difference: z - w + (lse_q - lse_p) would cancel catastrophically at a small temperature (z, w ~ 1 / T).
template <typename T>
void kl_div_bwd_kernel(const float* grad_kl, const at::Tensor& logits, const at::Tensor& ref, const float* lse_p,
                       const float* lse_q, const float* kl, float inv_t, T* grad) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1);
  const T* p_data = logits.const_data_ptr<T>();
  const T* q_data = ref.const_data_ptr<T>();
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, n_rows, rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = p_data + r * logits.stride(0);
      const T* xr = q_data + r * ref.stride(0);
      T* gx = grad + r * vocab;
      const float g = grad_kl[r] * inv_t;
      const auto element = [&](float z, float w) {
        const float lp = z - lse_p[r], p = std::exp(lp);
        return p == 0.f ? 0.f : g * p * (lp - (w - lse_q[r]) - kl[r]);
      };
      const Vec vinv(inv_t), vlse(lse_p[r]), vlse_q(lse_q[r]), vkl(kl[r]), vg(g), zero(0.f);
      const auto vec_element = [&](int64_t j) {
        const Vec z = load_float(x + j) * vinv, w = load_float(xr + j) * vinv;
        const Vec lp = z - vlse, p = lp.exp_u20();
        return Vec::blendv(vg * p * (lp - (w - vlse_q) - vkl), zero, p == zero);
      };
      int64_t j = 0;
      for (; j + 2 * W <= vocab; j += 2 * W) store_float2(gx + j, vec_element(j), vec_element(j + W));
      for (; j < vocab; ++j) {
        gx[j] = static_cast<T>(element(static_cast<float>(x[j]) * inv_t, static_cast<float>(xr[j]) * inv_t));
      }
    }
  });
}

at::Tensor float_rows(const at::Tensor& logits) { return at::empty({logits.size(0)}, logits.options().dtype(at::kFloat)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with unit stride in the last dimension");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous() && t.scalar_type() == dtype, name,
              " must be a contiguous 1-D tensor of ", n, " elements of type ", dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(const at::Tensor& logits,
                                                               const std::optional<at::Tensor>& labels,
                                                               double temperature, int64_t ignore_index,
                                                               bool compute_entropy) {
  check_rows(logits, "logits");
  if (labels) check_vector(*labels, logits.size(0), at::kLong, "labels");
  at::Tensor logp = float_rows(logits), entropy = float_rows(logits), lse = float_rows(logits);
  const int64_t* label_ptr = labels ? labels->const_data_ptr<int64_t>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / temperature);
  RLHF_FAST_DISPATCH_LOGITS(logits.scalar_type(), "logprobs_fwd_cpu", [&] {
    if (compute_entropy) {
      logprobs_fwd_kernel<scalar_t, true>(logits, label_ptr, inv_t, ignore_index, logp.data_ptr<float>(),
                                          entropy.data_ptr<float>(), lse.data_ptr<float>());
    } else {
      logprobs_fwd_kernel<scalar_t, false>(logits, label_ptr, inv_t, ignore_index, logp.data_ptr<float>(),
                                           entropy.data_ptr<float>(), lse.data_ptr<float>());
    }
  });
  return {logp, entropy, lse};
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& grad_lse,
                            const at::Tensor& logits, const std::optional<at::Tensor>& labels, const at::Tensor& lse,
                            const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  check_rows(logits, "logits");
  const int64_t n = logits.size(0);
  for (const auto& [t, name] : {std::pair{&grad_logp, "grad_logp"}, {&grad_entropy, "grad_entropy"},
                                {&grad_lse, "grad_lse"}, {&lse, "lse"}, {&entropy, "entropy"}}) {
    check_vector(*t, n, at::kFloat, name);
  }
  if (labels) check_vector(*labels, n, at::kLong, "labels");
  at::Tensor grad = at::empty({n, logits.size(1)}, logits.options());
  RLHF_FAST_DISPATCH_LOGITS(logits.scalar_type(), "logprobs_bwd_cpu", [&] {
    logprobs_bwd_kernel<scalar_t>(grad_logp.const_data_ptr<float>(), grad_entropy.const_data_ptr<float>(),
                                  grad_lse.const_data_ptr<float>(), logits,
                                  labels ? labels->const_data_ptr<int64_t>() : nullptr, lse.const_data_ptr<float>(),
                                  entropy.const_data_ptr<float>(), static_cast<float>(1.0 / temperature),
                                  ignore_index, grad.data_ptr<scalar_t>());
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_fwd_cpu(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                             double temperature) {
  check_rows(logits, "logits");
  check_rows(ref_logits, "ref_logits");
  TORCH_CHECK(logits.sizes() == ref_logits.sizes() && logits.scalar_type() == ref_logits.scalar_type(),
              "logits and ref_logits must have the same shape and dtype");
  at::Tensor kl = float_rows(logits), lse_p = float_rows(logits), lse_q = float_rows(logits);
  RLHF_FAST_DISPATCH_LOGITS(logits.scalar_type(), "kl_div_fwd_cpu", [&] {
    kl_div_fwd_kernel<scalar_t>(logits, ref_logits, static_cast<float>(1.0 / temperature), kl.data_ptr<float>(),
                                lse_p.data_ptr<float>(), lse_q.data_ptr<float>());
  });
  return {kl, lse_p, lse_q};
}

at::Tensor kl_div_bwd_cpu(const at::Tensor& grad_kl, const at::Tensor& logits, const at::Tensor& ref_logits,
                          const at::Tensor& lse_p, const at::Tensor& lse_q, const at::Tensor& kl, double temperature) {
  check_rows(logits, "logits");
  check_rows(ref_logits, "ref_logits");
  const int64_t n = logits.size(0);
  for (const auto& [t, name] : {std::pair{&grad_kl, "grad_kl"}, {&lse_p, "lse_p"}, {&lse_q, "lse_q"}, {&kl, "kl"}}) {
    check_vector(*t, n, at::kFloat, name);
  }
  at::Tensor grad = at::empty({n, logits.size(1)}, logits.options());
  RLHF_FAST_DISPATCH_LOGITS(logits.scalar_type(), "kl_div_bwd_cpu", [&] {
    kl_div_bwd_kernel<scalar_t>(grad_kl.const_data_ptr<float>(), logits, ref_logits, lse_p.const_data_ptr<float>(),
                                lse_q.const_data_ptr<float>(), kl.const_data_ptr<float>(),
                                static_cast<float>(1.0 / temperature), grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace rlhf_fast::cpu
