"""Batched sampling from logits with temperature, top-k, top-p and min-p, without sorting the vocabulary, returning the
sampled token together with its log-prob (the behaviour log-prob PPO needs, so nothing has to recompute it).

Semantics (docs/formulas.md, "Sampling"), per row of logits [B, V], with p = softmax(logits / temperature):
  top-k keeps the k largest p (every tie of the k-th value); top-p then keeps, of the renormalised result, the smallest
  set in descending order whose mass reaches top_p (every tie at the boundary); min-p then keeps p_v >= min_p * max p.
  top_k = 0, top_p = 1 and min_p = 0 disable a filter; temperature = 0 is greedy (argmax, ties -> the lowest id).
Each filter keeps {v : p_v >= threshold}, so the kept set is one threshold per row; the fast backends find the
thresholds by bisection over the row (no sort), see csrc/cpu/sampling.cpp and kernels/sampling.py.

Randomness: one uniform u per row, ``torch.rand(B, generator=generator)`` on the logits' device; the token is the first
v, in index order, whose running kept mass exceeds u times the kept mass (inverse CDF). Every backend follows this
rule, so with the same generator state they return the same tokens, up to floating-point rounding when u falls within
rounding distance of a boundary between two tokens. Nothing synchronises with the host, except the NaN check on CPU.
Under ``torch.compile(fullgraph=True)`` a generator works too (the uniforms then come from the ``rlhf_fast::uniforms``
op, below): the same draws as eager for the same generator state.

Outputs: tokens int64 [B]; logprobs float32 [B] = log p[token] under the unfiltered temperature-scaled distribution
(0 for greedy rows: the temperature -> 0 limit is a point mass on the argmax); optionally filtered_logprobs float32
[B] = the log-prob under the renormalised kept set (also 0 for greedy rows) and kept_threshold float32 [B] = the
midpoint between the smallest RAW logit (as given, in float32, before the temperature) of the kept set and the
largest raw logit below it (``threshold_with_margin``). p is a non-decreasing function of the raw logit, so the kept
set is exactly {v : logits_v >= kept_threshold}: the trainer rebuilds the sampler's support from it, with a margin of
half the gap for its own rounding (docs/formulas.md, "Kept threshold"). -inf for a row without an active filter
(top_k in (0, V), top_p < 1 or min_p > 0: everything is kept); for a greedy row the kept set is the argmax and its
ties; NaN where the log-prob is NaN. Each backend takes the min over its own kept set in a pass that already visits
it; the margin is one more pass. A token whose probability underflows to 0 in float32 carries no mass: the reference keeps such tokens when top-k's
k-th value underflows, the kernels drop them (they draw from e > 0 only), so only there the thresholds differ. The
equality of the two sets needs the backend's exp to be monotone; the CPU kernel's vectorised exp (exp_u20, AVX-512)
steps back by 1 ulp at 2899 of the ~1.1e9 floats in [-88.5, 0], so a row whose boundary falls exactly on such a step,
between two tokens whose scaled logits are 1 ulp apart, could differ by that one boundary token.

NaN: on CPU, a row of logits with NaN or +inf, or without any finite value, raises ValueError (checked on the [B]
outputs, so without an extra pass over the logits). On CUDA nothing is checked (it would synchronise): such a row
gets a NaN log-prob and an unspecified token id in [0, V). Likewise the per-row parameter tensors are range-checked
only on CPU; on CUDA out-of-range values are clamped (temperature <= 0: greedy; top_k <= 0 or >= V: off; top_p >= 1:
off; top_p <= 0: only the max; min_p > 1: only the max).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _backend
from . import _checks

SAMPLE_BACKENDS = ("torch", "cpp", "cuda", "triton")
OP_BACKENDS = {"sample": SAMPLE_BACKENDS}  # public op -> backends implementing it (shown by `rlhf-fast info`)

Number = Union[int, float]


# ---------------------------------------------------------------------------------------------------------------
# Reference (also the torch backend): sort-based, short and obviously correct. Computes in float64 when given float64.
# ---------------------------------------------------------------------------------------------------------------


def kept_mask_ref(probs: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """probs [B, V] (rows of a softmax); top_k int [B], top_p, min_p float [B] -> bool [B, V]: the tokens kept by
    top-k, then top-p on the renormalised result, then min-p (docs/formulas.md), ties at each threshold all kept."""
    B, V = probs.shape
    sorted_p = probs.sort(dim=-1, descending=True).values
    k = torch.where((top_k > 0) & (top_k < V), top_k, V).clamp(min=1)
    keep = probs >= sorted_p.gather(1, (k - 1)[:, None])
    # top-p: the threshold is the value at the first sorted position whose cumulative mass reaches top_p * (kept mass)
    q = torch.where(keep, probs, 0.0)
    q_sorted = q.sort(dim=-1, descending=True).values
    cum = q_sorted.cumsum(-1)
    target = top_p.to(probs.dtype)[:, None] * cum[:, -1:]
    j = torch.searchsorted(cum, target).clamp(max=V - 1)
    keep = keep & ((q >= q_sorted.gather(1, j)) | (top_p >= 1)[:, None])
    return keep & (probs >= min_p.to(probs.dtype)[:, None] * probs.max(dim=-1, keepdim=True).values)


def filter_active(V: int, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """bool [B]: the rows where some filter is on (top_k in (0, V), top_p < 1 or min_p > 0)."""
    return ((top_k > 0) & (top_k < V)) | (top_p < 1) | (min_p > 0)


def sample_ref(logits: Tensor, uniforms: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [B, V]; uniforms, temperature, top_p, min_p float [B]; top_k int [B] -> (tokens int64 [B], logprobs
    float32 [B], filtered_logprobs float32 [B], kept_threshold float32 [B]), by the rules in the module docstring."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    V = logits.shape[-1]
    greedy = ~(temperature > 0)
    t = torch.where(greedy, 1.0, temperature).to(dtype)
    logp = torch.log_softmax(logits.to(dtype) / t[:, None], dim=-1)
    keep = kept_mask_ref(logp.exp(), top_k, top_p, min_p)
    kept = torch.where(keep, logp.exp(), 0.0)
    cdf = kept.cumsum(-1)
    sampled = torch.searchsorted(cdf, uniforms.to(dtype)[:, None] * cdf[:, -1:], right=True).squeeze(-1)
    tokens = torch.where(greedy, logits.argmax(-1), sampled.clamp(max=V - 1))
    lp = logp.gather(1, tokens[:, None]).squeeze(-1)
    flp = lp - kept.sum(-1).log()
    x = logits.float()
    row_max = x.max(-1).values
    greedy_lp = torch.where(row_max.isfinite(), 0.0, float("nan")).to(dtype)
    lp = torch.where(greedy, greedy_lp, lp).float()
    threshold = torch.where(keep, x, float("inf")).amin(-1)
    threshold = torch.where(filter_active(V, top_k, top_p, min_p), threshold, float("-inf"))
    threshold = torch.where(lp.isnan(), float("nan"), torch.where(greedy, row_max, threshold))
    return tokens, lp, torch.where(greedy, greedy_lp, flp).float(), threshold


# ---------------------------------------------------------------------------------------------------------------
# Custom op (validated inputs: 2-D logits with unit stride in V, per-row parameter tensors) and its fake.
# ---------------------------------------------------------------------------------------------------------------


def _triton():
    from ..kernels import sampling as triton_sampling  # imported on first use: importing triton is slow

    return triton_sampling


@torch.library.custom_op("rlhf_fast::sample", mutates_args=())
def sample_op(logits: Tensor, uniforms: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [B, V] float32/bf16/fp16; uniforms, temperature, top_p, min_p float32 [B]; top_k int64 [B]
    -> (tokens int64 [B], logprobs float32 [B], filtered_logprobs float32 [B], kept_threshold float32 [B])."""
    args = (logits, uniforms, temperature, top_k, top_p, min_p)
    if backend == "torch":
        tokens, logprobs, filtered, kept_min = sample_ref(*args)
    elif backend == "triton":
        tokens, logprobs, filtered, kept_min = _triton().sample(*args)
    else:  # cpp / cuda: the compiled op dispatches on the device
        tokens, logprobs, filtered, kept_min = torch.ops.rlhf_fast_C.sample(*args)
    return tokens, logprobs, filtered, threshold_with_margin(logits, kept_min)


def threshold_with_margin(logits: Tensor, kept_min: Tensor) -> Tensor:
    """The kept threshold from the smallest kept raw logit ``kept_min`` [B] (what the backends return): the midpoint
    between it and the largest raw logit below it, so {v : logits_v >= threshold} is still exactly the kept set, and a
    trainer whose recomputed logits differ from the sampler's by rounding rebuilds the same set (a threshold AT the
    smallest kept logit would drop that token whenever the recomputed value came out lower: a ratio bias of that
    token's probability). kept_min itself where nothing lies below it or the midpoint rounds onto the lower logit;
    -inf (no filter) and NaN stay. One pass over the logits, none on the CPU when no row is filtered."""
    if kept_min.device.type == "cpu" and bool(torch.isneginf(kept_min).all()):
        return kept_min
    below = logits.masked_fill(logits >= kept_min[:, None], float("-inf")).amax(-1).float()  # kept_min: a logit
    mid = below + (kept_min - below) * 0.5
    return torch.where(below.isfinite() & (mid > below) & (mid <= kept_min), mid, kept_min)


@sample_op.register_fake
def _(logits, uniforms, temperature, top_k, top_p, min_p, backend):
    B = logits.shape[0]
    return (logits.new_empty(B, dtype=torch.int64), *(logits.new_empty(B, dtype=torch.float32) for _ in range(3)))


# The uniforms. torch.compile (dynamo) cannot put a torch.Generator into a graph (it has no proxy for one:
# ``torch.rand(..., generator=g)`` is a graph break), so under compilation the draw goes through a custom op that takes
# an int key instead: the key is computed, and the generator recorded under it, while dynamo traces (an
# assume_constant_result function runs then, with the real object), and the compiled graph is guarded on that generator.
# The record holds one strong reference per generator a graph was compiled for (so a key is never reused), bounded by
# torch.compile's recompile limit. Eager calls never touch it.
_TRACED_GENERATORS: dict[int, torch.Generator] = {}


@torch.compiler.assume_constant_result
def _generator_key(generator: torch.Generator) -> int:
    _TRACED_GENERATORS[id(generator)] = generator
    return id(generator)


@torch.library.custom_op("rlhf_fast::uniforms", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def uniforms_op(like: Tensor, generator_key: int) -> Tensor:
    """float32 [like.shape[0]] uniforms in [0, 1) from the generator recorded under ``generator_key``, on like's device
    (the same numbers as ``torch.rand(like.shape[0], generator=generator)``)."""
    return torch.rand(like.shape[0], generator=_TRACED_GENERATORS[generator_key], device=like.device,
                      dtype=torch.float32)


@uniforms_op.register_fake
def _(like, generator_key):
    return like.new_empty(like.shape[0], dtype=torch.float32)


def _uniforms(logits: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if generator is not None and torch.compiler.is_compiling():
        return uniforms_op(logits, _generator_key(generator))
    return torch.rand(logits.shape[0], generator=generator, device=logits.device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Public API: validation, per-row parameters, the uniforms, backend choice.
# ---------------------------------------------------------------------------------------------------------------

# name -> (integer?, allowed range as text, test on a Python number / on a tensor)
_PARAMS = {
    "temperature": (False, f"0 or in [{_checks.MIN_TEMPERATURE:.4g}, {_checks.MAX_TEMPERATURE:.4g}] (1 / temperature "
                    "must be a finite float32)",
                    lambda x: x == 0 or _checks.MIN_TEMPERATURE <= x <= _checks.MAX_TEMPERATURE,
                    lambda t: (t == 0) | ((t >= _checks.MIN_TEMPERATURE) & (t <= _checks.MAX_TEMPERATURE))),
    "top_k": (True, "an integer >= 0", lambda x: x >= 0, lambda t: t >= 0),
    "top_p": (False, "in (0, 1]", lambda x: 0 < x <= 1, lambda t: (t > 0) & (t <= 1)),
    "min_p": (False, "in [0, 1]", lambda x: 0 <= x <= 1, lambda t: (t >= 0) & (t <= 1)),
}


def _row_param(value, name: str, logits: Tensor) -> Tensor:
    """A Python number or a [B] tensor -> a contiguous [B] tensor (int64 for top_k, else float32) on the logits' device.

    Values of a tensor are range-checked eagerly on CPU only (reading them on CUDA would synchronise)."""
    integer, allowed, ok_number, ok_tensor = _PARAMS[name]
    B = logits.shape[0]
    dtype = torch.int64 if integer else torch.float32
    if isinstance(value, Tensor):
        if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"{name} must be an int or an integer tensor, got a {value.dtype} tensor")
        if not integer and not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a number or a floating-point tensor, got a {value.dtype} tensor")
        _checks.same_shape(value, name, (B,), "one value per row of logits")
        _checks.same_device(value, name, logits, "logits")
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            bad = ~ok_tensor(value)
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name}[{row}] must be {allowed}, got {value[row].item()}")
        return value.to(dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind} or a [B] tensor, got {type(value).__name__}")
    if not ok_number(value):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return torch.full((B,), value, dtype=dtype, device=logits.device)


def _check_finite(logprobs: Tensor) -> None:
    bad = logprobs.isnan()
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"logits[{row}] contains NaN or +inf, or no finite value (after dividing by the temperature): "
                         "it defines no distribution to sample from")


def sample(
    logits: Tensor,
    *,
    temperature: Union[Number, Tensor] = 1.0,
    top_k: Union[int, Tensor] = 0,
    top_p: Union[Number, Tensor] = 1.0,
    min_p: Union[Number, Tensor] = 0.0,
    generator: Optional[torch.Generator] = None,
    return_filtered_logprobs: bool = False,
    return_kept_threshold: bool = False,
) -> tuple[Tensor, ...]:
    """Draws one token per row of ``logits`` and returns it with its behaviour log-prob.

    logits: [B, V] float32/bf16/fp16. temperature (>= 0; 0 = greedy), top_k (>= 0; 0 = off), top_p (in (0, 1]; 1 =
    off), min_p (in [0, 1]; 0 = off): each a Python number or a per-row [B] tensor, so rows may mix greedy and sampled.
    generator: a torch.Generator on the logits' device, for reproducible draws (also inside
    ``torch.compile(fullgraph=True)``: the same tokens as eager for the same generator state).
    -> (tokens int64 [B], logprobs float32 [B]), then filtered_logprobs float32 [B] when
    ``return_filtered_logprobs``, then kept_threshold float32 [B] when ``return_kept_threshold`` (in that order).
    logprobs are under the unfiltered temperature-scaled distribution; filtered_logprobs under the renormalised kept
    set, which is {v : logits[b, v] >= kept_threshold[b]} (-inf: no filter; see the module docstring for greedy rows
    and NaN). Not differentiable.
    """
    _checks.logits(logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [B, V], got shape {tuple(logits.shape)}")
    params = [_row_param(value, name, logits) for name, value in
              (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p))]
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != logits.device.type:
            raise ValueError(f"generator is on {generator.device} but logits are on {logits.device}")
    uniforms = _uniforms(logits, generator)
    backend = _backend.select("sample", SAMPLE_BACKENDS, logits.device)
    rows = _checks.rows(logits.detach())
    tokens, logprobs, filtered, threshold = sample_op(rows, uniforms, *params, backend)
    if logits.device.type == "cpu" and not torch.compiler.is_compiling() and logprobs.numel() > 0:
        _check_finite(logprobs)
    return (tokens, logprobs, *((filtered,) if return_filtered_logprobs else ()),
            *((threshold,) if return_kept_threshold else ()))
