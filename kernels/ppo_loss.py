"""Triton kernels of the standalone PPO losses (rlhf_fast.ops.ppo_loss and docs/formulas.md have the formulas).

The loss is a weighted sum, ``loss = sum_t w_t l_t``, with the caller's per-token float32 weights w
(rlhf_fast.loss_weights); a token with w_t == 0 is masked. One program handles BLOCK tokens, reading each once.
Forward: it writes its block's partial sums (loss, diagnostics, token count; fp32 within the block), and a one-program
finalize kernel adds them in block order (fp64), so results are deterministic. Backward (the same kernel,
BACKWARD=True): it writes ``g * w_t * dl_t/dx_t`` in the input's dtype, with g the incoming gradient of the loss.
Masked positions are never loaded (they may hold inf/NaN). Arithmetic is fp32.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024
POLICY_COLUMNS = 7  # partial sums: loss, clipped, dual-clipped, k3, ratio, tokens; then the max ratio
VALUE_COLUMNS = 3  # loss, clipped, tokens


@triton.jit
def _ppo_policy_kernel(
    lp_ptr, old_ptr, adv_ptr, w_ptr, g_ptr, grad_ptr, part_ptr, n, clip_lo, clip_hi, dual,
    HAS_DUAL: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0.0)
    keep = w != 0.0
    log_ratio = tl.load(lp_ptr + offs, mask=keep, other=0.0).to(tl.float32) - tl.load(
        old_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    a = tl.load(adv_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    lr = tl.minimum(tl.maximum(log_ratio, -20.0), 20.0)
    ratio = tl.exp(lr)
    unclipped = -a * ratio
    clipped = -a * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
    loss = tl.maximum(unclipped, clipped)
    takes_ratio = (unclipped >= clipped) & (tl.abs(log_ratio) <= 20.0)
    if HAS_DUAL:
        bound = -a * dual
        dual_clipped = (a < 0.0) & (loss > bound) & keep
        loss = tl.where(dual_clipped, bound, loss)
        takes_ratio = takes_ratio & (dual_clipped == 0)
    else:
        dual_clipped = keep & (keep == 0)
    if BACKWARD:
        grad = tl.where(keep & takes_ratio, tl.load(g_ptr) * w * unclipped, 0.0)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=offs < n)
    else:
        k3 = tl.minimum(tl.maximum(ratio - lr - 1.0, -10.0), 10.0)
        ratio = tl.where(keep, ratio, 0.0)
        part = part_ptr + pid * 7
        tl.store(part + 0, tl.sum(tl.where(keep, w * loss, 0.0), 0))
        tl.store(part + 1, tl.sum((keep & (clipped > unclipped)).to(tl.float32), 0))
        tl.store(part + 2, tl.sum(dual_clipped.to(tl.float32), 0))
        tl.store(part + 3, tl.sum(tl.where(keep, k3, 0.0), 0))
        tl.store(part + 4, tl.sum(ratio, 0))
        tl.store(part + 5, tl.sum(keep.to(tl.float32), 0))
        tl.store(part + 6, tl.max(ratio, 0))


@triton.jit
def _ppo_value_kernel(
    v_ptr, old_ptr, ret_ptr, w_ptr, g_ptr, grad_ptr, part_ptr, n, clip,
    HAS_CLIP: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0.0)
    keep = w != 0.0
    v = tl.load(v_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    r = tl.load(ret_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    d = v - r
    loss = d * d
    if HAS_CLIP:
        v_old = tl.load(old_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        step = v - v_old
        e = v_old + tl.minimum(tl.maximum(step, -clip), clip) - r
        takes_clipped = e * e > loss
        frac = keep & takes_clipped & (tl.abs(step) > clip)
        loss = tl.maximum(loss, e * e)
        # the clipped term passes gradient only where its clamp is open
        d = tl.where(takes_clipped, tl.where(tl.abs(step) <= clip, e, 0.0), d)
    else:
        frac = keep & (keep == 0)
    if BACKWARD:
        grad = tl.where(keep, tl.load(g_ptr) * w * d, 0.0)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=offs < n)
    else:
        part = part_ptr + pid * 3
        tl.store(part + 0, tl.sum(tl.where(keep, 0.5 * w * loss, 0.0), 0))
        tl.store(part + 1, tl.sum(frac.to(tl.float32), 0))
        tl.store(part + 2, tl.sum(keep.to(tl.float32), 0))


@triton.jit
def _finalize_kernel(part_ptr, n_parts, loss_ptr, stats_ptr, COLUMNS: tl.constexpr, N_SUMS: tl.constexpr,
                     HAS_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums [n_parts, COLUMNS] -> loss (column 0) and stats: columns 1 .. N_SUMS-2 over the token count
    (column N_SUMS-1), then the max of the last column when HAS_MAX."""
    n_sums = N_SUMS
    rows = tl.arange(0, BLOCK)
    count = tl.zeros((), tl.float64)
    for start in range(0, n_parts, BLOCK):
        count += tl.sum(tl.load(part_ptr + (start + rows) * COLUMNS + n_sums - 1, mask=start + rows < n_parts,
                                other=0.0).to(tl.float64), 0)
    count = tl.maximum(count, 1.0)
    for k in tl.static_range(N_SUMS - 1):
        total = tl.zeros((), tl.float64)
        for start in range(0, n_parts, BLOCK):
            total += tl.sum(tl.load(part_ptr + (start + rows) * COLUMNS + k, mask=start + rows < n_parts,
                                    other=0.0).to(tl.float64), 0)
        if k == 0:
            tl.store(loss_ptr, total.to(tl.float32))
        else:
            tl.store(stats_ptr + k - 1, (total / count).to(tl.float32))
    if HAS_MAX:
        top = tl.zeros((), tl.float32)
        for start in range(0, n_parts, BLOCK):
            top = tl.maximum(top, tl.max(tl.load(part_ptr + (start + rows) * COLUMNS + COLUMNS - 1,
                                                 mask=start + rows < n_parts, other=0.0), 0))
        tl.store(stats_ptr + n_sums - 2, top)


def _launch(kernel, columns, has_max, n_stats, grad_loss, x, y, z, weights, *scalars, **flags):
    """Forward (grad_loss None) -> (loss, stats); backward -> the gradient w.r.t. x."""
    x, y, z, weights = x.contiguous(), y.contiguous(), z.contiguous(), weights.contiguous()
    n = x.numel()
    device = x.device
    backward = grad_loss is not None
    # The interpreter truncates fp32 -> bf16/fp16 stores (a GPU rounds to nearest even): there, store fp32, convert.
    fp32_store = backward and x.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backward:
        out = grad = torch.empty(x.shape, dtype=torch.float32 if fp32_store else x.dtype, device=device)
        g = grad_loss.to(torch.float32)
    else:
        out = loss, stats = (torch.zeros((), dtype=torch.float32, device=device),
                             torch.zeros(n_stats, dtype=torch.float32, device=device))
    if n == 0:
        return grad.to(x.dtype) if fp32_store else out
    n_parts = triton.cdiv(n, BLOCK)
    parts = weights if backward else torch.empty((n_parts, columns), dtype=torch.float32, device=device)
    kernel[(n_parts,)](
        x, y, z, weights, g if backward else parts, grad if backward else parts, parts, n, *scalars,
        BACKWARD=backward, BLOCK=BLOCK, num_warps=4, **flags,
    )
    if not backward:
        _finalize_kernel[(1,)](parts, n_parts, loss, stats, COLUMNS=columns, N_SUMS=columns - has_max,
                               HAS_MAX=has_max, BLOCK=256, num_warps=4)
    return grad.to(x.dtype) if fp32_store else out


def _policy(grad_loss, logp, old_logp, advantages, weights, clip_low, clip_high, dual_clip):
    return _launch(_ppo_policy_kernel, POLICY_COLUMNS, True, 5, grad_loss, logp, old_logp, advantages, weights,
                   1.0 - clip_low, 1.0 + clip_high, 0.0 if dual_clip is None else dual_clip,
                   HAS_DUAL=dual_clip is not None)


def _value(grad_loss, values, old_values, returns, weights, clip):
    return _launch(_ppo_value_kernel, VALUE_COLUMNS, False, 1, grad_loss, values, old_values, returns, weights,
                   0.0 if clip is None else clip, HAS_CLIP=clip is not None)


def ppo_policy_loss_fwd(logp, old_logp, advantages, weights, clip_low: float, clip_high: float,
                        dual_clip: Optional[float]):
    """logp, old_logp, advantages: [B, T] or [N] float32/bf16/fp16 (dtypes may differ); weights float32 of that
    shape (0 = masked) -> (loss 0-d float32, stats float32 [5] = clip_frac, dual_clip_frac, approx_kl, ratio_mean,
    ratio_max)."""
    return _policy(None, logp, old_logp, advantages, weights, clip_low, clip_high, dual_clip)


def ppo_policy_loss_bwd(grad_loss, logp, old_logp, advantages, weights, clip_low: float, clip_high: float,
                        dual_clip: Optional[float]):
    """grad_loss 0-d -> grad_loss * w * d loss / d logp, contiguous, logp's dtype and shape."""
    return _policy(grad_loss, logp, old_logp, advantages, weights, clip_low, clip_high, dual_clip)


def ppo_value_loss_fwd(values, old_values, returns, weights, clip: Optional[float]):
    """values, old_values, returns: [B, T] or [N]; clip None: unclipped -> (loss 0-d, stats [1] = clip_frac)."""
    return _value(None, values, old_values, returns, weights, clip)


def ppo_value_loss_bwd(grad_loss, values, old_values, returns, weights, clip: Optional[float]):
    """grad_loss 0-d -> grad_loss * w * d loss / d values, contiguous, values' dtype and shape."""
    return _value(grad_loss, values, old_values, returns, weights, clip)
