"""Public op API of rlhf_fast: each op validates its input, picks a backend and calls a torch.library custom op."""

from . import advantages, linear_cross_entropy as _linear_cross_entropy, ppo_loss, sampling, token_logprobs
from .advantages import discounted_returns, gae, group_advantages, masked_mean, masked_var, masked_whiten
from .linear_cross_entropy import linear_cross_entropy  # shadows the module name
from .linear_logprobs import OP_BACKENDS as _LINEAR_LOGPROBS_BACKENDS, linear_logprobs  # shadows the module name
from .linear_losses import OP_BACKENDS as _LINEAR_LOSSES_BACKENDS, linear_dpo_loss, linear_ppo_loss
from .loss_weights import AGG_MODES, loss_normalizer, loss_weights  # loss_weights shadows the module name
from .ppo_loss import ppo_loss_from_logits, ppo_objective, ppo_policy_loss, ppo_value_loss
from .rollout_correction import (IS_MODES, RS_LEVELS, RS_STATS, mismatch_metrics, rollout_correction,
                                 rollout_rejection)
from .sampling import sample
from .token_logprobs import entropy, kl_divergence, kl_penalty, logprobs, logprobs_and_entropy

# public op name -> backends implementing it; each op family adds its module's table here
OP_BACKENDS = {
    **token_logprobs.OP_BACKENDS, **_LINEAR_LOGPROBS_BACKENDS, **_linear_cross_entropy.OP_BACKENDS,
    **_LINEAR_LOSSES_BACKENDS,
    **ppo_loss.OP_BACKENDS, **advantages.OP_BACKENDS, **sampling.OP_BACKENDS,
}

__all__ = [
    "entropy", "kl_divergence", "kl_penalty", "linear_cross_entropy", "linear_dpo_loss", "linear_logprobs",
    "linear_ppo_loss", "logprobs", "logprobs_and_entropy",
    "AGG_MODES", "loss_normalizer", "loss_weights",
    "ppo_loss_from_logits", "ppo_objective", "ppo_policy_loss", "ppo_value_loss",
    "IS_MODES", "RS_LEVELS", "RS_STATS", "mismatch_metrics", "rollout_correction", "rollout_rejection",
    "discounted_returns", "gae", "group_advantages", "masked_mean", "masked_var", "masked_whiten",
    "sample",
]
