"""veRL-compatible functions: same names, signatures and return tuples as veRL's published functions.

Swap the import and keep the trainer::

    # from verl.trainer.ppo.core_algos import compute_gae_advantage_return, compute_policy_loss, ...
    # from verl.utils.torch_functional import logprobs_from_logits, entropy_from_logits
    from rlhf_fast.integrations.verl import compute_gae_advantage_return, compute_policy_loss, logprobs_from_logits

From ``verl/trainer/ppo/core_algos.py``: ``kl_penalty``, ``agg_loss``, ``compute_gae_advantage_return``,
``compute_policy_loss`` (vanilla PPO with dual clip), ``compute_value_loss``. From ``verl/utils/torch_functional.py``:
``logprobs_from_logits``, ``entropy_from_logits``, ``masked_mean``, ``masked_var``, ``masked_whiten``.

Semantics follow veRL, not docs/formulas.md, where they differ (each function's docstring says how):
  - GAE: at positions outside ``response_mask`` the advantage is the carried running value (docs/formulas.md: 0),
    returns are ``advantages + values`` before whitening and unmasked, and the advantages come back whitened over
    the mask (at every position, not multiplied by the mask).
  - agg_loss (veRL >= 0.6.1, as at v0.7/HEAD): the ``seq-mean-*`` modes average over the sequences with at least
    one token; ``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor`` as in veRL; the loss
    is a sum of per-token weights (``rlhf_fast.loss_weights``) times the loss, so an empty batch gives 0 (veRL: NaN
    in token-mean, where it divides 0 by 0).
  - masked_mean: veRL's ``masked_sum / (mask.sum() + 1e-8)``: values outside the mask (NaN included) are ignored and
    an empty mask gives 0.
  - the PPO ``ppo_kl`` diagnostic is the k1 mean ``mean_mask(old_logp - logp)`` (docs/formulas.md: k3).
  - ``logprobs_from_logits`` returns float32 (veRL: float32 on its flash-attn path, the logits dtype otherwise).
Tensors of a dtype the fused kernels do not take (float64) go through the plain PyTorch formula.
"""

from __future__ import annotations

import importlib.metadata
import warnings

import torch
from torch import Tensor

from .. import ops

__all__ = [
    "agg_loss", "compute_gae_advantage_return", "compute_policy_loss", "compute_value_loss", "entropy_from_logits",
    "kl_penalty", "logprobs_from_logits", "masked_mean", "masked_var", "masked_whiten",
]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_KL_KINDS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}

def _older_than(version: str, target: tuple[int, ...]) -> bool:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) < target


def _warn_if_uncovered() -> None:
    """Warn once (at import) when the installed verl is a version these adapters do not target."""
    try:
        v = importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return
    if _older_than(v, (0, 6, 1)):
        warnings.warn(f"rlhf_fast.integrations.verl targets verl >= 0.6.1; verl {v} is installed and may differ "
                      "(docs/integrations.md)", stacklevel=2)


_warn_if_uncovered()


# ------------------------------------------------------------------------------------------------------------------
# verl.utils.torch_functional
# ------------------------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    """log softmax(logits)[labels]: logits [..., V], labels int64 [...] in [0, V) -> float32 [...].

    ``inplace_backward`` is accepted for compatibility (veRL passes it to flash-attn); the fused op never keeps the
    [..., V] log-softmax, so there is nothing to do in place.
    """
    if logits.dtype not in _KERNEL_DTYPES:
        return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return ops.logprobs(logits, labels)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits): logits [..., V] -> float32 [...]."""
    if logits.dtype not in _KERNEL_DTYPES:
        logp = torch.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp).sum(-1)
    return ops.entropy(logits)


def masked_mean(values: Tensor, mask: Tensor, axis=None) -> Tensor:
    """``sum(values where mask) / (mask.sum(axis) + 1e-8)``: values outside the mask (NaN too) do not count; an empty
    mask gives 0."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the masked entries (Bessel-corrected when ``unbiased``; raises if fewer than 2 entries)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n == 0:
            raise ValueError("At least one element in the mask has to be 1.")
        if n == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        var = var * (n / (n - 1))
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` with mean and unbiased variance over the mask, at every position."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ------------------------------------------------------------------------------------------------------------------
# verl.trainer.ppo.core_algos
# ------------------------------------------------------------------------------------------------------------------


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """Per-token KL estimator of KL(pi || pi_ref) from sampled-token log-probs -> float32, same shape.

    ``kl_penalty``: "kl"/"k1" = logprob - ref_logprob; "abs" = |k1|; "mse"/"k2" = k1^2 / 2;
    "low_var_kl"/"k3" = exp(d) - d - 1 with d = ref_logprob - logprob clamped to [-20, 20], result to [-10, 10].
    A "+" suffix ("k1+", "k3+", ...) keeps that value but takes the gradient of k2 (veRL's straight-through trick).
    "full" raises NotImplementedError, as in veRL.
    """
    straight_through = kl_penalty.endswith("+") and kl_penalty not in ("mse+", "k2+")
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base == "full":
        raise NotImplementedError("kl_penalty='full' needs the full distributions; use rlhf_fast.kl_divergence")
    if base not in _KL_KINDS:
        raise ValueError(f"kl_penalty must be one of {sorted(_KL_KINDS)} (optionally with '+'), got {kl_penalty!r}")
    kind = _KL_KINDS[base]
    if logprob.dtype in _KERNEL_DTYPES and ref_logprob.dtype in _KERNEL_DTYPES:
        value = ops.kl_penalty(logprob, ref_logprob, kind=kind)
    else:
        value = ops.token_logprobs.kl_penalty_ref(logprob, ref_logprob, kind)
    if not straight_through:
        return value
    k2 = 0.5 * (logprob.float() - ref_logprob.float()).square()
    return k2 - k2.detach() + value.detach()


def _verl_weights(loss_mask: Tensor, loss_agg_mode: str, dp_size: int = 1, batch_num_tokens=None,
                  global_batch_size=None, loss_scale_factor=None) -> Tensor:
    """veRL's aggregation as per-token weights (sum_t w_t l_t is veRL's loss): D is this batch's normaliser of the
    mode (rlhf_fast.loss_normalizer) or the global count veRL is given, divided by dp_size (not for sum-norm)."""
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    mask = loss_mask.float()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return ops.loss_weights(mask, loss_agg_mode, normalizer=torch.as_tensor(float(scale)))
    given = batch_num_tokens if loss_agg_mode == "token-mean" else global_batch_size
    norm = ops.loss_normalizer(mask, loss_agg_mode) if given is None else torch.as_tensor(given, dtype=torch.float32)
    return ops.loss_weights(mask, loss_agg_mode, normalizer=norm.to(mask.device).float() / dp_size)


def agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, dp_size: int = 1, batch_num_tokens=None,
             global_batch_size=None, loss_scale_factor=None) -> Tensor:
    """Aggregate a per-token loss [B, T] over the mask into a scalar, veRL (>= 0.6.1) semantics.

    token-mean: sum(l*m) / N * dp_size (N = batch_num_tokens, default sum m); seq-mean-token-sum /
    seq-mean-token-mean: sum over non-empty rows of sum_t(l*m) (/ n_row) / G * dp_size (G = global_batch_size,
    default the number of non-empty rows); seq-mean-token-sum-norm: sum(l*m) / (loss_scale_factor or T).
    Values outside the mask (NaN too) do not count; a normaliser of 0 gives 0.
    """
    w = _verl_weights(loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    return torch.where(w != 0, w * loss_mat, 0.0).sum()


def compute_gae_advantage_return(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma, lam
                                 ) -> tuple[Tensor, Tensor]:
    """GAE over the masked response, veRL semantics: returns (advantages, returns), both [B, T] float32, no grad.

    The recursion is docs/formulas.md's (positions outside ``response_mask`` are skipped, the next value and the running
    advantage carried across them; rlhf_fast.ops.gae). As in veRL, a masked-out position holds the carried running
    advantage (that of the next response token, 0 after the last one), ``returns = advantages + values`` there too,
    and the advantages are then whitened over the mask (``masked_whiten``) at every position.
    token_level_rewards, values: [B, T] float; response_mask: [B, T] 0/1 or bool; gamma, lam: floats (or 0-d tensors).
    """
    with torch.no_grad():
        mask = response_mask.bool()
        adv, _ = ops.gae(token_level_rewards, values, mask, gamma=float(gamma), lam=float(lam))
        adv = _carry_backward(adv.float(), mask)
        returns = adv + values
        advantages = masked_whiten(adv, response_mask)
    return advantages, returns


def _carry_backward(x: Tensor, mask: Tensor) -> Tensor:
    """x[b, t] at mask positions; at the others, x at the next mask position of the row (0 when there is none)."""
    t = mask.shape[-1]
    pos = torch.arange(t, device=mask.device).expand_as(mask)
    next_pos = torch.where(mask, pos, t).flip(-1).cummin(-1).values.flip(-1)
    return torch.nn.functional.pad(x, (0, 1)).gather(-1, next_pos)


def compute_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                        cliprange=None, cliprange_low=None, cliprange_high=None, clip_ratio_c: float = 3.0,
                        loss_agg_mode: str = "token-mean") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Vanilla PPO-clip policy loss with dual clip, veRL's ``compute_policy_loss``.

    Per token: ratio = exp(clamp(log_prob - old_log_prob, -20, 20)); l = max(-A ratio, -A clamp(ratio, 1 - low,
    1 + high)), and where A < 0, min(l, -A clip_ratio_c); aggregated by ``agg_loss`` semantics. ``cliprange_low`` /
    ``cliprange_high`` default to ``cliprange``; ``clip_ratio_c`` must be > 1 (veRL asserts it).
    Returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), 0-d float32: pg_clipfrac = masked mean of
    [-A clamp(ratio) > -A ratio]; ppo_kl = masked mean of the clamped (old_log_prob - log_prob);
    pg_clipfrac_lower = masked mean of [A < 0 and the dual clip is active].
    The loss is differentiable w.r.t. ``log_prob`` (advantages are treated as constants, as they are in veRL's use).
    """
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) must be given")
    weights = _verl_weights(response_mask, loss_agg_mode)
    loss, _ = ops.ppo_policy_loss(log_prob, old_log_prob, advantages, weights, clip_low=float(low),
                                  clip_high=float(high), dual_clip=float(clip_ratio_c))
    with torch.no_grad():
        log_ratio = (log_prob.float() - old_log_prob.float()).clamp(-20.0, 20.0)
        ratio, adv = log_ratio.exp(), advantages.float()
        unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
        pg_clipfrac = masked_mean((clipped > unclipped).float(), response_mask)
        ppo_kl = masked_mean(-log_ratio, response_mask)
        lower = (torch.maximum(unclipped, clipped) > -adv * clip_ratio_c) & (adv < 0)
        pg_clipfrac_lower = masked_mean(lower.float(), response_mask)
    return loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def compute_value_loss(vpreds: Tensor, returns: Tensor, values: Tensor, response_mask: Tensor, cliprange_value: float,
                       loss_agg_mode: str = "token-mean") -> tuple[Tensor, Tensor]:
    """Clipped value loss, veRL's ``compute_value_loss``: note the argument order (vpreds, returns, old values).

    0.5 * agg(max((vpreds - R)^2, (values + clamp(vpreds - values, -c, c) - R)^2)) -> (vf_loss, vf_clipfrac), 0-d
    float32; vf_clipfrac = masked mean of [clipped term > unclipped term]. Differentiable w.r.t. ``vpreds``.
    """
    loss, _ = ops.ppo_value_loss(vpreds, values, returns, _verl_weights(response_mask, loss_agg_mode),
                                 clip=float(cliprange_value))
    with torch.no_grad():
        v, old, ret = vpreds.float(), values.float(), returns.float()
        clipped = (old + (v - old).clamp(-cliprange_value, cliprange_value) - ret) ** 2
        vf_clipfrac = masked_mean((clipped > (v - ret) ** 2).float(), response_mask)
    return loss, vf_clipfrac
