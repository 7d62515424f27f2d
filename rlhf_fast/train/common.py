"""What every trainer shares: the run config, the ``Trainer`` skeleton (config -> data -> model -> loop ->
checkpoint -> metrics), metrics to JSONL + TensorBoard, and sampling from a policy to measure the synthetic task's
true score."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import typing
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

import rlhf_fast

from .. import generate
from .._backend import BACKENDS
from ..data import DataError, prompt_batch, task
from ..data.embedded import save_tiny_default
from ..models.loading import check_model_dir, position_limit
from ..models.tiny import MAX_POSITIONS as TINY_MAX_POSITIONS
from ..models.logprobs import HEAD_DTYPES
from ..ops import AGG_MODES, IS_MODES
from ..ops.token_logprobs import KL_KINDS
from . import distributed
from .checkpoint import Checkpoint, atomic_write_text, remove_stale_temporaries, seed_everything


class ConfigError(ValueError):
    """A mistake in a stage's configuration: a field's value, a missing input file or model directory, an output
    directory holding another run. The CLI prints the message as one line and exits with status 2 (as it does for
    ``rlhf_fast.data.DataError``)."""


def _rule(lo, hi=math.inf, *, lo_open=False, hi_open=False, optional=False, integer=False):
    """-> (predicate, description) of a finite number in an interval (or None, when ``optional``)."""
    def ok(v) -> bool:
        if v is None:
            return optional
        return math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    if integer:
        what = f"an integer >= {lo}"
    elif hi == math.inf:
        what = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return ok, what + (" or null" if optional else "")


def _choice(*options):
    return (lambda v: v in options), "one of " + ", ".join("null" if o is None else str(o) for o in options)


# What each field must be, by name, in every stage's config (a new stage's fields of these names are checked too;
# the types themselves are OmegaConf's).
RULES = {
    **dict.fromkeys(("batch_size", "minibatch_size", "epochs", "iterations", "group_size", "log_every", "save_every",
                     "max_new_tokens", "max_prompt_len", "num_examples", "num_pairs", "kl_horizon"),
                    _rule(1, integer=True)),
    **dict.fromkeys(("warmup_steps", "threads", "eval_every", "eval_prompts", "top_k"), _rule(0, integer=True)),
    "max_len": _rule(2, integer=True),  # a prompt token and a target
    **dict.fromkeys(("lr", "critic_lr", "kl_target"), _rule(0, lo_open=True)),
    "temperature": (lambda v: math.isfinite(v) and v > 0 and 1 / v < torch.finfo(torch.float32).max,
                    "a finite number > 0 whose reciprocal is finite in float32"),
    "grad_clip": (lambda v: v > 0, "a number > 0 (inf: no clipping)"),
    **dict.fromkeys(("weight_decay", "kl_coef", "entropy_coef", "clip_low", "value_clip"), _rule(0)),
    "clip_high": _rule(0, optional=True),
    "dual_clip": _rule(1, lo_open=True, optional=True),
    "reward_clip": _rule(0, lo_open=True, optional=True),
    **dict.fromkeys(("gamma", "lam", "min_p"), _rule(0, 1)),
    "top_p": _rule(0, 1, lo_open=True),
    "heldout_fraction": _rule(0, 1, lo_open=True, hi_open=True),
    "out": (lambda v: bool(v) and not os.path.isfile(v), "a directory (not an existing file)"),
    "device": (lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None,
               "auto, cpu, cuda or cuda:N"),
    "backend": _choice(None, *BACKENDS),
    "checkpoint": _choice("full", "dcp"),
    "kl_kind": _choice(*KL_KINDS),
    "loss_agg": _choice(*AGG_MODES),
    "logprob_support": _choice("full", "kept"),
    "behaviour_logprobs": _choice("sampler", "recompute"),
    "is_correction": _choice(*IS_MODES),
    "head_dtype": _choice(*HEAD_DTYPES),
    **dict.fromkeys(("is_cap", "icepop_high"), _rule(0, lo_open=True)),
    "icepop_low": _rule(0),
}
MODEL_FIELDS = ("model", "reward_models", "critic")  # local model directories ("" = the default; lists allowed)


def _model_dirs(cfg, name: str) -> list[str]:
    value = getattr(cfg, name, None)
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


@dataclass
class RunConfig:
    """Fields every stage has."""

    model: str = ""            # local checkpoint directory; "" = the embedded tiny default
    data: str = ""             # local JSONL file; "" = the embedded synthetic task
    out: str = "runs/stage"    # output directory: checkpoint.pt, metrics.jsonl, tb/, model/
    seed: int = 0              # every random stream (data order, sampling, initialisation) derives from it
    device: str = "auto"       # auto | cpu | cuda (| cuda:N)
    backend: Optional[str] = None   # force an rlhf_fast backend (torch, cpp, cuda, triton); null = automatic
    threads: int = 0           # torch intra-op threads on CPU; 0 = auto (1 for the embedded tiny model, else torch's)
    progress: bool = True      # tqdm progress bars (rank 0 only under torchrun)
    fsdp: bool = False         # under torchrun: shard parameters, gradients and optimizer state with FSDP2 (else DDP)
    checkpoint: str = "full"   # full: rank 0 writes one gathered checkpoint.pt | dcp: sharded torch.distributed.checkpoint
    overwrite: bool = False    # replace a run already in `out` (else refused without --resume)

    def validate(self, prefix: str = "") -> None:
        """Raises ConfigError naming the field and its value: every field against ``RULES`` (nested stage configs
        with their prefix, e.g. ``ppo.lr``), then, for a config run as such (no prefix), its inputs (files, model
        directories, the models' position limit: ``check_inputs``). Stages add their own cross-field checks."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, RunConfig):
                value.validate(f"{prefix}{f.name}.")
            elif f.name in RULES and not RULES[f.name][0](value):
                raise ConfigError(f"{prefix}{f.name}={value!r}: must be {RULES[f.name][1]}")
        if not prefix:
            check_inputs(self)


def check_inputs(cfg: RunConfig) -> None:
    """The data files exist (``data``, ``*_data``), the model directories are complete (``MODEL_FIELDS``), and the
    longest sequence of the config (and of its nested stage configs, which run on its ``model``) fits every model's
    positions: all checked before anything is loaded."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if (f.name in ("data", "rollouts") or f.name.endswith("_data")) and value and not os.path.isfile(value):
            raise ConfigError(f"{f.name}={value!r}: no such file")
        for path in _model_dirs(cfg, f.name) if f.name in MODEL_FIELDS else []:
            if not path:
                continue
            try:
                check_model_dir(path, weights=not (f.name == "model" and getattr(cfg, "from_scratch", False)),
                                tokenizer=f.name == "model")
            except FileNotFoundError as exc:
                raise ConfigError(f"{f.name}: {exc}") from None
            if f.name == "reward_models" and not os.path.exists(os.path.join(path, "scalar_head.json")):
                raise ConfigError(f"reward_models: {path!r} holds no scalar_head.json; a reward model is the model/ "
                                  "folder of `rlhf-fast rm`")
    stages = [cfg] + [getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                      if isinstance(getattr(cfg, f.name), RunConfig)]
    for name, path in [(n, p) for n in MODEL_FIELDS for p in _model_dirs(cfg, n)]:
        if not path and name != "model":
            continue
        try:
            limit, key = position_limit(path) if path else (TINY_MAX_POSITIONS, "max_position_embeddings")
        except ValueError as exc:
            raise ConfigError(f"{name}: {os.path.join(path, 'config.json')} is not valid JSON ({exc})") from None
        for stage in stages:
            need, fields = sequence_length(stage)
            if limit is not None and need is not None and need > limit:
                where = f"{name}={path!r}" if path else "the embedded default model"
                raise ConfigError(f"{fields} = {need} exceeds the {limit} positions of {where} ({key} in its "
                                  f"config.json): lower {fields.split(' + ')[0]} by {need - limit} or more")


def sequence_length(cfg: RunConfig) -> tuple[Optional[int], str]:
    """The longest sequence a stage's config lets through (prompt + response), and the fields that give it."""
    if hasattr(cfg, "max_prompt_len") and hasattr(cfg, "max_new_tokens"):  # a stage that samples
        return cfg.max_prompt_len + cfg.max_new_tokens, "max_prompt_len + max_new_tokens"
    if hasattr(cfg, "max_len"):
        return cfg.max_len, "max_len"
    return None, ""


def load_config(cls, path: Optional[str] = None, overrides: Optional[list[str]] = None, **fields):
    """Dataclass defaults <- YAML file <- ``fields`` (e.g. --model/--out flags) <- dotlist overrides. An unknown
    field, a value of the wrong type or an unreadable file raises ConfigError naming it (and the valid fields)."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"{item!r}: overrides are key=value")
    try:
        cfg = OmegaConf.structured(cls)
        if path:
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
            except OSError as exc:
                raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})") from None
        cfg = OmegaConf.merge(cfg, OmegaConf.create({k: v for k, v in fields.items() if v is not None}))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([_bracket_list(cls, o) for o in overrides]))
        return OmegaConf.to_object(cfg)
    except ConfigKeyError as exc:
        parent = exc.full_key.rpartition(".")[0] if exc.full_key else ""
        names = [f.name for f in dataclasses.fields(exc.object_type)] if dataclasses.is_dataclass(
            exc.object_type) else []
        where = f"{parent}." if parent else ""
        raise ConfigError(f"unknown field {exc.full_key!r}; valid fields{' of ' + parent if parent else ''}: "
                          + ", ".join(where + n for n in names)) from None
    except OmegaConfBaseException as exc:  # a value of the wrong type, a YAML that is not a mapping, ...
        key = getattr(exc, "full_key", None)
        msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None


def _bracket_list(cls, override: str) -> str:
    """``reward_fns=a:f,b:g`` -> ``reward_fns=[a:f,b:g]`` for a list field (dotted keys reach nested stages)."""
    key, sep, value = override.partition("=")
    kind = cls
    for part in key.split("."):
        kind = typing.get_type_hints(kind).get(part) if dataclasses.is_dataclass(kind) else None
    if sep and typing.get_origin(kind) is list and not value.lstrip().startswith("["):
        return f"{key}=[{value}]"
    return override


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
    """For the duration of a stage: threads, seeds and the requested op backend."""
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
    """The rows of a metrics.jsonl; a torn last line (a kill or a full disk mid-append) is dropped with a warning,
    a malformed line anywhere else is an error naming the file and line."""
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if k == len(lines) - 1:
                warnings.warn(f"{path}:{i}: dropping a torn last line (the run was interrupted mid-write)")
                break
            raise ValueError(f"{path}:{i}: not a JSON metrics row ({exc.msg})") from None
    return rows


def progress(iterable=None, *, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and distributed.is_main()), dynamic_ncols=True, mininterval=1.0, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The trainer skeleton
# ----------------------------------------------------------------------------------------------------------------


def linear_schedule(warmup: int, total: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup)) * max(0.0, 1.0 - step / max(1, total))


def base_model_dir(cfg: RunConfig) -> str:
    """``cfg.model``, or the embedded tiny default built and saved under ``cfg.out/base``."""
    if cfg.model:
        return cfg.model
    path = os.path.join(cfg.out, "base")
    if distributed.is_main() and not os.path.exists(os.path.join(path, "model.safetensors")):
        save_tiny_default(path, seed=cfg.seed)
    distributed.barrier()
    return path


# What a started or finished run leaves in its folder; ``overwrite=true`` removes these (and what the run writes beside
# them) before a fresh run.
RUN_MARKERS = ("checkpoint.pt", "checkpoint.dcp", "summary.json", "model")
RUN_OUTPUTS = RUN_MARKERS + ("metrics.jsonl", "tb", "critic", "base")


def existing_run(out: str) -> Optional[str]:
    """The first file or folder of a started or finished run found in ``out`` (None: no run there)."""
    for name in RUN_MARKERS:
        if os.path.exists(os.path.join(out, name)):
            return os.path.join(out, name)
    return None


def prepare_out(cfg: RunConfig, resume: bool) -> bool:
    """Checks ``cfg.out`` against ``--resume`` before anything is written; -> whether to resume.

    Without --resume a folder holding a run is refused (ConfigError), unless ``overwrite=true``, which removes that
    run's files. With --resume: a checkpoint of the other format, or a finished run without a checkpoint, is refused;
    a folder with no checkpoint yet (never started, or killed before its first checkpoint: nothing to lose) starts
    from the beginning with a warning, so a launcher that always passes --resume works from the first launch on."""
    found = existing_run(cfg.out)
    own = "checkpoint.pt" if cfg.checkpoint == "full" else "checkpoint.dcp"
    if not resume:
        if found and not cfg.overwrite:
            raise ConfigError(f"{cfg.out} already holds a run ({found} exists): add --resume to continue it, choose "
                              "another --out, or set overwrite=true to replace it")
        if found and distributed.is_main():
            for name in RUN_OUTPUTS:
                path = os.path.join(cfg.out, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        distributed.barrier()
        return False
    if os.path.exists(os.path.join(cfg.out, own)):
        return True
    other = "checkpoint.dcp" if own == "checkpoint.pt" else "checkpoint.pt"
    if os.path.exists(os.path.join(cfg.out, other)):
        raise ConfigError(f"--resume: {cfg.out} holds {other}, but checkpoint={cfg.checkpoint}: set "
                          f"checkpoint={'dcp' if other == 'checkpoint.dcp' else 'full'} to resume it")
    if found:
        raise ConfigError(f"--resume: {cfg.out} holds a run ({found}) but no {own} to continue from; set "
                          "overwrite=true without --resume to replace it")
    if distributed.is_main():
        warnings.warn(f"--resume: no checkpoint in {cfg.out} yet: starting from the beginning")
    return False


def check_rows(n_rows: int, batch_size: int, what: str) -> None:
    """A DataError when some rank would get no row of a batch; a warning when the data is less than one global
    batch (every step then trains on all of it, each row repeated as often as the steps)."""
    world = distributed.world_size()
    if n_rows < world:
        raise DataError(f"{n_rows} {what}: " + (f"fewer than the {world} ranks, some rank would train on nothing"
                                                if n_rows else "nothing to train on"))
    if n_rows < batch_size * world and distributed.is_main():
        ranks = f" x {world} ranks" if world > 1 else ""
        warnings.warn(f"{n_rows} {what}, fewer than one batch (batch_size={batch_size}{ranks}): every step trains "
                      "on all of them, one step per epoch; lower batch_size for several steps per epoch")


def check_warmup(warmup: int, total: int) -> None:
    """Warns when the warm-up is so long against the run that the learning rate never reaches half of lr."""
    schedule = linear_schedule(warmup, total)
    peak = max(schedule(s) for s in range(min(warmup, total))) if warmup else 1.0
    if peak < 0.5 and distributed.is_main():
        warnings.warn(f"warmup_steps={warmup} but the run has {total} optimizer steps: the learning rate peaks at "
                      f"{peak:.0%} of lr; set warmup_steps to about a tenth of the steps "
                      f"(warmup_steps={total // 10}) or train longer")


class Trainer:
    """config -> data -> model -> loop -> checkpoint -> metrics, for every algorithm.

    A stage implements ``setup()`` (data, models, optimizers), ``total_steps()``, ``train_step()`` (one optimiser
    step or RL iteration -> {name: value over the global batch}, the same on every rank), the
    ``checkpointed()`` models and optimizers, and ``finish()`` (save, evaluate -> summary). The skeleton owns the
    loop, the logging window (averaged over ``log_every`` steps; saved in the checkpoint, so a resumed run logs what
    an uninterrupted one does), checkpoints every ``save_every`` steps and at the end, and resume.
    """

    name = "stage"
    log_every = 1
    save_every = 50

    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg
        cfg.validate()
        self.device = resolve_device(cfg.device)
        resume = prepare_out(cfg, resume)
        os.makedirs(cfg.out, exist_ok=True)
        save_config(cfg, cfg.out)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed + distributed.rank())
        self.setup()
        self.step = 0
        self.window: dict[str, list[float]] = {}  # name -> [sum, count] since the last log
        self.checkpoint = Checkpoint(cfg.out, cfg.checkpoint)
        state = None
        if resume:
            remove_stale_temporaries(cfg.out)
            state = self.checkpoint.load(*self.checkpointed(), self.generator, seed=cfg.seed)
            if state is None:  # a sharded checkpoint whose first save never completed
                warnings.warn(f"--resume: no complete checkpoint in {cfg.out}, starting from the beginning")
        if state is not None:
            self.step, self.window = state["step"], state["window"]
            self.restore(state)
        self.metrics = Metrics(cfg.out, resume_step=self.step if state is not None else None)

    # what a stage provides
    def setup(self) -> None:
        raise NotImplementedError

    def total_steps(self) -> int:
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def checkpointed(self) -> tuple[dict, dict]:
        """-> ({name: Model}, {name: (Model, optimizer)})."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def finish(self) -> dict:
        raise NotImplementedError

    def postfix(self, row: dict) -> dict:
        return {k: f"{v:.3f}" for k, v in list(row.items())[:3]}

    # the loop
    def train(self) -> dict:
        total = self.total_steps()
        bar = progress(total=total, initial=self.step, enabled=self.cfg.progress, desc=self.name)
        while self.step < total:
            for k, v in self.train_step().items():
                acc = self.window.setdefault(k, [0.0, 0])
                acc[0], acc[1] = acc[0] + v, acc[1] + 1
            self.step += 1
            bar.update(1)
            if self.step % self.log_every == 0 or self.step == total:
                row = {k: s / n for k, (s, n) in self.window.items()}
                row.update(self.log_extra(row))
                self.metrics.log(self.step, **{k: v for k, v in row.items() if v is not None})
                bar.set_postfix(self.postfix(row))
                self.window = {}
            if self.step % self.save_every == 0 or self.step == total:
                self.checkpoint.save(*self.checkpointed(), {**self.extra_state(), "step": self.step,
                                                            "window": self.window}, self.generator)
        bar.close()
        summary = self.finish()
        self.metrics.close()
        if distributed.is_main():
            atomic_write_text(os.path.join(self.cfg.out, "summary.json"), json.dumps(summary))
        return summary

    def log_extra(self, row: dict) -> dict:
        """Values computed at logging time only (evaluations, learning rates)."""
        return {}


class EpochTrainer(Trainer):
    """A trainer of one model over ``rows`` in global batches for ``cfg.epochs`` passes, with AdamW and the linear
    warm-up / decay schedule (SFT, RM). A stage's ``setup()`` builds ``self.model`` and calls ``start(rows)``."""

    def start(self, rows: list) -> None:
        cfg = self.cfg
        self.log_every, self.save_every = cfg.log_every, cfg.save_every
        self.rows = rows
        self.global_batch = cfg.batch_size * distributed.world_size()
        check_rows(len(rows), cfg.batch_size, f"{self.name} training rows")
        self.steps_per_epoch = distributed.steps_per_epoch(len(rows), self.global_batch)
        check_warmup(cfg.warmup_steps, self.total_steps())
        self.opt, self.sched = optimizer(cfg, self.model, self.total_steps())
        self.model.train()

    def step_rows(self) -> list:
        """This rank's rows of the current step's global batch."""
        idx = global_batch_indices(len(self.rows), self.step, self.steps_per_epoch, self.global_batch, self.cfg.seed)
        return [self.rows[j] for j in distributed.shard(idx)]

    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def checkpointed(self):
        return {"model": self.model}, {"optimizer": (self.model, self.opt)}

    def extra_state(self) -> dict:
        return {"scheduler": self.sched.state_dict()}

    def restore(self, state: dict) -> None:
        self.sched.load_state_dict(state["scheduler"])


def optimizer_step(loss, model, opt, grad_clip: float, sched=None) -> None:
    """Backward, gradient-norm clipping, one optimiser (and schedule) step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    if sched is not None:
        sched.step()


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel over every parameter; on CPU ~7x faster than the default per-parameter loop,
    measured on the embedded model at V=32000) where every parameter is a float tensor on CPU or CUDA, else the
    default implementation."""
    params = list(params)
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def optimizer(cfg, model, total: int):
    """AdamW with the linear warm-up / decay schedule over ``total`` steps."""
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(cfg.warmup_steps, total))


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
