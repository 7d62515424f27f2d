"""Turning rows into token ids: packed ``TokenBatch``es for training, left-padded prompts for generation.

Layout: a prompt gets the tokenizer's BOS (when it has one) in front; a response gets EOS appended. A sequence
longer than ``max_len`` loses prompt tokens from the left, then response tokens from the right.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..batch import IGNORE_INDEX, TokenBatch

__all__ = ["IGNORE_INDEX", "TokenBatch", "sft_batch", "pair_batch", "prompt_batch", "fit"]


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation as prompt text, ready for the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def prompt_text(tokenizer, row: dict) -> str:
    return row["prompt"] if "prompt" in row else chat_prompt(tokenizer, row["messages"][:-1] if
                                                             row["messages"][-1]["role"] == "assistant"
                                                             else row["messages"])


def completion_text(row: dict) -> str:
    return row["completion"] if "completion" in row else row["messages"][-1]["content"]


def encode_prompt(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids


def encode_response(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    rows = [([value] * (T - len(s)) + s) if left else (s + [value] * (T - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def fit(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Prompt and response cut to ``max_len`` tokens in all: the prompt loses tokens from the left first (its end
    is what the response follows), then the response from the right; at least one prompt token stays."""
    room = max(1, max_len - len(response))
    prompt = prompt[-room:]
    return prompt, response[:max_len - len(prompt)]


def warn_truncation(tokenizer, rows: list[dict], max_len: int, response_keys: Optional[tuple] = None) -> int:
    """Warns once, with counts, when rows do not fit ``max_len`` (``fit`` then cuts their prompts from the left, and
    their responses where the prompt alone cannot give enough room). The responses are ``completion_text(row)`` or
    ``row[k]`` for each of ``response_keys`` (preference pairs; then also when a pair's responses tokenize the same,
    say from words the tokenizer does not know: such a pair has no preference to learn). -> the number of rows cut."""
    cut = cut_response = same = 0
    for row in rows:
        prompt = encode_prompt(tokenizer, prompt_text(tokenizer, row))
        responses = [completion_text(row)] if response_keys is None else [row[k] for k in response_keys]
        tokens = [encode_response(tokenizer, r) for r in responses]
        lens = [len(t) for t in tokens]
        cut += len(prompt) + max(lens) > max_len
        cut_response += max(lens) > max_len - 1  # fit keeps one prompt token
        same += len(tokens) > 1 and all(t == tokens[0] for t in tokens[1:])
    if cut:
        warnings.warn(f"{cut} of {len(rows)} rows are longer than max_len={max_len} tokens: their prompts lose tokens "
                      f"from the left{f', and {cut_response} responses are cut at the end' if cut_response else ''}; "
                      "raise max_len to keep them whole", stacklevel=2)
    if same:
        unk = f" (the unknown-word token is {tokenizer.unk_token!r})" if tokenizer.unk_token else ""
        warnings.warn(f"{same} of {len(rows)} pairs have {' and '.join(response_keys)} responses that tokenize to the "
                      f"same tokens{unk}: they carry no preference (zero margin, no gradient); check the data "
                      "against the model's tokenizer", stacklevel=2)
    return cut


def sft_batch(tokenizer, rows: list[dict], max_len: int) -> TokenBatch:
    """-> a packed TokenBatch of prompt + response (+ EOS) whose targets are the response tokens."""
    seqs, prompt_lens = [], []
    for row in rows:
        p, r = fit(encode_prompt(tokenizer, prompt_text(tokenizer, row)),
                   encode_response(tokenizer, completion_text(row)), max_len)
        seqs.append(p + r)
        prompt_lens.append(len(p))
    return TokenBatch.pack(seqs, prompt_lens)


def pair_batch(tokenizer, rows: list[dict], max_len: int) -> TokenBatch:
    """-> a packed TokenBatch of 2B sequences: the B chosen ones, then the B rejected ones."""
    seqs, prompt_lens = [], []
    for key in ("chosen", "rejected"):
        for row in rows:
            p, r = fit(encode_prompt(tokenizer, prompt_text(tokenizer, row)), encode_response(tokenizer, row[key]),
                       max_len)
            seqs.append(p + r)
            prompt_lens.append(len(p))
    return TokenBatch.pack(seqs, prompt_lens)


def prompt_batch(tokenizer, rows: list[dict], max_len: int) -> dict:
    """-> left-padded input_ids, attention_mask [B, P] for generation (the prompt's last ``max_len`` tokens)."""
    seqs = [encode_prompt(tokenizer, prompt_text(tokenizer, row))[-max_len:] for row in rows]
    return {"input_ids": pad(seqs, tokenizer.pad_token_id, left=True),
            "attention_mask": pad([[1] * len(s) for s in seqs], 0, left=True)}
