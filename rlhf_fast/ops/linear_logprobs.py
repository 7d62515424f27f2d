"""Log-probs (and entropy) of labels under softmax(hidden @ weight.T + bias), never materializing the [N, V] logits.

Formulas (docs/formulas.md) with z = (hidden @ weight.T + bias) / temperature over the vocabulary V:
  logp[n]    = z[n, y_n] - logsumexp(z[n])            (0 where y_n == ignore_index, with no gradient)
  entropy[n] = logsumexp(z[n]) - sum_v softmax(z[n])_v z[n, v]
  with kept_threshold m: logp[n] = z[n, y_n] - logsumexp_{v in K_n} z[n, v], K_n = {v : logits[n, v] >= m_n} | {y_n}

Algorithm. The [N, V] logits are computed tile by tile, a tile being [rows, cols] with rows * cols * 4 bytes <=
CHUNK_BYTES (tile_shape). Per tile:
  forward:  logits = hidden[rows] @ weight[cols].T (+ bias[cols]), one GEMM in the input dtype (the CPU BLAS or
            cuBLAS, as the model's lm_head computes it); the fused kernel rlhf_fast::logprobs_entropy reduces it to
            per-tile (logp, entropy, lse) in float32 with the label made local to the tile, and the tiles of a row
            are merged: lse = logsumexp_c lse_c, z_y = logp_c + lse_c from the tile holding the label,
            entropy = sum_c w_c (entropy_c - log w_c) with w_c = exp(lse_c - lse); with a kept threshold, likewise
            lse_kept = logsumexp_c lse_kept_c (the tile holding the label adds it to its kept set) and
            z_y = logp_c + lse_kept_c.
  backward: the tile's logits are recomputed (one GEMM), rlhf_fast::logprobs_entropy_backward turns them into
            grad_logits with the row's global lse and entropy (for rows whose label lies in another tile, the -g
            of d logp / d lse is passed as a gradient of lse, or of lse_kept with a kept threshold), and the tile is
            folded at once into
            grad_hidden[rows] += grad_logits @ weight[cols] and grad_weight[cols] += grad_logits.T @ hidden[rows],
            both accumulated in float32 (_gemm), and grad_bias[cols] += its column sums.
Column tiles are the outer loop, so a float32 accumulator is [N, H] for grad_hidden and [cols, H] for grad_weight
(never [V, H]); with float32 inputs the outputs are the accumulators, and on CUDA, when one row tile covers N, each
[cols, H] slice of grad_weight is one GEMM written in place. The first product of each sum is written, not added to
zeros. Peak extra memory is two tiles (logits, grad_logits) plus those accumulators, whatever N and V are.

Why recompute instead of computing grad_logits in the forward (Liger's fused linear cross-entropy does that): the
upstream gradient here is a per-token vector (e.g. PPO's advantage * ratio) known only in backward, and
grad_weight = sum_n g_n (onehot(y_n) - p_n) hidden_n^T cannot be formed before g is known without keeping the [N, V]
probabilities. (Forming the unscaled grad_hidden rows (onehot - p) @ weight in the forward, to scale by g later,
is exact but moves a GEMM rather than saving one: grad_weight still needs p in backward. When the upstream gradient
is known before the forward, as in the SFT loss, linear_cross_entropy.py needs only 3 GEMMs.) The price is a fourth
GEMM: forward + backward costs 4 GEMMs of 2*N*H*V FLOPs each, 4/3 of the three-GEMM floor (logits, grad_hidden,
grad_weight). Measured on the 2-core CPU (process CPU time, 1 thread, N=2048, H=1024, V=32000 fp32, medians of 3):
forward + backward 8.9 s, 1.27x the three full-size GEMMs (7.0 s) and 0.93x four of them; the log-prob kernels are
~1.5 % of it, the rest is the tile GEMMs, at the full-size rate (~70 GFLOP/s per core, MKL and oneDNN alike). The
eager path is GEMM-bound there too (7.6 s, 1.09x the floor), so no 4-GEMM method matches it on that CPU.

Why 2-D tiles rather than token chunks with whole rows: every GEMM call repacks both operands, (rows + cols) * H
elements, so the total repacking is N*V*H*(1/rows + 1/cols), smallest for square tiles. On the (shared, noisy) 2-core
CPU at N=4096, H=1024, V=32000, token chunks of 256 rows made forward+backward 1.6-1.9x the three-GEMM floor, and
the logits GEMM of 256-row chunks ran at half the FLOP rate of 4096-row ones; square tiles of the same size measured
1.1-1.6x. The tile size depends only on N and V (no query of free memory): no host synchronisation in the op.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from .token_logprobs import (LOGPROBS_BACKENDS, _kept_threshold, _logprobs_bwd, _logprobs_fwd, entropy_ref,
                             kept_logprobs_ref, logprobs_ref)

LINEAR_LOGPROBS_BACKENDS = LOGPROBS_BACKENDS  # the backend of the fused log-prob kernel run on each tile
OP_BACKENDS = {"linear_logprobs": LINEAR_LOGPROBS_BACKENDS}

# Budget of one tile of float32 logits: the op's extra memory is about two tiles. On the CPU, 16, 32 and 64 MiB gave
# the same time within noise (N=4096, H=1024, V=32000, fp32; and in process CPU time, N=2048: 10.3, 10.5, 10.7 s):
# the smallest keeps memory lowest. On CUDA, 256 MiB keeps N <= 8192 tokens in one row of tiles ([8192, 8064] at
# V=128256, bf16: 2 x 132 MB), so that each grad_weight slice is one GEMM written in place.
CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}
_DEFAULT_CHUNK_BYTES = 256 << 20


def linear_logprobs_ref(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                        temperature: float = 1.0, ignore_index: int = -100,
                        kept_threshold: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The obvious computation: the full logits hidden @ weight.T + bias in the input dtype, then the log-prob
    references of token_logprobs (float32 math; kept_logprobs_ref with a kept threshold). Returns (logp, entropy)."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    if kept_threshold is None:
        logp = logprobs_ref(logits, labels, temperature, ignore_index)
    else:
        logp = kept_logprobs_ref(logits, labels, kept_threshold, temperature, ignore_index)
    return logp, entropy_ref(logits, temperature)


_COL_ALIGN = 64  # split columns come in multiples of 64: aligned tile rows


def tile_shape(n_tokens: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(rows, cols) of a logits tile: as square as N and V allow within CHUNK_BYTES, then balanced so that the
    tiles of each dimension have equal sizes (at least one token)."""
    budget = max(1, CHUNK_BYTES.get(device.type, _DEFAULT_CHUNK_BYTES) // 4)  # float32 elements
    side = math.isqrt(budget)
    if n_tokens * vocab <= budget:
        rows, cols = n_tokens, vocab
    elif vocab <= side:
        rows, cols = budget // vocab, vocab
    elif n_tokens <= side:
        rows, cols = n_tokens, budget // n_tokens
    else:
        rows = cols = side
    if _COL_ALIGN <= cols < vocab:
        return _balanced(n_tokens, rows, 1), _balanced(vocab, cols // _COL_ALIGN * _COL_ALIGN, _COL_ALIGN)
    return _balanced(n_tokens, rows, 1), _balanced(vocab, cols, 1)


def _balanced(total: int, most: int, align: int) -> int:
    """The size <= most, a multiple of align, of equal-sized parts covering total (the last part may be shorter)."""
    count = max(1, -(-total // max(1, most)))
    size = -(-total // count)
    return max(1, min(most, -(-size // align) * align))


# ---------------------------------------------------------------------------------------------------------------
# Chunked forward and backward on 2-D inputs (already validated): hidden [N, H], weight [V, H], bias [V] or None,
# labels [N] int64.
# ---------------------------------------------------------------------------------------------------------------


def _tile_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int,
                 out: Optional[Tensor] = None) -> Tensor:
    """h @ weight[v0:v1].T (+ bias), into ``out`` [rows >= len(h), v1 - v0] when given (its leading rows)."""
    if out is not None:
        out = out[:h.shape[0]]
        return torch.mm(h, weight[v0:v1].t(), out=out) if bias is None else \
            torch.addmm(bias[v0:v1], h, weight[v0:v1].t(), out=out)
    if bias is None:
        return torch.mm(h, weight[v0:v1].t())
    return torch.addmm(bias[v0:v1], h, weight[v0:v1].t())


def _label_tiles(labels: Tensor, keep: Tensor, vocab: int, cols: int) -> tuple[Tensor, Tensor]:
    """(tile, offset), int64 [N]: the column tile holding each label (-1 where it is ignored or outside [0, V)) and
    the label's column inside that tile. The labels local to tile c are where(tile == c, offset, -1): -1 is the
    tiles' ignore index."""
    in_range = keep & (labels >= 0) & (labels < vocab)
    tile = torch.where(in_range, labels // cols, -1)
    return tile, labels - tile * cols


def _row_chunks(n: int, rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def _linear_logprobs_fwd(hidden, weight, bias, labels, kept_threshold, temperature, ignore_index, compute_entropy,
                         rows, cols, backend):
    n, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    kept = kept_threshold is not None
    if n == 0:
        return tuple(torch.empty(0, **f32) for _ in range(4))
    keep = labels != ignore_index
    tile, offset = _label_tiles(labels, keep, vocab, cols)
    chunks = _row_chunks(n, rows)
    # per row chunk, over the column tiles seen so far: log-sum-exp, entropy of the softmax, and z[y] / T (from the
    # tile holding y). Few launches per tile: the kernels are called directly (this op is their custom-op wrapper's
    # peer), and the states are rebound rather than written into slices.
    lse = [torch.full((end - start,), float("-inf"), **f32) for start, end in chunks]
    entropy = [torch.zeros(end - start, **f32) for start, end in chunks]
    target = [torch.zeros(end - start, **f32) for start, end in chunks]
    lse_kept = [torch.full((end - start,), float("-inf"), **f32) if kept else None for start, end in chunks]
    for c, v0 in enumerate(range(0, vocab, cols)):
        v1 = min(v0 + cols, vocab)
        for k, (start, end) in enumerate(chunks):
            here = tile[start:end] == c
            logits = _tile_logits(hidden[start:end], weight, bias, v0, v1)
            lp_c, ent_c, lse_c, lse_kept_c = _logprobs_fwd(
                backend, logits, torch.where(here, offset[start:end], -1),
                kept_threshold[start:end] if kept else None, temperature, -1, compute_entropy)
            del logits
            target[k] = torch.where(here, lp_c + (lse_kept_c if kept else lse_c), target[k])
            if kept:
                lse_kept[k] = torch.logaddexp(lse_kept[k], lse_kept_c)
            new = torch.logaddexp(lse[k], lse_c)
            if compute_entropy:  # H = sum_c w_c (H_c - log w_c), w_c = exp(lse_c - lse): no cancellation
                w_old, w_c = torch.exp(lse[k] - new), torch.exp(lse_c - new)
                entropy[k] = (torch.where(w_old > 0, w_old * (entropy[k] + (new - lse[k])), 0.0)
                              + torch.where(w_c > 0, w_c * (ent_c + (new - lse_c)), 0.0))
            lse[k] = new
    lse, entropy, target = (x[0] if len(x) == 1 else torch.cat(x) for x in (lse, entropy, target))
    lse_kept = (lse_kept[0] if len(lse_kept) == 1 else torch.cat(lse_kept)) if kept else lse.new_empty(0)
    denominator = torch.where(lse.isnan(), lse, lse_kept) if kept else lse  # no distribution: NaN, as logprobs
    # an out-of-range label (unchecked on CUDA) gives NaN, as logprobs does
    logp = torch.where(keep, torch.where((labels >= 0) & (labels < vocab), target - denominator, float("nan")), 0.0)
    return logp, entropy, lse, lse_kept


def _mm_cast(acc: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """acc (+)= a.float() @ b.float(): exact products of low-precision values, float32 sums (a TF32 GEMM on CUDA
    too: TF32 holds bf16/fp16 values exactly)."""
    if accumulate:
        acc.addmm_(a.float(), b.float())
    else:
        torch.mm(a.float(), b.float(), out=acc)


def _mm_out_dtype(acc: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    if accumulate:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=acc)


def _mm_out_dtype_add(acc: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    if accumulate:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=acc)


_CUDA_MIXED_GEMMS = (_mm_out_dtype, _mm_out_dtype_add, _mm_cast)
_cuda_mixed_gemm = None  # the first of _CUDA_MIXED_GEMMS this torch accepts, found on first use


def _pick_cuda_mixed_gemm(device: torch.device):
    """cuBLAS can add a bf16/fp16 product into a float32 matrix in one GEMM (torch.addmm with out_dtype), but the
    torch versions differ in what they accept (some want `self` in the input dtype): probe the candidates on tiny
    tensors, once. A refusal is a host-side check: no synchronisation."""
    global _cuda_mixed_gemm
    if _cuda_mixed_gemm is None:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        for candidate in _CUDA_MIXED_GEMMS:
            try:
                candidate(torch.zeros(2, 2, device=device), a, a, True)
                candidate(torch.zeros(2, 2, device=device), a, a, False)
            except (RuntimeError, TypeError):
                continue
            _cuda_mixed_gemm = candidate
            break
    return _cuda_mixed_gemm


def _gemm(acc: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """acc = a @ b, or acc += a @ b with ``accumulate``, with float32 products and sums. acc is float32, or has the
    dtype of a and b (then the GEMM's float32 sums are rounded once, as a plain matmul rounds them); on the CPU a
    low-precision product goes through float32 operands (faster there than a bf16 GEMM, and exact)."""
    if acc.dtype == a.dtype:
        if accumulate:
            acc.addmm_(a, b)
        else:
            torch.mm(a, b, out=acc)
    elif acc.device.type == "cuda":
        _pick_cuda_mixed_gemm(acc.device)(acc, a, b, accumulate)
    else:
        _mm_cast(acc, a, b, accumulate)


def _linear_logprobs_bwd(grad_logp, grad_entropy, grad_lse, grad_lse_kept, hidden, weight, bias, labels,
                         kept_threshold, lse, lse_kept, entropy, temperature, ignore_index, rows, cols, need_hidden,
                         need_weight, need_bias, backend):
    n, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # grad_hidden is summed over the column tiles in float32 (the output itself when hidden is float32). A [cols, H]
    # slice of grad_weight is summed over the row tiles: in place when weight is float32 or, on CUDA, when there is
    # one row tile (one GEMM, rounded once); else in a float32 [cols, H] buffer. The first product of each sum is
    # written, not added: no zero fill.
    grad_hidden = torch.empty(hidden.shape, **f32) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.zeros(vocab, **f32) if need_bias else weight.new_empty(0)
    if n == 0 or not (need_hidden or need_weight or need_bias):  # no tokens: zero gradients
        return (grad_hidden.to(hidden.dtype), grad_weight.zero_(),
                grad_bias.to(bias.dtype) if need_bias else grad_bias)
    weight_in_place = weight.dtype == torch.float32 or (hidden.device.type == "cuda" and n <= rows)
    gw_buffer = None
    if need_weight and not weight_in_place:
        gw_buffer = torch.empty(min(cols, vocab), weight.shape[1], **f32)
    keep = labels != ignore_index
    tile, offset = _label_tiles(labels, keep, vocab, cols)
    g_kept = torch.where(tile >= 0, grad_logp, 0.0)  # no gradient where logp is 0 (ignored) or NaN (out of range)
    # d logp / d z = onehot(y) - p: on the tiles without the label, the -g p part goes through lse; with a kept
    # threshold, d logp / d z = onehot(y) - q and the -g q part goes through lse_kept (through lse on rows with
    # threshold -inf, where q = p: the kernels then compute exactly what they compute without a threshold)
    kept = kept_threshold is not None
    grad_lse_elsewhere, grad_lse_kept_elsewhere = grad_lse - g_kept, None
    if kept:
        full = kept_threshold == float("-inf")
        grad_lse_elsewhere = torch.where(full, grad_lse_elsewhere, grad_lse)
        grad_lse_kept_elsewhere = torch.where(full, grad_lse_kept, grad_lse_kept - g_kept)
    for c, v0 in enumerate(range(0, vocab, cols)):
        v1 = min(v0 + cols, vocab)
        gw = grad_weight[v0:v1] if gw_buffer is None else gw_buffer[:v1 - v0]
        for start, end in _row_chunks(n, rows):
            h, here = hidden[start:end], tile[start:end] == c
            logits = _tile_logits(h, weight, bias, v0, v1)
            grad_logits = _logprobs_bwd(
                backend, g_kept[start:end], grad_entropy[start:end],
                torch.where(here, grad_lse[start:end], grad_lse_elsewhere[start:end]),
                torch.where(here, grad_lse_kept[start:end], grad_lse_kept_elsewhere[start:end]) if kept else None,
                logits, torch.where(here, offset[start:end], -1), kept_threshold[start:end] if kept else None,
                lse[start:end], lse_kept[start:end] if kept else None, entropy[start:end], temperature, -1)
            del logits  # one [rows, cols] buffer alive during the gradient GEMMs, not two
            if need_hidden:
                _gemm(grad_hidden[start:end], grad_logits, weight[v0:v1], accumulate=v0 > 0)
            if need_weight:
                _gemm(gw, grad_logits.t(), h, accumulate=start > 0)
            if need_bias:
                grad_bias[v0:v1] += grad_logits.sum(0, dtype=torch.float32)
            del grad_logits  # freed before the next tile's logits are allocated
        if gw_buffer is not None:
            grad_weight[v0:v1] = gw
    return (grad_hidden.to(hidden.dtype) if need_hidden else grad_hidden, grad_weight,
            grad_bias.to(bias.dtype) if need_bias else grad_bias)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops with fake and autograd implementations.
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("rlhf_fast::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, kept_threshold: Optional[Tensor],
    temperature: float, ignore_index: int, compute_entropy: bool, rows: int, cols: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] or None (one float dtype), labels [N] int64, kept_threshold float32
    [N] or None -> (logp, entropy, lse, lse_kept), float32 [N] each; entropy is zeros unless compute_entropy;
    lse_kept is [0] without kept_threshold. Logits tiles: [rows, cols]."""
    return _linear_logprobs_fwd(hidden, weight, bias, labels, kept_threshold, temperature, ignore_index,
                                compute_entropy, rows, cols, backend)


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, kept_threshold, temperature, ignore_index, compute_entropy, rows, cols, backend):
    n = hidden.shape[0]
    lse_kept = hidden.new_empty(n if kept_threshold is not None else 0, dtype=torch.float32)
    return (*(hidden.new_empty(n, dtype=torch.float32) for _ in range(3)), lse_kept)


@torch.library.custom_op("rlhf_fast::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(
    grad_logp: Tensor, grad_entropy: Tensor, grad_lse: Tensor, grad_lse_kept: Optional[Tensor], hidden: Tensor,
    weight: Tensor, bias: Optional[Tensor], labels: Tensor, kept_threshold: Optional[Tensor], lse: Tensor,
    lse_kept: Optional[Tensor], entropy: Tensor, temperature: float, ignore_index: int, rows: int, cols: int,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the input dtype; each one not needed is an
    empty tensor [0]. grad_* inputs are float32 [N]; grad_lse_kept, kept_threshold, lse_kept: all three or none."""
    return _linear_logprobs_bwd(grad_logp, grad_entropy, grad_lse, grad_lse_kept, hidden, weight, bias, labels,
                                kept_threshold, lse, lse_kept, entropy, temperature, ignore_index, rows, cols,
                                need_hidden, need_weight, need_bias, backend)


@linear_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, grad_lse, grad_lse_kept, hidden, weight, bias, labels, kept_threshold, lse, lse_kept,
      entropy, temperature, ignore_index, rows, cols, need_hidden, need_weight, need_bias, backend):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


def _linear_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, labels, kept_threshold = inputs[:5]
    temperature, ignore_index, compute_entropy, rows, cols, backend = inputs[5:]
    _, entropy, lse, lse_kept = output
    ctx.save_for_backward(hidden, weight, bias, labels, kept_threshold, lse, lse_kept, entropy)
    ctx.args = (temperature, ignore_index, compute_entropy, rows, cols, backend)


def _zeros_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.float().contiguous()


def _linear_logprobs_grad(ctx, grad_logp, grad_entropy, grad_lse, grad_lse_kept):
    hidden, weight, bias, labels, kept_threshold, lse, lse_kept, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, rows, cols, backend = ctx.args
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    kept = kept_threshold is not None
    grad_hidden, grad_weight, grad_bias = linear_logprobs_backward_op(
        _zeros_if_none(grad_logp, lse), _zeros_if_none(grad_entropy if compute_entropy else None, lse),
        _zeros_if_none(grad_lse, lse), _zeros_if_none(grad_lse_kept, lse) if kept else None, hidden, weight, bias,
        labels, kept_threshold, lse, lse_kept if kept else None, entropy, temperature, ignore_index, rows, cols,
        need_hidden, need_weight, need_bias, backend)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, None, None, None, None, None, None, None, None)


linear_logprobs_op.register_autograd(_linear_logprobs_grad, setup_context=_linear_logprobs_setup)


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, labels, bias, ignore_index) -> None:
    _checks.float_tensor(hidden, "hidden")
    _checks.float_tensor(weight, "weight")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    _checks.same_device(weight, "weight", hidden, "hidden")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        _checks.tensor(bias, "bias")
        _checks.same_shape(bias, "bias", weight.shape[:1], "[V], V = weight.shape[0]")
        _checks.same_device(bias, "bias", hidden, "hidden")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    _checks.tensor(labels, "labels")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 (torch.long), got {labels.dtype}")
    _checks.same_shape(labels, "labels", hidden.shape[:-1], "hidden.shape[:-1]")
    _checks.same_device(labels, "labels", hidden, "hidden")
    # The range check reads the labels: eager CPU only (no host sync on CUDA; the kernels give NaN there).
    if labels.device.type == "cpu" and not torch.compiler.is_compiling() and labels.numel() > 0:
        vocab = weight.shape[0]
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"labels{list(index)} = {int(labels[index])} is outside [0, {vocab}) "
                             f"(V = weight.shape[0]) and is not ignore_index={ignore_index}")


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                    temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    kept_threshold: Optional[Tensor] = None):
    """Log-probability of each label under softmax((hidden @ weight.T + bias) / temperature), in logits tiles.

    hidden: [N, H] or [B, T, H] float32/bf16/fp16; weight: [V, H] (the lm_head or tied embedding), same dtype;
    bias: [V] or None, same dtype; labels: hidden.shape[:-1] int64 in [0, V) or ``ignore_index``.
    Returns logp, float32 of shape hidden.shape[:-1] (0 and no gradient where the label is ignore_index); with
    ``return_entropy`` the tuple (logp, entropy), entropy computed at every position.
    Differentiable w.r.t. hidden, weight and bias. The GEMMs run in the input dtype; log-prob math, the entropy and
    the grad_weight/grad_bias accumulation are float32.
    kept_threshold: None, or float32 of labels' shape (the sampler's raw-logit threshold, -inf = everything kept):
    the log-probs are renormalised over {v : logits_v >= kept_threshold} plus the label (docs/formulas.md,
    "Kept-set log-probs"); the entropy stays the full-softmax entropy.
    """
    temperature = _checks.temperature(temperature)
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    _check_inputs(hidden, weight, labels, bias, ignore_index)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    kept_threshold = _kept_threshold(kept_threshold, labels)
    backend = _backend.select("linear_logprobs", LINEAR_LOGPROBS_BACKENDS, hidden.device)
    rows_2d = hidden.reshape(-1, hidden.shape[-1])
    rows_2d = rows_2d if rows_2d.is_contiguous() else rows_2d.contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    rows, cols = tile_shape(rows_2d.shape[0], weight.shape[0], hidden.device)
    logp, ent, _, _ = linear_logprobs_op(rows_2d, weight, bias, flat_labels, kept_threshold, temperature,
                                         ignore_index, return_entropy, rows, cols, backend)
    batch_shape = hidden.shape[:-1]
    if return_entropy:
        return logp.view(batch_shape), ent.view(batch_shape)
    return logp.view(batch_shape)
