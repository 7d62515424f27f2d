"""veRL-compatible functions: same names, signatures and return values as veRL's published functions.

Swap the import and keep the trainer::

    # from verl.trainer.ppo.core_algos import compute_gae_advantage_return, compute_policy_loss_vanilla, ...
    # from verl.utils.torch_functional import logprobs_from_logits, entropy_from_logits
    from rlhf_fast.integrations.verl import compute_gae_advantage_return, compute_policy_loss_vanilla, ...

Covered (docs/integrations.md): ``verl/utils/torch_functional.py``: ``logprobs_from_logits``, ``entropy_from_logits``,
``masked_mean``, ``masked_var``, ``masked_whiten``. ``verl/trainer/ppo/core_algos.py``: ``kl_penalty``, ``agg_loss``,
``compute_rewards``, the policy-loss registry (``compute_policy_loss_vanilla``, ``_gspo``, ``_sapo``, ``_cispo``,
``_gpg``, ``_clip_cov``, ``_kl_cov``, ``_geo_mean``; ``POLICY_LOSSES`` / ``get_policy_loss_fn``), the deprecated
``compute_policy_loss``, ``compute_value_loss``, and the advantage estimators ``compute_gae_advantage_return``,
``compute_grpo_outcome_advantage`` (+ ``_vectorized_``), ``compute_rloo_outcome_advantage`` (+ ``_vectorized_``),
``compute_reinforce_plus_plus_outcome_advantage``, ``compute_reinforce_plus_plus_baseline_outcome_advantage``,
``compute_remax_outcome_advantage``, ``compute_opo_outcome_advantage``, ``compute_gpg_outcome_advantage``,
``compute_grpo_passk_outcome_advantage``, ``compute_policy_loss_reinforce`` and the "bypass_mode" loss.
``verl/trainer/ppo/rollout_corr_helper.py`` (HEAD's options and metric keys; v0.7.0 / v0.6.1's with ``version``):
``compute_rollout_correction_weights``, ``compute_rollout_rejection_mask``, ``compute_offpolicy_metrics``,
``compute_rollout_correction_and_rejection_mask``, ``compute_rollout_corr_metrics_from_logprobs``,
on ``rlhf_fast.rollout_correction`` / ``rollout_rejection``.

Versions: the semantics of veRL 0.7 (v0.7.0 and HEAD of 2026-01-29, 0.8.0.dev) by default; the functions whose
behaviour changed take a keyword-only ``version``:
  - ``"0.8.dev"`` (veRL HEAD of 2026-01-29; default of the rollout-correction functions): HEAD's rejection options
    (``token_k1`` ...); for every other function the same as ``"0.7"``.
  - ``"0.7"``: policy losses return ``(loss, metrics)`` (metrics: dict of Python floats, veRL's ``"actor/..."``
    keys); they aggregate with ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``, ``loss_scale_factor``); fully masked rows are left out of the seq-mean modes.
  - ``"0.6.1"``: the same returns and row exclusion, no global-batch arguments.
  - ``"0.6.0"``: policy losses return ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)`` (0-d tensors) and the
    seq-mean modes divide by every row, empty ones included.
  Rollout correction: ``"0.7"`` and ``"0.6.1"`` give v0.7.0 / v0.6.1's rejection (``rollout_rs`` "token" / "sequence" /
  "geometric" with ``rollout_rs_threshold_lower``) and per-token veto; ``"0.6.1"`` also its batch normalisation of
  sequence weights (over every row); ``"0.6.0"`` has no rollout_corr_helper (ValueError).
A warning is given (once, at import) when the installed verl is outside 0.6.0 .. 0.8.0.dev.

Semantics follow veRL, not docs/formulas.md, where they differ (each docstring says how). Every aggregated loss is
``sum_t w_t l_t`` with per-token weights (``rlhf_fast.loss_weights``), so values outside the mask, NaN included,
never count and a normaliser of 0 gives 0 (veRL: NaN where it divides 0 by 0). The vanilla PPO and GSPO losses run
on the fused ``rlhf_fast.ppo_policy_loss``; the other policy losses and the estimators are thin formulas on the
fused reductions (``rlhf_fast.group_advantages``, ``masked_whiten``). Tensors of a dtype the fused kernels do not
take (float64) go through the plain PyTorch formula where one is given.
"""

from __future__ import annotations

import importlib.metadata
import math
import warnings
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import Tensor

from .. import ops

__all__ = [
    "POLICY_LOSSES", "agg_loss", "compute_gae_advantage_return", "compute_gpg_outcome_advantage",
    "compute_grpo_outcome_advantage", "compute_grpo_passk_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage", "compute_offpolicy_metrics", "compute_opo_outcome_advantage",
    "compute_policy_loss", "compute_policy_loss_bypass_mode", "compute_policy_loss_cispo",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_geo_mean", "compute_policy_loss_gpg", "compute_policy_loss_gspo",
    "compute_policy_loss_kl_cov", "compute_policy_loss_reinforce", "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla",
    "compute_reinforce_plus_plus_baseline_outcome_advantage", "compute_reinforce_plus_plus_outcome_advantage",
    "compute_remax_outcome_advantage", "compute_rewards", "compute_rloo_outcome_advantage",
    "compute_rollout_corr_metrics_from_logprobs", "compute_rollout_correction_and_rejection_mask",
    "compute_rollout_correction_weights", "compute_rollout_rejection_mask",
    "compute_rloo_vectorized_outcome_advantage", "compute_value_loss", "entropy_from_logits", "get_policy_loss_fn",
    "kl_penalty", "logprobs_from_logits", "masked_mean", "masked_var", "masked_whiten",
]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
VERSIONS = ("0.8.dev", "0.7", "0.6.1", "0.6.0")
_GLOBAL_BATCH = ("0.8.dev", "0.7")  # versions whose losses take global-batch info
_OLD_RS = ("0.7", "0.6.1")  # rejection by IS-ratio bounds ("token" / "sequence" / "geometric") and the veto
_KL_KINDS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
_COVERED = ((0, 6, 0), (0, 8, 0))  # 0.6.0 .. 0.8.0.dev (HEAD of 2026-01-29)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def _warn_if_uncovered() -> None:
    """Warn once (at import) when the installed verl is a version these adapters do not cover."""
    try:
        v = importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return
    t = _version_tuple(v)
    if not _COVERED[0] <= t <= _COVERED[1] or (t == _COVERED[1] and "dev" not in v):
        warnings.warn(f"rlhf_fast.integrations.verl covers verl 0.6.0 .. 0.8.0.dev; verl {v} is installed and may "
                      "differ (docs/integrations.md)", stacklevel=2)


_warn_if_uncovered()


def _check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    return version


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
                  global_batch_size=None, loss_scale_factor=None, version: str = "0.7") -> Tensor:
    """veRL's aggregation as per-token weights (sum_t w_t l_t is veRL's loss): D is this batch's normaliser of the
    mode (rlhf_fast.loss_normalizer; "0.6.0": the seq-means count every row) or the global count veRL is given,
    divided by dp_size (not for sum-norm)."""
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    _check_version(version)
    mask = loss_mask.float()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return ops.loss_weights(mask, loss_agg_mode, normalizer=torch.as_tensor(float(scale)))
    given = batch_num_tokens if loss_agg_mode == "token-mean" else global_batch_size
    if given is not None:
        norm = torch.as_tensor(given, dtype=torch.float32)
    elif version == "0.6.0" and loss_agg_mode != "token-mean":
        norm = torch.tensor(float(mask.shape[0]))
    else:
        norm = ops.loss_normalizer(mask, loss_agg_mode)
    return ops.loss_weights(mask, loss_agg_mode, normalizer=norm.to(mask.device).float() / dp_size)


def _weighted_sum(w: Tensor, loss_mat: Tensor) -> Tensor:
    return torch.where(w != 0, w * loss_mat, 0.0).sum()


def agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, dp_size: int = 1, batch_num_tokens=None,
             global_batch_size=None, loss_scale_factor=None, *, version: str = "0.7") -> Tensor:
    """Aggregate a per-token loss [B, T] over the mask into a scalar, veRL semantics.

    token-mean: sum(l*m) / N * dp_size (N = batch_num_tokens, default sum m); seq-mean-token-sum /
    seq-mean-token-mean: sum over non-empty rows of sum_t(l*m) (/ n_row) / G * dp_size (G = global_batch_size,
    default the number of non-empty rows; version "0.6.0": of all rows); seq-mean-token-sum-norm:
    sum(l*m) / (loss_scale_factor or T). The global-batch arguments exist since veRL 0.7 (``version="0.7"``).
    Values outside the mask (NaN too) do not count; a normaliser of 0 gives 0.
    """
    if version not in _GLOBAL_BATCH and (dp_size != 1 or batch_num_tokens is not None or global_batch_size is not None
                             or loss_scale_factor is not None):
        raise ValueError(f"dp_size, batch_num_tokens, global_batch_size, loss_scale_factor exist since veRL 0.7, "
                         f"not in version {version!r}")
    w = _verl_weights(loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor,
                      version)
    return _weighted_sum(w, loss_mat)


def compute_rewards(token_level_scores: Tensor, old_log_prob: Tensor, ref_log_prob: Tensor, kl_ratio) -> Tensor:
    """Token rewards with the k1 KL penalty: ``token_level_scores - kl_ratio * (old_log_prob - ref_log_prob)``."""
    return token_level_scores - (old_log_prob - ref_log_prob) * kl_ratio


# ---- policy losses (veRL's registry) --------------------------------------------------------------------------------


def _get(config: Any, name: str, default: Any = None) -> Any:
    """``config.name`` for veRL's ActorConfig, an omegaconf DictConfig, a dict or any object; None -> default."""
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def _clip_ratios(config: Any) -> tuple[float, float]:
    clip = _get(config, "clip_ratio")
    low, high = _get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)
    if low is None or high is None:
        raise ValueError("config must give clip_ratio (or both clip_ratio_low and clip_ratio_high)")
    return float(low), float(high)


def _require(config: Any, loss: str) -> None:
    if config is None:
        raise ValueError(f"compute_policy_loss_{loss} needs config (veRL's ActorConfig or a mapping with its fields)")


def _weights(mask: Tensor, mode: str, config: Any, version: str, rollout_is_weights: Optional[Tensor]) -> Tensor:
    info = dict(_get(config, "global_batch_info", None) or {}) if version in _GLOBAL_BATCH else {}
    w = _verl_weights(mask, mode, version=version, **info)
    return w if rollout_is_weights is None else w * rollout_is_weights.detach().float()


def _result(loss: Tensor, metrics: dict[str, Tensor], version: str):
    """veRL's return value: (loss, {"actor/<name>": float}) since 0.6.1; 0.6.0: (loss, pg_clipfrac, ppo_kl,
    pg_clipfrac_lower), the ones a loss does not compute 0."""
    if _check_version(version) == "0.6.0":
        zero = torch.zeros((), device=loss.device)
        return (loss, *(metrics.get(k, zero) for k in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")))
    return loss, {f"actor/{k}": float(v) for k, v in metrics.items()}


def _log_ratio(log_prob: Tensor, old_log_prob: Tensor) -> Tensor:
    return (log_prob.detach().float() - old_log_prob.float()).clamp(-20.0, 20.0)


def _vanilla(old_log_prob, log_prob, advantages, response_mask, weights, low, high, clip_ratio_c):
    """Dual-clip PPO on the fused op; the metrics veRL reports (masked means over response_mask)."""
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
    loss, _ = ops.ppo_policy_loss(log_prob, old_log_prob, advantages, weights, clip_low=low, clip_high=high,
                                  dual_clip=float(clip_ratio_c))
    with torch.no_grad():
        log_ratio = _log_ratio(log_prob, old_log_prob)
        ratio, adv = log_ratio.exp(), advantages.float()
        unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
        lower = (torch.maximum(unclipped, clipped) > -adv * clip_ratio_c) & (adv < 0)
        metrics = {"pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
                   "ppo_kl": masked_mean(-log_ratio, response_mask),
                   "pg_clipfrac_lower": masked_mean(lower.float(), response_mask)}
    return loss, metrics


def compute_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                        cliprange=None, cliprange_low=None, cliprange_high=None, clip_ratio_c: float = 3.0,
                        loss_agg_mode: str = "token-mean") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """veRL's deprecated ``compute_policy_loss`` (explicit clip ranges, 4 tensors returned): vanilla dual-clip PPO.

    Per token: ratio = exp(clamp(log_prob - old_log_prob, -20, 20)); l = max(-A ratio, -A clamp(ratio, 1 - low,
    1 + high)), and where A < 0, min(l, -A clip_ratio_c); aggregated by ``agg_loss``. ``cliprange_low`` /
    ``cliprange_high`` default to ``cliprange``; ``clip_ratio_c`` must be > 1 (veRL asserts it).
    Returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), 0-d float32: pg_clipfrac = masked mean of
    [-A clamp(ratio) > -A ratio]; ppo_kl = masked mean of the clamped (old_log_prob - log_prob);
    pg_clipfrac_lower = masked mean of [A < 0 and the dual clip is active] (masked means: 0 for an empty mask).
    Differentiable w.r.t. ``log_prob`` (advantages are constants, as in veRL's use).
    """
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) must be given")
    loss, m = _vanilla(old_log_prob, log_prob, advantages, response_mask, _verl_weights(response_mask, loss_agg_mode),
                       float(low), float(high), clip_ratio_c)
    return loss, m["pg_clipfrac"], m["ppo_kl"], m["pg_clipfrac_lower"]


def compute_policy_loss_vanilla(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: Optional[Tensor] = None, *, version: str = "0.7"):
    """veRL's registered "vanilla" loss: dual-clip PPO (see ``compute_policy_loss``) with the clip ratios from
    ``config`` (``clip_ratio``, ``clip_ratio_low`` / ``clip_ratio_high`` defaulting to it, ``clip_ratio_c``, default
    3.0), each token's loss times ``rollout_is_weights`` (constants) when given, aggregated by ``loss_agg_mode``
    with ``config.global_batch_info``. Fused: one ``rlhf_fast.ppo_policy_loss`` call.
    -> (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}) ("0.6.0": 4 tensors).
    """
    _require(config, "vanilla")
    low, high = _clip_ratios(config)
    w = _weights(response_mask, loss_agg_mode, config, version, rollout_is_weights)
    loss, metrics = _vanilla(old_log_prob, log_prob, advantages, response_mask, w, low, high,
                             _get(config, "clip_ratio_c", 3.0))
    return _result(loss, metrics, version)


def compute_policy_loss_gspo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                             loss_agg_mode: str = "seq-mean-token-mean", config: Any = None,
                             rollout_is_weights: Optional[Tensor] = None, *, version: str = "0.7"):
    """GSPO (sequence-level ratio), veRL's "gspo": s_i = exp(mean over row i's tokens of (log_prob - old)), used per
    token as sg[s_i] * pi / sg[pi] (log clamped to <= 10, no gradient above), PPO-clipped (no dual clip), times
    ``rollout_is_weights``, always aggregated "seq-mean-token-mean" (``loss_agg_mode`` is ignored, as in veRL).
    Fused: ``rlhf_fast.ppo_policy_loss`` with the old log-prob shifted so its ratio is the sequence ratio.
    -> (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower": 0.0}).
    """
    _require(config, "gspo")
    low, high = _clip_ratios(config)
    mask = response_mask.bool()
    with torch.no_grad():
        neg_kl = torch.where(mask, log_prob.float() - old_log_prob.float(), 0.0)
        seq = neg_kl.sum(-1) / response_mask.sum(-1).clamp(min=1)
        log_s = seq.clamp(max=10.0)[:, None].expand_as(neg_kl)
    # log s_i,t = sg[log s_i] + log_prob - sg[log_prob]; veRL's clamp at 10 stops the gradient above it
    lp = torch.where(seq[:, None] > 10.0, log_prob.detach(), log_prob).float()
    log_st = lp - lp.detach() + log_s
    w = _weights(response_mask, "seq-mean-token-mean", config, version, rollout_is_weights)
    loss, _ = ops.ppo_policy_loss(log_st, torch.zeros_like(log_st), advantages, w, clip_low=low, clip_high=high)
    with torch.no_grad():
        ratio, adv = log_s.exp(), advantages.float()
        clipfrac = masked_mean((-adv * ratio.clamp(1 - low, 1 + high) > -adv * ratio).float(), response_mask)
        ppo_kl = masked_mean(old_log_prob.float() - log_prob.float(), response_mask)
    return _result(loss, {"pg_clipfrac": clipfrac, "ppo_kl": ppo_kl, "pg_clipfrac_lower": torch.zeros(())}, version)


def compute_policy_loss_sapo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                             loss_agg_mode: str = "seq-mean-token-mean", config: Any = None,
                             rollout_is_weights: Optional[Tensor] = None, *, version: str = "0.7"):
    """SAPO (soft gate instead of the clip), veRL's "sapo": l = -A * (4 / tau) * sigmoid(tau (ratio - 1)) with
    ratio = exp(clamp(log_prob - old, -20, 20)) and tau = ``config.tau_pos`` (default 1.0) where A > 0, else
    ``config.tau_neg`` (default 1.05); times ``rollout_is_weights``; always "seq-mean-token-mean".
    -> (pg_loss, {"actor/pg_clipfrac": 0.0, "actor/ppo_kl", "actor/pg_clipfrac_lower": 0.0}).
    """
    _require(config, "sapo")
    adv = advantages.float()
    tau = torch.where(adv > 0, float(_get(config, "tau_pos", 1.0)), float(_get(config, "tau_neg", 1.05)))
    ratio = (log_prob.float() - old_log_prob.float()).clamp(-20.0, 20.0).exp()
    pg = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
    loss = _weighted_sum(_weights(response_mask, "seq-mean-token-mean", config, version, rollout_is_weights), pg)
    with torch.no_grad():
        ppo_kl = masked_mean(-_log_ratio(log_prob, old_log_prob), response_mask)
    zero = torch.zeros(())
    return _result(loss, {"pg_clipfrac": zero, "ppo_kl": ppo_kl, "pg_clipfrac_lower": zero}, version)


def compute_policy_loss_cispo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                              loss_agg_mode: str = "token-mean", config: Any = None,
                              rollout_is_weights: Optional[Tensor] = None, *, version: str = "0.7"):
    """CISPO (clipped importance weight, REINFORCE-style gradient), veRL's "cispo":
    l = -sg[clamp(ratio, 1 - low, 1 + high)] * A * log_prob with ratio = exp(clamp(log_prob - old, -20, 20)), times
    ``rollout_is_weights``, aggregated by ``loss_agg_mode``. pg_clipfrac = masked mean of [the clamp is active].
    -> (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower": 0.0}).
    """
    _require(config, "cispo")
    low, high = _clip_ratios(config)
    with torch.no_grad():
        log_ratio = _log_ratio(log_prob, old_log_prob)
        ratio = log_ratio.exp()
        coef = ratio.clamp(1 - low, 1 + high)
        clipfrac = masked_mean((ratio != coef).float(), response_mask)
        ppo_kl = masked_mean(-log_ratio, response_mask)
    pg = -coef * advantages.float() * log_prob.float()
    loss = _weighted_sum(_weights(response_mask, loss_agg_mode, config, version, rollout_is_weights), pg)
    return _result(loss, {"pg_clipfrac": clipfrac, "ppo_kl": ppo_kl, "pg_clipfrac_lower": torch.zeros(())}, version)


def compute_policy_loss_gpg(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                            loss_agg_mode: str = "token-mean", config: Any = None,
                            rollout_is_weights: Optional[Tensor] = None, *, version: str = "0.7"):
    """GPG (plain policy gradient), veRL's "gpg": l = -log_prob * A, times ``rollout_is_weights``, aggregated by
    ``loss_agg_mode``. -> (pg_loss, {}) ("0.6.0": (pg_loss, 0, 0, 0))."""
    _require(config, "gpg")
    pg = -log_prob.float() * advantages.float()
    return _result(_weighted_sum(_weights(response_mask, loss_agg_mode, config, version, rollout_is_weights), pg),
                   {}, version)


def compute_policy_loss_clip_cov(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                 loss_agg_mode: str = "token-mean", config: Any = None,
                                 rollout_is_weights: Optional[Tensor] = None, *, version: str = "0.7"):
    """Clip-Cov, veRL's "clip_cov": PPO-clip (ratio unclamped, no dual clip) where a random subset of the tokens
    whose centred covariance (A - mean A)(log_prob - mean log_prob) lies in (``clip_cov_lb``, ``clip_cov_ub``) and
    that the clip did not already catch gets loss 0 (no gradient): at most max(1, int(``clip_cov_ratio`` * tokens))
    of them, drawn with ``torch.randperm`` (the same draw as veRL's under the same seed). Settings from
    ``config.policy_loss`` (defaults 0.0002, 1.0, 5.0). pg_clipfrac = the fraction of response tokens so dropped.
    -> (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl"}).
    """
    _require(config, "clip_cov")
    low, high = _clip_ratios(config)
    pl = _get(config, "policy_loss")
    ratio_keep = float(_get(pl, "clip_cov_ratio", 0.0002))
    lb, ub = float(_get(pl, "clip_cov_lb", 1.0)), float(_get(pl, "clip_cov_ub", 5.0))
    if not ratio_keep > 0:
        raise ValueError(f"clip_cov_ratio must be > 0, got {ratio_keep}")
    mask = response_mask > 0
    adv = advantages.float()
    log_ratio = log_prob.float() - old_log_prob.float()
    ratio = log_ratio.exp()
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
    with torch.no_grad():
        ppo_kl = masked_mean(-log_ratio, response_mask)
        cov = (adv - masked_mean(adv, response_mask)) * (log_prob.float() - masked_mean(log_prob.float(),
                                                                                         response_mask))
        candidates = torch.nonzero(mask & ~(clipped > unclipped) & (cov > lb) & (cov < ub))
        n_drop = max(int(ratio_keep * response_mask.sum().item()), 1)
        if len(candidates) > 0:
            candidates = candidates[torch.randperm(len(candidates))[:min(n_drop, len(candidates))]]
        keep = torch.ones_like(adv)
        keep[candidates[:, 0], candidates[:, 1]] = 0.0
        clipfrac = masked_mean((keep == 0).float(), response_mask)
    pg = torch.maximum(unclipped, clipped) * keep
    loss = _weighted_sum(_weights(response_mask, loss_agg_mode, config, version, rollout_is_weights), pg)
    return _result(loss, {"pg_clipfrac": clipfrac, "ppo_kl": ppo_kl}, version)


def compute_policy_loss_kl_cov(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                               loss_agg_mode: str = "token-mean", config: Any = None,
                               rollout_is_weights: Optional[Tensor] = None, *, version: str = "0.7"):
    """KL-Cov, veRL's "kl_cov": the unclipped -A ratio, plus ``ppo_kl_coef`` * |log_prob - old| on the
    max(1, int(``kl_cov_ratio`` * tokens)) response tokens of largest centred covariance (A - mean A)(log_prob -
    mean log_prob) (``config.policy_loss``; defaults 0.0002 and 1.0). ppo_kl = masked mean of |log-ratio|.
    -> (pg_loss, {"actor/ppo_kl"}).
    """
    _require(config, "kl_cov")
    pl = _get(config, "policy_loss")
    k_ratio, coef = float(_get(pl, "kl_cov_ratio", 0.0002)), float(_get(pl, "ppo_kl_coef", 1.0))
    if not k_ratio > 0:
        raise ValueError(f"kl_cov_ratio must be > 0, got {k_ratio}")
    adv = advantages.float()
    log_ratio = log_prob.float() - old_log_prob.float()
    pg = -adv * log_ratio.exp()
    with torch.no_grad():
        ppo_kl = masked_mean(log_ratio.abs(), response_mask)
        flat = torch.nonzero((response_mask > 0).reshape(-1), as_tuple=True)[0]
        penalised = torch.zeros(adv.numel(), dtype=torch.bool, device=adv.device)
        if flat.numel() > 0:
            a, lp = adv.reshape(-1)[flat], log_prob.detach().float().reshape(-1)[flat]
            cov = (a - a.mean()) * (lp - lp.mean())
            top = torch.topk(cov, max(1, int(flat.numel() * k_ratio))).indices
            penalised[flat[top]] = True
    pg = torch.where(penalised.view_as(adv), pg + coef * log_ratio.abs(), pg)
    loss = _weighted_sum(_weights(response_mask, loss_agg_mode, config, version, rollout_is_weights), pg)
    return _result(loss, {"ppo_kl": ppo_kl}, version)


def compute_policy_loss_geo_mean(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                 loss_agg_mode: str = "token-mean", config: Any = None,
                                 rollout_is_weights: Optional[Tensor] = None, *, version: str = "0.7"):
    """GMPO (geometric-mean ratio), veRL's "geo_mean": per row, the token log-ratios d are clipped sign(A)-wise
    (d' = sign(A) min(sign(A) d, sign(A) clamp(d, -low, high))), r_i = exp(mean_row d'), A_i = mean_row A, and the
    loss is the plain mean over all rows of -A_i r_i (times the geometric mean of the row's ``rollout_is_weights``);
    ``loss_agg_mode`` is not used (as in veRL). pg_clipfrac / pg_clipfrac_lower: masked means of [clamp active] with
    A > 0 / A < 0. -> (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}).
    """
    _require(config, "geo_mean")
    low, high = _clip_ratios(config)
    m = response_mask.float()
    adv = advantages.float()
    d = torch.where(m != 0, log_prob.float() - old_log_prob.float(), 0.0)
    sign = torch.sign(adv)
    d_clamped = d.clamp(-low, high)
    d_min = sign * torch.minimum(sign * d, sign * d_clamped)
    n = m.sum(-1) + 1e-8
    pg = -(adv * m).sum(-1) / n * torch.exp((d_min * m).sum(-1) / n)
    if rollout_is_weights is not None:
        pg = pg * torch.exp((torch.log(rollout_is_weights.detach().float() + 1e-10) * m).sum(-1) / n)
    with torch.no_grad():
        changed = (d != d_clamped).float()
        metrics = {"pg_clipfrac": masked_mean(changed * (adv > 0), response_mask),
                   "ppo_kl": masked_mean(-d, response_mask),
                   "pg_clipfrac_lower": masked_mean(changed * (adv < 0), response_mask)}
    return _result(pg.mean(), metrics, version)


def compute_policy_loss_reinforce(rollout_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                  response_mask: Tensor, loss_agg_mode: str = "seq-mean-token-sum", config: Any = None,
                                  rollout_is_weights: Optional[Tensor] = None):
    """veRL's ``compute_policy_loss_reinforce`` (>= 0.7, not in the registry; bypass mode's "reinforce"): the plain
    policy gradient l = -A log_prob (times ``rollout_is_weights``, constants), no ratio and no clipping, aggregated by
    ``loss_agg_mode`` with ``config.global_batch_info``. -> (pg_loss, {"actor/ppo_kl": masked mean of
    rollout_log_prob - log_prob}). Differentiable w.r.t. ``log_prob``."""
    _require(config, "reinforce")
    w = _weights(response_mask, loss_agg_mode, config, "0.7", rollout_is_weights)
    loss = _weighted_sum(w, -advantages.float() * log_prob.float())
    with torch.no_grad():
        ppo_kl = masked_mean(rollout_log_prob.float() - log_prob.detach().float(), response_mask)
    return loss, {"actor/ppo_kl": float(ppo_kl)}


def compute_policy_loss_bypass_mode(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                    loss_agg_mode: str = "token-mean", config: Any = None,
                                    rollout_is_weights: Optional[Tensor] = None, *, version: str = "0.8.dev"):
    """veRL's "bypass_mode" loss (>= 0.7): the trainer passes the rollout engine's log-probs as ``old_log_prob``.
    From ``config.policy_loss.rollout_correction`` (``loss_type`` "ppo_clip" | "reinforce", ``rollout_is``,
    ``rollout_is_threshold``, ``rollout_is_batch_normalize``, ``rollout_rs``, ``rollout_rs_threshold``): the IS
    weights and rejection mask of the current policy against the rollout one
    (``compute_rollout_correction_and_rejection_mask``, no grad), then on the kept tokens either the vanilla PPO
    loss with ratio pi / pi_rollout and no IS weights (the ratio is the correction) or the REINFORCE loss times the
    IS weights. ``rollout_is_weights`` is ignored (recomputed). -> (pg_loss, the loss's metrics + the
    "rollout_corr/..." metrics). ``version="0.7"``: v0.7.0's rejection keys (``rollout_rs`` "token" / "sequence" /
    "geometric", ``rollout_rs_threshold_lower``, ``rollout_token_veto_threshold``)."""
    _require(config, "bypass_mode")
    if _check_version(version) not in ("0.8.dev", "0.7"):
        raise ValueError(f"the bypass_mode loss exists since veRL 0.7, not in version {version!r}")
    corr = _get(_get(config, "policy_loss"), "rollout_correction")
    if corr is None:
        raise ValueError("loss_mode='bypass_mode' needs config.policy_loss.rollout_correction")
    old = {k: _get(corr, k) for k in ("rollout_rs_threshold_lower", "rollout_token_veto_threshold")
           } if version == "0.7" else {}
    loss_type = _get(corr, "loss_type", "ppo_clip")
    if loss_type not in ("ppo_clip", "reinforce"):
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    with torch.no_grad():
        weights, mask, corr_metrics = compute_rollout_correction_and_rejection_mask(
            log_prob.detach(), old_log_prob, response_mask, rollout_is=_get(corr, "rollout_is"),
            rollout_is_threshold=_get(corr, "rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=_get(corr, "rollout_is_batch_normalize", False),
            rollout_rs=_get(corr, "rollout_rs"), rollout_rs_threshold=_get(corr, "rollout_rs_threshold"), **old,
            version=version)
    if loss_type == "reinforce":
        w = None if weights is None else weights.batch["rollout_is_weights"]
        loss, metrics = compute_policy_loss_reinforce(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config,
                                                      w)
    else:
        loss, metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config)
    return loss, {**metrics, **corr_metrics}


POLICY_LOSSES = {"vanilla": compute_policy_loss_vanilla, "gspo": compute_policy_loss_gspo,
                 "sapo": compute_policy_loss_sapo, "cispo": compute_policy_loss_cispo,
                 "gpg": compute_policy_loss_gpg, "clip_cov": compute_policy_loss_clip_cov,
                 "kl_cov": compute_policy_loss_kl_cov, "geo_mean": compute_policy_loss_geo_mean,
                 "bypass_mode": compute_policy_loss_bypass_mode}


def get_policy_loss_fn(name: str):
    """The loss registered under ``name`` (veRL's ``get_policy_loss_fn``)."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"Unsupported loss mode: {name}. Supported modes are: {list(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


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

# ---- advantage estimators (outcome rewards: one score per response, the sum of its token rewards) -------------------


def _group_ids(index, device) -> Tensor:
    """veRL's ``index`` (numpy array or list of any hashable labels, e.g. uid strings, or a tensor) -> int64 [B]."""
    if isinstance(index, Tensor):
        return torch.unique(index.reshape(-1), return_inverse=True)[1].to(device=device, dtype=torch.int64)
    ids: dict = {}
    return torch.tensor([ids.setdefault(label, len(ids)) for label in list(index)], dtype=torch.int64, device=device)


def _group_counts(ids: Tensor) -> Tensor:
    return torch.bincount(ids)[ids]


def _outcome(token_level_rewards: Tensor) -> Tensor:
    scores = token_level_rewards.detach().sum(dim=-1)
    return scores if scores.dtype in _KERNEL_DTYPES else scores.float()


def compute_grpo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index, epsilon: float = 1e-6,
                                   norm_adv_by_std_in_grpo: bool = True, config: Any = None
                                   ) -> tuple[Tensor, Tensor]:
    """GRPO, veRL's "grpo": per group of ``index`` (labels of any kind; unequal, shuffled groups),
    a = (s - mean) / (std + epsilon) with the unbiased std (``norm_adv_by_std_in_grpo=False``: s - mean, Dr. GRPO),
    s = the row's summed token rewards; a group of one has mean 0 and std 1 (veRL's convention: a = s / (1 + eps),
    or s). -> (advantages, advantages): float32 [B, T], a * response_mask. On ``rlhf_fast.group_advantages``.
    """
    with torch.no_grad():
        scores = _outcome(token_level_rewards)
        ids = _group_ids(index, scores.device)
        adv = ops.group_advantages(scores, ids, mode="grpo" if norm_adv_by_std_in_grpo else "dr_grpo", eps=epsilon)
        alone = scores.float() / (1.0 + epsilon) if norm_adv_by_std_in_grpo else scores.float()
        adv = torch.where(_group_counts(ids) == 1, alone, adv)[:, None] * response_mask
    return adv, adv


def compute_grpo_vectorized_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                              epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                              config: Any = None) -> tuple[Tensor, Tensor]:
    """veRL's "grpo_vectorized": GRPO as ``compute_grpo_outcome_advantage`` except that the group std is floored,
    std = sqrt(max(var, epsilon)) (veRL's ``group_mean_std``). -> (advantages, advantages), float32 [B, T]."""
    with torch.no_grad():
        scores = _outcome(token_level_rewards)
        ids = _group_ids(index, scores.device)
        centred = ops.group_advantages(scores, ids, mode="dr_grpo", eps=epsilon)
        n = _group_counts(ids).float()
        if norm_adv_by_std_in_grpo:
            var = torch.zeros(int(ids.max()) + 1 if ids.numel() else 0, device=scores.device).index_add_(
                0, ids, centred.square())[ids] / (n - 1).clamp(min=1)
            centred = centred / (var.clamp(min=epsilon).sqrt() + epsilon)
            alone = scores.float() / (1.0 + epsilon)
        else:
            alone = scores.float()
        adv = torch.where(n == 1, alone, centred)[:, None] * response_mask
    return adv, adv


def compute_rloo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index, epsilon: float = 1e-6,
                                   config: Any = None, **kwargs) -> tuple[Tensor, Tensor]:
    """RLOO, veRL's "rloo": a_i = s_i - mean_{j != i} s_j within the group of ``index``; a group of one keeps its
    score (a = s, veRL's loop). -> (advantages, advantages), float32 [B, T] (times response_mask)."""
    with torch.no_grad():
        scores = _outcome(token_level_rewards)
        ids = _group_ids(index, scores.device)
        adv = ops.group_advantages(scores, ids, mode="rloo", eps=epsilon)
        adv = torch.where(_group_counts(ids) == 1, scores.float(), adv)[:, None] * response_mask
    return adv, adv


def compute_rloo_vectorized_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                              epsilon: float = 1e-6, config: Any = None, **kwargs
                                              ) -> tuple[Tensor, Tensor]:
    """veRL's "rloo_vectorized": RLOO as ``compute_rloo_outcome_advantage`` except that a group of one gets 0."""
    with torch.no_grad():
        scores = _outcome(token_level_rewards)
        adv = ops.group_advantages(scores, _group_ids(index, scores.device), mode="rloo", eps=epsilon)
        adv = adv[:, None] * response_mask
    return adv, adv


def compute_grpo_passk_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                         epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                         config: Any = None, **kwargs) -> tuple[Tensor, Tensor]:
    """Pass@k GRPO, veRL's "grpo_passk": in each group of ``index`` only the best response gets an advantage,
    s_max - s_second (0 on a tie), divided by (unbiased group std + epsilon) when ``config.norm_adv_by_std_in_grpo``
    (default True; as in veRL, the config's value wins over the argument); every other row gets 0. A group of one
    raises ValueError. -> (advantages, advantages), float32 [B, T] (times response_mask). Vectorised over groups.
    """
    if config is None:
        raise ValueError("compute_grpo_passk_outcome_advantage needs config (veRL's AlgoConfig or a mapping)")
    norm = bool(_get(config, "norm_adv_by_std_in_grpo", True))
    with torch.no_grad():
        scores = _outcome(token_level_rewards).float()
        ids = _group_ids(index, scores.device)
        n = torch.bincount(ids)
        if bool((n < 2).any()):
            raise ValueError(f"Pass@k requires at least 2 samples per group; the smallest group has {int(n.min())}")
        g, rows = n.numel(), torch.arange(scores.numel(), device=scores.device)
        top = scores.new_full((g,), -torch.inf).scatter_reduce(0, ids, scores, "amax")
        best = torch.full((g,), scores.numel(), device=scores.device).scatter_reduce(
            0, ids, torch.where(scores == top[ids], rows, scores.numel()), "amin")  # first row holding the max
        is_best = rows == best[ids]
        second = scores.new_full((g,), -torch.inf).scatter_reduce(0, ids, torch.where(is_best, -torch.inf, scores),
                                                                  "amax")
        adv = top - second
        if norm:
            centred = ops.group_advantages(scores, ids, mode="dr_grpo", eps=epsilon)
            var = torch.zeros(g, device=scores.device).index_add_(0, ids, centred.square()) / (n - 1).float()
            adv = adv / (var.sqrt() + epsilon)
        adv = torch.where(is_best, adv[ids], 0.0)[:, None] * response_mask
    return adv, adv


def compute_opo_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index, epsilon: float = 1e-6,
                                  config: Any = None, **kwargs) -> tuple[Tensor, Tensor]:
    """OPO, veRL's "opo": a_i = s_i - b with b = the group's length-weighted mean score sum(len s) / sum(len) (len =
    response tokens); a group of one has b = 0. -> (advantages, advantages), float32 [B, T]."""
    with torch.no_grad():
        scores = _outcome(token_level_rewards).float()
        ids = _group_ids(index, scores.device)
        length = response_mask.float().sum(-1)
        g = int(ids.max()) + 1 if ids.numel() else 0
        num = torch.zeros(g, device=scores.device).index_add_(0, ids, length * scores)[ids]
        den = torch.zeros(g, device=scores.device).index_add_(0, ids, length)[ids]
        base = torch.where(_group_counts(ids) == 1, 0.0, num / den)
        adv = (scores - base)[:, None] * response_mask
    return adv, adv


def compute_gpg_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index, epsilon: float = 1e-6,
                                  f_norm: float = 1.0, alpha: float = 1.0, config: Any = None, **kwargs
                                  ) -> tuple[Tensor, Tensor]:
    """GPG, veRL's "gpg": a = alpha' (s - group mean) / f_norm with alpha' = B / max(1, number of nonzero scores)
    (veRL recomputes it; the ``alpha`` argument is unused, as in veRL); a group of one has mean 0.
    -> (advantages, advantages), float32 [B, T]."""
    with torch.no_grad():
        scores = _outcome(token_level_rewards)
        ids = _group_ids(index, scores.device)
        scale = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1).float()
        centred = ops.group_advantages(scores, ids, mode="dr_grpo", eps=epsilon)
        centred = torch.where(_group_counts(ids) == 1, scores.float(), centred)
        adv = (scale * centred / f_norm)[:, None] * response_mask
    return adv, adv


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index,
                                                           epsilon: float = 1e-6, config: Any = None, **kwargs
                                                           ) -> tuple[Tensor, Tensor]:
    """REINFORCE++ with baseline, veRL's "reinforce_plus_plus_baseline": s - group mean (a group of one keeps s) at
    every response token, whitened over response_mask (``masked_whiten``) and masked.
    -> (advantages, advantages), float32 [B, T]."""
    with torch.no_grad():
        scores = _outcome(token_level_rewards)
        ids = _group_ids(index, scores.device)
        centred = ops.group_advantages(scores, ids, mode="dr_grpo", eps=epsilon)
        centred = torch.where(_group_counts(ids) == 1, scores.float(), centred)
        adv = centred[:, None] * response_mask
        adv = masked_whiten(adv, response_mask) * response_mask
    return adv, adv


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor,
                                                  config: Any = None, **kwargs) -> tuple[Tensor, Tensor]:
    """REINFORCE++, veRL's "reinforce_plus_plus": discounted returns with gamma = ``config.gamma`` that restart at
    every mask zero: R[t] = r[t] + gamma R[t+1], then R[t] is not carried past a position t with mask 0 (so each run
    of response tokens, e.g. one turn, is discounted on its own, and a masked position holds r[t] + gamma R[t+1]);
    advantages = masked_whiten(R, response_mask) * response_mask.
    -> (advantages, returns), float32 [B, T]; returns unmasked, as in veRL. (``rlhf_fast.discounted_returns``
    carries R across mask zeros instead; docs/formulas.md.) No loop over T: ``_returns_reset_at_mask_zero``.
    """
    gamma = _get(config, "gamma")
    if gamma is None:
        raise ValueError("compute_reinforce_plus_plus_outcome_advantage needs config.gamma")
    with torch.no_grad():
        returns = _returns_reset_at_mask_zero(token_level_rewards, response_mask, float(gamma))
        advantages = masked_whiten(returns, response_mask) * response_mask
    return advantages, returns


def _returns_reset_at_mask_zero(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """R[t] = r[t] + gamma * mask[t+1] * R[t+1] (R[T] = 0) in one scan: with P the plain discounted sums of every
    position (``rlhf_fast.discounted_returns`` with an all-ones mask) and z(t) the first position after t with mask
    0 (T if none), R[t] = P[t] - gamma^(z(t) - t) P[z(t)]: the sum stops where the chain is cut."""
    b, t = rewards.shape
    plain = ops.discounted_returns(rewards, torch.ones_like(rewards, dtype=torch.bool), gamma=gamma)
    pos = torch.arange(t, device=rewards.device)
    cut = torch.where(mask.bool(), t, pos.expand(b, t))  # a mask zero at s cuts the chain of every t < s
    z = torch.nn.functional.pad(cut[:, 1:], (0, 1), value=t).flip(-1).cummin(-1).values.flip(-1)
    tail = torch.nn.functional.pad(plain, (0, 1)).gather(-1, z)
    return plain - torch.pow(torch.tensor(gamma, device=rewards.device), (z - pos).float()) * tail


def compute_remax_outcome_advantage(token_level_rewards: Tensor, reward_baselines: Tensor, response_mask: Tensor,
                                    config: Any = None, **kwargs) -> tuple[Tensor, Tensor]:
    """ReMax, veRL's "remax": returns = the reward-to-go of the masked token rewards (undiscounted), advantages =
    returns - reward_baselines[b] at the response tokens. -> (advantages, returns), [B, T]."""
    with torch.no_grad():
        returns = (token_level_rewards * response_mask).flip(-1).cumsum(-1).flip(-1)
        advantages = returns - reward_baselines[:, None] * response_mask
    return advantages, returns


# ---- verl.trainer.ppo.rollout_corr_helper (>= 0.7: HEAD's names, arguments and metric keys) -------------------------

SAFETY_BOUND = 20.0
_RS_OPTIONS = {f"{level}_{k}": (level, k) for level in ("token", "seq_sum", "seq_mean") for k in ("k1", "k2", "k3")}
_RS_OPTIONS.update({f"seq_max_{k}": ("seq_max", k) for k in ("k2", "k3")})


def _item(x) -> float:
    return float(x)


def _masked_extreme(x: Tensor, mask: Tensor, largest: bool) -> float:
    fill = -torch.inf if largest else torch.inf
    x = x.masked_fill(~mask.bool(), fill)
    return _item(x.max() if largest else x.min())


def _rc_version(version: str) -> str:
    if _check_version(version) == "0.6.0":
        raise ValueError("veRL 0.6.0 has no rollout_corr_helper (its mismatch_helper is not covered)")
    return version


def _ratio_metrics(p: str, w: Tensor, row_lr: Optional[Tensor], m: Tensor, lo: float, hi: float) -> dict[str, float]:
    """veRL's statistics of IS ratios ``w`` [B, T] (exp of the clamped log ratio, on the tokens of ``m``) bounded by
    [lo, hi], keys ``p + "_mean"`` ...: token level (``row_lr`` None) from ``w``; sequence level from the per-row log
    ratio ``row_lr`` [B, 1] (max / min / fraction_high / _low over every row)."""
    out = {f"{p}_mean": _item(masked_mean(w, m))}
    if row_lr is None:
        out[f"{p}_ratio_fraction_high"] = _item(masked_mean((w > hi).float(), m))
        out[f"{p}_ratio_fraction_low"] = _item(masked_mean((w < lo).float(), m))
        out[f"{p}_max"] = _masked_extreme(w, m, True)
        out[f"{p}_min"] = _masked_extreme(w, m, False)
    else:
        out[f"{p}_max"] = _item(torch.exp(row_lr.max().clamp(max=SAFETY_BOUND)))
        out[f"{p}_min"] = _item(torch.exp(row_lr.min()))
        out[f"{p}_ratio_fraction_high"] = _item((row_lr > math.log(hi)).float().mean())
        out[f"{p}_ratio_fraction_low"] = _item((row_lr < math.log(lo)).float().mean())
    clamped = w.clamp(lo, hi)
    mean_c = masked_mean(clamped, m)
    var = masked_mean(clamped.square(), m) - mean_c.square()
    out[f"{p}_std"] = _item(var.clamp(min=0).sqrt()) if m.sum() > 1 else 0.0
    out[f"{p}_eff_sample_size"] = 1.0 / _item(masked_mean((clamped / (mean_c + 1e-8)).square(), m))
    seq = masked_mean(w, m, axis=-1)
    out.update({f"{p}_seq_mean": _item(seq.mean()), f"{p}_seq_std": _item(seq.std()) if seq.numel() > 1 else 0.0,
                f"{p}_seq_max": _item(seq.max()), f"{p}_seq_min": _item(seq.min()),
                f"{p}_seq_max_deviation": _item((seq - 1.0).abs().max()),
                f"{p}_seq_fraction_high": _item((seq > hi).float().mean()),
                f"{p}_seq_fraction_low": _item((seq < lo).float().mean())})
    return out


def compute_rollout_correction_weights(log_ratio: Tensor, response_mask: Tensor, rollout_is: str = "token",
                                       rollout_is_threshold: float = 2.0, rollout_is_batch_normalize: bool = False,
                                       *, version: str = "0.8.dev") -> tuple[Tensor, dict[str, float]]:
    """Truncated IS weights from ``log_ratio`` = log pi_train - log pi_rollout [B, T]: ``rollout_is="token"`` ->
    min(rho_t, threshold), "sequence" -> min(rho_s, threshold) on every token (``rlhf_fast.rollout_correction`` modes
    tis / seq_tis), 0 off the mask, detached; ``rollout_is_batch_normalize``: divided by their mean over the tokens
    (token) or over the non-empty sequences (sequence; ``version="0.6.1"``: over every row, an empty one counting
    0), on this process only. -> (weights float32, metrics): veRL's "rollout_is_*" keys (mean / max / min /
    ratio_fraction_high / _low of the untruncated weights, std and eff_sample_size of the weights clamped to
    [1/threshold, threshold], seq_* of the per-sequence mean weight, batch_norm_factor), Python floats."""
    _rc_version(version)
    if rollout_is not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {{'token', 'sequence'}}.")
    if not rollout_is_threshold > 0:
        raise ValueError(f"rollout_is_threshold must be positive, got {rollout_is_threshold}.")
    thr, lo = float(rollout_is_threshold), 1.0 / float(rollout_is_threshold)
    lr, m = log_ratio.detach().float(), response_mask.float()
    weights, _ = ops.rollout_correction(lr, torch.zeros_like(lr), m, mode="tis" if rollout_is == "token" else "seq_tis",
                                        cap=thr)
    with torch.no_grad():
        seq_lr = (torch.where(m != 0, lr, 0.0) * m).sum(-1, keepdim=True)
        level_lr = lr if rollout_is == "token" else seq_lr.expand_as(lr)
        raw = torch.exp(level_lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)) * m  # untruncated, for the metrics
        metrics = _ratio_metrics("rollout_is", raw, None if rollout_is == "token" else seq_lr, m, lo, thr)
        if rollout_is_batch_normalize:
            if rollout_is == "token":
                mean_w = masked_mean(weights, m)
            elif version == "0.6.1":
                mean_w = masked_mean(weights, m, axis=-1).mean()
            else:
                valid = (m.sum(-1) > 0).float()
                mean_w = (masked_mean(weights, m, axis=-1) * valid).sum() / valid.sum().clamp(min=1e-8)
            if mean_w > 1e-8:
                weights = weights / mean_w
                metrics["rollout_is_batch_norm_factor"] = _item(mean_w)
            else:
                metrics["rollout_is_batch_norm_factor"] = 1.0
    return weights, metrics


def _rs_thresholds(options: list[str], spec) -> dict[str, tuple[Optional[float], float]]:
    """veRL's ``rollout_rs_threshold``: one number / entry for all options or one per option ("a,b,..."); a k1 entry
    is "lower_upper" or "upper" (lower = 1/upper), ratio bounds; the others one positive upper bound."""
    if spec is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        parts = [str(spec)]
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        raise TypeError("rollout_rs_threshold must be a string or numeric value specifying per-option thresholds.")
    if len(parts) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold expects one threshold or {len(options)} (one per rollout_rs option)")
    parts = parts * len(options) if len(parts) == 1 else parts
    out = {}
    for option, part in zip(options, parts):
        if option.endswith("k1"):
            lower, upper = part.split("_", 1) if "_" in part else (None, part)
            upper = float(upper)
            lower = 1.0 / upper if lower is None else float(lower)
            if lower <= 0 or upper <= 0:
                raise ValueError(f"Thresholds for option '{option}' must be positive, got {part}.")
            out[option] = (lower, upper)
        else:
            if "_" in part:
                raise ValueError(f"rollout_rs_threshold for option '{option}' takes one upper bound, got '{part}'.")
            if not float(part) > 0:
                raise ValueError(f"Threshold for option '{option}' must be positive, got {part}.")
            out[option] = (None, float(part))
    return out


_OLD_RS_LEVELS = {"token": "token", "sequence": "seq_sum", "geometric": "seq_mean"}


def _rejection_by_ratio(log_ratio: Tensor, response_mask: Tensor, rollout_rs: str, upper, lower
                        ) -> tuple[Tensor, dict[str, float]]:
    """veRL 0.7.0 / 0.6.1's rejection: the IS ratio of the token ("token"), of the sequence (product, "sequence") or
    its geometric mean ("geometric") must lie in [lower, upper] (lower default 1/upper); on
    ``rlhf_fast.rollout_rejection`` with k1 = -log ratio, so the bounds are -log upper <= k1 <= -log lower."""
    if rollout_rs not in _OLD_RS_LEVELS:
        raise ValueError(f"Invalid rollout_rs: {rollout_rs}. Must be one of {set(_OLD_RS_LEVELS)}.")
    if upper is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    upper = float(upper)
    lower = 1.0 / upper if lower is None else float(lower)
    if not bool(response_mask.any()):
        raise ValueError("response_mask must contain at least one valid token (1).")
    lr, m = log_ratio.detach().float(), response_mask.float()
    low, high = -math.log(upper), -math.log(lower)
    keep, s, _ = ops.rollout_rejection(lr, torch.zeros_like(lr), m, stat="k1", level=_OLD_RS_LEVELS[rollout_rs],
                                       low=low, high=high)
    with torch.no_grad():
        if rollout_rs == "token":
            row_lr, w = None, torch.exp(-s)
            seq_rejected = (m.bool() & ~keep).any(-1)
        else:  # one statistic per row, 0 for an empty row (ratio 1), as veRL
            row_lr = -masked_mean(s, m, axis=-1).unsqueeze(-1)
            w = torch.exp(row_lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)).expand_as(lr)
            seq_rejected = ~((-row_lr >= low) & (-row_lr <= high)).squeeze(-1)
        metrics = _ratio_metrics("rollout_rs", w, row_lr, m, lower, upper)
        metrics["rollout_rs_masked_fraction"] = _item(masked_mean((m.bool() & ~keep).float(), m))
        metrics["rollout_rs_seq_masked_fraction"] = _item(seq_rejected.float().mean())
    return (response_mask * keep).to(response_mask.dtype), metrics


def compute_rollout_rejection_mask(log_ratio: Tensor, response_mask: Tensor, rollout_rs: str = "token_k1",
                                   rollout_rs_threshold=None, rollout_rs_threshold_lower: Optional[float] = None,
                                   *, version: str = "0.8.dev") -> tuple[Tensor, dict[str, float]]:
    """Hard trust region (veRL HEAD's rejection sampling): ``rollout_rs`` a comma list of ``token_k{1,2,3}``,
    ``seq_sum_k{1,2,3}``, ``seq_mean_k{1,2,3}``, ``seq_max_k{2,3}``; a token stays in the mask when it passes every
    option (``rlhf_fast.rollout_rejection`` with the k1 bounds in log space: log lower <= k1 <= log upper; k2, k3 <=
    upper). -> (response_mask with the rejected tokens set to 0, its dtype; metrics): per option
    "rollout_rs_<option>_{mean, max, min, fraction_high, fraction_low, std, seq_mean, seq_std, seq_max, seq_min,
    seq_max_deviation, seq_fraction_high[, seq_fraction_low], masked_fraction, seq_masked_fraction}" and the overall
    "rollout_rs_masked_fraction", "rollout_rs_seq_masked_fraction", Python floats (veRL's definitions).

    ``version="0.7"`` / ``"0.6.1"``: those releases' rejection instead, ``rollout_rs`` "token" | "sequence" |
    "geometric": the token's IS ratio, the sequence's (product) or its geometric mean must lie in
    [``rollout_rs_threshold_lower`` (default 1 / upper), ``rollout_rs_threshold``]; metrics "rollout_rs_{mean, max,
    min, ratio_fraction_high, ratio_fraction_low, std, eff_sample_size, seq_*, masked_fraction,
    seq_masked_fraction}" as the "rollout_is_*" ones of ``compute_rollout_correction_weights`` with these bounds."""
    if _rc_version(version) in _OLD_RS:
        return _rejection_by_ratio(log_ratio, response_mask, rollout_rs, rollout_rs_threshold,
                                   rollout_rs_threshold_lower)
    if rollout_rs_threshold_lower is not None:
        raise ValueError("rollout_rs_threshold_lower is veRL 0.7.0 / 0.6.1's (version='0.7' / '0.6.1'); at HEAD a k1 "
                         "option takes 'lower_upper' in rollout_rs_threshold")
    if not isinstance(rollout_rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple options).")
    if rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    if log_ratio.shape[0] == 0:
        return response_mask, {}
    options = list(dict.fromkeys(o.strip() for o in rollout_rs.split(",") if o.strip()))
    if not options:
        raise ValueError("rollout_rs must contain at least one valid option.")
    for o in options:
        if o not in _RS_OPTIONS:
            raise ValueError(f"Invalid rollout_rs option: {o}. Must be one of {sorted(_RS_OPTIONS)}.")
    bounds = _rs_thresholds(options, rollout_rs_threshold)
    if not bool(response_mask.any()):
        raise ValueError("response_mask must contain at least one valid token (1).")
    lr, m = log_ratio.detach().float(), response_mask.float()
    mb, valid = m != 0, m.sum(-1) > 0
    keep_all = mb.clone()
    metrics: dict[str, float] = {}
    for option in options:
        level, stat = _RS_OPTIONS[option]
        lower, upper = bounds[option]
        k1 = stat == "k1"
        low, high = (math.log(lower), math.log(upper)) if k1 else (None, upper)
        keep, s, _ = ops.rollout_rejection(lr, torch.zeros_like(lr), m, stat=stat, level=level, low=low, high=high)
        keep_all &= keep
        p, low_m = f"rollout_rs_{option}", low if k1 else 0.0
        seq = masked_mean(s, m, axis=-1)[valid]
        by_seq = level != "token" and seq.numel() > 0
        metrics[f"{p}_mean"] = _item(masked_mean(s, m))
        metrics[f"{p}_max"] = _item(seq.max()) if by_seq else _masked_extreme(s, m, True)
        metrics[f"{p}_min"] = _item(seq.min()) if by_seq else _masked_extreme(s, m, False)
        if by_seq:
            metrics[f"{p}_fraction_high"] = _item((seq > high).float().mean())
            metrics[f"{p}_fraction_low"] = _item((seq < low_m).float().mean()) if k1 else 0.0
        else:
            metrics[f"{p}_fraction_high"] = _item(masked_mean((s > high).float(), m))
            metrics[f"{p}_fraction_low"] = _item(masked_mean((s < low_m).float(), m)) if k1 else 0.0
        clamped = s.clamp(low_m, high)
        var = masked_mean(clamped.square(), m) - masked_mean(clamped, m).square()
        metrics[f"{p}_std"] = _item(var.clamp(min=0).sqrt()) if m.sum() > 1 else 0.0
        if seq.numel() > 0:
            metrics.update({f"{p}_seq_mean": _item(seq.mean()),
                            f"{p}_seq_std": _item(seq.std()) if seq.numel() > 1 else 0.0,
                            f"{p}_seq_max": _item(seq.max()), f"{p}_seq_min": _item(seq.min()),
                            f"{p}_seq_max_deviation": _item(seq.abs().max()),
                            f"{p}_seq_fraction_high": _item((seq > high).float().mean())})
            if k1:
                metrics[f"{p}_seq_fraction_low"] = _item((seq < low_m).float().mean())
        rejected = mb & ~keep
        metrics[f"{p}_masked_fraction"] = _item(masked_mean(rejected.float(), m))
        metrics[f"{p}_seq_masked_fraction"] = _item(rejected.any(-1)[valid].float().mean())
    metrics["rollout_rs_masked_fraction"] = _item(masked_mean((mb & ~keep_all).float(), m))
    metrics["rollout_rs_seq_masked_fraction"] = _item((mb & ~keep_all).any(-1).float().mean())
    return (response_mask * keep_all).to(response_mask.dtype), metrics


def compute_offpolicy_metrics(old_log_prob: Tensor, rollout_log_prob: Optional[Tensor], response_mask: Tensor
                              ) -> dict[str, float]:
    """veRL's off-policy diagnostics (no prefix), Python floats: ``training_ppl`` / ``training_log_ppl`` (batch means
    of each sequence's exp(-mean log-prob) / -mean log-prob), and with ``rollout_log_prob``: ``kl`` (masked mean of
    rollout - training), ``k3_kl`` (of rho - 1 - log rho, rho = exp(training - rollout)), ``rollout_ppl``,
    ``rollout_log_ppl``, ``log_ppl_diff`` (mean, ``log_ppl_abs_diff``, ``_max``, ``_min`` of the per-sequence mean
    rollout - mean training log-prob), ``ppl_ratio`` (mean of its exp), ``chi2_token`` (masked mean rho^2 - 1) and
    ``chi2_seq`` (batch mean of rho_s^2 - 1), log ratios clamped to +-20 in the chi^2 terms."""
    if not bool(response_mask.any()):
        raise ValueError("Expected at least one valid token in response_mask")
    with torch.no_grad():
        m, old = response_mask.float(), old_log_prob.detach().float()
        mean_old = masked_mean(old, m, axis=-1)
        out = {"training_ppl": _item(torch.exp(-mean_old).mean()), "training_log_ppl": _item((-mean_old).mean())}
        if rollout_log_prob is None:
            return out
        roll = rollout_log_prob.detach().float()
        lr = old - roll
        mean_roll = masked_mean(roll, m, axis=-1)
        diff = mean_roll - mean_old
        seq_lr = (torch.where(m != 0, lr, 0.0) * m).sum(-1)
        out.update({"kl": _item(masked_mean(roll - old, m)), "k3_kl": _item(masked_mean(torch.exp(lr) - lr - 1, m)),
                    "rollout_ppl": _item(torch.exp(-mean_roll).mean()), "rollout_log_ppl": _item((-mean_roll).mean()),
                    "log_ppl_diff": _item(diff.mean()), "log_ppl_abs_diff": _item(diff.abs().mean()),
                    "log_ppl_diff_max": _item(diff.max()), "log_ppl_diff_min": _item(diff.min()),
                    "ppl_ratio": _item(torch.exp(diff).mean()),
                    "chi2_token": _item(masked_mean(torch.exp(2 * lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)), m)) - 1.0,
                    "chi2_seq": _item(torch.exp(2 * seq_lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)).mean()) - 1.0})
    return out


def _is_weights_batch(weights: Tensor):
    """veRL's return wrapper: a ``verl.protocol.DataProto`` when verl is importable, else an object whose ``batch``
    maps "rollout_is_weights" to the weights."""
    try:
        from verl.protocol import DataProto
    except ImportError:
        return SimpleNamespace(batch={"rollout_is_weights": weights})
    return DataProto.from_dict(tensors={"rollout_is_weights": weights})


def compute_rollout_correction_and_rejection_mask(old_log_prob: Tensor, rollout_log_prob: Tensor,
                                                  response_mask: Tensor, rollout_is: Optional[str] = None,
                                                  rollout_is_threshold: Optional[float] = 2.0,
                                                  rollout_is_batch_normalize: bool = False,
                                                  rollout_rs: Optional[str] = None, rollout_rs_threshold=None,
                                                  rollout_rs_threshold_lower: Optional[float] = None,
                                                  rollout_token_veto_threshold: Optional[float] = None,
                                                  *, version: str = "0.8.dev"):
    """IS weights (``rollout_is`` set) and rejection mask (``rollout_rs`` set) of the training log-probs against the
    rollout ones, plus ``compute_offpolicy_metrics``. -> (weights wrapped as veRL does,
    ``.batch["rollout_is_weights"]``, or None; the response mask after rejection; metrics with the "rollout_corr/"
    prefix). Positional arguments follow HEAD's order; pass the others by keyword.

    ``version="0.7"`` / ``"0.6.1"``: those releases' ``rollout_rs`` / ``rollout_rs_threshold_lower``
    (``compute_rollout_rejection_mask``) and the veto: with ``rollout_token_veto_threshold`` (> 0) a sequence with
    any token whose IS ratio is below it leaves the mask (whatever the rejection said; the IS weights are kept);
    metrics "rollout_is_veto_fraction" (sequences vetoed, over every row) and
    "rollout_is_catastrophic_token_fraction" (tokens below it), 0.0 without a veto threshold."""
    old = _rc_version(version) in _OLD_RS
    if not old and (rollout_rs_threshold_lower is not None or rollout_token_veto_threshold is not None):
        raise ValueError("rollout_rs_threshold_lower and rollout_token_veto_threshold are veRL 0.7.0 / 0.6.1's "
                         "(version='0.7' / '0.6.1'), removed at HEAD")
    if not bool(response_mask.any()):
        raise ValueError("response_mask must contain at least one valid token (1).")
    if old_log_prob.shape != rollout_log_prob.shape:
        raise ValueError(f"old_log_prob shape {old_log_prob.shape} does not match rollout_log_prob shape "
                         f"{rollout_log_prob.shape}.")
    if old_log_prob.shape != response_mask.shape:
        raise ValueError(f"log_prob shape {old_log_prob.shape} does not match response_mask shape "
                         f"{response_mask.shape}.")
    log_ratio = old_log_prob - rollout_log_prob
    metrics: dict[str, float] = {}
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:
        weights, is_metrics = compute_rollout_correction_weights(log_ratio, response_mask, rollout_is,
                                                                 rollout_is_threshold, rollout_is_batch_normalize,
                                                                 version=version)
        metrics.update(is_metrics)
    mask = response_mask.clone()
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled.")
        mask, rs_metrics = compute_rollout_rejection_mask(log_ratio, response_mask, rollout_rs, rollout_rs_threshold,
                                                          rollout_rs_threshold_lower, version=version)
        metrics.update(rs_metrics)
    if old:
        metrics["rollout_is_veto_fraction"] = metrics["rollout_is_catastrophic_token_fraction"] = 0.0
        if rollout_token_veto_threshold is not None:
            if not rollout_token_veto_threshold > 0:
                raise ValueError(f"rollout_token_veto_threshold must be positive, got {rollout_token_veto_threshold}.")
            with torch.no_grad():
                bad = (log_ratio.detach() < math.log(rollout_token_veto_threshold)) & (response_mask != 0)
                vetoed = bad.any(-1, keepdim=True)
                metrics["rollout_is_veto_fraction"] = _item(vetoed.float().mean())
                metrics["rollout_is_catastrophic_token_fraction"] = _item(masked_mean(bad.float(), response_mask))
            mask = mask * ~vetoed
    metrics.update(compute_offpolicy_metrics(old_log_prob, rollout_log_prob, response_mask))
    return (None if weights is None else _is_weights_batch(weights), mask,
            {f"rollout_corr/{k}": v for k, v in metrics.items()})


def compute_rollout_corr_metrics_from_logprobs(log_prob: Tensor, rollout_log_prob: Tensor, response_mask: Tensor
                                               ) -> dict[str, float]:
    """``compute_offpolicy_metrics`` of the current policy's log-probs, with the "rollout_corr/" prefix."""
    return {f"rollout_corr/{k}": v for k, v in compute_offpolicy_metrics(log_prob, rollout_log_prob,
                                                                          response_mask).items()}
