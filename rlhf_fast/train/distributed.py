"""Scale-out on PyTorch's own engine: the trainers under ``torchrun`` with DDP or FSDP2, unchanged.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) a trainer joins the process group (NCCL for CUDA
tensors, gloo for CPU tensors), takes its contiguous block of every global batch, and synchronises gradients with
DDP or shards parameters, gradients and optimizer state with FSDP2 (``fully_shard``, ``fsdp=true``). Run as one
process, everything here is a no-op and the trainers behave exactly as before.

Semantics (what "N ranks = 1 rank with N x the batch" means here):

* ``batch_size`` / ``minibatch_size`` are per rank; the global batch is ``world_size`` times larger. Every rank
  computes the same global order of the data from the seed, and rank r takes block r of each global batch.
* Loss aggregation over the global batch: the aggregation mode becomes per-token weights once per step
  (:func:`global_weights`, one all-reduce of the normaliser; docs/formulas.md states each mode), so each rank's
  ``sum(w * l)`` is its share of the global aggregate and DDP / FSDP2's gradient average is its gradient.
* Whitening statistics (:func:`masked_whiten`), explained variance and every logged metric use all-reduced sums, so
  they are the single-process values of the concatenated batch.
* Models: trainable ones are wrapped (``Model``), and every forward that needs gradients or touches sharded
  parameters goes through ``model(fn, *args)`` = ``fn(module, *args)`` run inside the DDP / FSDP2 root forward (the
  fused log-prob path reads the lm_head weight directly, so it must run inside the root forward for FSDP2 to have
  gathered it). Generation and evaluation, whose number of forwards may differ between ranks, use
  ``model.local(fn, ...)``: under FSDP2 it gathers every layer once, runs ``fn`` on the full parameters with no
  further collective, and reshards. Frozen models (PPO reference and reward model) are replicated, or sharded with
  FSDP2 when ``shard_frozen=true``.
* Checkpoints: see checkpoint.py.
* Only rank 0 writes metrics, plots, summaries and models, and shows progress bars.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

# ----------------------------------------------------------------------------------------------------------------
# Process group and rank helpers
# ----------------------------------------------------------------------------------------------------------------


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto") -> torch.device:
    """Joins the process group ``torchrun`` describes (once; nothing for a single process) -> this rank's device.

    device: auto | cpu | cuda. On CUDA each rank uses ``cuda:LOCAL_RANK``; the group has NCCL for CUDA tensors and
    gloo for CPU tensors (metrics and object exchange).
    """
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if env_world_size() > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    if use_cuda:
        return torch.device("cuda", local) if is_distributed() else torch.device(device if device != "auto" else "cuda")
    return torch.device("cpu")


def shutdown() -> None:
    """Leaves the process group. The barrier first: once it returns, gloo's worker threads hold no finished work
    whose tensors they would free later under the GIL; a group destroyed (by whoever drops the last reference, e.g.
    a DDP reducer) while they do deadlocks, since its destructor joins them holding the GIL."""
    global _MESH
    _MESH = None
    if dist.is_initialized():
        if is_distributed():
            dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence, rank_: Optional[int] = None, world: Optional[int] = None) -> list:
    """Block ``rank`` of ``items`` split into ``world`` contiguous blocks whose sizes differ by at most one."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    n = len(items)
    start = rank_ * (n // world) + min(rank_, n % world)
    return list(items[start:start + n // world + (rank_ < n % world)])


def steps_per_epoch(n: int, global_batch: int, world: Optional[int] = None) -> int:
    """Steps over ``n`` rows in global batches; a last partial batch is kept when every rank gets a row of it."""
    world = world_size() if world is None else world
    full, rest = divmod(n, global_batch)
    return full + (rest >= world)


# ----------------------------------------------------------------------------------------------------------------
# Reductions (no-ops on one process)
# ----------------------------------------------------------------------------------------------------------------


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce of a tensor (sum | max | min) over the ranks; returns it. Not differentiable."""
    if is_distributed():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def reduce_floats(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """One all-reduce for a dict of Python numbers (float64 on the CPU group)."""
    if not is_distributed() or not values:
        return {k: float(v) for k, v in values.items()}
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    all_reduce(t, op)
    return dict(zip(values, t.tolist()))


def all_gather_object(obj: Any) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def global_means(sums: dict[str, float], count: float) -> dict[str, float]:
    """Means over the global batch from per-rank sums and the per-rank count of what was summed."""
    total = reduce_floats({**sums, "__count": count})
    n = max(total.pop("__count"), 1.0)
    return {k: v / n for k, v in total.items()}


def global_weights(mask: Tensor, agg: str = "token-mean", *, seq_ids: Optional[Tensor] = None,
                   max_len: Optional[int] = None) -> Tensor:
    """Per-token loss weights (``rlhf_fast.loss_weights``) over the GLOBAL batch, with one all-reduce of the
    normaliser, scaled by the world size for the gradient averaging of DDP / FSDP2: with ``loss = sum(w * l)`` on
    each rank, the averaged gradient is that of the global aggregate, and ``sum over ranks of loss / world_size`` is
    its value. One process: exactly ``loss_weights(mask, agg, ...)``."""
    from ..ops import loss_normalizer, loss_weights

    d = loss_normalizer(mask, agg, seq_ids=seq_ids, max_len=max_len)
    if not is_distributed():
        return loss_weights(mask, agg, seq_ids=seq_ids, max_len=max_len, normalizer=d)
    d = all_reduce(d.detach().double().cpu().reshape(1), "max" if agg == "seq-mean-token-sum-norm" else "sum")
    w = loss_weights(mask, agg, seq_ids=seq_ids, max_len=max_len, normalizer=d[0].to(mask.device, torch.float32))
    return w * world_size()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the mask entries of every rank: float32 0-d, not differentiable across ranks."""
    if not is_distributed():
        import rlhf_fast

        return rlhf_fast.masked_mean(x, mask)
    m = mask.to(torch.float64)
    t = torch.stack([(x.double() * m).sum(), m.sum()]).cpu()
    all_reduce(t)
    return (t[0] / t[1].clamp(min=1)).to(device=x.device, dtype=torch.float32)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and unbiased variance of the masked entries of ALL ranks (the
    docs/formulas.md whitening of the concatenated batch). One process: ``rlhf_fast.masked_whiten`` (the fused op).
    x: [B, T] float; mask: [B, T] -> float32 [B, T]."""
    if not is_distributed():
        import rlhf_fast

        return rlhf_fast.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    m = mask.to(torch.float64)
    xd = x.double()
    s = torch.stack([(xd * m).sum(), m.sum()]).cpu()
    all_reduce(s)
    n = float(s[1])
    mean = float(s[0]) / max(n, 1.0)
    sq = ((xd - mean) ** 2 * m).sum().reshape(1).cpu()
    all_reduce(sq)
    var = float(sq[0]) / max(n - 1.0, 1.0)
    out = (xd - mean) / (var + eps) ** 0.5
    return (out if shift_mean else out + mean).float()


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over the response tokens of all ranks (unbiased variances); nan if Var(R) = 0."""
    m = mask.bool()
    r, d = returns[m].double(), (returns - values)[m].double()
    s = reduce_floats({"n": r.numel(), "r": r.sum().item(), "d": d.sum().item()})
    n = s["n"]
    if n < 2:
        return float("nan")
    q = reduce_floats({"r": ((r - s["r"] / n) ** 2).sum().item(), "d": ((d - s["d"] / n) ** 2).sum().item()})
    return float("nan") if q["r"] == 0 else 1.0 - q["d"] / q["r"]


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class _Call(nn.Module):
    """The root module DDP / FSDP2 wrap: ``forward(fn, *args)`` runs ``fn(module, *args)`` inside their forward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable, *args, **kwargs):
        # views returned from an FSDP2 root lose its pre-backward hook if modified in place: hand out copies
        return tree_map_only(Tensor, lambda t: t.clone() if t._is_view() else t, fn(self.module, *args, **kwargs))


_MESH = None


def _mesh(device: torch.device):
    global _MESH
    if _MESH is None:
        from torch.distributed.device_mesh import init_device_mesh

        _MESH = init_device_mesh(device.type, (world_size(),))
    return _MESH


def _block_classes(module: nn.Module) -> set[str]:
    """Names of the repeated blocks to shard one by one: 🤗 models list them in ``_no_split_modules``."""
    names: set[str] = set()
    for m in module.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    return names


class Model:
    """A model as the trainers hold it on any world size.

    ``mode``: ``"none"`` (one process, or a frozen replicated model), ``"ddp"`` or ``"fsdp"``. ``model(fn, *args)``
    runs ``fn(module, *args)`` through the DDP / FSDP2 forward (gradients synchronised, sharded parameters
    gathered); ``model.local(fn, *args)`` runs generation or evaluation (no gradient); ``model.module`` is the 🤗 /
    scalar-head module itself (under FSDP2 its parameters are sharded DTensors).
    """

    def __init__(self, module: nn.Module, mode: str = "none"):
        if mode not in ("none", "ddp", "fsdp"):
            raise ValueError(f"mode must be none, ddp or fsdp, got {mode!r}")
        if not is_distributed():
            mode = "none"
        self.module, self.mode = module, mode
        root = _Call(module)
        if mode == "ddp":
            device = next(module.parameters()).device
            # no per-forward buffer broadcast: the buffers (rotary tables) are constants, and it would be a
            # collective in every forward, which generation and evaluation make in different numbers per rank
            root = nn.parallel.DistributedDataParallel(
                root, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        elif mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            mesh = _mesh(next(module.parameters()).device)
            blocks = _block_classes(module)
            self._fsdp_blocks = [m for m in module.modules() if type(m).__name__ in blocks]
            for block in self._fsdp_blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(root, mesh=mesh)
        self.engine = root

    def __call__(self, fn: Callable, *args, **kwargs):
        return self.engine(fn, *args, **kwargs)

    def local(self, fn: Callable, *args, **kwargs):
        """``fn(module, *args)`` without gradient, any number of forwards per rank (generation, evaluation).

        Under FSDP2 every rank must call it (it all-gathers each layer once); the full parameters live on each rank
        for its duration, as for any FSDP generation without a separate inference engine.
        """
        if self.mode != "fsdp":
            with torch.no_grad():
                return fn(self.module, *args, **kwargs)
        for block in self._fsdp_blocks:
            block.set_reshard_after_forward(False, recurse=False)

        def gathered(module, *a, **kw):
            for block in self._fsdp_blocks:
                block.unshard()
            return fn(module, *a, **kw)

        try:
            with torch.no_grad():
                return self.engine(gathered, *args, **kwargs)
        finally:
            for block in self._fsdp_blocks:
                block.set_reshard_after_forward(True, recurse=False)
                block.reshard()
            self.engine.reshard()

    def __getattr__(self, name: str):
        # anything else (config, score, generation_config, ...) is the module's; note that calling the module
        # directly bypasses DDP / FSDP2: fine for frozen replicated models, not for training
        if name in ("module", "mode", "engine"):
            raise AttributeError(name)
        return getattr(self.module, name)

    def parameters(self):
        return self.module.parameters()

    def train(self, mode: bool = True) -> "Model":
        self.module.train(mode)
        return self

    def eval(self) -> "Model":
        return self.train(False)

    # ------------------------------------------------------------------------------------------ state dicts
    def full_state_dict(self) -> dict:
        """Every parameter and buffer, gathered, on the CPU (a collective under FSDP2: all ranks call it)."""
        out = {}
        for k, v in self.module.state_dict().items():
            if hasattr(v, "full_tensor"):
                v = v.full_tensor()
            out[k] = v.detach().cpu()
        return out

    def load_full_state_dict(self, state: dict) -> None:
        if self.mode != "fsdp":
            self.module.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))

    def save_pretrained(self, path: str, tokenizer=None) -> None:
        """Rank 0 writes the gathered model with ``save_pretrained`` into a temporary directory and swaps it in."""
        state = self.full_state_dict() if self.mode == "fsdp" else None
        if is_main():
            tmp, old = path + ".tmp", path + ".old"
            shutil.rmtree(tmp, ignore_errors=True)
            if state is None:
                self.module.save_pretrained(tmp)
            else:
                _save_gathered(self.module, state, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if os.path.exists(path):
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        barrier()


def _save_gathered(module: nn.Module, state: dict, path: str) -> None:
    """``save_pretrained`` of an FSDP2-sharded module from its gathered state: a CPU twin built from the config."""
    twin = _plain_skeleton(module)
    twin.load_state_dict(state)
    twin.save_pretrained(path)


def _plain_skeleton(module: nn.Module) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    from ..models.value_head import ScalarHeadModel

    with torch.device("cpu"):
        if isinstance(module, ScalarHeadModel):
            return ScalarHeadModel(AutoModel.from_config(module.body.config, dtype=torch.float32))
        return AutoModelForCausalLM.from_config(module.config, dtype=torch.float32)


def wrap(module: nn.Module, *, fsdp: bool = False, trainable: bool = True, shard_frozen: bool = False) -> Model:
    """The trainers' one call: DDP (or FSDP2 with ``fsdp``) for a trainable model under torchrun; a frozen model is
    replicated, or sharded with FSDP2 when ``shard_frozen``; one process: a plain ``Model``."""
    if trainable:
        return Model(module, "fsdp" if fsdp else "ddp")
    return Model(module, "fsdp" if shard_frozen else "none")


