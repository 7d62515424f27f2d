"""Per-token log-probs (and entropy) of a 🤗 transformers causal LM on a packed ``rlhf_fast.batch.TokenBatch``,
via the fused lm_head ops.

``sequence_logprobs`` runs the decoder body on the packed sequences (no padding, per-sequence positions), keeps only
the target positions, and applies ``rlhf_fast.linear_logprobs`` with the model's output-embedding weight: the
lm_head never runs on other positions and the [N, V] logits never exist. ``sequence_cross_entropy`` is the SFT loss
on the same positions, with ``rlhf_fast.linear_cross_entropy``.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.linear_cross_entropy import linear_cross_entropy
from ..ops.linear_logprobs import linear_logprobs
from ..ops.linear_losses import linear_dpo_loss, linear_ppo_loss

# Config fields of heads that transform the logits after the lm_head GEMM (softcapping, scaling), with the value
# that means "no transform". A model setting any other value is refused rather than given wrong log-probs.
_HEAD_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3: cap * tanh(logits / cap)
    "logit_softcapping": None,
    "logit_scale": 1.0,  # Cohere: logits * scale
    "logits_scaling": 1.0,  # Granite: logits / scaling
    "lm_head_multiplier": 1.0,  # Falcon-H1: logits * multiplier
    "output_multiplier_scale": 1.0,
}


def _unsupported_head(model: nn.Module) -> Optional[str]:
    configs = [getattr(model, "config", None)]
    configs.append(getattr(configs[0], "text_config", None))
    for config in configs:
        if config is None:
            continue
        for field, neutral in _HEAD_TRANSFORMS.items():
            value = getattr(config, field, neutral)
            if value is not None and value != neutral:
                return f"config.{field} = {value!r} transforms the logits after the lm_head"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"its output embedding is {type(head).__name__}, not a torch.nn.Linear"
    return None


def decoder_hidden(body: nn.Module, batch) -> Tensor:
    """Last hidden states of a 🤗 decoder body (``model.get_decoder()`` or an ``AutoModel``) on a packed
    ``TokenBatch``: [N, H], one per token, each sequence attending only to itself at its own positions.

    The sequences run as the batch's ``rows()`` (FlashAttention-2: one row, varlen through the position ids; SDPA and
    eager: rows as long as the longest sequence, with the block-diagonal causal mask transformers builds from the
    restarting position ids)."""
    flash = getattr(body.config, "_attn_implementation", "") == "flash_attention_2"
    ids, pos, index = batch.rows(row_len=batch.num_tokens if flash else None)
    hidden = body(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)


HEAD_DTYPES = ("auto", "float32")


def _scored(caller: str, model: nn.Module, batch, head_dtype: str = "auto"):
    """-> (hidden [M, H], weight, bias, labels [M], index [M]) of the M positions whose label is a target, in the
    dtype the lm_head computes in: under autocast its dtype (what nn.Linear would compute in), else the weight's;
    ``head_dtype="float32"``: float32 whatever the model's dtype (an fp32 lm_head for bf16 models)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    if head_dtype not in HEAD_DTYPES:
        raise ValueError(f"head_dtype must be one of {HEAD_DTYPES}, got {head_dtype!r}")
    problem = _unsupported_head(model)
    if problem is not None:
        raise ValueError(f"{caller} does not support {type(model).__name__}: {problem}; use the model's "
                         "own forward().logits with rlhf_fast.logprobs instead")
    hidden = decoder_hidden(model.get_decoder(), batch)
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    dtype = None
    if head_dtype == "float32":
        dtype = torch.float32
    elif torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    if dtype is not None:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    index = batch.mask.nonzero().squeeze(1)  # [M]: the only positions sent to the head (one host read)
    return hidden.index_select(0, index).to(weight.dtype), weight, bias, batch.labels.index_select(0, index), index


@contextlib.contextmanager
def float32_head(model: nn.Module):
    """Inside the block the model's lm_head computes in float32 (float32 logits, autocast or not), as
    ``head_dtype="float32"`` does in ``sequence_logprobs``: the sampler then sees the trainer's head."""
    head = model.get_output_embeddings()

    def forward(x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return torch.nn.functional.linear(x.float(), head.weight.float(), bias)

    head.forward = forward
    try:
        yield model
    finally:
        del head.forward  # the class's forward again


def sequence_logprobs(model: nn.Module, batch, *, temperature: float = 1.0, return_entropy: bool = False,
                      kept_threshold: Optional[Tensor] = None, head_dtype: str = "auto"):
    """Log-prob of each target label of a packed ``TokenBatch`` under a causal LM: logp [N] float32, the log-prob
    of ``labels[t]`` (= ``input_ids[t + 1]``) at position t, 0 where ``labels == -100``; with ``return_entropy``
    the tuple (logp, entropy [N]).

    Equal to ``log_softmax(model(sequence).logits / temperature)`` of each sequence on its own, unpadded; the
    [N, V] logits never exist (``rlhf_fast.linear_logprobs`` on the target positions only). kept_threshold [N]
    (the sampler's, aligned with the labels): log-probs renormalised over the kept set {v : logit_v >= threshold}
    and the label (docs/formulas.md, "Kept-set log-probs"). head_dtype: "auto" (the model's or autocast's dtype) or
    "float32". Differentiable w.r.t. the model parameters. Models whose head transforms the logits (softcapping,
    logit scaling) raise ValueError.
    """
    hidden, weight, bias, labels, index = _scored("sequence_logprobs", model, batch, head_dtype)
    kept = None if kept_threshold is None else kept_threshold.index_select(0, index)
    with torch.autocast(hidden.device.type, enabled=False):  # the inputs are in the head's dtype already
        out = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                              return_entropy=return_entropy, kept_threshold=kept)

    def scatter(values: Tensor) -> Tensor:
        return values.new_zeros(batch.num_tokens).index_copy(0, index, values)

    return (scatter(out[0]), scatter(out[1])) if return_entropy else scatter(out)


def sequence_ppo_loss(model: nn.Module, batch, weights: Tensor, *, temperature: float = 1.0,
                      kept_threshold: Optional[Tensor] = None, head_dtype: str = "auto",
                      ref_logp: Optional[Tensor] = None, **loss_kwargs) -> tuple[Tensor, dict, Tensor]:
    """The PPO / GRPO objective of a packed rollout ``TokenBatch`` (its ``old_logp`` and ``advantages``) with per-token
    loss ``weights`` [N], by ``rlhf_fast.linear_ppo_loss`` on the target positions (gradients formed in the forward,
    3 GEMMs over the vocabulary, no logits kept): the value of ``ppo_objective`` on ``sequence_logprobs``.
    ref_logp [N] and ``loss_kwargs`` (clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef, loss_type,
    ratio_level, sapo_tau, vespo_k, vespo_lambda) as in linear_ppo_loss, a sequence's ratio over the batch's
    sequences (``batch.seq_ids``); kept_threshold and head_dtype as in ``sequence_logprobs``. -> (loss, stats,
    logp [N] float32, detached, 0 off the targets)."""
    hidden, weight, bias, labels, index = _scored("sequence_ppo_loss", model, batch, head_dtype)
    pick = lambda x: None if x is None else x.index_select(0, index)  # noqa: E731
    with torch.autocast(hidden.device.type, enabled=False):  # the inputs are in the head's dtype already
        loss, stats, logp = linear_ppo_loss(
            hidden, weight, labels, pick(batch.old_logp), pick(batch.advantages), pick(weights), bias=bias,
            temperature=temperature, ref_logp=pick(ref_logp), kept_threshold=pick(kept_threshold),
            seq_ids=pick(batch.seq_ids), return_logprobs=True, **loss_kwargs)
    return loss, stats, logp.new_zeros(batch.num_tokens).index_copy(0, index, logp)


def sequence_dpo_loss(model: nn.Module, batch, ref_chosen_logp: Tensor, ref_rejected_logp: Tensor, *,
                      nll_weights: Optional[Tensor] = None, head_dtype: str = "auto",
                      **loss_kwargs) -> tuple[Tensor, dict, Tensor]:
    """The DPO-family loss of a packed batch of P chosen then P rejected sequences (``rlhf_fast.data.pair_batch``) by
    ``rlhf_fast.linear_dpo_loss`` on the target positions (gradients formed in the forward, 3 GEMMs over the
    vocabulary, no logits kept). ref_*_logp [P]; nll_weights [N] (the RPO term's token weights; default the mean
    over the chosen response tokens); ``loss_kwargs`` (beta, loss_type, label_smoothing, simpo_gamma, nll_coef,
    pair_weights, temperature) as in linear_dpo_loss. -> (loss, stats, sequence log-probs [2P] float32, detached)."""
    if batch.num_seqs != 2 * ref_chosen_logp.shape[0]:
        raise ValueError(f"batch has {batch.num_seqs} sequences; a pair batch of P = {ref_chosen_logp.shape[0]} "
                         "pairs (ref_chosen_logp.shape[0]) has 2P: the chosen responses, then the rejected ones")
    hidden, weight, bias, labels, index = _scored("sequence_dpo_loss", model, batch, head_dtype)
    nll = None if nll_weights is None else nll_weights.index_select(0, index)
    with torch.autocast(hidden.device.type, enabled=False):  # the inputs are in the head's dtype already
        return linear_dpo_loss(hidden, weight, labels, ref_chosen_logp, ref_rejected_logp,
                               seq_ids=batch.seq_ids.index_select(0, index), nll_weights=nll, bias=bias,
                               return_sequence_logps=True, **loss_kwargs)


def sequence_cross_entropy(model: nn.Module, batch, *, weights: Optional[Tensor] = None,
                           temperature: float = 1.0) -> Tensor:
    """The SFT loss of a packed ``TokenBatch``: ``sum_t weights[t] * -logp[t]`` over its target positions (weights
    [N] float32, e.g. ``rlhf_fast.loss_weights``; None: the mean over the targets), computed by
    ``rlhf_fast.linear_cross_entropy`` (gradients formed in the forward: 3 GEMMs over the vocabulary, no logits
    kept). -> float32 scalar (0 when nothing is a target)."""
    hidden, weight, bias, labels, index = _scored("sequence_cross_entropy", model, batch)
    if weights is None:
        return linear_cross_entropy(hidden, weight, labels, bias=bias, temperature=temperature)
    return linear_cross_entropy(hidden, weight, labels, weights=weights.index_select(0, index), bias=bias,
                                temperature=temperature, reduction="sum")
