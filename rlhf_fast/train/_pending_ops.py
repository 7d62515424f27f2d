"""TEMPORARY plain-PyTorch stand-ins for ops being written on other branches (advantages,
sampling). Each name is taken from rlhf_fast when the real op exists; delete this file once every
op below is merged. The trainers import these names from here only."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import rlhf_fast
from rlhf_fast import kl_penalty


def _real(name):
    return getattr(rlhf_fast, name, None)


def _masked_mean(x, mask, dim=None):
    m = mask.float()
    return (x * m).sum() / m.sum().clamp(min=1) if dim is None else (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def _masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    m = mask.bool()
    mean = _masked_mean(x, m)
    n = m.sum().clamp(min=2)
    var = (((x - mean) ** 2) * m).sum() / (n - 1)
    out = (x - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0)


def _gae(rewards, values, mask, *, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    next_v = torch.zeros(B)
    a = torch.zeros(B)
    m = mask.bool()
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a_t = delta + gamma * lam * a
        next_v = torch.where(m[:, t], values[:, t], next_v)
        a = torch.where(m[:, t], a_t, a)
        adv[:, t] = a_t * m[:, t]
    return adv, (adv + values) * m


def _group_advantages(scores, group_size, *, mode="grpo"):
    s = scores.float().view(-1, group_size)
    if mode == "grpo":
        out = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)
    elif mode == "dr_grpo":
        out = s - s.mean(1, keepdim=True)
    else:
        out = s - (s.sum(1, keepdim=True) - s) / (group_size - 1)
    return out.view(-1)


def _sample_ref(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    logp = torch.log_softmax(logits.float() / max(temperature, 1e-6), -1)
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        tok = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


@torch.no_grad()
def _generate(model, input_ids, attention_mask, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
              eos_token_id=None, pad_token_id=0, generator=None):
    B = input_ids.shape[0]
    mask = attention_mask.clone()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool)
    toks, lps, rmask = [], [], []
    for _ in range(max_new_tokens):
        tok, lp = _sample_ref(logits, temperature=temperature, generator=generator)
        tok = torch.where(done, pad_token_id, tok)
        toks.append(tok), lps.append(torch.where(done, 0.0, lp)), rmask.append(~done)
        if eos_token_id is not None:
            done = done | (tok == eos_token_id)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    seq = torch.cat([input_ids, torch.stack(toks, 1)], 1)
    return SimpleNamespace(sequences=seq, response_mask=torch.stack(rmask, 1).long(), logprobs=torch.stack(lps, 1))


gae = _real("gae") or _gae
masked_whiten = _real("masked_whiten") or _masked_whiten
masked_mean = _real("masked_mean") or _masked_mean
group_advantages = _real("group_advantages") or _group_advantages
generate = _real("generate") or _generate
