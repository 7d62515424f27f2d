"""Loss aggregation as per-token weights: every loss of the project is ``sum_t w_t * l_t``.

An aggregation mode becomes float32 weights ``w = u / D`` (numerators u, normaliser D; docs/formulas.md, "Loss
aggregation"), computed once per step from the mask; the loss ops and kernels then read the weights, never a mode.
A token with ``w == 0`` is masked. Under torchrun the trainer all-reduces ``loss_normalizer`` and passes the global D
as ``normalizer``. Plain PyTorch on [B, T] / [N] vectors, no host synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "dr-grpo")
_SEQ_MODES = ("seq-mean-token-sum", "seq-mean-token-mean", "dr-grpo")  # need the sequences of packed input


def _validate(mask, agg: str, seq_ids, max_len) -> Tensor:
    """-> the mask as float32 (1 = token counts)."""
    _checks.tensor(mask, "mask")
    _checks.choice(agg, "agg", AGG_MODES)
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or float, got {mask.dtype}")
    if mask.dim() not in (1, 2):
        raise ValueError(f"mask must be [B, T] (padded) or [N] (packed), got shape {tuple(mask.shape)}")
    if max_len is not None:
        _checks.integer(max_len, "max_len")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
    if seq_ids is None:
        if mask.dim() == 1 and agg in _SEQ_MODES:
            raise ValueError(f"agg={agg!r} on packed [N] input needs seq_ids (the sequence id of each token)")
    else:
        _checks.tensor(seq_ids, "seq_ids")
        if mask.dim() != 1:
            raise ValueError(f"seq_ids is for packed [N] input; mask is padded [B, T] {tuple(mask.shape)}")
        _checks.seq_ids(seq_ids, mask, "mask")
        # The range check reads the ids: eager CPU only (no host synchronisation on CUDA or under torch.compile).
        if seq_ids.device.type == "cpu" and not torch.compiler.is_compiling() and seq_ids.numel() > 0:
            if bool(((seq_ids < 0) | (seq_ids >= seq_ids.numel())).any()):
                raise ValueError(f"seq_ids must be in [0, N) = [0, {seq_ids.numel()}), got values in "
                                 f"[{int(seq_ids.min())}, {int(seq_ids.max())}]")
    if mask.dim() == 1 and max_len is None and agg in ("seq-mean-token-sum-norm", "dr-grpo"):
        raise ValueError(f"agg={agg!r} on packed [N] input needs max_len (the longest sequence's length)")
    return (mask != 0).float()


def _seq_tokens(m: Tensor, seq_ids: Optional[Tensor]) -> Tensor:
    """Tokens per sequence: [B] (padded rows) or [N] buckets indexed by sequence id (packed)."""
    return m.sum(-1) if seq_ids is None else m.new_zeros(m.shape).index_add(0, seq_ids, m)


def _normalizer(m: Tensor, agg: str, seq_ids: Optional[Tensor], max_len: Optional[int]) -> Tensor:
    if agg == "token-mean":
        return m.sum()
    max_len = m.shape[-1] if max_len is None else max_len
    if agg == "seq-mean-token-sum-norm":
        return m.new_tensor(float(max_len))
    if agg == "dr-grpo":  # B sequences, those without a counted token included: rows, or distinct packed ids
        n_seqs = m.new_tensor(float(m.shape[0])) if seq_ids is None else \
            (_seq_tokens(torch.ones_like(m), seq_ids) > 0).float().sum()
        return n_seqs * max_len
    return (_seq_tokens(m, seq_ids) > 0).float().sum()  # S: sequences with >= 1 token


def loss_normalizer(mask: Tensor, agg: str = "token-mean", *, seq_ids: Optional[Tensor] = None,
                    max_len: Optional[int] = None) -> Tensor:
    """The normaliser D of this batch for aggregation mode ``agg`` (see ``loss_weights``). -> 0-d float32.

    token-mean: the number of tokens; seq-mean-token-sum / seq-mean-token-mean: the number S of sequences with at
    least one token; seq-mean-token-sum-norm: max_len; dr-grpo: B * max_len (B sequences, empty ones included: the
    rows of padded input, the distinct seq_ids of packed input).
    Sum the D of every rank (all-reduce) and pass it to ``loss_weights(normalizer=...)`` for the global loss.
    """
    m = _validate(mask, agg, seq_ids, max_len)
    return _normalizer(m, agg, seq_ids, max_len)


def loss_weights(mask: Tensor, agg: str = "token-mean", *, seq_ids: Optional[Tensor] = None,
                 max_len: Optional[int] = None, normalizer: Optional[Tensor] = None) -> Tensor:
    """Per-token loss weights ``w = u / D`` of aggregation mode ``agg``: the aggregated loss is ``sum_t w_t * l_t``.

    mask: [B, T] (padded, one row a sequence) or [N] (packed), bool or 0/1 (nonzero = the token counts);
    seq_ids: int64 [N], the sequence of each packed token, values in [0, N) (packed seq-mean-* and dr-grpo);
    max_len: the longest sequence's length (seq-mean-token-sum-norm, dr-grpo; default mask.shape[-1], required for
    packed input); normalizer: D to use instead of this batch's (e.g. the all-reduced global one).
    Numerators: u = mask, except seq-mean-token-mean: mask / (tokens of the token's sequence). D = 0 gives w = 0.
    -> float32, mask's shape, 0 where masked. Formulas: docs/formulas.md, "Loss aggregation".
    """
    m = _validate(mask, agg, seq_ids, max_len)
    if normalizer is None:
        d = _normalizer(m, agg, seq_ids, max_len)
    else:
        _checks.tensor(normalizer, "normalizer")
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a single number, got shape {tuple(normalizer.shape)}")
        d = normalizer.to(device=m.device, dtype=torch.float32).reshape(())
    u = m
    if agg == "seq-mean-token-mean":
        n = _seq_tokens(m, seq_ids)
        n = n[:, None] if seq_ids is None else n[seq_ids]
        u = m / torch.where(n > 0, n, 1.0)
    return torch.where(d > 0, u / torch.where(d > 0, d, 1.0), 0.0)
