"""Log-probs (and entropy) of labels under softmax(hidden @ weight.T + bias), never materializing the [N, V] logits.

Formulas (../shared/FORMULAS.md) with z = (hidden @ weight.T + bias) / temperature over the vocabulary V:
  logp[n]    = z[n, y_n] - logsumexp(z[n])            (0 where y_n == ignore_index, with no gradient)
  entropy[n] = logsumexp(z[n]) - sum_v softmax(z[n])_v z[n, v]

Algorithm. The N tokens are processed in chunks of ``rows`` tokens, with rows * V * 4 bytes <= CHUNK_BYTES. Per chunk:
  forward:  logits = hidden[chunk] @ weight.T (+ bias), one GEMM in the input dtype (the CPU BLAS or cuBLAS, as the
            model's lm_head would compute it); the fused kernel rlhf_fast::logprobs_entropy turns it into
            (logp, entropy, lse) in float32.
  backward: the chunk's logits are recomputed (one GEMM), rlhf_fast::logprobs_entropy_backward turns them into
            grad_logits, which is folded at once into grad_hidden[chunk] = grad_logits @ weight and
            grad_weight += grad_logits.T @ hidden[chunk] (float32 accumulator), grad_bias += column sums.
So peak extra memory is two chunks (logits, grad_logits) plus the float32 grad_weight, whatever N is.

Why recompute instead of computing grad_logits in the forward (Liger's fused linear cross-entropy does that): the
upstream gradient here is a per-token vector (e.g. PPO's advantage * ratio) known only in backward, and
grad_weight = sum_n g_n (onehot(y_n) - p_n) hidden_n^T cannot be formed before g is known without keeping the [N, V]
probabilities. The price is a fourth GEMM: forward + backward costs 4 GEMMs of 2*N*H*V FLOPs each, 4/3 of the
three-GEMM floor (logits, grad_hidden, grad_weight).

The vocabulary is not chunked: the fused kernel needs whole rows, and at CHUNK_BYTES a chunk still holds >= 256
tokens for V <= 256k, enough for an efficient GEMM. The chunk size depends only on N and V (no query of free
memory): no host synchronisation anywhere in the op.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from .token_logprobs import LOGPROBS_BACKENDS, logprobs_entropy_backward_op, logprobs_entropy_op

LINEAR_LOGPROBS_BACKENDS = LOGPROBS_BACKENDS  # the backend of the fused log-prob kernel used on each chunk
OP_BACKENDS = {"linear_logprobs": LINEAR_LOGPROBS_BACKENDS}

# Budget of one chunk of float32 logits. On the CPU, 64 MiB measured as fast as 256 MiB at N=4096, H=1024, V=32000
# (the GEMMs dominate) with a quarter of the memory; on a GPU larger chunks keep cuBLAS busy.
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
_DEFAULT_CHUNK_BYTES = 256 << 20


def linear_logprobs_ref(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                        temperature: float = 1.0, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """The obvious computation: full logits, then log_softmax. Returns (logp, entropy), float32 [...]."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    keep = labels != ignore_index
    picked = logp_all.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return torch.where(keep, picked, 0.0), entropy


def chunk_rows(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Tokens per chunk: balanced chunks whose float32 logits fit CHUNK_BYTES (at least one token)."""
    budget = CHUNK_BYTES.get(device.type, _DEFAULT_CHUNK_BYTES)
    max_rows = max(1, budget // (4 * vocab))
    n_chunks = max(1, -(-n_tokens // max_rows))
    return max(1, -(-n_tokens // n_chunks))


# ---------------------------------------------------------------------------------------------------------------
# Chunked forward and backward on 2-D inputs (already validated): hidden [N, H], weight [V, H], bias [V] or None,
# labels [N] int64.
# ---------------------------------------------------------------------------------------------------------------


def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if bias is None:
        return torch.mm(h, weight.t())
    return torch.addmm(bias, h, weight.t())


def _linear_logprobs_fwd(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, rows, backend):
    n = hidden.shape[0]
    logp, entropy, lse = (hidden.new_empty(n, dtype=torch.float32) for _ in range(3))
    for start in range(0, n, rows):
        end = min(start + rows, n)
        logits = _chunk_logits(hidden[start:end], weight, bias)
        out = logprobs_entropy_op(logits, labels[start:end], temperature, ignore_index, compute_entropy, backend)
        for dst, src in zip((logp, entropy, lse), out):
            dst[start:end] = src
    return logp, entropy, lse


def _addmm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with float32 products and sums, whatever the dtype of a and b."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # no bf16 -> fp32 GEMM on the CPU; an fp32 GEMM of upcast operands is also faster there than a bf16 one
        acc.addmm_(a.float(), b.float())


def _linear_logprobs_bwd(grad_logp, grad_entropy, grad_lse, hidden, weight, bias, labels, lse, entropy, temperature,
                         ignore_index, rows, need_hidden, need_weight, need_bias, backend):
    n = hidden.shape[0]
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
    if need_hidden or need_weight or need_bias:
        for start in range(0, n, rows):
            end = min(start + rows, n)
            h = hidden[start:end]
            logits = _chunk_logits(h, weight, bias)
            grad_logits = logprobs_entropy_backward_op(
                grad_logp[start:end], grad_entropy[start:end], grad_lse[start:end], logits, labels[start:end],
                lse[start:end], entropy[start:end], temperature, ignore_index, backend)
            del logits  # keep one [rows, V] buffer alive during the gradient GEMMs, not two
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if need_weight:
                _addmm_fp32(grad_weight, grad_logits.t(), h)
            if need_bias:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
    grad_weight = grad_weight.to(weight.dtype) if need_weight else weight.new_empty(0)
    grad_bias = grad_bias.to(bias.dtype) if need_bias else weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------------------------
# Custom ops with fake and autograd implementations.
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("rlhf_fast::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float, ignore_index: int,
    compute_entropy: bool, rows: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V] or None (one float dtype), labels [N] int64
    -> (logp, entropy, lse), float32 [N] each; entropy is zeros unless compute_entropy. ``rows``: tokens per chunk."""
    return _linear_logprobs_fwd(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, rows,
                                backend)


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, rows, backend):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("rlhf_fast::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(
    grad_logp: Tensor, grad_entropy: Tensor, grad_lse: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    labels: Tensor, lse: Tensor, entropy: Tensor, temperature: float, ignore_index: int, rows: int,
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in the input dtype; each one not needed is an
    empty tensor [0]. grad_* inputs are float32 [N]."""
    return _linear_logprobs_bwd(grad_logp, grad_entropy, grad_lse, hidden, weight, bias, labels, lse, entropy,
                                temperature, ignore_index, rows, need_hidden, need_weight, need_bias, backend)


@linear_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, grad_lse, hidden, weight, bias, labels, lse, entropy, temperature, ignore_index, rows,
      need_hidden, need_weight, need_bias, backend):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


def _linear_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, rows, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.args = (temperature, ignore_index, compute_entropy, rows, backend)


def _zeros_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.float().contiguous()


def _linear_logprobs_grad(ctx, grad_logp, grad_entropy, grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, rows, backend = ctx.args
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    grad_hidden, grad_weight, grad_bias = linear_logprobs_backward_op(
        _zeros_if_none(grad_logp, lse), _zeros_if_none(grad_entropy if compute_entropy else None, lse),
        _zeros_if_none(grad_lse, lse), hidden, weight, bias, labels, lse, entropy, temperature, ignore_index, rows,
        need_hidden, need_weight, need_bias, backend)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, None, None, None, None, None, None)


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
                    temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False):
    """Log-probability of each label under softmax((hidden @ weight.T + bias) / temperature), chunked over tokens.

    hidden: [N, H] or [B, T, H] float32/bf16/fp16; weight: [V, H] (the lm_head or tied embedding), same dtype;
    bias: [V] or None, same dtype; labels: hidden.shape[:-1] int64 in [0, V) or ``ignore_index``.
    Returns logp, float32 of shape hidden.shape[:-1] (0 and no gradient where the label is ignore_index); with
    ``return_entropy`` the tuple (logp, entropy), entropy computed at every position.
    Differentiable w.r.t. hidden, weight and bias. The GEMMs run in the input dtype; log-prob math, the entropy and
    the grad_weight/grad_bias accumulation are float32.
    """
    temperature = _checks.positive_number(temperature, "temperature")
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    _check_inputs(hidden, weight, labels, bias, ignore_index)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    backend = _backend.select("linear_logprobs", LINEAR_LOGPROBS_BACKENDS, hidden.device)
    rows_2d = hidden.reshape(-1, hidden.shape[-1])
    rows_2d = rows_2d if rows_2d.is_contiguous() else rows_2d.contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    rows = chunk_rows(rows_2d.shape[0], weight.shape[0], hidden.device)
    logp, ent, _ = linear_logprobs_op(rows_2d, weight, bias, flat_labels, temperature, ignore_index, return_entropy,
                                      rows, backend)
    batch_shape = hidden.shape[:-1]
    if return_entropy:
        return logp.view(batch_shape), ent.view(batch_shape)
    return logp.view(batch_shape)
