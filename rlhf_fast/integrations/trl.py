"""Route TRL's log-prob hot paths to rlhf_fast: ``patch()``, ``unpatch()``, or ``with patched(): ...``.

    from rlhf_fast.integrations import trl as rlhf_trl
    rlhf_trl.patch()                  # before or after building the trainer; then trainer.train() as usual

What is replaced (checked against trl 1.16; each is replaced only where it exists in the installed trl):
  - ``trl.trainer.utils.selective_log_softmax(logits, index, temperature=1.0, row_mask=None)``
  - ``trl.trainer.utils.entropy_from_logits(logits, chunk_size=128)``
  - ``trl.trainer.utils.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
    row_mask=None)``
  - ``trl.trainer.utils._ChunkedLogProbFunction``: the chunked lm_head log-prob path behind ``add_fused_lm_head``
    (``model(..., fused_lm_head=True)``), which GRPO, RLOO, DPO, KTO and SFT use. It goes to
    ``rlhf_fast.ops.linear_logprobs`` when only log-probs and entropy are asked for and the logits are plain
    ``lm_head(hidden)`` (no soft-capping, no logit scale); otherwise TRL's own function runs.
The functions are replaced in ``trl.trainer.utils`` and in every loaded ``trl.*`` module that imported them by name
(``from ..trainer.utils import selective_log_softmax``); modules imported later pick up the patched names from
``trl.trainer.utils``. ``unpatch()`` restores every original object.

Semantics are TRL's: same arguments, index shapes ``(...)`` and ``(..., K)``, ``temperature`` (> 0, else
ValueError), ``row_mask`` (rows where it is 0 give 0 and no gradient). Outputs are float32 whatever the logits dtype,
as on TRL's fused GPU path (TRL's CPU fallback returns the logits dtype). Logits of a dtype the fused kernels do not
take (float64) go to TRL's original function.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

import torch
from torch import Tensor

from .. import _backend, ops
from ..ops import token_logprobs as _tl

__all__ = ["ChunkedLogProbFunction", "entropy_from_logits", "is_patched", "patch", "patched",
           "selective_log_softmax", "selective_log_softmax_and_entropy", "unpatch"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_originals: dict[str, object] = {}  # name in trl.trainer.utils -> TRL's object, filled by patch()
_replaced: list[tuple[object, str, object]] = []  # (module, attribute, original) to restore


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
    _, _, lse = _tl.logprobs_entropy_op(_tl._as_rows(logits), None, float(temperature), -100, False, backend)
    return lse.view(logits.shape[:-1])


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Optional[Tensor] = None) -> Tensor:
    """``log_softmax(logits / temperature).gather(-1, index)``: logits [..., V]; index [...] or [..., K] -> float32
    of index's shape. Positions where ``row_mask`` (index's shape) is 0 give 0 with no gradient."""
    _check_temperature(temperature)
    if logits.dtype not in _KERNEL_DTYPES:
        return _original("selective_log_softmax")(logits, index, temperature=temperature, row_mask=row_mask)
    index = index.long()
    if index.dim() == logits.dim() - 1:
        if row_mask is not None:
            index = index.masked_fill(row_mask == 0, -100)  # ignore_index: 0 and no gradient
        return ops.logprobs(logits, index, temperature=temperature)
    # [..., K]: one fused pass for the log-sum-exp, then K gathered logits per position
    logp = torch.gather(logits, -1, index).float() / temperature - _lse(logits, temperature).unsqueeze(-1)
    return logp if row_mask is None else logp.masked_fill(row_mask == 0, 0.0)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Entropy of softmax(logits), logits [..., V] -> float32 [...]. ``chunk_size`` is accepted and unused: the fused
    op never holds more than one row's worth of temporaries."""
    if logits.dtype not in _KERNEL_DTYPES:
        return _original("entropy_from_logits")(logits, chunk_size)
    return ops.entropy(logits)


def selective_log_softmax_and_entropy(logits: Tensor, index: Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0, row_mask: Optional[Tensor] = None
                                      ) -> tuple[Tensor, Tensor]:
    """``(selective_log_softmax(...), entropy)`` in one pass over the logits; index [...]. Both float32; both 0
    where ``row_mask`` is 0. The entropy is detached unless ``entropy_requires_grad``."""
    _check_temperature(temperature)
    if logits.dtype not in _KERNEL_DTYPES:
        return _original("selective_log_softmax_and_entropy")(logits, index, entropy_requires_grad, temperature,
                                                              row_mask)
    index = index.long()
    if row_mask is not None:
        index = index.masked_fill(row_mask == 0, -100)
    logp, ent = ops.logprobs_and_entropy(logits, index, temperature=temperature)
    if row_mask is not None:
        ent = ent.masked_fill(row_mask == 0, 0.0)
    return logp, ent if entropy_requires_grad else ent.detach()


class ChunkedLogProbFunction:
    """Stands in for TRL's ``ChunkedLogProbFunction`` (an autograd.Function used through ``.apply``)."""

    @staticmethod
    def apply(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
              chunk_size: int, final_logit_softcapping: Optional[float] = None, logit_scale: float = 1.0,
              outputs: tuple[str, ...] = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        """hidden [N, H], weight [V, H], bias [V] or None, targets int64 [N] in [0, V) -> (log_probs, entropy or None,
        None, None, None), float32 [N]: log-probs (and entropy) of softmax(hidden @ weight.T + bias) / temperature.
        Like TRL, the projection runs in the autocast dtype when autocast is on, else in ``hidden``'s dtype."""
        device = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        plain = final_logit_softcapping is None and logit_scale == 1.0 and set(outputs) <= {"log_probs", "entropy"}
        if not plain or compute_dtype not in _KERNEL_DTYPES:
            return _original("_ChunkedLogProbFunction").apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                               final_logit_softcapping, logit_scale, outputs)
        want_entropy = "entropy" in outputs
        bias = None if bias is None else bias.to(compute_dtype)
        with torch.autocast(device, enabled=False):
            out = ops.linear_logprobs(hidden.to(compute_dtype), weight.to(compute_dtype), targets.long(), bias=bias,
                                      temperature=float(temperature), return_entropy=want_entropy)
        logp, entropy = out if want_entropy else (out, None)
        return logp, entropy, None, None, None


_REPLACEMENTS = {
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    "_ChunkedLogProbFunction": ChunkedLogProbFunction,
}


def is_patched() -> bool:
    return bool(_replaced)


def patch() -> None:
    """Replace TRL's log-prob functions by rlhf_fast's in every loaded trl module (idempotent)."""
    if _replaced:
        return
    try:
        from trl.trainer import utils  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError("rlhf_fast.integrations.trl needs trl: pip install 'rlhf_fast[trl]'") from exc
    by_id = {}
    for name, new in _REPLACEMENTS.items():
        if hasattr(utils, name):
            _originals[name] = getattr(utils, name)
            by_id[id(_originals[name])] = new
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "trl" or mod_name.startswith("trl.")):
            continue
        for attr, value in list(vars(module).items()):
            new = by_id.get(id(value))
            if new is not None:
                setattr(module, attr, new)
                _replaced.append((module, attr, value))


def unpatch() -> None:
    """Restore every object ``patch()`` replaced."""
    while _replaced:
        module, attr, value = _replaced.pop()
        setattr(module, attr, value)
    _originals.clear()


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
