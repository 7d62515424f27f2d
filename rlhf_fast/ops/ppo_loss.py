"""PPO losses: clipped policy loss (asymmetric and dual clip), clipped value loss, the PPO objective, and that
objective computed straight from the logits.

Formulas (docs/formulas.md), per token, with A the advantage:
  ratio  = exp(clamp(logp - old_logp, -20, 20))
  policy = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high)); with dual_clip c: where A < 0,
           policy = min(policy, -A * c)
  value  = 0.5 * max((v - R)^2, (v_old + clamp(v - v_old, -clip, clip) - R)^2)
  full   = policy + kl_coef * k(logp, ref_logp) - entropy_coef * entropy       (k: kl_penalty of kind kl_kind)
Every loss is ``sum_t w_t * l_t`` with per-token float32 weights w (``loss_weights``: the aggregation mode as weights,
docs/formulas.md, "Loss aggregation"). A token with w_t == 0 is masked: it contributes exactly 0 to the loss and gets
exactly 0 gradient, whatever its values (NaN or inf included). Stats are plain means over the tokens with w_t != 0
(0 when there is none). ``old_logp``, ``advantages``, ``old_values``, ``returns``, ``ref_logp`` and the weights are
constants of the update: they are detached and receive no gradient.

Layouts: padded ``[B, T]`` or packed ``[N]``; the ops read only the weights, so both are the same to them.

The standalone losses are the custom ops ``rlhf_fast::ppo_policy_loss`` and ``rlhf_fast::ppo_value_loss`` (backends
cpp, triton, torch): the forward is one pass over the tokens giving the loss and the diagnostics, and the backward
(``rlhf_fast::ppo_*_loss_backward``) one pass writing ``grad_output * w_t * dl_t/dx_t`` in the input's dtype. They
save only their inputs: the gradient is the one [B, T] tensor they allocate. (Elementwise PyTorch ran ~60 kernels
over [B, T] for one forward+backward: 22.6 ms at [64, 2048] on one CPU thread, against 9.8 ms for torch.compile of the
reference.) ``ppo_objective`` is THE PPO objective (the per-token op ``rlhf_fast::ppo_token_loss``, then the weighted
sum); ``ppo_loss_from_logits`` is the fused log-prob/entropy op (``rlhf_fast::logprobs_entropy``: one read of the
logits forward, one write of their gradient backward) followed by ``ppo_objective``: no ``[B, T, V]`` tensor is
written but the gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from .token_logprobs import KL_KINDS, LOGPROBS_BACKENDS, kl_penalty_ref, logprobs, logprobs_and_entropy

TOKEN_LOSS_BACKENDS = ("torch", "cpp", "triton")  # of the standalone ppo_policy_loss / ppo_value_loss
POLICY_STATS = ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_max")
OP_BACKENDS = {  # public op -> backends implementing it (shown by `rlhf-fast info`)
    "ppo_policy_loss": TOKEN_LOSS_BACKENDS,
    "ppo_value_loss": TOKEN_LOSS_BACKENDS,
    "ppo_objective": ("torch",),  # the per-token op, then the weighted sum
    "ppo_loss_from_logits": LOGPROBS_BACKENDS,  # the backend of the log-prob op it runs on the logits
}
IGNORE_INDEX = -100
POLICY_LOSS_TYPES = ("ppo", "cispo", "sapo", "vespo")  # ppo_objective(loss_type=...): docs/formulas.md, "Losses"
RATIO_LEVELS = ("token", "sequence")  # ppo_objective(ratio_level=...): "sequence" = GSPO's sequence ratio


# ---------------------------------------------------------------------------------------------------------------
# References: short and obviously correct; the ground truth of the tests (autograd gives their gradients).
# ---------------------------------------------------------------------------------------------------------------


def _up(x: Tensor) -> Tensor:
    """float32, or float64 kept: the references run in float64 to serve as the exact result of the tests."""
    return x if x.dtype == torch.float64 else x.float()


def aggregate_ref(loss_tok: Tensor, mask: Tensor, agg: str = "token-mean", seq_ids: Optional[Tensor] = None,
                  max_len: Optional[int] = None) -> Tensor:
    """The aggregation of mode ``agg`` written out per mode (as it was before loss weights): the tests' ground truth
    for ``loss_weights``. Padded [B, T] (rows are sequences) or packed [N] with seq_ids."""
    m = mask.bool()
    loss_tok = torch.where(m, _up(loss_tok), 0.0)
    max_len = mask.shape[-1] if max_len is None else max_len
    if agg == "token-mean":
        return loss_tok.sum() / m.sum().clamp_min(1)
    if agg == "seq-mean-token-sum-norm":
        return loss_tok.sum() / max_len
    if agg == "dr-grpo":  # B sequences, empty ones included
        n_seqs = mask.shape[0] if seq_ids is None else len(seq_ids.unique())
        return loss_tok.sum() / max(n_seqs * max_len, 1)
    if seq_ids is None:
        seqs = [(loss_tok[b], m[b]) for b in range(loss_tok.shape[0])]
    else:
        seqs = [(loss_tok[seq_ids == s], m[seq_ids == s]) for s in seq_ids.unique().tolist()]
    per_seq = [ls.sum() / (ms.sum() if agg == "seq-mean-token-mean" else 1) for ls, ms in seqs if ms.any()]
    return torch.stack(per_seq).mean() if per_seq else loss_tok.sum() * 0.0


def _mean_ref(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.bool()
    return torch.where(m, _up(x), 0.0).sum() / m.sum().clamp_min(1)


def _policy_tokens_ref(logp, old_logp, advantages, clip_low, clip_high, dual_clip):
    """-> per-token (loss, ratio, clipped, dual_clipped)."""
    clip_high = clip_low if clip_high is None else clip_high
    adv = _up(advantages)
    ratio = torch.exp(torch.clamp(_up(logp) - _up(old_logp), -20.0, 20.0))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        dual = (adv < 0) & (loss > -adv * dual_clip)
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss, ratio, clipped > unclipped, dual


def _policy_stats_ref(logp, old_logp, ratio, clipped, dual, mask):
    m = mask.bool()
    with torch.no_grad():
        return {
            "clip_frac": _mean_ref(clipped, m),
            "dual_clip_frac": _mean_ref(dual, m),
            "approx_kl": _mean_ref(kl_penalty_ref(old_logp, logp, "k3"), m),  # k3 with d = logp - old_logp
            "ratio_mean": _mean_ref(ratio, m),
            "ratio_max": torch.where(m, ratio, 0.0).max(),  # ratio > 0: 0 when no token
        }


def ppo_policy_loss_ref(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                        agg="token-mean", seq_ids=None, max_len=None):
    loss, ratio, clipped, dual = _policy_tokens_ref(logp, old_logp, advantages, clip_low, clip_high, dual_clip)
    return aggregate_ref(loss, mask, agg, seq_ids, max_len), _policy_stats_ref(logp, old_logp, ratio, clipped, dual,
                                                                              mask)


def ppo_value_loss_ref(values, old_values, returns, mask, *, clip=0.2, agg="token-mean", seq_ids=None, max_len=None):
    v, v_old, ret = _up(values), _up(old_values), _up(returns)
    unclipped = (v - ret) ** 2
    if clip is None:
        loss, frac = 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped = (v_old + torch.clamp(v - v_old, -clip, clip) - ret) ** 2
        loss = 0.5 * torch.maximum(unclipped, clipped)
        frac = (clipped > unclipped) & ((v - v_old).abs() > clip)
    with torch.no_grad():
        stats = {"clip_frac": _mean_ref(frac, mask)}
    return aggregate_ref(loss, mask, agg, seq_ids, max_len), stats


def ppo_objective_ref(logp, old_logp, advantages, mask, *, entropy=None, ref_logp=None, kl_coef=0.0, kl_kind="k3",
                      entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean", seq_ids=None,
                      max_len=None):
    loss, ratio, clipped, dual = _policy_tokens_ref(logp, old_logp, advantages, clip_low, clip_high, dual_clip)
    stats = _policy_stats_ref(logp, old_logp, ratio, clipped, dual, mask)
    if ref_logp is not None:
        kl = kl_penalty_ref(logp, ref_logp, kl_kind)
        loss = loss + kl_coef * kl
        stats["kl"] = _mean_ref(kl.detach(), mask)
    if entropy is not None:
        loss = loss - entropy_coef * _up(entropy)
        stats["entropy"] = _mean_ref(entropy.detach(), mask)
    return aggregate_ref(loss, mask, agg, seq_ids, max_len), stats


def ppo_loss_from_logits_ref(logits, labels, old_logp, advantages, mask, *, ref_logp=None, kl_coef=0.0, kl_kind="k3",
                             entropy_coef=0.0, temperature=1.0, clip_low=0.2, clip_high=None, dual_clip=None,
                             agg="token-mean", seq_ids=None, max_len=None):
    """The eager composite: log_softmax + gather (+ entropy over [..., V]), then the per-token formulas."""
    logp_all = torch.log_softmax(_up(logits) / temperature, dim=-1)
    keep = labels != IGNORE_INDEX
    logp = torch.where(keep, logp_all.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    ent = None
    if entropy_coef != 0.0:
        p = logp_all.exp()
        ent = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return ppo_objective_ref(logp, old_logp, advantages, mask, entropy=ent, ref_logp=ref_logp, kl_coef=kl_coef,
                             kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high,
                             dual_clip=dual_clip, agg=agg, seq_ids=seq_ids, max_len=max_len)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops (validated inputs of one shape; the mask is bool) with fake and autograd implementations.
# ---------------------------------------------------------------------------------------------------------------


def _kl_dlogp(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """d kl_penalty(logp, ref_logp, kind) / d logp, float32 (the clamps of k3 pass no gradient outside their range)."""
    d = ref_logp.float() - logp.float()
    if kind == "k1":
        return torch.ones_like(d)
    if kind == "k2":
        return -d
    if kind == "abs":
        return -torch.sign(d)
    dc = d.clamp(-20.0, 20.0)
    k3 = dc.exp() - dc - 1.0
    return torch.where((d.abs() <= 20.0) & (k3.abs() <= 10.0), 1.0 - dc.exp(), 0.0)


def _policy_terms(logp, old_logp, advantages, clip_low, clip_high, dual_clip):
    """-> per-token float32 (loss, d loss / d logp, ratio, clipped, dual_clipped) of the PPO-clip policy loss."""
    adv = advantages.float()
    log_ratio = logp.float() - old_logp.float()
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    # d loss / d logp = -A * ratio where the unclipped term is the max and the ratio's clamp is open, else 0
    takes_ratio = (unclipped >= clipped) & (log_ratio.abs() <= 20.0)
    dual = torch.zeros_like(takes_ratio)
    if dual_clip is not None:
        dual = (adv < 0) & (loss > -adv * dual_clip)
        loss = torch.where(dual, -adv * dual_clip, loss)
        takes_ratio &= ~dual
    return loss, torch.where(takes_ratio, unclipped, 0.0), ratio, clipped > unclipped, dual


def _variant_terms(logp, old_logp, log_ratio, advantages, loss_type, clip_low, clip_high, dual_clip, params):
    """Per-token policy loss of ``loss_type`` -> float32 (loss, d loss / d logp, d loss / d log_ratio, ratio,
    clipped, dual_clipped). ``log_ratio`` None: the token's logp - old_logp (its gradient is then logp's); else the
    given (sequence-level) log-ratio, broadcast per token. params: sapo (tau_pos, tau_neg); vespo (k_pos, lambda_pos,
    k_neg, lambda_neg)."""
    adv = advantages.float()
    lr = logp.float() - old_logp.float() if log_ratio is None else log_ratio.float()
    zero = torch.zeros_like(adv)
    if loss_type == "ppo":
        loss, dlr, ratio, clipped, dual = _policy_terms(lr, zero, adv, clip_low, clip_high, dual_clip)
        return loss, zero, dlr, ratio, clipped, dual
    no = torch.zeros_like(adv, dtype=torch.bool)
    if loss_type == "vespo":  # lr: the sequence's log w, clamped to [log 1e-8, 20]; phi(w) is a constant
        k = torch.where(adv >= 0, params[0], params[2])
        lam = torch.where(adv >= 0, params[1], params[3])
        phi = torch.exp(lam + k * lr - lam * lr.exp()).nan_to_num(0.0, 0.0, 0.0)
        return -phi * adv * logp.float(), -phi * adv, zero, lr.exp(), no, no
    ratio = torch.exp(lr.clamp(-20.0, 20.0))
    if loss_type == "cispo":  # the clamped ratio is a constant: the gradient is -c * A on logp
        c = ratio.clamp(max=clip_high)
        return -c * adv * logp.float(), -c * adv, zero, ratio, ratio > clip_high, no
    tau = torch.where(adv > 0, params[0], params[1])  # sapo
    gate = torch.sigmoid(tau * (ratio - 1.0))
    dlr = torch.where(lr.abs() <= 20.0, -4.0 * adv * gate * (1.0 - gate) * ratio, 0.0)
    return -4.0 * adv * gate / tau, zero, dlr, ratio, no, no


@torch.library.custom_op("rlhf_fast::ppo_token_loss", mutates_args=())
def ppo_token_loss_op(
    logp: Tensor, entropy: Optional[Tensor], old_logp: Tensor, advantages: Tensor, ref_logp: Optional[Tensor],
    mask: Tensor, clip_low: float, clip_high: float, dual_clip: Optional[float], kl_coef: float, kl_kind: str,
    entropy_coef: float, log_ratio: Optional[Tensor] = None, loss_type: str = "ppo",
    loss_params: Optional[list[float]] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token PPO objective. All inputs one shape; mask bool; the rest float32/bf16/fp16.

    -> (loss float32, ratio float32, clipped bool, dual_clipped bool), each 0 / False at masked positions.
    loss = policy + kl_coef * kl_penalty(logp, ref_logp, kl_kind) - entropy_coef * entropy (terms whose tensor is
    None are left out), policy the per-token loss of ``loss_type`` (``_variant_terms``) on the ratio
    exp(logp - old_logp), or exp(log_ratio) when the (sequence-level) log_ratio is given. Differentiable w.r.t.
    logp, entropy and log_ratio.
    """
    loss, _, _, ratio, clipped, dual = _variant_terms(logp, old_logp, log_ratio, advantages, loss_type, clip_low,
                                                      clip_high, dual_clip, loss_params)
    if ref_logp is not None:
        loss = loss + kl_coef * kl_penalty_ref(logp, ref_logp, kl_kind)
    if entropy is not None:
        loss = loss - entropy_coef * entropy.float()
    return torch.where(mask, loss, 0.0), torch.where(mask, ratio, 0.0), clipped & mask, dual & mask


@ppo_token_loss_op.register_fake
def _(logp, entropy, old_logp, advantages, ref_logp, mask, clip_low, clip_high, dual_clip, kl_coef, kl_kind,
      entropy_coef, log_ratio=None, loss_type="ppo", loss_params=None):
    f32 = torch.empty_like(logp, dtype=torch.float32)
    return f32, torch.empty_like(f32), torch.empty_like(mask), torch.empty_like(mask)


def _ppo_token_loss_setup(ctx, inputs, output):
    logp, entropy, old_logp, advantages, ref_logp, mask, clip_low, clip_high, dual_clip, kl_coef, kl_kind, \
        entropy_coef, *rest = inputs
    log_ratio, loss_type, loss_params = (rest + [None, "ppo", None][len(rest):])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no [B, T] zero gradients for the unused outputs
    ctx.save_for_backward(logp, entropy, old_logp, advantages, ref_logp, mask, log_ratio)
    ctx.args = (clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef, loss_type, loss_params)
    ctx.n_inputs = len(inputs)


def _ppo_token_loss_grad(ctx, grad_loss, _grad_ratio, _grad_clipped, _grad_dual):
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    logp, entropy, old_logp, advantages, ref_logp, mask, log_ratio = ctx.saved_tensors
    clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef, loss_type, loss_params = ctx.args
    _, dlogp, dlr, _, _, _ = _variant_terms(logp, old_logp, log_ratio, advantages, loss_type, clip_low, clip_high,
                                            dual_clip, loss_params)
    if log_ratio is None:  # the ratio is the token's: its gradient is logp's
        dlogp, dlr = dlogp + dlr, None
    if ref_logp is not None:
        dlogp = dlogp + kl_coef * _kl_dlogp(logp, ref_logp, kl_kind)
    g = torch.where(mask, grad_loss, 0.0)
    grad_logp = torch.where(mask, g * dlogp, 0.0).to(logp.dtype)
    grad_entropy = None if entropy is None else (-entropy_coef * g).to(entropy.dtype)
    grad_lr = None if dlr is None else torch.where(mask, g * dlr, 0.0).to(log_ratio.dtype)
    grads = (grad_logp, grad_entropy) + (None,) * 10 + (grad_lr, None, None)
    return grads[:ctx.n_inputs]


ppo_token_loss_op.register_autograd(_ppo_token_loss_grad, setup_context=_ppo_token_loss_setup)


def _value_terms(values, old_values, returns, clip):
    """-> per-token float32 (loss, d loss / d values, clipped) of the clipped value loss; ``clipped``: the clipped
    term is the larger and its clamp is active (|v - v_old| > clip)."""
    v, ret = values.float(), returns.float()
    d = v - ret
    if clip is None:
        return 0.5 * d * d, d, torch.zeros_like(d, dtype=torch.bool)
    v_old = old_values.float()
    step = v - v_old
    e = v_old + step.clamp(-clip, clip) - ret
    takes_clipped = e * e > d * d
    grad = torch.where(takes_clipped, torch.where(step.abs() <= clip, e, 0.0), d)  # the clamp passes no gradient
    return 0.5 * torch.maximum(d * d, e * e), grad, takes_clipped & (step.abs() > clip)


def _policy_loss_torch(logp, old_logp, advantages, weights, clip_low, clip_high, dual_clip):
    mask = weights != 0
    loss, _, ratio, clipped, dual = _policy_terms(logp, old_logp, advantages, clip_low, clip_high, dual_clip)
    ratio = torch.where(mask, ratio, 0.0)
    sums = torch.stack([(clipped & mask).float().sum(), (dual & mask).float().sum(),
                        torch.where(mask, kl_penalty_ref(old_logp, logp, "k3"), 0.0).sum(), ratio.sum()])
    ratio_max = ratio.amax() if ratio.numel() > 0 else ratio.new_zeros(())  # ratio > 0: 0 when no token
    stats = torch.cat([sums / _nonzero_or_one(mask.float().sum()), ratio_max.reshape(1)])
    return torch.where(mask, weights * loss, 0.0).sum(), stats


def _policy_loss_backward_torch(grad_loss, logp, old_logp, advantages, weights, clip_low, clip_high, dual_clip):
    _, dlogp, _, _, _ = _policy_terms(logp, old_logp, advantages, clip_low, clip_high, dual_clip)
    return torch.where(weights != 0, weights * grad_loss * dlogp, 0.0).to(logp.dtype).contiguous()


def _value_loss_torch(values, old_values, returns, weights, clip):
    mask = weights != 0
    loss, _, clipped = _value_terms(values, old_values, returns, clip)
    stats = ((clipped & mask).float().sum() / _nonzero_or_one(mask.float().sum())).reshape(1)
    return torch.where(mask, weights * loss, 0.0).sum(), stats


def _value_loss_backward_torch(grad_loss, values, old_values, returns, weights, clip):
    _, dv, _ = _value_terms(values, old_values, returns, clip)
    return torch.where(weights != 0, weights * grad_loss * dv, 0.0).to(values.dtype).contiguous()


def _triton():
    from ..kernels import ppo_loss as triton_ppo_loss  # imported on first use: importing triton is slow

    return triton_ppo_loss


def _run(backend: str, name: str, torch_impl, *args):
    """The backend's implementation of ``name`` (ppo_{policy,value}_loss_{fwd,bwd})."""
    if backend == "cpp":
        return getattr(torch.ops.rlhf_fast_C, name)(*args)
    if backend == "triton":
        return getattr(_triton(), name)(*args)
    return torch_impl(*args)


@torch.library.custom_op("rlhf_fast::ppo_policy_loss", mutates_args=())
def ppo_policy_loss_op(logp: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, clip_low: float,
                       clip_high: float, dual_clip: Optional[float], backend: str) -> tuple[Tensor, Tensor]:
    """sum_t w_t * policy_t in one pass. logp, old_logp, advantages: [B, T] or [N] float32/bf16/fp16; weights
    float32 of that shape (0 = masked).

    -> (loss 0-d float32, differentiable w.r.t. logp; stats float32 [5], in the order of POLICY_STATS).
    """
    return _run(backend, "ppo_policy_loss_fwd", _policy_loss_torch, logp, old_logp, advantages, weights, clip_low,
                clip_high, dual_clip)


@torch.library.custom_op("rlhf_fast::ppo_policy_loss_backward", mutates_args=())
def ppo_policy_loss_backward_op(grad_loss: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor,
                                weights: Tensor, clip_low: float, clip_high: float, dual_clip: Optional[float],
                                backend: str) -> Tensor:
    """grad_loss: 0-d float32 -> grad_loss * w * d loss / d logp, contiguous, logp's dtype and shape."""
    return _run(backend, "ppo_policy_loss_bwd", _policy_loss_backward_torch, grad_loss, logp, old_logp, advantages,
                weights, clip_low, clip_high, dual_clip)


@torch.library.custom_op("rlhf_fast::ppo_value_loss", mutates_args=())
def ppo_value_loss_op(values: Tensor, old_values: Tensor, returns: Tensor, weights: Tensor, clip: Optional[float],
                      backend: str) -> tuple[Tensor, Tensor]:
    """sum_t w_t * value_t in one pass; inputs as ppo_policy_loss_op.

    -> (loss 0-d float32, differentiable w.r.t. values; stats float32 [1] = clip_frac).
    """
    return _run(backend, "ppo_value_loss_fwd", _value_loss_torch, values, old_values, returns, weights, clip)


@torch.library.custom_op("rlhf_fast::ppo_value_loss_backward", mutates_args=())
def ppo_value_loss_backward_op(grad_loss: Tensor, values: Tensor, old_values: Tensor, returns: Tensor,
                               weights: Tensor, clip: Optional[float], backend: str) -> Tensor:
    """grad_loss: 0-d float32 -> grad_loss * w * d loss / d values, contiguous, values' dtype and shape."""
    return _run(backend, "ppo_value_loss_bwd", _value_loss_backward_torch, grad_loss, values, old_values, returns,
                weights, clip)


def _fake_loss_stats(x: Tensor, n_stats: int) -> tuple[Tensor, Tensor]:
    return x.new_empty((), dtype=torch.float32), x.new_empty((n_stats,), dtype=torch.float32)


@ppo_policy_loss_op.register_fake
def _(logp, old_logp, advantages, weights, clip_low, clip_high, dual_clip, backend):
    return _fake_loss_stats(logp, len(POLICY_STATS))


@ppo_value_loss_op.register_fake
def _(values, old_values, returns, weights, clip, backend):
    return _fake_loss_stats(values, 1)


@ppo_policy_loss_backward_op.register_fake
def _(grad_loss, logp, *args):
    return torch.empty_like(logp, memory_format=torch.contiguous_format)


@ppo_value_loss_backward_op.register_fake
def _(grad_loss, values, *args):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


def _loss_setup(ctx, inputs, output):
    """Saves the tensor inputs (alive anyway: the caller's) and the rest; nothing [B, T] is allocated for backward."""
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    x, y, z, weights, *ctx.args = inputs
    ctx.save_for_backward(x, y, z, weights)
    ctx.n_inputs = len(inputs)


def _policy_loss_grad(ctx, grad_loss, _grad_stats):
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    return (ppo_policy_loss_backward_op(grad_loss, *ctx.saved_tensors, *ctx.args),) + (None,) * (ctx.n_inputs - 1)


def _value_loss_grad(ctx, grad_loss, _grad_stats):
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    return (ppo_value_loss_backward_op(grad_loss, *ctx.saved_tensors, *ctx.args),) + (None,) * (ctx.n_inputs - 1)


ppo_policy_loss_op.register_autograd(_policy_loss_grad, setup_context=_loss_setup)
ppo_value_loss_op.register_autograd(_value_loss_grad, setup_context=_loss_setup)


# ---------------------------------------------------------------------------------------------------------------
# Stats: plain PyTorch on [B, T] / [N] vectors, no host synchronisation.
# ---------------------------------------------------------------------------------------------------------------


def _nonzero_or_one(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def _masked_mean(x: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    return torch.where(mask, x.float(), 0.0).sum() / count


def _policy_stats(logp, old_logp, ratio, clipped, dual, mask) -> dict[str, Tensor]:
    with torch.no_grad():
        count = _nonzero_or_one(mask.float().sum())
        return {
            "clip_frac": clipped.float().sum() / count,
            "dual_clip_frac": dual.float().sum() / count,
            "approx_kl": _masked_mean(kl_penalty_ref(old_logp.detach(), logp.detach(), "k3"), mask, count),
            "ratio_mean": ratio.sum() / count,
            "ratio_max": ratio.amax() if ratio.numel() > 0 else ratio.new_zeros(()),  # ratio > 0; 0 when masked
        }


# ---------------------------------------------------------------------------------------------------------------
# Public API: validation, then the ops.
# ---------------------------------------------------------------------------------------------------------------


def _number(x, name: str, low: float, high: float = math.inf, *, low_open: bool = True) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(x).__name__}")
    ok = math.isfinite(x) and (x > low if low_open else x >= low) and x < high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high})"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {x}")
    return float(x)


def _token_tensors(named: dict, shape_name: str, ref: Tensor) -> None:
    for name, x in named.items():
        _checks.float_tensor(x, name)
        _checks.same_shape(x, name, ref.shape, f"the shape of {shape_name}")
        _checks.same_device(x, name, ref, shape_name)


def _weights(weights, ref: Tensor, ref_name: str) -> Tensor:
    """[B, T] or [N] float weights of ref's shape -> float32, detached (the kernels read float32)."""
    if ref.dim() not in (1, 2):
        raise ValueError(f"{ref_name} must be [B, T] (padded) or [N] (packed), got shape {tuple(ref.shape)}")
    _token_tensors({"weights": weights}, ref_name, ref)
    return weights.detach().float()


def _clips(clip_low, clip_high, dual_clip) -> tuple[float, float, Optional[float]]:
    clip_low = _number(clip_low, "clip_low", 0.0, 1.0)
    clip_high = clip_low if clip_high is None else _number(clip_high, "clip_high", 0.0)
    dual_clip = None if dual_clip is None else _number(dual_clip, "dual_clip", 1.0)
    return clip_low, clip_high, dual_clip


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, *, clip_low: float = 0.2,
                    clip_high: Optional[float] = None, dual_clip: Optional[float] = None
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss (asymmetric clip, optional dual clip), ``sum_t w_t * policy_t``.

    logp, old_logp, advantages: [B, T] (padded) or [N] (packed), float32/bf16/fp16; weights: same shape, the loss
    weights of ``loss_weights`` (0 = masked; read as float32). clip_low in (0, 1); clip_high > 0 (None: clip_low);
    dual_clip > 1 or None.
    -> (loss: 0-d float32, differentiable w.r.t. logp; stats: dict of 0-d float32 tensors ``clip_frac``,
    ``dual_clip_frac``, ``approx_kl`` (mean of k3 with d = logp - old_logp, i.e. (ratio - 1) - log ratio),
    ``ratio_mean``, ``ratio_max``: plain means over the tokens with w != 0; 0 when none).
    Backends: cpp (CPU), triton (CUDA), torch (any device); one fused pass. Formulas: docs/formulas.md.
    """
    _checks.float_tensor(logp, "logp")
    _token_tensors({"old_logp": old_logp, "advantages": advantages}, "logp", logp)
    w = _weights(weights, logp, "logp")
    clip_low, clip_high, dual_clip = _clips(clip_low, clip_high, dual_clip)
    backend = _backend.select("ppo_policy_loss", TOKEN_LOSS_BACKENDS, logp.device)
    loss, stats = ppo_policy_loss_op(logp, old_logp.detach(), advantages.detach(), w, clip_low, clip_high, dual_clip,
                                     backend)
    return loss, dict(zip(POLICY_STATS, stats.unbind()))


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, weights: Tensor, *,
                   clip: Optional[float] = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``sum_t w_t * 0.5 * max((v - R)^2, (v_old + clamp(v - v_old, -clip, clip) - R)^2)``.

    values, old_values, returns: [B, T] or [N], float32/bf16/fp16; weights: same shape (``loss_weights``; 0 =
    masked); clip > 0, or None for the unclipped 0.5 * (v - R)^2.
    -> (loss: 0-d float32, differentiable w.r.t. values; stats: {``clip_frac``: fraction of the tokens with w != 0
    where the clipped term is taken and its clamp is active}). Backends as ppo_policy_loss.
    """
    _checks.float_tensor(values, "values")
    _token_tensors({"old_values": old_values, "returns": returns}, "values", values)
    w = _weights(weights, values, "values")
    clip = None if clip is None else _number(clip, "clip", 0.0)
    backend = _backend.select("ppo_value_loss", TOKEN_LOSS_BACKENDS, values.device)
    loss, stats = ppo_value_loss_op(values, old_values.detach(), returns.detach(), w, clip, backend)
    return loss, {"clip_frac": stats[0]}


def _sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, seq_ids: Optional[Tensor], reduce: str
                        ) -> Tensor:
    """Per token, the "mean" (GSPO) or "sum" (VESPO, of the log-ratios clamped to [-20, 20]) of logp - old_logp
    over its sequence's tokens with mask; float32, logp's shape, differentiable w.r.t. logp. Sequences: rows of
    [B, T], or seq_ids for [N]."""
    lr = torch.where(mask, logp.float() - old_logp.float(), 0.0)
    if reduce == "sum":
        lr = lr.clamp(-20.0, 20.0)
    if seq_ids is None:
        total, count = lr.sum(-1, keepdim=True), mask.float().sum(-1, keepdim=True)
        out = total if reduce == "sum" else total / count.clamp_min(1.0)
        return out.expand_as(lr)
    ids = torch.unique(seq_ids, return_inverse=True)[1].reshape(seq_ids.shape)
    n = int(ids.max()) + 1 if ids.numel() else 0
    total = lr.new_zeros(n).index_add(0, ids, lr)
    if reduce == "mean":
        total = total / lr.new_zeros(n).index_add(0, ids, mask.float()).clamp_min(1.0)
    return total[ids]


def _policy_variant(loss_type: str, ratio_level: str, clip_high: Optional[float], dual_clip: Optional[float],
                   sapo_tau, vespo_k, vespo_lambda) -> tuple[str, str, Optional[list[float]]]:
    """Validated policy-loss options of ``ppo_objective`` (and ``linear_ppo_loss``) -> (loss_type, ratio_level,
    loss_params of ``_variant_terms``)."""
    loss_type = _checks.choice(loss_type, "loss_type", POLICY_LOSS_TYPES)
    ratio_level = _checks.choice(ratio_level, "ratio_level", RATIO_LEVELS)
    if loss_type == "vespo" and ratio_level == "sequence":
        raise ValueError("loss_type='vespo' weights by the sequence's ratio already: ratio_level must be 'token'")
    if loss_type == "cispo" and clip_high is None:
        raise ValueError("loss_type='cispo' needs clip_high, the cap on the ratio (TRL's epsilon_high, e.g. 5.0)")
    if loss_type != "ppo" and dual_clip is not None:
        raise ValueError(f"dual_clip is for loss_type='ppo', got loss_type={loss_type!r}")
    params = None
    if loss_type == "sapo":
        params = [_number(t, "sapo_tau", 0.0) for t in sapo_tau]
    elif loss_type == "vespo":  # (k_pos, lambda_pos, k_neg, lambda_neg)
        params = [_number(x, name, 0.0, low_open=False) for pair in zip(vespo_k, vespo_lambda)
                  for x, name in zip(pair, ("vespo_k", "vespo_lambda"))]
    return loss_type, ratio_level, params


def _variant_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, seq_ids: Optional[Tensor], loss_type: str,
                       ratio_level: str) -> Optional[Tensor]:
    """The log of the ratio every token of a sequence takes when it is not the token's own: VESPO's clamped
    sequence sum (a constant: no gradient), GSPO's sequence mean (gradient through the mean); None when the ratio
    is per token. Sequences as ``_sequence_log_ratio``."""
    if loss_type == "vespo":
        return _sequence_log_ratio(logp.detach(), old_logp, mask, seq_ids, "sum").clamp(math.log(1e-8), 20.0)
    if ratio_level == "sequence":
        return _sequence_log_ratio(logp, old_logp, mask, seq_ids, "mean")
    return None


def ppo_objective(logp: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, *,
                  entropy: Optional[Tensor] = None, ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0,
                  kl_kind: str = "k3", entropy_coef: float = 0.0, clip_low: float = 0.2,
                  clip_high: Optional[float] = None, dual_clip: Optional[float] = None, loss_type: str = "ppo",
                  ratio_level: str = "token", seq_ids: Optional[Tensor] = None,
                  sapo_tau: tuple[float, float] = (1.0, 1.05), vespo_k: tuple[float, float] = (2.0, 3.0),
                  vespo_lambda: tuple[float, float] = (3.0, 2.0)) -> tuple[Tensor, dict[str, Tensor]]:
    """THE PPO objective: ``sum_t w_t * (policy_t + kl_coef * k_t - entropy_coef * entropy_t)``.

    logp, old_logp, advantages, weights, entropy, ref_logp: [B, T] or [N], float32/bf16/fp16 (weights: those of
    ``loss_weights``, 0 = masked). k_t = ``kl_penalty(logp, ref_logp, kl_kind)``, kl_kind in k1, k2, k3, abs
    (ref_logp is required when kl_coef != 0); entropy is required when entropy_coef != 0.
    -> (loss: 0-d float32, differentiable w.r.t. logp and entropy; stats: those of ``ppo_policy_loss``, plus ``kl``
    (mean of k) when ref_logp is given and ``entropy`` (mean) when entropy is given; plain means over the tokens with
    w != 0). Formulas: docs/formulas.md.

    The policy term (TRL 1.16's GRPO loss types, docs/formulas.md "Losses"), with r the importance ratio:
      - ``loss_type="ppo"``: PPO-clip as above (TRL's grpo / bnpo / dr_grpo / dapo / luspo; those differ only in
        the weights, i.e. the aggregation), clip_low / clip_high / dual_clip as ``ppo_policy_loss``.
      - ``"cispo"`` (MiniMax-M1): ``-sg(min(r, clip_high)) * A * logp``; clip_high is the cap on the ratio itself
        (TRL's epsilon_high, e.g. 5.0) and must be given.
      - ``"sapo"``: ``-A * 4 / tau * sigmoid(tau * (r - 1))``, tau = sapo_tau[0] where A > 0 else sapo_tau[1].
      - ``"vespo"``: ``-sg(phi(w)) * A * logp``, w = exp(clamp(sum over the sequence of clamp(logp - old_logp, -20,
        20), log 1e-8, 20)), ``phi(w) = exp(lam + k log w - lam w)``, (k, lam) = (vespo_k[0], vespo_lambda[0]) where
        A >= 0 else (vespo_k[1], vespo_lambda[1]).
    ``ratio_level="sequence"`` (GSPO; with ``loss_type="ppo"`` and "seq-mean-token-sum" weights: LUSPO) takes for
    every token of a sequence r = exp(mean over the sequence's tokens (w != 0) of logp - old_logp), gradient
    included; vespo is sequence-level by definition and takes ratio_level="token". Sequences: the rows of [B, T]
    input, or ``seq_ids`` (int64 [N], the sequence of each token) for packed [N] input. Stats: clip_frac counts the
    clamped ratios (cispo: r > clip_high; 0 for sapo and vespo), ratio_* are over the per-token r.
    """
    _checks.float_tensor(logp, "logp")
    _token_tensors({"old_logp": old_logp, "advantages": advantages}, "logp", logp)
    loss_type, ratio_level, params = _policy_variant(loss_type, ratio_level, clip_high, dual_clip, sapo_tau, vespo_k,
                                                     vespo_lambda)
    sequence_level = ratio_level == "sequence" or loss_type == "vespo"
    if sequence_level and logp.dim() == 1 and seq_ids is None:
        raise ValueError(f"loss_type={loss_type!r} with ratio_level={ratio_level!r} on packed [N] input needs "
                         "seq_ids (the sequence id of each token)")
    if sequence_level and seq_ids is not None:
        _checks.tensor(seq_ids, "seq_ids")
        _checks.same_shape(seq_ids, "seq_ids", logp.shape, "the shape of logp")
    for name, x in (("entropy", entropy), ("ref_logp", ref_logp)):
        if x is not None:
            _token_tensors({name: x}, "logp", logp)
    w = _weights(weights, logp, "logp")
    if loss_type == "cispo":
        clip_high = _number(clip_high, "clip_high", 0.0)
    clip_low, clip_high, dual_clip = _clips(clip_low, clip_high, dual_clip)
    _checks.choice(kl_kind, "kl_kind", KL_KINDS)
    kl_coef = _number(kl_coef, "kl_coef", 0.0, low_open=False)
    entropy_coef = _number(entropy_coef, "entropy_coef", -math.inf)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference policy's log-probs of the labels)")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy (the policy's per-token entropy)")

    m = w != 0
    old_logp = old_logp.detach()
    ref_logp = None if ref_logp is None else ref_logp.detach()
    log_ratio = _variant_log_ratio(logp, old_logp, m, seq_ids, loss_type, ratio_level)
    loss_tok, ratio, clipped, dual = ppo_token_loss_op(
        logp, entropy if entropy_coef != 0.0 else None, old_logp, advantages.detach(),
        ref_logp if kl_coef != 0.0 else None, m, clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef,
        log_ratio, loss_type, params)
    stats = _policy_stats(logp, old_logp, ratio, clipped, dual, m)
    with torch.no_grad():
        count = _nonzero_or_one(m.float().sum())
        if ref_logp is not None:
            stats["kl"] = _masked_mean(kl_penalty_ref(logp.detach(), ref_logp, kl_kind), m, count)
        if entropy is not None:
            stats["entropy"] = _masked_mean(entropy.detach(), m, count)
    return (w * loss_tok).sum(), stats  # loss_tok is 0 where w is: a masked token adds exactly 0


def ppo_loss_from_logits(logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, *,
                         ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0, kl_kind: str = "k3",
                         entropy_coef: float = 0.0, temperature: float = 1.0, clip_low: float = 0.2,
                         clip_high: Optional[float] = None, dual_clip: Optional[float] = None
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    """``ppo_objective`` on the log-probs (and entropy) of the labels, computed from the logits by the fused op.

    logits: [B, T, V] (padded) or [N, V] (packed), float32/bf16/fp16; labels: int64 [B, T] / [N], in [0, V) or -100
    (positions whose weight should be 0 anyway); old_logp, advantages, weights, ref_logp: [B, T] / [N].
    ``logp = log softmax(logits / temperature)[label]``, entropy at ``temperature`` (computed only when
    entropy_coef != 0). The logits are read once forward, and their gradient is written in one pass backward.
    -> (loss: 0-d float32, differentiable w.r.t. logits; stats: those of ``ppo_objective``).
    """
    _checks.logits(logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, T, V] (padded) or [N, V] (packed), got shape {tuple(logits.shape)}")
    _checks.tensor(labels, "labels")
    _checks.same_shape(labels, "labels", logits.shape[:-1], "logits.shape[:-1]")
    _token_tensors({"old_logp": old_logp, "advantages": advantages, "weights": weights}, "labels", labels)
    if ref_logp is not None:
        _token_tensors({"ref_logp": ref_logp}, "labels", labels)
    _checks.choice(kl_kind, "kl_kind", KL_KINDS)
    entropy_coef = _number(entropy_coef, "entropy_coef", -math.inf)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference policy's log-probs of the labels)")
    _clips(clip_low, clip_high, dual_clip)  # before the log-prob kernel runs
    if entropy_coef != 0.0:
        logp, ent = logprobs_and_entropy(logits, labels, temperature=temperature, ignore_index=IGNORE_INDEX)
    else:  # the log-prob op then skips the entropy sums
        logp, ent = logprobs(logits, labels, temperature=temperature, ignore_index=IGNORE_INDEX), None
    return ppo_objective(logp, old_logp, advantages, weights, entropy=ent, ref_logp=ref_logp, kl_coef=kl_coef,
                         kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high,
                         dual_clip=dual_clip)
