"""Direct preference optimisation and its family (IPO, SLiC hinge, conservative and robust DPO, RPO, SimPO) on
packed (prompt, chosen, rejected) pairs, by the fused hidden-state loss (``sequence_dpo_loss``: decoder hidden
states -> ``linear_dpo_loss`` on the response tokens only, gradients formed in the forward, no [N, V] logits).
Formulas: docs/formulas.md, sections "DPO" and "DPO trainer".

    rlhf-fast dpo [--config dpo.yaml] [--model SFT_DIR] [--data pairs.jsonl] [--out DIR] [key=value ...]

Reference log-probs: ``ref_logps=precompute`` scores every training pair once with the initial policy before the
first step and caches them in ``out/ref_logps.pt`` (reused on --resume); ``ref_logps=live`` keeps a frozen
reference model and scores each batch.

Defaults (lr 5e-5, beta 0.5): on the embedded default after SFT (true score 0.699, seed 0), beta 0.1 with lr 5e-4
or 1e-4 raised the preference accuracy but pushed both responses' log-probs down until the samples left the task
(true score 0.44 and 0.07); beta 0.5 with lr 5e-5 gave 0.840 (seeds 1, 2: +0.12, +0.11; rpo_alpha=0.5 with beta
0.3 and lr 2e-4: 0.921). benchmarks/results/2026-12-02-cpu-pipeline-dpo.txt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import pair_batch, read_jsonl, task, warn_truncation
from ..models import disable_dropout, load_causal_lm, load_tokenizer, sequence_dpo_loss, sequence_logprobs
from ..ops.linear_losses import DPO_LOSS_TYPES
from . import common, distributed

REF_LOGPS = ("precompute", "live")
REF_CACHE = "ref_logps.pt"


@dataclass
class DPOConfig(common.RunConfig):
    out: str = "runs/dpo"
    num_pairs: int = 4000        # synthetic task only
    epochs: int = 1              # passes over the pairs
    batch_size: int = 32         # pairs per step and rank (under torchrun the global batch is world_size x this)
    lr: float = 5e-5             # with beta: measured on the embedded default (module docstring)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    max_len: int = 128
    dropout: bool = False        # keep the model's dropout while training (off by default, as in PPO)
    beta: float = 0.5            # the KL strength: implicit reward = beta * (log pi - log pi_ref)
    loss_type: str = "sigmoid"   # sigmoid (DPO) | robust (rDPO) | ipo | hinge (SLiC)
    label_smoothing: float = 0.0  # epsilon of conservative DPO (sigmoid) and robust DPO, in [0, 0.5)
    rpo_alpha: float = 0.0       # weight of the NLL of the chosen responses (RPO); 0 = off
    reference_free: bool = False  # log-ratios against a uniform reference (ref log-probs 0)
    simpo: bool = False          # SimPO: reference-free, length-normalised log-probs, target margin simpo_gamma
    simpo_gamma: float = 0.5     # SimPO's target margin (simpo=true only)
    ref_logps: str = "precompute"  # precompute (once, cached in out/ref_logps.pt) | live (frozen reference model)
    log_every: int = 10          # log the means of this many steps
    save_every: int = 50         # checkpoint every this many steps
    eval_prompts: int = 256      # synthetic task: prompts for the true score after training (0 = skip)
    max_new_tokens: int = 10

    def validate(self, prefix: str = "") -> None:
        def bad(field: str, must: str):
            raise common.ConfigError(f"{prefix}{field}={getattr(self, field)!r}: must be {must}")

        if self.loss_type not in DPO_LOSS_TYPES:
            bad("loss_type", "one of " + ", ".join(DPO_LOSS_TYPES))
        if self.ref_logps not in REF_LOGPS:
            bad("ref_logps", "one of " + ", ".join(REF_LOGPS))
        if not (math.isfinite(self.beta) and self.beta > 0):
            bad("beta", "a finite number > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            bad("label_smoothing", "in [0, 0.5)")
        if not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
            bad("rpo_alpha", "a finite number >= 0")
        if not math.isfinite(self.simpo_gamma):
            bad("simpo_gamma", "a finite number")
        if self.simpo and self.loss_type == "ipo":
            bad("loss_type", "sigmoid, robust or hinge with simpo=true (its margin is simpo_gamma)")
        super().validate(prefix)

    @property
    def uses_reference(self) -> bool:
        return not (self.reference_free or self.simpo)


def chosen_token_mask(batch) -> Tensor:
    """[N] bool: the target tokens of the chosen half (the first P sequences) of a ``pair_batch``."""
    return batch.mask & (batch.seq_ids < batch.num_seqs // 2)


def dpo_loss(model, batch, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, pair_weights: Tensor, cfg: DPOConfig,
             nll_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The training objective of a packed batch of P chosen then P rejected sequences (``pair_batch``):
    sum_i w_i loss_i + rpo_alpha * sum_t u_t * -logp_t over the chosen response tokens (RPO), by
    ``sequence_dpo_loss`` (the fused hidden-state ``linear_dpo_loss``: no logits, 3 GEMMs over the vocabulary).

    pair_weights [P] (1/P on one process); nll_weights [N] (default: the token mean over the chosen response tokens
    of this batch); ref_*_logps [P] (ignored without a reference: reference_free / simpo).
    -> (loss float32 scalar; stats: the means over this batch's pairs chosen_rewards, rejected_rewards, margins,
    accuracy, and nll; the sequences' log-probs [2P], detached)."""
    if not cfg.uses_reference:
        ref_chosen_logps = ref_rejected_logps = torch.zeros_like(pair_weights)
    return sequence_dpo_loss(model, batch, ref_chosen_logps, ref_rejected_logps, pair_weights=pair_weights,
                             nll_weights=nll_weights, beta=cfg.beta, loss_type=cfg.loss_type,
                             label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma if cfg.simpo else None,
                             nll_coef=cfg.rpo_alpha)


def _sequence_logp_sums(model, batch) -> Tensor:
    logp = sequence_logprobs(model, batch)
    return logp.new_zeros(batch.num_seqs).index_add(0, batch.seq_ids, logp)


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


class DPOTrainer(common.EpochTrainer):
    name = "dpo"

    def setup(self) -> None:
        cfg = self.cfg
        self.model_dir = common.base_model_dir(cfg)
        self.tokenizer = load_tokenizer(self.model_dir)
        module = load_causal_lm(self.model_dir, self.device)
        self.model = distributed.wrap(module if cfg.dropout else disable_dropout(module), fsdp=cfg.fsdp)
        rows = read_jsonl(cfg.data, "rm") if cfg.data else task.preference_pairs(cfg.num_pairs, cfg.seed)
        if distributed.is_main():
            warn_truncation(self.tokenizer, rows, cfg.max_len, ("chosen", "rejected"))
        self.ref = None
        if cfg.uses_reference and cfg.ref_logps == "live":
            ref = disable_dropout(load_causal_lm(self.model_dir, self.device)).eval().requires_grad_(False)
            self.ref = distributed.wrap(ref, trainable=False, shard_frozen=cfg.fsdp)
        elif cfg.uses_reference:  # before any step (and before --resume restores the policy): the initial policy
            ref = self.precomputed_ref_logps(rows)
            rows = [{**row, "ref_chosen_logp": c, "ref_rejected_logp": r} for row, (c, r) in zip(rows, ref.tolist())]
        self.start(rows)

    def precomputed_ref_logps(self, rows: list[dict]) -> Tensor:
        """[len(rows), 2] float32 reference (chosen, rejected) sequence log-probs, from ``out/ref_logps.pt`` when it
        holds those of these rows, model files and max_len; else scored now (each rank its block) and saved there."""
        cfg = self.cfg
        path = os.path.join(cfg.out, REF_CACHE)
        key = {"model": _files_fingerprint(self.model_dir), "max_len": cfg.max_len, "rows": _fingerprint(rows)}
        if os.path.exists(path):
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached["key"] == key:
                return cached["logps"]
        mine, out = distributed.shard(rows), []
        # as many chunks on every rank (each one a collective under FSDP2), of at most 64 pairs
        chunks = -(-len(distributed.shard(rows, 0)) // 64)
        bounds = [len(mine) * c // chunks for c in range(chunks + 1)]
        self.model.eval()
        for a, b in zip(bounds[:-1], bounds[1:]):
            batch = pair_batch(self.tokenizer, mine[a:b], cfg.max_len).to(self.device)
            with common.autocast(self.device):
                logps = self.model.local(_sequence_logp_sums, batch)
            out.append(torch.stack(logps.float().chunk(2), 1).cpu())
        self.model.train()
        logps = torch.cat([t for part in distributed.all_gather_object(out) for t in part])
        if distributed.is_main():
            tmp = f"{path}.tmp{os.getpid()}"
            torch.save({"key": key, "logps": logps}, tmp)
            os.replace(tmp, path)
        distributed.barrier()
        return logps

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        rows = self.step_rows()
        batch = pair_batch(self.tokenizer, rows, cfg.max_len).to(self.device)
        P = len(rows)
        with common.autocast(self.device):
            if self.ref is not None:
                ref_c, ref_r = self.ref.local(_sequence_logp_sums, batch).float().chunk(2)
            elif cfg.uses_reference:
                ref = torch.tensor([[r["ref_chosen_logp"], r["ref_rejected_logp"]] for r in rows], device=self.device)
                ref_c, ref_r = ref.unbind(1)
            else:
                ref_c = ref_r = torch.zeros(P, device=self.device)
            # means over the global batch: one weight per pair, and the token mean of the chosen responses (RPO)
            pair_weights = distributed.global_weights(torch.ones(P, 1, device=self.device)).squeeze(1)
            nll_weights = distributed.global_weights(chosen_token_mask(batch))
            loss, st, seq_logps = self.model(dpo_loss, batch, ref_c, ref_r, pair_weights, cfg, nll_weights)
        common.optimizer_step(loss, self.model, self.opt, cfg.grad_clip, self.sched)
        n = distributed.world_size()
        logratio = seq_logps[:P] - ref_c + seq_logps[P:] - ref_r
        sums = distributed.reduce_floats({
            "loss": loss.item() / n, "nll": st["nll"].item() / n, "pairs": P, "chosen": st["chosen_rewards"].item() * P,
            "rejected": st["rejected_rewards"].item() * P, "correct": st["accuracy"].item() * P,
            "logratio": logratio.sum().item(), "tokens": batch.mask.sum().item()})
        out = {"loss": sums["loss"], "rewards/chosen": sums["chosen"] / sums["pairs"],
               "rewards/rejected": sums["rejected"] / sums["pairs"],
               "margins": (sums["chosen"] - sums["rejected"]) / sums["pairs"],
               "accuracy": sums["correct"] / sums["pairs"], "nll": sums["nll"]}
        if cfg.uses_reference:
            out["kl"] = sums["logratio"] / max(sums["tokens"], 1.0)
        return out

    def postfix(self, row: dict) -> dict:
        return {k: f"{row[k]:.3f}" for k in ("loss", "accuracy", "margins") if k in row}

    def log_extra(self, row: dict) -> dict:
        return {"lr": self.sched.get_last_lr()[0]}

    def finish(self) -> dict:
        cfg = self.cfg
        self.model.save_pretrained(os.path.join(cfg.out, "model"), self.tokenizer)
        last = self.metrics.rows[-1] if self.metrics.rows else {}
        summary = {"final_loss": last.get("loss", float("nan")), "final_accuracy": last.get("accuracy", float("nan")),
                   "final_kl": last.get("kl"), "steps": self.total_steps()}
        if not cfg.data and cfg.eval_prompts:
            summary["true_score"] = self.model.local(
                common.sample_true_score, self.tokenizer, task.prompts(cfg.eval_prompts, seed=10_000 + cfg.seed),
                seed=cfg.seed, max_new_tokens=cfg.max_new_tokens)
        return summary


def _fingerprint(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _files_fingerprint(model_dir: str) -> list:
    """The model directory and its files' names, sizes and modification times: a model retrained into the same
    folder gets its reference log-probs scored again."""
    path = os.path.abspath(model_dir)
    return [path] + [[f, os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns]
                     for f in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, f))]


def train_dpo(cfg: DPOConfig, resume: bool = False) -> dict:
    """Trains, saves ``cfg.out/model`` and returns a summary (final loss / accuracy / KL, true score on the
    synthetic task)."""
    with common.run_context(cfg):
        return DPOTrainer(cfg, resume).train()
