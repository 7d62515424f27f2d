"""The reward of a rollout: reward models and programmatic reward functions, each scored per sequence, combined into
one score per sequence.

Sources, in this order: the reward models (``reward_models``: directories from ``rlhf-fast rm``; each score is
normalised with that model's held-out mean and standard deviation, then clipped to ``±reward_clip``) and the reward
functions (``reward_fns``: ``module:function`` names; used as they return, e.g. 0/1 for a verifiable answer).

A reward function has TRL's ``reward_funcs`` signature::

    def reward(prompts: list, completions: list[str], **fields) -> list[float]

``prompts`` are the rows' ``prompt`` (or ``messages``) values as in the JSONL, ``completions`` the decoded
responses, and ``fields`` every other JSONL field as a list (one entry per completion; rows repeat in group modes).

Combination (``reward_rule``):
  weighted   ``sum_i reward_weights[i] * s_i`` over all sources (default weights: 1 each).
  llama2     Llama 2's helpfulness/safety rule over exactly two reward models (helpfulness first, then safety):
             ``s_safety`` where ``s_safety < safety_threshold`` (or the row's ``safety_field`` is true), else
             ``s_helpfulness``; the reward functions are then added with ``reward_weights`` (one per function).
The rule's threshold is on the normalised safety score (standard deviations from its held-out mean).
"""

from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..models import ScalarHeadModel
from .common import ConfigError

RULES = ("weighted", "llama2")


@dataclass
class RewardConfig:
    """The reward fields of the stages that score samples (ppo, rs)."""

    reward_models: list[str] = field(default_factory=list)  # reward-model directories (from `rlhf-fast rm`)
    reward_fns: list[str] = field(default_factory=list)     # programmatic rewards, module:function (TRL signature)
    reward_weights: list[float] = field(default_factory=list)  # one per model then function ([] = 1 each)
    reward_rule: str = "weighted"  # weighted | llama2 (the safety score below safety_threshold, else helpfulness)
    safety_threshold: float = 0.0  # llama2 rule: on the normalised safety score
    safety_field: str = ""         # llama2 rule: JSONL field marking safety prompts (they always get the safety score)
    reward_clip: Optional[float] = 5.0  # clip each normalised reward-model score to +-reward_clip (None: no clip)

    def validate(self, prefix: str = "") -> None:
        """The sources and the rule, before any model loads (a pipeline's stage gets its reward model later)."""
        if not prefix and not (self.reward_models or self.reward_fns):
            raise ConfigError(f"{type(self).__name__.removesuffix('Config').lower()} needs reward_models= "
                              "(directories from `rlhf-fast rm`) and/or reward_fns= (module:function)")
        for spec in self.reward_fns:
            load_reward_fn(spec)
        n_models = len(self.reward_models) + (1 if prefix else 0)  # + the pipeline's reward model
        try:
            combine(torch.zeros(n_models + len(self.reward_fns), 1), n_models=n_models, rule=self.reward_rule,
                    weights=self.reward_weights, safety_threshold=self.safety_threshold)
        except ValueError as exc:
            raise ConfigError(f"{prefix}{exc}") from None
        super().validate(prefix)


class RewardError(RuntimeError):
    """A reward function failed or returned something other than one finite float per completion."""


def load_reward_fn(spec: str) -> Callable:
    """``"package.module:function"`` -> the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward_fns entries must look like 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward_fns: cannot import {module_name!r} for {spec!r}: {exc}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"reward_fns: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"reward_fns: {spec!r} is a {type(fn).__name__}, not a callable")
    return fn


def call_reward_fn(fn: Callable, name: str, prompts: Sequence, completions: Sequence[str],
                   fields: dict[str, list]) -> Tensor:
    """One batched call -> float32 [len(completions)]. A failure is reported with the first row that fails alone."""
    try:
        values = fn(prompts=list(prompts), completions=list(completions), **fields)
    except Exception as exc:
        row = _first_failing_row(fn, prompts, completions, fields)
        where = "" if row is None else f" on row {row} (prompt {prompts[row]!r}, completion {completions[row]!r})"
        raise RewardError(f"reward function {name}{where} raised {type(exc).__name__}: {exc}") from exc
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise RewardError(f"reward function {name} must return a list of floats, got {values!r:.200}") from exc
    if len(values) != len(completions):
        raise RewardError(f"reward function {name} returned {len(values)} values for {len(completions)} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        i = bad[0]
        raise RewardError(f"reward function {name} returned {values[i]} on row {i} (prompt {prompts[i]!r}, "
                          f"completion {completions[i]!r}); rewards must be finite")
    return torch.tensor(values, dtype=torch.float32)


def _first_failing_row(fn, prompts, completions, fields) -> Optional[int]:
    for i in range(len(completions)):
        try:
            fn(prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in fields.items()})
        except Exception:
            return i
    return None


def combine(scores: Tensor, *, n_models: int, rule: str = "weighted", weights: Optional[Sequence[float]] = None,
            safety_threshold: float = 0.0, safety_rows: Optional[Tensor] = None) -> Tensor:
    """Sources' scores [K, S] (reward models first, then functions) -> the combined reward [S] (module docstring)."""
    if rule not in RULES:
        raise ValueError(f"reward_rule must be one of {RULES}, got {rule!r}")
    k = scores.shape[0]
    if rule == "weighted":
        w = [1.0] * k if not weights else list(weights)
        if len(w) != k:
            raise ValueError(f"reward_weights needs one weight per reward model and reward function ({k}), got {w}")
        return (torch.tensor(w, dtype=scores.dtype, device=scores.device)[:, None] * scores).sum(0)
    if n_models != 2:
        raise ValueError(f"reward_rule=llama2 needs exactly two reward_models (helpfulness, safety), got {n_models}")
    helpful, safety = scores[0], scores[1]
    unsafe = safety < safety_threshold
    if safety_rows is not None:
        unsafe = unsafe | safety_rows.to(unsafe.device)
    out = torch.where(unsafe, safety, helpful)
    w = [1.0] * (k - 2) if not weights else list(weights)
    if len(w) != k - 2:
        raise ValueError(f"with reward_rule=llama2, reward_weights needs one weight per reward function ({k - 2}), "
                         f"got {w}")
    for wi, s in zip(w, scores[2:]):
        out = out + wi * s
    return out


def source_names(reward_models: Sequence[str], reward_fns: Sequence[str]) -> list[str]:
    """Short, unique names for logging: the reward model's directory (``runs/rm_help/model`` -> ``rm_help``) and the
    function's name."""
    names = []
    for path in reward_models:
        path = os.path.normpath(path)
        base = os.path.basename(path)
        names.append(os.path.basename(os.path.dirname(path)) if base == "model" and os.path.dirname(path) else base)
    names += [spec.rpartition(":")[2] for spec in reward_fns]
    return [n if names.count(n) == 1 else f"{n}.{i}" for i, n in enumerate(names)]


def score_statistics(path: str) -> tuple[float, float]:
    """The reward model's held-out score mean and standard deviation (0 and 1 when it has none)."""
    try:
        with open(os.path.join(path, "scalar_head.json")) as f:
            info = json.load(f)
    except OSError:
        return 0.0, 1.0
    return info.get("score_mean", 0.0), info.get("score_std", 1.0) or 1.0


def row_prompts(rows: Sequence[dict]) -> list:
    return [r["prompt"] if "prompt" in r else r["messages"] for r in rows]


def row_fields(rows: Sequence[dict]) -> dict[str, list]:
    keys = [k for k in rows[0] if k not in ("prompt", "messages")] if rows else []
    return {k: [r.get(k) for r in rows] for k in keys}


class Rewards:
    """The sources of a PPO run, loaded once; ``__call__`` scores a rollout."""

    def __init__(self, cfg: RewardConfig, device: torch.device, wrap: Callable):
        self.cfg = cfg
        self.models = [wrap(ScalarHeadModel.from_pretrained(p, device).eval().requires_grad_(False))
                       for p in cfg.reward_models]
        self.stats = [score_statistics(p) for p in cfg.reward_models]
        self.fns = [load_reward_fn(s) for s in cfg.reward_fns]
        self.names = source_names(cfg.reward_models, cfg.reward_fns)

    @torch.no_grad()
    def __call__(self, batch, rows: Sequence[dict],
                 completions: Optional[Sequence[str]]) -> tuple[Tensor, dict[str, Tensor]]:
        """-> (combined reward [S], {"reward/<source>": its score [S], "rm_score/<source>": a model's raw score})."""
        cfg, device = self.cfg, batch.device
        scores, logged = [], {}
        for name, model, (mean, std) in zip(self.names, self.models, self.stats):
            raw = model(ScalarHeadModel.score, batch).float()
            s = (raw - mean) / std
            if cfg.reward_clip is not None:
                s = s.clamp(-cfg.reward_clip, cfg.reward_clip)
            logged[f"rm_score/{name}"], logged[f"reward/{name}"] = raw, s
            scores.append(s)
        if self.fns:
            prompts, fields = row_prompts(rows), row_fields(rows)
            for name, fn in zip(self.names[len(self.models):], self.fns):
                s = call_reward_fn(fn, name, prompts, completions, fields).to(device)
                logged[f"reward/{name}"] = s
                scores.append(s)
        safety_rows = None
        if cfg.safety_field:
            safety_rows = torch.tensor([bool(r.get(cfg.safety_field, False)) for r in rows], device=device)
        total = combine(torch.stack(scores), n_models=len(self.models), rule=cfg.reward_rule,
                        weights=cfg.reward_weights, safety_threshold=cfg.safety_threshold, safety_rows=safety_rows)
        return total, logged
