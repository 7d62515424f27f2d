"""Per-token log-probs (and entropy) of a 🤗 transformers causal LM, via the fused lm_head op.

``sequence_logprobs`` runs the decoder body, keeps only the positions that are scored, and applies
``rlhf_fast.ops.linear_logprobs`` with the model's output-embedding weight: the lm_head is never run on the
padded or ignored positions, and the [B, T, V] logits never exist. ``sequence_cross_entropy`` is the SFT loss on
the same positions, with ``rlhf_fast.ops.linear_cross_entropy``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import _checks
from ..ops.linear_cross_entropy import linear_cross_entropy
from ..ops.linear_logprobs import linear_logprobs

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


def shift_labels(input_ids: Tensor, attention_mask: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """Next-token labels aligned with positions: ``labels[:, t] = input_ids[:, t + 1]``.

    input_ids: [B, T] int64; attention_mask: [B, T] (1 = real token) or None -> labels [B, T] int64, with
    ``ignore_index`` at the last position and wherever the next token is padding (attention_mask[:, t + 1] == 0).
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        labels[:, :-1].masked_fill_(attention_mask[:, 1:] == 0, ignore_index)
    return labels


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


def _scored_positions(caller: str, model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor],
                      labels: Tensor, ignore_index: int):
    """Runs the decoder body; returns (hidden [M, H], weight, bias, labels [M], index [M]) for the M positions whose
    label is scored and not padding (index into the flattened [B * T])."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    problem = _unsupported_head(model)
    if problem is not None:
        raise ValueError(f"{caller} does not support {type(model).__name__}: {problem}; use the model's "
                         "own forward().logits with rlhf_fast.logprobs instead")
    _checks.tensor(input_ids, "input_ids")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    _checks.tensor(labels, "labels")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 (torch.long), got {labels.dtype}")
    _checks.same_shape(labels, "labels", input_ids.shape, "the shape of input_ids")
    if attention_mask is not None:
        _checks.tensor(attention_mask, "attention_mask")
        _checks.same_shape(attention_mask, "attention_mask", input_ids.shape, "the shape of input_ids")
    body = model.get_decoder()
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # [B, T, H]
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):  # what nn.Linear would compute in
        dtype = torch.get_autocast_dtype(hidden.device.type)
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    hidden = hidden.to(weight.dtype)

    scored = labels != ignore_index
    if attention_mask is not None:
        scored &= attention_mask.to(torch.bool)
    index = scored.reshape(-1).nonzero().squeeze(1)  # [M]: the only positions sent to the head
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    return flat_hidden, weight, bias, labels.reshape(-1).index_select(0, index), index


def sequence_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor, *,
                      temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False):
    """Log-prob of ``labels[:, t]`` under the model's next-token distribution at position t, for a causal LM.

    Labels convention: labels are aligned with positions, i.e. already shifted: ``labels[:, t]`` is the token
    predicted at position t (from ``input_ids[:, :t + 1]``), usually ``input_ids[:, t + 1]`` — build them with
    ``shift_labels(input_ids, attention_mask)`` and set prompt positions to ``ignore_index`` to score only the
    response. The result at t equals ``log_softmax(model(input_ids, attention_mask).logits[:, t] / temperature)``
    at ``labels[:, t]``.

    model: a 🤗 transformers causal LM (``get_decoder()`` body + ``get_output_embeddings()`` nn.Linear, tied or
    untied); input_ids: [B, T] int64; attention_mask: [B, T] (1 = real token, 0 = padding, left or right) or None;
    labels: [B, T] int64 in [0, V) or ``ignore_index``.
    Returns logp [B, T] float32, 0 where labels == ignore_index or attention_mask == 0 (those positions never reach
    the lm_head); with ``return_entropy`` the tuple (logp, entropy), entropy 0 at the same positions.
    Differentiable w.r.t. the model parameters. Selecting the scored positions reads the mask (one host sync).
    Models whose head transforms the logits (final-logit softcapping, logit scaling) raise ValueError.
    """
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    flat_hidden, weight, bias, flat_labels, index = _scored_positions("sequence_logprobs", model, input_ids,
                                                                      attention_mask, labels, ignore_index)
    out = linear_logprobs(flat_hidden, weight, flat_labels, bias=bias, temperature=temperature,
                          ignore_index=ignore_index, return_entropy=return_entropy)

    def scatter(values: Tensor) -> Tensor:
        return values.new_zeros(labels.numel()).index_copy(0, index, values).view(labels.shape)

    if return_entropy:
        return scatter(out[0]), scatter(out[1])
    return scatter(out)


def sequence_cross_entropy(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor, *,
                           temperature: float = 1.0, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of the scored labels (the SFT loss): -mean of ``sequence_logprobs`` over the
    positions whose label is not ``ignore_index`` and not padding, computed by ``linear_cross_entropy`` (gradients
    formed in the forward: 3 GEMMs over the vocabulary instead of 4). Same arguments and labels convention as
    ``sequence_logprobs``; returns a float32 scalar (0 when nothing is scored)."""
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    flat_hidden, weight, bias, flat_labels, _ = _scored_positions("sequence_cross_entropy", model, input_ids,
                                                                  attention_mask, labels, ignore_index)
    return linear_cross_entropy(flat_hidden, weight, flat_labels, bias=bias, temperature=temperature,
                                ignore_index=ignore_index)
