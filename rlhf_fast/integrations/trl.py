"""Route TRL's log-prob hot paths to rlhf_fast: ``patch()``, ``unpatch()``, or ``with patched(): ...``.

    from rlhf_fast.integrations import trl as rlhf_trl
    rlhf_trl.patch()                  # before or after building the trainer; then trainer.train() as usual

What is replaced (checked against trl 1.16; each is replaced only where it exists in the installed trl):
  - ``trl.trainer.utils.selective_log_softmax(logits, index, temperature=1.0, row_mask=None)``
  - ``trl.trainer.utils.entropy_from_logits(logits, chunk_size=128)``
  - ``trl.trainer.utils.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
    row_mask=None)``
  - ``trl.trainer.utils._ChunkedLogProbFunction``: the chunked lm_head log-prob path behind ``add_fused_lm_head``
    (``model(..., fused_lm_head=True)``), which GRPO, RLOO, DPO, KTO and SFT use, for every output TRL asks for:
    log-probs and entropy from ``rlhf_fast.ops.linear_logprobs``; ``log_sum_sq_probs`` from a second fused pass at
    half the temperature (log sum p^2 = 2 log p(t) - log p_{T/2}(t)); ``mean_logits`` from ``hidden @ mean_v W_v``;
    ``is_top1`` (target is the first argmax) from a chunked running argmax without gradient. Logits with
    soft-capping or a logit scale go to TRL's own function.
TRL's GRPO loss itself (every loss_type, sequence-level importance sampling) is not replaced: it runs TRL's maths on
the replaced log-probs. Each TRL 1.16 loss type has its counterpart in ``rlhf_fast.ppo_objective(loss_type=...,
ratio_level=...)`` with ``loss_weights`` (the table in docs/integrations.md).
The functions are replaced in ``trl.trainer.utils`` and in every loaded ``trl.*`` module that imported them by name
(``from ..trainer.utils import selective_log_softmax``); modules imported later pick up the patched names from
``trl.trainer.utils``. ``unpatch()`` restores every original object, also in the modules imported while patched.

Semantics are TRL's: same arguments, index shapes ``(...)`` and ``(..., K)``, ``temperature`` (> 0, else
ValueError), ``row_mask`` (rows where it is 0 give 0 and no gradient). Dtype contract: the math is float32; the
result has the dtype TRL's own function would return for the same inputs (float32 where TRL takes its fused Triton
path, i.e. CUDA/XPU logits it supports; the logits dtype on its fallback path, e.g. CPU), unless ``patch(dtype=
"float32")`` asks for float32 always. Logits of a dtype the fused kernels do not take (float64) go to TRL's original
function. Targeted version: trl 1.16 (a warning is issued once for another version).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

from .. import _backend, ops
from ..ops import _checks, token_logprobs as _tl

__all__ = ["ChunkedLogProbFunction", "entropy_from_logits", "is_patched", "patch", "patched",
           "selective_log_softmax", "selective_log_softmax_and_entropy", "unpatch"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_originals: dict[str, object] = {}  # name in trl.trainer.utils -> TRL's object, filled by patch()
_replaced: list[tuple[object, str, object]] = []  # (module, attribute, original) to restore
_state = {"float32": False}  # patch(dtype="float32"): always return float32
TARGET_VERSION = "1.16"
_warned: list[bool] = []


def _check_version() -> None:
    import trl  # noqa: PLC0415

    if not _warned and not trl.__version__.startswith(TARGET_VERSION + "."):
        _warned.append(True)
        warnings.warn(f"rlhf_fast.integrations.trl targets trl {TARGET_VERSION}; trl {trl.__version__} is installed "
                      "and may differ (docs/integrations.md)", stacklevel=3)


def _out_dtype(logits: Tensor, index: Optional[Tensor] = None, row_mask: Optional[Tensor] = None) -> torch.dtype:
    """The dtype TRL's own function returns: float32 on its fused Triton path, else the logits dtype."""
    if _state["float32"]:
        return torch.float32
    from trl.trainer import utils  # noqa: PLC0415

    fused = utils.is_triton_available() and utils._supports_trl_loss_kernel(logits, index, row_mask)
    return torch.float32 if fused else logits.dtype


def _original(name: str):
    if name in _originals:
        return _originals[name]
    from trl.trainer import utils  # noqa: PLC0415

    return getattr(utils, name)


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError("temperature must be positive")


def _lse(logits: Tensor, temperature: float) -> Tensor:
    """logsumexp(logits / temperature) over the last dim, float32 [...], differentiable, from the fused op."""
    backend = _backend.select("logprobs", _tl.LOGPROBS_BACKENDS, logits.device)
    _, _, lse, _ = _tl.logprobs_entropy_op(_checks.rows(logits), None, None, float(temperature), -100, False, backend)
    return lse.view(logits.shape[:-1])


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Optional[Tensor] = None) -> Tensor:
    """``log_softmax(logits / temperature).gather(-1, index)``: logits [..., V]; index [...] or [..., K] -> float32
    of index's shape. Positions where ``row_mask`` (index's shape) is 0 give 0 with no gradient."""
    _check_temperature(temperature)
    if logits.dtype not in _KERNEL_DTYPES:
        return _original("selective_log_softmax")(logits, index, temperature=temperature, row_mask=row_mask)
    dtype = _out_dtype(logits, index, row_mask)
    index = index.long()
    if index.dim() == logits.dim() - 1:
        if row_mask is not None:
            index = index.masked_fill(row_mask == 0, -100)  # ignore_index: 0 and no gradient
        return ops.logprobs(logits, index, temperature=temperature).to(dtype)
    # [..., K]: one fused pass for the log-sum-exp, then K gathered logits per position
    logp = torch.gather(logits, -1, index).float() / temperature - _lse(logits, temperature).unsqueeze(-1)
    return (logp if row_mask is None else logp.masked_fill(row_mask == 0, 0.0)).to(dtype)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Entropy of softmax(logits), logits [..., V] -> [...] (float32 math, TRL's dtype). ``chunk_size`` is accepted and unused: the fused
    op never holds more than one row's worth of temporaries."""
    if logits.dtype not in _KERNEL_DTYPES:
        return _original("entropy_from_logits")(logits, chunk_size)
    return ops.entropy(logits).to(_out_dtype(logits))


def selective_log_softmax_and_entropy(logits: Tensor, index: Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0, row_mask: Optional[Tensor] = None
                                      ) -> tuple[Tensor, Tensor]:
    """``(selective_log_softmax(...), entropy)`` in one pass over the logits; index [...]. TRL's dtype; both 0
    where ``row_mask`` is 0. The entropy is detached unless ``entropy_requires_grad``."""
    _check_temperature(temperature)
    if logits.dtype not in _KERNEL_DTYPES:
        return _original("selective_log_softmax_and_entropy")(logits, index, entropy_requires_grad, temperature,
                                                              row_mask)
    dtype = _out_dtype(logits, index, row_mask)
    index = index.long()
    if row_mask is not None:
        index = index.masked_fill(row_mask == 0, -100)
    logp, ent = ops.logprobs_and_entropy(logits, index, temperature=temperature)
    if row_mask is not None:
        ent = ent.masked_fill(row_mask == 0, 0.0)
    logp, ent = logp.to(dtype), ent.to(dtype)
    return logp, ent if entropy_requires_grad else ent.detach()


def _is_top1(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunk: int = 4096) -> Tensor:
    """Whether each target is the first argmax of hidden @ weight.T + bias (a running argmax over vocabulary chunks;
    a later chunk wins only with a strictly larger logit, as argmax keeps the first maximum). bool [N]."""
    best = torch.full(targets.shape, float("-inf"), device=hidden.device)
    arg = torch.zeros_like(targets)
    for start in range(0, weight.shape[0], chunk):
        tile = hidden @ weight[start:start + chunk].T
        if bias is not None:
            tile = tile + bias[start:start + chunk]
        value, index = tile.float().max(-1)
        better = value > best
        best = torch.where(better, value, best)
        arg = torch.where(better, index + start, arg)
    return arg == targets


class ChunkedLogProbFunction:
    """Stands in for TRL's ``ChunkedLogProbFunction`` (an autograd.Function used through ``.apply``)."""

    @staticmethod
    def apply(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
              chunk_size: int, final_logit_softcapping: Optional[float] = None, logit_scale: float = 1.0,
              outputs: tuple[str, ...] = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        """hidden [N, H], weight [V, H], bias [V] or None, targets int64 [N] in [0, V) -> (log_probs, entropy,
        log_sum_sq_probs, mean_logits, is_top1), each [N] (float32; is_top1 bool) or None where not in ``outputs``,
        of z = (hidden @ weight.T + bias) / temperature. log-probs and entropy carry gradients; the other three do
        not (as in TRL). Like TRL, the projection runs in the autocast dtype when autocast is on, else in
        ``hidden``'s dtype."""
        device = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        if final_logit_softcapping is not None or logit_scale != 1.0 or compute_dtype not in _KERNEL_DTYPES:
            return _original("_ChunkedLogProbFunction").apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                               final_logit_softcapping, logit_scale, outputs)
        temperature = float(temperature)
        want_entropy = "entropy" in outputs
        hidden, weight, targets = hidden.to(compute_dtype), weight.to(compute_dtype), targets.long()
        bias = None if bias is None else bias.to(compute_dtype)
        log_sum_sq = mean_logits = is_top1 = None
        with torch.autocast(device, enabled=False):
            out = ops.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                      return_entropy=want_entropy)
            logp, entropy = out if want_entropy else (out, None)
            with torch.no_grad():
                if "log_sum_sq_probs" in outputs:  # log sum_v p_v^2 = lse(2z) - 2 lse(z) = 2 log p_t - log p'_t
                    half = ops.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature / 2)
                    log_sum_sq = 2 * logp.detach() - half
                if "mean_logits" in outputs:
                    mean_logits = hidden.float() @ weight.float().mean(0)
                    if bias is not None:
                        mean_logits = mean_logits + bias.float().mean()
                    mean_logits = mean_logits / temperature
                if "is_top1" in outputs:
                    is_top1 = _is_top1(hidden, weight, bias, targets)
        return logp, entropy, log_sum_sq, mean_logits, is_top1


_REPLACEMENTS = {
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    "_ChunkedLogProbFunction": ChunkedLogProbFunction,
}


def is_patched() -> bool:
    return bool(_replaced)


def _trl_modules() -> list:
    return [m for n, m in list(sys.modules.items()) if m is not None and (n == "trl" or n.startswith("trl."))]


def patch(dtype: str = "trl") -> None:
    """Replace TRL's log-prob functions by rlhf_fast's in every loaded trl module (idempotent). ``dtype="trl"``:
    return the dtype TRL's function would; ``"float32"``: always float32."""
    if dtype not in ("trl", "float32"):
        raise ValueError(f"dtype must be 'trl' or 'float32', got {dtype!r}")
    _state["float32"] = dtype == "float32"
    if _replaced:
        return
    try:
        from trl.trainer import utils  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError("rlhf_fast.integrations.trl needs trl: pip install 'rlhf_fast[trl]'") from exc
    _check_version()
    by_id = {}
    for name, new in _REPLACEMENTS.items():
        if hasattr(utils, name):
            _originals[name] = getattr(utils, name)
            by_id[id(_originals[name])] = new
    for module in _trl_modules():
        for attr, value in list(vars(module).items()):
            new = by_id.get(id(value))
            if new is not None:
                setattr(module, attr, new)
                _replaced.append((module, attr, value))


def unpatch() -> None:
    """Restore every object ``patch()`` replaced, and TRL's object wherever a trl module imported while patched
    took one of ours by name."""
    while _replaced:
        module, attr, value = _replaced.pop()
        setattr(module, attr, value)
    original_of = {id(_REPLACEMENTS[name]): value for name, value in _originals.items()}
    for module in _trl_modules():
        for attr, value in list(vars(module).items()):
            if id(value) in original_of:
                setattr(module, attr, original_of[id(value)])
    _originals.clear()
    _state["float32"] = False


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """``patch()`` for the duration of the block, then ``unpatch()`` (if this block did the patching)."""
    already = is_patched()
    patch()
    try:
        yield
    finally:
        if not already:
            unpatch()
