// GAE and discounted returns on the CPU: sequences run in parallel (at::parallel_for over B), each one a single
// fp32 pass from t = T-1 down to 0 (the recurrence is serial in t). Positions with mask 0 are skipped: the next
// value and the running advantage carry over them unchanged, and their outputs are 0 (docs/formulas.md, "GAE").
#include "advantages.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

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

// kValues = false is the discounted return: values are 0 and lam is 1, so A_t = r_t + gamma * A.
template <typename T, bool kValues>
void gae_kernel(Rows<T> rewards, Rows<T> values, Rows<bool> mask, int64_t n_rows, int64_t n_steps,
                const float* gamma_seq, const float* lam_seq, float gamma, float lam, float* adv, float* ret) {
  // Tasks of >= 2^18 steps (~0.5 ms): a smaller batch runs on one thread, as one parallel region costs more than it
  // saves there, and far more on an oversubscribed machine (16 ms instead of 0.5 ms at B=64, T=2048 on a loaded
  // 2-core box, threads waiting to be scheduled).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(n_steps, 1));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* r = rewards.row(b);
      const T* v = kValues ? values.row(b) : nullptr;
      const bool* m = mask.row(b);
      const int64_t sr = rewards.stride_t, sv = values.stride_t, sm = mask.stride_t;
      const float g = gamma_seq ? gamma_seq[b] : gamma;
      const float gl = kValues ? g * (lam_seq ? lam_seq[b] : lam) : g;
      float* adv_row = adv + b * n_steps;
      float* ret_row = kValues ? ret + b * n_steps : nullptr;
      float next_v = 0.f, running = 0.f;
      for (int64_t t = n_steps - 1; t >= 0; --t) {
        const bool keep = m[t * sm];
        const float vt = kValues ? static_cast<float>(v[t * sv]) : 0.f;
        const float delta = kValues ? static_cast<float>(r[t * sr]) + g * next_v - vt : static_cast<float>(r[t * sr]);
        const float a = delta + gl * running;
        // Selects, not multiplies by the mask: whatever sits at a masked position (even inf/NaN) is never read.
        running = keep ? a : running;
        adv_row[t] = keep ? a : 0.f;
        if constexpr (kValues) {
          next_v = keep ? vt : next_v;
          ret_row[t] = keep ? a + vt : 0.f;
        }
      }
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
  at::Tensor adv = at::empty({n_rows, n_steps}, rewards.options().dtype(at::kFloat));
  at::Tensor ret = at::empty_like(adv);
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
  at::Tensor ret = at::empty({n_rows, n_steps}, rewards.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "discounted_returns_fwd_cpu", [&] {
    gae_kernel<scalar_t, false>(rows<scalar_t>(rewards), rows<scalar_t>(rewards), rows<bool>(mask), n_rows, n_steps,
                                g, nullptr, static_cast<float>(gamma), 1.f, ret.data_ptr<float>(), nullptr);
  });
  return ret;
}

}  // namespace rlhf_fast::cpu
