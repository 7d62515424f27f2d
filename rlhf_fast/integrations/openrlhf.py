"""OpenRLHF-compatible functions and losses: same names, signatures and return values as OpenRLHF's
``openrlhf/models/utils.py`` and ``openrlhf/models/loss.py``.

Swap the import and keep the trainer::

    # from openrlhf.models.utils import log_probs_from_logits, compute_approx_kl, compute_reward, masked_mean
    # from openrlhf.models.loss import PolicyLoss, ValueLoss, GPTLMLoss, DPOLoss
    from rlhf_fast.integrations.openrlhf import log_probs_from_logits, compute_approx_kl, PolicyLoss, ValueLoss

Versions: OpenRLHF 0.11 (v0.11.0 = HEAD of 2026-08-13; the signatures since v0.10.3) by default. ``PolicyLoss``
takes a keyword-only ``version``: ``"0.11"``; ``"0.9"`` (v0.9.0 .. v0.10.2: the same 4-tuple and options, no
global-batch arguments); ``"0.8"`` (v0.8.5: ``PolicyLoss(clip_eps_low, clip_eps_high, token_level_loss)``
returning ``(loss, clip_ratio)``); so does ``compute_approx_kl`` (``"0.8"``: no [-10, 10] clamp). ``ppo_kl`` is the
policy KL, masked mean of (old_log_probs - log_probs), at every version (OpenRLHF 0.9.x reported the rollout KL
there in some configurations, fixed in 0.10.3). ``KTOLoss`` / ``VanillaKTOLoss`` are v0.9's (OpenRLHF removed them
in v0.9.6). A warning is given (once, at import) when the installed openrlhf is outside 0.8.5 .. 0.11.x.

Semantics follow OpenRLHF, not docs/formulas.md, where they differ:
  - ``compute_approx_kl`` clamps every estimator's result to [-10, 10] (OpenRLHF does; docs/formulas.md clamps k3 only).
  - ``log_probs_from_logits`` returns float32 whatever the logits dtype (OpenRLHF returns float32 on its flash-attn
    path and the logits dtype on its fallback path) and does NOT divide ``logits`` in place by the temperature
    (OpenRLHF does, as a memory trick; the values returned are the same).
  - Every aggregated loss is ``sum_t w_t l_t`` with ``rlhf_fast.loss_weights`` (``aggregate_loss``): with
    ``token_level_loss=False`` a fully masked row is left out (as OpenRLHF >= 0.10.3; older versions give NaN, and
    so does the adapter never); values outside the mask, NaN included, never count.
  - The PPO ratio is exp(clamp(log-ratio, -20, 20)) for GSPO too and at every version (OpenRLHF clamps the PPO
    ratio since 0.10.3 and never the GSPO one): the two differ only where log-probs are more than 20 nats apart.
  - ``GPTLMLoss`` gives 0 (not NaN) when every label is ignored; ring attention is not covered.
Tensors of a dtype the fused kernels do not take (float64) go through the plain PyTorch formula where one is given.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import ops

__all__ = ["DPOLoss", "GPTLMLoss", "KTOLoss", "LogExpLoss", "PairWiseLoss", "PolicyLoss", "SFTLoss", "ValueLoss",
           "VanillaKTOLoss", "aggregate_loss", "compute_approx_kl", "compute_entropy", "compute_reward",
           "log_probs_from_logits", "masked_mean"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VERSIONS = ("0.11", "0.9", "0.8")
_VLLM_IS_TYPES = ("tis", "icepop", "seq-mask-tis")


def _warn_if_uncovered() -> None:
    """Warn once (at import) when the installed openrlhf is a version these adapters do not cover."""
    try:
        v = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return
    parts = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in v.split(".")[:3])
    if not (0, 8, 5) <= parts < (0, 12, 0):
        warnings.warn(f"rlhf_fast.integrations.openrlhf covers openrlhf 0.8.5 .. 0.11.x; openrlhf {v} is installed and "
                      "may differ (docs/integrations.md)", stacklevel=2)


_warn_if_uncovered()


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[labels]: logits [..., V], labels int64 [...] in [0, V) -> float32 [...].

    Differentiable w.r.t. ``logits``; no [..., V] temporary is materialized (rlhf_fast.logprobs).
    """
    if logits.dtype not in _KERNEL_DTYPES:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return ops.logprobs(logits, labels, temperature=temperature)


def compute_approx_kl(log_probs: Tensor, log_probs_base: Tensor, kl_estimator: str = "k1", *,
                      version: str = "0.11") -> Tensor:
    """Schulman's sampled KL estimators of KL(pi || pi_base), per token, float32, clamped to [-10, 10] (``version=
    "0.8"``: not clamped, as OpenRLHF 0.8.5).

    With ``r = log_probs - log_probs_base``: k1 = r; k2 = r^2 / 2; k3 = exp(-r) - 1 + r.
    log_probs, log_probs_base: same shape -> float32, differentiable w.r.t. both.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be one of 'k1', 'k2', 'k3', got {kl_estimator!r}")
    if _check_version(version) == "0.8" or log_probs.dtype not in _KERNEL_DTYPES \
            or log_probs_base.dtype not in _KERNEL_DTYPES:
        r = log_probs.float() - log_probs_base.float()
        kl = {"k1": r, "k2": r * r / 2.0, "k3": torch.exp(-r) - 1.0 + r}[kl_estimator]
        return kl if version == "0.8" else kl.clamp(-10.0, 10.0)
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


def compute_reward(r: Union[Tensor, float], kl_coef: float, kl: Tensor, action_mask: Optional[Tensor] = None,
                   reward_clip_range: Optional[tuple[float, float]] = None) -> Tensor:
    """Token rewards: ``-kl_coef * kl`` (kl_coef < 0 counts as 0) plus the sequence reward ``r`` (clamped to
    ``reward_clip_range`` when given) at each row's last action token (``action_mask``'s last nonzero position; the
    last position when the row has none). r: [B]; kl, action_mask: [B, T] -> [B, T], kl's dtype."""
    if action_mask is None:
        raise ValueError("compute_reward needs action_mask (the row's last action token gets the reward)")
    kl_coef = max(kl_coef, 0.0)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    last = action_mask.shape[1] - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    return torch.zeros_like(kl).scatter_(1, last, r.unsqueeze(1).to(kl.dtype)) - kl_coef * kl


def _all_tokens(mask: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask


def _weights(mask: Tensor, token_level_loss: bool, dp_size: int = 1, batch_num_tokens=None,
             global_batch_size=None) -> Tensor:
    """OpenRLHF's aggregation as per-token weights: the token mean (over ``batch_num_tokens`` when given, times
    dp_size), or the mean over the sequences with at least one token of each one's token mean (over
    ``global_batch_size`` when given, times dp_size). An empty batch gives 0."""
    mode = "token-mean" if token_level_loss else "seq-mean-token-mean"
    given = batch_num_tokens if token_level_loss else global_batch_size
    if given is None:
        return ops.loss_weights(mask.float(), mode)
    norm = torch.as_tensor(given, dtype=torch.float32, device=mask.device) / dp_size
    return ops.loss_weights(mask.float(), mode, normalizer=norm)


def aggregate_loss(loss: Tensor, loss_mask: Tensor, token_level_loss: bool = True, dp_size: int = 1,
                   batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None) -> Tensor:
    """OpenRLHF's ``aggregate_loss`` (>= 0.10.3): token_level_loss: sum(l m) / N * dp_size (N = batch_num_tokens,
    default this batch's tokens); else sum over rows with a token of their token mean / G * dp_size (G =
    global_batch_size, default those rows' count). A normaliser of 0 gives 0; NaN outside the mask is ignored."""
    w = _weights(loss_mask, token_level_loss, dp_size, batch_num_tokens, global_batch_size)
    return torch.where(w != 0, w * loss, 0.0).sum()


def _check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    return version


def _thresholds(threshold) -> tuple[Optional[float], Optional[float]]:
    """vllm_is_truncated_threshold: [low, high] (OpenRLHF >= 0.9.2) or one number, the upper bound (0.9.0)."""
    if threshold is None:
        raise ValueError("vllm_is_truncated_threshold must be given with enable_vllm_is_correction")
    if isinstance(threshold, (int, float)):
        return None, float(threshold)
    low, high = threshold
    return float(low), float(high)


class PolicyLoss(torch.nn.Module):
    """OpenRLHF's PPO / GSPO policy loss on the fused ``rlhf_fast.ppo_policy_loss``.

    ppo: ratio = exp(clamp(log_probs - old_log_probs, -20, 20)); gspo: one ratio per row, exp(mean over the row's
    action tokens of (log_probs - old_log_probs), or of (log_probs - rollout_log_probs) with the vLLM correction),
    differentiable through the mean, and always the sequence-level aggregation. Loss per token
    ``-min(ratio A, clamp(ratio, 1 - eps_low, 1 + eps_high) A)``, and where A < 0 with ``dual_clip`` c,
    ``min(that, -c A)``. vLLM importance-sampling correction (ppo only; c_t = exp(old_log_probs -
    rollout_log_probs), a constant) multiplies each token's loss by: "tis" clamp(c_t, low, high); "icepop" c_t where
    low <= c_t <= high, else 0; "seq-mask-tis" c_t where the row's exp(mean log c) is within [low, high], else 0.
    Aggregated as ``aggregate_loss`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``: OpenRLHF >= 0.10.3).

    ``forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
    batch_num_tokens=None, global_batch_size=None) -> (loss, clip_ratio, ppo_kl, vllm_kl)``: clip_ratio = masked
    mean of [clipped surrogate < surrogate]; ppo_kl = masked mean of (old_log_probs - log_probs), unclamped;
    vllm_kl = masked mean of (rollout_log_probs - old_log_probs) with the correction (ppo), else None.
    ``version="0.8"``: ``forward(log_probs, old_log_probs, advantages, action_mask) -> (loss, clip_ratio)``.
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: Optional[float] = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", enable_vllm_is_correction: bool = False,
                 vllm_is_truncated_threshold: Union[float, Sequence[float], None] = None,
                 vllm_is_correction_type: str = "tis", *, version: str = "0.11") -> None:
        super().__init__()
        self.version = _check_version(version)
        if version == "0.8" and (dual_clip is not None or policy_loss_type != "ppo" or enable_vllm_is_correction):
            raise ValueError("dual_clip, policy_loss_type and the vLLM correction exist since OpenRLHF 0.9, "
                             "not in version '0.8'")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if vllm_is_correction_type not in _VLLM_IS_TYPES:
            raise ValueError(f"Invalid vllm_is_correction_type: {vllm_is_correction_type}, must be one of "
                             "tis/icepop/seq-mask-tis")
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.token_level_loss = False if policy_loss_type == "gspo" else token_level_loss
        self.policy_loss_type = policy_loss_type
        self.enable_vllm_is_correction = enable_vllm_is_correction
        self.vllm_is_truncated_threshold = vllm_is_truncated_threshold
        self.vllm_is_correction_type = vllm_is_correction_type

    def _vllm_is(self, old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor) -> Tensor:
        low, high = _thresholds(self.vllm_is_truncated_threshold)
        log_c = old_log_probs.float() - rollout_log_probs.float()
        c = log_c.exp()
        if self.vllm_is_correction_type == "tis":
            return c.clamp(min=low, max=high)
        if self.vllm_is_correction_type == "icepop":
            return torch.where((c >= (low or 0.0)) & (c <= high), c, 0.0)
        m = mask.float()
        seq = ((log_c * m).sum(-1) / m.sum(-1)).exp()[:, None]
        return torch.where((seq >= (low or 0.0)) & (seq <= high), c, 0.0)

    def forward(self, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                action_mask: Optional[Tensor] = None, rollout_log_probs: Optional[Tensor] = None, dp_size: int = 1,
                batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None):
        mask = _all_tokens(action_mask, log_probs)
        if self.version != "0.11" and (dp_size != 1 or batch_num_tokens is not None or global_batch_size is not None):
            raise ValueError("dp_size, batch_num_tokens, global_batch_size exist since OpenRLHF 0.10.3 "
                             f"(version '0.11'), not in version {self.version!r}")
        vllm = self.enable_vllm_is_correction
        if vllm and rollout_log_probs is None:
            raise ValueError("rollout_log_probs must be given with enable_vllm_is_correction")
        w = _weights(mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        vllm_kl = None
        if self.policy_loss_type == "gspo":
            base = rollout_log_probs if vllm else old_log_probs
            m = mask.float()
            seq = torch.where(mask.bool(), log_probs.float() - base.float(), 0.0).sum(-1) / m.sum(-1).clamp(min=1)
            logp, old = seq[:, None].expand_as(m), torch.zeros_like(m)
        else:
            logp, old = log_probs, old_log_probs
            if vllm:
                with torch.no_grad():
                    w = w * self._vllm_is(old_log_probs, rollout_log_probs, mask)
                    vllm_kl = masked_mean(rollout_log_probs.float() - old_log_probs.float(), mask)
        loss, _ = ops.ppo_policy_loss(logp, old, advantages, w, clip_low=self.clip_eps_low,
                                      clip_high=self.clip_eps_high, dual_clip=self.dual_clip)
        with torch.no_grad():
            ratio = (logp.detach().float() - old.float()).clamp(-20.0, 20.0).exp()
            adv = advantages.float()
            surr1, surr2 = ratio * adv, ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * adv
            clip_ratio = masked_mean((surr2 < surr1).float(), mask)
            if self.version == "0.8":
                return loss, clip_ratio
            ppo_kl = masked_mean(old_log_probs.float() - log_probs.detach().float(), mask)
        return loss, clip_ratio, ppo_kl, vllm_kl


class ValueLoss(torch.nn.Module):
    """OpenRLHF's value loss: ``0.5 * max((V_clipped - R)^2, (V - R)^2)`` with ``V_clipped = V_old + clamp(V - V_old,
    -clip_eps, clip_eps)`` (unclipped ``0.5 * (V - R)^2`` when ``clip_eps`` is None), aggregated as
    ``aggregate_loss``. ``forward(values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
    global_batch_size=None) -> loss`` (0-d float32; the global-batch arguments: OpenRLHF >= 0.10.3)."""

    def __init__(self, clip_eps: Optional[float] = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values: Tensor, old_values: Tensor, returns: Tensor, action_mask: Optional[Tensor] = None,
                dp_size: int = 1, batch_num_tokens: Optional[float] = None,
                global_batch_size: Optional[float] = None) -> Tensor:
        mask = _all_tokens(action_mask, values)
        w = _weights(mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        return ops.ppo_value_loss(values, old_values, returns, w, clip=self.clip_eps)[0]


class SFTLoss(torch.nn.Module):
    """OpenRLHF's ``SFTLoss``: ``aggregate_loss(-per_token_logps, loss_mask, token_level_loss, ...)``."""

    def __init__(self, token_level_loss: bool = True) -> None:
        super().__init__()
        self.token_level_loss = token_level_loss

    def forward(self, per_token_logps: Tensor, loss_mask: Tensor, dp_size: int = 1,
                batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None) -> Tensor:
        return aggregate_loss(-per_token_logps.float(), loss_mask, self.token_level_loss, dp_size, batch_num_tokens,
                              global_batch_size)


class GPTLMLoss(torch.nn.Module):
    """OpenRLHF's next-token cross-entropy: mean over the positions whose next label is not -100 of
    -log softmax(logits[t])[labels[t + 1]], on the fused ``rlhf_fast.logprobs`` (no [N, V] log-softmax kept).
    logits [B, T, V], labels int64 [B, T] -> 0-d float32 (0 when every label is ignored; OpenRLHF: NaN).
    ``ring_attn_group`` (ring attention) is not covered: passing one raises NotImplementedError."""

    IGNORE_INDEX = -100

    def __init__(self, ring_attn_group=None) -> None:
        super().__init__()
        if ring_attn_group is not None:
            raise NotImplementedError("GPTLMLoss with ring attention is not covered by rlhf_fast")

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        shift_logits, shift_labels = logits[..., :-1, :], labels[..., 1:]
        keep = shift_labels != self.IGNORE_INDEX
        logp = log_probs_from_logits(shift_logits, torch.where(keep, shift_labels, 0))
        return aggregate_loss(-logp, keep)


class VanillaKTOLoss(torch.nn.Module):
    """OpenRLHF 0.9's KTO for even sampling: with x_c = pi_c - ref_c, x_r = pi_r - ref_r and the clamped-at-0 batch
    means KL_c, KL_r: mean of [1 - sigmoid(beta (x_c - KL_r)), 1 - sigmoid(beta (KL_c - x_r))] ->
    (loss, beta x_c, beta x_r) (rewards detached)."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                reference_rejected_logps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_c = policy_chosen_logps - reference_chosen_logps
        x_r = policy_rejected_logps - reference_rejected_logps
        kl_c, kl_r = x_c.mean().clamp(min=0), x_r.mean().clamp(min=0)
        losses = torch.cat((1 - torch.sigmoid(self.beta * (x_c - kl_r)), 1 - torch.sigmoid(self.beta * (kl_c - x_r))))
        return losses.mean(), self.beta * x_c.detach(), self.beta * x_r.detach()


class KTOLoss(torch.nn.Module):
    """OpenRLHF 0.9's KTO for uneven sampling: KL = max(0, mean over ranks of mean(policy_KL - reference_KL))
    (detached; all-reduced when torch.distributed is initialized), chosen losses 1 - sigmoid(beta (x_c - KL)) times
    ``desirable_weight``, rejected 1 - sigmoid(beta (KL - x_r)) times ``undesirable_weight``, their mean ->
    (loss, beta x_c, beta x_r, KL); an empty chosen or rejected batch contributes nothing."""

    def __init__(self, beta: float, desirable_weight: float, undesirable_weight: float, world_size: int,
                 device: torch.device) -> None:
        super().__init__()
        self.beta, self.world_size, self.device = beta, world_size, device
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, policy_KL_logps: Tensor,
                reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, reference_KL_logps: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        kl = (policy_KL_logps - reference_KL_logps).mean().detach()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(kl, op=torch.distributed.ReduceOp.SUM)
        kl = (kl / self.world_size).clamp(min=0)
        x_c = policy_chosen_logps - reference_chosen_logps
        x_r = policy_rejected_logps - reference_rejected_logps
        chosen = 1 - torch.sigmoid(self.beta * (x_c - kl))
        rejected = 1 - torch.sigmoid(self.beta * (kl - x_r))
        losses = torch.cat((self.desirable_weight * chosen, self.undesirable_weight * rejected)).mean()
        return losses, self.beta * x_c.detach(), self.beta * x_r.detach(), kl


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
