"""OpenRLHF-compatible functions: same names, signatures and return values as ``openrlhf.models.utils``.

Swap the import and keep the trainer::

    # from openrlhf.models.utils import log_probs_from_logits, compute_approx_kl, masked_mean
    from rlhf_fast.integrations.openrlhf import log_probs_from_logits, compute_approx_kl, masked_mean

Semantics follow OpenRLHF (``openrlhf/models/utils.py``, 2025), not docs/formulas.md, where they differ:
  - ``compute_approx_kl`` clamps every estimator's result to [-10, 10] (OpenRLHF does; docs/formulas.md clamps k3 only).
  - ``log_probs_from_logits`` returns float32 whatever the logits dtype (OpenRLHF returns float32 on its flash-attn
    path and the logits dtype on its fallback path) and does NOT divide ``logits`` in place by the temperature
    (OpenRLHF does, as a memory trick; the values returned are the same).
  - ``PolicyLoss`` clamps log(ratio) to [-20, 20] before exp (docs/formulas.md; OpenRLHF does not clamp): the two differ
    only where the new and old log-probs are more than 20 nats apart.
  - ``PolicyLoss`` / ``ValueLoss`` keep the v0.8.5 signatures (``forward(..., action_mask)``, PolicyLoss returns
    ``(loss, clip_ratio)``) with HEAD's aggregation: ``token_level_loss=False`` averages over the sequences with at
    least one token (a fully masked row is left out, not NaN); the loss is ``sum_t w_t l_t`` with
    ``rlhf_fast.loss_weights``. v0.9's ``(loss, clip_ratio, ppo_kl, vllm_kl)``, dual clip, gspo and the
    ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` arguments are not covered yet.
  - ``PairWiseLoss``, ``LogExpLoss``, ``DPOLoss`` (openrlhf/models/loss.py): thin formulas, OpenRLHF's signatures.
Tensors of a dtype the fused kernels do not take (float64) go through the plain PyTorch formula.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import ops

__all__ = ["DPOLoss", "LogExpLoss", "PairWiseLoss", "PolicyLoss", "ValueLoss", "compute_approx_kl", "compute_entropy",
           "log_probs_from_logits", "masked_mean"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

def _warn_if_uncovered() -> None:
    """Warn once (at import) when the installed openrlhf is a version these adapters do not target."""
    try:
        v = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return
    if not v.startswith("0.8."):
        warnings.warn(f"rlhf_fast.integrations.openrlhf targets openrlhf 0.8.x; openrlhf {v} is installed and may differ "
                      "(docs/integrations.md)", stacklevel=2)


_warn_if_uncovered()


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[labels]: logits [..., V], labels int64 [...] in [0, V) -> float32 [...].

    Differentiable w.r.t. ``logits``; no [..., V] temporary is materialized (rlhf_fast.logprobs).
    """
    if logits.dtype not in _KERNEL_DTYPES:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return ops.logprobs(logits, labels, temperature=temperature)


def compute_approx_kl(log_probs: Tensor, log_probs_base: Tensor, kl_estimator: str = "k1") -> Tensor:
    """Schulman's sampled KL estimators of KL(pi || pi_base), per token, float32, clamped to [-10, 10].

    With ``r = log_probs - log_probs_base``: k1 = r; k2 = r^2 / 2; k3 = exp(-r) - 1 + r.
    log_probs, log_probs_base: same shape -> float32, differentiable w.r.t. both.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be one of 'k1', 'k2', 'k3', got {kl_estimator!r}")
    if log_probs.dtype not in _KERNEL_DTYPES or log_probs_base.dtype not in _KERNEL_DTYPES:
        r = log_probs.float() - log_probs_base.float()
        kl = {"k1": r, "k2": r * r / 2.0, "k3": torch.exp(-r) - 1.0 + r}[kl_estimator]
        return kl.clamp(-10.0, 10.0)
    # rlhf_fast's k3 already clamps to [-10, 10]; its d-clamp to [-20, 20] changes no clamped value.
    kl = ops.kl_penalty(log_probs, log_probs_base, kind=kl_estimator)
    return kl if kl_estimator == "k3" else kl.clamp(-10.0, 10.0)


def compute_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits): logits [..., V] -> float32 [...] (OpenRLHF's ``compute_entropy``)."""
    if logits.dtype not in _KERNEL_DTYPES:
        logp = torch.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp).sum(-1)
    return ops.entropy(logits)


def masked_mean(tensor: Tensor, mask: Optional[Tensor], dim: Optional[int] = None) -> Tensor:
    """``(tensor * mask).sum(dim) / mask.sum(dim)``; the plain mean when ``mask`` is None (as OpenRLHF)."""
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def _all_tokens(mask: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask


def _weights(mask: Tensor, token_level_loss: bool) -> Tensor:
    """OpenRLHF's (HEAD) aggregation as per-token weights: the token mean, or the mean over the sequences with at
    least one token of each one's token mean (a fully masked row is left out; an empty batch gives 0)."""
    return ops.loss_weights(mask.float(), "token-mean" if token_level_loss else "seq-mean-token-mean")


class PolicyLoss(torch.nn.Module):
    """OpenRLHF's PPO policy loss: ``-min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)``, masked mean over
    tokens (``token_level_loss``) or over tokens then sequences. ``forward(log_probs, old_log_probs, advantages,
    action_mask=None) -> (loss, clip_ratio)``, both 0-d float32; clip_ratio = masked mean of [clipped surr < surr]."""

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.token_level_loss = token_level_loss

    def forward(self, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                action_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        mask = _all_tokens(action_mask, log_probs)
        loss, _ = ops.ppo_policy_loss(log_probs, old_log_probs, advantages, _weights(mask, self.token_level_loss),
                                      clip_low=self.clip_eps_low, clip_high=self.clip_eps_high)
        with torch.no_grad():
            ratio = (log_probs.float() - old_log_probs.float()).exp()
            surr1 = ratio * advantages
            surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
            clip_ratio = masked_mean((surr2 < surr1).float(), mask)
        return loss, clip_ratio


class ValueLoss(torch.nn.Module):
    """OpenRLHF's value loss: ``0.5 * max((V_clipped - R)^2, (V - R)^2)`` with ``V_clipped = V_old + clamp(V - V_old,
    -clip_eps, clip_eps)`` (unclipped ``0.5 * (V - R)^2`` when ``clip_eps`` is None), masked mean as in PolicyLoss.
    ``forward(values, old_values, returns, action_mask=None) -> loss`` (0-d float32)."""

    def __init__(self, clip_eps: Optional[float] = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values: Tensor, old_values: Tensor, returns: Tensor,
                action_mask: Optional[Tensor] = None) -> Tensor:
        mask = _all_tokens(action_mask, values)
        return ops.ppo_value_loss(values, old_values, returns, _weights(mask, self.token_level_loss),
                                  clip=self.clip_eps)[0]


class PairWiseLoss(torch.nn.Module):
    """OpenRLHF's reward-model loss: ``mean(-logsigmoid(chosen - rejected - margin))`` (margin 0 when None)."""

    def forward(self, chosen_reward: Tensor, reject_reward: Tensor, margin: Optional[Tensor] = None) -> Tensor:
        diff = chosen_reward - reject_reward
        return -torch.nn.functional.logsigmoid(diff if margin is None else diff - margin).mean()


class LogExpLoss(torch.nn.Module):
    """OpenRLHF's ``mean(log(1 + exp(rejected - chosen)))`` (= softplus, stable); ``margin`` is accepted and unused,
    as in OpenRLHF."""

    def forward(self, chosen_reward: Tensor, reject_reward: Tensor, margin: Optional[Tensor] = None) -> Tensor:
        return torch.nn.functional.softplus(reject_reward - chosen_reward).mean()


class DPOLoss(torch.nn.Module):
    """OpenRLHF's DPO loss. With x = (pi_c - pi_r) - (ref_c - ref_r): sigmoid loss ``-(1 - ls) logsigmoid(beta x) -
    ls logsigmoid(-beta x)`` (ls = label_smoothing), or IPO ``(x - 1 / (2 beta))^2``; ``forward(...) -> (mean loss,
    chosen_rewards = beta (pi_c - ref_c), rejected_rewards = beta (pi_r - ref_r))``, the rewards detached."""

    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False) -> None:
        super().__init__()
        self.beta, self.label_smoothing, self.ipo = beta, label_smoothing, ipo

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                reference_rejected_logps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
        if self.ipo:
            losses = (x - 1 / (2 * self.beta)) ** 2
        else:
            logsig = torch.nn.functional.logsigmoid
            losses = -(1 - self.label_smoothing) * logsig(self.beta * x) - self.label_smoothing * logsig(-self.beta * x)
        chosen = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
        return losses.mean(), chosen, rejected
