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
from dataclasses import dataclass, field
from typing import Optional

from . import common, distributed
from .checkpoint import atomic_write_text
from .dpo import DPOConfig, train_dpo
from .ppo import PPOConfig, train_ppo
from .rm import RMConfig, train_rm
from .sft import SFTConfig, train_sft


@dataclass
class PipelineConfig(common.RunConfig):
    """The run-wide fields (``RunConfig``'s: seed, device, backend, ...) apply to every stage; ``model`` is the base
    model, ``out`` the pipeline's folder (stages in out/sft, out/rm, out/ppo); data per stage."""

    out: str = "runs/pipeline"
    algo: str = ""                   # dpo: SFT -> DPO; ppo | grpo | dr_grpo | rloo: SFT -> RM -> PPO with that
                                     # ppo.algo; "" = SFT -> RM -> PPO with ppo.algo as given
    sft_data: str = ""               # JSONL files; "" = the embedded synthetic task
    rm_data: str = ""
    ppo_data: str = ""
    dpo_data: str = ""
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


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


def run_pipeline(cfg: PipelineConfig, resume: bool = False) -> dict:
    if cfg.data:
        raise ValueError("pipeline: give the data files per stage as sft_data=, rm_data= and ppo_data=, not data=")
    os.makedirs(cfg.out, exist_ok=True)
    common.save_config(cfg, cfg.out)
    sft = _stage(cfg.sft, cfg, "sft", model=cfg.model, data=cfg.sft_data)
    sft_summary = (resume and _done(sft.out)) or train_sft(sft, resume)
    sft_dir = os.path.join(sft.out, "model")

    if cfg.algo == "dpo":
        dpo = _stage(cfg.dpo, cfg, "dpo", model=sft_dir, data=cfg.dpo_data)
        dpo_summary = (resume and _done(dpo.out)) or train_dpo(dpo, resume)
        summary = {"seed": cfg.seed, "algo": "dpo", "sft": sft_summary, "dpo": dpo_summary}
        if distributed.is_main():
            atomic_write_text(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=1))
            print(report(summary))
        return summary
    if cfg.algo:
        cfg.ppo.algo = cfg.algo
    rm = _stage(cfg.rm, cfg, "rm", model=sft_dir, data=cfg.rm_data)
    rm_summary = (resume and _done(rm.out)) or train_rm(rm, resume)

    ppo = _stage(cfg.ppo, cfg, "ppo", model=sft_dir, reward_model=os.path.join(rm.out, "model"), data=cfg.ppo_data)
    ppo_summary = (resume and _done(ppo.out)) or train_ppo(ppo, resume)

    summary = {"seed": cfg.seed, "sft": sft_summary, "rm": rm_summary, "ppo": ppo_summary}
    if distributed.is_main():  # only rank 0 writes and prints
        atomic_write_text(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=1))
        summary["plot"] = plot(cfg.out)
        print(report(summary))
    return summary


def report(summary: dict) -> str:
    sft = summary["sft"]
    lines = [f"RLHF pipeline (seed {summary['seed']})"]
    if "true_score" in sft:
        lines.append(f"  demonstrator (SFT data) true score   {sft['demonstrator_score']:.3f}")
        lines.append(f"  SFT policy true score (T=1 samples)  {sft['true_score']:.3f}")
    lines.append(f"  SFT final loss                       {sft['final_loss']:.3f}")
    if summary.get("algo") == "dpo":
        dpo = summary["dpo"]
        kl = "n/a" if dpo["final_kl"] is None else f"{dpo['final_kl']:.3f}"
        lines.append(f"  DPO after {dpo['steps']} steps: loss {dpo['final_loss']:.3f}, preference accuracy "
                     f"{dpo['final_accuracy']:.3f}, KL {kl}")
        if "true_score" in dpo and "true_score" in sft:
            before, after = sft["true_score"], dpo["true_score"]
            lines.append(f"  true score SFT -> DPO                {before:.3f} -> {after:.3f} ({after - before:+.3f})")
        return "\n".join(lines)
    rm, ppo = summary["rm"], summary["ppo"]
    lines.append(f"  RM held-out pairwise accuracy        {rm['heldout_accuracy']:.3f} ({rm['heldout_pairs']} pairs)")
    if "heldout_accuracy_vs_rule" in rm:
        lines.append(f"  RM accuracy vs the true rule         {rm['heldout_accuracy_vs_rule']:.3f}")
    last = ppo.get("final", {})
    lines.append(f"  PPO after {ppo['iterations']} iterations: RM reward {last.get('reward', float('nan')):+.3f}, "
                 f"KL {last.get('kl', float('nan')):.3f}")
    if ppo.get("true_score_after") is not None:
        before, after = ppo["true_score_before"], ppo["true_score_after"]
        lines.append(f"  true score before PPO -> after PPO   {before:.3f} -> {after:.3f} ({after - before:+.3f})")
    if summary.get("plot"):
        lines.append(f"  plot: {summary['plot']}")
    return "\n".join(lines)


def plot(out: str) -> Optional[str]:
    """sft loss, RM held-out accuracy, PPO reward / KL / true score curves -> out/pipeline.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rows(stage):
        path = os.path.join(out, stage, "metrics.jsonl")
        return common.read_metrics(path) if os.path.exists(path) else []

    sft, rm, ppo = rows("sft"), rows("rm"), rows("ppo")
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    axes[0].set(title="SFT loss (response tokens)", xlabel="step")
    held = [r for r in rm if "heldout_accuracy" in r]
    axes[1].plot([r["step"] for r in rm], [r["accuracy"] for r in rm], label="train")
    axes[1].plot([r["step"] for r in held], [r["heldout_accuracy"] for r in held], "o-", label="held-out")
    axes[1].set(title="RM pairwise accuracy", xlabel="step")
    axes[1].legend()
    it = [r["step"] for r in ppo]
    axes[2].plot(it, [r["reward"] for r in ppo], label="RM reward (normalised)")
    ax_kl = axes[2].twinx()
    ax_kl.plot(it, [r["kl"] for r in ppo], color="tab:red", label="KL")
    axes[2].set(title="PPO reward and KL (red)", xlabel="iteration")
    if ppo and "true_score" in ppo[0]:
        axes[3].plot(it, [r["true_score"] for r in ppo], label="PPO rollouts")
        summary_path = os.path.join(out, "sft", "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                axes[3].axhline(json.load(f)["true_score"], color="gray", ls="--", label="SFT")
        axes[3].set(title="true score (the rule)", xlabel="iteration", ylim=(0, 1))
        axes[3].legend()
    fig.tight_layout()
    path = os.path.join(out, "pipeline.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
