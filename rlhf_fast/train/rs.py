"""Rejection-sampling fine-tuning (Llama 2): for each of ``rounds`` rounds, sample ``num_samples`` responses per
prompt from the current policy, score them with the reward models and/or reward functions (``rlhf_fast.train.rewards``),
keep the best response of each prompt, and fine-tune the policy on the kept ones (the SFT step: fused causal-LM loss
on packed batches). Usable alone or as a stage before PPO, as Llama 2 did.

Each round's kept samples are written to ``out/rounds/round_<r>.jsonl`` (SFT format, with their ``reward``) before
training on them, so ``--resume`` continues a round on the same data.

    rlhf-fast rs --model SFT_DIR reward_models=RM_DIR [reward_fns=module:function] [--data prompts.jsonl] [--out DIR]
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import generate
from ..batch import TokenBatch
from ..data import prompt_batch, read_jsonl, task, write_jsonl
from ..models import disable_dropout, load_causal_lm, load_tokenizer
from . import common, distributed
from .rewards import RewardConfig, Rewards
from .sft import SFTTrainer


@dataclass
class RSConfig(RewardConfig, common.RunConfig):
    out: str = "runs/rs"
    rounds: int = 3
    prompts_per_round: int = 512  # over all ranks
    num_samples: int = 8          # K responses per prompt; the best one is kept
    sample_batch_size: int = 64   # prompts per generate call and rank
    max_prompt_len: int = 256
    max_new_tokens: int = 10
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    epochs: int = 1               # SFT passes over each round's kept samples
    batch_size: int = 64          # per rank
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    grad_clip: float = 1.0
    max_len: int = 128
    dropout: bool = False
    log_every: int = 5
    save_every: int = 20
    eval_prompts: int = 256       # synthetic task: prompts for the true score at the end (0 = skip)


def best_of(scores: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [P * K] of K consecutive samples per prompt -> (index of each prompt's best sample [P], its score [P]);
    ties go to the first sample."""
    best, arg = scores.view(-1, num_samples).max(1)
    return arg + torch.arange(best.numel(), device=scores.device) * num_samples, best


def kept_row(row: dict, completion: str, reward: float) -> dict:
    """The SFT row of a kept sample: prompt/completion, or the conversation with the response as the last turn."""
    if "prompt" in row:
        return {"prompt": row["prompt"], "completion": completion, "reward": reward}
    return {"messages": [*row["messages"], {"role": "assistant", "content": completion}], "reward": reward}


class RSTrainer(SFTTrainer):
    name = "rs"

    def setup(self) -> None:
        cfg = self.cfg
        if not cfg.model:
            raise ValueError("rs needs model= (the SFT policy directory)")
        self.tokenizer = load_tokenizer(cfg.model)
        module = load_causal_lm(cfg.model, self.device)
        self.model = distributed.wrap(module if cfg.dropout else disable_dropout(module), fsdp=cfg.fsdp)
        self.rewards = Rewards(cfg, self.device, lambda m: distributed.wrap(m, trainable=False))
        self.prompts = read_jsonl(cfg.data, "ppo") if cfg.data else task.prompts(20_000, cfg.seed)
        self.round, self.round_stats = -1, {}
        # the SFT schedule over all rounds: one kept sample per prompt of a round
        self.start([None] * min(cfg.prompts_per_round, len(self.prompts)))

    def total_steps(self) -> int:
        return self.cfg.rounds * self.steps_per_round

    @property
    def steps_per_round(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def step_rows(self) -> list:
        r, i = divmod(self.step, self.steps_per_round)
        if r != self.round:
            self.rows, self.round = self.kept_samples(r), r
        idx = common.global_batch_indices(len(self.rows), i, self.steps_per_epoch, self.global_batch,
                                          self.cfg.seed * 100 + r)
        return [self.rows[j] for j in distributed.shard(idx)]

    def train_step(self) -> dict[str, float]:
        stats = super().train_step()
        stats.update(self.round_stats)  # once per round: the sampling round's rewards
        self.round_stats = {}
        return stats

    def kept_samples(self, r: int) -> list[dict]:
        """Round ``r``'s best samples (over all ranks): read back if the round was sampled before a resume."""
        path = os.path.join(self.cfg.out, "rounds", f"round_{r}.jsonl")
        if not os.path.exists(path):
            kept, stats = self.sample_round(r)
            kept = [row for part in distributed.all_gather_object(kept) for row in part]
            if distributed.is_main():
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_jsonl(path + ".tmp", kept)
                os.replace(path + ".tmp", path)
            distributed.barrier()
            self.round_stats = stats
        return read_jsonl(path, "sft")

    @torch.no_grad()
    def sample_round(self, r: int) -> tuple[list[dict], dict]:
        cfg, tok = self.cfg, self.tokenizer
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(cfg.seed * 1000 + r))
        rows = distributed.shard([self.prompts[j] for j in order[:cfg.prompts_per_round].tolist()])
        gen = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + r * 10 + distributed.rank())
        kept, sums = [], {"reward_mean": 0.0, "reward_best": 0.0}
        self.model.eval()
        for start in range(0, len(rows), cfg.sample_batch_size):
            chunk = rows[start:start + cfg.sample_batch_size]
            batch = prompt_batch(tok, chunk, cfg.max_prompt_len)
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            with common.autocast(self.device):
                out = self.model.local(generate, ids, mask, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=gen,
                                       num_samples=cfg.num_samples)
            prompt_mask = mask.repeat_interleave(cfg.num_samples, 0)
            texts = common.decode_responses(tok, out.sequences, out.response_mask, ids.shape[1])
            seq_rows = [row for row in chunk for _ in range(cfg.num_samples)]
            samples = TokenBatch.from_generation(out.sequences, prompt_mask, out.response_mask)
            with common.autocast(self.device):
                scores, _ = self.rewards(samples, seq_rows, texts)
            index, best = best_of(scores.float(), cfg.num_samples)
            kept += [kept_row(seq_rows[i], texts[i], b) for i, b in zip(index.tolist(), best.tolist())]
            sums["reward_mean"] += scores.sum().item() / cfg.num_samples
            sums["reward_best"] += best.sum().item()
            if not cfg.data:
                sums["true_score_best"] = sums.get("true_score_best", 0.0) + sum(
                    task.true_score(seq_rows[i]["prompt"], texts[i]) for i in index.tolist())
        self.model.train()
        return kept, distributed.global_means(sums, len(rows))


def train_rs(cfg: RSConfig, resume: bool = False) -> dict:
    """Trains, saves ``cfg.out/model`` and returns a summary."""
    with common.run_context(cfg):
        return RSTrainer(cfg, resume).train()
