"""Shared test helpers: the backends usable here, and the tolerance rule for low-precision kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf_fast import _backend
from rlhf_fast.data.embedded import build_tokenizer
from rlhf_fast.models import ScalarHeadModel

HAS_CUDA = torch.cuda.is_available()


def usable_backends(implemented: tuple[str, ...], device: str = "cpu") -> list:
    """pytest params for each implemented backend; those that cannot run here are skipped with the reason."""
    params = []
    for name in implemented:
        dev = torch.device(device)
        if device == "cuda" and not HAS_CUDA:
            marks = [pytest.mark.skip(reason="needs a CUDA GPU")]
        elif not _backend.built(name):
            marks = [pytest.mark.skip(reason=f"backend {name} not available: {_backend.availability(name)}")]
        elif not _backend.runs_on(name, dev):
            marks = [pytest.mark.skip(reason=f"backend {name} does not run on {device} tensors here"
                                      + (" (needs a CUDA GPU)" if name == "cuda" else ""))]
        else:
            marks = []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def device_backends(implemented: tuple[str, ...]) -> list:
    """pytest params ``(device, backend)`` for CPU and CUDA; CUDA ones skip ("needs a CUDA GPU") without a GPU."""
    params = []
    for device in ("cpu", "cuda"):
        for p in usable_backends(implemented, device):
            params.append(pytest.param(device, p.values[0], marks=p.marks, id=f"{device}-{p.id}"))
    return params


class NewTensors(TorchDispatchMode):
    """``created``: (op, dtype, numel) of every tensor with new storage (not an in-place result, a view or a detached
    alias of an input) that an op creates while the mode is on; ``largest``: the largest of those numels (0: none)."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[str, torch.dtype, int]] = []

    @property
    def largest(self) -> int:
        return max((n for _, _, n in self.created), default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self.created += [(str(func), t.dtype, t.numel()) for t in torch.utils._pytree.tree_leaves(out)
                         if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


def largest_new_tensor_in_backward(loss: torch.Tensor) -> int:
    """Runs loss.backward() and returns the numel of the largest tensor it creates (0 if none): a fused loss whose
    gradients are formed in the forward only scales them in place, and autograd adopts them without a copy."""
    with NewTensors() as mode:
        loss.backward()
    return mode.largest


def assert_within_ref_error(out, ref_same_dtype, exact, *, name: str, factor: float = 2.0, floor: float = 1e-5):
    """The flash-attention rule: a kernel's error against an fp64 result must stay within ``factor`` times the
    error of the reference computed in the same (low) precision, plus a small absolute ``floor`` (for fp32, where
    the reference error can be ~0). NaN must appear exactly where the exact result has NaN."""
    out, ref_same_dtype, exact = out.double(), ref_same_dtype.double(), exact.double()
    nan = exact.isnan()
    assert torch.equal(out.isnan(), nan), f"{name}: NaN pattern differs from the exact result"
    out, ref_same_dtype, exact = out[~nan], ref_same_dtype[~nan], exact[~nan]
    finite = exact.isfinite()
    assert torch.equal(out[~finite], exact[~finite]), f"{name}: infinities differ from the exact result"
    if finite.sum() == 0:
        return
    err = (out[finite] - exact[finite]).abs().max().item()
    ref_err = (ref_same_dtype[finite] - exact[finite]).abs().max().item()
    bound = factor * ref_err + floor * max(1.0, exact[finite].abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {factor} x reference error {ref_err:.3g} + floor ({bound:.3g})"


def compiles_for_hopper(script: str) -> None:
    """Runs ``script`` (which compiles Triton kernels with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
    90, 32))`` and prints "compiled") in a subprocess without TRITON_INTERPRET: the interpreter accepts code the
    compiler rejects (non-constexpr globals, type errors), and this process runs Triton in the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # cwd: the tests folder, so that `python -c` imports the installed package, not the source tree
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


def kill_after_checkpoint(args: list, out: str, step: int, env: dict) -> None:
    """Starts the CLI ``args --out out`` and SIGKILLs it once its checkpoint has reached ``step`` (fails if the run
    ends first)."""
    import signal
    import time

    from rlhf_fast.train import checkpoint

    proc = subprocess.Popen(args + ["--out", out], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(out, "checkpoint.pt")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        state = checkpoint.load_checkpoint(ckpt) if os.path.exists(ckpt) else None
        if state is not None and state["step"] >= step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def tiny_policy_and_rm(root, kind: str) -> tuple[str, str]:
    """A random-init policy of ``kind`` with the embedded task's words, saved with a reward model on its body."""
    tok = build_tokenizer(0)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    if kind == "gpt2":  # dropout 0.1 in the embeddings, attention and residuals
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
                                             **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
                                             **ids))
    policy, rm = os.path.join(root, f"{kind}-policy"), os.path.join(root, f"{kind}-rm")
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    ScalarHeadModel.from_pretrained(policy).save_pretrained(rm)
    return policy, rm
