"""Public op API of rlhf_fast: each op validates its input, picks a backend and calls a torch.library custom op."""

from . import token_logprobs
from . import sampling
from .sampling import sample
from .token_logprobs import entropy, kl_divergence, kl_penalty, logprobs, logprobs_and_entropy

# public op name -> backends implementing it; each op family adds its module's table here
OP_BACKENDS = {**token_logprobs.OP_BACKENDS}
OP_BACKENDS.update(sampling.OP_BACKENDS)

__all__ = ["entropy", "kl_divergence", "kl_penalty", "logprobs", "logprobs_and_entropy"]
__all__ += ["sample"]
