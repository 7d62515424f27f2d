"""Loading 🤗 transformers checkpoints from local directories (nothing is fetched from a hub)."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer


def attn_implementation(device: torch.device) -> str:
    """FlashAttention-2 on CUDA when flash-attn is installed (packed batches then run varlen), SDPA otherwise."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_tokenizer(path: str):
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, device: torch.device | str = "cpu"):
    """AutoModelForCausalLM from a local directory, in float32 on ``device``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    device = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                 attn_implementation=attn_implementation(device))
    return model.to(device)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of ``model`` set to 0 (nn.Dropout modules and the attention-probability dropout that 🤗
    attention modules keep as a float), so its training forward computes what its eval forward does."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model
