"""Orchestration tests: model/tokenizer loading, data errors, SFT / RM / PPO / GRPO steps on packed batches against
padded references, on-policy ratios of exactly 1 (eval-mode, same positions) on Llama, Qwen2 and GPT-2, a shortened
SFT -> RM -> PPO pipeline that must raise the true score, backend agreement, atomic checkpoints and resume after
SIGKILL."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from _testing import kill_after_checkpoint, tiny_policy_and_rm

import rlhf_fast

from rlhf_fast.batch import TokenBatch
from rlhf_fast.data import DataError, pair_batch, read_jsonl, sft_batch, warn_truncation
from rlhf_fast.data.embedded import build_tokenizer, save_tiny_default
from rlhf_fast.models import ScalarHeadModel, load_causal_lm, load_tokenizer, sequence_logprobs, sequence_ppo_loss
from rlhf_fast.ops.ppo_loss import ppo_loss_from_logits_ref
from rlhf_fast.train import checkpoint, common
from rlhf_fast.train.pipeline import PipelineConfig, run_pipeline
from rlhf_fast.train.ppo import PPOConfig, PPOTrainer
from rlhf_fast.train.rm import bradley_terry
from rlhf_fast.train.sft import sft_loss

torch.set_num_threads(1)

# A shortened pipeline, trained once per session and reused by the GRPO / resume / backend tests, yet PPO must clearly
# beat SFT (seed 0; margin checked below). The RM keeps its default data and epochs: with 2000 pairs PPO gained nothing
# in 15 iterations (the RM is the weak link; the SFT policy is already near its mediocre demonstrator).
SHORT = ["sft.num_examples=3000", "sft.epochs=2", "rm.eval_every=1000", "ppo.iterations=20", "ppo.eval_prompts=192",
         "progress=false"]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipeline"))
    cfg = common.load_config(PipelineConfig, None, SHORT + [f"out={out}"])
    return out, run_pipeline(cfg)


def test_tiny_model_and_tokenizer_round_trip(tmp_path):
    path = save_tiny_default(str(tmp_path / "tiny"), seed=1)
    tok = load_tokenizer(path)
    ids = tok("+3 7 = 7 0 3", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "+3 7 = 7 0 3"
    assert len(ids) == 6 and tok.unk_token_id not in ids
    assert tok("+3 7 =")["input_ids"] == [tok.bos_token_id] + ids[:3]  # BOS the standard way, as the trainers encode
    assert tok.vocab == build_tokenizer().vocab
    model = load_causal_lm(path)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 5_000_000
    x = torch.tensor([ids])
    again = load_causal_lm(path)
    torch.testing.assert_close(model(input_ids=x).logits, again(input_ids=x).logits, rtol=0, atol=0)

    rm = ScalarHeadModel.from_pretrained(path)
    torch.nn.init.normal_(rm.head.weight)
    rm.save_pretrained(str(tmp_path / "rm"))
    rm2 = ScalarHeadModel.from_pretrained(str(tmp_path / "rm"))
    batch = TokenBatch.pack([ids, ids[:4]], [2, 2])
    torch.testing.assert_close(rm.score(batch), rm2.score(batch), rtol=0, atol=0)


def test_embedded_default_save_is_atomic(tmp_path, monkeypatch):
    """A kill while the base model is written leaves no directory that later runs would take as complete."""
    path = str(tmp_path / "base")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers.PreTrainedTokenizerFast.save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        save_tiny_default(path)
    monkeypatch.undo()
    assert not os.path.exists(path)
    save_tiny_default(path)
    load_causal_lm(path), load_tokenizer(path)


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": 3}\n')
    with pytest.raises(DataError, match=rf"{path}:3: expected a SFT row"):
        read_jsonl(str(path), "sft")
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        read_jsonl(str(path), "rm")
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    assert read_jsonl(str(path), "sft")[0]["messages"][1]["content"] == "yo"
    with pytest.raises(DataError, match=":1: expected a RM row"):
        read_jsonl(str(path), "rm")


def padded_logp(model, batch: TokenBatch) -> torch.Tensor:
    """The padded reference: right-padded [S, L] rows through the model's own forward with an attention mask
    -> log-prob of each label, packed back to [N]."""
    ids = batch.padded(batch.input_ids)
    attn = batch.padded(torch.ones_like(batch.input_ids))
    logp_all = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
    labels = batch.padded(batch.labels, -100)
    logp = logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return batch.unpadded(torch.where(labels != -100, logp, 0.0))


def grads_of(model, loss) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_sft_batch_packed_equals_padded_and_one_step_lowers_loss(tmp_path):
    path = save_tiny_default(str(tmp_path / "tiny"))
    tok, model = load_tokenizer(path), load_causal_lm(path)
    rows = [{"prompt": "+1 2 =", "completion": "2 3 4"}, {"prompt": "+4 9 =", "completion": "9 3"}]
    batch = sft_batch(tok, rows, 64)
    target = tok("2 3 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert batch.input_ids[:8].tolist() == tok("+1 2 =")["input_ids"] + target
    assert batch.labels[:8].tolist() == [-100] * 3 + target + [-100] and batch.cu_seqlens.tolist() == [0, 8, 15]
    loss = sft_loss(model, batch)
    ref = -padded_logp(model, batch).sum() / batch.mask.sum()  # the token-mean cross-entropy of the responses
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads_of(model, sft_loss(model, batch)), grads_of(model, ref)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.zero_grad()
    sft_loss(model, batch).backward()
    opt.step()
    assert sft_loss(model, batch).item() < loss.item() - 0.05


def test_long_prompts_are_cut_from_the_left():
    tok = build_tokenizer()
    rows = [{"prompt": "+1 2 = 3 4 5 6 7", "completion": "2 3 4"}]
    batch = sft_batch(tok, rows, 6)
    assert batch.num_tokens == 6 and batch.mask.sum() == 4  # the 3 digits + EOS stay targets
    assert batch.input_ids[:2].tolist() == tok("6 7", add_special_tokens=False)["input_ids"]
    # the trainers warn once with the counts: here the prompt is cut (BOS + 8 words + 4 response tokens > 6)
    rows += [{"prompt": "+1 2 =", "completion": "2"}, {"prompt": "+1 2 =", "completion": "2 3 4 5 6 7"}]
    with pytest.warns(UserWarning, match=r"2 of 3 rows are longer than max_len=6 tokens: their prompts lose tokens "
                                         r"from the left, and 1 responses are cut at the end"):
        assert warn_truncation(tok, rows, 6) == 2
    pairs = [{"prompt": "+1 2 =", "chosen": "2", "rejected": "2 3 4 5"}]
    with pytest.warns(UserWarning, match="1 of 1 rows"):
        assert warn_truncation(tok, pairs, 6, ("chosen", "rejected")) == 1
    # words the tokenizer does not know: both responses become the same unknown tokens
    pairs += [{"prompt": "+1 2 =", "chosen": "good great", "rejected": "bad awful"}]
    with pytest.warns(UserWarning, match=r"1 of 2 pairs have chosen and rejected responses that tokenize to the "
                                         r"same tokens \(the unknown-word token is '<unk>'\)"):
        warn_truncation(tok, pairs, 16, ("chosen", "rejected"))


def test_bradley_terry_loss_and_accuracy():
    class Fixed(torch.nn.Module):
        def score(self, batch):
            return torch.tensor([2.0, 0.0, 1.0, 1.0])  # chosen (2, 0), rejected (1, 1)

    loss, correct = bradley_terry(Fixed(), None, torch.full((2,), 0.5))
    expected = (torch.log1p(torch.exp(torch.tensor(-1.0))) + torch.log1p(torch.exp(torch.tensor(1.0)))) / 2
    torch.testing.assert_close(loss, expected)
    assert correct.tolist() == [1.0, 0.0]


def test_rm_packed_equals_padded(tmp_path):
    path = save_tiny_default(str(tmp_path / "tiny"), hidden_size=64, num_heads=2, intermediate_size=128)
    tok, rm = load_tokenizer(path), ScalarHeadModel.from_pretrained(path)
    torch.nn.init.normal_(rm.head.weight)
    rows = [{"prompt": "+1 2 =", "chosen": "2 3 4", "rejected": "2 5"},
            {"prompt": "+4 9 =", "chosen": "9 3 7 1", "rejected": "1"}]
    batch = pair_batch(tok, rows, 64)
    assert batch.num_seqs == 4
    w = torch.full((2,), 0.5)
    loss, correct = bradley_terry(rm, batch, w)
    ids, attn = batch.padded(batch.input_ids), batch.padded(torch.ones_like(batch.input_ids))
    values = rm.head(rm.body(input_ids=ids, attention_mask=attn).last_hidden_state).squeeze(-1)
    r = values.gather(1, (batch.seq_lens - 1)[:, None]).squeeze(1)
    ref = -torch.nn.functional.logsigmoid(r[:2] - r[2:]).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert correct.tolist() == (r[:2] > r[2:]).float().tolist()
    for g, g_ref in zip(grads_of(rm, bradley_terry(rm, batch, w)[0]), grads_of(rm, ref)):  # fp32 summation order
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))


def test_rm_learns_and_saves_score_statistics(pipeline):
    out, summary = pipeline
    rows = common.read_metrics(os.path.join(out, "rm", "metrics.jsonl"))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert summary["rm"]["heldout_pairs"] == 400 and 0.0 <= summary["rm"]["heldout_accuracy"] <= 1.0
    info = json.load(open(os.path.join(out, "rm", "model", "scalar_head.json")))
    assert info["score_std"] > 0
    ScalarHeadModel.from_pretrained(os.path.join(out, "rm", "model"))


def test_pipeline_improves_true_score(pipeline):
    out, summary = pipeline
    sft, rm, ppo = summary["sft"], summary["rm"], summary["ppo"]
    assert sft["true_score"] > 0.5          # SFT learned the task from the mediocre demonstrator
    assert rm["heldout_accuracy"] > 0.6      # the RM picked up the rule from noisy preferences
    assert ppo["true_score_before"] == pytest.approx(sft["true_score"], abs=0.05)
    assert ppo["true_score_after"] > ppo["true_score_before"] + 0.05
    assert os.path.getsize(summary["plot"]) > 10_000
    for stage in ("sft", "rm", "ppo"):
        assert os.listdir(os.path.join(out, stage, "tb"))
        load_causal_lm(os.path.join(out, stage, "model")) if stage != "rm" else None


def _one_iteration(out, backend):
    cfg = PPOConfig(model=os.path.join(out, "sft", "model"), reward_models=[os.path.join(out, "rm", "model")],
                    out=os.path.join(out, f"ppo_{backend}"), iterations=1, batch_size=32, eval_prompts=0,
                    progress=False, backend=backend)
    with rlhf_fast.use_backend(backend):
        trainer = PPOTrainer(cfg)
        batch, stats = trainer.score(*trainer.rollout(trainer.prompts(0)))
        stats.update(trainer.learn(batch))
    return batch, stats, trainer.policy


def test_torch_backend_agrees_with_fused_ops(pipeline):
    out, _ = pipeline
    fast = rlhf_fast._backend.select("logprobs", rlhf_fast.ops.token_logprobs.LOGPROBS_BACKENDS,
                                     torch.device("cpu"))
    if fast == "torch":
        pytest.skip("the compiled CPU extension is not built: nothing to compare the torch backend with")
    b_t, st_t, pol_t = _one_iteration(out, "torch")
    b_f, st_f, pol_f = _one_iteration(out, fast)
    assert torch.equal(b_t.input_ids, b_f.input_ids)  # same sampler stream
    for name in ("old_logp", "ref_logp", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(b_f, name), getattr(b_t, name), rtol=1e-4, atol=1e-4)
    for k in ("reward", "kl", "policy_loss", "entropy", "value_loss"):
        assert st_f[k] == pytest.approx(st_t[k], rel=1e-3, abs=1e-4), k
    for p_f, p_t in zip(pol_f.parameters(), pol_t.parameters()):
        torch.testing.assert_close(p_f, p_t, rtol=1e-3, atol=1e-4)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, {"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path) == {"step": 1}  # the finished checkpoint survives a crash mid-write
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and the partial temporary file is gone


def test_torn_metrics_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert common.read_metrics(str(path)) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        common.read_metrics(str(path))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_first_on_policy_minibatch_has_ratio_one(tmp_path, kind):
    """Eval-mode log-probs at the sampler's positions: one fully on-policy minibatch has approx_kl ~ 0 and no
    clipping, on models with dropout and with absolute positions (GPT-2)."""
    policy, rm = tiny_policy_and_rm(str(tmp_path), kind)
    cfg = PPOConfig(model=policy, reward_models=[rm], out=str(tmp_path / "ppo"), iterations=1, epochs=1,
                    batch_size=64, minibatch_size=64, max_new_tokens=8, max_prompt_len=32, eval_prompts=0,
                    progress=False)
    trainer = PPOTrainer(cfg)
    stats = trainer.learn(trainer.score(*trainer.rollout(trainer.prompts(0)))[0])
    assert stats["approx_kl"] < 1e-6 and stats["clip_frac"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("loss_type, ratio_level, clip_high", [("sapo", "sequence", None), ("cispo", "token", 1.1)])
def test_ppo_loss_types_route_to_the_fused_objective(tmp_path, loss_type, ratio_level, clip_high):
    """PPOConfig's loss_type / ratio_level reach learn's objective: sequence_ppo_loss equals ppo_objective on
    sequence_logprobs with the batch's sequences."""
    policy, rm = tiny_policy_and_rm(str(tmp_path), "llama")
    cfg = PPOConfig(model=policy, reward_models=[rm], out=str(tmp_path / "ppo"), iterations=1, epochs=1,
                    batch_size=4, minibatch_size=4, max_new_tokens=6, max_prompt_len=16, eval_prompts=0,
                    progress=False, loss_type=loss_type, ratio_level=ratio_level, clip_high=clip_high)
    trainer = PPOTrainer(cfg)
    batch, _ = trainer.score(*trainer.rollout(trainer.prompts(0)))
    batch.advantages = torch.randn(batch.num_tokens, generator=torch.Generator().manual_seed(0)) * batch.mask
    batch.old_logp = batch.old_logp + 0.3 * batch.advantages.sin() * batch.mask
    w = rlhf_fast.loss_weights(batch.mask, "token-mean")
    model = trainer.policy.module
    kw = dict(loss_type=loss_type, ratio_level=ratio_level, clip_high=clip_high)
    loss, stats, _ = sequence_ppo_loss(model, batch, w, **kw)
    logp = sequence_logprobs(model, batch)
    expected, expected_stats = rlhf_fast.ppo_objective(logp, batch.old_logp, batch.advantages, w,
                                                       seq_ids=batch.seq_ids, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["ratio_mean"], expected_stats["ratio_mean"], rtol=1e-5, atol=1e-6)
    assert math.isfinite(trainer.learn(batch)["policy_loss"])


@pytest.mark.parametrize("kwargs, match", [(dict(loss_type="gspo"), "loss_type='gspo'"),
                                           (dict(ratio_level="group"), "ratio_level='group'"),
                                           (dict(loss_type="cispo"), "needs clip_high"),
                                           (dict(loss_type="vespo", ratio_level="sequence"), "must be 'token'"),
                                           (dict(loss_type="sapo", dual_clip=3.0), "dual_clip is for"),
                                           (dict(generate_cache="paged"), "generate_cache='paged'"),
                                           (dict(generate_batch_size=-8), "generate_batch_size=-8"),
                                           (dict(algo="grpo", group_size=4, generate_batch_size=6),
                                            "multiple of the 4 sample")])
def test_ppo_config_validation(kwargs, match):
    with pytest.raises(common.ConfigError, match=match):
        PPOConfig(model="x", **kwargs).validate("ppo.")


def response_rows(batch: TokenBatch, x: torch.Tensor) -> torch.Tensor:
    """The old padded layout: each sequence's target positions as one right-padded row [S, R]."""
    rows = [x[batch.cu_seqlens[s]:batch.cu_seqlens[s + 1]][batch.mask[batch.cu_seqlens[s]:batch.cu_seqlens[s + 1]]]
            for s in range(batch.num_seqs)]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_ppo_step_packed_equals_padded(pipeline, tmp_path, agg):
    """One minibatch's objective and gradients on the packed batch with loss weights equal the padded composite
    (the model's own logits on right-padded rows, the per-mode aggregation of the old [B, T] layout)."""
    out, _ = pipeline
    cfg = PPOConfig(model=os.path.join(out, "sft", "model"), reward_models=[os.path.join(out, "rm", "model")],
                    out=str(tmp_path / "ppo"), iterations=1, batch_size=8, eval_prompts=0, progress=False,
                    entropy_coef=0.01)
    trainer = PPOTrainer(cfg)
    batch, _ = trainer.score(*trainer.rollout(trainer.prompts(0)))
    batch.advantages = torch.randn(batch.num_tokens, generator=torch.Generator().manual_seed(0)) * batch.mask
    batch.old_logp = batch.old_logp + 0.3 * batch.advantages.sin() * batch.mask  # off-policy: some ratios clip
    policy = trainer.policy.module
    mb = batch.select([5, 0, 3, 6])
    R = int(response_rows(mb, mb.mask.long()).sum(1).max())
    w = rlhf_fast.loss_weights(mb.mask, agg, seq_ids=mb.seq_ids, max_len=R)

    def packed_loss():
        logp, ent = sequence_logprobs(policy, mb, return_entropy=True)
        return rlhf_fast.ppo_objective(logp, mb.old_logp, mb.advantages, w, entropy=ent, ref_logp=mb.ref_logp,
                                       kl_coef=0.1, kl_kind="k3", entropy_coef=0.01)[0]

    def padded_loss():
        ids, attn = mb.padded(mb.input_ids), mb.padded(torch.ones_like(mb.input_ids))
        logits = policy(input_ids=ids, attention_mask=attn).logits
        logits = response_rows(mb, mb.unpadded(logits))  # [S, R, V] at the target positions
        labels = torch.where(response_rows(mb, mb.mask.long()).bool(), response_rows(mb, mb.labels), -100)
        rows = lambda x: response_rows(mb, x)  # noqa: E731
        return ppo_loss_from_logits_ref(logits, labels, rows(mb.old_logp), rows(mb.advantages), labels != -100,
                                        ref_logp=rows(mb.ref_logp), kl_coef=0.1, kl_kind="k3", entropy_coef=0.01,
                                        agg=agg)[0]

    torch.testing.assert_close(packed_loss(), padded_loss().float(), rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads_of(policy, packed_loss()), grads_of(policy, padded_loss())):
        # fp32, relative to each tensor's scale: the padded and packed attention sum in other orders (measured: up
        # to 3.3e-5 of the scale, in a handful of elements)
        scale = g_ref.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(g / scale, g_ref / scale, rtol=0, atol=1e-4)


def test_grpo_group_advantages_without_critic(pipeline, tmp_path):
    out, _ = pipeline
    cfg = PPOConfig(model=os.path.join(out, "sft", "model"), reward_models=[os.path.join(out, "rm", "model")],
                    out=str(tmp_path / "grpo"), algo="grpo", iterations=2, batch_size=8, group_size=4,
                    minibatch_size=16, kl_kind="k3", eval_prompts=0, progress=False,
                    generate_batch_size=8)  # 2 prompts' groups decode at once, the others refill finished slots
    trainer = PPOTrainer(cfg)
    assert trainer.critic is None
    batch, _ = trainer.score(*trainer.rollout(trainer.prompts(0)))
    assert batch.num_seqs == 32 and batch.group_ids.tolist() == [g for g in range(8) for _ in range(4)]
    prompts = [batch.input_ids[c:c + p].tolist() for c, p in zip(batch.cu_seqlens.tolist(), batch.prompt_lens.tolist())]
    assert all(prompts[i] == prompts[i - i % 4] for i in range(32))  # G consecutive samples of each prompt
    # every response token of a sample carries its group-normalised score; nothing outside the response
    with torch.no_grad():
        raw = trainer.rewards.models[0].score(batch)
    mean, std = trainer.rewards.stats[0]
    s = ((raw - mean) / std).clamp(-cfg.reward_clip, cfg.reward_clip).view(8, 4)
    expected = ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(batch.advantages, expected[batch.seq_ids] * batch.mask, rtol=1e-4, atol=1e-4)
    assert batch.values is None and not batch.returns.any()

    summary = trainer.train()
    rows = common.read_metrics(str(tmp_path / "grpo" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and "value_loss" not in rows[0] and "approx_kl" in rows[0]
    assert summary["iterations"] == 2 and not os.path.exists(tmp_path / "grpo" / "critic")
    load_causal_lm(str(tmp_path / "grpo" / "model"))


def test_resume_after_sigkill_matches_uninterrupted_run(pipeline, tmp_path):
    out, _ = pipeline
    overrides = [f"reward_models={os.path.join(out, 'rm', 'model')}", "iterations=4", "batch_size=16",
                 "minibatch_size=8", "save_every=1", "eval_prompts=0", "progress=false", "threads=1"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    # all three runs as the CLI: an in-process run can differ in the last bits (this process's thread and library
    # state), and the comparison below is exact
    args = [sys.executable, "-m", "rlhf_fast.cli", "ppo", "--model", os.path.join(out, "sft", "model"), *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(args + ["--out", full], check=True, env=env, capture_output=True)

    kill_after_checkpoint(args, killed, 2, env)
    assert checkpoint.load_checkpoint(os.path.join(killed, "checkpoint.pt"))["step"] < 4
    subprocess.run(args + ["--out", killed, "--resume"], check=True, env=env, capture_output=True)

    a = common.read_metrics(os.path.join(full, "metrics.jsonl"))
    b = common.read_metrics(os.path.join(killed, "metrics.jsonl"))
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    assert len(a) == 4 and drop(a) == drop(b)


def test_cli_overrides_may_follow_the_flags(monkeypatch):
    """key=value overrides appended after --out (as one extends the README's lines) are taken, not refused."""
    from rlhf_fast import cli

    seen = []
    monkeypatch.setattr(cli, "_train", lambda args: seen.append((args.out, args.overrides)))
    cli.main(["ppo", "lr=1e-4", "--out", "runs/x", "iterations=3"])
    assert seen == [("runs/x", ["lr=1e-4", "iterations=3"])]
    with pytest.raises(SystemExit):
        cli.main(["ppo", "--out", "runs/x", "--no-such-flag"])
