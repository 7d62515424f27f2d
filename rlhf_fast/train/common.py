"""What the SFT, RM and PPO trainers share: config loading, device and backend set-up, atomic checkpoints with RNG
state, metrics to JSONL + TensorBoard, and sampling from a policy to measure the synthetic task's true score."""

from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

import rlhf_fast

from .. import generate
from ..data import prompt_batch, task
from . import distributed


@dataclass
class RunConfig:
    """Fields every stage has."""

    model: str = ""            # local checkpoint directory; "" = the embedded tiny default
    data: str = ""             # local JSONL file; "" = the embedded synthetic task
    out: str = "runs/stage"    # output directory: checkpoint.pt, metrics.jsonl, tb/, model/
    seed: int = 0
    device: str = "auto"       # auto | cpu | cuda
    backend: Optional[str] = None   # force an rlhf_fast backend (torch, cpp, cuda, triton); None = automatic
    threads: int = 0           # torch intra-op threads on CPU; 0 = auto (1 for the embedded tiny model, else torch's)
    progress: bool = True      # tqdm progress bars (rank 0 only under torchrun)
    fsdp: bool = False         # under torchrun: shard parameters, gradients and optimizer state with FSDP2 (else DDP)
    checkpoint: str = "full"   # full: rank 0 writes one gathered checkpoint.pt | dcp: sharded torch.distributed.checkpoint


def load_config(cls, path: Optional[str] = None, overrides: Optional[list[str]] = None, **fields):
    """Dataclass defaults <- YAML file <- ``fields`` (e.g. --model/--out flags) <- dotlist overrides."""
    cfg = OmegaConf.structured(cls)
    if path:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    cfg = OmegaConf.merge(cfg, OmegaConf.create({k: v for k, v in fields.items() if v is not None}))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(cfg)


def save_config(cfg, out: str) -> None:
    if distributed.is_main():
        atomic_write_text(os.path.join(out, "config.yaml"), OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def resolve_device(name: str) -> torch.device:
    """The device to train on; under torchrun this also joins the process group (cuda:LOCAL_RANK on GPUs)."""
    return distributed.setup(name)


def autocast(device: torch.device):
    """bf16 autocast on GPU; full float32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def global_batch_indices(n_rows: int, step: int, steps_per_epoch: int, global_batch: int, seed: int) -> list[int]:
    """The row indices of the global batch at ``step``: each epoch's order is a pure function of (seed, epoch), so
    the data position is the step number (what --resume restores). Each rank takes its share with distributed.shard."""
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return order[i * global_batch:(i + 1) * global_batch].tolist()


@contextlib.contextmanager
def run_context(cfg: RunConfig):
    """For the duration of a stage: its output folder (with config.yaml), threads, seeds and the requested op
    backend."""
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, cfg.out)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif resolve_device(cfg.device).type == "cpu" and _is_tiny(cfg.model):
        # The tiny default's matmuls are too small to split: on the shared 2-core machine one thread measured
        # 3-4x faster than two (0.43 s vs 1.5 s per SFT step of the 4-layer model).
        torch.set_num_threads(1)
    seed_everything(cfg.seed)
    with rlhf_fast.use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext():
        yield


def _is_tiny(model_dir: str) -> bool:
    if not model_dir:
        return True
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f).get("hidden_size", 1 << 30) <= 256
    except OSError:
        return False


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
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class Metrics:
    """One JSON object per logged step in ``out/metrics.jsonl``, mirrored to TensorBoard (``out/tb``).

    On resume, rows past the checkpoint's step are dropped, so a resumed run's file matches an uninterrupted one.
    Under torchrun every rank keeps the rows (the values are global), only rank 0 writes.
    """

    def __init__(self, out: str, resume_step: Optional[int] = None):
        self.path = os.path.join(out, "metrics.jsonl")
        self.write = distributed.is_main()
        rows = []
        if resume_step is not None and os.path.exists(self.path):
            rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        distributed.barrier()  # every rank has read the file before rank 0 rewrites it
        if self.write:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self.rows = rows
        self._tb = None
        self._tb_dir = os.path.join(out, "tb")

    def log(self, step: int, **values) -> dict:
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.rows.append(row)
        if not self.write:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter  # imported on first use: it is slow to import

            self._tb = SummaryWriter(self._tb_dir)
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress(iterable=None, *, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and distributed.is_main()), dynamic_ncols=True, mininterval=1.0, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The synthetic task's true score of a policy
# ----------------------------------------------------------------------------------------------------------------


def decode_responses(tokenizer, sequences: torch.Tensor, response_mask: torch.Tensor, prompt_len: int) -> list[str]:
    out = []
    for seq, m in zip(sequences[:, prompt_len:].tolist(), response_mask.tolist()):
        out.append(tokenizer.decode([t for t, keep in zip(seq, m) if keep], skip_special_tokens=True))
    return out


@torch.no_grad()
def sample_true_score(policy, tokenizer, rows: list[dict], *, seed: int, max_new_tokens: int,
                      temperature: float = 1.0, batch_size: int = 128) -> float:
    """Mean true score of the policy's samples (temperature ``temperature``) on the task's prompts ``rows``.

    Under torchrun each rank samples its block of ``rows`` (seed + rank) and the mean is over all of them."""
    device = next(policy.parameters()).device
    rows = distributed.shard(rows)
    gen = torch.Generator(device).manual_seed(seed + distributed.rank())
    scores = []
    was_training = policy.training
    policy.eval()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = prompt_batch(tokenizer, chunk, 512)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        res = generate(policy, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=gen)
        texts = decode_responses(tokenizer, res.sequences, res.response_mask, ids.shape[1])
        scores += [task.true_score(r["prompt"], t) for r, t in zip(chunk, texts)]
    policy.train(was_training)
    return distributed.global_means({"score": float(np.sum(scores))}, len(scores))["score"]
