"""Helpers for 🤗 transformers models: log-probs of sequences without materializing the [B, T, V] logits."""

from .logprobs import sequence_logprobs, shift_labels

__all__ = ["sequence_logprobs", "shift_labels"]
