"""Checkpoints that survive any kill: atomic files (temporary file next to the target, then os.replace), the RNG
state of every rank, and ``Checkpoint``, the save / restore of models, optimizers and plain state on any world size
(one gathered file, or sharded ``torch.distributed.checkpoint``)."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import warnings
from typing import Optional

import numpy as np
import torch

from .distributed import Model, all_gather_object, barrier, is_distributed, is_main, rank, world_size

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(generator: Optional[torch.Generator] = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: Optional[torch.Generator] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        generator.set_state(state["generator"])




# ----------------------------------------------------------------------------------------------------------------
# Atomic files: write a temporary file next to the target, then os.replace (atomic on POSIX). A crash at any point
# leaves either the previous complete file or the new complete file, never a torn one.
# ----------------------------------------------------------------------------------------------------------------


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: str, state: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, (OSError, RuntimeError)) and _disk_full(path):
            raise OSError(errno.ENOSPC, f"no space left on the device to write {path} (the previous checkpoint "
                                        "is intact)") from exc
        raise
    os.replace(tmp, path)


def _disk_full(path: str) -> bool:
    """torch.save reports a full disk as an opaque RuntimeError: check the free space instead."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (16 << 20)


def remove_stale_temporaries(directory: str) -> None:
    """Temporary files of writes a killed run never finished (``*.tmp<pid>``)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        stem, _, pid = name.rpartition(".tmp")
        if stem and pid.isdigit():
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))


def load_checkpoint(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)




# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _optim_state(model: Model, opt: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names, gathered (on rank 0): loadable on any world size and mode."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model.module, opt, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))


def _load_optim_state(model: Model, opt: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model.module, opt, state, options=StateDictOptions(full_state_dict=is_distributed()))


@contextlib.contextmanager
def _single_process_dcp():
    """DCP warns on every single-process save / load, which is intended here (e.g. resuming on one rank)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class Checkpoint:
    """Save / restore of models, optimizers and plain state for a trainer, on any world size.

    ``models``: {name: Model}; ``optimizers``: {name: (Model, optimizer)}; ``extra``: picklable values (scheduler
    state, step, ...), saved by rank 0. RNG: every rank's Python / NumPy / torch (and ``generator``) state.
    ``fmt="full"``: ``out/checkpoint.pt``, one file written by rank 0 (temp file + rename) with the keys of the
    single-process checkpoint; ``fmt="dcp"``: ``out/checkpoint.dcp/step-N`` written by all ranks, then
    ``out/checkpoint.dcp/latest`` (temp file + rename) names it.
    """

    def __init__(self, out: str, fmt: str = "full"):
        if fmt not in ("full", "dcp"):
            raise ValueError(f"checkpoint must be full or dcp, got {fmt!r}")
        self.out, self.fmt = out, fmt
        self.path = os.path.join(out, "checkpoint.pt" if fmt == "full" else "checkpoint.dcp")

    def save(self, models: dict, optimizers: dict, extra: dict, generator: Optional[torch.Generator] = None) -> None:
        rngs = all_gather_object(rng_state(generator))
        meta = {**extra, "rng": rngs[0], "rng_ranks": rngs, "world_size": world_size()}
        if self.fmt == "full":
            state = {k: (m.full_state_dict() if m.mode == "fsdp" else m.module.state_dict()) for k, m in models.items()}
            state.update({k: _optim_state(m, o) for k, (m, o) in optimizers.items()})
            if is_main():
                save_checkpoint(self.path, {**state, **meta})
            barrier()
            return
        import torch.distributed.checkpoint as dcp

        step_dir = os.path.join(self.path, f"step-{extra.get('step', extra.get('iteration', 0))}")
        with _single_process_dcp():
            dcp.save(self._dcp_state(models, optimizers), checkpoint_id=step_dir, no_dist=not is_distributed())
        if is_main():
            save_checkpoint(os.path.join(step_dir, "meta.pt"), meta)
            previous = self._latest()
            atomic_write_text(os.path.join(self.path, "latest"), os.path.basename(step_dir))
            if previous and previous != step_dir:
                shutil.rmtree(previous, ignore_errors=True)
        barrier()

    def _latest(self) -> Optional[str]:
        try:
            with open(os.path.join(self.path, "latest")) as f:
                return os.path.join(self.path, f.read().strip())
        except OSError:
            return None

    @staticmethod
    def _dcp_state(models: dict, optimizers: dict) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {k: get_model_state_dict(m.module) for k, m in models.items()}
        state.update({k: get_optimizer_state_dict(m.module, o) for k, (m, o) in optimizers.items()})
        return state

    def exists(self) -> bool:
        return os.path.exists(self.path) if self.fmt == "full" else self._latest() is not None

    def load(self, models: dict, optimizers: dict, generator: Optional[torch.Generator] = None,
             seed: int = 0) -> Optional[dict]:
        """Restores models, optimizers and RNG in place; -> the saved dict (extra values), or None if none."""
        if not self.exists():
            return None
        if self.fmt == "full":
            state = load_checkpoint(self.path)
            for k, m in models.items():
                m.load_full_state_dict(state[k])
            for k, (m, o) in optimizers.items():
                _load_optim_state(m, o, state[k])
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            step_dir = self._latest()
            target = self._dcp_state(models, optimizers)
            with _single_process_dcp():
                dcp.load(target, checkpoint_id=step_dir, no_dist=not is_distributed())
            for k, m in models.items():
                set_model_state_dict(m.module, target[k])
            for k, (m, o) in optimizers.items():
                set_optimizer_state_dict(m.module, o, target[k])
            state = load_checkpoint(os.path.join(step_dir, "meta.pt"))
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == world_size():
            set_rng_state(ranks[rank()], generator)
        else:  # another world size: model and optimizer resume, the per-rank random streams restart
            seed_everything(seed + rank())
            if generator is not None:
                generator.manual_seed(seed + 1000 * rank() + 1)
        return state
