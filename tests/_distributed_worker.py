"""What tests/test_distributed.py runs on every rank of ``torchrun --nproc-per-node 2`` (CPU, gloo), and the configs it
shares with the single-process references.

    python -m torch.distributed.run --nproc-per-node 2 tests/_distributed_worker.py OUT BASE_MODEL_DIR RM_DIR

Scenarios run one after the other in the same process group, each into OUT/<name>: the global reductions, SFT /
RM / DPO / PPO / GRPO with DDP and with FSDP2, an SFT checkpoint in DCP format, an uninterrupted FSDP2 PPO run, and last
the same run killed with SIGKILL in its third iteration (the test resumes it with ``rlhf-fast ppo --resume``).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from rlhf_fast.train import common, distributed
from rlhf_fast.train.dpo import DPOConfig, train_dpo
from rlhf_fast.train.ppo import PPOConfig, PPOTrainer
from rlhf_fast.train.rm import RMConfig, train_rm
from rlhf_fast.train.sft import SFTConfig, train_sft

WORLD = 2
# per-rank batch sizes for 2 ranks; the 1-rank references use twice these (the same global batch)
SFT = ["num_examples=48", "batch_size=8", "epochs=1", "lr=2e-3", "warmup_steps=1", "log_every=1", "save_every=100",
       "eval_prompts=0", "progress=false", "threads=1"]
RM = ["num_pairs=40", "batch_size=8", "epochs=1", "lr=1e-3", "warmup_steps=1", "log_every=1", "eval_every=100",
      "save_every=100", "progress=false", "threads=1"]
# a live reference: its log-probs are then the policy's at step 1 bit for bit, so the preference accuracy there is 0
# on any world size (precomputed ones differ in the last bits, and [margin > 0] of a zero margin is then noise)
DPO = ["num_pairs=40", "batch_size=8", "epochs=1", "lr=1e-3", "warmup_steps=1", "log_every=1", "save_every=100",
       "rpo_alpha=0.5", "ref_logps=live", "eval_prompts=0", "progress=false", "threads=1"]
PPO = ["iterations=2", "batch_size=4", "minibatch_size=4", "epochs=2", "max_new_tokens=6", "eval_prompts=0",
       "lr=1e-3", "critic_lr=1e-3", "adaptive_kl=true", "kl_target=0.01", "progress=false", "threads=1"]
GRPO = ["algo=grpo", "group_size=2", "iterations=2", "batch_size=2", "minibatch_size=4", "epochs=2", "kl_coef=0.05",
        "kl_kind=k3", "loss_agg=seq-mean-token-mean", "max_new_tokens=6", "eval_prompts=0", "lr=1e-3",
        "progress=false", "threads=1"]
# the kill-and-resume run (FSDP2, gathered checkpoints): its own rollouts, several shuffled minibatches, a checkpoint
# every iteration
RESUME = ["iterations=4", "batch_size=4", "minibatch_size=2", "max_new_tokens=6", "save_every=1", "eval_prompts=0",
          "progress=false", "threads=1", "fsdp=true"]
KILL_AT = 2  # the killed run dies at the start of learning in iteration KILL_AT + 1, after checkpoint KILL_AT

# the global batch of the reduction checks: rank 0 holds rows [0, 3) padded to its own length, rank 1 rows [3, 8)
SPLIT = (3, 8)


def scaled(overrides: list[str], world: int) -> list[str]:
    """The overrides of the same global batch on ``world`` ranks (batch sizes x 2 / world)."""
    out = []
    for item in overrides:
        key, value = item.split("=", 1)
        if key in ("batch_size", "minibatch_size"):
            value = str(int(value) * WORLD // world)
        out.append(f"{key}={value}")
    return out


def config(cls, overrides: list[str], world: int, **fields):
    return common.load_config(cls, None, scaled(overrides, world), **fields)


class SharedRolloutPPO(PPOTrainer):
    """Every rank samples the whole global batch from one seed per iteration and keeps its own block, so the rollouts
    do not depend on the world size and an N-rank run can be compared with one rank (the real trainer samples each
    rank's prompts with its own random stream)."""

    def rollout(self, rows):
        own, self.generator = self.generator, torch.Generator(self.device).manual_seed(1000 + self.step)
        try:
            batch, rows, texts = super().rollout(self.global_prompts(self.step))
        finally:
            self.generator = own
        own_seqs = distributed.shard(range(batch.num_seqs))
        return batch.select(own_seqs), [rows[i] for i in own_seqs], texts and [texts[i] for i in own_seqs]


class KilledPPO(PPOTrainer):
    def learn(self, batch):
        if self.step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().learn(batch)


def run_ppo(cls, cfg: PPOConfig) -> dict:
    os.makedirs(cfg.out, exist_ok=True)
    with common.run_context(cfg):
        return cls(cfg).train()


# ----------------------------------------------------------------------------------------------------------------
# The global reductions on a fixed batch
# ----------------------------------------------------------------------------------------------------------------


def reduction_batch():
    """A fixed global batch [8, 7]: x, mask (row 5 empty), values, returns, old_logp, advantages."""
    g = torch.Generator().manual_seed(0)
    B, T = 8, 7
    lengths = torch.tensor([7, 2, 5, 3, 6, 0, 4, 1])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    data = {k: torch.randn(B, T, generator=g) for k in ("x", "values", "returns", "old_logp", "advantages")}
    return data, mask, lengths


class Linear(torch.nn.Module):
    """logp[b, t] = x[b, t] * w[t] - 1: a differentiable stand-in for a policy's log-probs."""

    def __init__(self, T: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, T))

    def forward(self, x):
        return x * self.w[: x.shape[1]] - 1.0


def reductions(out: str) -> None:
    from rlhf_fast import ppo_policy_loss
    from rlhf_fast.ops import AGG_MODES

    data, mask, lengths = reduction_batch()
    lo, hi = (0, SPLIT[0]) if distributed.rank() == 0 else SPLIT
    T = max(int(lengths[lo:hi].max()), 1)  # this rank pads to its own longest row
    mine = {k: v[lo:hi, :T] for k, v in data.items()}
    m = mask[lo:hi, :T]
    res = {"whiten": distributed.all_gather_object(distributed.masked_whiten(mine["x"], m).tolist()),
           "mean": float(distributed.masked_mean(mine["x"], m)),
           "explained_variance": distributed.explained_variance(mine["values"], mine["returns"], m)}
    for agg in AGG_MODES:
        model = distributed.Model(Linear(data["x"].shape[1]), "ddp")
        logp = model(lambda mod, x: mod(x), mine["x"])
        w = distributed.global_weights(m, agg, max_len=data["x"].shape[1])
        loss, _ = ppo_policy_loss(logp, mine["old_logp"], mine["advantages"], w)
        loss.backward()
        res[agg] = {"loss": distributed.reduce_floats({"v": loss.item() / distributed.world_size()})["v"],
                    "grad": model.module.w.grad.tolist()}
    if distributed.is_main():
        with open(os.path.join(out, "reductions.json"), "w") as f:
            json.dump(res, f)


def main(out: str, base: str, rm: str) -> None:
    torch.set_num_threads(1)
    distributed.setup("cpu")
    assert distributed.world_size() == WORLD
    os.makedirs(out, exist_ok=True)
    reductions(out)
    for mode, fsdp in (("ddp", False), ("fsdp", True)):
        train_sft(config(SFTConfig, SFT, WORLD, model=base, out=f"{out}/sft_{mode}", fsdp=fsdp))
        train_rm(config(RMConfig, RM, WORLD, model=base, out=f"{out}/rm_{mode}", fsdp=fsdp))
        train_dpo(config(DPOConfig, DPO, WORLD, model=base, out=f"{out}/dpo_{mode}", fsdp=fsdp))
        run_ppo(SharedRolloutPPO, config(PPOConfig, PPO, WORLD, model=base, reward_models=[rm],
                                         out=f"{out}/ppo_{mode}", fsdp=fsdp, shard_frozen=fsdp))
        run_ppo(SharedRolloutPPO, config(PPOConfig, GRPO, WORLD, model=base, reward_models=[rm],
                                         out=f"{out}/grpo_{mode}", fsdp=fsdp))
    train_sft(config(SFTConfig, SFT, WORLD, model=base, out=f"{out}/sft_dcp", fsdp=True, checkpoint="dcp"))
    resume = common.load_config(PPOConfig, None, RESUME, model=base, reward_models=[rm], out=f"{out}/ppo_full")
    run_ppo(PPOTrainer, resume)
    if distributed.is_main():
        open(os.path.join(out, "done"), "w").close()
    distributed.barrier()
    resume.out = f"{out}/ppo_killed"
    run_ppo(KilledPPO, resume)


if __name__ == "__main__":
    main(*sys.argv[1:4])
