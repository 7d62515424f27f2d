"""OpenRLHF-compatible functions: same names, signatures and return values as ``openrlhf.models.utils``.

Swap the import and keep the trainer::

    # from openrlhf.models.utils import log_probs_from_logits, compute_approx_kl, masked_mean
    from rlhf_fast.integrations.openrlhf import log_probs_from_logits, compute_approx_kl, masked_mean

Semantics follow OpenRLHF (``openrlhf/models/utils.py``, 2025), not FORMULAS.md, where they differ:
  - ``compute_approx_kl`` clamps every estimator's result to [-10, 10] (OpenRLHF does; FORMULAS.md clamps k3 only).
  - ``log_probs_from_logits`` returns float32 whatever the logits dtype (OpenRLHF returns float32 on its flash-attn
    path and the logits dtype on its fallback path) and does NOT divide ``logits`` in place by the temperature
    (OpenRLHF does, as a memory trick; the values returned are the same).
  - ``PolicyLoss`` clamps log(ratio) to [-20, 20] before exp (FORMULAS.md; OpenRLHF does not clamp): the two differ
    only where the new and old log-probs are more than 20 nats apart.
Tensors of a dtype the fused kernels do not take (float64) go through the plain PyTorch formula.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops

__all__ = ["PolicyLoss", "ValueLoss", "compute_approx_kl", "compute_entropy", "log_probs_from_logits", "masked_mean"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def _seq_mean_all_rows(loss: Tensor, mask: Tensor) -> Tensor:
    """rlhf_fast's seq-mean-token-mean (over rows with tokens) -> OpenRLHF's (over all rows; NaN if one is empty)."""
    rows = mask.bool().any(-1)
    loss = loss * (rows.sum() / rows.numel())
    return torch.where(rows.all(), loss, torch.full_like(loss, float("nan")))


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
        agg = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
        loss, _ = ops.ppo_policy_loss(log_probs, old_log_probs, advantages, mask, clip_low=self.clip_eps_low,
                                      clip_high=self.clip_eps_high, agg=agg)
        if not self.token_level_loss:
            loss = _seq_mean_all_rows(loss, mask)
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
        agg = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
        loss, _ = ops.ppo_value_loss(values, old_values, returns, mask, clip=self.clip_eps, agg=agg)
        return loss if self.token_level_loss else _seq_mean_all_rows(loss, mask)
