import os

# Without a GPU, Triton kernels run on CPU tensors in the interpreter. It must be set before triton is imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Subprocesses (`python -m rlhf_fast.cli ...`, torchrun) import the installed package, never the source tree in the
# working directory: after a non-editable install (CI) that tree has no compiled extension.
os.environ["PYTHONSAFEPATH"] = "1"
