"""Reward model: a causal LM body with a scalar head read at each sequence's last non-pad token, trained on
(prompt, chosen, rejected) with the Bradley–Terry loss -log sigmoid(r_chosen - r_rejected); reports pairwise accuracy
mean[r_chosen > r_rejected] on held-out pairs.

    rlhf-fast rm [--config rm.yaml] [--model DIR] [--data pairs.jsonl] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from ..data import pair_batch, read_jsonl, task
from ..models.tiny import load_tokenizer
from ..models.value_head import ScalarHeadModel
from . import common, distributed
from .sft import base_model_dir, optimizer_and_checkpoint


@dataclass
class RMConfig(common.RunConfig):
    out: str = "runs/rm"
    from_scratch: bool = False   # True: same architecture, fresh weights (de novo) instead of the --model weights
    num_pairs: int = 4000        # synthetic task only
    heldout_fraction: float = 0.1
    epochs: int = 2
    batch_size: int = 32         # pairs per step and rank (under torchrun the global batch is world_size x this)
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
    """Held-out pairwise accuracy and loss, and the mean/std of all held-out scores (saved for PPO's normalisation).

    Under torchrun each rank scores its block of ``rows``; the results are over all of them."""
    n_rows = len(rows)
    rows = distributed.shard(rows)
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
    s = torch.cat(scores).double() if scores else torch.zeros(0, dtype=torch.float64)
    tot = distributed.reduce_floats({"loss": sum(losses), "acc": sum(accs), "s": s.sum().item(), "n": s.numel()})
    mean = tot["s"] / tot["n"]
    sq = distributed.reduce_floats({"sq": ((s - mean) ** 2).sum().item()})["sq"]
    return {"heldout_loss": tot["loss"] / n_rows, "heldout_accuracy": tot["acc"] / n_rows,
            "score_mean": mean, "score_std": (sq / max(tot["n"] - 1, 1)) ** 0.5}


def train_rm(cfg: RMConfig, resume: bool = False) -> dict:
    device = common.resolve_device(cfg.device)
    with common.run_context(cfg):
        model_dir = base_model_dir(cfg)
        tokenizer = load_tokenizer(model_dir)
        if cfg.from_scratch:
            body = AutoModel.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
            model = ScalarHeadModel(body).to(device)
        else:
            model = ScalarHeadModel.from_pretrained(model_dir, device)
        model = distributed.wrap(model, fsdp=cfg.fsdp)
        rows = read_jsonl(cfg.data, "rm") if cfg.data else task.preference_pairs(cfg.num_pairs, cfg.seed)
        n_held = max(1, int(len(rows) * cfg.heldout_fraction))
        train_rows, held = rows[:-n_held], rows[-n_held:]
        global_batch = cfg.batch_size * distributed.world_size()
        steps_per_epoch = distributed.steps_per_epoch(len(train_rows), global_batch)
        total = cfg.epochs * steps_per_epoch
        opt, sched, checkpoint, step, metrics = optimizer_and_checkpoint(cfg, model, total, resume)

        model.train()
        bar = common.progress(total=total, initial=step, enabled=cfg.progress, desc="rm")
        acc_sum = loss_sum = 0.0
        n = 0
        while step < total:
            idx = distributed.shard(common.global_batch_indices(len(train_rows), step, steps_per_epoch, global_batch,
                                                                cfg.seed))
            batch = {k: v.to(device) for k, v in pair_batch(tokenizer, [train_rows[j] for j in idx],
                                                              cfg.max_len).items()}
            with common.autocast(device):
                local_loss, acc = model(bradley_terry, batch)
            # the mean over the global batch's pairs (see distributed.global_loss)
            loss, weight = distributed.global_loss(local_loss, torch.ones(len(idx), 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            loss_sum, acc_sum, n = loss_sum + local_loss.item() * weight, acc_sum + acc.item() * weight, n + 1
            bar.update(1)
            if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == total:
                tot = distributed.reduce_floats({"loss": loss_sum, "accuracy": acc_sum})
                row = {"loss": tot["loss"] / n, "accuracy": tot["accuracy"] / n}
                if step % cfg.eval_every == 0 or step == total:
                    ev = model.local(evaluate, tokenizer, held, cfg, device)
                    row.update(heldout_loss=ev["heldout_loss"], heldout_accuracy=ev["heldout_accuracy"])
                metrics.log(step, **row)
                bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()})
                loss_sum = acc_sum = 0.0
                n = 0
            if step % cfg.save_every == 0 or step == total:
                checkpoint.save({"model": model}, {"optimizer": (model, opt)},
                                {"scheduler": sched.state_dict(), "step": step})
        bar.close()
        ev = model.local(evaluate, tokenizer, held, cfg, device)
        out_dir = os.path.join(cfg.out, "model")
        model.save_pretrained(out_dir, tokenizer)
        if distributed.is_main():
            with open(os.path.join(out_dir, "scalar_head.json")) as f:
                info = json.load(f)
            info.update(score_mean=ev["score_mean"], score_std=ev["score_std"])
            common.atomic_write_text(os.path.join(out_dir, "scalar_head.json"), json.dumps(info))
        distributed.barrier()
        metrics.close()
        summary = {"heldout_accuracy": ev["heldout_accuracy"], "heldout_loss": ev["heldout_loss"],
                   "heldout_pairs": len(held), "steps": total}
        if not cfg.data:
            summary["heldout_accuracy_vs_rule"] = model.local(rule_accuracy, tokenizer, held, cfg, device)
        if distributed.is_main():
            common.atomic_write_text(os.path.join(cfg.out, "summary.json"), json.dumps(summary))
        return summary


@torch.no_grad()
def rule_accuracy(model, tokenizer, rows, cfg, device) -> float:
    """Synthetic task: how often the RM orders a held-out pair as the true rule does (pairs the rule ties skipped)."""
    rows = distributed.shard(rows)
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
    tot = distributed.reduce_floats({"hits": hits, "total": total})
    return tot["hits"] / max(1, tot["total"])
