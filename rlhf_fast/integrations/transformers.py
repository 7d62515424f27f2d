"""🤗 transformers: per-token log-probs (and entropy) of a causal LM without materializing its [B, T, V] logits.

    from rlhf_fast.integrations.transformers import patch_causal_lm
    model = patch_causal_lm(AutoModelForCausalLM.from_pretrained(path))
    logp = model.rlhf_logprobs(input_ids, attention_mask)             # [B, T] float32, position t scores token t+1
    logp, entropy = model.rlhf_logprobs(input_ids, attention_mask, labels, return_entropy=True)

``patch_causal_lm`` adds one method, ``model.rlhf_logprobs``; ``forward`` and everything else are untouched. It takes
the padded batches of the host trainer (``rlhf_fast.models.sequence_logprobs`` is its packed counterpart): it runs the
decoder to its last hidden states exactly as ``forward`` does, keeps the scored positions only, and sends them with the lm_head weight through ``rlhf_fast.ops.linear_logprobs``, which
computes the logits chunk by chunk and keeps none of them (forward or backward).

Supported families (their logits are exactly ``lm_head(hidden)``): Llama, Mistral, Qwen2, GPT-2. Other
architectures, and those that post-process their logits (soft-capping, scaling), raise a ValueError.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch import Tensor

__all__ = ["SUPPORTED_MODEL_TYPES", "patch_causal_lm"]

# config.model_type of the families whose logits are lm_head(last_hidden_state) with nothing after it
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


def _decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Linear]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"patch_causal_lm: model_type {model_type!r} ({type(model).__name__}) is not supported; supported "
            f"families: {', '.join(SUPPORTED_MODEL_TYPES)}. Compute logits with model(...) and use "
            "rlhf_fast.logprobs instead."
        )
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(decoder, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"patch_causal_lm: {type(model).__name__} is not a causal LM with a decoder and a linear lm_head "
            "(pass the *ForCausalLM / *LMHeadModel, not the bare decoder)"
        )
    return decoder, head


def _rlhf_logprobs(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                   *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False):
    """Log-prob of ``labels[:, t]`` under the next-token distribution at position t (``rlhf_fast.models``' convention).

    input_ids, attention_mask: [B, T]; labels: [B, T] int64, already aligned with positions (``labels[:, t]`` is the
    token predicted at t, usually ``input_ids[:, t + 1]``); default ``shift_labels(input_ids, attention_mask)``, i.e.
    every next token, ``ignore_index`` at the last position and before padding. Set prompt positions to
    ``ignore_index`` to score the response only: those positions never reach the lm_head.
    Returns logp [B, T] float32 (0 where labels == ignore_index or attention_mask == 0), equal to
    ``log_softmax(model(input_ids, attention_mask).logits / temperature).gather(-1, labels)`` there; with
    ``return_entropy=True`` the tuple (logp, entropy). Differentiable w.r.t. every parameter.
    """
    from ..ops import _checks, linear_logprobs  # noqa: PLC0415

    decoder, head = _decoder_and_head(self)
    _checks.tensor(input_ids, "input_ids")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        _checks.same_shape(attention_mask, "attention_mask", input_ids.shape, "the shape of input_ids")
    if labels is None:
        labels = shift_labels(input_ids, attention_mask, ignore_index)
    _checks.same_shape(labels, "labels", input_ids.shape, "the shape of input_ids")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 (torch.long), got {labels.dtype}")
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):  # what nn.Linear would compute in
        dtype = torch.get_autocast_dtype(hidden.device.type)
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    scored = labels != ignore_index
    if attention_mask is not None:
        scored &= attention_mask.to(torch.bool)
    index = scored.reshape(-1).nonzero().squeeze(1)  # the only positions sent to the head
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index).to(weight.dtype)
    out = linear_logprobs(flat, weight, labels.reshape(-1).index_select(0, index), bias=bias,
                          temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy)

    def scatter(values: Tensor) -> Tensor:
        return values.new_zeros(labels.numel()).index_copy(0, index, values).view(labels.shape)

    return (scatter(out[0]), scatter(out[1])) if return_entropy else scatter(out)


def shift_labels(input_ids: Tensor, attention_mask: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """Next-token labels aligned with positions: ``labels[:, t] = input_ids[:, t + 1]``, ``ignore_index`` at the last
    position and wherever the next token is padding (attention_mask[:, t + 1] == 0)."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        labels[:, :-1].masked_fill_(attention_mask[:, 1:] == 0, ignore_index)
    return labels


def patch_causal_lm(model):
    """Add ``model.rlhf_logprobs(input_ids, attention_mask=None, labels=None, *, temperature=1.0, ignore_index=-100,
    return_entropy=False)`` to a 🤗 causal LM (Llama, Mistral, Qwen2, GPT-2 families) and return
    the model. Raises ValueError for other architectures. Idempotent; ``forward`` is not changed.
    """
    _decoder_and_head(model)
    model.rlhf_logprobs = types.MethodType(_rlhf_logprobs, model)
    return model
