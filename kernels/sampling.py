"""Triton kernel of the batched sampler (rlhf_fast.sample): temperature, top-k, top-p, min-p without a sort.

A program owns ROWS rows of logits [B, V] (unit stride in V, any row stride, 0 included): one row for large
vocabularies, several for small ones, so short rows still fill a tile (and the CPU interpreter runs fast enough for
tests). Every pass loops over the row in BLOCK_V blocks and recomputes e = exp(z - max z), z = logits / T, in float32
(no [B, V] temporary), as exp((x - max x) / T), so the max's e is exactly 1:
  1. max and its first index (the greedy answer), 2. S = sum e,
  3. top-k / top-p thresholds by a multi-pivot bisection over the bit patterns of non-negative floats (ordered like the
     values): each pass evaluates NUM_PIVOTS pivots at once (count or mass of e >= pivot), which narrows the interval
     more than NUM_PIVOTS-fold, so N_ITERS = 8 passes reach the exact threshold; min-p's threshold is min_p * max e,
     and max e = exp(0) = 1,
  4. kept mass M and, in the same pass, the kept threshold (the min raw logit over the kept set; -inf without an
     active filter), then the inverse CDF with the row's uniform u: the first v, in index order, whose running kept
     mass exceeds u * M (a block sum per step, a cumulative sum inside the block that holds the answer).
Greedy rows and rows without a distribution (NaN, +inf, no finite logit: NaN log-prob) share the passes and select
their outputs at the end; a pass that no row of the program needs is skipped. The rule and the outputs are those of
rlhf_fast/ops/sampling.py (module docstring).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter runs blocks as numpy arrays and pays ~ms per call of a jit function (tl.sum, tl.max, ... included):
# there, many rows per program amortise that cost (and the helpers' loops call none but reductions).
MAX_BLOCK_V = 128 if INTERPRET else 1024
ROW_TILE = 65536 if INTERPRET else 1024  # ROWS * BLOCK_V; times NUM_PIVOTS at most 2^20 (Triton's largest tensor)
NUM_PIVOTS = 16
N_ITERS = 8  # each pass shrinks the interval of bit patterns (< 2^30 wide) more than 16-fold: 16^8 > 2^30
ONE_BITS = tl.constexpr(0x3F800000)  # bit pattern of 1.0f = exp(0), the largest e


@triton.jit
def _mass(base, row_ok, V, inv_t, m, tau, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row: sum of the e >= tau."""
    offs = tl.arange(0, BLOCK_V)
    total = tl.zeros([ROWS], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(base[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < V)[None, :], other=float("-inf"))
        e = tl.exp((x.to(tl.float32) - m[:, None]) * inv_t[:, None])  # 0 outside the rows
        total += tl.sum(tl.where(e >= tau[:, None], e, 0.0), axis=1)
    return total


@triton.jit
def _kept_mass_and_min(base, row_ok, V, inv_t, m, tau, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row: the mass of the kept set {e >= tau, e > 0} and the min raw logit over it (+inf when empty)."""
    offs = tl.arange(0, BLOCK_V)
    total = tl.zeros([ROWS], tl.float32)
    lowest = tl.full([ROWS], float("inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(base[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < V)[None, :],
                    other=float("-inf")).to(tl.float32)
        e = tl.exp((x - m[:, None]) * inv_t[:, None])  # 0 outside the rows
        kept = (e >= tau[:, None]) & (e > 0)
        total += tl.sum(tl.where(kept, e, 0.0), axis=1)
        lowest = tl.minimum(lowest, tl.min(tl.where(kept, x, float("inf")), axis=1))
    return total, lowest


@triton.jit
def _bisect(base, row_ok, V, inv_t, m, target, lo, hi, USE_MASS: tl.constexpr, ROWS: tl.constexpr,
            BLOCK_V: tl.constexpr, NP: tl.constexpr, N_ITERS: tl.constexpr):
    """Per row: the largest bit pattern t in [lo, hi] with f(t) >= target, f(t) = count (or mass) of e >= t.
    Requires f(lo) >= target. The pivots of a pass, piv_j = lo + ceil(j (hi - lo) / NP) for j = 1..NP, increase and
    f does not, so the passing ones are a prefix."""
    offs = tl.arange(0, BLOCK_V)
    j = tl.arange(0, NP).to(tl.int64) + 1
    for _ in range(N_ITERS):
        width = (hi - lo).to(tl.int64)
        piv = (lo.to(tl.int64)[:, None] + (j[None, :] * width[:, None] + NP - 1) // NP).to(tl.int32)  # [ROWS, NP]
        pf = piv.to(tl.float32, bitcast=True)
        f = tl.zeros([ROWS, NP], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(base[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < V)[None, :], other=float("-inf"))
            e = tl.exp((x.to(tl.float32) - m[:, None]) * inv_t[:, None])  # 0 outside the rows
            ge = e[:, :, None] >= pf[:, None, :]  # [ROWS, BLOCK_V, NP]
            if USE_MASS:
                f += tl.sum(tl.where(ge, e[:, :, None], 0.0), axis=1)
            else:
                f += tl.sum(ge.to(tl.float32), axis=1)
        # the interval becomes [piv_J, piv_{J+1} - 1], J = number of passing pivots, piv_0 = lo, piv_NP = hi
        n_ok = tl.sum((f >= target[:, None]).to(tl.int64), axis=1)
        new_lo = lo.to(tl.int64) + (n_ok * width + NP - 1) // NP
        new_hi = lo.to(tl.int64) + ((n_ok + 1) * width + NP - 1) // NP - 1
        hi = tl.where(n_ok < NP, new_hi, hi.to(tl.int64)).to(tl.int32)
        lo = new_lo.to(tl.int32)
    return lo.to(tl.float32, bitcast=True)


@triton.jit
def _sample_kernel(
    logits_ptr, u_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, tokens_ptr, logp_ptr, filtered_ptr,
    threshold_ptr, B, V, row_stride,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, NP: tl.constexpr, N_ITERS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    base = logits_ptr + rows.to(tl.int64) * row_stride
    offs = tl.arange(0, BLOCK_V)
    temperature = tl.load(temperature_ptr + rows, mask=row_ok, other=1.0)
    top_k = tl.load(top_k_ptr + rows, mask=row_ok, other=0)
    top_p = tl.load(top_p_ptr + rows, mask=row_ok, other=1.0)
    min_p = tl.load(min_p_ptr + rows, mask=row_ok, other=0.0)
    u = tl.minimum(tl.maximum(tl.load(u_ptr + rows, mask=row_ok, other=0.0), 0.0), 0.99999994)

    # 1. max of the logits and its first index; NaN is counted apart (tl.max need not propagate it)
    mx = tl.full([ROWS], float("-inf"), tl.float32)
    arg = tl.zeros([ROWS], tl.int32)
    n_nan = tl.zeros([ROWS], tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        n_nan += tl.sum((x != x).to(tl.int32), axis=1)
        block_max = tl.max(x, axis=1)
        block_arg = tl.min(tl.where(x == block_max[:, None], cols[None, :], V), axis=1)
        arg = tl.where(block_max > mx, block_arg, arg)
        mx = tl.maximum(mx, block_max)
    greedy = ~(temperature > 0)
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    valid = row_ok & (n_nan == 0) & (tl.abs(mx) < float("inf"))  # rows with a distribution
    sampled = valid & ~greedy
    # e = exp((x - m) * inv_t), m the row's max logit: subtracting before scaling makes the max's e exactly 1
    # (whatever the rounding of x * inv_t or its fusion into an FMA) and cannot overflow at a small temperature
    m = tl.where(valid, mx, 0.0)

    # 2-3. S and the thresholds
    zero = tl.zeros([ROWS], tl.float32)
    s = _mass(base, row_ok, V, inv_t, m, zero, ROWS, BLOCK_V)
    one_bits = tl.full([ROWS], ONE_BITS, tl.int32)
    k_on = sampled & (top_k > 0) & (top_k < V)
    tau_k = zero
    if tl.max(k_on.to(tl.int32), axis=0) > 0:
        t = _bisect(base, row_ok, V, inv_t, m, top_k.to(tl.float32), tl.zeros([ROWS], tl.int32), one_bits,
                    False, ROWS, BLOCK_V, NP, N_ITERS)
        tau_k = tl.where(k_on, t, 0.0)
    p_on = sampled & (top_p < 1.0)
    tau_p = zero
    if tl.max(p_on.to(tl.int32), axis=0) > 0:
        target = tl.maximum(top_p, 0.0) * _mass(base, row_ok, V, inv_t, m, tau_k, ROWS, BLOCK_V)
        t = _bisect(base, row_ok, V, inv_t, m, target, tau_k.to(tl.int32, bitcast=True), one_bits,
                    True, ROWS, BLOCK_V, NP, N_ITERS)
        tau_p = tl.where(p_on, t, 0.0)
    tau = tl.minimum(tl.maximum(tl.maximum(tau_k, tau_p), tl.maximum(min_p, 0.0)), 1.0)  # the max (e = 1) is kept
    filtered = k_on | p_on | (min_p > 0)

    # 4. kept mass and threshold, inverse CDF
    kept, kept_min = _kept_mass_and_min(base, row_ok, V, inv_t, m, tau, ROWS, BLOCK_V)
    target = u * kept
    cum = zero
    token = tl.full([ROWS], -1, tl.int32)
    last = tl.full([ROWS], -1, tl.int32)
    if tl.max(sampled.to(tl.int32), axis=0) > 0:
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(base[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < V)[None, :], other=float("-inf"))
            e = tl.exp((x.to(tl.float32) - m[:, None]) * inv_t[:, None])
            w = tl.where(e >= tau[:, None], e, 0.0)
            hit = ((cum[:, None] + tl.cumsum(w, axis=1)) > target[:, None]) & (w > 0)
            first = tl.min(tl.where(hit, cols[None, :], V), axis=1)
            token = tl.where((token < 0) & (first < V), first, token)
            last = tl.maximum(last, tl.max(tl.where(w > 0, cols[None, :], -1), axis=1))
            cum += tl.sum(w, axis=1)
    token = tl.where(token < 0, last, token)  # not found: rounding put the target past the end
    token = tl.where(sampled & (token >= 0), token, arg)
    z = (tl.load(base + token, mask=row_ok, other=0.0).to(tl.float32) - m) * inv_t
    nan = float("nan")
    greedy_lp = tl.where(valid, 0.0, nan)
    tl.store(tokens_ptr + rows, token.to(tl.int64), mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(sampled, z - tl.log(s), greedy_lp), mask=row_ok)
    tl.store(filtered_ptr + rows, tl.where(sampled, z - tl.log(kept), greedy_lp), mask=row_ok)
    threshold = tl.where(greedy, mx, tl.where(filtered, kept_min, float("-inf")))
    tl.store(threshold_ptr + rows, tl.where(valid, threshold, nan), mask=row_ok)


def sample(logits: Tensor, uniforms: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [B, V] (unit stride in V); uniforms, temperature, top_p, min_p float32 [B]; top_k int64 [B]
    -> (tokens int64 [B], logprobs float32 [B], filtered_logprobs float32 [B], kept_threshold float32 [B])."""
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logp = torch.empty(B, dtype=torch.float32, device=logits.device)
    filtered = torch.empty(B, dtype=torch.float32, device=logits.device)
    threshold = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return tokens, logp, filtered, threshold
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    rows = max(1, min(triton.next_power_of_2(B), ROW_TILE // block_v))
    num_warps = 8 if rows * block_v >= 1024 else 4
    _sample_kernel[(triton.cdiv(B, rows),)](
        logits, uniforms, temperature, top_k, top_p, min_p, tokens, logp, filtered, threshold,
        B, V, logits.stride(0), ROWS=rows, BLOCK_V=block_v, NP=NUM_PIVOTS, N_ITERS=N_ITERS, num_warps=num_warps,
    )
    return tokens, logp, filtered, threshold
