"""Public op API of rlhf_fast: each op validates its input, picks a backend and calls a torch.library custom op."""

from .token_logprobs import entropy, kl_divergence, kl_penalty, logprobs, logprobs_and_entropy

__all__ = ["entropy", "kl_divergence", "kl_penalty", "logprobs", "logprobs_and_entropy"]
