"""Training losses from hidden states with the gradients formed in the forward: the PPO/GRPO objective
(linear_ppo_loss) and the DPO family (linear_dpo_loss). Three GEMMs in all; the [N, V] logits are never kept.

Why 3 GEMMs (as linear_cross_entropy.py, unlike linear_logprobs.py): once a token's log-prob is known, so is
d loss / d logp of these losses (PPO: per token; DPO: per pair, so a chunk holds whole pairs). Each chunk of rows,
with its whole vocabulary, goes once through
  logits = hidden[rows] @ weight.T (+ bias)                 GEMM 1
  (logp, entropy, lse) -> per-token loss and (g_logp, g_entropy) -> grad_logits (the fused log-prob kernels)
  grad_hidden[rows] = grad_logits @ weight                  GEMM 2
  grad_weight += grad_logits.T @ hidden[rows]               GEMM 3 (float32 accumulation)
and backward only scales the saved gradients by the upstream scalar. Chunks: float32 logits within
linear_cross_entropy.CHUNK_BYTES. The log-prob kernels run on the op's backend (cpp / cuda / triton / torch).

PPO objective (docs/formulas.md), z = (hidden @ weight.T + bias) / temperature, logp_t and entropy H_t of z (with
kept_threshold, logp_t is renormalised over the sampler's kept set, docs/formulas.md "Kept-set log-probs"):
  r_t = exp(clamp(logp_t - old_t, -20, 20));  pol_t = max(-A_t r_t, -A_t clamp(r_t, 1 - clip_low, 1 + clip_high));
  with dual clip c: where A_t < 0, pol_t = min(pol_t, -A_t c)
  loss = sum_t w_t (pol_t + kl_coef k(logp_t, ref_t) - entropy_coef H_t), over kept tokens (w_t != 0 and label
  != ignore_index); a token not kept contributes exactly 0 and gets 0 gradient, whatever old_logp / advantages /
  ref_logp / weights hold there (NaN included).
  pol_t of loss_type "cispo", "sapo", "vespo", and the sequence ratio of ratio_level="sequence" (GSPO): ppo_objective's
  per-token terms (ppo_loss._variant_terms, which give d pol / d logp and d pol / d log_ratio). With a sequence's
  ratio, d loss / d logp_t depends on t's whole sequence, so a chunk holds whole sequences: per chunk logp, then each
  sequence's mean (or vespo's sum) of logp - old_logp, then the gradient, still 3 GEMMs.
"""

from __future__ import annotations

import bisect
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from .linear_cross_entropy import CHUNK_BYTES, _needs, chunk_rows, grads_in_forward, setup_grads_in_forward
from .linear_logprobs import LINEAR_LOGPROBS_BACKENDS, _balanced, _check_inputs, _gemm, _tile_logits
from .ppo_loss import (_kl_dlogp, _policy_variant, _sequence_log_ratio, _variant_log_ratio,
                       _variant_terms, ppo_objective)
from .token_logprobs import (_kept_threshold, _logprobs_bwd_over_logits, _logprobs_fwd, entropy_ref, kept_logprobs_ref,
                             kl_penalty_ref, logprobs_ref)

OP_BACKENDS = {"linear_ppo_loss": LINEAR_LOGPROBS_BACKENDS, "linear_dpo_loss": LINEAR_LOGPROBS_BACKENDS}

KL_KINDS = ("k1", "k2", "k3", "abs")
PPO_STATS = ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_max", "kl", "entropy", "log_ratio_mean")
DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
DPO_STATS = ("chosen_rewards", "rejected_rewards", "margins", "accuracy", "nll")


# ---------------------------------------------------------------------------------------------------------------
# PPO: per-token terms of ppo_objective (float32 [n]; the caller masks) and the chunked forward. With a
# sequence-level ratio a chunk holds whole sequences (contiguous runs of seq_ids).
# ---------------------------------------------------------------------------------------------------------------


def _ppo_terms(logp, entropy, old_logp, adv, ref_logp, keep, seq_ids, w, clip_low, clip_high, dual_clip, kl_coef,
               kl_kind, entropy_coef, loss_type, ratio_level, params):
    """-> per-token (loss, d (sum_t w_t loss_t) / d logp_t, ratio, clipped, dual, kl): ppo_objective's terms
    (``_variant_terms``) on the ratio of ``loss_type`` / ``ratio_level``; seq_ids: the tokens' sequences (whole
    sequences) when the ratio is a sequence's."""
    log_ratio = _variant_log_ratio(logp, old_logp, keep, seq_ids, loss_type, ratio_level)
    loss, dlogp, dlr, ratio, clipped, dual = _variant_terms(logp, old_logp, log_ratio, adv, loss_type, clip_low,
                                                            clip_high, dual_clip, params)
    if log_ratio is None:  # the token's own ratio: its gradient is logp's
        g_logp = w * (dlogp + dlr)
    elif ratio_level == "sequence":  # GSPO: d log_ratio_s / d logp_t = 1 / n_seq for t in s's sequence
        g_logp = w * dlogp + _sequence_log_ratio(w * dlr, torch.zeros_like(w), keep, seq_ids, "mean")
    else:  # vespo: the sequence weight is a constant
        g_logp = w * dlogp
    kl = torch.zeros_like(loss)
    if ref_logp is not None:
        kl = kl_penalty_ref(logp, ref_logp, kl_kind)
        loss = loss + kl_coef * kl
        g_logp = g_logp + w * kl_coef * _kl_dlogp(logp, ref_logp, kl_kind)
    return loss - entropy_coef * entropy, g_logp, ratio, clipped, dual, kl


def _ppo_chunks(n: int, rows: int, seq_ids: Optional[Tensor]) -> list[tuple[int, int]]:
    """Row ranges of the chunks: ``rows`` each, or (seq_ids given) whole sequences, as many as fit ``rows`` (a
    longer sequence alone). seq_ids must be contiguous: ValueError otherwise (one host read)."""
    if seq_ids is None:
        return [(a, min(a + rows, n)) for a in range(0, n, rows)]
    if n == 0:
        return []
    ends = ((seq_ids[1:] != seq_ids[:-1]).nonzero().flatten() + 1).tolist() + [n]
    if len(ends) != torch.unique(seq_ids).numel():
        raise ValueError("seq_ids must be contiguous: the tokens of each sequence one run of the packed layout "
                         "(a sequence id recurs after another sequence's tokens)")
    chunks, a = [], 0
    while a < n:
        e = ends[bisect.bisect_right(ends, a + rows) - 1]
        e = e if e > a else ends[bisect.bisect_right(ends, a)]
        chunks.append((a, e))
        a = e
    return chunks


def _linear_ppo_fwd(hidden, weight, bias, labels, old_logp, advantages, weights, ref_logp, kept_threshold, temperature,
                    ignore_index, clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef, rows, needs,
                    backend, seq_ids, loss_type, ratio_level, loss_params):
    n, vocab = hidden.shape[0], weight.shape[0]
    chunks = _ppo_chunks(n, rows, seq_ids)  # validates seq_ids before any kernel
    f32 = dict(dtype=torch.float32, device=hidden.device)
    need_hidden, need_weight, need_bias = needs
    grad_hidden = torch.empty(hidden.shape, **f32) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.empty(weight.shape, **f32) if need_weight else weight.new_empty(0)
    grad_bias = torch.zeros(vocab, **f32) if need_bias else weight.new_empty(0)
    keep_all = (labels != ignore_index) & (weights != 0)
    loss = torch.zeros((), **f32)
    logps = torch.empty(n, **f32)
    sums = torch.zeros(len(PPO_STATS), **f32)  # ratio_max in slot 4 is a max
    longest = max((e - a for a, e in chunks), default=0)
    zeros = torch.zeros(longest, **f32)
    buffer = hidden.new_empty(longest, vocab)  # every chunk's logits, then their gradient
    for start, end in chunks:
        h, y, keep = hidden[start:end], labels[start:end], keep_all[start:end]
        logits = _tile_logits(h, weight, bias, 0, vocab, out=buffer)
        thr = None if kept_threshold is None else kept_threshold[start:end]
        logp, ent, lse, lse_kept = _logprobs_fwd(backend, logits, y, thr, temperature, ignore_index, True)
        logps[start:end] = logp
        # masked tokens: zeros, so that no NaN reaches a sum or a gradient
        z = lambda x: torch.where(keep, x.float(), 0.0)  # noqa: E731
        w, old = z(weights[start:end]), z(old_logp[start:end])
        tok, g_logp, ratio, clipped, dual, kl = _ppo_terms(
            z(logp), z(ent), old, z(advantages[start:end]), None if ref_logp is None else z(ref_logp[start:end]),
            keep, None if seq_ids is None else seq_ids[start:end], w, clip_low, clip_high, dual_clip, kl_coef,
            kl_kind, entropy_coef, loss_type, ratio_level, loss_params)
        loss = loss + torch.where(keep, w * tok, 0.0).sum()
        log_ratio = z(logp) - old
        approx_kl = torch.expm1(log_ratio.clamp(-20.0, 20.0)) - log_ratio.clamp(-20.0, 20.0)
        km = keep.float()
        chunk = torch.stack([(clipped.float() * km).sum(), (dual.float() * km).sum(),
                             (approx_kl.clamp(-10.0, 10.0) * km).sum(), (ratio * km).sum(), (ratio * km).max(),
                             (kl * km).sum(), (z(ent) * km).sum(), (log_ratio * km).sum()])
        sums = torch.cat([sums[:4] + chunk[:4], torch.maximum(sums[4:5], chunk[4:5]), sums[5:] + chunk[5:]])
        if not any(needs):
            continue
        g_logp = torch.where(keep, g_logp, 0.0)
        g_ent = torch.where(keep, -entropy_coef * w, 0.0)
        no_grad = zeros[:end - start]
        grad_logits = _logprobs_bwd_over_logits(backend, g_logp, g_ent, no_grad, None if thr is None else no_grad,
                                                logits, y, thr, lse, None if thr is None else lse_kept, ent,
                                                temperature, ignore_index)
        del logits
        if need_hidden:
            _gemm(grad_hidden[start:end], grad_logits, weight, accumulate=False)
        if need_weight:
            _gemm(grad_weight, grad_logits.t(), h, accumulate=start > 0)
        if need_bias:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)
        del grad_logits
    if n == 0:
        grad_weight.zero_()
    count = keep_all.sum().float()
    stats = torch.where(count > 0, sums / count.clamp_min(1.0), 0.0)
    stats = torch.cat([stats[:4], sums[4:5], stats[5:]])
    return (loss, stats, logps, grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype) if need_bias else grad_bias)


@torch.library.custom_op("rlhf_fast::linear_ppo_loss", mutates_args=())
def linear_ppo_loss_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, old_logp: Tensor, advantages: Tensor,
    weights: Tensor, ref_logp: Optional[Tensor], kept_threshold: Optional[Tensor], temperature: float,
    ignore_index: int, clip_low: float, clip_high: float, dual_clip: Optional[float], kl_coef: float, kl_kind: str,
    entropy_coef: float, rows: int, need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
    seq_ids: Optional[Tensor] = None, loss_type: str = "ppo", ratio_level: str = "token",
    loss_params: Optional[list[float]] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] or None (one float dtype), labels [N] int64, old_logp / advantages /
    weights / ref_logp [N], kept_threshold float32 [N] or None -> (loss float32 scalar, stats float32
    [len(PPO_STATS)], logp float32 [N] (0 where the label is ignore_index; no gradient), grad_hidden [N, H],
    grad_weight [V, H], grad_bias [V] of the loss in the input dtype, each one
    not needed an empty tensor [0]). seq_ids int [N] (contiguous runs) when the ratio is a sequence's
    (ratio_level="sequence" or loss_type="vespo"), else None; loss_params those of ``_variant_terms``."""
    return _linear_ppo_fwd(hidden, weight, bias, labels, old_logp, advantages, weights, ref_logp, kept_threshold,
                           temperature, ignore_index, clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef,
                           rows, (need_hidden, need_weight, need_bias), backend, seq_ids, loss_type, ratio_level,
                           loss_params)


def _fake_grads(hidden, weight, need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


@linear_ppo_loss_op.register_fake
def _(hidden, weight, bias, labels, old_logp, advantages, weights, ref_logp, kept_threshold, temperature, ignore_index,
      clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef, rows, need_hidden, need_weight, need_bias,
      backend, seq_ids=None, loss_type="ppo", ratio_level="token", loss_params=None):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(len(PPO_STATS), dtype=torch.float32),
            hidden.new_empty(hidden.shape[0], dtype=torch.float32),
            *_fake_grads(hidden, weight, need_hidden, need_weight, need_bias))


linear_ppo_loss_op.register_autograd(grads_in_forward, setup_context=setup_grads_in_forward(18))


# ---------------------------------------------------------------------------------------------------------------
# DPO on packed pairs: seq_ids [N] in [0, 2P), sequence s < P the chosen response of pair s and sequence P + i the
# rejected response of pair i (pair_batch's order). The response tokens are visited pair by pair, so that a chunk
# holds whole pairs: each pair's d loss / d s is known once the chunk's log-probs are. A pair longer than a chunk
# is visited piece by piece, its gradients scaled once the pair's slope is known (with an NLL term: visited twice,
# its log-probs, then its gradients).
# ---------------------------------------------------------------------------------------------------------------


def _dpo_pair_terms(s_c, s_r, ref_c, ref_r, n_c, n_r, beta, loss_type, label_smoothing, simpo_gamma):
    """Per-pair float32 [k] terms of the DPO family (docs/formulas.md, "DPO") from the sequence log-probs s_*, the
    reference's ref_* and the response lengths n_* -> (loss, slope D, r_c, r_r), with d loss / d s_c = D k_c and
    d loss / d s_r = -D k_r (k from _dpo_slope_scales), and the implicit rewards r = beta * rho."""
    n_c, n_r = n_c.clamp_min(1.0), n_r.clamp_min(1.0)
    if simpo_gamma is not None:  # SimPO: no reference, length-normalised log-probs, target margin gamma
        rho_c, rho_r, gamma = s_c / n_c, s_r / n_r, simpo_gamma
    else:
        rho_c, rho_r, gamma = s_c - ref_c, s_r - ref_r, 0.0
    if loss_type == "ipo":  # on the length-normalised log-ratios
        e = rho_c / n_c - rho_r / n_r - 1.0 / (2.0 * beta)
        return e * e, 2.0 * e, beta * rho_c, beta * rho_r
    m = beta * (rho_c - rho_r) - gamma
    ls = label_smoothing
    logsigmoid = torch.nn.functional.logsigmoid
    if loss_type == "hinge":
        loss, dm = torch.relu(1.0 - m), torch.where(m < 1.0, -1.0, 0.0)
    else:
        sig = torch.sigmoid(m)
        if loss_type == "sigmoid":  # ls > 0: conservative DPO
            loss, dm = -(1 - ls) * logsigmoid(m) - ls * logsigmoid(-m), -(1 - ls) * (1 - sig) + ls * sig
        else:  # robust
            loss = (-(1 - ls) * logsigmoid(m) + ls * logsigmoid(-m)) / (1 - 2 * ls)
            dm = (-(1 - ls) * (1 - sig) - ls * sig) / (1 - 2 * ls)
    return loss, beta * dm, beta * rho_c, beta * rho_r


def _dpo_slope_scales(n_c, n_r, loss_type, simpo_gamma):
    """(k_c, k_r) with d loss / d s_c = D k_c and d loss / d s_r = -D k_r, D the pair's slope (_dpo_pair_terms):
    every loss there is a function of the difference of the two (length-normalised for ipo and SimPO) log-ratios, so
    k depends on the lengths only, and D is the one factor known only once the pair's log-probs are."""
    if loss_type == "ipo" or simpo_gamma is not None:
        return 1.0 / n_c.clamp_min(1.0), 1.0 / n_r.clamp_min(1.0)
    return torch.ones_like(n_c), torch.ones_like(n_r)


def _pair_chunks(counts: list[int], rows: int) -> list[tuple[int, int, int, int]]:
    """Consecutive pairs, as many as fit ``rows`` tokens (at least one) -> [(first pair, end pair, first token,
    end token)] in the pair-sorted token order."""
    chunks, a, t0, t = [], 0, 0, 0
    for i, c in enumerate(counts):
        if t + c - t0 > rows and i > a:
            chunks.append((a, i, t0, t))
            a, t0 = i, t
        t += c
    return chunks + [(a, len(counts), t0, t)]


def _linear_dpo_fwd(hidden, weight, bias, labels, seq_ids, ref_c, ref_r, pair_weights, nll_weights, temperature,
                    ignore_index, beta, loss_type, label_smoothing, simpo_gamma, nll_coef, rows, needs, backend):
    pairs, vocab, size = ref_c.shape[0], weight.shape[0], hidden.shape[1]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    need_hidden, need_weight, need_bias = needs
    grad_hidden = torch.zeros(hidden.shape, **f32) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, **f32) if need_weight else weight.new_empty(0)
    grad_bias = torch.zeros(vocab, **f32) if need_bias else weight.new_empty(0)
    kept = labels != ignore_index
    lens = torch.zeros(2 * pairs, **f32).index_add_(0, seq_ids, kept.float())
    tokens = kept.nonzero().squeeze(1)
    pair_of = seq_ids.index_select(0, tokens) % pairs if pairs else seq_ids[:0]
    order = tokens.index_select(0, torch.argsort(pair_of, stable=True))
    seq_logps = torch.zeros(2 * pairs, **f32)
    g_seq = torch.zeros(2 * pairs, **f32)
    nll = torch.zeros((), **f32)
    terms = lambda a, b: _dpo_pair_terms(  # noqa: E731
        seq_logps[a:b], seq_logps[pairs + a:pairs + b], ref_c[a:b].float(), ref_r[a:b].float(), lens[a:b],
        lens[pairs + a:pairs + b], beta, loss_type, label_smoothing, simpo_gamma)
    k_c, k_r = _dpo_slope_scales(lens[:pairs], lens[pairs:], loss_type, simpo_gamma)

    def visit(a, b, t0, t1, accumulate, grads, scaled_later=False):
        """Rows t0:t1 of the pair-sorted tokens (of pairs a:b): their log-probs into the sums (``accumulate``), their
        gradients from pairs a:b's d loss / d s (``grads``); ``scaled_later``: from the slope scales k alone (D = 1),
        d weight and d bias into later_weight / later_bias, all to be multiplied by the pair's w D once it is known."""
        idx = order[t0:t1]
        h, y, s = hidden.index_select(0, idx), labels.index_select(0, idx), seq_ids.index_select(0, idx)
        logits = _tile_logits(h, weight, bias, 0, vocab, out=buffer)
        logp, ent, lse, _ = _logprobs_fwd(backend, logits, y, None, temperature, ignore_index, False)
        u = nll_weights.index_select(0, idx).float()
        if accumulate:
            seq_logps.index_add_(0, s, logp)
            nll.sub_((u * logp).sum())
        if not grads:
            return
        d = 1.0 if scaled_later else pair_weights[a:b].float() * terms(a, b)[1]
        g_seq[a:b], g_seq[pairs + a:pairs + b] = d * k_c[a:b], -d * k_r[a:b]
        g_logp = g_seq.index_select(0, s) - nll_coef * u
        zeros = torch.zeros(t1 - t0, **f32)
        grad_logits = _logprobs_bwd_over_logits(backend, g_logp, zeros, zeros, None, logits, y, None, lse, None, ent,
                                                temperature, ignore_index)
        del logits
        if need_hidden:
            g = grad_hidden.new_empty(t1 - t0, size)
            _gemm(g, grad_logits, weight, accumulate=False)
            grad_hidden.index_copy_(0, idx, g)
        if need_weight:
            _gemm(later_weight if scaled_later else grad_weight, grad_logits.t(), h, accumulate=True)
        if need_bias:
            (later_bias if scaled_later else grad_bias).add_(grad_logits.sum(0, dtype=torch.float32))

    grads = any(needs)
    later_weight = later_bias = None
    chunks = _pair_chunks(torch.bincount(pair_of, minlength=pairs).tolist(), rows)
    buffer = hidden.new_empty(min(max((t1 - t0 for _, _, t0, t1 in chunks), default=0), rows), vocab)
    for a, b, t0, t1 in chunks:
        if t1 - t0 <= rows:
            if t1 > t0:
                visit(a, b, t0, t1, True, grads)
            continue
        # One pair longer than a chunk, cut into pieces: its d loss / d s needs all its log-probs first. Without the
        # NLL term the slopes are D * (k_c, -k_r) with D unknown until the end, so the pieces go through the logits
        # once with the slope scales, and their gradients are multiplied by D afterwards (at the cost of one [V, H]
        # float32 sum). With it, the pieces go through the logits twice (a fourth GEMM on their tokens).
        pieces = [(p0, min(p0 + rows, t1)) for p0 in range(t0, t1, rows)]
        if not grads or nll_coef != 0.0:
            for p0, p1 in pieces:
                visit(a, b, p0, p1, True, False)
            for p0, p1 in pieces if grads else ():
                visit(a, b, p0, p1, False, True)
            continue
        if need_weight:
            later_weight = torch.zeros(weight.shape, **f32) if later_weight is None else later_weight.zero_()
        if need_bias:
            later_bias = torch.zeros(vocab, **f32) if later_bias is None else later_bias.zero_()
        for p0, p1 in pieces:
            visit(a, b, p0, p1, True, True, scaled_later=True)
        d = pair_weights[a:b].float() * terms(a, b)[1]
        if need_hidden:
            idx = order[t0:t1]
            grad_hidden.index_copy_(0, idx, grad_hidden.index_select(0, idx).mul_(d))
        if need_weight:
            grad_weight.add_(later_weight.mul_(d))
        if need_bias:
            grad_bias.add_(later_bias.mul_(d))
    pair_loss, _, r_c, r_r = terms(0, pairs)
    loss = (pair_weights.float() * pair_loss).sum() + nll_coef * nll
    stats = torch.stack([r_c.sum(), r_r.sum(), (r_c - r_r).sum(), (r_c > r_r).float().sum()]) / max(pairs, 1)
    return (loss, torch.cat([stats, nll[None]]), seq_logps, grad_hidden.to(hidden.dtype),
            grad_weight.to(weight.dtype), grad_bias.to(bias.dtype) if need_bias else grad_bias)


@torch.library.custom_op("rlhf_fast::linear_dpo_loss", mutates_args=())
def linear_dpo_loss_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, seq_ids: Tensor, ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor, pair_weights: Tensor, nll_weights: Tensor, temperature: float, ignore_index: int,
    beta: float, loss_type: str, label_smoothing: float, simpo_gamma: Optional[float], nll_coef: float, rows: int,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] or None, labels / seq_ids [N] int64, ref_*_logp / pair_weights [P],
    nll_weights [N] -> (loss, stats [len(DPO_STATS)], sequence log-probs [2P] (no gradient), grad_hidden,
    grad_weight, grad_bias)."""
    return _linear_dpo_fwd(hidden, weight, bias, labels, seq_ids, ref_chosen_logp, ref_rejected_logp, pair_weights,
                           nll_weights, temperature, ignore_index, beta, loss_type, label_smoothing, simpo_gamma,
                           nll_coef, rows, (need_hidden, need_weight, need_bias), backend)


@linear_dpo_loss_op.register_fake
def _(hidden, weight, bias, labels, seq_ids, ref_chosen_logp, ref_rejected_logp, pair_weights, nll_weights,
      temperature, ignore_index, beta, loss_type, label_smoothing, simpo_gamma, nll_coef, rows, need_hidden,
      need_weight, need_bias, backend):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(len(DPO_STATS), dtype=torch.float32),
            hidden.new_empty(2 * ref_chosen_logp.shape[0], dtype=torch.float32),
            *_fake_grads(hidden, weight, need_hidden, need_weight, need_bias))


linear_dpo_loss_op.register_autograd(grads_in_forward, setup_context=setup_grads_in_forward(17))


# ---------------------------------------------------------------------------------------------------------------
# References and public API.
# ---------------------------------------------------------------------------------------------------------------


def linear_ppo_loss_ref(hidden, weight, labels, old_logp, advantages, weights, *, bias=None, temperature=1.0,
                        ignore_index=-100, kept_threshold=None, **objective) -> Tensor:
    """The obvious computation (full logits, autograd): ``ppo_objective`` (``objective``: its keyword arguments) on
    the labels' log-probs and the entropies, the tokens whose label is ignore_index masked. The loss only."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    if kept_threshold is None:
        logp = logprobs_ref(logits, labels, temperature, ignore_index)
    else:
        logp = kept_logprobs_ref(logits, labels, kept_threshold, temperature, ignore_index)
    w = torch.where(labels != ignore_index, weights, 0.0)
    return ppo_objective(logp, old_logp, advantages, w, entropy=entropy_ref(logits, temperature), **objective)[0]


def _check_vector(x, name: str, labels: Tensor) -> None:
    _checks.float_tensor(x, name)
    _checks.same_shape(x, name, labels.shape, "labels.shape")
    _checks.same_device(x, name, labels, "labels")


def _flat(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.detach().reshape(-1).contiguous()


def _sequences(loss_type: str, ratio_level: str, seq_ids: Optional[Tensor], labels: Tensor) -> Optional[Tensor]:
    """The flat sequence id of each token when the ratio is a sequence's (rows of [B, T] labels by default), else
    None."""
    if ratio_level != "sequence" and loss_type != "vespo":
        return None
    if seq_ids is None:
        if labels.dim() == 1:
            raise ValueError(f"loss_type={loss_type!r} with ratio_level={ratio_level!r} on packed [N, H] input needs "
                             "seq_ids (the sequence id of each token)")
        rows = torch.arange(labels.shape[0], device=labels.device)
        return rows.repeat_interleave(labels[0].numel())
    _checks.tensor(seq_ids, "seq_ids")
    if seq_ids.dtype.is_floating_point or seq_ids.dtype.is_complex or seq_ids.dtype == torch.bool:
        raise TypeError(f"seq_ids must be an integer tensor, got {seq_ids.dtype}")
    _checks.same_shape(seq_ids, "seq_ids", labels.shape, "labels.shape")
    _checks.same_device(seq_ids, "seq_ids", labels, "labels")
    return seq_ids.detach().reshape(-1).contiguous()


def linear_ppo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor,
                    weights: Tensor, *, bias: Optional[Tensor] = None, temperature: float = 1.0,
                    clip_low: float = 0.2, clip_high: Optional[float] = None, dual_clip: Optional[float] = None,
                    ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0, kl_kind: str = "k3",
                    entropy_coef: float = 0.0, ignore_index: int = -100,
                    kept_threshold: Optional[Tensor] = None, return_logprobs: bool = False, loss_type: str = "ppo",
                    ratio_level: str = "token", seq_ids: Optional[Tensor] = None,
                    sapo_tau: tuple[float, float] = (1.0, 1.05), vespo_k: tuple[float, float] = (2.0, 3.0),
                    vespo_lambda: tuple[float, float] = (3.0, 2.0)):
    """The PPO/GRPO objective of the policy head, from hidden states: sum_t w_t (pol_t + kl_coef k_t -
    entropy_coef H_t) (module docstring), gradients formed in the forward (3 GEMMs).

    hidden: [N, H] packed tokens or [B, T, H] (float32/bf16/fp16); weight [V, H], bias [V] or None (same dtype);
    labels hidden.shape[:-1] int64; old_logp, advantages, weights (the loss weights of loss_weights: they carry the
    aggregation), ref_logp (with kl_coef): float tensors of labels' shape. A token with weight 0 or label
    ignore_index is masked. Returns (loss float32 scalar, differentiable w.r.t. hidden, weight, bias; stats: dict of
    float32 scalars PPO_STATS, plain means over the kept tokens (ratio_max a max), 0 when there are none; "kl" is 0
    without ref_logp).
    kept_threshold: None, or float32 of labels' shape (the sampler's kept threshold): logp_t becomes the log-prob
    renormalised over the kept set {v : logits_v >= m_t} plus the label (rlhf_fast.logprobs, kept_threshold); the
    entropy term stays the full-softmax entropy. return_logprobs: also return each token's logp_t (float32 of labels'
    shape, 0 where the label is ignore_index, no gradient), which the forward computes anyway.
    loss_type ("ppo", "cispo", "sapo", "vespo"), ratio_level ("token", "sequence": GSPO), sapo_tau, vespo_k,
    vespo_lambda: as ``ppo_objective`` (docs/formulas.md "Losses"). A sequence's ratio (ratio_level="sequence", and
    vespo's weight) is over the kept tokens of its sequence: the rows of [B, T, H] input, or ``seq_ids`` (int, labels'
    shape, the sequence of each token; each sequence one contiguous run, ValueError otherwise) for packed [N, H]
    input. Chunks then hold whole sequences (a sequence longer than the chunk budget goes alone in one chunk).
    """
    temperature = _checks.temperature(temperature)
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    _check_inputs(hidden, weight, labels, bias, ignore_index)
    for x, name in ((old_logp, "old_logp"), (advantages, "advantages"), (weights, "weights")):
        _check_vector(x, name, labels)
    if ref_logp is not None:
        _check_vector(ref_logp, "ref_logp", labels)
    kept_threshold = _kept_threshold(kept_threshold, labels)
    loss_type, ratio_level, params = _policy_variant(loss_type, ratio_level, clip_high, dual_clip, sapo_tau, vespo_k,
                                                     vespo_lambda)
    clip_low = _checks.positive_number(clip_low, "clip_low")
    clip_high = clip_low if clip_high is None else _checks.positive_number(clip_high, "clip_high")
    if dual_clip is not None:
        dual_clip = float(dual_clip)
        if not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    kl_kind = _checks.choice(kl_kind, "kl_kind", KL_KINDS)
    kl_coef, entropy_coef = float(kl_coef), float(entropy_coef)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    seq_ids = _sequences(loss_type, ratio_level, seq_ids, labels)
    backend = _backend.select("linear_ppo_loss", LINEAR_LOGPROBS_BACKENDS, hidden.device)
    rows_2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    rows = chunk_rows(rows_2d.shape[0], weight.shape[0], hidden.device)
    loss, stats, logp, *_ = linear_ppo_loss_op(
        rows_2d, weight, bias, labels.reshape(-1).contiguous(), _flat(old_logp), _flat(advantages), _flat(weights),
        _flat(ref_logp), kept_threshold, temperature, ignore_index, clip_low, clip_high, dual_clip, kl_coef, kl_kind,
        entropy_coef, rows, *_needs(hidden, weight, bias), backend, seq_ids, loss_type, ratio_level, params)
    stats = dict(zip(PPO_STATS, stats.unbind()))
    return (loss, stats, logp.view(labels.shape)) if return_logprobs else (loss, stats)


def dpo_pair_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                  chosen_lens: Tensor, rejected_lens: Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, simpo_gamma: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The per-pair DPO-family loss from sequence log-probs (sums over the response tokens) and response lengths,
    all [P] (docs/formulas.md, "DPO"); differentiable. ``simpo_gamma`` not None: SimPO (the reference is ignored).
    -> (loss [P], chosen_rewards [P], rejected_rewards [P]); the rewards beta * rho, detached."""
    f = lambda x: torch.as_tensor(x).float()  # noqa: E731
    loss, _, r_c, r_r = _dpo_pair_terms(f(chosen_logps), f(rejected_logps), f(ref_chosen_logps),
                                           f(ref_rejected_logps), f(chosen_lens), f(rejected_lens), beta, loss_type,
                                           label_smoothing, simpo_gamma)
    return loss, r_c.detach(), r_r.detach()


def linear_dpo_loss_ref(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp, *, seq_ids=None, beta=0.1,
                        loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=None, nll_coef=0.0, pair_weights=None,
                        nll_weights=None, bias=None, temperature=1.0, ignore_index=-100) -> Tensor:
    """The obvious computation (full logits, autograd): the loss only."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    logp = logprobs_ref(logits, labels, temperature, ignore_index).reshape(-1)
    pairs = ref_chosen_logp.shape[0]
    labels, seq_ids, pair_weights, nll_weights = _dpo_defaults(labels, seq_ids, pairs, pair_weights, nll_weights,
                                                               ignore_index)
    seq = logp.new_zeros(2 * pairs).index_add(0, seq_ids, logp)
    lens = logp.new_zeros(2 * pairs).index_add(0, seq_ids, (labels != ignore_index).to(logp.dtype))
    pair_loss = dpo_pair_loss(seq[:pairs], seq[pairs:], ref_chosen_logp, ref_rejected_logp, lens[:pairs],
                              lens[pairs:], beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                              simpo_gamma=simpo_gamma)[0]
    return (pair_weights * pair_loss).sum() - nll_coef * (nll_weights * logp.float()).sum()


def _dpo_defaults(labels, seq_ids, pairs, pair_weights, nll_weights, ignore_index):
    """-> labels [N], seq_ids [N] (rows of [2P, T] labels when None), pair_weights [P] (default 1/P) and
    nll_weights [N] (default: the mean over the chosen response tokens), float32."""
    if seq_ids is None:
        seq_ids = torch.arange(labels.shape[0], device=labels.device).repeat_interleave(labels.shape[1])
    labels, seq_ids = labels.reshape(-1), seq_ids.reshape(-1)
    if pair_weights is None:
        pair_weights = torch.full((pairs,), 1.0 / max(pairs, 1), device=labels.device)
    if nll_weights is None:
        chosen = ((labels != ignore_index) & (seq_ids < pairs)).float()
        nll_weights = chosen / chosen.sum().clamp_min(1.0)
    return labels, seq_ids, pair_weights.float(), nll_weights.reshape(-1).float()


def linear_dpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, ref_chosen_logp: Tensor,
                    ref_rejected_logp: Tensor, *, seq_ids: Optional[Tensor] = None, beta: float = 0.1,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: Optional[float] = None,
                    nll_coef: float = 0.0, pair_weights: Optional[Tensor] = None,
                    nll_weights: Optional[Tensor] = None, bias: Optional[Tensor] = None, temperature: float = 1.0,
                    ignore_index: int = -100, return_sequence_logps: bool = False):
    """The DPO family of pairwise losses from hidden states (docs/formulas.md, "DPO"), gradients formed in the
    forward (3 GEMMs), chunks of whole pairs (a pair longer than the chunk budget: one [V, H] float32 sum more, or
    with nll_coef 4 GEMMs on its tokens); the [N, V] logits never exist.

    Layout, packed: hidden [N, H], labels [N] and ``seq_ids`` [N] int64 in [0, 2P): sequence i < P is the chosen
    response of pair i, sequence P + i its rejected response (the order of ``rlhf_fast.data.pair_batch``). Or padded,
    ``seq_ids=None``: hidden [2P, T, H], labels [2P, T], row i chosen and row P + i rejected (TRL's concatenated
    layout). labels: ignore_index on prompt and padding positions. ref_chosen_logp, ref_rejected_logp [P]: the
    reference model's sequence log-probs (zeros: reference-free; ignored with simpo_gamma).
    loss_type: "sigmoid" (DPO; label_smoothing > 0: conservative DPO), "robust" (robust DPO), "ipo" (length-
    normalised log-ratios), "hinge" (SLiC). simpo_gamma: SimPO's target margin (length-normalised log-probs, no
    reference; not with ipo). Loss = sum_i pair_weights_i loss_i + nll_coef * sum_t nll_weights_t (-logp_t);
    pair_weights [P] (default 1/P), nll_weights of labels' shape (default: the mean over the chosen response tokens,
    the RPO term). Returns (loss float32 scalar; stats: chosen_rewards, rejected_rewards, margins, accuracy (plain
    means over the pairs), nll (sum_t nll_weights_t (-logp_t))); with ``return_sequence_logps`` also the sequences'
    log-probs [2P] float32 (no gradient).
    """
    temperature = _checks.temperature(temperature)
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    _check_inputs(hidden, weight, labels, bias, ignore_index)
    pairs = ref_chosen_logp.shape[0] if isinstance(ref_chosen_logp, Tensor) and ref_chosen_logp.dim() == 1 else -1
    if seq_ids is None:
        if hidden.dim() != 3 or hidden.shape[0] % 2 != 0:
            raise ValueError("without seq_ids, hidden must be [2P, T, H] (chosen rows then rejected rows), got "
                             f"{tuple(hidden.shape)}")
        pairs = hidden.shape[0] // 2
    else:
        if hidden.dim() != 2:
            raise ValueError(f"with seq_ids, hidden must be packed [N, H], got {tuple(hidden.shape)}")
        _checks.seq_ids(seq_ids, labels, "labels")
        if pairs >= 0 and seq_ids.numel() and not torch.compiler.is_compiling():
            low, high = int(seq_ids.min()), int(seq_ids.max())
            if low < 0 or high >= 2 * pairs:
                raise ValueError(f"seq_ids must be in [0, 2P) = [0, {2 * pairs}) (P = ref_chosen_logp.shape[0]), "
                                 f"got values in [{low}, {high}]")
    for x, name in ((ref_chosen_logp, "ref_chosen_logp"), (ref_rejected_logp, "ref_rejected_logp"),
                    (pair_weights, "pair_weights")):
        if x is not None or name != "pair_weights":
            _checks.float_tensor(x, name)
            _checks.same_shape(x, name, (max(pairs, 0),), "[P]")
            _checks.same_device(x, name, hidden, "hidden")
    if nll_weights is not None:
        _check_vector(nll_weights, "nll_weights", labels)
    beta = _checks.positive_number(beta, "beta")
    loss_type = _checks.choice(loss_type, "loss_type", DPO_LOSS_TYPES)
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if simpo_gamma is not None:
        simpo_gamma = float(simpo_gamma)
        if loss_type == "ipo":
            raise ValueError("simpo_gamma needs loss_type sigmoid, robust or hinge (ipo has its own margin)")
    nll_coef = float(nll_coef)
    labels, seq_ids, pair_weights, nll_weights = _dpo_defaults(labels, seq_ids, pairs, pair_weights, nll_weights,
                                                               ignore_index)
    backend = _backend.select("linear_dpo_loss", LINEAR_LOGPROBS_BACKENDS, hidden.device)
    rows_2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    rows = max(1, CHUNK_BYTES.get(hidden.device.type, CHUNK_BYTES["cuda"]) // (4 * weight.shape[0]))
    loss, stats, seq_logps, *_ = linear_dpo_loss_op(
        rows_2d, weight, bias, labels.contiguous(), seq_ids.contiguous(), _flat(ref_chosen_logp),
        _flat(ref_rejected_logp), pair_weights.detach().contiguous(), nll_weights.detach().contiguous(), temperature,
        ignore_index, beta, loss_type, label_smoothing, simpo_gamma, nll_coef, rows, *_needs(hidden, weight, bias),
        backend)
    stats = dict(zip(DPO_STATS, stats.unbind()))
    return (loss, stats, seq_logps) if return_sequence_logps else (loss, stats)
