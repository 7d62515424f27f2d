// Batched sampling on the CPU: temperature, top-k, top-p and min-p without sorting the vocabulary; returns the token,
// its log-prob under the unfiltered temperature-scaled distribution and under the filtered one, and the kept
// threshold (the smallest raw logit of the kept set).
//
// Every filter keeps {v : e_v >= tau} with e_v = exp(z_v - max z), z = logits / T, so the kept set is one threshold
// per row. Per row (rows run in parallel with at::parallel_for):
//   1. One pass over the logits: the max (NaN-propagating; temperature <= 0 means greedy: its first index) and, with
//      top-k, the k-th largest logit by a running threshold: values above it are kept in a buffer, and when the buffer
//      fills up, its k-th largest (std::nth_element, a selection) becomes the new threshold. tau_k = exp of it.
//      min-p: tau_m = min_p * max e (p_v >= min_p * max p), known before any exponential is taken.
//   2. One pass computing e (vectorised; the tail through the same vector exp, so equal logits give equal e):
//      S = sum e, the top-k mass. When tau0 = max(tau_k, tau_m) > 0, the e >= tau0 are appended with their index to a
//      candidate list (the kept set is inside it); otherwise every e is stored, with per-block sums.
//   3. top-p: the largest tau >= tau_k with mass(e >= tau) >= top_p * mass(e >= tau_k), found exactly by bisection
//      over the bit patterns of non-negative floats (ordered like the values); each step is one vectorised pass over
//      the candidates, and when a step rules out at least half of them the survivors are compacted.
//   4. Inverse CDF with the row's uniform u: the first v, in index order, whose running kept mass (tau = the largest
//      threshold) exceeds u * M, M = kept mass: over the candidate list, or by block sums then one block. The pass
//      that sums M also takes the min raw logit over the kept set (a gather per kept candidate, or one more vector
//      reduction beside the block sums): the kept threshold, -inf when no filter is active (no extra pass for it).
#include "sampling.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>

#include "vec_utils.h"

namespace rlhf_fast::cpu {
namespace {

constexpr int64_t W = Vec::size();
constexpr int64_t kDrawBlock = 512;  // elements per block of the inverse-CDF search
constexpr float kInf = std::numeric_limits<float>::infinity();

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

// The largest threshold t in [lo, hi] (bit patterns of non-negative floats) with f(t) = sum of the candidates >= t
// reaching target. Requires f(lo) >= target. `cand` holds n candidates padded with zeros to a multiple of W; it is read
// only until the first compaction, which writes the survivors to `scratch` (capacity >= round_up(n)); later ones
// compact `scratch` in place.
float bisect_mass(const float* cand, int64_t n, float* scratch, double target, uint32_t lo, uint32_t hi) {
  double base = 0.0;  // mass of the candidates dropped because they are above every remaining threshold
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    const float t = bits_float(mid);
    const CountMass ge = sum_ge<true>(cand, round_up(n), t);
    const double f = base + ge.mass;
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
  float logprob, filtered_logprob, kept_threshold;
};

// Scratch of one task, reused by its rows.
struct Scratch {
  explicit Scratch(int64_t vocab)
      : e(new float[vocab + W]),
        cand(new float[vocab + W]),
        work(new float[vocab + W]),
        index(new int32_t[vocab + W]),
        block_mass(new float[vocab / kDrawBlock + 1]) {}
  std::unique_ptr<float[]> e;      // every e (no tau0), or the buffer of the running top-k threshold
  std::unique_ptr<float[]> cand;   // the candidates e >= tau0 (or the top-p bisection's scratch)
  std::unique_ptr<float[]> work;   // the top-p bisection's scratch over the candidates
  std::unique_ptr<int32_t[]> index;
  std::unique_ptr<float[]> block_mass;
};

inline unsigned true_lanes(const Vec& mask) { return ~static_cast<unsigned>(mask.zero_mask()) & ((1u << W) - 1u); }

// Loads x[i, i + W) as fp32, lanes at or past `vocab` set to -inf.
template <typename T>
inline Vec load_row(const T* x, int64_t i, int64_t vocab) {
  if (i + W <= vocab) return load_float(x + i);
  alignas(64) float tail[W];
  for (int64_t j = 0; j < W; ++j) tail[j] = i + j < vocab ? static_cast<float>(x[i + j]) : kNegInf;
  return Vec::loadu(tail);
}

// The max of x (NaN if any is NaN).
template <typename T>
float row_max(const T* x, int64_t vocab) {
  Vec vmax(kNegInf);
  for (int64_t i = 0; i < vocab; i += W) vmax = at::vec::maximum(vmax, load_row(x, i, vocab));
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
}

// The max of x (NaN if any is NaN) and in `kth` the k-th largest value (0 < k < vocab; ties counted; meaningless
// if the row has NaN), in one pass. buf (capacity vocab + W) holds the values above a running threshold theta whose
// count with the values equal to it, n_eq, is >= k; when buf fills up, its k-th largest becomes theta.
template <typename T>
float row_max_and_kth(const T* x, int64_t vocab, int64_t k, float* buf, float& kth) {
  const int64_t cap = std::min<int64_t>(std::max<int64_t>(4 * k, 1024), vocab);
  float theta = kNegInf;
  int64_t n = 0, n_eq = 0;
  const auto kth_of_buf = [&] {
    std::nth_element(buf, buf + (k - 1), buf + n, std::greater<float>());
    return buf[k - 1];
  };
  Vec vmax(kNegInf), vtheta(theta);
  for (int64_t i = 0; i < vocab; i += W) {
    const Vec v = load_row(x, i, vocab);
    vmax = at::vec::maximum(vmax, v);
    const unsigned lanes = i + W <= vocab ? (1u << W) - 1u : (1u << (vocab - i)) - 1u;
    n_eq += __builtin_popcount(true_lanes(v == vtheta) & lanes);
    for (unsigned gt = true_lanes(v > vtheta); gt != 0; gt &= gt - 1) {
      buf[n++] = static_cast<float>(x[i + __builtin_ctz(gt)]);
    }
    if (n >= cap) {  // n >= k: theta rises to the k-th largest of buf; keep what is above it
      theta = kth_of_buf();
      vtheta = Vec(theta);
      int64_t out = 0;
      n_eq = 0;
      for (int64_t j = 0; j < n; ++j) {
        const float b = buf[j];
        buf[out] = b;
        out += b > theta;
        n_eq += b == theta;
      }
      n = out;  // < k
    }
  }
  kth = n >= k ? kth_of_buf() : theta;
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
}

// e = exp((x - mx) * inv_t) = exp(z - max z), z = x / T, exactly as the passes compute it (so thresholds compare equal
// to row values). Subtracting the max before scaling makes the max's e exactly 1 (x - mx = 0) whatever the rounding
// of x * inv_t (or its fusion into an FMA), and never overflows for a small temperature. exp_u20 gives 0 below
// ln(FLT_MIN), -inf included, and exactly 1 at 0.
inline Vec exp_shifted(const Vec& x, const Vec& vmx, const Vec& vinv) { return ((x - vmx) * vinv).exp_u20(); }

inline float exp_shifted(float x, float mx, float inv_t) {
  alignas(64) float out[W];
  exp_shifted(Vec(x), Vec(mx), Vec(inv_t)).store(out);
  return out[0];
}

struct ExpPass {
  double total = 0.0;   // S = sum e
  double mass_k = 0.0;  // sum of e >= tau_k
  int64_t n_cand = 0;
};

// The pass computing e. With tau0 > 0: appends the e >= tau0 and their indices to cand / index (zero-padded to a
// multiple of W). Otherwise: stores every e in `e` (zero-padded) and the sum of each block of kDrawBlock in block_mass.
template <typename T>
ExpPass exp_pass(const T* x, int64_t vocab, float inv_t, float mx, float tau_k, float tau0, Scratch& s) {
  const Vec vinv(inv_t), vmx(mx), vk(tau_k), v0(tau0);
  Vec vs(0.f), vmk(0.f), vblock(0.f);
  ExpPass out;
  float* cand = s.cand.get();
  int32_t* index = s.index.get();
  const auto reduce = [](const Vec& v) {
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
  };
  for (int64_t i = 0; i < vocab; i += W) {
    const Vec ev = exp_shifted(load_row(x, i, vocab), vmx, vinv);  // 0 past the end
    vs = vs + ev;
    vmk = vmk + ((ev >= vk) & ev);
    if (tau0 > 0.f) {
      unsigned keep = true_lanes(ev >= v0);
      if (keep != 0) {
        alignas(64) float lanes[W];
        ev.store(lanes);
        for (; keep != 0; keep &= keep - 1) {
          const int j = __builtin_ctz(keep);
          cand[out.n_cand] = lanes[j];
          index[out.n_cand++] = static_cast<int32_t>(i + j);
        }
      }
    } else {
      ev.store(s.e.get() + i);
      vblock = vblock + ev;
      if ((i + W) % kDrawBlock == 0 || i + W >= vocab) {
        s.block_mass[i / kDrawBlock] = reduce(vblock);
        vblock = Vec(0.f);
      }
    }
  }
  if (tau0 > 0.f) std::fill(cand + out.n_cand, cand + round_up(out.n_cand), 0.f);
  out.total = reduce(vs);
  out.mass_k = reduce(vmk);
  return out;
}

// Inverse CDF over the candidate list (index order): the first candidate >= tau whose running mass exceeds u * M.
// min_x: the min of x over the kept candidates (tau > 0).
template <typename T>
int64_t draw_candidates(const T* x, const float* cand, const int32_t* index, int64_t n, float tau, float u,
                        double& kept_mass, float& min_x) {
  double total = 0.0;
  float lowest = kInf;
  for (int64_t j = 0; j < n; ++j) {
    if (cand[j] >= tau) {
      total += cand[j];
      lowest = std::min(lowest, static_cast<float>(x[index[j]]));
    }
  }
  kept_mass = total;
  min_x = lowest;
  const double target = static_cast<double>(u) * total;
  double cum = 0.0;
  int64_t last = -1;
  for (int64_t j = 0; j < n; ++j) {
    if (cand[j] >= tau && cand[j] > 0.f) {
      last = index[j];
      cum += cand[j];
      if (cum > target) return index[j];
    }
  }
  return last;
}

// Inverse CDF over every e >= tau (e > 0): block sums (reused when tau == 0), then a scan inside one block.
// With tau > 0 the pass recomputing the block sums also gives min_x, the min of x over the e >= tau.
template <typename T>
int64_t draw_blocks(const T* x, const float* e, int64_t vocab, float tau, float u, float* block_mass,
                    double& kept_mass, float& min_x) {
  const int64_t n_blocks = (vocab + kDrawBlock - 1) / kDrawBlock;
  if (tau > 0.f) {
    const Vec vt(tau), vinf(kInf);
    Vec lowest(kInf);
    for (int64_t b = 0; b < n_blocks; ++b) {
      Vec acc(0.f);
      for (int64_t i = b * kDrawBlock; i < std::min((b + 1) * kDrawBlock, round_up(vocab)); i += W) {
        const Vec v = Vec::loadu(e + i);
        const Vec kept = v >= vt;  // false on the zero padding
        acc = acc + (kept & v);
        lowest = at::vec::minimum(lowest, Vec::blendv(vinf, load_row(x, i, vocab), kept));
      }
      block_mass[b] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, acc);
    }
    min_x = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return at::vec::minimum(a, c); }, lowest);
  }
  double total = 0.0;
  for (int64_t b = 0; b < n_blocks; ++b) total += block_mass[b];
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
  if (!(p.temperature > 0.f)) {  // greedy: the first index of the max (0 if the row has NaN)
    const float mx = row_max(x, vocab);
    int64_t token = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      if (static_cast<float>(x[v]) == mx) {
        token = v;
        break;
      }
    }
    const bool ok = std::isfinite(mx);
    return {token, ok ? 0.f : nan, ok ? 0.f : nan, ok ? mx : nan};
  }
  const bool use_k = p.top_k > 0 && p.top_k < vocab;
  float kth = kNegInf;
  const float mx = use_k ? row_max_and_kth(x, vocab, p.top_k, s.e.get(), kth) : row_max(x, vocab);
  const float inv_t = 1.f / p.temperature;  // finite: validated in Python
  if (!std::isfinite(mx)) return {0, nan, nan, nan};  // NaN, +inf, or no finite logit: no distribution

  const float e_max = exp_shifted(mx, mx, inv_t);  // the e of the max: exp_u20(0), as the passes compute it
  const float tau_k = use_k ? exp_shifted(kth, mx, inv_t) : 0.f;
  const float tau_m = p.min_p > 0.f ? std::min(p.min_p, 1.f) * e_max : 0.f;
  const float tau0 = std::max(tau_k, tau_m);
  const bool candidates = tau0 > 0.f;
  const ExpPass pass = exp_pass(x, vocab, inv_t, mx, tau_k, tau0, s);

  float tau_p = 0.f;
  if (p.top_p < 1.f) {  // NaN is rejected in Python
    const double target = std::max(0.f, p.top_p) * pass.mass_k;
    if (!candidates) {
      tau_p = bisect_mass(s.e.get(), vocab, s.cand.get(), target, 0, float_bits(e_max));
    } else if (sum_ge<true>(s.cand.get(), round_up(pass.n_cand), 0.f).mass >= target) {
      // else top-p keeps a superset of {e >= tau0}: tau0 decides
      tau_p = bisect_mass(s.cand.get(), pass.n_cand, s.work.get(), target, float_bits(tau0), float_bits(e_max));
    }
  }
  // the max is always kept. With a filter on, tau >= the least positive float, so the kept set is {e >= tau} (e > 0
  // implied) even where top-k's threshold underflowed to 0
  const bool filtered = use_k || p.top_p < 1.f || p.min_p > 0.f;
  const float tau = std::min(std::max({tau0, tau_p, filtered ? bits_float(1) : 0.f}), e_max);

  const float u = std::min(std::max(p.u, 0.f), std::nextafter(1.f, 0.f));
  double kept_mass = 0.0;
  float min_x = kNegInf;  // stays -inf without a filter (tau == 0: everything kept)
  int64_t token = candidates
                      ? draw_candidates(x, s.cand.get(), s.index.get(), pass.n_cand, tau, u, kept_mass, min_x)
                      : draw_blocks(x, s.e.get(), vocab, tau, u, s.block_mass.get(), kept_mass, min_x);
  if (token < 0) token = 0;
  const float z = (static_cast<float>(x[token]) - mx) * inv_t;
  return {token, z - static_cast<float>(std::log(pass.total)), z - static_cast<float>(std::log(kept_mass)), min_x};
}

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n && t.is_contiguous() && t.scalar_type() == dtype,
              name, " must be a contiguous 1-D CPU tensor of ", n, " elements of type ", dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits,
                                                                     const at::Tensor& uniforms,
                                                                     const at::Tensor& temperature,
                                                                     const at::Tensor& top_k, const at::Tensor& top_p,
                                                                     const at::Tensor& min_p) {
  TORCH_CHECK(logits.device().is_cpu(), "logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2 && (logits.stride(1) == 1 || logits.size(1) == 1) && logits.size(1) > 0,
              "logits must be 2-D with a non-empty last dimension of unit stride");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31) - 64, "the vocabulary must have fewer than 2^31 - 64 entries");
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  check_vector(uniforms, n_rows, at::kFloat, "uniforms");
  check_vector(temperature, n_rows, at::kFloat, "temperature");
  check_vector(top_k, n_rows, at::kLong, "top_k");
  check_vector(top_p, n_rows, at::kFloat, "top_p");
  check_vector(min_p, n_rows, at::kFloat, "min_p");
  const auto float_options = logits.options().dtype(at::kFloat);
  at::Tensor tokens = at::empty({n_rows}, logits.options().dtype(at::kLong));
  at::Tensor logp = at::empty({n_rows}, float_options), filtered = at::empty({n_rows}, float_options);
  at::Tensor threshold = at::empty({n_rows}, float_options);
  const float *u = uniforms.const_data_ptr<float>(), *t = temperature.const_data_ptr<float>(),
              *pp = top_p.const_data_ptr<float>(), *mp = min_p.const_data_ptr<float>();
  const int64_t* kk = top_k.const_data_ptr<int64_t>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *flp = filtered.data_ptr<float>(), *thr = threshold.data_ptr<float>();
  RLHF_FAST_DISPATCH_LOGITS(logits.scalar_type(), "sample_cpu", [&] {
    const scalar_t* data = logits.const_data_ptr<scalar_t>();
    // a task gets rows of >= 16K logits in all: small batches of short rows run inline, without waking threads
    at::parallel_for(0, n_rows, std::max<int64_t>(1, 16384 / vocab), [&](int64_t begin, int64_t end) {
      Scratch scratch(vocab);
      for (int64_t r = begin; r < end; ++r) {
        const RowResult res = sample_row(data + r * row_stride, vocab, {u[r], t[r], pp[r], mp[r], kk[r]}, scratch);
        tok[r] = res.token;
        lp[r] = res.logprob;
        flp[r] = res.filtered_logprob;
        thr[r] = res.kept_threshold;
      }
    });
  });
  return {tokens, logp, filtered, threshold};
}

}  // namespace rlhf_fast::cpu
