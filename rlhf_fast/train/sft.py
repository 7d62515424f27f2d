"""Supervised fine-tuning: causal-LM loss on the response tokens of packed batches (prompt tokens are not targets),
computed with the fused linear cross-entropy op (gradients formed in the forward, no logits kept).

    rlhf-fast sft [--config sft.yaml] [--model DIR] [--data sft.jsonl] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..data import read_jsonl, sft_batch, task, warn_truncation
from ..models import disable_dropout, load_causal_lm, load_tokenizer, sequence_cross_entropy
from . import common, distributed


@dataclass
class SFTConfig(common.RunConfig):
    out: str = "runs/sft"
    num_examples: int = 4000     # synthetic task only
    epochs: int = 2              # passes over the data
    batch_size: int = 64         # per rank: under torchrun the global batch is world_size x batch_size
    lr: float = 2e-3             # AdamW learning rate after the warm-up (then decays linearly to 0)
    weight_decay: float = 0.0    # AdamW weight decay
    warmup_steps: int = 20       # optimizer steps of linear learning-rate warm-up
    grad_clip: float = 1.0       # gradient-norm clipping
    max_len: int = 128           # tokens per sequence; a longer one loses prompt tokens from the left
    dropout: bool = False        # keep the model's dropout while training (off by default, as TRL does)
    log_every: int = 10          # metrics.jsonl row (means over the window) every this many steps
    save_every: int = 50         # checkpoint every this many steps
    eval_prompts: int = 256      # synthetic task: prompts for the true score (0 = skip)
    max_new_tokens: int = 10     # synthetic task: response length sampled for the true score


def sft_loss(model, batch, weights=None):
    """sum_t w_t * -log p(label_t) over the target tokens of a packed batch (None: their mean): float32 scalar."""
    return sequence_cross_entropy(model, batch, weights=weights)


class SFTTrainer(common.EpochTrainer):
    name = "sft"

    def setup(self) -> None:
        cfg = self.cfg
        model_dir = common.base_model_dir(cfg)
        self.tokenizer = load_tokenizer(model_dir)
        module = load_causal_lm(model_dir, self.device)
        self.model = distributed.wrap(module if cfg.dropout else disable_dropout(module), fsdp=cfg.fsdp)
        rows = read_jsonl(cfg.data, "sft") if cfg.data else task.sft_examples(cfg.num_examples, cfg.seed)
        if distributed.is_main():
            warn_truncation(self.tokenizer, rows, cfg.max_len)
        self.start(rows)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        batch = sft_batch(self.tokenizer, self.step_rows(), cfg.max_len).to(self.device)
        weights = distributed.global_weights(batch.mask, "token-mean")  # the token-mean over the global batch
        with common.autocast(self.device):
            loss = self.model(sft_loss, batch, weights)
        common.optimizer_step(loss, self.model, self.opt, cfg.grad_clip, self.sched)
        return distributed.reduce_floats({"loss": loss.item() / distributed.world_size()})

    def log_extra(self, row: dict) -> dict:
        return {"lr": self.sched.get_last_lr()[0]}

    def finish(self) -> dict:
        cfg = self.cfg
        self.model.save_pretrained(os.path.join(cfg.out, "model"), self.tokenizer)
        summary = {"final_loss": self.metrics.rows[-1]["loss"] if self.metrics.rows else float("nan"),
                   "steps": self.total_steps()}
        if not cfg.data and cfg.eval_prompts:
            summary["true_score"] = self.model.local(
                common.sample_true_score, self.tokenizer, task.prompts(cfg.eval_prompts, seed=10_000 + cfg.seed),
                seed=cfg.seed, max_new_tokens=cfg.max_new_tokens)
            summary["demonstrator_score"] = demonstrator_score(cfg.eval_prompts, cfg.seed)
        return summary


def train_sft(cfg: SFTConfig, resume: bool = False) -> dict:
    """Trains, saves ``cfg.out/model`` and returns a summary (final loss, true score on the synthetic task)."""
    with common.run_context(cfg):
        return SFTTrainer(cfg, resume).train()


def demonstrator_score(n: int, seed: int) -> float:
    rows = task.sft_examples(n, seed=20_000 + seed)
    return sum(task.true_score(r["prompt"], r["completion"]) for r in rows) / n
