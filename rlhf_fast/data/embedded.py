"""The embedded default: the synthetic task's word-level tokenizer and the tiny Llama, saved in the 🤗 format and
loaded back through ``from_pretrained`` (the same path users' checkpoints take)."""

from __future__ import annotations

import os
import shutil

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ..models.tiny import build_tiny_model
from .task import VOCAB

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
# The task needs 19 words, but a 19-row lm_head would make the embedded run nothing like an LLM's: there the head and
# everything over the vocabulary (log-probs, entropy, sampling) is a large share of an RLHF step. Reserved words pad
# the vocabulary to V / hidden ~ 43 (Llama-3-8B: 31, Qwen2.5-0.5B: 170), as real tokenizers carry reserved tokens;
# they never occur in the data, so the model must learn to give them no mass.
DEFAULT_VOCAB_SIZE = 8192


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the task's symbols (split on whitespace) plus the special tokens, padded with
    ``<reserved_i>`` words to ``vocab_size`` entries (0 = no padding). Like Llama's, it prepends BOS when called
    the standard way (``tok(text)``), as the trainers encode prompts."""
    words = list(SPECIAL_TOKENS.values()) + list(VOCAB)
    if vocab_size and vocab_size < len(words):
        raise ValueError(f"vocab_size must be 0 or at least {len(words)} (the task's words), got {vocab_size}")
    words += [f"<reserved_{i}>" for i in range(max(0, vocab_size - len(words)))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, words.index(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIAL_TOKENS)


def save_tiny_default(path: str, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE, **model_kwargs) -> str:
    """Build the tiny model and tokenizer and ``save_pretrained`` both into ``path`` (written next to it, then
    renamed: a kill mid-write leaves no half-written ``path``); returns ``path``."""
    tokenizer = build_tokenizer(vocab_size)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(tokenizer, seed=seed, **model_kwargs).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path
