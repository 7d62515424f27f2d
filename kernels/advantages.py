"""Triton kernels of masked GAE and discounted returns (rlhf_fast.ops.advantages has the formulas).

One program per sequence walks it from the end in tiles of BLOCK positions. Each position t is a map of the state
after t+1 to the state after t, x -> c_t * x + v_t, and a tile is a scan of those (coefficient, value) pairs:

  next value:  nv -> V[t] where mask[t], else nv         (c = 1 - mask, v = mask * V)
  advantage:   A  -> delta_t + gamma*lam * A where mask[t], else A    (c = gamma*lam or 1, v = delta_t or 0)

with delta_t = r[t] + gamma * next_v_t - V[t], where next_v_t is the next-value state after t+1 (an exclusive scan:
the pairs of position t+1, loaded shifted by one). The scan composes the maps; the tile's incoming state (the state
after its last position, carried from the tile to its right) is applied at the end: x_t = C_t * carry + S_t.

The tile is loaded in reverse time order and scanned forwards, which is the same reverse-time scan: tl.associative_scan
with reverse=True has been reported wrong for non-commutative combines on GPUs (triton-lang/triton#4362).
Arithmetic is fp32. Masked positions are never loaded (they hold padding, possibly inf/NaN).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _affine_combine(c_first, v_first, c_then, v_then):
    # x -> c_then * (c_first * x + v_first) + v_then: apply the earlier element of the scan axis first.
    return c_first * c_then, c_then * v_first + v_then


@triton.jit
def _gae_fwd_kernel(
    r_ptr, v_ptr, m_ptr, gamma_seq_ptr, lam_seq_ptr, adv_ptr, ret_ptr,
    n_steps, stride_rb, stride_rt, stride_vb, stride_vt, stride_mb, stride_mt, gamma, lam,
    HAS_VALUES: tl.constexpr, GAMMA_SEQ: tl.constexpr, LAM_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r_row = r_ptr + row * stride_rb
    v_row = v_ptr + row * stride_vb
    m_row = m_ptr + row * stride_mb
    g = gamma
    if GAMMA_SEQ:
        g = tl.load(gamma_seq_ptr + row)
    gl = g
    if HAS_VALUES:
        if LAM_SEQ:
            gl = g * tl.load(lam_seq_ptr + row)
        else:
            gl = g * lam
    j = tl.arange(0, BLOCK)
    carry_nv = tl.zeros((), dtype=tl.float32)
    carry_a = tl.zeros((), dtype=tl.float32)
    for i in range(0, tl.cdiv(n_steps, BLOCK)):
        end = n_steps - i * BLOCK
        t = (end - 1 - j).to(tl.int64)  # element j of the tile is time t: latest first
        keep = tl.load(m_row + t * stride_mt, mask=t >= 0, other=0) != 0
        delta = tl.load(r_row + t * stride_rt, mask=keep, other=0.0).to(tl.float32)
        if HAS_VALUES:
            v = tl.load(v_row + t * stride_vt, mask=keep, other=0.0).to(tl.float32)
            # Pairs of time t+1 (element j-1); element 0 gets the identity, so the scan is exclusive.
            keep1 = tl.load(m_row + (t + 1) * stride_mt, mask=(j > 0) & (t >= -1), other=0) != 0
            v1 = tl.load(v_row + (t + 1) * stride_vt, mask=keep1, other=0.0).to(tl.float32)
            c_nv, s_nv = tl.associative_scan((tl.where(keep1, 0.0, 1.0), v1), 0, _affine_combine)
            next_v = c_nv * carry_nv + s_nv
            delta = delta + g * next_v - v
        c_a, s_a = tl.associative_scan((tl.where(keep, gl, 1.0), tl.where(keep, delta, 0.0)), 0, _affine_combine)
        a = c_a * carry_a + s_a
        tl.store(adv_ptr + row * n_steps + t, tl.where(keep, a, 0.0), mask=t >= 0)
        # The state after the tile's earliest position (element BLOCK-1) enters the next tile.
        last = j == BLOCK - 1
        carry_a = tl.sum(tl.where(last, a, 0.0), 0)
        if HAS_VALUES:
            tl.store(ret_ptr + row * n_steps + t, tl.where(keep, a + v, 0.0), mask=t >= 0)
            carry_nv = tl.sum(tl.where(last, tl.where(keep, v, next_v), 0.0), 0)


def _launch(rewards, values, mask, gamma_seq, lam_seq, gamma, lam, has_values, block):
    n_rows, n_steps = rewards.shape
    adv = torch.empty((n_rows, n_steps), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv) if has_values else adv
    if adv.numel() == 0:
        return adv, ret
    block = block or min(triton.next_power_of_2(n_steps), 1024)
    m = mask.view(torch.uint8)
    _gae_fwd_kernel[(n_rows,)](
        rewards, values, m, adv if gamma_seq is None else gamma_seq, adv if lam_seq is None else lam_seq, adv, ret,
        n_steps, rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1), m.stride(0), m.stride(1),
        float(gamma), float(lam),
        HAS_VALUES=has_values, GAMMA_SEQ=gamma_seq is not None, LAM_SEQ=lam_seq is not None, BLOCK=block,
        num_warps=4 if block >= 512 else 2 if block >= 128 else 1,
    )
    return adv, ret


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma_seq: Optional[torch.Tensor],
            lam_seq: Optional[torch.Tensor], gamma: float, lam: float, block: Optional[int] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values [B, T] (one float dtype, any strides), mask [B, T] bool, gamma_seq/lam_seq float32 [B] or
    None -> (advantages, returns) contiguous float32 [B, T]. ``block``: tile length (a power of 2), for tests."""
    return _launch(rewards, values, mask, gamma_seq, lam_seq, gamma, lam, True, block)


def discounted_returns_fwd(rewards: torch.Tensor, mask: torch.Tensor, gamma_seq: Optional[torch.Tensor],
                           gamma: float, block: Optional[int] = None) -> torch.Tensor:
    """rewards [B, T], mask [B, T] bool, gamma_seq float32 [B] or None -> returns, contiguous float32 [B, T]."""
    return _launch(rewards, rewards, mask, gamma_seq, None, gamma, 1.0, False, block)[0]
