"""Loading 🤗 transformers checkpoints from local directories (nothing is fetched from a hub)."""

from __future__ import annotations

import json
import os
from typing import Optional

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


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
POSITION_KEYS = ("max_position_embeddings", "n_positions")  # Llama, Qwen2, ... | GPT-2


def check_model_dir(path: str, *, weights: bool = True, tokenizer: bool = True) -> None:
    """Raises FileNotFoundError at once (no hub lookup) unless ``path`` is a local 🤗 transformers directory with a
    config.json, and the weights / tokenizer files when asked for; the message says what is missing."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such local model directory: {path!r} (models are read from local 🤗 "
                                "transformers directories; nothing is downloaded)")
    have = set(os.listdir(path))
    missing = [] if "config.json" in have else ["config.json"]
    if weights and not have.intersection(WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if tokenizer and not have.intersection(TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    if missing:
        raise FileNotFoundError(f"{path!r} is not a complete 🤗 transformers model directory: missing "
                                + ", ".join(missing))


def position_limit(path: str) -> tuple[Optional[int], str]:
    """(the number of positions the model at ``path`` takes, the config.json key giving it), (None, "") if its
    config names none."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config = config.get("text_config") or config  # multimodal checkpoints keep the decoder's config apart
    for key in POSITION_KEYS:
        if isinstance(config.get(key), int):
            return config[key], key
    return None, ""


def load_tokenizer(path: str):
    check_model_dir(path, weights=False)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, device: torch.device | str = "cpu"):
    """AutoModelForCausalLM from a local directory, in float32 on ``device``."""
    check_model_dir(path, tokenizer=False)
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
