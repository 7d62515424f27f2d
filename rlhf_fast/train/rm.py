"""Reward model: a causal LM body with a scalar head read at each sequence's last token, trained on packed
(prompt, chosen, rejected) pairs with the Bradley–Terry loss -log sigmoid(r_chosen - r_rejected); reports pairwise
accuracy mean[r_chosen > r_rejected] on held-out pairs.

    rlhf-fast rm [--config rm.yaml] [--model DIR] [--data pairs.jsonl] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from ..data import DataError, pair_batch, read_jsonl, task, warn_truncation
from ..models import ScalarHeadModel, disable_dropout, load_tokenizer
from . import common, distributed
from .checkpoint import atomic_write_text


@dataclass
class RMConfig(common.RunConfig):
    out: str = "runs/rm"
    from_scratch: bool = False   # True: same architecture, fresh weights (de novo) instead of the --model weights
    num_pairs: int = 4000        # synthetic task only
    heldout_fraction: float = 0.1  # the last pairs of the data, held out for the accuracy
    epochs: int = 2              # passes over the training pairs
    batch_size: int = 32         # pairs per step and rank (under torchrun the global batch is world_size x this)
    lr: float = 1e-3             # AdamW learning rate after the warm-up (then decays linearly to 0)
    weight_decay: float = 0.0    # AdamW weight decay
    warmup_steps: int = 10       # optimizer steps of linear learning-rate warm-up
    grad_clip: float = 1.0       # gradient-norm clipping
    max_len: int = 128           # tokens per sequence; a longer one loses prompt tokens from the left
    dropout: bool = False        # keep the model's dropout while training (off by default)
    log_every: int = 10          # metrics.jsonl row (means over the window) every this many steps
    eval_every: int = 50         # held-out evaluation every this many steps (0 = only at the end)
    save_every: int = 50         # checkpoint every this many steps
    margin_field: str = ""       # Llama 2's margin: a numeric JSONL field m per pair, loss -log sigmoid(r_c - r_r - m)


def bradley_terry(model: ScalarHeadModel, batch, weights: torch.Tensor,
                  margins: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed batch of B chosen then B rejected sequences, per-pair weights [B] -> (loss = sum w * -log
    sigmoid(r_c - r_r - m), per-pair correctness [B] float32 = [r_c > r_r]); ``margins`` m [B] (Llama 2's margin
    term: larger for more clearly preferred pairs), 0 when None."""
    r_chosen, r_rejected = model.score(batch).chunk(2)
    diff = r_chosen - r_rejected
    if margins is not None:
        diff = diff - margins
    return -(weights * F.logsigmoid(diff)).sum(), (r_chosen > r_rejected).float()


@torch.no_grad()
def evaluate(model, tokenizer, rows, cfg, device) -> dict:
    """Held-out pairwise accuracy and loss, and the mean/std of all held-out scores (saved for PPO's normalisation).

    Under torchrun each rank scores its block of ``rows``; the results are over all of them."""
    n_rows = len(rows)
    rows = distributed.shard(rows)
    model.eval()
    losses, accs, scores = [], [], []
    for i in range(0, len(rows), 128):
        batch = pair_batch(tokenizer, rows[i:i + 128], cfg.max_len).to(device)
        with common.autocast(device):
            r = model.score(batch)
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


class RMTrainer(common.EpochTrainer):
    name = "rm"

    def setup(self) -> None:
        cfg = self.cfg
        model_dir = common.base_model_dir(cfg)
        self.tokenizer = load_tokenizer(model_dir)
        if cfg.from_scratch:
            body = AutoModel.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
            module = ScalarHeadModel(body).to(self.device)
        else:
            module = ScalarHeadModel.from_pretrained(model_dir, self.device)
        # The Bradley-Terry loss is blind to the head's bias (r_c - r_r): frozen, it stays 0 rather than drifting
        # with Adam-normalised rounding noise, so 🤗's bias-free ...ForSequenceClassification head scores the same
        module.head.bias.requires_grad_(False)
        # what 🤗's ...ForSequenceClassification finds the last token by; not EOS-as-pad: it would score the token
        # before the final EOS (unset, that class refuses batches of more than one instead)
        if module.config.pad_token_id is None and self.tokenizer.pad_token_id != self.tokenizer.eos_token_id:
            module.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = distributed.wrap(module if cfg.dropout else disable_dropout(module), fsdp=cfg.fsdp)
        rows = read_jsonl(cfg.data, "rm") if cfg.data else task.preference_pairs(cfg.num_pairs, cfg.seed)
        if cfg.margin_field:
            bad = next((i for i, r in enumerate(rows) if not isinstance(r.get(cfg.margin_field), (int, float))), None)
            if bad is not None:
                source = cfg.data or "the embedded pairs"
                raise DataError(f"margin_field={cfg.margin_field!r}: row {bad + 1} of {source} has no numeric "
                                f"{cfg.margin_field!r} ({str(rows[bad])[:120]})")
        if distributed.is_main():
            warn_truncation(self.tokenizer, rows, cfg.max_len, ("chosen", "rejected"))
        n_held = max(1, int(len(rows) * cfg.heldout_fraction))
        self.held = rows[-n_held:]
        self.start(rows[:-n_held])

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        rows = self.step_rows()
        batch = pair_batch(self.tokenizer, rows, cfg.max_len).to(self.device)
        # the mean over the global batch's pairs: one weight per pair
        weights = distributed.global_weights(torch.ones(len(rows), 1, device=self.device)).squeeze(1)
        margins = None
        if cfg.margin_field:
            margins = torch.tensor([float(r[cfg.margin_field]) for r in rows], device=self.device)
        with common.autocast(self.device):
            loss, correct = self.model(bradley_terry, batch, weights, margins)
        common.optimizer_step(loss, self.model, self.opt, cfg.grad_clip, self.sched)
        n = distributed.world_size()
        return distributed.reduce_floats({"loss": loss.item() / n, "accuracy": (weights * correct).sum().item() / n})

    def log_extra(self, row: dict) -> dict:
        if (self.cfg.eval_every and self.step % self.cfg.eval_every == 0) or self.step == self.total_steps():
            ev = self.model.local(evaluate, self.tokenizer, self.held, self.cfg, self.device)
            return {"heldout_loss": ev["heldout_loss"], "heldout_accuracy": ev["heldout_accuracy"]}
        return {}

    def finish(self) -> dict:
        cfg = self.cfg
        ev = self.model.local(evaluate, self.tokenizer, self.held, cfg, self.device)
        out_dir = os.path.join(cfg.out, "model")
        self.model.save_pretrained(out_dir, self.tokenizer)
        if distributed.is_main():
            with open(os.path.join(out_dir, "scalar_head.json")) as f:
                info = json.load(f)
            info.update(score_mean=ev["score_mean"], score_std=ev["score_std"])
            atomic_write_text(os.path.join(out_dir, "scalar_head.json"), json.dumps(info))
        distributed.barrier()
        summary = {"heldout_accuracy": ev["heldout_accuracy"], "heldout_loss": ev["heldout_loss"],
                   "heldout_pairs": len(self.held), "steps": self.total_steps()}
        if not cfg.data:
            summary["heldout_accuracy_vs_rule"] = self.model.local(rule_accuracy, self.tokenizer, self.held, cfg,
                                                                   self.device)
        return summary


def train_rm(cfg: RMConfig, resume: bool = False) -> dict:
    with common.run_context(cfg):
        return RMTrainer(cfg, resume).train()


@torch.no_grad()
def rule_accuracy(model, tokenizer, rows, cfg, device) -> float:
    """Synthetic task: how often the RM orders a held-out pair as the true rule does (pairs the rule ties skipped)."""
    rows = distributed.shard(rows)
    model.eval()
    hits = total = 0
    for i in range(0, len(rows), 128):
        chunk = rows[i:i + 128]
        rc, rr = model.score(pair_batch(tokenizer, chunk, cfg.max_len).to(device)).chunk(2)
        for row, a, b in zip(chunk, rc.tolist(), rr.tolist()):
            sa, sb = task.true_score(row["prompt"], row["chosen"]), task.true_score(row["prompt"], row["rejected"])
            if sa != sb:
                hits += (a > b) == (sa > sb)
                total += 1
    model.train()
    tot = distributed.reduce_floats({"hits": hits, "total": total})
    return tot["hits"] / max(1, tot["total"])
