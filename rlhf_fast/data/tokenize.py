"""Turning rows into token ids and padded batches.

Layout: a prompt gets the tokenizer's BOS (when it has one) in front; a response gets EOS appended. Batches are
``[B, T]`` int64 ``input_ids`` with ``attention_mask``; prompts for generation are left-padded, full sequences
right-padded (the models compute positions from the mask, so either works).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


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


def sft_batch(tokenizer, rows: list[dict], max_len: int) -> dict:
    """-> input_ids, attention_mask, labels [B, T] (labels = input_ids on response tokens, IGNORE_INDEX elsewhere)."""
    ids, labels = [], []
    for row in rows:
        p = encode_prompt(tokenizer, prompt_text(tokenizer, row))
        r = encode_response(tokenizer, completion_text(row))
        seq = (p + r)[:max_len]
        ids.append(seq)
        labels.append(([IGNORE_INDEX] * len(p) + r)[:max_len])
    input_ids = pad(ids, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": pad([[1] * len(s) for s in ids], 0),
            "labels": pad(labels, IGNORE_INDEX)}


def pair_batch(tokenizer, rows: list[dict], max_len: int) -> dict:
    """-> input_ids, attention_mask [2B, T]: the B chosen sequences, then the B rejected ones."""
    seqs = []
    for key in ("chosen", "rejected"):
        for row in rows:
            seqs.append((encode_prompt(tokenizer, row["prompt"]) + encode_response(tokenizer, row[key]))[:max_len])
    return {"input_ids": pad(seqs, tokenizer.pad_token_id), "attention_mask": pad([[1] * len(s) for s in seqs], 0)}


def prompt_batch(tokenizer, rows: list[dict], max_len: int) -> dict:
    """-> left-padded input_ids, attention_mask [B, P] for generation."""
    seqs = [encode_prompt(tokenizer, prompt_text(tokenizer, row))[-max_len:] for row in rows]
    return {"input_ids": pad(seqs, tokenizer.pad_token_id, left=True),
            "attention_mask": pad([[1] * len(s) for s in seqs], 0, left=True)}
