"""Supervised fine-tuning: causal-LM loss on the response tokens only (prompt and padding masked), computed with
the fused linear cross-entropy op (gradients formed in the forward, no [B, T, V] logits).

    rlhf-fast sft [--config sft.yaml] [--model DIR] [--data sft.jsonl] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..data import IGNORE_INDEX, read_jsonl, sft_batch, task
from ..models import sequence_cross_entropy
from ..models.tiny import load_causal_lm, load_tokenizer, save_tiny_default
from . import common, distributed


@dataclass
class SFTConfig(common.RunConfig):
    out: str = "runs/sft"
    num_examples: int = 4000     # synthetic task only
    epochs: int = 2
    batch_size: int = 64         # per rank: under torchrun the global batch is world_size x batch_size
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    max_len: int = 128
    log_every: int = 10
    save_every: int = 50         # checkpoint every this many steps
    eval_prompts: int = 256      # synthetic task: prompts for the true score (0 = skip)
    max_new_tokens: int = 10


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens, float32 scalar."""
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    labels[:, :-1] = batch["labels"][:, 1:]  # position t predicts token t+1
    return sequence_cross_entropy(model, batch["input_ids"], batch["attention_mask"], labels)


def linear_schedule(warmup: int, total: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup)) * max(0.0, 1.0 - step / max(1, total))


def optimizer_and_checkpoint(cfg, model, total: int, resume: bool):
    """AdamW with the linear warm-up/decay schedule over ``total`` steps, and the run's checkpoint; when resuming,
    model, optimizer, scheduler and RNG state are restored -> (optimizer, scheduler, checkpoint, step, metrics)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(cfg.warmup_steps, total))
    checkpoint = distributed.Checkpoint(cfg.out, cfg.checkpoint)
    state = checkpoint.load({"model": model}, {"optimizer": (model, opt)}, seed=cfg.seed) if resume else None
    step = 0
    if state is not None:
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
    metrics = common.Metrics(cfg.out, resume_step=step if state is not None else None)
    return opt, sched, checkpoint, step, metrics


def base_model_dir(cfg: common.RunConfig) -> str:
    """``cfg.model``, or the embedded tiny default built and saved under ``cfg.out/base``."""
    if cfg.model:
        return cfg.model
    path = os.path.join(cfg.out, "base")
    if distributed.is_main() and not os.path.exists(os.path.join(path, "config.json")):
        save_tiny_default(path, seed=cfg.seed)
    distributed.barrier()
    return path


def train_sft(cfg: SFTConfig, resume: bool = False) -> dict:
    """Trains, saves ``cfg.out/model`` and returns a summary (final loss, true score on the synthetic task)."""
    device = common.resolve_device(cfg.device)
    with common.run_context(cfg):
        model_dir = base_model_dir(cfg)
        tokenizer = load_tokenizer(model_dir)
        model = distributed.wrap(load_causal_lm(model_dir, device), fsdp=cfg.fsdp)
        rows = read_jsonl(cfg.data, "sft") if cfg.data else task.sft_examples(cfg.num_examples, cfg.seed)
        global_batch = cfg.batch_size * distributed.world_size()
        steps_per_epoch = distributed.steps_per_epoch(len(rows), global_batch)
        total = cfg.epochs * steps_per_epoch
        opt, sched, checkpoint, step, metrics = optimizer_and_checkpoint(cfg, model, total, resume)

        model.train()
        bar = common.progress(total=total, initial=step, enabled=cfg.progress, desc="sft")
        loss_sum, loss_n = 0.0, 0
        while step < total:
            idx = distributed.shard(common.global_batch_indices(len(rows), step, steps_per_epoch, global_batch,
                                                                cfg.seed))
            batch = {k: v.to(device) for k, v in sft_batch(tokenizer, [rows[j] for j in idx], cfg.max_len).items()}
            with common.autocast(device):
                local_loss = model(sft_loss, batch)
            # the token-mean over the global batch (see distributed.global_loss)
            loss, weight = distributed.global_loss(local_loss, batch["labels"][:, 1:] != IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            loss_sum, loss_n = loss_sum + local_loss.item() * weight, loss_n + 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                loss_sum = distributed.reduce_floats({"loss": loss_sum})["loss"]
                metrics.log(step, loss=loss_sum / loss_n, lr=sched.get_last_lr()[0])
                bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}")
                loss_sum, loss_n = 0.0, 0
            if step % cfg.save_every == 0 or step == total:
                checkpoint.save({"model": model}, {"optimizer": (model, opt)},
                                {"scheduler": sched.state_dict(), "step": step})
        bar.close()
        model.save_pretrained(os.path.join(cfg.out, "model"), tokenizer)
        summary = {"final_loss": metrics.rows[-1]["loss"] if metrics.rows else float("nan"), "steps": total}
        if not cfg.data and cfg.eval_prompts:
            summary["true_score"] = model.local(
                common.sample_true_score, tokenizer, task.prompts(cfg.eval_prompts, seed=10_000 + cfg.seed),
                seed=cfg.seed, max_new_tokens=cfg.max_new_tokens)
            summary["demonstrator_score"] = demonstrator_score(cfg.eval_prompts, cfg.seed)
        metrics.close()
        if distributed.is_main():
            common.atomic_write_text(os.path.join(cfg.out, "summary.json"), __import__("json").dumps(summary))
        return summary


def demonstrator_score(n: int, seed: int) -> float:
    rows = task.sft_examples(n, seed=20_000 + seed)
    return sum(task.true_score(r["prompt"], r["completion"]) for r in rows) / n
