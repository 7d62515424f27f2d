"""Input validation shared by every op: a clear TypeError/ValueError naming the argument, before any kernel runs;
and the one normalisation of a [..., D] input to the 2-D layout the kernels read."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(x, name: str) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x


def logits(x, name: str = "logits") -> torch.Tensor:
    float_tensor(x, name)
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(x.shape)})")
    return x


def same_device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def same_shape(x: torch.Tensor, name: str, shape, what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")


def seq_ids(x, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """The sequence id of each packed token: an int64 tensor of ref's shape, on ref's device."""
    tensor(x, "seq_ids")
    if x.dtype != torch.int64:
        raise TypeError(f"seq_ids must be int64 (torch.long), got {x.dtype}")
    same_shape(x, "seq_ids", ref.shape, f"the shape of {ref_name}")
    same_device(x, "seq_ids", ref, ref_name)
    return x


def labels(y, name: str, logits_: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """int64 labels of shape logits.shape[:-1], on the logits' device, each in [0, V) or == ignore_index.

    The range check reads the labels; it runs eagerly on CPU tensors only. On CUDA (and under torch.compile) it is
    skipped to avoid a host synchronisation, and the kernels return NaN for an out-of-range label instead.
    """
    tensor(y, name)
    if y.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long), got {y.dtype}")
    same_shape(y, name, logits_.shape[:-1], "logits.shape[:-1]")
    same_device(y, name, logits_, "logits")
    if y.device.type == "cpu" and not torch.compiler.is_compiling() and y.numel() > 0:
        vocab = logits_.shape[-1]
        bad = ((y < 0) | (y >= vocab)) & (y != ignore_index)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name}{list(index)} = {int(y[index])} is outside [0, {vocab}) and is not ignore_index={ignore_index}"
            )
    return y


def non_negative(x: torch.Tensor, name: str) -> torch.Tensor:
    """Every value finite and >= 0. Reading the values runs eagerly on CPU tensors only (no host synchronisation on
    CUDA or under torch.compile)."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and x.numel() > 0:
        bad = ~(x.isfinite() & (x >= 0))
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}{list(index)} = {float(x[index])} must be finite and >= 0")
    return x


def integer(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return x


def positive_number(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(x).__name__}")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {x}")
    return float(x)


# The kernels scale by 1 / temperature in float32: both must be finite there (and a nonzero temperature nonzero).
MIN_TEMPERATURE = float(1.0 / torch.finfo(torch.float32).max)  # 1 / T overflows float32 below this
MAX_TEMPERATURE = float(torch.finfo(torch.float32).max)


def temperature(x, name: str = "temperature") -> float:
    """A temperature > 0 whose float32 value and reciprocal are finite (else the kernels compute NaN)."""
    x = positive_number(x, name)
    if not MIN_TEMPERATURE <= x <= MAX_TEMPERATURE:
        raise ValueError(f"{name} must be in [{MIN_TEMPERATURE:.4g}, {MAX_TEMPERATURE:.4g}] (its reciprocal and "
                         f"itself must be finite float32 numbers), got {x}")
    return x


def choice(x, name: str, options) -> str:
    if x not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {x!r}")
    return x


def rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [N, D] with stride 1 in D (a view when possible), for the kernels, whatever view PyTorch accepts:
    a size-1 or empty dimension may carry any stride (a transposed [N, 1], an expanded or step-sliced [0, D]), and
    ``contiguous()`` keeps such a stride, so those are copied with fresh strides (cheap: at most N elements)."""
    out = x.reshape(-1, x.shape[-1])
    if out.stride(1) != 1:
        out = out.clone(memory_format=torch.contiguous_format)
    return out
