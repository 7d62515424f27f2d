"""Helpers for 🤗 transformers models: log-probs of sequences without materializing the [B, T, V] logits."""

from .logprobs import sequence_cross_entropy, sequence_logprobs, shift_labels

__all__ = ["sequence_cross_entropy", "sequence_logprobs", "shift_labels"]

from .tiny import build_tiny_model, build_tokenizer, load_causal_lm, load_tokenizer, save_tiny_default  # noqa: E402
from .value_head import ScalarHeadModel  # noqa: E402

__all__ += ["build_tiny_model", "build_tokenizer", "load_causal_lm", "load_tokenizer", "save_tiny_default",
            "ScalarHeadModel"]
