"""PPO (and its critic-free GRPO / RLOO / Dr. GRPO variants) on packed batches and the fused ops.

Models: policy (from SFT), frozen reference (a second copy of the SFT weights), frozen reward model, critic (value
head; from the reward model unless ``critic`` names another directory). Dropout is off in all of them (unless
``dropout=true``), so every log-prob that enters a ratio or a KL is the eval-mode computation. One iteration:

  1. generate  B prompts (x G samples in group modes) with rlhf_fast.generate -> a packed TokenBatch of prompt +
               response with the sampler's behaviour log-probs (same positions as every later forward) and, with
               ``logprob_support=kept``, its kept-set thresholds; or, with ``rollouts=PATH``, the next rollouts of
               another engine (rlhf_fast.data.rollouts, docs/rollouts.md).
  2. score     the ratio's old log-probs (the behaviour ones, or with ``behaviour_logprobs=recompute`` a forward of
               the policy, the behaviour ones then entering ``is_correction``'s per-token weights), reference
               log-probs, the reward of each sequence (``rlhf_fast.train.rewards``: reward models at the
               last token, normalised with each one's held-out statistics and clipped, and/or programmatic
               reward functions, combined by weights or Llama 2's safety rule), critic values; per-token reward
               r[t] = -kl_coef * k(logp, ref_logp)[t] (+ score on the last response token); GAE; whitening.
               Group modes: advantage = group_advantages(score, group ids) on every response token, no critic, and
               the KL goes into the loss instead (as GRPO does).
  3. learn     ``epochs`` passes over shuffled minibatches of sequences: per-token loss weights from ``loss_agg``
               (over the global minibatch), the PPO objective from hidden states (``sequence_ppo_loss``:
               ``linear_ppo_loss``, 3 GEMMs over the vocabulary, no logits kept), ``ppo_value_loss`` for the critic,
               gradient clipping. PPO-ptx (InstructGPT): with ``ptx_coef > 0`` every minibatch also takes
               ``ptx_coef`` x the causal-LM loss of a batch of SFT rows (``ptx_data``), in the same backward.

    rlhf-fast ppo --model SFT_DIR reward_models=RM_DIR[,RM_DIR2] [reward_fns=module:function] [--data prompts.jsonl]
                  [--out DIR] [key=value ...]
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .. import gae, generate, group_advantages, kl_penalty, mismatch_metrics, ppo_value_loss, rollout_correction
from ..batch import TokenBatch
from ..data import DataError, prompt_batch, read_jsonl, sft_batch, task
from ..data.rollouts import load_rollouts, rollout_batch
from ..generation import CACHE_MODES
from ..models import ScalarHeadModel, disable_dropout, float32_head, load_causal_lm, load_tokenizer, \
    sequence_cross_entropy, sequence_logprobs, sequence_ppo_loss
from ..ops.ppo_loss import POLICY_LOSS_TYPES, RATIO_LEVELS, _policy_variant
from . import common, distributed
from .rewards import RewardConfig, Rewards

GROUP_MODES = ("grpo", "dr_grpo", "rloo")


@dataclass
class PPOConfig(RewardConfig, common.RunConfig):
    out: str = "runs/ppo"
    critic: str = ""             # "" = initialise the critic from the first reward model (else from the policy)
    algo: str = "ppo"            # ppo | grpo | dr_grpo | rloo
    iterations: int = 60         # rounds of rollout -> score -> learn
    batch_size: int = 64         # prompts per iteration and rank (under torchrun the global batch is world_size x this)
    group_size: int = 4          # samples per prompt (group modes only)
    minibatch_size: int = 32     # sequences per gradient step and rank
    epochs: int = 2              # passes over each rollout batch
    max_new_tokens: int = 10     # longest response sampled
    max_prompt_len: int = 256    # a longer prompt keeps its last tokens
    generate_cache: str = "auto"  # auto | static | dynamic: rlhf_fast.generate's KV cache (auto: static if it can)
    generate_batch_size: int = 0  # rows decoded at once (static cache; 0 = all): a row that stops frees its slot
    #                              for the next pending prompt (refill), so long-tailed lengths do not idle the batch
    temperature: float = 1.0     # of the sampler and of every log-prob
    top_k: int = 0               # sampler filters: 0 = off
    top_p: float = 1.0           # 1 = off
    min_p: float = 0.0           # 0 = off
    logprob_support: str = "full"  # full | kept: every policy log-prob over the sampler's kept set (top-k/p, min-p)
    behaviour_logprobs: str = "sampler"  # sampler | recompute: the ratio's old log-probs are the sampler's, or a
    #                              forward of the policy before learning (then is_correction weighs the gap)
    is_correction: str = "none"  # none | tis | mis | icepop | seq_tis | seq_mis (docs/formulas.md); needs recompute
    is_cap: float = 2.0          # tis, mis, seq_tis, seq_mis: the bound of the importance weight
    icepop_low: float = 0.5      # icepop: tokens whose weight is outside [icepop_low, icepop_high] are masked
    icepop_high: float = 5.0     # icepop: upper end of the band
    head_dtype: str = "auto"     # auto | float32: the lm_head's dtype in every log-prob (float32 for bf16 models)
    rollouts: str = ""           # JSONL/Parquet rollouts of another engine to train on instead of sampling
    lr: float = 3e-4             # policy AdamW learning rate (decays linearly to 0 over the iterations)
    critic_lr: float = 1e-3      # critic AdamW learning rate
    gamma: float = 1.0           # GAE discount
    lam: float = 0.95            # GAE lambda
    clip_low: float = 0.2        # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: Optional[float] = None  # null = clip_low
    dual_clip: Optional[float] = None  # > 1: bound of the loss for negative advantages (null = off)
    loss_type: str = "ppo"       # ppo | cispo | sapo | vespo: the policy term (docs/formulas.md "Losses"; cispo:
    #                              clip_high is the cap on the ratio, e.g. 5.0)
    ratio_level: str = "token"   # token | sequence (GSPO: each token takes its sequence's mean log-ratio)
    value_clip: float = 0.2      # critic values clipped to old value +- value_clip
    kl_coef: float = 0.2         # KL to the reference: in the reward (ppo) or in the loss (group modes)
    kl_kind: str = "k1"          # k1 | k2 | k3 | abs (k3 is the usual choice in group modes)
    adaptive_kl: bool = False    # Ziegler et al.: kl_coef *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * B / horizon
    kl_target: float = 1.0       # adaptive_kl: the KL aimed at
    kl_horizon: int = 2000       # adaptive_kl: its horizon in samples
    entropy_coef: float = 0.0    # entropy bonus in the loss
    ptx_coef: float = 0.0        # PPO-ptx: weight of the causal-LM loss on SFT rows mixed into every minibatch
    ptx_data: str = ""           # SFT-format JSONL for PPO-ptx ("" = the embedded task's SFT data)
    ptx_batch_size: int = 0      # SFT rows per minibatch and rank (0 = minibatch_size)
    grad_clip: float = 1.0       # gradient-norm clipping (policy and critic)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm |
    #                               dr-grpo (docs/formulas.md), over the global minibatch
    whiten_advantages: bool = True  # ppo: advantages normalised over the global batch
    dropout: bool = False        # keep dropout in the policy and critic while training (off by default, as in TRL)
    shard_frozen: bool = False   # under torchrun: shard the reference and reward models with FSDP2 (else replicated)
    eval_prompts: int = 256      # synthetic task: prompts for the true score before/after (0 = skip)
    eval_every: int = 0          # also every this many iterations (0 = only before and after)
    save_every: int = 5          # checkpoint every this many iterations

    def validate(self, prefix: str = "") -> None:
        if self.algo not in ("ppo", *GROUP_MODES):
            raise common.ConfigError(f"{prefix}algo={self.algo!r}: must be one of ppo, {', '.join(GROUP_MODES)}")
        if self.algo in GROUP_MODES and self.group_size < 2:
            raise common.ConfigError(f"{prefix}group_size={self.group_size}: algo={self.algo} needs groups of 2 or "
                                     "more samples (a group of one has advantage 0: nothing to learn)")
        if not prefix and not self.model:
            raise common.ConfigError("ppo needs --model (the SFT policy directory)")
        if self.is_correction != "none" and self.behaviour_logprobs != "recompute":
            raise common.ConfigError(f"{prefix}is_correction={self.is_correction}: needs behaviour_logprobs="
                                     "recompute (its weights compare the policy's recomputed log-probs with the "
                                     "behaviour ones)")
        if self.loss_type not in POLICY_LOSS_TYPES:
            raise common.ConfigError(f"{prefix}loss_type={self.loss_type!r}: must be one of "
                                     + ", ".join(POLICY_LOSS_TYPES))
        if self.ratio_level not in RATIO_LEVELS:
            raise common.ConfigError(f"{prefix}ratio_level={self.ratio_level!r}: must be one of "
                                     + ", ".join(RATIO_LEVELS))
        try:  # the objective's own cross-field rules (cispo needs clip_high, dual_clip is ppo's, vespo is per token)
            _policy_variant(self.loss_type, self.ratio_level, self.clip_high, self.dual_clip, (1.0, 1.05),
                            (2.0, 3.0), (3.0, 2.0))
        except ValueError as e:
            raise common.ConfigError(f"{prefix}loss_type={self.loss_type!r}: {e}") from None
        if self.generate_cache not in CACHE_MODES:
            raise common.ConfigError(f"{prefix}generate_cache={self.generate_cache!r}: must be one of "
                                     + ", ".join(CACHE_MODES))
        samples = self.group_size if self.algo in GROUP_MODES else 1
        if self.generate_batch_size < 0 or self.generate_batch_size % samples:
            raise common.ConfigError(f"{prefix}generate_batch_size={self.generate_batch_size}: must be 0 (all rows) "
                                     f"or a positive multiple of the {samples} sample(s) per prompt")
        if self.icepop_low >= self.icepop_high:
            raise common.ConfigError(f"{prefix}icepop_low={self.icepop_low}: must be below icepop_high="
                                     f"{self.icepop_high}")
        if self.rollouts and self.data:
            raise common.ConfigError(f"{prefix}rollouts={self.rollouts!r}: trains on the rollouts' own prompts; "
                                     "drop --data")
        if self.ptx_coef > 0 and self.data and not self.ptx_data:
            raise common.ConfigError(f"{prefix}ptx_coef={self.ptx_coef}: with your own --data PPO-ptx needs "
                                     "ptx_data= (SFT-format JSONL)")
        super().validate(prefix)


def values_of(critic: ScalarHeadModel, batch: TokenBatch) -> torch.Tensor:
    """V(state before each target token) at its predicting position: float32 [N], 0 off the targets."""
    return critic(batch) * batch.mask


def ppo_loss_and_lm_loss(model, batch: TokenBatch, weights: torch.Tensor, ptx: TokenBatch, ptx_weights: torch.Tensor,
                         **objective):
    """PPO-ptx in one call of the model (one DDP/FSDP forward): the PPO objective of the minibatch
    (``sequence_ppo_loss`` with ``objective``) and the causal-LM loss of the SFT rows ``ptx``."""
    return (sequence_ppo_loss(model, batch, weights, **objective),
            sequence_cross_entropy(model, ptx, weights=ptx_weights))


def explained_variance(values, returns, mask) -> float:
    """1 - Var(R - V) / Var(R) over the response tokens (of every rank under torchrun)."""
    return distributed.explained_variance(values, returns, mask)


class PPOTrainer(common.Trainer):
    name = "ppo"

    def setup(self) -> None:
        cfg = self.cfg
        self.save_every = cfg.save_every
        device = self.device
        trainable = (lambda m: m) if cfg.dropout else disable_dropout
        self.tokenizer = load_tokenizer(cfg.model)
        self.policy = distributed.wrap(trainable(load_causal_lm(cfg.model, device)), fsdp=cfg.fsdp)
        frozen = {"trainable": False, "shard_frozen": cfg.shard_frozen}
        self.ref = distributed.wrap(load_causal_lm(cfg.model, device).eval().requires_grad_(False), **frozen)
        self.rewards = Rewards(cfg, device, lambda m: distributed.wrap(m, **frozen))
        self.group = cfg.algo in GROUP_MODES
        critic = cfg.critic or (cfg.reward_models[0] if cfg.reward_models else cfg.model)
        self.critic = None if self.group else distributed.wrap(
            trainable(ScalarHeadModel.from_pretrained(critic, device)), fsdp=cfg.fsdp)
        self.opt = common.adamw(self.policy.parameters(), cfg.lr)
        self.critic_opt = None if self.group else common.adamw(self.critic.parameters(), cfg.critic_lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda it: 1.0 - it / cfg.iterations)
        self.samples = cfg.group_size if self.group else 1  # sequences per prompt
        if cfg.rollouts:
            self.rows = load_rollouts(cfg.rollouts)
            self.check_rollout_fields()
            common.check_rows(len(self.rows) // self.samples, cfg.batch_size, "rollout prompts")
        else:
            self.rows = read_jsonl(cfg.data, "ppo") if cfg.data else task.prompts(20_000, cfg.seed)
            common.check_rows(len(self.rows), cfg.batch_size, "prompts")
        self.ptx_rows = None
        if cfg.ptx_coef > 0:
            self.ptx_rows = read_jsonl(cfg.ptx_data, "sft") if cfg.ptx_data else task.sft_examples(4000, cfg.seed)
        self.kl_coef = cfg.kl_coef
        self.initial_true_score = None

    def check_rollout_fields(self) -> None:
        cfg, row = self.cfg, self.rows[0]
        missing = []
        if cfg.logprob_support == "kept" and "kept_threshold" not in row:
            missing.append("kept_threshold")
        if cfg.behaviour_logprobs == "sampler" and self.old_logp_field not in row:
            missing.append(self.old_logp_field)
        if cfg.is_correction != "none" and not ({"kept_logprobs", "logprobs"} & set(row)):
            missing.append("kept_logprobs or logprobs")
        if missing:
            raise DataError(f"{cfg.rollouts}: logprob_support={cfg.logprob_support}, behaviour_logprobs="
                            f"{cfg.behaviour_logprobs}, is_correction={cfg.is_correction} need the per-token "
                            f"field(s) {', '.join(missing)} (docs/rollouts.md)")

    @property
    def old_logp_field(self) -> str:
        """The rollouts' field of the ratio's old log-probs (behaviour_logprobs=sampler)."""
        return "kept_logprobs" if self.cfg.logprob_support == "kept" else "logprobs"

    def total_steps(self) -> int:
        return self.cfg.iterations

    # ------------------------------------------------------------------------------------------------ checkpoints
    def checkpointed(self) -> tuple[dict, dict]:
        models, optimizers = {"policy": self.policy}, {"optimizer": (self.policy, self.opt)}
        if not self.group:
            models["critic"], optimizers["critic_optimizer"] = self.critic, (self.critic, self.critic_opt)
        return models, optimizers

    def extra_state(self) -> dict:
        return {"scheduler": self.sched.state_dict(), "kl_coef": self.kl_coef,
                "initial_true_score": self.initial_true_score}

    def restore(self, state: dict) -> None:
        self.sched.load_state_dict(state["scheduler"])
        self.kl_coef, self.initial_true_score = state["kl_coef"], state["initial_true_score"]

    # ------------------------------------------------------------------------------------------------ phases
    def global_prompts(self, iteration: int) -> list[dict]:
        """The iteration's prompts over all ranks: the data position is the iteration number (epochs reshuffle by
        seed). Rollouts: the next ``batch_size x samples`` rows per rank, in file order (groups stay whole), the
        file read again from its start once used up."""
        n, size = len(self.rows), self.cfg.batch_size * distributed.world_size()
        if self.cfg.rollouts:
            size *= self.samples
            block = iteration % max(1, n // size)
            return self.rows[block * size:(block + 1) * size]
        return [self.rows[j] for j in common.global_batch_indices(n, iteration, max(1, n // size), size, self.cfg.seed)]

    def prompts(self, iteration: int) -> list[dict]:
        """This rank's block of the iteration's prompts."""
        return distributed.shard(self.global_prompts(iteration))

    @torch.no_grad()
    def rollout(self, rows: list[dict]) -> tuple[TokenBatch, list[dict], Optional[list[str]]]:
        """The rollout of ``rows`` (prompts to sample, or with ``rollouts=`` the file's rollouts) -> (the packed batch
        with ``old_logp`` (the sampler's log-probs over the full softmax, or with ``logprob_support=kept`` over the
        kept set, then with its ``kept_threshold``) and ``behaviour_logp`` (those of the distribution sampled from:
        the kept set's), the data row of each sequence, the decoded responses or None when nothing reads them)."""
        cfg, tok = self.cfg, self.tokenizer
        kept = cfg.logprob_support == "kept"
        needs_text = bool(self.rewards.fns) or not (cfg.data or cfg.rollouts)  # reward functions, the true score
        if cfg.rollouts:  # behaviour: the distribution sampled from, the kept set's when the file has it
            has = lambda key: key if key in rows[0] else None  # noqa: E731
            batch = rollout_batch(rows, self.device, old_logp=has(self.old_logp_field),
                                  behaviour_logp=has("kept_logprobs") or has("logprobs"),
                                  kept_threshold="kept_threshold" if kept else None)
            texts = [tok.decode(r["response_ids"], skip_special_tokens=True) for r in rows] if needs_text else None
            rows = [r if "prompt" in r or "messages" in r else {"prompt": tok.decode(r["prompt_ids"]), **r}
                    for r in rows] if needs_text else rows
            return batch, rows, texts
        prompts = prompt_batch(tok, rows, cfg.max_prompt_len)
        ids, mask = prompts["input_ids"].to(self.device), prompts["attention_mask"].to(self.device)
        self.policy.eval()
        head = float32_head if cfg.head_dtype == "float32" else contextlib.nullcontext
        with common.autocast(self.device), head(self.policy.module):  # each prompt prefilled once
            out = self.policy.local(generate, ids, mask, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                    generator=self.generator, num_samples=self.samples, cache=cfg.generate_cache,
                                    batch_size=cfg.generate_batch_size or None)
        self.policy.train()
        prompt_mask = mask.repeat_interleave(self.samples, 0)
        batch = TokenBatch.from_generation(out.sequences, prompt_mask, out.response_mask,
                                           old_logp=out.filtered_logprobs if kept else out.logprobs,
                                           behaviour_logp=out.filtered_logprobs,  # what the sampler drew from
                                           kept_threshold=out.kept_threshold if kept else None)
        texts = None  # decoded (a host copy of every sequence) only when something reads them
        if needs_text:
            texts = common.decode_responses(tok, out.sequences, out.response_mask, mask.shape[1])
        return batch, [r for r in rows for _ in range(self.samples)], texts

    @torch.no_grad()
    def score(self, batch: TokenBatch, rows: list[dict], completions: Optional[list[str]]) -> tuple[TokenBatch, dict]:
        """The rollout (``rows``: one per sequence, ``completions``: the decoded responses) with old log-probs,
        correction weights, reference log-probs, scores, values, advantages and returns filled in."""
        cfg = self.cfg
        mask = batch.mask
        n_tok = float(mask.sum())
        stats = {}
        if self.group:
            batch.group_ids = torch.arange(batch.num_seqs, device=self.device) // cfg.group_size
        with common.autocast(self.device):
            if cfg.behaviour_logprobs == "recompute":
                self.policy.eval()
                batch.old_logp = self.policy(sequence_logprobs, batch, temperature=cfg.temperature,
                                             kept_threshold=batch.kept_threshold, head_dtype=cfg.head_dtype).float()
                self.policy.train()
            batch.ref_logp = self.ref(sequence_logprobs, batch, temperature=cfg.temperature,
                                      head_dtype=cfg.head_dtype).float()
            score, per_source = self.rewards(batch, rows, completions)
            if not self.group:
                self.critic.eval()
                batch.values = self.critic(values_of, batch).float()
                self.critic.train()
        batch.scores = score
        if cfg.is_correction != "none":
            batch.is_weights, is_stats = rollout_correction(
                batch.old_logp, batch.behaviour_logp, mask, mode=cfg.is_correction, cap=cfg.is_cap,
                low=cfg.icepop_low, high=cfg.icepop_high, seq_ids=batch.seq_ids)
            stats.update(distributed.global_means({k: v.item() * n_tok for k, v in is_stats.items()}, n_tok))
        kl = kl_penalty(batch.old_logp, batch.ref_logp, kind=cfg.kl_kind) * mask  # [N]
        if self.group:
            batch.advantages = group_advantages(score, batch.group_ids, mode=cfg.algo)[batch.seq_ids] * mask
            batch.returns = torch.zeros_like(batch.advantages)
        else:
            rewards = -self.kl_coef * kl
            rewards[batch.last_index - 1] += score  # the position predicting each sequence's last token
            adv, returns = gae(batch.padded(rewards), batch.padded(batch.values), batch.padded(mask), gamma=cfg.gamma,
                               lam=cfg.lam)  # one row per sequence
            adv, batch.returns = batch.unpadded(adv), batch.unpadded(returns)
            if cfg.whiten_advantages:  # statistics of the global batch
                adv = distributed.masked_whiten(adv, mask) * mask
            batch.advantages = adv
        stats.update(distributed.global_means(
            {"reward": score.sum().item(), "kl": kl.sum().item(), "response_len": n_tok,
             **{k: v.sum().item() for k, v in per_source.items()}}, batch.num_seqs))
        return batch, stats

    def ptx_minibatch(self, index: int) -> tuple[TokenBatch, torch.Tensor]:
        """This rank's share of the ``index``-th PPO-ptx batch of SFT rows (a pure function of the index and seed) and
        its token-mean weights over the global batch."""
        cfg = self.cfg
        n, size = len(self.ptx_rows), (cfg.ptx_batch_size or cfg.minibatch_size) * distributed.world_size()
        rows = [self.ptx_rows[j] for j in common.global_batch_indices(n, index, max(1, n // size), size, cfg.seed + 1)]
        ptx = sft_batch(self.tokenizer, distributed.shard(rows), cfg.max_prompt_len + cfg.max_new_tokens)
        ptx = ptx.to(self.device)
        return ptx, distributed.global_weights(ptx.mask, "token-mean")

    def learn(self, batch: TokenBatch) -> dict:
        cfg = self.cfg
        S = batch.num_seqs
        # the padded length of seq-mean-token-sum-norm: the longest response of the global batch; dr-grpo's
        # constant: the longest a response may be
        longest = distributed.reduce_floats({"n": int(batch.padded(batch.mask.long()).sum(1).max())}, "max")["n"]
        max_len = cfg.max_new_tokens if cfg.loss_agg == "dr-grpo" else int(longest)
        names = ["policy_loss", "clip_frac", "approx_kl", "ratio_mean", "entropy", "value_loss", "value_clip_frac",
                 "ptx_loss"]
        minibatches = cfg.epochs * -(-S // cfg.minibatch_size)
        sums = torch.zeros(len(names), dtype=torch.float64, device=self.device)  # no host sync until the end
        mismatch = {}
        tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(S, generator=self.generator, device=self.generator.device).to(self.device)
            for start in range(0, S, cfg.minibatch_size):
                mb = batch.select(order[start:start + cfg.minibatch_size])
                w = distributed.global_weights(mb.mask, cfg.loss_agg, seq_ids=mb.seq_ids, max_len=max_len)
                w_policy = w if mb.is_weights is None else w * mb.is_weights  # rollout correction: per-token weights
                kl_in_loss = self.group and self.kl_coef > 0  # GRPO: KL to the reference in the loss
                objective = dict(temperature=cfg.temperature, kept_threshold=mb.kept_threshold,
                                 head_dtype=cfg.head_dtype, ref_logp=mb.ref_logp if kl_in_loss else None,
                                 kl_coef=self.kl_coef if kl_in_loss else 0.0, kl_kind=cfg.kl_kind,
                                 entropy_coef=cfg.entropy_coef, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                 dual_clip=cfg.dual_clip, loss_type=cfg.loss_type, ratio_level=cfg.ratio_level)
                with common.autocast(self.device):
                    if self.ptx_rows is None:
                        loss, st, logp = self.policy(sequence_ppo_loss, mb, w_policy, **objective)
                        ptx_loss = torch.zeros((), device=self.device)
                    else:
                        ptx, ptx_w = self.ptx_minibatch(self.step * minibatches + steps)
                        (loss, st, logp), ptx_loss = self.policy(ppo_loss_and_lm_loss, mb, w_policy, ptx, ptx_w,
                                                                 **objective)
                if steps == 0 and mb.behaviour_logp is not None:  # before any update: behaviour vs trainer
                    mismatch = mismatch_metrics(logp, mb.behaviour_logp, mb.mask)
                common.optimizer_step(loss + cfg.ptx_coef * ptx_loss, self.policy, self.opt, cfg.grad_clip)
                n_tok = (w_policy != 0).sum().double()
                row = [loss.detach() / distributed.world_size(), st["clip_frac"] * n_tok,
                       st["approx_kl"] * n_tok, st["ratio_mean"] * n_tok, st["entropy"] * n_tok]
                if not self.group:
                    with common.autocast(self.device):
                        v = self.critic(values_of, mb)
                        vloss, vst = ppo_value_loss(v, mb.values, mb.returns, w, clip=cfg.value_clip)
                    common.optimizer_step(vloss, self.critic, self.critic_opt, cfg.grad_clip)
                    row += [vloss.detach() / distributed.world_size(), vst["clip_frac"] * n_tok]
                else:
                    row += [torch.zeros((), device=self.device)] * 2
                row.append(ptx_loss.detach() / distributed.world_size())
                sums += torch.stack([r.double() for r in row])
                tokens += n_tok
                steps += 1
        self.sched.step()
        total = distributed.reduce_floats({**dict(zip(names, sums.tolist())), "tokens": float(tokens)})
        out = {}
        for k in names:
            # global values: summed over ranks, mean over steps
            per_step = k in ("policy_loss", "value_loss", "ptx_loss")
            out[k] = total[k] / steps if per_step else total[k] / max(total["tokens"], 1.0)
        out.update(distributed.global_means({k: v.item() for k, v in mismatch.items()}, 1.0))
        if self.group:
            del out["value_loss"], out["value_clip_frac"]
        if self.ptx_rows is None:
            del out["ptx_loss"]
        else:
            out["explained_variance"] = explained_variance(batch.values, batch.returns, batch.mask)
        return out

    def update_kl_coef(self, kl: float, n: int) -> None:
        """Adaptive KL controller of Ziegler et al. (2019)."""
        if self.cfg.adaptive_kl:
            error = max(-0.2, min(0.2, kl / self.cfg.kl_target - 1.0))
            self.kl_coef *= 1.0 + error * n / self.cfg.kl_horizon

    def true_score(self) -> Optional[float]:
        if self.cfg.data or self.cfg.rollouts or not self.cfg.eval_prompts:
            return None
        return self.policy.local(common.sample_true_score, self.tokenizer,
                                 task.prompts(self.cfg.eval_prompts, seed=10_000 + self.cfg.seed),
                                 seed=self.cfg.seed, max_new_tokens=self.cfg.max_new_tokens,
                                 temperature=self.cfg.temperature)

    # ------------------------------------------------------------------------------------------------ loop
    def train_step(self) -> dict:
        cfg = self.cfg
        if self.step == 0 and self.initial_true_score is None:
            self.initial_true_score = self.true_score()
        t0 = time.perf_counter()
        batch, rows, texts = self.rollout(self.prompts(self.step))  # rows: one per sequence
        t1 = time.perf_counter()
        batch, stats = self.score(batch, rows, texts)
        t2 = time.perf_counter()
        stats.update(self.learn(batch))
        t3 = time.perf_counter()
        if not (cfg.data or cfg.rollouts):
            stats.update(distributed.global_means(
                {"true_score": sum(task.true_score(r["prompt"], t) for r, t in zip(rows, texts))}, len(texts)))
        self.update_kl_coef(stats["kl"], batch.num_seqs * distributed.world_size())
        if cfg.eval_every and (self.step + 1) % cfg.eval_every == 0 and self.step + 1 < cfg.iterations:
            stats["eval_true_score"] = self.true_score()
        stats.update(kl_coef=self.kl_coef, lr=self.sched.get_last_lr()[0])
        stats.update(distributed.reduce_floats(  # the slowest rank sets the pace
            {"time_generate": t1 - t0, "time_score": t2 - t1, "time_learn": t3 - t2}, "max"))
        return {k: v for k, v in stats.items() if v is not None}

    def postfix(self, row: dict) -> dict:
        keys = ("reward", "kl", "true_score")
        return {k: f"{row[k]:.2f}" for k in keys if k in row}

    def finish(self) -> dict:
        cfg = self.cfg
        final = self.true_score()
        self.policy.save_pretrained(os.path.join(cfg.out, "model"), self.tokenizer)
        if not self.group:
            self.critic.save_pretrained(os.path.join(cfg.out, "critic"), self.tokenizer)
        return {"iterations": cfg.iterations, "true_score_before": self.initial_true_score,
                "true_score_after": final, "final": self.metrics.rows[-1] if self.metrics.rows else {}}


def train_ppo(cfg: PPOConfig, resume: bool = False) -> dict:
    with common.run_context(cfg):
        return PPOTrainer(cfg, resume).train()
