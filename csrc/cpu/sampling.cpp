// Batched sampling on the CPU: temperature, top-k, top-p and min-p without sorting the vocabulary; returns the token,
// its log-prob under the unfiltered temperature-scaled distribution and under the filtered one.
//
// Per row (rows run in parallel with at::parallel_for):
//   1. m = max of the logits (NaN-propagating); temperature <= 0 means greedy: the first index of the max.
//   2. e_v = exp(z_v - max z) with z = logits / T, into a row buffer (tail lanes padded with 0); S = sum e.
//   3. Every filter keeps {v : e_v >= tau} for one threshold, found exactly by bisection over the bit patterns of
//      non-negative floats (ordered like the values, so about 30 steps reach the exact value):
//        top-k: the largest tau with count(e >= tau) >= k           (ties at the k-th value are all kept)
//        top-p: the largest tau >= tau_k with mass(e >= tau) >= top_p * mass(e >= tau_k)
//        min-p: tau = min_p * max e                                 (p_v >= min_p * max p)
//      A bisection step is one vectorised pass over the candidates; when a step rules out at least half of them the
//      survivors are compacted into a second buffer, so after the first few passes the steps touch only a few values.
//   4. Inverse CDF with the row's uniform u: the first v, in index order, whose running kept mass exceeds u * M
//      (M = kept mass), located by per-block masses and then a scan inside one block, accumulated in double.
#include "sampling.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "vec_utils.h"

namespace rlhf_fast::cpu {
namespace {

constexpr int64_t W = Vec::size();
constexpr int64_t kDrawBlock = 512;  // elements per block of the inverse-CDF search

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
}

inline float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

inline int64_t round_up(int64_t n) { return (n + W - 1) / W * W; }

// Number and (kMass) sum of the values >= t among c[0, n), n a multiple of W (padding lanes hold 0).
struct CountMass {
  int64_t count;
  double mass;
};

template <bool kMass>
inline CountMass sum_ge(const float* c, int64_t n, float t) {
  const Vec vt(t), one(1.f);
  Vec cnt0(0.f), cnt1(0.f), mass0(0.f), mass1(0.f);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec a = Vec::loadu(c + i), b = Vec::loadu(c + i + W);
    const Vec ga = a >= vt, gb = b >= vt;  // all-ones lanes where true
    cnt0 = cnt0 + (ga & one);
    cnt1 = cnt1 + (gb & one);
    if constexpr (kMass) {
      mass0 = mass0 + (ga & a);
      mass1 = mass1 + (gb & b);
    }
  }
  if (i < n) {
    const Vec a = Vec::loadu(c + i);
    const Vec ga = a >= vt;
    cnt0 = cnt0 + (ga & one);
    if constexpr (kMass) mass0 = mass0 + (ga & a);
  }
  const auto add = [](Vec& x, Vec& y) { return x + y; };
  return {static_cast<int64_t>(at::vec::vec_reduce_all<float>(add, cnt0 + cnt1)),
          kMass ? static_cast<double>(at::vec::vec_reduce_all<float>(add, mass0 + mass1)) : 0.0};
}

// Copies the values of src[0, n) that are >= t (keep_ge) or < t (!keep_ge) to dst (which may be src), pads dst with
// zeros to a multiple of W and returns their number. A vector compare gives the lanes to keep, so the cost is a
// vector pass plus one store per survivor.
inline int64_t compact(const float* src, int64_t n, float* dst, float t, bool keep_ge) {
  const Vec vt(t);
  int64_t out = 0;
  for (int64_t i = 0; i < n; i += W) {
    const Vec v = Vec::loadu(src + i);
    const Vec drop = keep_ge ? (v < vt) : (v >= vt);  // all-ones lanes to drop, 0.0 lanes to keep
    unsigned keep = static_cast<unsigned>(drop.zero_mask());
    if (n - i < W) keep &= (1u << (n - i)) - 1u;
    for (; keep != 0; keep &= keep - 1) dst[out++] = src[i + __builtin_ctz(keep)];
  }
  std::fill(dst + out, dst + round_up(out), 0.f);
  return out;
}

// The largest threshold t in [lo, hi] (bit patterns of non-negative floats) with f(t) >= target, where
// f(t) = count (kMass = false) or sum (kMass = true) of the candidates >= t. Requires f(lo) >= target.
// `cand` holds n candidates padded with zeros to a multiple of W; it is read only until the first compaction, which
// writes the survivors to `scratch` (capacity >= round_up(n)); later ones compact `scratch` in place.
template <bool kMass>
float bisect(const float* cand, int64_t n, float* scratch, double target, uint32_t lo, uint32_t hi) {
  double base = 0.0;  // f of the candidates dropped because they are above every remaining threshold
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    const float t = bits_float(mid);
    const CountMass ge = sum_ge<kMass>(cand, round_up(n), t);
    const double f = base + (kMass ? ge.mass : static_cast<double>(ge.count));
    const bool ok = f >= target;
    if (ok) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
    const int64_t survivors = ok ? ge.count : n - ge.count;
    if (2 * survivors <= n) {
      if (!ok) base = f;  // the values >= t now count for every remaining threshold
      n = compact(cand, n, scratch, t, ok);
      cand = scratch;
    }
  }
  return bits_float(lo);
}

struct RowParams {
  float u, temperature, top_p, min_p;
  int64_t top_k;
};

struct RowResult {
  int64_t token;
  float logprob, filtered_logprob;
};

// Scratch of one task, reused by its rows: e and the compacted candidates (V + W floats each), block masses.
struct Scratch {
  explicit Scratch(int64_t vocab)
      : e(new float[vocab + W]), cand(new float[vocab + W]), block_mass(new float[vocab / kDrawBlock + 1]) {}
  std::unique_ptr<float[]> e, cand, block_mass;
};

// max over x[0, vocab) (NaN if any is NaN).
template <typename T>
float row_max(const T* x, int64_t vocab) {
  Vec vmax(kNegInf);
  int64_t i = 0;
  for (; i + W <= vocab; i += W) vmax = at::vec::maximum(vmax, load_float(x + i));
  float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; i < vocab; ++i) mx = nan_max(mx, static_cast<float>(x[i]));
  return mx;
}

// e[v] = exp(x[v] * inv_t - m) for v < vocab and 0 up to round_up(vocab); returns S = sum e and sets e_max.
// The tail goes through the same vector exp as the body, so equal logits always give equal e.
template <typename T>
double fill_exp(const T* x, int64_t vocab, float inv_t, float m, float* e, float& e_max) {
  const Vec vinv(inv_t), vm(m), zero(0.f), neg_inf(kNegInf);
  Vec vs(0.f), vmax(0.f);
  const auto step = [&](const Vec& z, int64_t i) {
    const Vec ev = Vec::blendv((z - vm).exp_u20(), zero, z == neg_inf);
    ev.store(e + i);
    vs = vs + ev;
    vmax = at::vec::maximum(vmax, ev);
  };
  int64_t i = 0;
  for (; i + W <= vocab; i += W) step(load_float(x + i) * vinv, i);
  if (i < vocab) {
    alignas(64) float tail[W];
    for (int64_t j = 0; j < W; ++j) tail[j] = i + j < vocab ? static_cast<float>(x[i + j]) : kNegInf;
    step(Vec::loadu(tail) * vinv, i);
  }
  const auto add = [](Vec& a, Vec& b) { return a + b; };
  e_max = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  return static_cast<double>(at::vec::vec_reduce_all<float>(add, vs));
}

// Inverse CDF over {v : e[v] >= tau, e[v] > 0}: the first v whose running kept mass exceeds u * M.
int64_t draw(const float* e, int64_t vocab, float tau, float u, float* block_mass, double& kept_mass) {
  const int64_t n_blocks = (vocab + kDrawBlock - 1) / kDrawBlock;
  const Vec vt(tau);
  double total = 0.0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t end = std::min(round_up((b + 1) * kDrawBlock), round_up(vocab));
    Vec acc(0.f);
    for (int64_t i = b * kDrawBlock; i < end; i += W) {
      const Vec v = Vec::loadu(e + i);
      acc = acc + ((v >= vt) & v);
    }
    block_mass[b] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, acc);
    total += block_mass[b];
  }
  kept_mass = total;
  const double target = static_cast<double>(u) * total;  // < total: the same sums below reach it
  double cum = 0.0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (cum + block_mass[b] > target) {
      int64_t last = -1;
      for (int64_t v = b * kDrawBlock; v < std::min((b + 1) * kDrawBlock, vocab); ++v) {
        if (e[v] >= tau && e[v] > 0.f) {
          last = v;
          cum += e[v];
          if (cum > target) return v;
        }
      }
      return last;  // the block's own sum was rounded differently: its last kept token
    }
    cum += block_mass[b];
  }
  return -1;  // unreachable for total > 0
}

template <typename T>
RowResult sample_row(const T* x, int64_t vocab, const RowParams& p, Scratch& s) {
  constexpr float nan = std::numeric_limits<float>::quiet_NaN();
  const float mx = row_max(x, vocab);
  if (!(p.temperature > 0.f)) {  // greedy: the first index of the max (0 if the row has NaN)
    int64_t token = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      if (static_cast<float>(x[v]) == mx) {
        token = v;
        break;
      }
    }
    const float lp = std::isfinite(mx) ? 0.f : nan;
    return {token, lp, lp};
  }
  const float inv_t = 1.f / p.temperature;
  const float m = mx * inv_t;
  if (!std::isfinite(m)) return {0, nan, nan};  // NaN, +inf, or no finite logit: no distribution
  float e_max = 0.f;
  float* e = s.e.get();
  const double total = fill_exp(x, vocab, inv_t, m, e, e_max);

  float tau_k = 0.f;
  const float* cand = e;  // the candidates of the top-p search: {e >= tau_k}
  int64_t n_cand = vocab;
  double mass_k = total;
  if (p.top_k > 0 && p.top_k < vocab) {
    tau_k = bisect<false>(e, vocab, s.cand.get(), static_cast<double>(p.top_k), 0, float_bits(e_max));
    n_cand = compact(e, vocab, s.cand.get(), tau_k, true);
    cand = s.cand.get();
    mass_k = sum_ge<true>(cand, round_up(n_cand), 0.f).mass;
  }
  float tau_p = 0.f;
  if (p.top_p < 1.f) {  // NaN is rejected in Python
    const double target = std::max(0.f, p.top_p) * mass_k;
    tau_p = bisect<true>(cand, n_cand, s.cand.get(), target, float_bits(tau_k), float_bits(e_max));
  }
  const float tau_m = p.min_p > 0.f ? p.min_p * e_max : 0.f;
  const float tau = std::min(std::max({tau_k, tau_p, tau_m}), e_max);  // the max is always kept

  const float u = std::min(std::max(p.u, 0.f), std::nextafter(1.f, 0.f));
  double kept_mass = 0.0;
  int64_t token = draw(e, vocab, tau, u, s.block_mass.get(), kept_mass);
  if (token < 0) token = 0;
  const float z = static_cast<float>(x[token]) * inv_t - m;
  return {token, z - static_cast<float>(std::log(total)), z - static_cast<float>(std::log(kept_mass))};
}

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n && t.is_contiguous() && t.scalar_type() == dtype,
              name, " must be a contiguous 1-D CPU tensor of ", n, " elements of type ", dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits, const at::Tensor& uniforms,
                                                         const at::Tensor& temperature, const at::Tensor& top_k,
                                                         const at::Tensor& top_p, const at::Tensor& min_p) {
  TORCH_CHECK(logits.device().is_cpu(), "logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2 && (logits.stride(1) == 1 || logits.size(1) == 1) && logits.size(1) > 0,
              "logits must be 2-D with a non-empty last dimension of unit stride");
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  check_vector(uniforms, n_rows, at::kFloat, "uniforms");
  check_vector(temperature, n_rows, at::kFloat, "temperature");
  check_vector(top_k, n_rows, at::kLong, "top_k");
  check_vector(top_p, n_rows, at::kFloat, "top_p");
  check_vector(min_p, n_rows, at::kFloat, "min_p");
  const auto float_options = logits.options().dtype(at::kFloat);
  at::Tensor tokens = at::empty({n_rows}, logits.options().dtype(at::kLong));
  at::Tensor logp = at::empty({n_rows}, float_options), filtered = at::empty({n_rows}, float_options);
  const float *u = uniforms.const_data_ptr<float>(), *t = temperature.const_data_ptr<float>(),
              *pp = top_p.const_data_ptr<float>(), *mp = min_p.const_data_ptr<float>();
  const int64_t* kk = top_k.const_data_ptr<int64_t>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *flp = filtered.data_ptr<float>();
  RLHF_FAST_DISPATCH_LOGITS(logits.scalar_type(), "sample_cpu", [&] {
    const scalar_t* data = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, std::max<int64_t>(1, 4096 / vocab), [&](int64_t begin, int64_t end) {
      Scratch scratch(vocab);
      for (int64_t r = begin; r < end; ++r) {
        const RowResult res = sample_row(data + r * row_stride, vocab, {u[r], t[r], pp[r], mp[r], kk[r]}, scratch);
        tok[r] = res.token;
        lp[r] = res.logprob;
        flp[r] = res.filtered_logprob;
      }
    });
  });
  return {tokens, logp, filtered};
}

}  // namespace rlhf_fast::cpu
