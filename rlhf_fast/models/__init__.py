"""🤗 transformers models on packed batches: log-probs without materializing logits, the scalar-head model (reward
model, critic), local loading, the embedded tiny Llama."""

from .loading import disable_dropout, load_causal_lm, load_tokenizer
from .logprobs import (decoder_hidden, float32_head, sequence_cross_entropy, sequence_dpo_loss, sequence_logprobs,
                       sequence_ppo_loss)
from .tiny import build_tiny_model
from .value_head import ScalarHeadModel

__all__ = ["decoder_hidden", "float32_head", "sequence_cross_entropy", "sequence_dpo_loss", "sequence_logprobs",
           "sequence_ppo_loss", "ScalarHeadModel", "build_tiny_model", "disable_dropout", "load_causal_lm", "load_tokenizer"]
