"""OpenRLHF-compatible functions: same names, signatures and return values as ``openrlhf.models.utils``.

Swap the import and keep the trainer::

    # from openrlhf.models.utils import log_probs_from_logits, compute_approx_kl, masked_mean
    from rlhf_fast.integrations.openrlhf import log_probs_from_logits, compute_approx_kl, masked_mean

Semantics follow OpenRLHF (``openrlhf/models/utils.py``, 2025), not FORMULAS.md, where they differ:
  - ``compute_approx_kl`` clamps every estimator's result to [-10, 10] (OpenRLHF does; FORMULAS.md clamps k3 only).
  - ``log_probs_from_logits`` returns float32 whatever the logits dtype (OpenRLHF returns float32 on its flash-attn
    path and the logits dtype on its fallback path) and does NOT divide ``logits`` in place by the temperature
    (OpenRLHF does, as a memory trick; the values returned are the same).
Tensors of a dtype the fused kernels do not take (float64) go through the plain PyTorch formula.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops

__all__ = ["compute_approx_kl", "compute_entropy", "log_probs_from_logits", "masked_mean"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[labels]: logits [..., V], labels int64 [...] in [0, V) -> float32 [...].

    Differentiable w.r.t. ``logits``; no [..., V] temporary is materialized (rlhf_fast.logprobs).
    """
    if logits.dtype not in _KERNEL_DTYPES:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return ops.logprobs(logits, labels, temperature=temperature)


def compute_approx_kl(log_probs: Tensor, log_probs_base: Tensor, kl_estimator: str = "k1") -> Tensor:
    """Schulman's sampled KL estimators of KL(pi || pi_base), per token, float32, clamped to [-10, 10].

    With ``r = log_probs - log_probs_base``: k1 = r; k2 = r^2 / 2; k3 = exp(-r) - 1 + r.
    log_probs, log_probs_base: same shape -> float32, differentiable w.r.t. both.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be one of 'k1', 'k2', 'k3', got {kl_estimator!r}")
    if log_probs.dtype not in _KERNEL_DTYPES or log_probs_base.dtype not in _KERNEL_DTYPES:
        r = log_probs.float() - log_probs_base.float()
        kl = {"k1": r, "k2": r * r / 2.0, "k3": torch.exp(-r) - 1.0 + r}[kl_estimator]
        return kl.clamp(-10.0, 10.0)
    # rlhf_fast's k3 already clamps to [-10, 10]; its d-clamp to [-20, 20] changes no clamped value.
    kl = ops.kl_penalty(log_probs, log_probs_base, kind=kl_estimator)
    return kl if kl_estimator == "k3" else kl.clamp(-10.0, 10.0)


def compute_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits): logits [..., V] -> float32 [...] (OpenRLHF's ``compute_entropy``)."""
    if logits.dtype not in _KERNEL_DTYPES:
        logp = torch.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp).sum(-1)
    return ops.entropy(logits)


def masked_mean(tensor: Tensor, mask: Optional[Tensor], dim: Optional[int] = None) -> Tensor:
    """``(tensor * mask).sum(dim) / mask.sum(dim)``; the plain mean when ``mask`` is None (as OpenRLHF)."""
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)
