"""Rollout correction: importance-sampling weights for the gap between the policy that produced a rollout (the
behaviour policy: the sampler, or another engine such as vLLM / SGLang) and the trainer's recomputation of the same
policy, and the metrics that measure that gap.

With ``logp_old`` the trainer's log-prob of a sampled token (before any update) and ``logp_behav`` the sampler's,
the per-token ratio is ``rho_t = exp(logp_old_t - logp_behav_t)`` and, per sequence s, ``rho_s = exp(sum_{t in s}
(logp_old_t - logp_behav_t))``. Each mode turns them into a detached per-token weight ``c_t`` that multiplies the
token's loss weight (docs/formulas.md, "Rollout correction", with the sources):

  none     c = 1
  tis      c = min(rho_t, cap)                      truncated IS (Yao et al. 2025; veRL rollout_is=token, TRL
                                                    vllm_importance_sampling_mode=token_truncate, OpenRLHF tis)
  mis      c = rho_t if rho_t <= cap else 0         masked IS (TRL token_mask)
  icepop   c = rho_t if low <= rho_t <= high else 0 two-sided masking (IcePop, Ling team 2025; OpenRLHF icepop)
  seq_tis  c = min(rho_s, cap) on every token of s  (TRL sequence_truncate; veRL rollout_is=sequence)
  seq_mis  c = rho_s if rho_s <= cap else 0         (TRL sequence_mask)

``rollout_rejection`` is the hard trust region beside them (veRL's rejection sampling, ``rollout_rs``): it drops the
tokens (token level) or whole sequences whose divergence statistic lies outside [low, high]. The statistics are the
per-token estimators of KL(behaviour || trainer) with d = clamp(logp_old - logp_behav, -20, 20): k1 = -d,
k2 = d^2 / 2, k3 = exp(d) - 1 - d, taken per token or reduced over the sequence (sum, mean, max). seq_sum of k1 is
-log rho_s (two-sided band = sequence-level IS masking), seq_mean of k1 is -log of the geometric-mean ratio.

Plain PyTorch on [N] packed or [B, T] padded tensors; no host synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks

IS_MODES = ("none", "tis", "mis", "icepop", "seq_tis", "seq_mis")
RS_STATS = ("k1", "k2", "k3")
RS_LEVELS = ("token", "seq_sum", "seq_mean", "seq_max")
MISMATCH_BAND = 0.1  # mismatch_metrics counts ratios outside [1 - 0.1, 1 + 0.1]


def _inputs(logp_old, logp_behav, mask, seq_ids):
    _checks.float_tensor(logp_old, "logp_old")
    _checks.float_tensor(logp_behav, "logp_behav")
    _checks.same_shape(logp_behav, "logp_behav", logp_old.shape, "the shape of logp_old")
    _checks.tensor(mask, "mask")
    _checks.same_shape(mask, "mask", logp_old.shape, "the shape of logp_old")
    _checks.same_device(logp_behav, "logp_behav", logp_old, "logp_old")
    _checks.same_device(mask, "mask", logp_old, "logp_old")
    if seq_ids is not None:
        if logp_old.dim() != 1:
            raise ValueError(f"seq_ids is for packed [N] input; logp_old has shape {tuple(logp_old.shape)}")
        _checks.seq_ids(seq_ids, logp_old, "logp_old")
    m = mask != 0
    d = torch.where(m, logp_old.float() - logp_behav.float(), 0.0)  # 0 off the mask: NaN there never leaks
    return m, d


def _sequence_sum(d: Tensor, seq_ids: Optional[Tensor]) -> Tensor:
    """Per-token sum of d over its sequence (rows of [B, T]; ``seq_ids`` buckets of [N])."""
    if seq_ids is None:
        return d.sum(-1, keepdim=True).expand_as(d)
    return d.new_zeros(d.shape).index_add(0, seq_ids, d)[seq_ids]


def _sequence_max(x: Tensor, m: Tensor, seq_ids: Optional[Tensor]) -> Tensor:
    """Per-token max of x over the masked tokens of its sequence (0 for a sequence without any)."""
    x = torch.where(m, x, -torch.inf)
    if seq_ids is None:
        top = x.amax(-1, keepdim=True).expand_as(x)
    else:
        top = x.new_full(x.shape, -torch.inf).scatter_reduce(0, seq_ids, x, "amax")[seq_ids]
    return torch.where(top == -torch.inf, 0.0, top)


def rollout_correction(logp_old: Tensor, logp_behav: Tensor, mask: Tensor, *, mode: str = "tis", cap: float = 2.0,
                       low: float = 0.5, high: float = 5.0, seq_ids: Optional[Tensor] = None
                       ) -> tuple[Tensor, dict]:
    """Importance-sampling correction weights (module docstring), one per token.

    logp_old, logp_behav: [N] (packed, with ``seq_ids`` for the sequence modes) or [B, T] (one sequence per row),
    float; mask: same shape (1 = a generated token). cap (> 0): the bound of tis / mis / seq_tis / seq_mis; low, high
    (0 <= low < high): icepop's band. -> (weights float32, 0 off the mask and detached; stats) with stats, as
    0-d float32 tensors over the masked tokens: ``is_weight_mean``, ``is_masked_frac`` (weight set to 0) and
    ``is_truncated_frac`` (weight capped)."""
    _checks.choice(mode, "mode", IS_MODES)
    for name, value in (("cap", cap), ("low", low), ("high", high)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value == value:
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if not 0 <= low < high:
        raise ValueError(f"low and high must satisfy 0 <= low < high, got low={low}, high={high}")
    if mode.startswith("seq_") and logp_old.dim() == 1 and seq_ids is None:
        raise ValueError(f"mode={mode!r} on packed [N] input needs seq_ids (the sequence id of each token)")
    m, d = _inputs(logp_old, logp_behav, mask, seq_ids)
    log_rho = _sequence_sum(d, seq_ids) if mode.startswith("seq_") else d
    rho = log_rho.clamp(max=80.0).exp()  # exp(80) is finite in float32: the caps below decide
    zero = torch.zeros_like(rho)
    truncated, masked = zero.bool(), zero.bool()
    if mode == "none":
        w = torch.ones_like(rho)
    elif mode in ("tis", "seq_tis"):
        truncated = rho > cap
        w = rho.clamp(max=cap)
    elif mode in ("mis", "seq_mis"):
        masked = rho > cap
        w = torch.where(masked, 0.0, rho)
    else:
        masked = (rho < low) | (rho > high)
        w = torch.where(masked, 0.0, rho)
    w = torch.where(m, w, 0.0).detach()
    n = m.sum().clamp(min=1).float()
    stats = {"is_weight_mean": w.sum() / n, "is_masked_frac": (masked & m).sum() / n,
             "is_truncated_frac": (truncated & m).sum() / n}
    return w, stats


def mismatch_metrics(logp: Tensor, logp_behav: Tensor, mask: Tensor) -> dict:
    """How far the trainer's log-probs ``logp`` are from the behaviour policy's at the sampled tokens: 0-d float32
    tensors over the masked tokens (0 when none) of ``mismatch_k3`` (mean k3 estimate of KL(behaviour || trainer),
    k3 = exp(d) - d - 1 with d = logp - logp_behav), ``mismatch_ratio_mean`` / ``mismatch_ratio_std`` of
    r = exp(logp - logp_behav), and ``mismatch_outside_frac``, the fraction of tokens with |r - 1| > 0.1."""
    m, d = _inputs(logp, logp_behav, mask, None)
    n = m.sum().clamp(min=1).float()
    r = torch.where(m, d.clamp(-20.0, 20.0).exp(), 0.0)
    mean = r.sum() / n
    var = torch.where(m, (r - mean) ** 2, 0.0).sum() / n
    k3 = torch.where(m, r - d - 1.0, 0.0)
    return {"mismatch_k3": k3.sum() / n, "mismatch_ratio_mean": mean, "mismatch_ratio_std": var.sqrt(),
            "mismatch_outside_frac": (m & ((r - 1.0).abs() > MISMATCH_BAND)).sum() / n}


def rollout_rejection(logp_old: Tensor, logp_behav: Tensor, mask: Tensor, *, stat: str = "k1", level: str = "token",
                      low: Optional[float] = None, high: float, seq_ids: Optional[Tensor] = None
                      ) -> tuple[Tensor, Tensor, dict]:
    """Rejection by divergence (module docstring): which tokens keep their place in the loss.

    logp_old, logp_behav, mask, seq_ids: as ``rollout_correction``. stat: "k1" | "k2" | "k3"; level: "token" (the
    token's statistic), "seq_sum" | "seq_mean" | "seq_max" (the sum / mean / max of the statistic over the masked
    tokens of the sequence, 0 for an empty one, on each of its tokens); a token is kept when ``low <= s <= high``
    (``low=None``: no lower bound; k2 and k3 are >= 0, so ``high`` alone bounds them).
    -> (keep: bool, mask's shape, False off the mask; s: float32, mask's shape, 0 off the mask; stats) with stats
    as 0-d float32 tensors over the masked tokens: ``rs_statistic_mean`` (mean of s) and ``rs_masked_frac``
    (tokens rejected)."""
    _checks.choice(stat, "stat", RS_STATS)
    _checks.choice(level, "level", RS_LEVELS)
    for name, value in (("low", low), ("high", high)):
        if value is None and name == "low":
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value == value:
            raise TypeError(f"{name} must be a number, got {value!r}")
    if low is not None and not low <= high:
        raise ValueError(f"low and high must satisfy low <= high, got low={low}, high={high}")
    if level != "token" and logp_old.dim() == 1 and seq_ids is None:
        raise ValueError(f"level={level!r} on packed [N] input needs seq_ids (the sequence id of each token)")
    m, d = _inputs(logp_old, logp_behav, mask, seq_ids)
    d = d.clamp(-20.0, 20.0)
    k = -d if stat == "k1" else 0.5 * d * d if stat == "k2" else torch.expm1(d) - d
    k = torch.where(m, k, 0.0)
    if level == "seq_sum":
        k = _sequence_sum(k, seq_ids)
    elif level == "seq_mean":
        k = _sequence_sum(k, seq_ids) / _sequence_sum(m.float(), seq_ids).clamp(min=1.0)
    elif level == "seq_max":
        k = _sequence_max(k, m, seq_ids)
    k = torch.where(m, k, 0.0)
    keep = m & (k <= high)
    if low is not None:
        keep &= k >= low
    n = m.sum().clamp(min=1).float()
    stats = {"rs_statistic_mean": k.sum() / n, "rs_masked_frac": (m & ~keep).sum() / n}
    return keep, k, stats
