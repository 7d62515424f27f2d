// Schemas of the compiled standalone PPO losses (namespace rlhf_fast_C) and their CPU kernels. The public, validated
// ops live in rlhf_fast/ops/ppo_loss.py.
#include <torch/library.h>

#include "../cpu/ppo_loss.h"

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  m.def("ppo_policy_loss_fwd(Tensor logp, Tensor old_logp, Tensor advantages, Tensor weights, float clip_low,"
        " float clip_high, float? dual_clip) -> (Tensor, Tensor)");
  m.def("ppo_policy_loss_bwd(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, Tensor weights,"
        " float clip_low, float clip_high, float? dual_clip) -> Tensor");
  m.def("ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor weights, float? clip)"
        " -> (Tensor, Tensor)");
  m.def("ppo_value_loss_bwd(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, Tensor weights,"
        " float? clip) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &rlhf_fast::cpu::ppo_policy_loss_fwd_cpu);
  m.impl("ppo_policy_loss_bwd", &rlhf_fast::cpu::ppo_policy_loss_bwd_cpu);
  m.impl("ppo_value_loss_fwd", &rlhf_fast::cpu::ppo_value_loss_fwd_cpu);
  m.impl("ppo_value_loss_bwd", &rlhf_fast::cpu::ppo_value_loss_bwd_cpu);
}
