// The standalone PPO losses on the CPU, each in one fused pass over the tokens.
//
// The loss is a weighted sum, loss = sum_t w_t l_t, with the per-token float32 weights w of the caller
// (rlhf_fast.loss_weights: the aggregation mode as weights); a token with w_t == 0 is masked. Each token is read
// once: forward, its loss term and diagnostics; backward, its gradient g * w_t * dl_t/dx_t, written in the input's
// dtype (the only [B, T] tensor either pass allocates). Tokens run in tasks of kTask with at::parallel_for; each
// forward task keeps its own partial sums (fp32 within a block of kBlock tokens, fp64 across blocks), added in task
// order at the end, so the result does not depend on the thread count.
#include "ppo_loss.h"
#include "memory.h"

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

float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// Per-token PPO-clip policy loss on a staged block. Sums: loss, clipped, dual-clipped, k3, ratio, tokens; max: ratio.
// g: the incoming gradient of the loss (backward).
struct PolicyOp {
  static constexpr int kSums = 6;
  float clip_lo, clip_hi, dual;
  bool has_dual;
  float g = 1.f;

  // Forward: adds to acc / vmax. Backward (kBackward): writes w * d loss / d logp to grad.
  template <bool kBackward>
  void block(const float* lp, const float* old, const float* adv, const float* w, float* grad, Vec* acc,
             Vec& vmax) const {
    const Vec zero(0.f), one(1.f), lo(clip_lo), hi(clip_hi), c(dual), r_lo(-20.f), r_hi(20.f), k_lo(-10.f),
        k_hi(10.f);
    for (int64_t j = 0; j < kBlock; j += Vec::size()) {
      const Vec a = Vec::loadu(adv + j), wt = Vec::loadu(w + j);
      const Vec keep = wt != zero;
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
        Vec::blendv(zero, Vec(g) * wt * unclipped, takes_ratio & keep).store(grad + j);
      } else {
        const Vec ratio_in = Vec::blendv(zero, ratio, keep);
        acc[0] += Vec::blendv(zero, wt * loss, keep);  // a select: NaN/inf at masked positions never pass
        acc[1] += one & (clipped > unclipped) & keep;
        acc[2] += one & dual_clipped & keep;
        acc[3] += Vec::blendv(zero, at::vec::clamp(ratio - lr - one, k_lo, k_hi), keep);  // k3(old -> new)
        acc[4] += ratio_in;
        acc[5] += one & keep;
        vmax = at::vec::maximum(vmax, ratio_in);
      }
    }
  }
};

// Per-token clipped value loss on a staged block. Sums: loss, clipped (taken and its clamp active), tokens.
struct ValueOp {
  static constexpr int kSums = 3;
  float clip;
  bool has_clip;
  float g = 1.f;

  template <bool kBackward>
  void block(const float* v, const float* v_old, const float* ret, const float* w, float* grad, Vec* acc,
             Vec& /*vmax*/) const {
    const Vec zero(0.f), one(1.f), half(0.5f), c(clip), neg_c(-clip);
    for (int64_t j = 0; j < kBlock; j += Vec::size()) {
      const Vec x = Vec::loadu(v + j), r = Vec::loadu(ret + j), wt = Vec::loadu(w + j);
      const Vec keep = wt != zero;
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
        Vec::blendv(zero, Vec(g) * wt * d, keep).store(grad + j);
      } else {
        acc[0] += Vec::blendv(zero, wt * half * loss, keep);
        acc[1] += one & frac & keep;
        acc[2] += one & keep;
      }
    }
  }
};

template <typename T>
void stage(const T* x, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(x[j]);
  std::fill(out + n, out + kBlock, 0.f);
}

// Block [i, i + len) of the inputs as fp32, zero-padded to kBlock (weight 0 in the padding): px, py, pz, pw point to
// the staged copies, or into the inputs themselves for a full block of float32.
template <typename T>
struct Staged {
  alignas(64) float x[kBlock], y[kBlock], z[kBlock], w[kBlock];
  const float *px = x, *py = y, *pz = z, *pw = w;

  void load(const T* in_x, const T* in_y, const T* in_z, const float* weights, int64_t i, int64_t len) {
    if (len == kBlock) {
      pw = weights + i;
    } else {
      stage(weights + i, len, w);
      pw = w;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (len == kBlock) {
        px = in_x + i, py = in_y + i, pz = in_z + i;
        return;
      }
    }
    stage(in_x + i, len, x), stage(in_y + i, len, y), stage(in_z + i, len, z);
    px = x, py = y, pz = z;
  }
};

// Forward of `op` over n tokens. -> per-task partial sums [n_tasks, kSums] (fp64) and maxima [n_tasks].
template <typename Op, typename T>
void forward_tokens(const Op& op, const T* x, const T* y, const T* z, const float* weights, int64_t n, std::vector<double>& sums, std::vector<float>& maxima) {
  const int64_t n_tasks = (n + kTask - 1) / kTask;
  sums.assign(n_tasks * Op::kSums, 0.0);
  maxima.assign(n_tasks, 0.f);
  at::parallel_for(0, n_tasks, kGrainTasks, [&](int64_t task_begin, int64_t task_end) {
    Staged<T> st;
    for (int64_t task = task_begin; task < task_end; ++task) {
      Vec vmax(0.f);
      const int64_t end = std::min(n, (task + 1) * kTask);
      for (int64_t i = task * kTask; i < end; i += kBlock) {
        st.load(x, y, z, weights, i, std::min(kBlock, end - i));
        Vec acc[Op::kSums];
        for (auto& a : acc) a = Vec(0.f);
        op.template block<false>(st.px, st.py, st.pz, st.pw, nullptr, acc, vmax);
        for (int k = 0; k < Op::kSums; ++k) sums[task * Op::kSums + k] += reduce_sum(acc[k]);
      }
      maxima[task] = reduce_max(vmax);
    }
  });
}

// Backward of `op` over n tokens: grad[t] = op.g * w_t * d l_t / d x_t.
template <typename Op, typename T>
void backward_tokens(const Op& op, const T* x, const T* y, const T* z, const float* weights, int64_t n, T* grad) {
  at::parallel_for(0, (n + kBlock - 1) / kBlock, kGrainTasks * (kTask / kBlock), [&](int64_t begin, int64_t end) {
    Staged<T> st;
    alignas(64) float g[kBlock];
    Vec unused_max;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i = block * kBlock, len = std::min(kBlock, n - i);
      st.load(x, y, z, weights, i, len);
      if constexpr (std::is_same_v<T, float>) {
        if (len == kBlock) {  // written in place
          op.template block<true>(st.px, st.py, st.pz, st.pw, grad + i, nullptr, unused_max);
          continue;
        }
      }
      op.template block<true>(st.px, st.py, st.pz, st.pw, g, nullptr, unused_max);
      for (int64_t j = 0; j < len; ++j) grad[i + j] = static_cast<T>(g[j]);
    }
  });
}

struct Inputs {
  at::Tensor x, y, z, weights;
};

// Contiguous inputs of one dtype (float32 when the three differ) and float32 weights.
Inputs prepare(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& weights) {
  for (const at::Tensor* t : {&x, &y, &z, &weights}) {
    TORCH_CHECK(t->device().is_cpu(), "expected CPU tensors");
    TORCH_CHECK(t->sizes() == x.sizes(), "every input must have shape ", x.sizes(), ", got ", t->sizes());
  }
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "weights must be float32, got ", weights.scalar_type());
  const bool same = y.scalar_type() == x.scalar_type() && z.scalar_type() == x.scalar_type();
  auto as = [&](const at::Tensor& t) { return (same ? t : t.to(at::kFloat)).contiguous(); };
  return {as(x), as(y), as(z), weights.contiguous()};
}

// Totals of the op's sums (the last: the weighted-in token count, the stats' denominator) and the max ratio.
struct Totals {
  std::vector<double> sums;
  float max = 0.f;
  double count() const { return std::max(sums.back(), 1.0); }
};

template <typename Op>
Totals forward(const Op& op, const Inputs& in) {
  std::vector<double> partial;
  std::vector<float> maxima;
  RLHF_FAST_DISPATCH_LOGITS(in.x.scalar_type(), "ppo_loss_fwd_cpu", [&] {
    forward_tokens(op, in.x.const_data_ptr<scalar_t>(), in.y.const_data_ptr<scalar_t>(),
                   in.z.const_data_ptr<scalar_t>(), in.weights.const_data_ptr<float>(), in.x.numel(), partial,
                   maxima);
  });
  Totals out;
  out.sums.assign(Op::kSums, 0.0);
  for (size_t t = 0; t < maxima.size(); ++t) {
    for (int k = 0; k < Op::kSums; ++k) out.sums[k] += partial[t * Op::kSums + k];
    out.max = nan_max(maxima[t], out.max);
  }
  return out;
}

// -> d loss / d x, in the dtype and shape of x (contiguous).
template <typename Op>
at::Tensor backward(Op op, const at::Tensor& grad_loss, const at::Tensor& x, const Inputs& in) {
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar");
  op.g = grad_loss.item<float>();
  // mixed input dtypes run in float32 (in.x), the gradient is then converted to x's dtype
  at::Tensor grad = empty_output(x.sizes(), in.x.options());
  RLHF_FAST_DISPATCH_LOGITS(in.x.scalar_type(), "ppo_loss_bwd_cpu", [&] {
    backward_tokens(op, in.x.const_data_ptr<scalar_t>(), in.y.const_data_ptr<scalar_t>(),
                    in.z.const_data_ptr<scalar_t>(), in.weights.const_data_ptr<float>(), x.numel(),
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
                                                           const at::Tensor& advantages, const at::Tensor& weights,
                                                           double clip_low, double clip_high,
                                                           std::optional<double> dual_clip) {
  const Inputs in = prepare(logp, old_logp, advantages, weights);
  const Totals t = forward(policy_op(clip_low, clip_high, dual_clip), in);
  const auto f32 = logp.options().dtype(at::kFloat);
  at::Tensor stats = at::empty({5}, f32);
  float* s = stats.data_ptr<float>();
  for (int k = 0; k < 4; ++k) s[k] = static_cast<float>(t.sums[k + 1] / t.count());
  s[4] = t.max;
  return {at::scalar_tensor(static_cast<float>(t.sums[0]), f32), stats};
}

at::Tensor ppo_policy_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                   const at::Tensor& advantages, const at::Tensor& weights, double clip_low,
                                   double clip_high, std::optional<double> dual_clip) {
  const Inputs in = prepare(logp, old_logp, advantages, weights);
  return backward(policy_op(clip_low, clip_high, dual_clip), grad_loss, logp, in);
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                          const at::Tensor& returns, const at::Tensor& weights,
                                                          std::optional<double> clip) {
  const Inputs in = prepare(values, old_values, returns, weights);
  const Totals t = forward(value_op(clip), in);
  const auto f32 = values.options().dtype(at::kFloat);
  at::Tensor stats = at::empty({1}, f32);
  stats.data_ptr<float>()[0] = static_cast<float>(t.sums[1] / t.count());
  return {at::scalar_tensor(static_cast<float>(t.sums[0]), f32), stats};
}

at::Tensor ppo_value_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& values, const at::Tensor& old_values,
                                  const at::Tensor& returns, const at::Tensor& weights, std::optional<double> clip) {
  const Inputs in = prepare(values, old_values, returns, weights);
  return backward(value_op(clip), grad_loss, values, in);
}

}  // namespace rlhf_fast::cpu
