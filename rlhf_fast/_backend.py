"""Backend registry: which implementations are built and usable, and which one an op runs on.

Backends:
  torch   the plain-PyTorch reference; always available, any device.
  cpp     the compiled C++ CPU extension (``rlhf_fast._C``); CPU tensors.
  cuda    the compiled CUDA extension (``rlhf_fast._C_cuda``); CUDA tensors.
  triton  Triton kernels (``rlhf_fast.kernels``); CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

Selection, strongest first: ``use_backend(name)`` (innermost wins), the ``RLHF_FAST_BACKEND`` environment
variable (read once, at import), then automatic: the first backend in ``AUTO_ORDER`` that is usable for
the op and the tensor's device. An explicit choice that cannot run raises instead of falling back, except for
ops whose only implementation is the portable PyTorch one (they ignore the request).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Iterator

import torch

BACKENDS = ("torch", "cpp", "cuda", "triton")
# CUDA: the compiled kernels first. On an H100 (benchmarks/results/2026-11-27-h100-check1.txt) they beat the Triton
# ones in every log-prob row (fwd and fwd+bwd, V = 32000 and 151936, fp32 and bf16: 0.74-0.89x the time), they need
# no JIT compile on first call, and the CUDA sampler passed the GPU tests where the Triton one then failed. Triton
# is the fallback when the package was installed without nvcc.
AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}


def _import_extension(name: str):
    try:
        return importlib.import_module(f"rlhf_fast.{name}")
    except ImportError as exc:
        return exc


_C = _import_extension("_C")
_C_cuda = _import_extension("_C_cuda") if not isinstance(_C, ImportError) else _C
if isinstance(_C, ImportError):
    warnings.warn(
        f"rlhf_fast: the compiled C++ extension is not available ({_C}); every op falls back to the "
        "plain-PyTorch reference backend, which is correct but slower. Reinstall with "
        "`pip install --no-build-isolation .` to build it.",
        stacklevel=2,
    )


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


TRITON_IMPORTABLE = _triton_importable()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def built(backend: str) -> bool:
    """Whether the backend's code is present in this installation (not whether it suits a device)."""
    if backend == "torch":
        return True
    if backend == "cpp":
        return not isinstance(_C, ImportError)
    if backend == "cuda":
        return not isinstance(_C_cuda, ImportError)
    if backend == "triton":
        return TRITON_IMPORTABLE
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether a built backend can run on tensors of this device."""
    if backend == "torch":
        return True
    if backend == "cpp":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    return False


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


_ENV_BACKEND = os.environ.get("RLHF_FAST_BACKEND") or None
if _ENV_BACKEND is not None:
    _check_name(_ENV_BACKEND)
_forced: list[str] = []


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every rlhf_fast op inside the block on backend ``name`` (raises if an op cannot run there)."""
    _forced.append(_check_name(name))
    try:
        yield
    finally:
        _forced.pop()


def requested_backend() -> str | None:
    """The user's explicit choice (context manager, then environment), or None for automatic."""
    return _forced[-1] if _forced else _ENV_BACKEND


def select(op: str, implemented: tuple[str, ...], device: torch.device) -> str:
    """The backend ``op`` (implemented by ``implemented``) runs on for tensors on ``device``."""
    if implemented == ("torch",):
        return "torch"  # one portable PyTorch implementation: the request does not apply
    wanted = requested_backend()
    if wanted is not None:
        if wanted not in implemented:
            raise RuntimeError(
                f"rlhf_fast.{op}: backend {wanted!r} was requested but {op} is implemented only for "
                f"{implemented}; choose one of those with rlhf_fast.use_backend()"
            )
        if not built(wanted):
            raise RuntimeError(
                f"rlhf_fast.{op}: backend {wanted!r} was requested but is not available in this "
                f"installation ({availability(wanted)})"
            )
        if not runs_on(wanted, device):
            raise RuntimeError(f"rlhf_fast.{op}: backend {wanted!r} cannot run on {device.type} tensors")
        return wanted
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        if name in implemented and built(name) and runs_on(name, device):
            return name
    return "torch"


def availability(backend: str) -> str:
    """A one-line human description of why a backend is or is not available."""
    if backend == "torch":
        return "always available"
    if backend == "cpp":
        return "built" if built("cpp") else f"not built: {_C}"
    if backend == "cuda":
        if built("cuda"):
            return "built" + ("" if torch.cuda.is_available() else " (no CUDA device visible)")
        return f"not built: {_C_cuda}"
    if backend == "triton":
        if not built("triton"):
            return "triton is not installed (pip install 'rlhf_fast[triton]')"
        return "installed" + (" (TRITON_INTERPRET=1: runs on CPU tensors)" if triton_interpret() else "")
    raise ValueError(f"unknown backend {backend!r}")
