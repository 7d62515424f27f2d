"""Weighted cross-entropy (negative log-likelihood) from hidden states: the SFT loss with the gradients formed in the
forward, three GEMMs in all, never materializing the [N, V] logits.

Formulas (docs/formulas.md), z = (hidden @ weight.T + bias) / temperature over the vocabulary V:
  loss = sum_n c_n * -logp[n],  logp[n] = z[n, y_n] - logsumexp(z[n])
  c_n  = w_n / sum_{kept m} w_m   (reduction="mean"; w = 1 without ``weights``)   or   w_n   (reduction="sum")
  and c_n = 0 where y_n == ignore_index.

Why a separate op from linear_logprobs: there the upstream gradient is a per-token vector known only in backward,
so the logits are computed twice (4 GEMMs; see linear_logprobs.py). Here d loss / d logp_n = -c_n is known before
the forward, so each chunk of rows, with its whole vocabulary, goes once through
  logits = hidden[rows] @ weight.T (+ bias)                        GEMM 1
  (logp, lse) and grad_logits = -c (onehot(y) - p) / T           the fused log-prob kernels of token_logprobs
  grad_hidden[rows] = grad_logits @ weight                         GEMM 2
  grad_weight += grad_logits.T @ hidden[rows]                      GEMM 3 (float32 accumulation)
and backward only scales the saved gradients by the upstream scalar. Peak extra memory: two [rows, V] chunks plus
the gradients themselves (and a float32 [V, H] accumulator when the weight is bf16/fp16). Without grad mode or a
tensor that requires grad, the forward runs GEMM 1 only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from .linear_logprobs import LINEAR_LOGPROBS_BACKENDS, _balanced, _check_inputs, _gemm, _row_chunks, _tile_logits
from .token_logprobs import _logprobs_bwd_over_logits, _logprobs_fwd, logprobs_ref

OP_BACKENDS = {"linear_cross_entropy": LINEAR_LOGPROBS_BACKENDS}

# Budget of one [rows, V] chunk of float32 logits. CPU, N=4096, H=1024, V=32000 fp32 forward+backward: 128, 256,
# 512 and 1024 rows (16-128 MiB) took 11.5, 8.7, 8.2, 8.8 s (one run each, noisy 2-core box): 64 MiB = 512 rows.
# CUDA: 256 MiB as linear_logprobs (not yet measured on a GPU for this op).
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}


def chunk_rows(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: the chunk's float32 logits fit CHUNK_BYTES, at least one row, equal-sized chunks."""
    return _balanced(n_tokens, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // (4 * vocab), 1)


def linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, labels: Tensor, coef: Tensor,
                             bias: Optional[Tensor] = None, temperature: float = 1.0,
                             ignore_index: int = -100) -> Tensor:
    """The obvious computation: full logits in the input dtype, the log-prob reference, -sum(coef * logp)."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return -(coef * logprobs_ref(logits, labels, temperature, ignore_index)).sum()


def _linear_cross_entropy_fwd(hidden, weight, bias, labels, coef, temperature, ignore_index, rows, need_grads,
                              backend):
    n, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    need_hidden, need_weight, need_bias = need_grads
    grad_hidden = torch.empty(hidden.shape, **f32) if need_hidden else hidden.new_empty(0)
    # float32 inputs: the output is the accumulator; else a float32 [V, H] accumulator, rounded once at the end
    grad_weight = torch.empty(weight.shape, **f32) if need_weight else weight.new_empty(0)
    grad_bias = torch.zeros(vocab, **f32) if need_bias else weight.new_empty(0)
    loss = torch.zeros((), **f32)
    grad_logp = -coef.float()
    no_grad = torch.zeros(min(rows, n), **f32)  # entropy and lse carry no gradient here
    buffer = hidden.new_empty(min(rows, n), vocab)  # every chunk's logits, then their gradient
    for start, end in _row_chunks(n, rows):
        h = hidden[start:end]
        logits = _tile_logits(h, weight, bias, 0, vocab, out=buffer)
        logp, entropy, lse, _ = _logprobs_fwd(backend, logits, labels[start:end], None, temperature, ignore_index,
                                              False)
        loss = loss + (grad_logp[start:end] * logp).sum()
        if not any(need_grads):
            continue
        zeros = no_grad[:end - start]
        grad_logits = _logprobs_bwd_over_logits(backend, grad_logp[start:end], zeros, zeros, None, logits,
                                                labels[start:end], None, lse, None, entropy, temperature, ignore_index)
        del logits
        if need_hidden:
            _gemm(grad_hidden[start:end], grad_logits, weight, accumulate=False)
        if need_weight:
            _gemm(grad_weight, grad_logits.t(), h, accumulate=start > 0)
        if need_bias:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)
        del grad_logits
    if n == 0:
        grad_weight.zero_()
    return (loss, grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype) if need_bias else grad_bias)


@torch.library.custom_op("rlhf_fast::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, coef: Tensor, temperature: float,
    ignore_index: int, rows: int, need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] or None (one float dtype), labels [N] int64, coef [N] float32
    -> (loss, a float32 scalar; grad_hidden [N, H], grad_weight [V, H], grad_bias [V] of the loss, in the input
    dtype, each one not needed an empty tensor [0]). Chunks of ``rows`` rows."""
    return _linear_cross_entropy_fwd(hidden, weight, bias, labels, coef, temperature, ignore_index, rows,
                                     (need_hidden, need_weight, need_bias), backend)


@linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, coef, temperature, ignore_index, rows, need_hidden, need_weight, need_bias,
      backend):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


# The autograd of every loss whose gradients are formed in the forward (this one, linear_ppo_loss, linear_dpo_loss):
# the op returns them as its last three outputs, and backward only scales them by the upstream gradient.


def _scale(g: Tensor, grad_loss: Tensor) -> Tensor:
    # Eager: in place, so that no second [V, H] gradient exists; the saved tensors are released after backward
    # returns and autograd adopts them as .grad without a copy (a second backward through the same graph fails
    # autograd's in-place check: a clear error). Traced (torch.compile, opcheck): out of place, as functional
    # graphs require; the compiler plans the buffers there.
    if type(g) is torch.Tensor:
        return g.mul_(grad_loss.to(g.dtype))
    return g * grad_loss.to(g.dtype)


def setup_grads_in_forward(first_need: int):
    """setup_context for an op whose output 0 is the loss and whose last three outputs are the gradients of hidden,
    weight and bias, with the need_hidden / need_weight / need_bias flags at inputs[first_need:first_need + 3]."""
    def setup(ctx, inputs, output):
        # only the loss is differentiable; no zero gradients for the other outputs (two of them [V, H] and [N, H])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*output[-3:])
        ctx.needs = inputs[first_need:first_need + 3]
        ctx.n_inputs = len(inputs)
    return setup


def _needs(hidden, weight, bias) -> list[bool]:
    """The need_hidden / need_weight / need_bias flags of such an op."""
    on = torch.is_grad_enabled()
    return [on and x is not None and x.requires_grad for x in (hidden, weight, bias)]


def grads_in_forward(ctx, grad_loss, *_):
    scaled = [_scale(g, grad_loss) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs)]
    return (*scaled, *[None] * (ctx.n_inputs - 3))


linear_cross_entropy_op.register_autograd(grads_in_forward, setup_context=setup_grads_in_forward(8))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, weights: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                         reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``labels`` under softmax((hidden @ weight.T + bias) / temperature), optionally weighted per
    token; the gradients are formed in the forward (3 GEMMs, no [N, V] logits kept).

    hidden: [N, H] or [B, T, H] float32/bf16/fp16; weight: [V, H]; bias: [V] or None (same dtype); labels:
    hidden.shape[:-1] int64 in [0, V) or ``ignore_index``; weights: hidden.shape[:-1] float or None (all 1).
    reduction "mean": sum_n w_n * -logp_n / sum_n w_n over the tokens not ignored (0 when there are none); "sum":
    the numerator alone. Returns a float32 scalar, differentiable w.r.t. hidden, weight and bias (not weights).
    """
    temperature = _checks.temperature(temperature)
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    _check_inputs(hidden, weight, labels, bias, ignore_index)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    keep = labels != ignore_index
    if weights is None:
        w = keep.float()
    else:
        _checks.float_tensor(weights, "weights")
        _checks.same_shape(weights, "weights", labels.shape, "labels.shape")
        _checks.same_device(weights, "weights", hidden, "hidden")
        _checks.non_negative(weights, "weights")
        w = torch.where(keep, weights.detach().float(), 0.0)
    coef = w / w.sum().clamp_min(torch.finfo(torch.float32).tiny) if reduction == "mean" else w
    backend = _backend.select("linear_cross_entropy", LINEAR_LOGPROBS_BACKENDS, hidden.device)
    rows_2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    needs = _needs(hidden, weight, bias)
    rows = chunk_rows(rows_2d.shape[0], weight.shape[0], hidden.device)
    loss, *_ = linear_cross_entropy_op(rows_2d, weight, bias, labels.reshape(-1).contiguous(),
                                       coef.reshape(-1).contiguous(), temperature, ignore_index, rows, *needs, backend)
    return loss
