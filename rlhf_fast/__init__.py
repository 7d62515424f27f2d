"""rlhf_fast: fused RLHF kernels for PyTorch (C++, CUDA, Triton) and readable RLHF trainers built on them."""

from ._backend import use_backend
from .generation import GenerateOutput, generate
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = ["use_backend", *_ops_all, "generate", "GenerateOutput"]
