"""The embedded default model: a tiny Llama and a word-level tokenizer for the synthetic task, built in code and
saved in the 🤗 format, then loaded back through ``from_pretrained`` (the same path users' checkpoints take)."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..data.task import VOCAB

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
# The task needs 19 words, but a 19-row lm_head would make the embedded run nothing like an LLM's: there the head and
# everything over the vocabulary (log-probs, entropy, sampling) is a large share of an RLHF step. Reserved words pad
# the vocabulary to V / hidden ~ 43 (Llama-3-8B: 31, Qwen2.5-0.5B: 170), as real tokenizers carry reserved tokens;
# they never occur in the data, so the model must learn to give them no mass.
DEFAULT_VOCAB_SIZE = 8192


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the task's symbols (split on whitespace) plus the special tokens, padded with
    ``<reserved_i>`` words to ``vocab_size`` entries (0 = no padding)."""
    words = list(SPECIAL_TOKENS.values()) + list(VOCAB)
    if vocab_size and vocab_size < len(words):
        raise ValueError(f"vocab_size must be 0 or at least {len(words)} (the task's words), got {vocab_size}")
    words += [f"<reserved_{i}>" for i in range(max(0, vocab_size - len(words)))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIAL_TOKENS)


def build_tiny_model(tokenizer, *, hidden_size: int = 192, num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int = 768, max_positions: int = 64, seed: int = 0) -> LlamaForCausalLM:
    """A small Llama: 1.2 M parameters in the two layers, plus 2 x vocabulary x 192 in the untied embedding and head
    (4.3 M in all with the default 8192 words). Two wide layers rather than four narrow ones: on a CPU, per-layer
    Python overhead dominates at these sizes."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_default(path: str, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE, **model_kwargs) -> str:
    """Build the tiny model and tokenizer and ``save_pretrained`` both into ``path``; returns ``path``."""
    tokenizer = build_tokenizer(vocab_size)
    build_tiny_model(tokenizer, seed=seed, **model_kwargs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def attn_implementation(device: torch.device) -> str:
    """FlashAttention-2 on CUDA when flash-attn is installed, SDPA otherwise."""
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
    """AutoModelForCausalLM from a local directory (nothing is fetched from a hub), in float32 on ``device``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    device = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                 attn_implementation=attn_implementation(device))
    return model.to(device)
