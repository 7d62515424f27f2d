// Log-prob / entropy / KL over the vocabulary of each row of logits, on the CPU.
//
// One streaming pass per row: the row is converted to fp32 (and divided by the temperature) in chunks that stay
// in L1, the chunk max updates an online log-sum-exp, and the same chunk feeds the entropy (or KL) sums and, with a
// kept threshold m, the kept sum (the entries with raw logit >= m, relative to the same running max). Rows run
// in parallel with at::parallel_for; no [N, V] temporary is ever allocated.
#include "logprobs.h"
#include "memory.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "vec_utils.h"

namespace rlhf_fast::cpu {
namespace {

constexpr int64_t kChunk = 2048;  // fp32 elements per chunk: 8 KiB, resident in L1

// Running softmax state of a row relative to its running max m: s = sum e^(z-m), t = sum e^(z-m) (z-m), and the
// kept sum k = sum_{x >= threshold} e^(z-m) (rescaled exactly as s: with everything kept, k == s bit for bit).
struct SoftmaxState {
  float m = kNegInf;
  float s = 0.f;
  float t = 0.f;
  float k = 0.f;

  // Moves the reference point to a new max (no-op unless it grows).
  void rebase(float new_max) {
    if (!(new_max > m)) return;
    if (s > 0.f) {
      const float scale = std::exp(m - new_max);
      t = scale * (t + (m - new_max) * s);
      s *= scale;
      k *= scale;
    }
    m = new_max;
  }
  float lse() const { return m + std::log(s); }
  float entropy() const { return std::log(s) - t / s; }
};

// Copies x[0, n) * inv_t into buf as fp32, pads buf with -inf to a multiple of Vec::size(); returns the max.
// raw (if not null) receives the unscaled fp32 logits, padded likewise (the kept set compares raw logits).
template <typename T>
inline float load_scaled(const T* x, int64_t n, float inv_t, float* buf, float* raw = nullptr) {
  const Vec vinv(inv_t);
  Vec vmax(kNegInf);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec xv = load_float(x + i);
    const Vec z = xv * vinv;
    z.store(buf + i);
    if (raw != nullptr) xv.store(raw + i);
    vmax = at::vec::maximum(vmax, z);
  }
  float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; i < n; ++i) {
    buf[i] = static_cast<float>(x[i]) * inv_t;
    if (raw != nullptr) raw[i] = static_cast<float>(x[i]);
    mx = nan_max(mx, buf[i]);
  }
  for (; i % Vec::size() != 0; ++i) {
    buf[i] = kNegInf;
    if (raw != nullptr) raw[i] = kNegInf;
  }
  return mx;
}

// Adds a loaded chunk to the state: s += sum e^(z-m); with_t: t += sum e^(z-m)(z-m), where -inf entries add 0;
// with_kept: k += sum_{raw >= threshold} e^(z-m).
template <bool with_t, bool with_kept>
inline void accumulate(SoftmaxState& st, const float* buf, const float* raw, float threshold, int64_t n_padded) {
  const Vec vm(st.m), zero(0.f), neg_inf(kNegInf), vthr(threshold);
  Vec vs(0.f), vt(0.f), vk(0.f);
  for (int64_t i = 0; i < n_padded; i += Vec::size()) {
    const Vec z = Vec::loadu(buf + i);
    const Vec d = z - vm;
    const Vec e = d.exp_u20();
    vs = vs + e;
    if constexpr (with_t) vt = at::vec::fmadd(e, Vec::blendv(d, zero, z == neg_inf), vt);
    if constexpr (with_kept) vk = vk + Vec::blendv(zero, e, Vec::loadu(raw + i) >= vthr);
  }
  st.s += at::vec::vec_reduce_all<float>(std::plus<Vec>(), vs);
  if constexpr (with_t) st.t += at::vec::vec_reduce_all<float>(std::plus<Vec>(), vt);
  if constexpr (with_kept) st.k += at::vec::vec_reduce_all<float>(std::plus<Vec>(), vk);
}

template <typename T, bool with_entropy, bool with_kept>
SoftmaxState row_softmax_state(const T* x, int64_t vocab, float inv_t, float threshold, float* buf, float* raw) {
  SoftmaxState st;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const float cmax = load_scaled(x + start, n, inv_t, buf, with_kept ? raw : nullptr);
    if (cmax == kNegInf) continue;  // contributes nothing
    if (std::isnan(cmax)) {         // a NaN logit: the row has no distribution (exp_u20 need not propagate NaN)
      st.m = cmax;
      return st;
    }
    st.rebase(cmax);
    accumulate<with_entropy, with_kept>(st, buf, raw, threshold, (n + Vec::size() - 1) / Vec::size() * Vec::size());
  }
  return st;
}

inline int64_t rows_per_task(int64_t vocab) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1)); }

// with_kept: lse_kept = log sum_{v in K} e^z, K = {v : x_v >= threshold} + the label (added at the end if below the
// threshold), and logp = z_y - lse_kept.
template <typename T, bool with_entropy, bool with_kept>
void logprobs_fwd_kernel(const at::Tensor& logits, const int64_t* labels, const float* threshold, float inv_t,
                         int64_t ignore_index, float* logp, float* entropy, float* lse, float* lse_kept) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  const T* data = logits.const_data_ptr<T>();
  at::parallel_for(0, n_rows, rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kChunk + Vec::size()];
    alignas(64) float raw[with_kept ? kChunk + Vec::size() : 1];
    for (int64_t r = begin; r < end; ++r) {
      const T* x = data + r * stride;
      const float thr = with_kept ? threshold[r] : kNegInf;
      SoftmaxState st = row_softmax_state<T, with_entropy, with_kept>(x, vocab, inv_t, thr, buf, raw);
      // A NaN or +inf logit defines no distribution: NaN, as torch.log_softmax (exp_u20 need not propagate NaN).
      const bool no_distribution = !(st.m < std::numeric_limits<float>::infinity());
      const float row_lse = no_distribution ? std::numeric_limits<float>::quiet_NaN() : st.lse();
      lse[r] = row_lse;
      entropy[r] = !with_entropy ? 0.f : no_distribution ? row_lse : st.entropy();
      const int64_t y = labels != nullptr ? labels[r] : ignore_index;
      const bool has_label = y != ignore_index && y >= 0 && y < vocab;
      float denominator = row_lse;
      float lp = 0.f;
      if (y != ignore_index && !has_label) lp = std::numeric_limits<float>::quiet_NaN();
      if constexpr (with_kept) {
        denominator = no_distribution ? row_lse : st.m + std::log(st.k);
        if (has_label && !no_distribution && !(static_cast<float>(x[y]) >= thr)) {
          // the label below the threshold joins K: log-add it in units relative to m. The rest of K is empty or
          // holds the row's max (k >= 1); alone, the label gives logp = 0 exactly, whatever its distance to m.
          const float a = std::log(st.k), b = static_cast<float>(x[y]) * inv_t - st.m;
          const float rel = a == kNegInf ? b : std::max(a, b) + std::log1p(std::exp(-std::fabs(a - b)));
          denominator = st.m + rel;
          lp = b - rel;
        } else if (has_label) {
          lp = static_cast<float>(x[y]) * inv_t - denominator;
        }
        lse_kept[r] = denominator;
      } else if (has_label) {
        lp = static_cast<float>(x[y]) * inv_t - denominator;
      }
      logp[r] = lp;
    }
  });
}

// gx_j = p_j (c - gh lp_j) / T + [j == label] gy over a row, lp_j = z_j - lse, -inf entries 0 (label -1: none).
template <typename T>
void plain_row_grad(const T* x, int64_t vocab, float c, float gh, float row_lse, int64_t label, float gy, float inv_t,
                    T* gx) {
  constexpr int64_t W = Vec::size();
  const auto element = [&](float z) {
    const float lp = z - row_lse;
    return z == kNegInf ? 0.f : std::exp(lp) * (c - gh * lp) * inv_t;
  };
  const Vec vinv(inv_t), vlse(row_lse), vc(c), vgh(gh), zero(0.f), neg_inf(kNegInf);
  const auto vec_element = [&](const Vec& xv) {
    const Vec z = xv * vinv;
    const Vec lp = z - vlse;
    return Vec::blendv(lp.exp_u20() * (vc - vgh * lp) * vinv, zero, z == neg_inf);
  };
  const float x_label = label >= 0 ? static_cast<float>(x[label]) : 0.f;  // read first: gx may be x itself
  int64_t j = 0;
  for (; j + 2 * W <= vocab; j += 2 * W) {
    store_float2(gx + j, vec_element(load_float(x + j)), vec_element(load_float(x + j + W)));
  }
  for (; j < vocab; ++j) gx[j] = static_cast<T>(element(static_cast<float>(x[j]) * inv_t));
  if (label >= 0) gx[label] = static_cast<T>(element(x_label * inv_t) + gy);
}

// gx_j = (p_j (c - gh lp_j) + q_j ck) / T + [j == label] gy, q_j = [x_j >= thr or j == label] e^(z_j - lse_kept);
// -inf entries 0.
template <typename T>
void kept_row_grad(const T* x, int64_t vocab, float c, float gh, float ck, float row_lse, float row_lse_kept,
                   float thr, int64_t label, float gy, float inv_t, T* gx) {
  constexpr int64_t W = Vec::size();
  const bool with_p = c != 0.f || gh != 0.f;
  const auto element = [&](float xj, bool kept) {
    const float z = xj * inv_t, lp = z - row_lse;
    const float from_p = with_p ? std::exp(lp) * (c - gh * lp) : 0.f;
    return z == kNegInf ? 0.f : (from_p + (kept ? std::exp(z - row_lse_kept) * ck : 0.f)) * inv_t;
  };
  const Vec vinv(inv_t), vlse(row_lse), vlk(row_lse_kept), vthr(thr), vc(c), vgh(gh), vck(ck), zero(0.f),
      neg_inf(kNegInf);
  const auto vec_element = [&](const Vec& xv) {
    const Vec z = xv * vinv;
    Vec out = Vec::blendv(zero, (z - vlk).exp_u20() * vck, xv >= vthr);
    if (with_p) {
      const Vec lp = z - vlse;
      out = out + lp.exp_u20() * (vc - vgh * lp);
    }
    return Vec::blendv(out * vinv, zero, z == neg_inf);
  };
  const float x_label = label >= 0 ? static_cast<float>(x[label]) : 0.f;  // read first: gx may be x itself
  int64_t j = 0;
  for (; j + 2 * W <= vocab; j += 2 * W) {
    store_float2(gx + j, vec_element(load_float(x + j)), vec_element(load_float(x + j + W)));
  }
  for (; j < vocab; ++j) gx[j] = static_cast<T>(element(static_cast<float>(x[j]), static_cast<float>(x[j]) >= thr));
  if (label >= 0) gx[label] = static_cast<T>(element(x_label, true) + gy);
}

// grad_z_j = g [j == y] + p_j (c - gH lp_j), lp_j = z_j - lse, c = gL - g - gH H; grad_x = grad_z / T.
// (Written with lp_j rather than z_j so that large logits, e.g. 1e4, do not cancel catastrophically.)
// -inf entries get 0. with_kept: logp = z_y - lse_kept, so the -g moves to the kept set:
//   grad_z_j = g [j == y] + p_j (c - gH lp_j) + q_j ck,  c = gL - gH H,  ck = gK - g,
//   q_j = [j in K] e^(z_j - lse_kept);
// a row with threshold -inf keeps everything (q = p) and takes the plain formula with c = gL + gK - g - gH H; a row
// with c = gH = 0 (log-probs alone) skips the p term (one exponential per entry, as without a threshold).
template <typename T, bool with_kept>
void logprobs_bwd_kernel(const float* grad_logp, const float* grad_entropy, const float* grad_lse,
                         const float* grad_lse_kept, const at::Tensor& logits, const int64_t* labels,
                         const float* threshold, const float* lse, const float* lse_kept, const float* entropy,
                         float inv_t, int64_t ignore_index, T* grad) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  const T* data = logits.const_data_ptr<T>();
  at::parallel_for(0, n_rows, rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = data + r * stride;
      T* gx = grad + r * vocab;
      if (!std::isfinite(lse[r])) {  // a row of -inf (or with +inf / NaN): NaN outputs, NaN gradient (as torch)
        std::fill(gx, gx + vocab, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
        continue;
      }
      const int64_t y = labels != nullptr ? labels[r] : ignore_index;
      const bool has_label = y != ignore_index && y >= 0 && y < vocab;
      const float g = has_label ? grad_logp[r] : 0.f;
      const float gh = grad_entropy[r];
      const float thr = with_kept ? threshold[r] : kNegInf;
      const int64_t label = has_label ? y : -1;
      if (!with_kept || thr == kNegInf) {
        const float gl = with_kept ? grad_lse[r] + grad_lse_kept[r] : grad_lse[r];
        plain_row_grad(x, vocab, gl - g - gh * entropy[r], gh, lse[r], label, g * inv_t, inv_t, gx);
      } else {
        kept_row_grad(x, vocab, grad_lse[r] - gh * entropy[r], gh, grad_lse_kept[r] - g, lse[r], lse_kept[r], thr,
                      label, g * inv_t, inv_t, gx);
      }
    }
  });
}

// KL(p||q) in units relative to each row's raw max (m_p = max x, m_q = max x_ref, not scaled), so that no two large
// log-sum-exps are ever subtracted (at a small temperature z = x / T and w = x_ref / T are ~1 / T):
//   dz = (x - m_p) / T,  dw = (x_ref - m_q) / T,  s_p = sum e^dz,  s_q = sum e^dw,  a = sum p (dz - dw),
//   KL = a - log s_p + log s_q.
// x - m is exact near the max (Sterbenz), so p is as accurate as the logits allow, whatever the temperature; the
// -inf entries of p (e^dz = 0) add nothing. One pass over both rows with an online max for each.
struct KlState {
  float m_p = kNegInf, m_q = kNegInf, s_p = 0.f, s_q = 0.f, t = 0.f;  // t = sum e^dz (dz - dw)

  // Moves both reference points to the new maxima (each a no-op unless it grows).
  void rebase(float new_p, float new_q, float inv_t) {
    const bool grow_p = new_p > m_p, grow_q = new_q > m_q;
    if (s_p > 0.f && (grow_p || grow_q)) {
      // dz shifts by (m_p - new_p) / T and dw by (m_q - new_q) / T; with m_q = -inf, t is already +inf (p > 0 where q
      // = 0) and stays so.
      const float shift_p = grow_p ? (m_p - new_p) * inv_t : 0.f;
      const float shift_q = grow_q ? (m_q - new_q) * inv_t : 0.f;
      const float scale = std::exp(shift_p);
      t = scale == 0.f ? 0.f : scale * (t + s_p * (shift_p - shift_q));  // scale 0: the old mass vanishes
      s_p *= scale;
    }
    if (grow_q && s_q > 0.f) s_q *= std::exp((m_q - new_q) * inv_t);
    if (grow_p) m_p = new_p;
    if (grow_q) m_q = new_q;
  }
};

template <typename T>
void kl_div_fwd_kernel(const at::Tensor& logits, const at::Tensor& ref, float inv_t, float* kl, float* max_p,
                       float* max_q, float* log_s_p, float* mean_d) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1);
  const T* p_data = logits.const_data_ptr<T>();
  const T* q_data = ref.const_data_ptr<T>();
  at::parallel_for(0, n_rows, rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float xbuf[kChunk + Vec::size()];
    alignas(64) float rbuf[kChunk + Vec::size()];
    for (int64_t r = begin; r < end; ++r) {
      const T* x = p_data + r * logits.stride(0);
      const T* xr = q_data + r * ref.stride(0);
      KlState st;
      for (int64_t start = 0; start < vocab; start += kChunk) {
        const int64_t n = std::min(kChunk, vocab - start);
        const int64_t n_padded = (n + Vec::size() - 1) / Vec::size() * Vec::size();
        const float xmax = load_scaled(x + start, n, 1.f, xbuf);  // raw logits (x * 1 is exact)
        const float rmax = load_scaled(xr + start, n, 1.f, rbuf);
        if (std::isnan(xmax) || std::isnan(rmax)) {  // a NaN logit: no distribution (exp_u20 need not propagate NaN)
          st.m_p = std::numeric_limits<float>::quiet_NaN();
          break;
        }
        st.rebase(xmax, rmax, inv_t);
        if (st.m_p == kNegInf && st.m_q == kNegInf) continue;  // nothing seen yet in either row
        // A max still -inf (nothing seen in that row yet) is used as 0, so that its -inf entries give e = 0, not NaN.
        const Vec vmp(st.m_p == kNegInf ? 0.f : st.m_p), vmq(st.m_q == kNegInf ? 0.f : st.m_q), vinv(inv_t), zero(0.f);
        Vec vsp(0.f), vsq(0.f), vt(0.f);
        for (int64_t i = 0; i < n_padded; i += Vec::size()) {
          const Vec dz = (Vec::loadu(xbuf + i) - vmp) * vinv, dw = (Vec::loadu(rbuf + i) - vmq) * vinv;
          const Vec ep = dz.exp_u20();
          vsp = vsp + ep;
          vsq = vsq + dw.exp_u20();
          vt = at::vec::fmadd(ep, Vec::blendv(dz - dw, zero, ep == zero), vt);
        }
        st.s_p += at::vec::vec_reduce_all<float>(std::plus<Vec>(), vsp);
        st.s_q += at::vec::vec_reduce_all<float>(std::plus<Vec>(), vsq);
        st.t += at::vec::vec_reduce_all<float>(std::plus<Vec>(), vt);
      }
      const float a = st.t / st.s_p, lsp = std::log(st.s_p);
      constexpr float kInf = std::numeric_limits<float>::infinity();
      // a NaN or +inf logit in either row defines no distribution: NaN
      kl[r] = !(st.m_p < kInf) || st.m_q == kInf ? std::numeric_limits<float>::quiet_NaN() : a - lsp + std::log(st.s_q);
      max_p[r] = st.m_p;
      max_q[r] = st.m_q;
      log_s_p[r] = lsp;
      mean_d[r] = std::isnan(kl[r]) ? kl[r] : a;  // NaN marks a NaN KL for the backward (q alone may be NaN)
    }
  });
}

// grad_x_j = g p_j (d_j - a) / T, p_j = e^(dz_j - log s_p), d_j = dz_j - dw_j, in the forward's relative units (so
// nothing large cancels at a small temperature); entries with p_j = 0 get 0, rows with a NaN KL NaN.
template <typename T>
void kl_div_bwd_kernel(const float* grad_kl, const at::Tensor& logits, const at::Tensor& ref, const float* max_p,
                       const float* max_q, const float* log_s_p, const float* mean_d, float inv_t, T* grad) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1);
  const T* p_data = logits.const_data_ptr<T>();
  const T* q_data = ref.const_data_ptr<T>();
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, n_rows, rows_per_task(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = p_data + r * logits.stride(0);
      const T* xr = q_data + r * ref.stride(0);
      T* gx = grad + r * vocab;
      if (std::isnan(mean_d[r])) {  // a NaN KL (NaN / +inf logits, or a row without a distribution): NaN gradient
        std::fill(gx, gx + vocab, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
        continue;
      }
      const Vec vmp(max_p[r]), vmq(max_q[r]), vlsp(log_s_p[r]), va(mean_d[r]), vg(grad_kl[r] * inv_t), vinv(inv_t),
          zero(0.f);
      const auto vec_element = [&](const Vec& xv, const Vec& rv) {
        const Vec dz = (xv - vmp) * vinv, dw = (rv - vmq) * vinv;
        const Vec p = (dz - vlsp).exp_u20();
        return Vec::blendv(vg * p * ((dz - dw) - va), zero, p == zero);
      };
      int64_t j = 0;
      for (; j + 2 * W <= vocab; j += 2 * W) {
        store_float2(gx + j, vec_element(load_float(x + j), load_float(xr + j)),
                     vec_element(load_float(x + j + W), load_float(xr + j + W)));
      }
      if (j < vocab) {  // the tail, through a zero-padded buffer so that it rounds exactly as the vector body
        alignas(64) float xt[2 * W], rt[2 * W], out[2 * W];
        for (int64_t i = 0; i < 2 * W; ++i) {
          xt[i] = j + i < vocab ? static_cast<float>(x[j + i]) : 0.f;
          rt[i] = j + i < vocab ? static_cast<float>(xr[j + i]) : 0.f;
        }
        vec_element(Vec::loadu(xt), Vec::loadu(rt)).store(out);
        vec_element(Vec::loadu(xt + W), Vec::loadu(rt + W)).store(out + W);
        for (int64_t i = 0; j + i < vocab; ++i) gx[j + i] = static_cast<T>(out[i]);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& kept_threshold,
    double temperature, int64_t ignore_index, bool compute_entropy) {
  check_rows(logits, "logits");
  if (labels) check_vector(*labels, logits.size(0), at::kLong, "labels");
  if (kept_threshold) check_vector(*kept_threshold, logits.size(0), at::kFloat, "kept_threshold");
  at::Tensor logp = float_rows(logits), entropy = float_rows(logits), lse = float_rows(logits);
  at::Tensor lse_kept = kept_threshold ? float_rows(logits) : at::empty({0}, logits.options().dtype(at::kFloat));
  const int64_t* label_ptr = labels ? labels->const_data_ptr<int64_t>() : nullptr;
  const float* thr_ptr = kept_threshold ? kept_threshold->const_data_ptr<float>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / temperature);
  RLHF_FAST_DISPATCH_LOGITS(logits.scalar_type(), "logprobs_fwd_cpu", [&] {
    const auto run = [&](auto with_entropy, auto with_kept) {
      logprobs_fwd_kernel<scalar_t, decltype(with_entropy)::value, decltype(with_kept)::value>(
          logits, label_ptr, thr_ptr, inv_t, ignore_index, logp.data_ptr<float>(), entropy.data_ptr<float>(),
          lse.data_ptr<float>(), kept_threshold ? lse_kept.data_ptr<float>() : nullptr);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (compute_entropy) {
      kept_threshold ? run(Yes{}, Yes{}) : run(Yes{}, No{});
    } else {
      kept_threshold ? run(No{}, Yes{}) : run(No{}, No{});
    }
  });
  return {logp, entropy, lse, lse_kept};
}

void logprobs_bwd_into_cpu(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& grad_lse,
                           const std::optional<at::Tensor>& grad_lse_kept, const at::Tensor& logits,
                           const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& kept_threshold,
                           const at::Tensor& lse, const std::optional<at::Tensor>& lse_kept, const at::Tensor& entropy,
                           double temperature, int64_t ignore_index, const at::Tensor& grad) {
  check_rows(logits, "logits");
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  grad.device() == logits.device() && grad.is_contiguous(),
              "out must be a contiguous tensor of the shape, dtype and device of logits ", logits.sizes());
  TORCH_CHECK(!grad.is_same(logits) || logits.is_contiguous(), "out may be logits only when logits are contiguous");
  const int64_t n = logits.size(0);
  for (const auto& [t, name] : {std::pair{&grad_logp, "grad_logp"}, {&grad_entropy, "grad_entropy"},
                                {&grad_lse, "grad_lse"}, {&lse, "lse"}, {&entropy, "entropy"}}) {
    check_vector(*t, n, at::kFloat, name);
  }
  if (labels) check_vector(*labels, n, at::kLong, "labels");
  const bool kept = kept_threshold.has_value();
  TORCH_CHECK(kept == grad_lse_kept.has_value() && kept == lse_kept.has_value(),
              "kept_threshold, grad_lse_kept and lse_kept must be given together");
  if (kept) {
    for (const auto& [t, name] : {std::pair{&*kept_threshold, "kept_threshold"}, {&*grad_lse_kept, "grad_lse_kept"},
                                  {&*lse_kept, "lse_kept"}}) {
      check_vector(*t, n, at::kFloat, name);
    }
  }
  RLHF_FAST_DISPATCH_LOGITS(logits.scalar_type(), "logprobs_bwd_cpu", [&] {
    const auto run = [&](auto with_kept) {
      logprobs_bwd_kernel<scalar_t, decltype(with_kept)::value>(
          grad_logp.const_data_ptr<float>(), grad_entropy.const_data_ptr<float>(), grad_lse.const_data_ptr<float>(),
          kept ? grad_lse_kept->const_data_ptr<float>() : nullptr, logits,
          labels ? labels->const_data_ptr<int64_t>() : nullptr,
          kept ? kept_threshold->const_data_ptr<float>() : nullptr,
          lse.const_data_ptr<float>(), kept ? lse_kept->const_data_ptr<float>() : nullptr,
          entropy.const_data_ptr<float>(), static_cast<float>(1.0 / temperature), ignore_index,
          grad.data_ptr<scalar_t>());
    };
    kept ? run(std::true_type{}) : run(std::false_type{});
  });
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& grad_lse,
                            const std::optional<at::Tensor>& grad_lse_kept, const at::Tensor& logits,
                            const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& kept_threshold,
                            const at::Tensor& lse, const std::optional<at::Tensor>& lse_kept,
                            const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  check_rows(logits, "logits");
  at::Tensor grad = empty_output({logits.size(0), logits.size(1)}, logits.options());
  logprobs_bwd_into_cpu(grad_logp, grad_entropy, grad_lse, grad_lse_kept, logits, labels, kept_threshold, lse,
                        lse_kept, entropy, temperature, ignore_index, grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_div_fwd_cpu(const at::Tensor& logits,
                                                                                     const at::Tensor& ref_logits,
                                                                                     double temperature) {
  check_rows(logits, "logits");
  check_rows(ref_logits, "ref_logits");
  TORCH_CHECK(logits.sizes() == ref_logits.sizes() && logits.scalar_type() == ref_logits.scalar_type(),
              "logits and ref_logits must have the same shape and dtype");
  at::Tensor kl = float_rows(logits), max_p = float_rows(logits), max_q = float_rows(logits),
             log_s_p = float_rows(logits), mean_d = float_rows(logits);
  RLHF_FAST_DISPATCH_LOGITS(logits.scalar_type(), "kl_div_fwd_cpu", [&] {
    kl_div_fwd_kernel<scalar_t>(logits, ref_logits, static_cast<float>(1.0 / temperature), kl.data_ptr<float>(),
                                max_p.data_ptr<float>(), max_q.data_ptr<float>(), log_s_p.data_ptr<float>(),
                                mean_d.data_ptr<float>());
  });
  return {kl, max_p, max_q, log_s_p, mean_d};
}

at::Tensor kl_div_bwd_cpu(const at::Tensor& grad_kl, const at::Tensor& logits, const at::Tensor& ref_logits,
                          const at::Tensor& max_p, const at::Tensor& max_q, const at::Tensor& log_s_p,
                          const at::Tensor& mean_d, double temperature) {
  check_rows(logits, "logits");
  check_rows(ref_logits, "ref_logits");
  const int64_t n = logits.size(0);
  for (const auto& [t, name] : {std::pair{&grad_kl, "grad_kl"}, {&max_p, "max_p"}, {&max_q, "max_q"},
                                {&log_s_p, "log_s_p"}, {&mean_d, "mean_d"}}) {
    check_vector(*t, n, at::kFloat, name);
  }
  at::Tensor grad = empty_output({n, logits.size(1)}, logits.options());
  RLHF_FAST_DISPATCH_LOGITS(logits.scalar_type(), "kl_div_bwd_cpu", [&] {
    kl_div_bwd_kernel<scalar_t>(grad_kl.const_data_ptr<float>(), logits, ref_logits, max_p.const_data_ptr<float>(),
                                max_q.const_data_ptr<float>(), log_s_p.const_data_ptr<float>(),
                                mean_d.const_data_ptr<float>(), static_cast<float>(1.0 / temperature),
                                grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace rlhf_fast::cpu
