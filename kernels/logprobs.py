"""Triton kernels for log-probs of labels, entropy and exact KL from logits (formulas: docs/formulas.md).

One program per row of logits [N, V] (unit stride in V, any row stride); each loops over the vocabulary in BLOCK_V
blocks with an online softmax, so the forward reads the logits once and the backward reads them once and writes
the gradient once. All arithmetic is float32; z = logits / temperature, w = ref_logits / temperature.

Running maxima are used through ``safe = where(m == -inf, 0, m)`` so that blocks (or rows) that are entirely -inf
give no inf - inf; a row that is entirely -inf still ends with NaN log-probs and entropy, as torch.log_softmax.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# The interpreter runs blocks as numpy arrays; a small cap there also exercises the multi-block path in tests.
MAX_BLOCK_V = 512 if os.environ.get("TRITON_INTERPRET") == "1" else 4096


def _launch_config(V: int) -> tuple[int, int]:
    block_v = min(triton.next_power_of_2(max(V, 1)), MAX_BLOCK_V)
    num_warps = 8 if block_v >= 2048 else 4 if block_v >= 512 else 2 if block_v >= 128 else 1
    return block_v, num_warps


@triton.jit
def _safe(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, threshold_ptr, logp_ptr, entropy_ptr, lse_ptr, lse_kept_ptr,
    V, row_stride, temperature, ignore_index,
    HAS_LABELS: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, KEPT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # KEPT: one more sum, k = sum over raw logits >= threshold of exp(z - safe(m)), rescaled as s; the label is added
    # at the end when it lies below the threshold; logp = z_y - lse_kept.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)  # running max of z
    s = tl.zeros([], tl.float32)  # sum exp(z - safe(m))
    t = tl.zeros([], tl.float32)  # sum exp(z - safe(m)) * (z - safe(m))
    k = tl.zeros([], tl.float32)  # sum over the kept entries of exp(z - safe(m))
    threshold = float("-inf")
    if KEPT:
        threshold = tl.load(threshold_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        z = x / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        ms_new = _safe(m_new)
        alpha = tl.exp(m - ms_new)  # the raw m: 0 while nothing was seen, even if ms_new is very negative
        e = tl.exp(z - ms_new)
        if COMPUTE_ENTROPY:  # e > 0 drops -inf entries, whose e * (z - ms_new) would be 0 * -inf
            t = alpha * (t + (_safe(m) - ms_new) * s) + tl.sum(tl.where(e > 0, e * (z - ms_new), 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        if KEPT:
            k = alpha * k + tl.sum(tl.where(x >= threshold, e, 0.0), axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(lse_ptr + row, lse)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, log_s - t / s)
    else:
        tl.store(entropy_ptr + row, 0.0)
    logp = 0.0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        in_range = (label >= 0) & (label < V)
        x_label = tl.load(base + label, mask=in_range & (label != ignore_index), other=0.0).to(tl.float32)
        log_denominator = log_s
        if KEPT:
            # the label below the threshold joins K (the union rule), log-added relative to m: the rest of K is
            # empty or holds the row's max, so alone the label gives logp = 0 exactly, whatever its distance to m
            below = in_range & (label != ignore_index) & (x_label < threshold)
            a = tl.log(k)
            b = x_label / temperature - m
            added = tl.where(a == float("-inf"), b, tl.maximum(a, b) + tl.log(1.0 + tl.exp(-tl.abs(a - b))))
            log_denominator = tl.where(lse != lse, lse, tl.where(below, added, a))  # no distribution: NaN
        logp = tl.where(in_range, (x_label / temperature - m) - log_denominator, float("nan"))
        logp = tl.where(label == ignore_index, 0.0, logp)
    if KEPT:
        if HAS_LABELS:
            tl.store(lse_kept_ptr + row, m + log_denominator)
        else:
            tl.store(lse_kept_ptr + row, tl.where(lse != lse, lse, m + tl.log(k)))
    tl.store(logp_ptr + row, logp)


@triton.jit
def _logprobs_bwd_kernel(
    grad_logp_ptr, grad_entropy_ptr, grad_lse_ptr, grad_lse_kept_ptr, logits_ptr, labels_ptr, threshold_ptr, lse_ptr,
    lse_kept_ptr, entropy_ptr, grad_ptr,
    V, row_stride, temperature, ignore_index,
    HAS_LABELS: tl.constexpr, KEPT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    out = grad_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    g_h = tl.load(grad_entropy_ptr + row)
    g = 0.0
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        has_label = (label != ignore_index) & (label >= 0) & (label < V)  # out-of-range labels: NaN logp, no grad
        g = tl.where(has_label, tl.load(grad_logp_ptr + row), 0.0)
        label = tl.where(has_label, label, -1)  # the kept set's label, and where g goes
    # grad_z = p (c - gH lp) + g [col == label], lp = z - lse: written with lp, not z, so that large logits (1e4)
    # cancel exactly inside lp instead of catastrophically in c.
    # KEPT: logp = z_y - lse_kept moves the -g onto q = [kept] exp(z - lse_kept): grad_z = p (gL - gH H - gH lp)
    # + q (gK - g) + g [col == label]; a row with threshold -inf keeps everything (q = p) and takes the plain
    # formula with gL + gK.
    if KEPT:
        threshold = tl.load(threshold_ptr + row)
        lse_kept = tl.load(lse_kept_ptr + row)
        g_k = tl.load(grad_lse_kept_ptr + row)
        full = threshold == float("-inf")
        c = tl.where(full, tl.load(grad_lse_ptr + row) + g_k - g, tl.load(grad_lse_ptr + row)) \
            - g_h * tl.load(entropy_ptr + row)
        c_k = tl.where(full, 0.0, g_k - g)
    else:
        c = tl.load(grad_lse_ptr + row) - g - g_h * tl.load(entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        lp = x / temperature - lse
        p = tl.exp(lp)
        grad_z = p * (c - g_h * tl.where(p > 0, lp, 0.0))
        if KEPT:
            kept = (x >= threshold) | (cols == label)
            grad_z += tl.where(kept & (x > float("-inf")), tl.exp(x / temperature - lse_kept) * c_k, 0.0)
        grad_z += tl.where(cols == label, g, 0.0)
        tl.store(out + cols, (grad_z / temperature).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kl_div_fwd_kernel(
    logits_ptr, ref_ptr, kl_ptr, max_p_ptr, max_q_ptr, log_s_p_ptr, mean_d_ptr,
    V, row_stride, ref_row_stride, temperature,
    BLOCK_V: tl.constexpr,
):
    # Relative to the raw row maxima m_x = max x, m_r = max x_ref (not scaled): dz = (x - m_x) / T, dw = (x_ref - m_r)
    # / T, so that at a small temperature nothing ~1 / T is ever subtracted from anything else ~1 / T.
    row = tl.program_id(0).to(tl.int64)
    base_x = logits_ptr + row * row_stride
    base_r = ref_ptr + row * ref_row_stride
    offs = tl.arange(0, BLOCK_V)
    m_x = tl.full([], float("-inf"), tl.float32)
    m_r = tl.full([], float("-inf"), tl.float32)
    s_z = tl.zeros([], tl.float32)  # sum exp(dz)
    s_w = tl.zeros([], tl.float32)  # sum exp(dw)
    t = tl.zeros([], tl.float32)  # sum exp(dz) * (dz - dw)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(base_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
        r = tl.load(base_r + cols, mask=mask, other=float("-inf")).to(tl.float32)
        mx_new = tl.maximum(m_x, tl.max(x, axis=0))
        mr_new = tl.maximum(m_r, tl.max(r, axis=0))
        shift_z = (_safe(m_x) - _safe(mx_new)) / temperature  # how much dz of the entries seen so far moves
        shift_w = (_safe(m_r) - _safe(mr_new)) / temperature
        alpha_z = tl.where(s_z > 0, tl.exp(shift_z), 0.0)
        dz = (x - _safe(mx_new)) / temperature
        dw = (r - _safe(mr_new)) / temperature
        e_z = tl.exp(dz)
        # alpha_z = 0 (nothing seen yet, or the old mass vanishes at this temperature): the old t goes, NaN-free
        t = tl.where(alpha_z > 0, alpha_z * (t + (shift_z - shift_w) * s_z), 0.0)
        t += tl.sum(tl.where(e_z > 0, e_z * (dz - dw), 0.0), axis=0)
        s_z = alpha_z * s_z + tl.sum(e_z, axis=0)
        s_w = tl.where(s_w > 0, tl.exp(shift_w) * s_w, 0.0) + tl.sum(tl.exp(dw), axis=0)
        m_x = mx_new
        m_r = mr_new
    mean_d = t / s_z
    log_s_p = tl.log(s_z)
    kl = mean_d - log_s_p + tl.log(s_w)
    mean_d = tl.where(kl != kl, kl, mean_d)  # NaN mean_d marks a NaN KL: its backward row is NaN
    tl.store(kl_ptr + row, kl)
    tl.store(max_p_ptr + row, m_x)
    tl.store(max_q_ptr + row, m_r)
    tl.store(log_s_p_ptr + row, log_s_p)
    tl.store(mean_d_ptr + row, mean_d)


@triton.jit
def _kl_div_bwd_kernel(
    grad_kl_ptr, logits_ptr, ref_ptr, max_p_ptr, max_q_ptr, log_s_p_ptr, mean_d_ptr, grad_ptr,
    V, row_stride, ref_row_stride, temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base_x = logits_ptr + row * row_stride
    base_r = ref_ptr + row * ref_row_stride
    out = grad_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    g = tl.load(grad_kl_ptr + row)
    m_x = tl.load(max_p_ptr + row)
    m_r = tl.load(max_q_ptr + row)
    log_s_p = tl.load(log_s_p_ptr + row)
    mean_d = tl.load(mean_d_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        dz = (tl.load(base_x + cols, mask=mask, other=float("-inf")).to(tl.float32) - m_x) / temperature
        dw = (tl.load(base_r + cols, mask=mask, other=float("-inf")).to(tl.float32) - m_r) / temperature
        p = tl.exp(dz - log_s_p)
        grad_z = g * p * tl.where(p > 0, (dz - dw) - mean_d, 0.0)
        grad_z = tl.where(mean_d != mean_d, float("nan"), grad_z)  # a NaN KL: a NaN row
        tl.store(out + cols, (grad_z / temperature).to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: plain functions on validated 2-D inputs (logits.stride(1) == 1); the custom ops wrap them.
# ---------------------------------------------------------------------------------------------------------------


def logprobs_fwd(logits: Tensor, labels: Optional[Tensor], kept_threshold: Optional[Tensor], temperature: float,
                 ignore_index: int, compute_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [N, V] float/bf16/fp16, labels int64 [N] or None, kept_threshold float32 [N] or None
    -> (logp, entropy, lse, lse_kept), float32 [N] each (lse_kept [0] without kept_threshold)."""
    N, V = logits.shape
    logp, entropy, lse = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    lse_kept = torch.empty(N if kept_threshold is not None else 0, dtype=torch.float32, device=logits.device)
    if N == 0:
        return logp, entropy, lse, lse_kept
    block_v, num_warps = _launch_config(V)
    _logprobs_fwd_kernel[(N,)](
        logits, logits if labels is None else labels, lse if kept_threshold is None else kept_threshold,
        logp, entropy, lse, lse if kept_threshold is None else lse_kept,
        V, logits.stride(0), float(temperature), int(ignore_index),
        HAS_LABELS=labels is not None, COMPUTE_ENTROPY=bool(compute_entropy), KEPT=kept_threshold is not None,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return logp, entropy, lse, lse_kept


def logprobs_bwd(grad_logp: Tensor, grad_entropy: Tensor, grad_lse: Tensor, grad_lse_kept: Optional[Tensor],
                 logits: Tensor, labels: Optional[Tensor], kept_threshold: Optional[Tensor], lse: Tensor,
                 lse_kept: Optional[Tensor], entropy: Tensor, temperature: float, ignore_index: int) -> Tensor:
    """grad_* float32 [N] (zeros where unused) -> grad_logits [N, V] in logits.dtype, contiguous.
    grad_lse_kept, kept_threshold, lse_kept: all three or none."""
    N, V = logits.shape
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return grad
    block_v, num_warps = _launch_config(V)
    kept = kept_threshold is not None
    _logprobs_bwd_kernel[(N,)](
        grad_logp, grad_entropy, grad_lse, grad_lse_kept if kept else lse, logits, logits if labels is None else labels,
        kept_threshold if kept else lse, lse, lse_kept if kept else lse, entropy, grad,
        V, logits.stride(0), float(temperature), int(ignore_index),
        HAS_LABELS=labels is not None, KEPT=kept, BLOCK_V=block_v, num_warps=num_warps,
    )
    return grad


def kl_div_fwd(logits: Tensor, ref_logits: Tensor, temperature: float
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """logits, ref_logits [N, V] (same dtype) -> (kl, max_p, max_q, log_s_p, mean_d), float32 [N] each (the KL and
    the state of its backward, see rlhf_fast.ops.token_logprobs.kl_divergence_op)."""
    N, V = logits.shape
    out = tuple(torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(5))
    if N == 0:
        return out
    block_v, num_warps = _launch_config(V)
    _kl_div_fwd_kernel[(N,)](
        logits, ref_logits, *out,
        V, logits.stride(0), ref_logits.stride(0), float(temperature),
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return out


def kl_div_bwd(grad_kl: Tensor, logits: Tensor, ref_logits: Tensor, max_p: Tensor, max_q: Tensor, log_s_p: Tensor,
               mean_d: Tensor, temperature: float) -> Tensor:
    """grad_kl float32 [N] -> grad_logits [N, V] in logits.dtype, contiguous (no gradient for ref_logits)."""
    N, V = logits.shape
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return grad
    block_v, num_warps = _launch_config(V)
    _kl_div_bwd_kernel[(N,)](
        grad_kl, logits, ref_logits, max_p, max_q, log_s_p, mean_d, grad,
        V, logits.stride(0), ref_logits.stride(0), float(temperature),
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return grad
