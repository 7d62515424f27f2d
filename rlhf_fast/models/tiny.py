"""The embedded default model: a tiny Llama sized for a 2-core CPU, built in code."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Positions of the embedded default: room for every stage's default lengths (max_len, max_prompt_len +
# max_new_tokens). RoPE has no position table, so the number costs nothing and changes no result.
MAX_POSITIONS = 512


def build_tiny_model(tokenizer, *, hidden_size: int = 192, num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int = 768, max_positions: int = MAX_POSITIONS,
                     seed: int = 0) -> LlamaForCausalLM:
    """A small Llama: 1.2 M parameters in the two layers, plus 2 x vocabulary x 192 in the untied embedding and head
    (4.3 M in all with the embedded tokenizer's 8192 words). Two wide layers rather than four narrow ones: on a CPU,
    per-layer Python overhead dominates at these sizes."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
