// The standalone PPO losses on the CPU, each in one fused pass over the tokens.
//
// The loss is a weighted sum over masked tokens, loss = sum_t w_t l_t, where the weight w_t comes from the
// aggregation (1 / #tokens for token-mean, 1 / (#sequences * #tokens of t's sequence) for seq-mean-token-mean, ...).
// A first, cheap pass over the mask (and seq_ids) gives the weights; the second pass reads each token once: forward,
// its loss term and diagnostics; backward, its gradient g * w_t * dl_t/dx_t, written in the input's dtype (the only
// [B, T] tensor either pass allocates). Tokens run in tasks of kTask with at::parallel_for; each forward task keeps
// its own partial sums (fp32 within a block of kBlock tokens, fp64 across blocks), added in task order at the end, so
// the result does not depend on the thread count.
#include "ppo_loss.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "vec_utils.h"

namespace rlhf_fast::cpu {
namespace {

constexpr int64_t kBlock = 256;  // tokens staged as fp32 in L1 (a multiple of every Vec::size())
constexpr int64_t kTask = 16 * kBlock;
// At least 2^17 tokens (~0.1 ms) per thread: a parallel region costs more than it saves below that, and far more
// on an oversubscribed machine, where the second thread waits for a scheduler slice.
constexpr int64_t kGrainTasks = 32;

enum class Agg { kTokenMean, kSeqMeanTokenSum, kSeqMeanTokenMean, kSeqMeanTokenSumNorm };

Agg parse_agg(c10::string_view agg) {
  if (agg == "token-mean") return Agg::kTokenMean;
  if (agg == "seq-mean-token-sum") return Agg::kSeqMeanTokenSum;
  if (agg == "seq-mean-token-mean") return Agg::kSeqMeanTokenMean;
  if (agg == "seq-mean-token-sum-norm") return Agg::kSeqMeanTokenSumNorm;
  TORCH_CHECK(false, "unknown agg '", agg, "'");
}

// The aggregation weight of each token: a constant, one per row of row_len tokens (padded [B, T]), or one per
// sequence id (packed [N]). Masked tokens may get any finite weight: their terms are selected away.
struct Weights {
  float constant = 0.f;
  const float* per_row = nullptr;
  int64_t row_len = 1;
  const float* per_seq = nullptr;
  const int64_t* seq_ids = nullptr;
  int64_t count = 0;  // masked-in tokens in all
  std::vector<float> storage;

  void scale(float g) {
    constant *= g;
    for (float& x : storage) x *= g;
  }

  bool is_constant() const { return per_row == nullptr && per_seq == nullptr; }

  void fill(int64_t begin, int64_t n, float* out) const {
    if (per_seq != nullptr) {
      for (int64_t j = 0; j < n; ++j) out[j] = per_seq[seq_ids[begin + j]];
    } else if (per_row != nullptr) {
      int64_t row = begin / row_len, col = begin % row_len;
      for (int64_t j = 0; j < n; ++row, col = 0) {
        const int64_t run = std::min(n - j, row_len - col);
        std::fill(out + j, out + j + run, per_row[row]);
        j += run;
      }
    } else {
      std::fill(out, out + n, constant);
    }
  }
};

int64_t count_true(const bool* mask, int64_t n) {
  const auto* m = reinterpret_cast<const uint8_t*>(mask);  // bytes 0/1: the loop vectorises
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += m[i];
  return c;
}

// Sequence weights from per-sequence token counts: 1 / #sequences (token sums) or 1 / (#sequences * count).
void sequence_weights(const std::vector<int64_t>& counts, bool token_mean, std::vector<float>& out) {
  int64_t n_seqs = 0;
  for (int64_t c : counts) n_seqs += c > 0;
  out.resize(counts.size());
  for (size_t s = 0; s < counts.size(); ++s) {
    const double c = static_cast<double>(counts[s]);
    out[s] = counts[s] == 0 ? 0.f : static_cast<float>(1.0 / (static_cast<double>(n_seqs) * (token_mean ? c : 1.0)));
  }
}

Weights make_weights(Agg agg, const at::Tensor& mask, const std::optional<at::Tensor>& seq_ids) {
  Weights w;
  const bool* m = mask.const_data_ptr<bool>();
  const int64_t n = mask.numel();
  if (agg == Agg::kTokenMean || agg == Agg::kSeqMeanTokenSumNorm) {
    w.count = count_true(m, n);
    w.constant = agg == Agg::kTokenMean ? 1.f / static_cast<float>(std::max<int64_t>(w.count, 1))
                                        : 1.f / static_cast<float>(mask.size(-1));
    return w;
  }
  const bool token_mean = agg == Agg::kSeqMeanTokenMean;
  if (seq_ids.has_value()) {  // packed: ids in [0, N)
    TORCH_CHECK(seq_ids->numel() == n, "seq_ids must have one id per token");
    const int64_t* ids = seq_ids->const_data_ptr<int64_t>();
    std::vector<int64_t> counts(n, 0);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(ids[i] >= 0 && ids[i] < n, "seq_ids must be in [0, N), got ", ids[i]);
      counts[ids[i]] += m[i];
    }
    for (int64_t c : counts) w.count += c;
    sequence_weights(counts, token_mean, w.storage);
    w.per_seq = w.storage.data();
    w.seq_ids = ids;
    return w;
  }
  // padded: each row of the last dimension is a sequence ([N] without seq_ids: one sequence)
  const int64_t row_len = std::max<int64_t>(mask.dim() == 0 ? 1 : mask.size(-1), 1);
  std::vector<int64_t> counts(n / row_len);
  for (size_t r = 0; r < counts.size(); ++r) counts[r] = count_true(m + r * row_len, row_len);
  for (int64_t c : counts) w.count += c;
  sequence_weights(counts, token_mean, w.storage);
  w.per_row = w.storage.data();
  w.row_len = row_len;
  return w;
}

float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// Per-token PPO-clip policy loss on a staged block. Sums: loss, clipped, dual-clipped, k3, ratio; max: ratio.
struct PolicyOp {
  static constexpr int kSums = 5;
  float clip_lo, clip_hi, dual;
  bool has_dual;

  // Forward: adds to acc / vmax. Backward (kBackward): writes w * d loss / d logp to grad.
  template <bool kBackward>
  void block(const float* lp, const float* old, const float* adv, const float* m, const float* w, float* grad,
             Vec* acc, Vec& vmax) const {
    const Vec zero(0.f), one(1.f), lo(clip_lo), hi(clip_hi), c(dual), r_lo(-20.f), r_hi(20.f), k_lo(-10.f),
        k_hi(10.f);
    for (int64_t j = 0; j < kBlock; j += Vec::size()) {
      const Vec a = Vec::loadu(adv + j), wt = Vec::loadu(w + j);
      const Vec keep = Vec::loadu(m + j) != zero;
      const Vec log_ratio = Vec::loadu(lp + j) - Vec::loadu(old + j);
      const Vec lr = at::vec::clamp(log_ratio, r_lo, r_hi);
      const Vec ratio = lr.exp();
      const Vec na = a.neg();
      const Vec unclipped = na * ratio;
      const Vec clipped = na * at::vec::clamp(ratio, lo, hi);
      Vec loss = at::vec::maximum(unclipped, clipped);
      // d loss / d logp = -A * ratio where the unclipped term is taken and the ratio's clamp is open, else 0
      Vec takes_ratio = (unclipped >= clipped) & (log_ratio.abs() <= r_hi);
      Vec dual_clipped = zero;
      if (has_dual) {
        const Vec bound = na * c;
        dual_clipped = (a < zero) & (loss > bound);
        loss = Vec::blendv(loss, bound, dual_clipped);
        takes_ratio = Vec::blendv(takes_ratio, zero, dual_clipped);
      }
      if constexpr (kBackward) {
        Vec::blendv(zero, wt * unclipped, takes_ratio & keep).store(grad + j);
      } else {
        const Vec ratio_in = Vec::blendv(zero, ratio, keep);
        acc[0] += Vec::blendv(zero, wt * loss, keep);  // a select: NaN/inf at masked positions never pass
        acc[1] += one & (clipped > unclipped) & keep;
        acc[2] += one & dual_clipped & keep;
        acc[3] += Vec::blendv(zero, at::vec::clamp(ratio - lr - one, k_lo, k_hi), keep);  // k3(old -> new)
        acc[4] += ratio_in;
        vmax = at::vec::maximum(vmax, ratio_in);
      }
    }
  }
};

// Per-token clipped value loss on a staged block. Sums: loss, clipped (taken and its clamp active).
struct ValueOp {
  static constexpr int kSums = 2;
  float clip;
  bool has_clip;

  template <bool kBackward>
  void block(const float* v, const float* v_old, const float* ret, const float* m, const float* w, float* grad,
             Vec* acc, Vec& /*vmax*/) const {
    const Vec zero(0.f), one(1.f), half(0.5f), c(clip), neg_c(-clip);
    for (int64_t j = 0; j < kBlock; j += Vec::size()) {
      const Vec x = Vec::loadu(v + j), r = Vec::loadu(ret + j), wt = Vec::loadu(w + j);
      const Vec keep = Vec::loadu(m + j) != zero;
      Vec d = x - r;
      Vec loss = d * d;
      Vec frac = zero;
      if (has_clip) {
        const Vec xo = Vec::loadu(v_old + j);
        const Vec step = x - xo;
        const Vec e = xo + at::vec::clamp(step, neg_c, c) - r;
        const Vec clipped = e * e;
        const Vec takes_clipped = clipped > loss;
        frac = takes_clipped & (step.abs() > c);
        loss = at::vec::maximum(loss, clipped);
        // the clipped term passes gradient only where its clamp is open
        d = Vec::blendv(d, Vec::blendv(zero, e, step.abs() <= c), takes_clipped);
      }
      if constexpr (kBackward) {
        Vec::blendv(zero, wt * d, keep).store(grad + j);
      } else {
        acc[0] += Vec::blendv(zero, wt * half * loss, keep);
        acc[1] += one & frac & keep;
      }
    }
  }
};

template <typename T>
void stage(const T* x, int64_t n, float* out) {
  if constexpr (std::is_same_v<T, bool>) {
    stage(reinterpret_cast<const uint8_t*>(x), n, out);  // bytes 0/1: the loop vectorises
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(x[j]);
    std::fill(out + n, out + kBlock, 0.f);
  }
}

// Block [i, i + len) of the inputs as fp32, zero-padded to kBlock (mask 0 in the padding): px, py, pz point to the
// staged copies, or into the inputs themselves for a full block of float32.
template <typename T>
struct Staged {
  alignas(64) float x[kBlock], y[kBlock], z[kBlock], m[kBlock], w[kBlock];
  const float *px = x, *py = y, *pz = z;
  bool w_filled = false;

  void load(const T* in_x, const T* in_y, const T* in_z, const bool* mask, const Weights& weights, int64_t i,
            int64_t len) {
    if constexpr (std::is_same_v<T, float>) {
      if (len == kBlock) {
        px = in_x + i, py = in_y + i, pz = in_z + i;
      } else {
        stage(in_x + i, len, x), stage(in_y + i, len, y), stage(in_z + i, len, z);
        px = x, py = y, pz = z;
      }
    } else {
      stage(in_x + i, len, x), stage(in_y + i, len, y), stage(in_z + i, len, z);
    }
    stage(mask + i, len, m);
    if (!weights.is_constant()) {
      weights.fill(i, len, w);  // the padding keeps earlier (finite) weights: its mask is 0
    } else if (!w_filled) {
      weights.fill(i, kBlock, w);  // a constant weight: filled once
      w_filled = true;
    }
  }
};

// Forward of `op` over n tokens. -> per-task partial sums [n_tasks, kSums] (fp64) and maxima [n_tasks].
template <typename Op, typename T>
void forward_tokens(const Op& op, const T* x, const T* y, const T* z, const bool* mask, const Weights& weights,
                    int64_t n, std::vector<double>& sums, std::vector<float>& maxima) {
  const int64_t n_tasks = (n + kTask - 1) / kTask;
  sums.assign(n_tasks * Op::kSums, 0.0);
  maxima.assign(n_tasks, 0.f);
  at::parallel_for(0, n_tasks, kGrainTasks, [&](int64_t task_begin, int64_t task_end) {
    Staged<T> st;
    for (int64_t task = task_begin; task < task_end; ++task) {
      Vec vmax(0.f);
      const int64_t end = std::min(n, (task + 1) * kTask);
      for (int64_t i = task * kTask; i < end; i += kBlock) {
        st.load(x, y, z, mask, weights, i, std::min(kBlock, end - i));
        Vec acc[Op::kSums];
        for (auto& a : acc) a = Vec(0.f);
        op.template block<false>(st.px, st.py, st.pz, st.m, st.w, nullptr, acc, vmax);
        for (int k = 0; k < Op::kSums; ++k) sums[task * Op::kSums + k] += reduce_sum(acc[k]);
      }
      maxima[task] = reduce_max(vmax);
    }
  });
}

// Backward of `op` over n tokens: grad[t] = (weights already scaled by the incoming gradient) * d l_t / d x_t.
template <typename Op, typename T>
void backward_tokens(const Op& op, const T* x, const T* y, const T* z, const bool* mask, const Weights& weights,
                     int64_t n, T* grad) {
  at::parallel_for(0, (n + kBlock - 1) / kBlock, kGrainTasks * (kTask / kBlock), [&](int64_t begin, int64_t end) {
    Staged<T> st;
    alignas(64) float g[kBlock];
    Vec unused_max;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i = block * kBlock, len = std::min(kBlock, n - i);
      st.load(x, y, z, mask, weights, i, len);
      if constexpr (std::is_same_v<T, float>) {
        if (len == kBlock) {  // written in place
          op.template block<true>(st.px, st.py, st.pz, st.m, st.w, grad + i, nullptr, unused_max);
          continue;
        }
      }
      op.template block<true>(st.px, st.py, st.pz, st.m, st.w, g, nullptr, unused_max);
      for (int64_t j = 0; j < len; ++j) grad[i + j] = static_cast<T>(g[j]);
    }
  });
}

struct Inputs {
  at::Tensor x, y, z, mask;
  std::optional<at::Tensor> seq_ids;
};

// Contiguous inputs of one dtype (float32 when the three differ).
Inputs prepare(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask,
               const std::optional<at::Tensor>& seq_ids) {
  for (const at::Tensor* t : {&x, &y, &z, &mask}) {
    TORCH_CHECK(t->device().is_cpu(), "expected CPU tensors");
    TORCH_CHECK(t->sizes() == x.sizes(), "every input must have shape ", x.sizes(), ", got ", t->sizes());
  }
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  const bool same = y.scalar_type() == x.scalar_type() && z.scalar_type() == x.scalar_type();
  auto as = [&](const at::Tensor& t) { return (same ? t : t.to(at::kFloat)).contiguous(); };
  Inputs in{as(x), as(y), as(z), mask.contiguous(), std::nullopt};
  if (seq_ids.has_value()) {
    TORCH_CHECK(seq_ids->scalar_type() == at::kLong && seq_ids->device().is_cpu(), "seq_ids must be int64 on CPU");
    in.seq_ids = seq_ids->contiguous();
  }
  return in;
}

// Totals of the op's sums, the max ratio and the masked-in token count (the stats' denominator).
struct Totals {
  std::vector<double> sums;
  float max = 0.f;
  int64_t count = 0;
};

template <typename Op>
Totals forward(const Op& op, const Inputs& in, c10::string_view agg) {
  const Weights weights = make_weights(parse_agg(agg), in.mask, in.seq_ids);
  std::vector<double> partial;
  std::vector<float> maxima;
  RLHF_FAST_DISPATCH_LOGITS(in.x.scalar_type(), "ppo_loss_fwd_cpu", [&] {
    forward_tokens(op, in.x.const_data_ptr<scalar_t>(), in.y.const_data_ptr<scalar_t>(),
                   in.z.const_data_ptr<scalar_t>(), in.mask.const_data_ptr<bool>(), weights, in.x.numel(), partial,
                   maxima);
  });
  Totals out;
  out.sums.assign(Op::kSums, 0.0);
  for (size_t t = 0; t < maxima.size(); ++t) {
    for (int k = 0; k < Op::kSums; ++k) out.sums[k] += partial[t * Op::kSums + k];
    out.max = nan_max(maxima[t], out.max);
  }
  out.count = weights.count;
  return out;
}

// -> d loss / d x, in the dtype and shape of x (contiguous).
template <typename Op>
at::Tensor backward(const Op& op, const at::Tensor& grad_loss, const at::Tensor& x, const Inputs& in,
                    c10::string_view agg) {
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar");
  Weights weights = make_weights(parse_agg(agg), in.mask, in.seq_ids);
  weights.scale(grad_loss.item<float>());
  // mixed input dtypes run in float32 (in.x), the gradient is then converted to x's dtype
  at::Tensor grad = at::empty(x.sizes(), in.x.options());
  RLHF_FAST_DISPATCH_LOGITS(in.x.scalar_type(), "ppo_loss_bwd_cpu", [&] {
    backward_tokens(op, in.x.const_data_ptr<scalar_t>(), in.y.const_data_ptr<scalar_t>(),
                    in.z.const_data_ptr<scalar_t>(), in.mask.const_data_ptr<bool>(), weights, x.numel(),
                    grad.data_ptr<scalar_t>());
  });
  return grad.scalar_type() == x.scalar_type() ? grad : grad.to(x.scalar_type());
}

PolicyOp policy_op(double clip_low, double clip_high, std::optional<double> dual_clip) {
  return {static_cast<float>(1.0 - clip_low), static_cast<float>(1.0 + clip_high),
          static_cast<float>(dual_clip.value_or(0.0)), dual_clip.has_value()};
}

ValueOp value_op(std::optional<double> clip) {
  return {static_cast<float>(clip.value_or(0.0)), clip.has_value()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd_cpu(const at::Tensor& logp, const at::Tensor& old_logp,
                                                           const at::Tensor& advantages, const at::Tensor& mask,
                                                           const std::optional<at::Tensor>& seq_ids, double clip_low,
                                                           double clip_high, std::optional<double> dual_clip,
                                                           c10::string_view agg) {
  const Inputs in = prepare(logp, old_logp, advantages, mask, seq_ids);
  const Totals t = forward(policy_op(clip_low, clip_high, dual_clip), in, agg);
  const double inv = 1.0 / static_cast<double>(std::max<int64_t>(t.count, 1));
  const auto f32 = logp.options().dtype(at::kFloat);
  at::Tensor stats = at::empty({5}, f32);
  float* s = stats.data_ptr<float>();
  for (int k = 0; k < 4; ++k) s[k] = static_cast<float>(t.sums[k + 1] * inv);
  s[4] = t.max;
  return {at::scalar_tensor(static_cast<float>(t.sums[0]), f32), stats};
}

at::Tensor ppo_policy_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                   const at::Tensor& advantages, const at::Tensor& mask,
                                   const std::optional<at::Tensor>& seq_ids, double clip_low, double clip_high,
                                   std::optional<double> dual_clip, c10::string_view agg) {
  const Inputs in = prepare(logp, old_logp, advantages, mask, seq_ids);
  return backward(policy_op(clip_low, clip_high, dual_clip), grad_loss, logp, in, agg);
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                          const at::Tensor& returns, const at::Tensor& mask,
                                                          const std::optional<at::Tensor>& seq_ids,
                                                          std::optional<double> clip, c10::string_view agg) {
  const Inputs in = prepare(values, old_values, returns, mask, seq_ids);
  const Totals t = forward(value_op(clip), in, agg);
  const auto f32 = values.options().dtype(at::kFloat);
  at::Tensor stats = at::empty({1}, f32);
  stats.data_ptr<float>()[0] = static_cast<float>(t.sums[1] / static_cast<double>(std::max<int64_t>(t.count, 1)));
  return {at::scalar_tensor(static_cast<float>(t.sums[0]), f32), stats};
}

at::Tensor ppo_value_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& values, const at::Tensor& old_values,
                                  const at::Tensor& returns, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& seq_ids, std::optional<double> clip,
                                  c10::string_view agg) {
  const Inputs in = prepare(values, old_values, returns, mask, seq_ids);
  return backward(value_op(clip), grad_loss, values, in, agg);
}

}  // namespace rlhf_fast::cpu
