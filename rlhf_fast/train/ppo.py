"""PPO (and its critic-free GRPO / RLOO / Dr. GRPO variants) on the fused ops.

Models: policy (from SFT), frozen reference (a second copy of the SFT weights), frozen reward model, critic (value
head; from the reward model unless ``critic`` names another directory). One iteration:

  1. generate  B prompts (x G samples in group modes) with rlhf_fast.generate: sequences, response mask and the
               behaviour log-probs of the sampler.
  2. score     reference log-probs (fused linear log-prob op), reward-model score at the last token (normalised with
               the RM's held-out statistics, optionally clipped), critic values; per-token reward
               r[t] = -kl_coef * k(logp, ref_logp)[t] (+ score on the last response token); GAE; whitening.
               Group modes: advantage = group_advantages(score) on every response token, no critic, and the KL
               goes into the loss instead (as GRPO does).
  3. learn     ``epochs`` passes over shuffled minibatches: ppo_policy_loss on the fused log-probs (+ entropy bonus),
               ppo_value_loss for the critic, gradient clipping.

    rlhf-fast ppo --model SFT_DIR reward_model=RM_DIR [--data prompts.jsonl] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .. import gae, generate, group_advantages, kl_penalty, masked_mean, ppo_policy_loss, ppo_value_loss
from ..data import prompt_batch, read_jsonl, task
from ..models import sequence_logprobs
from ..models.tiny import load_causal_lm, load_tokenizer
from ..models.value_head import ScalarHeadModel, last_token_index
from . import common, distributed

GROUP_MODES = ("grpo", "dr_grpo", "rloo")


@dataclass
class PPOConfig(common.RunConfig):
    out: str = "runs/ppo"
    reward_model: str = ""       # scalar-head model directory (from `rlhf-fast rm`)
    critic: str = ""             # "" = initialise the critic from the reward model
    algo: str = "ppo"            # ppo | grpo | dr_grpo | rloo
    iterations: int = 60
    batch_size: int = 64         # prompts per iteration and rank (under torchrun the global batch is world_size x this)
    group_size: int = 4          # samples per prompt (group modes only)
    minibatch_size: int = 32     # sequences per gradient step and rank
    epochs: int = 2              # passes over each rollout batch
    max_new_tokens: int = 10
    max_prompt_len: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    lr: float = 3e-4
    critic_lr: float = 1e-3
    gamma: float = 1.0
    lam: float = 0.95
    clip_low: float = 0.2
    clip_high: Optional[float] = None
    dual_clip: Optional[float] = None
    value_clip: float = 0.2
    kl_coef: float = 0.05
    kl_kind: str = "k1"          # k1 | k2 | k3 | abs (k3 is the usual choice in group modes)
    adaptive_kl: bool = False    # Ziegler et al.: kl_coef *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * B / horizon
    kl_target: float = 1.0
    kl_horizon: int = 2000
    reward_clip: Optional[float] = 5.0
    entropy_coef: float = 0.0
    grad_clip: float = 1.0
    loss_agg: str = "token-mean"  # policy and value loss aggregation: token-mean | seq-mean-token-sum |
    #                               seq-mean-token-mean | seq-mean-token-sum-norm (over the global batch)
    whiten_advantages: bool = True
    shard_frozen: bool = False   # under torchrun: shard the reference and reward models with FSDP2 (else replicated)
    eval_prompts: int = 256      # synthetic task: prompts for the true score before/after (0 = skip)
    eval_every: int = 0          # also every this many iterations (0 = only before and after)
    save_every: int = 5


class Rollout(NamedTuple):
    """One iteration's experience; B sequences, P prompt positions, N response positions."""

    sequences: torch.Tensor       # [B, P+N] int64, left-padded prompt then response
    attention_mask: torch.Tensor  # [B, P+N] int64
    response_mask: torch.Tensor   # [B, N] int64, 1 on generated tokens (through EOS)
    old_logp: torch.Tensor        # [B, N] float32, behaviour log-probs from the sampler
    ref_logp: torch.Tensor        # [B, N] float32
    values: torch.Tensor          # [B, N] float32 (zeros in group modes)
    advantages: torch.Tensor      # [B, N] float32
    returns: torch.Tensor         # [B, N] float32


def response_logprobs(model, sequences, attention_mask, response_mask, prompt_len: int, *, temperature: float,
                      return_entropy: bool = False):
    """Log-probs of the response tokens under ``model`` (fused linear log-prob op): float32 [B, N] (, entropy)."""
    # position t predicts token t+1: the N response tokens are predicted at positions P-1 ... P+N-2
    labels = torch.full_like(sequences, -100)
    labels[:, prompt_len - 1:-1] = torch.where(response_mask.bool(), sequences[:, prompt_len:], -100)
    out = sequence_logprobs(model, sequences, attention_mask, labels, temperature=temperature,
                            return_entropy=return_entropy)
    if return_entropy:
        return out[0][:, prompt_len - 1:-1], out[1][:, prompt_len - 1:-1]
    return out[:, prompt_len - 1:-1]


def response_values(critic: ScalarHeadModel, sequences, attention_mask, prompt_len: int) -> torch.Tensor:
    """V(state before each response token): float32 [B, N]."""
    return critic(sequences, attention_mask)[:, prompt_len - 1:-1]


def explained_variance(values, returns, mask) -> float:
    """1 - Var(R - V) / Var(R) over the response tokens (of every rank under torchrun)."""
    return distributed.explained_variance(values, returns, mask)


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, resume: bool = False):
        if cfg.algo not in ("ppo", *GROUP_MODES):
            raise ValueError(f"algo must be ppo, grpo, dr_grpo or rloo, got {cfg.algo!r}")
        if cfg.loss_agg not in distributed.AGG_MODES:
            raise ValueError(f"loss_agg must be one of {distributed.AGG_MODES}, got {cfg.loss_agg!r}")
        if not cfg.model or not cfg.reward_model:
            raise ValueError("ppo needs model= (the SFT policy directory) and reward_model= (from `rlhf-fast rm`)")
        self.cfg = cfg
        os.makedirs(cfg.out, exist_ok=True)
        self.device = device = common.resolve_device(cfg.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.policy = distributed.wrap(load_causal_lm(cfg.model, device), fsdp=cfg.fsdp)
        frozen = {"trainable": False, "shard_frozen": cfg.shard_frozen}
        self.ref = distributed.wrap(load_causal_lm(cfg.model, device).eval().requires_grad_(False), **frozen)
        self.reward_model = distributed.wrap(
            ScalarHeadModel.from_pretrained(cfg.reward_model, device).eval().requires_grad_(False), **frozen)
        with open(os.path.join(cfg.reward_model, "scalar_head.json")) as f:
            info = json.load(f)
        self.score_mean, self.score_std = info.get("score_mean", 0.0), info.get("score_std", 1.0) or 1.0
        self.group = cfg.algo in GROUP_MODES
        self.critic = None if self.group else distributed.wrap(
            ScalarHeadModel.from_pretrained(cfg.critic or cfg.reward_model, device), fsdp=cfg.fsdp)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.critic_opt = None if self.group else torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda it: 1.0 - it / cfg.iterations)
        self.rows = read_jsonl(cfg.data, "ppo") if cfg.data else task.prompts(20_000, cfg.seed)
        # each rank samples its own rollouts: its own random stream
        self.generator = torch.Generator(device).manual_seed(cfg.seed + distributed.rank())
        self.kl_coef = cfg.kl_coef
        self.iteration = 0
        self.checkpoint = distributed.Checkpoint(cfg.out, cfg.checkpoint)
        self.initial_true_score = None
        ckpt = self.checkpoint.load(*self._checkpointed(), self.generator, seed=cfg.seed) if resume else None
        if ckpt is not None:
            self.sched.load_state_dict(ckpt["scheduler"])
            self.kl_coef, self.iteration = ckpt["kl_coef"], ckpt["iteration"]
            self.initial_true_score = ckpt["initial_true_score"]
        self.metrics = common.Metrics(cfg.out, resume_step=self.iteration if ckpt is not None else None)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _checkpointed(self) -> tuple[dict, dict]:
        models, optimizers = {"policy": self.policy}, {"optimizer": (self.policy, self.opt)}
        if not self.group:
            models["critic"], optimizers["critic_optimizer"] = self.critic, (self.critic, self.critic_opt)
        return models, optimizers

    def save_checkpoint(self) -> None:
        self.checkpoint.save(*self._checkpointed(),
                             {"scheduler": self.sched.state_dict(), "kl_coef": self.kl_coef,
                              "iteration": self.iteration, "initial_true_score": self.initial_true_score},
                             self.generator)

    # ------------------------------------------------------------------------------------------------ phases
    def global_prompts(self, iteration: int) -> list[dict]:
        """The iteration's prompts over all ranks: the data position is the iteration number (epochs reshuffle by
        seed)."""
        n, size = len(self.rows), self.cfg.batch_size * distributed.world_size()
        return [self.rows[j] for j in common.global_batch_indices(n, iteration, max(1, n // size), size, self.cfg.seed)]

    def prompts(self, iteration: int) -> list[dict]:
        """This rank's block of the iteration's prompts."""
        return distributed.shard(self.global_prompts(iteration))

    @torch.no_grad()
    def rollout(self, rows: list[dict]):
        cfg, tok = self.cfg, self.tokenizer
        batch = prompt_batch(tok, rows, cfg.max_prompt_len)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if self.group:
            ids, mask = ids.repeat_interleave(cfg.group_size, 0), mask.repeat_interleave(cfg.group_size, 0)
        self.policy.eval()
        with common.autocast(self.device):
            res = self.policy.local(generate, ids, mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, generator=self.generator)
        self.policy.train()
        return res, ids.shape[1]

    @torch.no_grad()
    def score(self, res, prompt_len: int) -> tuple[Rollout, dict]:
        cfg = self.cfg
        seq, rmask = res.sequences, res.response_mask.long()
        attn = torch.cat([(seq[:, :prompt_len] != self.tokenizer.pad_token_id).long()
                          if self.tokenizer.pad_token_id is not None else torch.ones_like(seq[:, :prompt_len]),
                          rmask], 1)
        old_logp = res.logprobs.float() * rmask
        with common.autocast(self.device):
            ref_logp = self.ref(response_logprobs, seq, attn, rmask, prompt_len, temperature=cfg.temperature)
            raw = self.reward_model(ScalarHeadModel.score, seq, attn)
            values = (torch.zeros_like(old_logp) if self.group
                      else self.critic(response_values, seq, attn, prompt_len).float() * rmask)
        score = (raw - self.score_mean) / self.score_std
        if cfg.reward_clip is not None:
            score = score.clamp(-cfg.reward_clip, cfg.reward_clip)
        kl = kl_penalty(old_logp, ref_logp, kind=cfg.kl_kind) * rmask  # [B, N]
        if self.group:
            adv = group_advantages(score, cfg.group_size, mode=cfg.algo)[:, None] * rmask
            returns = torch.zeros_like(adv)
        else:
            rewards = -self.kl_coef * kl
            last = last_token_index(rmask)
            rewards[torch.arange(len(last)), last] += score
            adv, returns = gae(rewards, values, rmask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:  # statistics of the global batch
                adv = distributed.masked_whiten(adv, rmask) * rmask
        stats = distributed.global_means(
            {"rm_score": raw.sum().item(), "reward": score.sum().item(), "kl": kl.sum().item(),
             "response_len": rmask.sum().item()}, len(raw))
        return Rollout(seq, attn, rmask, old_logp, ref_logp.float(), values, adv.float(), returns.float()), stats

    def learn(self, ro: Rollout, prompt_len: int) -> dict:
        cfg = self.cfg
        B = ro.sequences.shape[0]
        sums: dict[str, float] = {}
        count = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(B, generator=self.generator, device=self.generator.device).to(self.device)
            for start in range(0, B, cfg.minibatch_size):
                mb = order[start:start + cfg.minibatch_size]
                m = ro.response_mask[mb]
                # Every term is this rank's share of the global-batch aggregate: (loss, weight) = global_loss(...)
                # scales the local aggregate so that the gradient averaged over ranks is that of the global one,
                # and sum over ranks of (local value * weight) is the global value (see distributed.global_loss).
                with common.autocast(self.device):
                    logp, ent = self.policy(response_logprobs, ro.sequences[mb], ro.attention_mask[mb], m,
                                            prompt_len, temperature=cfg.temperature, return_entropy=True)
                    pg, st = ppo_policy_loss(logp, ro.old_logp[mb], ro.advantages[mb], m, clip_low=cfg.clip_low,
                                             clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, agg=cfg.loss_agg)
                    entropy = masked_mean(ent, m)
                    pg_global, w_pg = distributed.global_loss(pg, m, cfg.loss_agg)
                    ent_global, w_tok = distributed.global_loss(entropy, m)
                    loss = pg_global - cfg.entropy_coef * ent_global
                    value = pg.item() * w_pg - cfg.entropy_coef * entropy.item() * w_tok
                    if self.group and self.kl_coef > 0:  # GRPO: KL to the reference in the loss
                        kl = masked_mean(kl_penalty(logp, ro.ref_logp[mb], kind=cfg.kl_kind), m)
                        loss = loss + self.kl_coef * distributed.global_loss(kl, m)[0]
                        value += self.kl_coef * kl.item() * w_tok
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
                self.opt.step()
                step = {"policy_loss": value, "entropy": entropy.item() * w_tok,
                        "clip_frac": float(st["clip_frac"]) * w_tok, "approx_kl": float(st["approx_kl"]) * w_tok}
                if not self.group:
                    with common.autocast(self.device):
                        v = self.critic(response_values, ro.sequences[mb], ro.attention_mask[mb], prompt_len)
                        vloss, vst = ppo_value_loss(v, ro.values[mb], ro.returns[mb], m, clip=cfg.value_clip,
                                                    agg=cfg.loss_agg)
                        vloss_global, w_v = distributed.global_loss(vloss, m, cfg.loss_agg)
                    self.critic_opt.zero_grad(set_to_none=True)
                    vloss_global.backward()
                    torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
                    self.critic_opt.step()
                    step.update(value_loss=vloss.item() * w_v, value_clip_frac=float(vst["clip_frac"]) * w_tok)
                for k, v in step.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        self.sched.step()
        out = {k: v / count for k, v in distributed.reduce_floats(sums).items()}
        if not self.group:
            out["explained_variance"] = explained_variance(ro.values, ro.returns, ro.response_mask)
        return out

    def update_kl_coef(self, kl: float, n: int) -> None:
        """Adaptive KL controller of Ziegler et al. (2019)."""
        if self.cfg.adaptive_kl:
            error = max(-0.2, min(0.2, kl / self.cfg.kl_target - 1.0))
            self.kl_coef *= 1.0 + error * n / self.cfg.kl_horizon

    def true_score(self) -> Optional[float]:
        if self.cfg.data or not self.cfg.eval_prompts:
            return None
        return self.policy.local(common.sample_true_score, self.tokenizer,
                                        task.prompts(self.cfg.eval_prompts, seed=10_000 + self.cfg.seed),
                                        seed=self.cfg.seed, max_new_tokens=self.cfg.max_new_tokens,
                                        temperature=self.cfg.temperature)

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg = self.cfg
        if self.iteration == 0:
            self.initial_true_score = self.true_score()
        bar = common.progress(total=cfg.iterations, initial=self.iteration, enabled=cfg.progress, desc="ppo")
        while self.iteration < cfg.iterations:
            rows = self.prompts(self.iteration)
            t0 = time.perf_counter()
            res, prompt_len = self.rollout(rows)
            t1 = time.perf_counter()
            ro, stats = self.score(res, prompt_len)
            t2 = time.perf_counter()
            stats.update(self.learn(ro, prompt_len))
            t3 = time.perf_counter()
            if not cfg.data:
                texts = common.decode_responses(self.tokenizer, ro.sequences, ro.response_mask, prompt_len)
                prompts_ = [r["prompt"] for r in rows for _ in range(cfg.group_size if self.group else 1)]
                stats.update(distributed.global_means(
                    {"true_score": sum(task.true_score(p, t) for p, t in zip(prompts_, texts))}, len(texts)))
            self.update_kl_coef(stats["kl"], ro.sequences.shape[0] * distributed.world_size())
            self.iteration += 1
            if cfg.eval_every and self.iteration % cfg.eval_every == 0 and self.iteration < cfg.iterations:
                stats["eval_true_score"] = self.true_score()
            stats.update(kl_coef=self.kl_coef, lr=self.sched.get_last_lr()[0])
            stats.update(distributed.reduce_floats(  # the slowest rank sets the pace
                {"time_generate": t1 - t0, "time_score": t2 - t1, "time_learn": t3 - t2}, "max"))
            self.metrics.log(self.iteration, **{k: v for k, v in stats.items() if v is not None})
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.2f}", kl=f"{stats['kl']:.2f}",
                            **({"true": f"{stats['true_score']:.2f}"} if "true_score" in stats else {}))
            if self.iteration % cfg.save_every == 0 or self.iteration == cfg.iterations:
                self.save_checkpoint()
        bar.close()
        final = self.true_score()
        self.policy.save_pretrained(os.path.join(cfg.out, "model"), self.tokenizer)
        if not self.group:
            self.critic.save_pretrained(os.path.join(cfg.out, "critic"), self.tokenizer)
        self.metrics.close()
        summary = {"iterations": cfg.iterations, "true_score_before": self.initial_true_score,
                   "true_score_after": final, "final": self.metrics.rows[-1] if self.metrics.rows else {}}
        if distributed.is_main():
            common.atomic_write_text(os.path.join(cfg.out, "summary.json"), json.dumps(summary))
        return summary


def train_ppo(cfg: PPOConfig, resume: bool = False) -> dict:
    with common.run_context(cfg):
        return PPOTrainer(cfg, resume).train()
