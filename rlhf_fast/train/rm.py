"""Reward model: a causal LM body with a scalar head read at each sequence's last non-pad token, trained on
(prompt, chosen, rejected) with the Bradley–Terry loss -log sigmoid(r_chosen - r_rejected); reports pairwise accuracy
mean[r_chosen > r_rejected] on held-out pairs.

    rlhf-fast rm [--config rm.yaml] [--model DIR] [--data pairs.jsonl] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from ..data import pair_batch, read_jsonl, task
from ..models.tiny import load_tokenizer
from ..models.value_head import ScalarHeadModel
from . import common
from .sft import base_model_dir, linear_schedule


@dataclass
class RMConfig(common.RunConfig):
    out: str = "runs/rm"
    from_scratch: bool = False   # True: same architecture, fresh weights (de novo) instead of the --model weights
    num_pairs: int = 4000        # synthetic task only
    heldout_fraction: float = 0.1
    epochs: int = 2
    batch_size: int = 32         # pairs per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    max_len: int = 128
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 50


def bradley_terry(model: ScalarHeadModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss = mean -log sigmoid(r_c - r_r), accuracy = mean[r_c > r_r]); batch holds chosen then rejected."""
    r = model.score(batch["input_ids"], batch["attention_mask"])
    r_chosen, r_rejected = r.chunk(2)
    return -F.logsigmoid(r_chosen - r_rejected).mean(), (r_chosen > r_rejected).float().mean()


@torch.no_grad()
def evaluate(model, tokenizer, rows, cfg, device) -> dict:
    """Held-out pairwise accuracy and loss, and the mean/std of all held-out scores (saved for PPO's normalisation)."""
    model.eval()
    losses, accs, scores = [], [], []
    for i in range(0, len(rows), 128):
        chunk = rows[i:i + 128]
        batch = {k: v.to(device) for k, v in pair_batch(tokenizer, chunk, cfg.max_len).items()}
        with common.autocast(device):
            r = model.score(batch["input_ids"], batch["attention_mask"])
        rc, rr = r.chunk(2)
        losses.append(-F.logsigmoid(rc - rr).sum().item())
        accs.append((rc > rr).float().sum().item())
        scores.append(r)
    model.train()
    s = torch.cat(scores)
    return {"heldout_loss": sum(losses) / len(rows), "heldout_accuracy": sum(accs) / len(rows),
            "score_mean": s.mean().item(), "score_std": s.std().item()}


def train_rm(cfg: RMConfig, resume: bool = False) -> dict:
    os.makedirs(cfg.out, exist_ok=True)
    common.save_config(cfg, cfg.out)
    device = common.resolve_device(cfg.device)
    with common.run_context(cfg):
        model_dir = base_model_dir(cfg)
        tokenizer = load_tokenizer(model_dir)
        if cfg.from_scratch:
            body = AutoModel.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
            model = ScalarHeadModel(body).to(device)
        else:
            model = ScalarHeadModel.from_pretrained(model_dir, device)
        rows = read_jsonl(cfg.data, "rm") if cfg.data else task.preference_pairs(cfg.num_pairs, cfg.seed)
        n_held = max(1, int(len(rows) * cfg.heldout_fraction))
        train_rows, held = rows[:-n_held], rows[-n_held:]
        steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(cfg.warmup_steps, total))

        ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        ckpt = common.load_checkpoint(ckpt_path) if resume else None
        step = 0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            common.set_rng_state(ckpt["rng"])
            step = ckpt["step"]
        metrics = common.Metrics(cfg.out, resume_step=step if ckpt is not None else None)

        model.train()
        bar = common.progress(total=total, initial=step, enabled=cfg.progress, desc="rm")
        acc_sum = loss_sum = 0.0
        n = 0
        while step < total:
            epoch, i = divmod(step, steps_per_epoch)
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()
            batch = {k: v.to(device) for k, v in pair_batch(tokenizer, [train_rows[j] for j in idx],
                                                              cfg.max_len).items()}
            with common.autocast(device):
                loss, acc = bradley_terry(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            loss_sum, acc_sum, n = loss_sum + loss.item(), acc_sum + acc.item(), n + 1
            bar.update(1)
            if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == total:
                row = {"loss": loss_sum / n, "accuracy": acc_sum / n}
                if step % cfg.eval_every == 0 or step == total:
                    ev = evaluate(model, tokenizer, held, cfg, device)
                    row.update(heldout_loss=ev["heldout_loss"], heldout_accuracy=ev["heldout_accuracy"])
                metrics.log(step, **row)
                bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()})
                loss_sum = acc_sum = 0.0
                n = 0
            if step % cfg.save_every == 0 or step == total:
                common.save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                   "scheduler": sched.state_dict(), "rng": common.rng_state(),
                                                   "step": step})
        bar.close()
        ev = evaluate(model, tokenizer, held, cfg, device)
        out_dir = os.path.join(cfg.out, "model")
        common.save_model_dir(model, tokenizer, out_dir)
        with open(os.path.join(out_dir, "scalar_head.json")) as f:
            info = json.load(f)
        info.update(score_mean=ev["score_mean"], score_std=ev["score_std"])
        common.atomic_write_text(os.path.join(out_dir, "scalar_head.json"), json.dumps(info))
        metrics.close()
        summary = {"heldout_accuracy": ev["heldout_accuracy"], "heldout_loss": ev["heldout_loss"],
                   "heldout_pairs": len(held), "steps": total}
        if not cfg.data:
            summary["heldout_accuracy_vs_rule"] = rule_accuracy(model, tokenizer, held, cfg, device)
        common.atomic_write_text(os.path.join(cfg.out, "summary.json"), json.dumps(summary))
        return summary


@torch.no_grad()
def rule_accuracy(model, tokenizer, rows, cfg, device) -> float:
    """Synthetic task: how often the RM orders a held-out pair as the true rule does (pairs the rule ties skipped)."""
    model.eval()
    hits = total = 0
    for i in range(0, len(rows), 128):
        chunk = rows[i:i + 128]
        batch = {k: v.to(device) for k, v in pair_batch(tokenizer, chunk, cfg.max_len).items()}
        rc, rr = model.score(batch["input_ids"], batch["attention_mask"]).chunk(2)
        for row, a, b in zip(chunk, rc.tolist(), rr.tolist()):
            sa, sb = task.true_score(row["prompt"], row["chosen"]), task.true_score(row["prompt"], row["rejected"])
            if sa != sb:
                hits += (a > b) == (sa > sb)
                total += 1
    model.train()
    return hits / max(1, total)
