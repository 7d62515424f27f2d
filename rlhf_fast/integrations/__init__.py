"""Drop-in use of rlhf_fast inside existing trainers (guide: docs/integrations.md).

- ``rlhf_fast.integrations.trl``: ``patch()`` / ``unpatch()`` / ``patched()`` route TRL's ``selective_log_softmax`` and
  ``entropy_from_logits`` to the fused ops (needs ``pip install rlhf_fast[trl]``).
- ``rlhf_fast.integrations.openrlhf``: OpenRLHF-compatible (0.11; ``version=`` for 0.9 / 0.8) ``PolicyLoss``,
  ``ValueLoss``, ``aggregate_loss``, ``log_probs_from_logits``, ``compute_approx_kl``, ``compute_reward``, ...
- ``rlhf_fast.integrations.verl``: veRL-compatible (0.7 and HEAD; ``version=`` for 0.8.dev / 0.6.1 / 0.6.0) ``agg_loss``, the
  policy-loss registry (``compute_policy_loss_vanilla``, ``_gspo``, ...), the advantage estimators, ...
- ``rlhf_fast.integrations.transformers``: ``patch_causal_lm(model)`` adds ``model.rlhf_logprobs(...)``.

Each submodule is imported on its own (``from rlhf_fast.integrations import verl``); none imports its peer.
"""
