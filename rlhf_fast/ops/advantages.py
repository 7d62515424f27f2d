"""Advantage estimation: masked GAE, discounted returns, masked mean/variance/whitening, group advantages.

Formulas (docs/formulas.md). ``mask[b, t] = 1`` marks the tokens the policy generated. Positions with mask 0
are skipped: the recurrences carry their state across them unchanged, and their outputs are 0. GAE over [B, T],
per sequence, with gamma and lam scalars or per-sequence:

    next_v = 0; A = 0
    for t = T-1 ... 0:
        delta = r[t] + gamma * next_v - V[t]
        A_t   = delta + gamma * lam * A
        if mask[t]: next_v = V[t]; A = A_t          # else both carry over
        adv[t] = A_t * mask[t]
    returns = (adv + V) * mask

For right-padded responses this is the TRL / OpenRLHF loop; with interior holes (multi-turn observations) it is
veRL's ``compute_gae_advantage_return``. Discounted returns (REINFORCE, REINFORCE++) are the same recurrence with
V = 0 and lam = 1: ``R[t] = r[t] + gamma * R_next`` over the kept positions, 0 elsewhere.

GAE and discounted returns have backends torch (the loop above, vectorised over B), cpp (sequences in parallel,
an fp32 loop over T), cuda and triton; arithmetic is fp32 whatever the input dtype. They are not differentiable
(their inputs are rewards and critic values, used as constants): the outputs never require grad.

Masked mean/variance/whitening and group advantages are one PyTorch implementation for every device (their cost is
a few reductions); mean, variance and whitening are differentiable w.r.t. ``x``.

Each op is a torch.library op in the ``rlhf_fast`` namespace with a fake implementation, so
``torch.compile`` traces it without graph breaks; the backend is chosen in Python and passed to the op.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _backend
from . import _checks

SCAN_BACKENDS = ("torch", "cpp", "cuda", "triton")
OP_BACKENDS = {  # public op -> backends implementing it (shown by `rlhf-fast info`)
    "gae": SCAN_BACKENDS,
    "discounted_returns": SCAN_BACKENDS,
    "masked_mean": ("torch",),
    "masked_var": ("torch",),
    "masked_whiten": ("torch",),
    "group_advantages": ("torch",),
}
GROUP_MODES = ("grpo", "dr_grpo", "rloo")
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

Discount = Union[float, Tensor]


# ---------------------------------------------------------------------------------------------------------------
# References: short and obviously correct; the ground truth of the tests. They compute in float32, or in float64
# when given float64 tensors (the tests' exact results).
# ---------------------------------------------------------------------------------------------------------------


def _ref_dtype(*xs: Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _per_row(x: Discount, n_rows: int, dtype: torch.dtype, device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.full((n_rows,), float(x), dtype=dtype, device=device)


def gae_ref(rewards: Tensor, values: Tensor, mask: Tensor, gamma: Discount, lam: Discount) -> tuple[Tensor, Tensor]:
    """The loop of the module docstring, vectorised over B: [B, T] inputs -> (advantages, returns) [B, T]."""
    dtype = _ref_dtype(rewards, values)
    r, v, m = rewards.to(dtype), values.to(dtype), mask.bool()
    n_rows, n_steps = r.shape
    g = _per_row(gamma, n_rows, dtype, r.device)
    gl = g * _per_row(lam, n_rows, dtype, r.device)
    next_v = r.new_zeros(n_rows)
    running = r.new_zeros(n_rows)
    adv = torch.zeros(r.shape, dtype=dtype, device=r.device)
    for t in reversed(range(n_steps)):
        a_t = r[:, t] + g * next_v - v[:, t] + gl * running
        next_v = torch.where(m[:, t], v[:, t], next_v)
        running = torch.where(m[:, t], a_t, running)
        adv[:, t] = torch.where(m[:, t], a_t, 0.0)
    return adv, torch.where(m, adv + v, 0.0)


def discounted_returns_ref(rewards: Tensor, mask: Tensor, gamma: Discount) -> Tensor:
    """``R[t] = r[t] + gamma * R_next`` over kept positions, carried across masked ones, 0 there: [B, T] -> [B, T]."""
    r, m = rewards.to(_ref_dtype(rewards)), mask.bool()
    g = _per_row(gamma, r.shape[0], r.dtype, r.device)
    running = r.new_zeros(r.shape[0])
    out = torch.zeros(r.shape, dtype=r.dtype, device=r.device)
    for t in reversed(range(r.shape[1])):
        a_t = r[:, t] + g * running
        running = torch.where(m[:, t], a_t, running)
        out[:, t] = torch.where(m[:, t], a_t, 0.0)
    return out


def masked_mean_ref(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of the entries of x where mask is 1 (over ``dim`` or all); 0 where there are none."""
    x, k = x.to(_ref_dtype(x)), mask.to(_ref_dtype(x))
    if dim is None:
        return (x * k).sum() / k.sum().clamp_min(1)
    return (x * k).sum(dim) / k.sum(dim).clamp_min(1)


def masked_var_ref(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the entries of x where mask is 1; 0 when there are fewer than 2 (unbiased) or none."""
    x, k = x.to(_ref_dtype(x)), mask.to(_ref_dtype(x))
    n = k.sum()
    centered = (x - masked_mean_ref(x, mask)) * k
    return (centered * centered).sum() / (n - 1 if unbiased else n).clamp_min(1)


def masked_whiten_ref(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` (unbiased var over the mask), plus the mean back when not shift_mean."""
    x = x.to(_ref_dtype(x))
    mean, var = masked_mean_ref(x, mask), masked_var_ref(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def _consecutive_ids(n: int, group_size: int, device) -> Tensor:
    return torch.arange(n, device=device) // group_size


def group_advantages_ref(scores: Tensor, group_ids: Union[int, Tensor], mode: str, eps: float = 1e-6) -> Tensor:
    """Per group (the scores sharing a group id; an int G: consecutive groups of G): grpo (s - mean) / (std + eps)
    with the unbiased std, dr_grpo s - mean, rloo s_i - mean_{j != i} s_j = G / (G - 1) (s_i - mean); a group of one
    gives 0 in every mode. Output: float32 (float64 for float64 scores), the shape of scores."""
    s = scores.to(_ref_dtype(scores)).flatten()
    ids = _consecutive_ids(s.numel(), group_ids, s.device) if isinstance(group_ids, int) else group_ids
    out = torch.zeros_like(s)
    for g in ids.unique().tolist():
        sel = ids == g
        n = int(sel.sum())
        if n == 1:
            continue
        d = s[sel] - s[sel][0]  # measured from the group's first score, so a group of equal scores is exactly 0
        centered = d - d.mean()
        if mode == "dr_grpo":
            out[sel] = centered
        elif mode == "grpo":
            out[sel] = centered / (d.std() + eps)
        else:
            out[sel] = centered * (n / (n - 1))
    return out.reshape(scores.shape)


# ---------------------------------------------------------------------------------------------------------------
# Backends of the scans. Inputs: rewards, values [B, T] of one float dtype (any strides), mask [B, T] bool,
# gamma_seq / lam_seq contiguous float32 [B] or None (then the scalars apply).
# ---------------------------------------------------------------------------------------------------------------


def _triton():
    from ..kernels import advantages as triton_advantages  # imported on first use: importing triton is slow

    return triton_advantages


def _gae_fwd(rewards, values, mask, gamma_seq, lam_seq, gamma, lam, backend):
    if backend == "torch":
        adv, ret = gae_ref(rewards, values, mask, gamma if gamma_seq is None else gamma_seq,
                           lam if lam_seq is None else lam_seq)
        return adv.contiguous(), ret.contiguous()
    if backend == "triton":
        return _triton().gae_fwd(rewards, values, mask, gamma_seq, lam_seq, gamma, lam)
    return torch.ops.rlhf_fast_C.gae_fwd(rewards, values, mask, gamma_seq, lam_seq, gamma, lam)  # cpp / cuda


def _discounted_returns_fwd(rewards, mask, gamma_seq, gamma, backend):
    if backend == "torch":
        return discounted_returns_ref(rewards, mask, gamma if gamma_seq is None else gamma_seq).contiguous()
    if backend == "triton":
        return _triton().discounted_returns_fwd(rewards, mask, gamma_seq, gamma)
    return torch.ops.rlhf_fast_C.discounted_returns_fwd(rewards, mask, gamma_seq, gamma)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops (inputs already validated) with fake implementations; autograd only where a gradient is meaningful.
# ---------------------------------------------------------------------------------------------------------------

# The two scans are a schema and one CompositeExplicitAutograd kernel on a torch.library.Library rather than
# torch.library.custom_op ops: they have no autograd, and custom_op's Python layers (autograd wrapper, dynamo
# guard, alias check) cost ~20-35 us a call, as much as the whole scan at [64, 2048].
_lib = torch.library.Library("rlhf_fast", "FRAGMENT")
_lib.define("gae(Tensor rewards, Tensor values, Tensor mask, Tensor? gamma_seq, Tensor? lam_seq, float gamma, "
            "float lam, str backend) -> (Tensor, Tensor)")
_lib.define("discounted_returns(Tensor rewards, Tensor mask, Tensor? gamma_seq, float gamma, str backend) -> Tensor")
_lib.impl("gae", _gae_fwd, "CompositeExplicitAutograd")
_lib.impl("discounted_returns", _discounted_returns_fwd, "CompositeExplicitAutograd")
# rewards, values [B, T] float/bf16/fp16, mask [B, T] bool -> (advantages, returns), float32 [B, T]
gae_op = torch.ops.rlhf_fast.gae.default
# rewards [B, T] float/bf16/fp16, mask [B, T] bool -> returns float32 [B, T]
discounted_returns_op = torch.ops.rlhf_fast.discounted_returns.default


@torch.library.register_fake("rlhf_fast::gae", lib=_lib)
def _(rewards, values, mask, gamma_seq, lam_seq, gamma, lam, backend):
    return (rewards.new_empty(rewards.shape, dtype=torch.float32),
            rewards.new_empty(rewards.shape, dtype=torch.float32))


@torch.library.register_fake("rlhf_fast::discounted_returns", lib=_lib)
def _(rewards, mask, gamma_seq, gamma, backend):
    return rewards.new_empty(rewards.shape, dtype=torch.float32)


@torch.library.custom_op("rlhf_fast::masked_mean", mutates_args=())
def masked_mean_op(x: Tensor, mask: Tensor, dim: Optional[int]) -> Tensor:
    """x float [...], mask bool of the shape of x -> float32: 0-d (dim None) or x's shape without ``dim``."""
    return masked_mean_ref(x, mask, dim).float()


@masked_mean_op.register_fake
def _(x, mask, dim):
    shape = () if dim is None else x.shape[:dim] + x.shape[dim + 1:]
    return x.new_empty(shape, dtype=torch.float32)


def _masked_mean_setup(ctx, inputs, output):
    x, mask, dim = inputs
    ctx.save_for_backward(mask)
    ctx.dim, ctx.dtype = dim, x.dtype


def _masked_mean_grad(ctx, grad):
    (mask,) = ctx.saved_tensors
    k = mask.float()
    if ctx.dim is None:
        return (grad * k / k.sum().clamp_min(1)).to(ctx.dtype), None, None
    scale = grad / k.sum(ctx.dim).clamp_min(1)
    return (scale.unsqueeze(ctx.dim) * k).to(ctx.dtype), None, None


masked_mean_op.register_autograd(_masked_mean_grad, setup_context=_masked_mean_setup)


@torch.library.custom_op("rlhf_fast::masked_var", mutates_args=())
def masked_var_op(x: Tensor, mask: Tensor, unbiased: bool) -> Tensor:
    """x float [...], mask bool of the shape of x -> 0-d float32."""
    return masked_var_ref(x, mask, unbiased).float()


@masked_var_op.register_fake
def _(x, mask, unbiased):
    return x.new_empty((), dtype=torch.float32)


def _masked_var_setup(ctx, inputs, output):
    x, mask, unbiased = inputs
    ctx.save_for_backward(x, mask)
    ctx.unbiased = unbiased


def _masked_var_grad(ctx, grad):
    # d var / d x_j = 2 k_j (x_j - mean) / denominator (the mean's own derivative cancels: sum k (x - mean) = 0).
    x, mask = ctx.saved_tensors
    k = mask.float()
    n = k.sum()
    centered = (x.float() - masked_mean_ref(x, mask)) * k
    denominator = (n - 1 if ctx.unbiased else n).clamp_min(1)
    return (grad * 2.0 * centered / denominator).to(x.dtype), None, None


masked_var_op.register_autograd(_masked_var_grad, setup_context=_masked_var_setup)


@torch.library.custom_op("rlhf_fast::masked_whiten", mutates_args=())
def masked_whiten_op(x: Tensor, mask: Tensor, shift_mean: bool, eps: float) -> Tensor:
    """x float [...], mask bool of the shape of x -> float32 of the shape of x."""
    return masked_whiten_ref(x, mask, shift_mean, eps).float().contiguous()


@masked_whiten_op.register_fake
def _(x, mask, shift_mean, eps):
    return x.new_empty(x.shape, dtype=torch.float32)


def _masked_whiten_setup(ctx, inputs, output):
    x, mask, shift_mean, eps = inputs
    ctx.save_for_backward(x, mask)
    ctx.shift_mean, ctx.eps = shift_mean, eps


def _masked_whiten_grad(ctx, grad):
    # y = (x - mu) / s (+ mu), s = sqrt(var + eps); with c = x - mu, n kept entries and G = sum_i g_i:
    # dL/dx_j = g_j / s - k_j G / (n s) - k_j c_j sum_i(g_i c_i) / ((n - 1) s^3)  (+ k_j G / n when not shift_mean)
    x, mask = ctx.saved_tensors
    k = mask.float()
    n = k.sum().clamp_min(1)
    c = x.float() - masked_mean_ref(x, mask)
    s = torch.sqrt(masked_var_ref(x, mask) + ctx.eps)
    g_sum = grad.sum()
    out = grad / s - k * g_sum / (n * s) - k * c * (grad * c).sum() / ((k.sum() - 1).clamp_min(1) * s ** 3)
    if not ctx.shift_mean:
        out = out + k * g_sum / n
    return out.to(x.dtype), None, None, None


masked_whiten_op.register_autograd(_masked_whiten_grad, setup_context=_masked_whiten_setup)


@torch.library.custom_op("rlhf_fast::group_advantages", mutates_args=())
def group_advantages_op(scores: Tensor, group_ids: Tensor, mode: str, eps: float) -> Tensor:
    """scores [B] float, group_ids int64 [B] (any values) -> float32 [B], computed in float64 (scores are few)."""
    s = scores.double()
    groups, inv = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(groups.numel(), dtype=torch.float64, device=s.device).index_add_(0, inv, torch.ones_like(s))
    pos = torch.arange(s.numel(), device=s.device)
    first = torch.full((groups.numel(),), s.numel(), device=s.device).scatter_reduce(0, inv, pos, "amin")
    d = s - s[first][inv]  # measured from the group's first score, so a group of equal scores is exactly 0
    n = count[inv]
    centered = d - torch.zeros_like(count).index_add_(0, inv, d)[inv] / n
    many = n > 1
    if mode == "dr_grpo":
        out = centered
    elif mode == "grpo":
        var = torch.zeros_like(count).index_add_(0, inv, centered * centered)[inv] / torch.where(many, n - 1, 1.0)
        out = centered / (var.sqrt() + eps)
    else:
        out = centered * n / torch.where(many, n - 1, 1.0)
    return torch.where(many, out, 0.0).float()


@group_advantages_op.register_fake
def _(scores, group_ids, mode, eps):
    return scores.new_empty(scores.shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Public API: validation, backend choice.
# ---------------------------------------------------------------------------------------------------------------


def _check_eager(x: Tensor) -> bool:
    """Whether data-dependent checks run: CPU tensors outside torch.compile (elsewhere they would synchronise)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and x.numel() > 0


def _sequences(x, name: str) -> Tensor:
    _checks.float_tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(x.shape)}")
    return x


def _mask(mask, name: str, like: Tensor, like_name: str) -> Tensor:
    """A bool mask of like's shape and device; 0/1 integer or float masks are accepted and converted."""
    _checks.tensor(mask, name)
    _checks.same_shape(mask, name, like.shape, f"the shape of {like_name}")
    _checks.same_device(mask, name, like, like_name)
    if mask.dtype == torch.bool:
        return mask
    if not (mask.is_floating_point() or mask.dtype in _INT_DTYPES):
        raise TypeError(f"{name} must be bool or hold 0/1 in an integer or float dtype, got {mask.dtype}")
    if _check_eager(mask):
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            index = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(f"{name} must hold only 0 and 1, got {mask[tuple(index)].item()} at {index}")
    return mask != 0


def _discount(x, name: str, n_rows: int, like: Tensor) -> tuple[float, Optional[Tensor]]:
    """gamma / lam: a number in [0, 1], or a float [B] tensor on like's device -> (scalar, float32 [B] or None)."""
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor (or a Python number), got {x.dtype}")
        if tuple(x.shape) != (n_rows,):
            raise ValueError(f"{name} as a tensor must have shape [B] = ({n_rows},), one per sequence, "
                             f"got {tuple(x.shape)}")
        _checks.same_device(x, name, like, "rewards")
        if _check_eager(x):
            bad = ~((x >= 0) & (x <= 1))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name} must be in [0, 1], got {name}[{i}] = {x[i].item()}")
        return 0.0, x.detach().to(torch.float32).contiguous()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a Python number or a float [B] tensor, got {type(x).__name__}")
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return float(x), None


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: Discount, lam: Discount) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over masked sequences (the recurrence in the module docstring).

    rewards, values: [B, T] float32/bf16/fp16 (per-token rewards, critic values); mask: [B, T] bool or 0/1, 1 on
    response tokens; gamma, lam: numbers in [0, 1] or float [B] tensors (one per sequence, on the device of rewards).
    -> (advantages, returns), float32 [B, T] each, 0 at masked positions. Masked positions are skipped (next value
    and running advantage carry across them), so whatever rewards/values hold there is never read.
    Not differentiable. Backends: torch, cpp, cuda, triton.
    """
    _sequences(rewards, "rewards")
    _checks.float_tensor(values, "values")
    _checks.same_shape(values, "values", rewards.shape, "the shape of rewards")
    _checks.same_device(values, "values", rewards, "rewards")
    mask = _mask(mask, "mask", rewards, "rewards")
    gamma_f, gamma_seq = _discount(gamma, "gamma", rewards.shape[0], rewards)
    lam_f, lam_seq = _discount(lam, "lam", rewards.shape[0], rewards)
    if values.dtype != rewards.dtype:  # the kernels read one dtype: promote the other input
        dtype = torch.promote_types(rewards.dtype, values.dtype)
        rewards, values = rewards.to(dtype), values.to(dtype)
    backend = _backend.select("gae", SCAN_BACKENDS, rewards.device)
    return gae_op(rewards.detach(), values.detach(), mask, gamma_seq, lam_seq, gamma_f, lam_f, backend)


def discounted_returns(rewards: Tensor, mask: Tensor, *, gamma: Discount) -> Tensor:
    """REINFORCE / REINFORCE++ returns: ``R[t] = r[t] + gamma * R_next`` over the kept positions.

    rewards: [B, T] float32/bf16/fp16; mask: [B, T] bool or 0/1; gamma: a number in [0, 1] or a float [B] tensor.
    -> float32 [B, T]: R_next is carried across masked positions, whose output is 0. Not differentiable.
    """
    _sequences(rewards, "rewards")
    mask = _mask(mask, "mask", rewards, "rewards")
    gamma_f, gamma_seq = _discount(gamma, "gamma", rewards.shape[0], rewards)
    backend = _backend.select("discounted_returns", SCAN_BACKENDS, rewards.device)
    return discounted_returns_op(rewards.detach(), mask, gamma_seq, gamma_f, backend)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of x over the entries where mask is 1: x float32/bf16/fp16 [...], mask bool or 0/1 of x's shape.

    dim None -> 0-d float32; an int -> float32 of x's shape without ``dim``. An empty selection gives 0 (not NaN).
    Differentiable w.r.t. x.
    """
    _checks.float_tensor(x, "x")
    mask = _mask(mask, "mask", x, "x")
    if dim is not None:
        dim = _checks.integer(dim, "dim")
        if x.dim() == 0 or not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim must be in [-{x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
        dim %= x.dim()
    return masked_mean_op(x, mask, dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over the entries where mask is 1 (all of them at once) -> 0-d float32.

    unbiased divides by n - 1 (n kept entries), else by n; fewer than 2 (unbiased) or no entries give 0.
    Differentiable w.r.t. x.
    """
    _checks.float_tensor(x, "x")
    mask = _mask(mask, "mask", x, "x")
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    return masked_var_op(x, mask, unbiased)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the masked mean and unbiased masked variance over all kept entries.

    x: float32/bf16/fp16 [...]; mask: bool or 0/1 of x's shape -> float32 of x's shape. Every entry is transformed,
    masked ones included (as TRL and veRL do); multiply by the mask for zeros there. ``shift_mean=False`` adds the
    mean back (scales only). Differentiable w.r.t. x.
    """
    _checks.float_tensor(x, "x")
    mask = _mask(mask, "mask", x, "x")
    if not isinstance(shift_mean, bool):
        raise TypeError(f"shift_mean must be a bool, got {type(shift_mean).__name__}")
    eps = _checks.positive_number(eps, "eps")
    return masked_whiten_op(x, mask, shift_mean, eps)


def group_advantages(scores: Tensor, group_ids: Union[int, Tensor], *, mode: str = "grpo",
                     eps: float = 1e-6) -> Tensor:
    """Advantages of outcome scores relative to their group (the samples of one prompt).

    scores: [B] float32/bf16/fp16; group_ids: int64 [B], the group of each score (any values, groups of any sizes,
    rows in any order), or an int G: consecutive groups of G (then scores may also be [B / G, G]).
    mode: ``grpo`` (s - mean) / (std + eps) with the unbiased std; ``dr_grpo`` s - mean; ``rloo``
    s_i - mean_{j != i} s_j. -> float32 of the shape of scores. A group of one gets 0 in every mode, a group of equal
    scores gets 0; never NaN for finite scores. Not differentiable. Formulas: docs/formulas.md.
    """
    _checks.float_tensor(scores, "scores")
    _checks.choice(mode, "mode", GROUP_MODES)
    eps = _checks.positive_number(eps, "eps")
    if isinstance(group_ids, Tensor):
        if scores.dim() != 1:
            raise ValueError(f"scores must be [B] with a group_ids tensor, got shape {tuple(scores.shape)}")
        if group_ids.dtype != torch.int64:
            raise TypeError(f"group_ids must be int64 (torch.long), got {group_ids.dtype}")
        _checks.same_shape(group_ids, "group_ids", scores.shape, "the shape of scores")
        _checks.same_device(group_ids, "group_ids", scores, "scores")
        return group_advantages_op(scores.detach(), group_ids, mode, eps)
    if isinstance(group_ids, bool) or not isinstance(group_ids, int):
        raise TypeError(f"group_ids must be an int64 tensor or an int (the group size), got "
                        f"{type(group_ids).__name__}")
    group_size = group_ids
    if group_size < 1:
        raise ValueError(f"group_ids as a group size must be >= 1, got {group_size}")
    if scores.dim() == 1:
        if scores.shape[0] % group_size != 0:
            raise ValueError(f"scores has {scores.shape[0]} entries, not a multiple of group size {group_size}")
    elif scores.dim() == 2:
        if scores.shape[1] != group_size:
            raise ValueError(f"scores of shape {tuple(scores.shape)} must be [B / G, G] with G = group size = "
                             f"{group_size}")
    else:
        raise ValueError(f"scores must be [B] or [B / G, G], got shape {tuple(scores.shape)}")
    ids = _consecutive_ids(scores.numel(), group_size, scores.device)
    return group_advantages_op(scores.detach().flatten(), ids, mode, eps).view(scores.shape)
