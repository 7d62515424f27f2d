"""Log-probs of chosen tokens, entropy and KL, computed from logits without [N, V] float32 temporaries.

Formulas (docs/formulas.md), with z = logits / temperature over the last dimension V:
  logp[t]    = z[t, y_t] - logsumexp(z[t])            (0 where y_t == ignore_index, with no gradient)
  with kept_threshold m (the sampler's kept set, docs/formulas.md "Kept-set log-probs"):
  logp[t]    = z[t, y_t] - logsumexp_{v in K_t} z[t, v],  K_t = {v : logits[t, v] >= m_t} | {y_t}
  entropy[t] = logsumexp(z[t]) - sum_v softmax(z[t])_v z[t, v]
  KL[t]      = sum_v p_v (log p_v - log q_v)          p from logits, q from ref_logits, same temperature
  kl_penalty: sampled-token estimators of KL(pi || pi_ref) with d = ref_logp - logp:
    k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - d - 1 (d clamped to [-20, 20], result to [-10, 10]),  abs = |d|

Every output is float32 whatever the logits dtype. A row of logits holding a NaN or a +inf, or only -inf, gives NaN
(as torch.log_softmax does; the log-prob stays 0 where the label is ignore_index) and a NaN gradient row; other rows
are unaffected. -inf entries elsewhere are fine and get zero gradient (docs/formulas.md, "Labels, ignore_index and
non-finite logits"). The KL is computed relative to the rows' raw maxima, precise at any temperature
(docs/formulas.md, "How they are computed").

Each op is a torch.library custom op in the ``rlhf_fast`` namespace with a fake (meta) implementation and an
autograd formula; the backend (torch, cpp, cuda, triton) is chosen in Python before the op is called and passed
to it, so ``torch.compile`` records the choice in the graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks

LOGPROBS_BACKENDS = ("torch", "cpp", "cuda", "triton")
KL_BACKENDS = ("torch", "cpp", "triton")
OP_BACKENDS = {  # public op -> backends implementing it (shown by `rlhf-fast info`)
    "logprobs": LOGPROBS_BACKENDS,
    "entropy": LOGPROBS_BACKENDS,
    "logprobs_and_entropy": LOGPROBS_BACKENDS,
    "kl_divergence": KL_BACKENDS,
    "kl_penalty": ("torch",),
}
KL_KINDS = ("k1", "k2", "k3", "abs")


# ---------------------------------------------------------------------------------------------------------------
# References: short and obviously correct; the ground truth of the tests (autograd gives their gradients).
# ---------------------------------------------------------------------------------------------------------------


def logprobs_ref(logits: Tensor, labels: Tensor, temperature: float = 1.0, ignore_index: int = -100) -> Tensor:
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    keep = labels != ignore_index
    picked = logp_all.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, 0.0)


def kept_logprobs_ref(logits: Tensor, labels: Tensor, kept_threshold: Tensor, temperature: float = 1.0,
                      ignore_index: int = -100) -> Tensor:
    """Log-prob of each label renormalised over the kept set K = {v : logits_v >= kept_threshold} | {label}.
    float64 logits stay float64 (the tests' exact value); other dtypes are computed in float32."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    keep = labels != ignore_index
    y = torch.where(keep, labels, 0)
    label_col = torch.arange(x.shape[-1], device=x.device) == y[..., None]
    kept = (x >= kept_threshold.to(x.dtype).unsqueeze(-1)) | label_col
    kept = kept | ~keep[..., None]  # ignored rows (logp 0): any non-empty set, so that autograd sees no NaN
    z = x / temperature
    logp = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(torch.where(kept, z, float("-inf")), dim=-1)
    return torch.where(keep, logp, 0.0)


def entropy_ref(logits: Tensor, temperature: float = 1.0) -> Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


def kl_divergence_ref(logits: Tensor, ref_logits: Tensor, temperature: float = 1.0) -> Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
    return (logp.exp() * torch.where(logp.exp() > 0, logp - logq, 0.0)).sum(-1)


def kl_penalty_ref(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    d = ref_logp.float() - logp.float()
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "abs":
        return d.abs()
    d = d.clamp(-20.0, 20.0)
    return (d.exp() - d - 1.0).clamp(-10.0, 10.0)


# ---------------------------------------------------------------------------------------------------------------
# Backend implementations on 2-D logits [N, V] (unit stride in V). The torch backend is the formulas below, written
# out explicitly (not the autograd of the references), so the two check each other.
# ---------------------------------------------------------------------------------------------------------------


def _zero_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.float().contiguous()


def _kept_mask(logits, labels, kept_threshold, ignore_index):
    """[N, V] bool: the kept set {v : logits_v >= kept_threshold} with each row's label added (the union rule)."""
    kept = logits.float() >= kept_threshold[:, None]
    if labels is not None:
        has_label = (labels != ignore_index) & (labels >= 0) & (labels < logits.shape[-1])
        label_col = torch.zeros_like(kept).scatter_(1, torch.where(has_label, labels, 0)[:, None], has_label[:, None])
        kept |= label_col
    return kept


def _logprobs_fwd_torch(logits, labels, kept_threshold, temperature, ignore_index, compute_entropy):
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    lse = torch.where(lse == float("inf"), float("nan"), lse)  # a +inf logit defines no distribution (as the kernels)
    entropy = entropy_ref(logits, temperature) if compute_entropy else torch.zeros_like(lse)
    lse_kept, denominator = lse.new_empty(0), lse
    if kept_threshold is not None:
        kept = _kept_mask(logits, labels, kept_threshold, ignore_index)
        lse_kept = torch.logsumexp(torch.where(kept, z, float("-inf")), dim=-1)
        lse_kept = denominator = torch.where(lse.isnan(), float("nan"), lse_kept)  # no distribution: NaN too
    if labels is None:
        return torch.zeros_like(lse), entropy, lse, lse_kept
    # Like the compiled kernels, an out-of-range label (unchecked on CUDA) gives NaN rather than a read past V.
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    picked = z.gather(-1, torch.where(in_range, labels, 0)[:, None]).squeeze(-1) - denominator
    logp = torch.where(labels == ignore_index, 0.0, torch.where(in_range, picked, float("nan")))
    return logp, entropy, lse, lse_kept


def _logprobs_bwd_torch(grad_logp, grad_entropy, grad_lse, grad_lse_kept, logits, labels, kept_threshold, lse,
                        lse_kept, entropy, temperature, ignore_index):
    z = logits.float() / temperature
    logp_all = z - lse[:, None]
    p = torch.exp(logp_all)
    if labels is None:
        keep = torch.zeros_like(lse, dtype=torch.bool)
        safe_labels = torch.zeros_like(lse, dtype=torch.long)
    else:
        keep = labels != ignore_index
        safe_labels = labels
    g = torch.where(keep, grad_logp, 0.0)
    if kept_threshold is None:
        c = grad_lse - g - grad_entropy * entropy
        grad = p * (c[:, None] - grad_entropy[:, None] * torch.where(p > 0, logp_all, 0.0))
    else:
        # grad_z = g [v == y] + p_v (gL - gH (H + lp_v)) + q_v (gK - g), q_v = [v in K] exp(z_v - lse_kept). A row
        # with m = -inf keeps everything (q = p, lse_kept = lse): its two terms are one, as without a threshold.
        full = kept_threshold == float("-inf")
        c = torch.where(full, grad_lse + grad_lse_kept - g - grad_entropy * entropy, grad_lse - grad_entropy * entropy)
        grad = p * (c[:, None] - grad_entropy[:, None] * torch.where(p > 0, logp_all, 0.0))
        kept = _kept_mask(logits, labels, kept_threshold, ignore_index)
        q = torch.where(kept, torch.exp(z - lse_kept[:, None]), 0.0)
        grad = torch.where(full[:, None], grad, grad + q * (grad_lse_kept - g)[:, None])
    grad.scatter_add_(1, torch.where(keep, safe_labels, 0)[:, None], g[:, None])
    return (grad / temperature).to(logits.dtype)


def _kl_div_fwd_torch(logits, ref_logits, temperature):
    # The kernels' formulation (docs/formulas.md, "KL at a small temperature"): everything relative to the raw row
    # maxima, so that no two large log-sum-exps are subtracted.
    x, xr = logits.float(), ref_logits.float()
    max_p, max_q = x.amax(-1), xr.amax(-1)
    dz = (x - max_p[:, None]) / temperature
    dw = (xr - max_q[:, None]) / temperature
    log_s_p, log_s_q = torch.logsumexp(dz, -1), torch.logsumexp(dw, -1)
    p = torch.exp(dz - log_s_p[:, None])
    mean_d = (p * torch.where(p > 0, dz - dw, 0.0)).sum(-1)
    kl = mean_d - log_s_p + log_s_q
    return kl, max_p, max_q, log_s_p, torch.where(kl.isnan(), kl, mean_d)  # NaN mean_d: a NaN KL, NaN gradient


def _kl_div_bwd_torch(grad_kl, logits, ref_logits, max_p, max_q, log_s_p, mean_d, temperature):
    dz = (logits.float() - max_p[:, None]) / temperature
    dw = (ref_logits.float() - max_q[:, None]) / temperature
    p = torch.exp(dz - log_s_p[:, None])
    term = torch.where((p > 0) | mean_d.isnan()[:, None], (dz - dw) - mean_d[:, None], 0.0)
    return (grad_kl[:, None] * p * term / temperature).to(logits.dtype)


def _triton():
    from ..kernels import logprobs as triton_logprobs  # imported on first use: importing triton is slow

    return triton_logprobs


def _logprobs_fwd(backend, *args):
    if backend == "torch":
        return _logprobs_fwd_torch(*args)
    if backend == "triton":
        return _triton().logprobs_fwd(*args)
    return torch.ops.rlhf_fast_C.logprobs_fwd(*args)  # cpp / cuda: the compiled op dispatches on the device


def _logprobs_bwd(backend, *args):
    if backend == "torch":
        return _logprobs_bwd_torch(*args)
    if backend == "triton":
        return _triton().logprobs_bwd(*args)
    return torch.ops.rlhf_fast_C.logprobs_bwd(*args)


def _logprobs_bwd_over_logits(backend, *args):
    """``_logprobs_bwd`` for a caller done with the logits (args[4]): the compiled CPU kernel writes the gradient
    over them (on the CPU a fresh [N, V] buffer costs page faults on the order of the GEMM that fills it); other
    backends return a new tensor."""
    logits = args[4]
    if backend == "cpp" and logits.device.type == "cpu" and logits.is_contiguous():
        torch.ops.rlhf_fast_C.logprobs_bwd_into(*args, logits)
        return logits
    return _logprobs_bwd(backend, *args)


def _kl_div_fwd(backend, *args):
    if backend == "torch":
        return _kl_div_fwd_torch(*args)
    if backend == "triton":
        return _triton().kl_div_fwd(*args)
    return torch.ops.rlhf_fast_C.kl_div_fwd(*args)


def _kl_div_bwd(backend, *args):
    if backend == "torch":
        return _kl_div_bwd_torch(*args)
    if backend == "triton":
        return _triton().kl_div_bwd(*args)
    return torch.ops.rlhf_fast_C.kl_div_bwd(*args)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops (2-D logits, already validated) with fake and autograd implementations.
# ---------------------------------------------------------------------------------------------------------------


def _row_vectors(logits: Tensor, count: int) -> tuple[Tensor, ...]:
    return tuple(logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(count))


@torch.library.custom_op("rlhf_fast::logprobs_entropy", mutates_args=())
def logprobs_entropy_op(
    logits: Tensor, labels: Optional[Tensor], kept_threshold: Optional[Tensor], temperature: float,
    ignore_index: int, compute_entropy: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [N, V] float/bf16/fp16, labels int64 [N] or None, kept_threshold float32 [N] or None
    -> (logp, entropy, lse, lse_kept), float32 [N] each; lse_kept (the log-sum-exp over the kept set, which logp
    then uses) is an empty [0] without kept_threshold."""
    return _logprobs_fwd(backend, logits, labels, kept_threshold, temperature, ignore_index, compute_entropy)


@logprobs_entropy_op.register_fake
def _(logits, labels, kept_threshold, temperature, ignore_index, compute_entropy, backend):
    lse_kept = logits.new_empty(logits.shape[0] if kept_threshold is not None else 0, dtype=torch.float32)
    return (*_row_vectors(logits, 3), lse_kept)


@torch.library.custom_op("rlhf_fast::logprobs_entropy_backward", mutates_args=())
def logprobs_entropy_backward_op(
    grad_logp: Tensor, grad_entropy: Tensor, grad_lse: Tensor, grad_lse_kept: Optional[Tensor], logits: Tensor,
    labels: Optional[Tensor], kept_threshold: Optional[Tensor], lse: Tensor, lse_kept: Optional[Tensor],
    entropy: Tensor, temperature: float, ignore_index: int, backend: str,
) -> Tensor:
    """-> grad_logits [N, V] in the logits dtype. grad_lse_kept, kept_threshold, lse_kept: all three or none."""
    return _logprobs_bwd(backend, grad_logp, grad_entropy, grad_lse, grad_lse_kept, logits, labels, kept_threshold,
                         lse, lse_kept, entropy, temperature, ignore_index)


@logprobs_entropy_backward_op.register_fake
def _(grad_logp, grad_entropy, grad_lse, grad_lse_kept, logits, labels, kept_threshold, lse, lse_kept, entropy,
      temperature, ignore_index, backend):
    return logits.new_empty(logits.shape)


def _logprobs_entropy_setup(ctx, inputs, output):
    logits, labels, kept_threshold, temperature, ignore_index, compute_entropy, backend = inputs
    _, entropy, lse, lse_kept = output
    ctx.save_for_backward(logits, labels, kept_threshold, lse, lse_kept, entropy)
    ctx.args = (temperature, ignore_index, compute_entropy, backend)


def _logprobs_entropy_grad(ctx, grad_logp, grad_entropy, grad_lse, grad_lse_kept):
    logits, labels, kept_threshold, lse, lse_kept, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, backend = ctx.args
    grad_logp = _zero_if_none(grad_logp if labels is not None else None, lse)
    grad_entropy = _zero_if_none(grad_entropy if compute_entropy else None, lse)
    grad_lse = _zero_if_none(grad_lse, lse)
    if kept_threshold is None:
        grad_lse_kept = lse_kept = None
    else:
        grad_lse_kept = _zero_if_none(grad_lse_kept, lse)
    grad = logprobs_entropy_backward_op(grad_logp, grad_entropy, grad_lse, grad_lse_kept, logits, labels,
                                        kept_threshold, lse, lse_kept, entropy, temperature, ignore_index, backend)
    return grad, None, None, None, None, None, None


logprobs_entropy_op.register_autograd(_logprobs_entropy_grad, setup_context=_logprobs_entropy_setup)


@torch.library.custom_op("rlhf_fast::kl_divergence", mutates_args=())
def kl_divergence_op(logits: Tensor, ref_logits: Tensor, temperature: float, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """logits, ref_logits [N, V] -> (kl, max_p, max_q, log_s_p, mean_d), float32 [N] each: the KL and the state of
    its backward (raw row maxima of logits and ref_logits, log sum_v exp((logits_v - max_p) / T), and
    sum_v p_v (dz_v - dw_v) with dz = (logits - max_p) / T, dw = (ref_logits - max_q) / T)."""
    return _kl_div_fwd(backend, logits, ref_logits, temperature)


@kl_divergence_op.register_fake
def _(logits, ref_logits, temperature, backend):
    return _row_vectors(logits, 5)


@torch.library.custom_op("rlhf_fast::kl_divergence_backward", mutates_args=())
def kl_divergence_backward_op(grad_kl: Tensor, logits: Tensor, ref_logits: Tensor, max_p: Tensor, max_q: Tensor,
                              log_s_p: Tensor, mean_d: Tensor, temperature: float, backend: str) -> Tensor:
    return _kl_div_bwd(backend, grad_kl, logits, ref_logits, max_p, max_q, log_s_p, mean_d, temperature)


@kl_divergence_backward_op.register_fake
def _(grad_kl, logits, ref_logits, max_p, max_q, log_s_p, mean_d, temperature, backend):
    return logits.new_empty(logits.shape)


def _kl_divergence_setup(ctx, inputs, output):
    logits, ref_logits, temperature, backend = inputs
    ctx.save_for_backward(logits, ref_logits, *output[1:])
    ctx.args = (temperature, backend)


def _kl_divergence_grad(ctx, grad_kl, *grad_state):
    # The state outputs are internal (kl_divergence returns only the KL): only the KL carries a gradient.
    logits, ref_logits, max_p, max_q, log_s_p, mean_d = ctx.saved_tensors
    temperature, backend = ctx.args
    grad = kl_divergence_backward_op(_zero_if_none(grad_kl, mean_d), logits, ref_logits, max_p, max_q, log_s_p,
                                     mean_d, temperature, backend)
    return grad, None, None, None


kl_divergence_op.register_autograd(_kl_divergence_grad, setup_context=_kl_divergence_setup)


@torch.library.custom_op("rlhf_fast::kl_penalty", mutates_args=())
def kl_penalty_op(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Elementwise; bandwidth-bound, so one implementation (PyTorch) serves every device."""
    return kl_penalty_ref(logp, ref_logp, kind)


@kl_penalty_op.register_fake
def _(logp, ref_logp, kind):
    return torch.empty_like(logp, dtype=torch.float32)


def _kl_penalty_setup(ctx, inputs, output):
    logp, ref_logp, kind = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.kind = kind
    ctx.dtypes = (logp.dtype, ref_logp.dtype)


def _kl_penalty_grad(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    d = ref_logp.float() - logp.float()
    if ctx.kind == "k1":
        dd = torch.full_like(d, -1.0)  # d(penalty)/d(d)
    elif ctx.kind == "k2":
        dd = d
    elif ctx.kind == "abs":
        dd = torch.sign(d)
    else:
        inside = (d >= -20.0) & (d <= 20.0)
        dc = d.clamp(-20.0, 20.0)
        k3 = dc.exp() - dc - 1.0
        dd = torch.where(inside & (k3 >= -10.0) & (k3 <= 10.0), dc.exp() - 1.0, 0.0)
    g = grad * dd
    return (-g).to(ctx.dtypes[0]), g.to(ctx.dtypes[1]), None


kl_penalty_op.register_autograd(_kl_penalty_grad, setup_context=_kl_penalty_setup)


# ---------------------------------------------------------------------------------------------------------------
# Public API: validation, reshaping to 2-D, backend choice.
# ---------------------------------------------------------------------------------------------------------------


def _kept_threshold(kept_threshold, labels) -> Optional[Tensor]:
    """None, or a float32 tensor of labels' shape on their device without NaN (NaN checked on CPU, eagerly)."""
    if kept_threshold is None:
        return None
    _checks.tensor(kept_threshold, "kept_threshold")
    if kept_threshold.dtype != torch.float32:
        raise TypeError(f"kept_threshold must be float32 (the sampler's raw-logit threshold), "
                        f"got {kept_threshold.dtype}")
    _checks.same_shape(kept_threshold, "kept_threshold", labels.shape, "labels.shape")
    _checks.same_device(kept_threshold, "kept_threshold", labels, "labels")
    if kept_threshold.device.type == "cpu" and not torch.compiler.is_compiling() and kept_threshold.numel() > 0:
        bad = kept_threshold.isnan()
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"kept_threshold{list(index)} is NaN (use -inf where everything is kept)")
    return kept_threshold.detach().reshape(-1).contiguous()


def _logprobs_entropy(logits, labels, temperature, ignore_index, compute_entropy, op_name, kept_threshold=None):
    _checks.logits(logits)
    temperature = _checks.temperature(temperature)
    ignore_index = _checks.integer(ignore_index, "ignore_index")
    if labels is not None:
        _checks.labels(labels, "labels", logits, ignore_index)
        kept_threshold = _kept_threshold(kept_threshold, labels)
    backend = _backend.select(op_name, LOGPROBS_BACKENDS, logits.device)
    rows = _checks.rows(logits)
    flat_labels = labels.reshape(-1).contiguous() if labels is not None else None
    logp, ent, _, _ = logprobs_entropy_op(rows, flat_labels, kept_threshold, temperature, ignore_index,
                                          compute_entropy, backend)
    batch_shape = logits.shape[:-1]
    return logp.view(batch_shape), ent.view(batch_shape)


def logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
             kept_threshold: Optional[Tensor] = None) -> Tensor:
    """Log-probability of each label under softmax(logits / temperature).

    logits: [..., V] float32/bf16/fp16; labels: [...] int64 in [0, V) or ``ignore_index`` -> [...] float32.
    Positions whose label is ``ignore_index`` give 0 and no gradient. Differentiable w.r.t. ``logits``.
    kept_threshold: None, or float32 [...] (the sampler's kept threshold, -inf = everything kept): the softmax is
    renormalised over the kept set {v : logits_v >= kept_threshold} plus the label (docs/formulas.md, "Kept-set
    log-probs"); the threshold gets no gradient.
    """
    return _logprobs_entropy(logits, labels, temperature, ignore_index, False, "logprobs", kept_threshold)[0]


def entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature): logits [..., V] float32/bf16/fp16 -> [...] float32."""
    return _logprobs_entropy(logits, None, temperature, -100, True, "entropy")[1]


def logprobs_and_entropy(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                         kept_threshold: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(logprobs(...), entropy(...))`` from one pass over the logits; entropy is computed at every position and
    is always the full-softmax entropy (kept_threshold changes the log-probs only)."""
    if labels is None:
        raise TypeError("labels must be a torch.Tensor, got None (use rlhf_fast.entropy for entropy alone)")
    return _logprobs_entropy(logits, labels, temperature, ignore_index, True, "logprobs_and_entropy", kept_threshold)


def kl_divergence(logits: Tensor, ref_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Exact per-position KL(p || q) over the vocabulary, p = softmax(logits / T), q = softmax(ref_logits / T).

    logits, ref_logits: [..., V], same shape and dtype -> [...] float32. Differentiable w.r.t. ``logits``;
    ``ref_logits`` is the frozen reference and receives no gradient.
    """
    _checks.logits(logits)
    _checks.logits(ref_logits, "ref_logits")
    _checks.same_shape(ref_logits, "ref_logits", logits.shape, "the shape of logits")
    _checks.same_device(ref_logits, "ref_logits", logits, "logits")
    if ref_logits.dtype != logits.dtype:
        raise TypeError(f"ref_logits must have the dtype of logits ({logits.dtype}), got {ref_logits.dtype}")
    temperature = _checks.temperature(temperature)
    backend = _backend.select("kl_divergence", KL_BACKENDS, logits.device)
    kl = kl_divergence_op(_checks.rows(logits), _checks.rows(ref_logits.detach()), temperature, backend)[0]
    return kl.view(logits.shape[:-1])


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL estimator from sampled-token log-probs; ``kind`` in k1, k2, k3, abs (see module docstring).

    logp, ref_logp: same shape, float32/bf16/fp16 -> float32. Differentiable w.r.t. both.
    """
    _checks.float_tensor(logp, "logp")
    _checks.float_tensor(ref_logp, "ref_logp")
    _checks.same_shape(ref_logp, "ref_logp", logp.shape, "the shape of logp")
    _checks.same_device(ref_logp, "ref_logp", logp, "logp")
    _checks.choice(kind, "kind", KL_KINDS)
    return kl_penalty_op(logp, ref_logp, kind)
