"""Drop-in use of rlhf_fast inside existing trainers (guide: docs/integrations.md).

- ``rlhf_fast.integrations.trl``: ``patch()`` / ``unpatch()`` / ``patched()`` route TRL's ``selective_log_softmax`` and
  ``entropy_from_logits`` to the fused ops (needs ``pip install rlhf_fast[trl]``).
- ``rlhf_fast.integrations.openrlhf``: OpenRLHF-compatible ``log_probs_from_logits``, ``compute_approx_kl``, ...
- ``rlhf_fast.integrations.verl``: veRL-compatible ``logprobs_from_logits``, ``kl_penalty``,
  ``compute_gae_advantage_return``, ``compute_policy_loss``, ``compute_value_loss``, ...
- ``rlhf_fast.integrations.transformers``: ``patch_causal_lm(model)`` adds ``model.rlhf_logprobs(...)``.

Each submodule is imported on its own (``from rlhf_fast.integrations import verl``); none imports its peer.
"""
