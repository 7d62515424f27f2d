"""Batched rollout generation for 🤗 transformers causal LMs with a KV cache and rlhf_fast's sampler, returning the
behaviour log-probs of the generated tokens (so PPO need not recompute them).

Host synchronisation: the decode loop reads nothing back from the device except the "have all rows stopped?" check,
made every step on CPU (where it costs nothing) and every ``DONE_CHECK_EVERY`` steps on other devices, so up to
DONE_CHECK_EVERY - 1 steps may run after the last row stopped; the output is trimmed to the steps in which some row
was still generating (one read at the end).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .ops.sampling import sample

DONE_CHECK_EVERY = 8  # steps between "all rows stopped?" checks off CPU (each one synchronises with the host)


class GenerateOutput(NamedTuple):
    """The rollout of ``generate``: B prompts of P (left-padded) tokens, N generated steps (N <= max_new_tokens)."""

    sequences: Tensor  # [B, P + N] int64: the prompt as given, then the response; pad_token_id after a row's EOS
    response_mask: Tensor  # [B, N], dtype of attention_mask: 1 on generated tokens (the EOS included), 0 after
    logprobs: Tensor  # [B, N] float32: behaviour log-prob of each generated token (temperature-scaled, unfiltered)


def _cache_keyword(model) -> str:
    """transformers >= 5 calls the KV cache argument ``cache``; earlier versions ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(eos_token_id, device) -> Optional[Tensor]:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise TypeError(f"eos_token_id must be an int, a non-empty list of ints or None, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.int64, device=device)


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: Union[float, Tensor] = 1.0,
    top_k: Union[int, Tensor] = 0,
    top_p: Union[float, Tensor] = 1.0,
    min_p: Union[float, Tensor] = 0.0,
    eos_token_id: Union[int, Sequence[int], None],
    pad_token_id: int,
    generator: Optional[torch.Generator] = None,
) -> GenerateOutput:
    """Samples up to ``max_new_tokens`` tokens after each prompt with ``rlhf_fast.sample`` and a KV cache.

    model: a 🤗 transformers causal LM (``model(input_ids, attention_mask, position_ids, cache/past_key_values,
    use_cache=True).logits``). input_ids [B, P] int64, attention_mask [B, P] (0/1): prompts LEFT-padded, each with at
    least one token. temperature / top_k / top_p / min_p: as in ``rlhf_fast.sample`` (numbers or per-row [B] tensors;
    temperature 0 is greedy). A row stops after it emits a token of ``eos_token_id`` (an int, a list of ints, or None
    for no stop token); the batch runs until every row stopped or ``max_new_tokens``. -> GenerateOutput.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise TypeError("input_ids must be an int64 tensor [B, P]")
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids are on {input_ids.device}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")
    mask = attention_mask.to(torch.int64)
    # one read before the loop: each row must be 0...0 1...1 (left padding) with at least one prompt token
    if bool(((mask[:, 1:] < mask[:, :-1]).any() | (mask[:, -1] != 1).any()).item()):
        raise ValueError("attention_mask must be left-padded (each row 0...0 1...1) with at least one prompt token "
                         "per row; right-padded prompts would continue after their padding")
    device = input_ids.device
    eos = _eos_ids(eos_token_id, device)
    B, P = input_ids.shape
    N = max_new_tokens

    full_mask = attention_mask.new_zeros(B, P + N)
    full_mask[:, :P] = attention_mask
    tokens = torch.full((B, N), pad_token_id, dtype=torch.int64, device=device)
    logprobs = torch.zeros(B, N, dtype=torch.float32, device=device)
    response_mask = attention_mask.new_zeros(B, N)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    cache_kw = _cache_keyword(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # pad positions get 0; they are masked out anyway
    next_position = position_ids[:, -1:] + 1
    step_input, cache = input_ids, None
    check_every = 1 if device.type == "cpu" else DONE_CHECK_EVERY
    steps = 0
    for t in range(N):
        out = model(input_ids=step_input, attention_mask=full_mask[:, : P + t], position_ids=position_ids,
                    use_cache=True, **{cache_kw: cache}, **extra)
        cache = out[cache_kw] if cache_kw in out else out.past_key_values
        token, logp = sample(out.logits[:, -1, :], temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             generator=generator)
        active = ~done
        token = torch.where(active, token, pad_token_id)
        tokens[:, t] = token
        logprobs[:, t] = torch.where(active, logp, 0.0)
        response_mask[:, t] = active
        full_mask[:, P + t] = active  # the model attends to this token from the next step on
        if eos is not None:
            done = done | torch.isin(token, eos)
        step_input, position_ids = token[:, None], next_position
        next_position = next_position + 1
        steps = t + 1
        if steps % check_every == 0 and bool(done.all()):
            break
    n = int(response_mask[:, :steps].any(0).sum())  # steps in which some row was still generating
    return GenerateOutput(torch.cat([input_ids, tokens[:, :n]], dim=1), response_mask[:, :n], logprobs[:, :n])
