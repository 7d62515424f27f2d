"""SFT -> reward model -> PPO end to end (InstructGPT-style), or SFT -> DPO with ``algo=dpo``, on the embedded
default or a user's model and data.

    rlhf-fast pipeline [--config pipeline.yaml] [--out DIR] [algo=dpo] [sft.epochs=3 ppo.iterations=80 ...]

Outputs under ``out``: sft/, rm/, ppo/ (dpo/ instead of rm/ and ppo/ with algo=dpo; each with metrics.jsonl, tb/,
model/), summary.json and pipeline.png (PPO only).
With --resume a finished stage is skipped and an interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

from . import common, distributed
from .checkpoint import atomic_write_text
from .dpo import DPOConfig, train_dpo
from .ppo import PPOConfig, train_ppo
from .rm import RMConfig, train_rm
from .rs import RSConfig, train_rs
from .sft import SFTConfig, train_sft


@dataclass
class PipelineConfig(common.RunConfig):
    """The run-wide fields (``RunConfig``'s: seed, device, backend, ...) apply to every stage; ``model`` is the base
    model, ``out`` the pipeline's folder (stages in out/sft, out/rm, out/ppo); data per stage."""

    out: str = "runs/pipeline"
    algo: str = ""                   # dpo: SFT -> DPO; rs: SFT -> RM -> rejection sampling; ppo | grpo | dr_grpo |
                                     # rloo: SFT -> RM -> PPO with that ppo.algo, in out/<algo>; "" = SFT -> RM ->
                                     # PPO with ppo.algo as given, in out/ppo
    sft_data: str = ""               # JSONL files; "" = the embedded synthetic task
    rm_data: str = ""                # preference pairs
    ppo_data: str = ""               # prompts (also of algo=rs)
    dpo_data: str = ""               # preference pairs (algo=dpo)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rs: RSConfig = field(default_factory=RSConfig)

    def validate(self, prefix: str = "") -> None:
        if self.data:
            raise common.ConfigError("pipeline: give the data files per stage as sft_data=, rm_data=, ppo_data= and "
                                     "dpo_data=, not data= (or --data)")
        if self.algo not in ("", *ALGOS):
            raise common.ConfigError(f"{prefix}algo={self.algo!r}: must be one of {', '.join(ALGOS)} (or empty)")
        if self.algo not in ("", "dpo", "rs"):
            self.ppo.algo = self.algo
        super().validate(prefix)


ALGOS = ("ppo", "grpo", "dr_grpo", "rloo", "dpo", "rs")
STAGE_OWN = ("model", "data", "out")  # the RunConfig fields each stage gets from the pipeline's wiring


def _stage(stage, cfg: PipelineConfig, name: str, **fields):
    """A stage's config: every run-wide field of the pipeline, its folder, and its wiring (model, data, ...)."""
    for f in dataclasses.fields(common.RunConfig):
        if f.name not in STAGE_OWN:
            setattr(stage, f.name, getattr(cfg, f.name))
    stage.out = os.path.join(cfg.out, name)
    for key, value in fields.items():
        setattr(stage, key, value)
    return stage


def _done(path: str) -> Optional[dict]:
    summary = os.path.join(path, "summary.json")
    if os.path.exists(summary) and os.path.exists(os.path.join(path, "model")):
        with open(summary) as f:
            return json.load(f)
    return None


def _check_out(cfg: PipelineConfig, resume: bool) -> None:
    """A pipeline folder holding a run (its summary or any stage's run) is refused without --resume, unless
    ``overwrite=true`` (each stage then replaces its own run)."""
    found = next(filter(None, (common.existing_run(os.path.join(cfg.out, d)) for d in ("", "sft", "rm", *ALGOS))), None)
    if found and not resume and not cfg.overwrite:
        raise common.ConfigError(f"{cfg.out} already holds a pipeline run ({found} exists): add --resume to continue "
                                 "it, choose another --out, or set overwrite=true to replace it")
    if resume and not found and distributed.is_main():
        warnings.warn(f"--resume: nothing to resume in {cfg.out} yet: starting from the beginning")


def run_pipeline(cfg: PipelineConfig, resume: bool = False) -> dict:
    cfg.validate()  # every stage's fields, before the first stage trains
    _check_out(cfg, resume)
    os.makedirs(cfg.out, exist_ok=True)
    common.save_config(cfg, cfg.out)

    def run(train, stage):  # a stage not started yet (or killed before its first checkpoint) starts afresh
        return (resume and _done(stage.out)) or train(stage, resume and common.existing_run(stage.out) is not None)

    sft = _stage(cfg.sft, cfg, "sft", model=cfg.model, data=cfg.sft_data)
    sft_summary = run(train_sft, sft)
    sft_dir = os.path.join(sft.out, "model")

    name = cfg.algo or "ppo"  # the aligning stage and its folder
    summary = {"seed": cfg.seed, "algo": name, "sft": sft_summary}
    if name == "dpo":
        summary["dpo"] = run(train_dpo, _stage(cfg.dpo, cfg, "dpo", model=sft_dir, data=cfg.dpo_data))
    else:
        rm = _stage(cfg.rm, cfg, "rm", model=sft_dir, data=cfg.rm_data)
        summary["rm"] = run(train_rm, rm)
        stage, train = (cfg.rs, train_rs) if name == "rs" else (cfg.ppo, train_ppo)
        summary[name] = run(train, _stage(stage, cfg, name, model=sft_dir, data=cfg.ppo_data,
                                          reward_models=[os.path.join(rm.out, "model"), *stage.reward_models]))
    if distributed.is_main():  # only rank 0 writes and prints
        atomic_write_text(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=1))
        summary["plot"] = plot(cfg.out, name) if name not in ("dpo", "rs") else None
        print(report(summary))
    return summary


def report(summary: dict) -> str:
    sft = summary["sft"]
    lines = [f"RLHF pipeline (seed {summary['seed']})"]
    if "true_score" in sft:
        lines.append(f"  demonstrator (SFT data) true score   {sft['demonstrator_score']:.3f}")
        lines.append(f"  SFT policy true score (T=1 samples)  {sft['true_score']:.3f}")
    lines.append(f"  SFT final loss                       {sft['final_loss']:.3f}")
    algo = summary["algo"]
    if algo == "dpo":
        dpo = summary["dpo"]
        kl = "n/a" if dpo["final_kl"] is None else f"{dpo['final_kl']:.3f}"
        lines.append(f"  DPO after {dpo['steps']} steps: loss {dpo['final_loss']:.3f}, preference accuracy "
                     f"{dpo['final_accuracy']:.3f}, KL {kl}")
    rm = summary.get("rm")
    if rm:
        lines.append(f"  RM held-out pairwise accuracy        {rm['heldout_accuracy']:.3f} ({rm['heldout_pairs']} pairs)")
        if "heldout_accuracy_vs_rule" in rm:
            lines.append(f"  RM accuracy vs the true rule         {rm['heldout_accuracy_vs_rule']:.3f}")
    if algo == "rs":
        lines.append(f"  rejection sampling: {summary['rs']['steps']} SFT steps, final loss "
                     f"{summary['rs']['final_loss']:.3f}")
    if algo in ("dpo", "rs"):
        if "true_score" in summary[algo] and "true_score" in sft:
            before, after = sft["true_score"], summary[algo]["true_score"]
            lines.append(f"  true score SFT -> {algo.upper():18s} {before:.3f} -> {after:.3f} ({after - before:+.3f})")
        return "\n".join(lines)
    ppo = summary[algo]
    last = ppo.get("final", {})
    lines.append(f"  PPO after {ppo['iterations']} iterations: RM reward {last.get('reward', float('nan')):+.3f}, "
                 f"KL {last.get('kl', float('nan')):.3f}")
    if ppo.get("true_score_after") is not None:
        before, after = ppo["true_score_before"], ppo["true_score_after"]
        lines.append(f"  true score before PPO -> after PPO   {before:.3f} -> {after:.3f} ({after - before:+.3f})")
    if summary.get("plot"):
        lines.append(f"  plot: {summary['plot']}")
    return "\n".join(lines)


def plot(out: str, stage: str = "ppo") -> Optional[str]:
    """A panel for each curve the run has: SFT loss, RM accuracy, PPO reward / KL and, on the synthetic task, the true
    score -> out/pipeline.png (None when no stage has logged anything)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rows(stage):
        path = os.path.join(out, stage, "metrics.jsonl")
        return common.read_metrics(path) if os.path.exists(path) else []

    def line(ax, rows, key, *args, **kwargs):  # markers on short curves: a run of a few steps still shows
        rows = [r for r in rows if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], *args, marker="o" if len(rows) < 30 else None,
                **kwargs)

    sft, rm, ppo = rows("sft"), rows("rm"), rows(stage)
    panels = [name for name, present in (("sft", sft), ("rm", rm), ("ppo", ppo),
                                         ("true_score", any("true_score" in r for r in ppo))) if present]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    ax = dict(zip(panels, axes[0]))
    if sft:
        line(ax["sft"], sft, "loss")
        ax["sft"].set(title="SFT loss (response tokens)", xlabel="step")
    if rm:
        line(ax["rm"], rm, "accuracy", label="train")
        line(ax["rm"], rm, "heldout_accuracy", label="held-out")
        ax["rm"].set(title="RM pairwise accuracy", xlabel="step")
        ax["rm"].legend()
    if ppo:
        line(ax["ppo"], ppo, "reward", label="RM reward (normalised)")
        line(ax["ppo"].twinx(), ppo, "kl", color="tab:red", label="KL")
        ax["ppo"].set(title="PPO reward and KL (red)", xlabel="iteration")
    if "true_score" in ax:
        line(ax["true_score"], ppo, "true_score", label="PPO rollouts")
        summary_path = os.path.join(out, "sft", "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                sft_score = json.load(f).get("true_score")
            if sft_score is not None:
                ax["true_score"].axhline(sft_score, color="gray", ls="--", label="SFT")
        ax["true_score"].set(title="true score (the rule)", xlabel="iteration", ylim=(0, 1))
        ax["true_score"].legend()
    fig.tight_layout()
    path = os.path.join(out, "pipeline.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
