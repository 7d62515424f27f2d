"""The PPO trainer and its rollouts agree (docs/rollouts.md): kept-set log-probs under top-k / top-p, recomputed
behaviour log-probs with importance-sampling corrections, and external rollout files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _testing import tiny_policy_and_rm

import rlhf_fast
from rlhf_fast import cli
from rlhf_fast.data import DataError, generation_rollouts, load_rollouts, prompt_batch, save_rollouts, task
from rlhf_fast.batch import TokenBatch
from rlhf_fast.models import decoder_hidden, float32_head, load_causal_lm, load_tokenizer, sequence_logprobs
from rlhf_fast.train import common
from rlhf_fast.train.ppo import PPOConfig, PPOTrainer

FILTERS = dict(temperature=1.0, top_k=6, top_p=0.8)  # the tiny vocabulary has 19 tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_policy_and_rm(str(tmp_path_factory.mktemp("models")), "llama")


def _config(models, tmp_path, **fields) -> PPOConfig:
    policy, rm = models
    base = dict(model=policy, reward_models=[rm], out=str(tmp_path / "ppo"), iterations=1, epochs=1, batch_size=32,
                minibatch_size=32, max_new_tokens=8, max_prompt_len=32, eval_prompts=0, progress=False, **FILTERS)
    return PPOConfig(**{**base, **fields})


def _first_step(cfg: PPOConfig) -> tuple:
    trainer = PPOTrainer(cfg)
    batch, score_stats = trainer.score(*trainer.rollout(trainer.prompts(0)))
    return trainer, batch, score_stats, trainer.learn(batch)


def test_kept_support_makes_the_first_ratio_one(models, tmp_path):
    """Sampling with top-k / top-p: full-softmax log-probs put the first on-policy ratio at the kept mass (< 1, the
    bias of TRL issue 7269); kept-set log-probs put it at 1."""
    _, _, _, full = _first_step(_config(models, tmp_path / "full"))
    _, batch, _, kept = _first_step(_config(models, tmp_path / "kept", logprob_support="kept"))
    assert full["mismatch_ratio_mean"] < 0.95 and full["mismatch_outside_frac"] > 0.2
    assert kept["mismatch_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and kept["mismatch_outside_frac"] == 0.0
    assert kept["mismatch_k3"] < 1e-8 and kept["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert kept["clip_frac"] == 0.0
    assert torch.isfinite(batch.kept_threshold[batch.mask]).any()  # some tokens were filtered


def test_recompute_with_correction_weighs_each_token(models, tmp_path):
    cfg = _config(models, tmp_path, logprob_support="kept", behaviour_logprobs="recompute", is_correction="tis",
                  is_cap=1.02)
    trainer = PPOTrainer(cfg)
    batch, rows, texts = trainer.rollout(trainer.prompts(0))
    noise = 0.05 * torch.randn(batch.num_tokens, generator=torch.Generator().manual_seed(0))
    behaviour = batch.behaviour_logp = batch.behaviour_logp + noise * batch.mask  # a mismatched engine
    scored, stats = trainer.score(batch, rows, texts)
    m = scored.mask
    with torch.no_grad():
        recomputed = sequence_logprobs(trainer.policy.module, scored, kept_threshold=scored.kept_threshold)
    torch.testing.assert_close(scored.old_logp, recomputed)
    expected = torch.where(m, (recomputed - behaviour).exp().clamp(max=1.02), 0.0)
    torch.testing.assert_close(scored.is_weights, expected)
    frac = ((recomputed - behaviour).exp() > 1.02)[m].float().mean().item()
    assert stats["is_truncated_frac"] == pytest.approx(frac, abs=1e-6) and 0 < frac < 1
    assert stats["is_masked_frac"] == 0.0


def _write_rollouts(models, path, n=32, noise=0.0, seed=0):
    policy, _ = models
    tok, model = load_tokenizer(policy), load_causal_lm(policy).eval()
    rows = task.prompts(n, seed)
    prompts = prompt_batch(tok, rows, 32)
    out = rlhf_fast.generate(model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=8,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             generator=torch.Generator().manual_seed(seed), **FILTERS)
    rollouts = generation_rollouts(out, prompts["attention_mask"], rows)
    gen = torch.Generator().manual_seed(seed + 1)
    for r in rollouts:  # a bf16 engine: log-prob errors of ~noise
        for key in ("logprobs", "kept_logprobs"):
            r[key] = [v + noise * torch.randn((), generator=gen).item() for v in r[key]]
    save_rollouts(str(path), rollouts)
    return rollouts


def test_external_rollouts_train_like_our_own(models, tmp_path):
    """Rollouts written by rlhf_fast.generate, read back by rollouts=: the same batch and, with kept support and a
    recomputation, importance weights of 1 and no mismatch; with perturbed log-probs the metrics see it."""
    path = tmp_path / "rollouts.jsonl"
    rows = _write_rollouts(models, path)
    assert load_rollouts(str(path)) == json.loads(json.dumps(rows))
    cfg = _config(models, tmp_path / "a", rollouts=str(path), logprob_support="kept", behaviour_logprobs="recompute",
                  is_correction="tis")
    trainer, batch, stats, learned = _first_step(cfg)
    assert batch.num_seqs == 32 and batch.input_ids[:len(rows[0]["prompt_ids"])].tolist() == rows[0]["prompt_ids"]
    assert stats["is_weight_mean"] == pytest.approx(1.0, abs=1e-4) and stats["is_truncated_frac"] == 0.0
    assert learned["mismatch_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert learned["mismatch_outside_frac"] == 0.0

    noisy = tmp_path / "noisy.jsonl"
    _write_rollouts(models, noisy, noise=0.1)
    cfg = _config(models, tmp_path / "b", rollouts=str(noisy), logprob_support="kept", behaviour_logprobs="recompute",
                  is_correction="icepop", icepop_low=0.9, icepop_high=1.1)
    _, _, stats, learned = _first_step(cfg)
    # k3 of a Gaussian log-prob error of std 0.1: E[exp(e) - e - 1] = exp(0.005) - 1 ~ 0.005
    assert 0.002 < learned["mismatch_k3"] < 0.01
    assert 0.2 < stats["is_masked_frac"] < 0.5  # P(|e| > ~0.1) for e ~ N(0, 0.1)


def test_rollouts_cli_and_parquet(models, tmp_path):
    pa = pytest.importorskip("pyarrow")  # a dependency of the test extra
    import pyarrow.parquet as pq

    rows = _write_rollouts(models, tmp_path / "r.jsonl", n=16)
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "r.parquet"))
    assert load_rollouts(str(tmp_path / "r.parquet")) == load_rollouts(str(tmp_path / "r.jsonl"))
    policy, rm = models
    out = tmp_path / "run"
    cli.main(["ppo", "--model", policy, f"reward_models={rm}", f"rollouts={tmp_path / 'r.parquet'}", "--out", str(out),
              "iterations=2", "batch_size=8", "minibatch_size=8", "eval_prompts=0", "progress=false",
              "behaviour_logprobs=recompute", "is_correction=seq_tis", "logprob_support=kept", "top_k=6", "top_p=0.8"])
    metrics = common.read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in metrics] == [1, 2] and all("is_weight_mean" in r for r in metrics)
    assert "true_score" not in metrics[0]


def test_rollout_errors_name_the_field(models, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_ids": [1, 2], "response_ids": [3], "logprobs": [-0.5]}\n'
                    '{"prompt_ids": [1, 2], "response_ids": [3, 4], "logprobs": [-0.5]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: logprobs must be a list of 2 numbers"):
        load_rollouts(str(path))
    path.write_text('{"prompt_ids": [], "response_ids": [3]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: prompt_ids must be a non-empty list"):
        load_rollouts(str(path))
    path.write_text('{"prompt_ids": [1], "response_ids": [3], "logprobs": [NaN]}\n')
    with pytest.raises(DataError, match="logprobs must be a list of 1 numbers"):
        load_rollouts(str(path))
    path.write_text("".join(json.dumps({"prompt_ids": [1], "response_ids": [3, 4], "logprobs": [-1.0, -2.0]}) + "\n"
                            for _ in range(8)))
    with pytest.raises(DataError, match="need the per-token field.s. kept_threshold, kept_logprobs"):
        PPOTrainer(_config(models, tmp_path, rollouts=str(path), logprob_support="kept", batch_size=4))


@pytest.mark.parametrize("fields, match", [
    (dict(is_correction="tis"), "is_correction=tis: needs behaviour_logprobs=recompute"),
    (dict(logprob_support="partial"), "logprob_support='partial': must be one of"),
    (dict(is_correction="trunc", behaviour_logprobs="recompute"), "is_correction='trunc': must be one of"),
    (dict(head_dtype="float16"), "head_dtype='float16': must be one of"),
    (dict(icepop_low=2.0, icepop_high=1.0), "icepop_low=2.0: must be below icepop_high"),
    (dict(is_cap=0.0), "is_cap=0.0: must be"),
    (dict(rollouts="missing.jsonl"), "rollouts='missing.jsonl': no such file"),
])
def test_config_errors(models, tmp_path, fields, match):
    with pytest.raises(common.ConfigError, match=match):
        _config(models, tmp_path, **fields).validate()


def test_head_dtype_float32_on_a_bf16_model(models):
    """head_dtype=float32: the bf16 model's hidden states and lm_head in float32 (within fp32 rounding of the float32
    product), closer to the float64 log-probs than the bf16 head."""
    policy, _ = models
    model = load_causal_lm(policy).to(torch.bfloat16).eval()
    tok = load_tokenizer(policy)
    ids = [tok(r["prompt"])["input_ids"] for r in task.prompts(4, 0)]
    batch = TokenBatch.pack(ids, [1] * len(ids))
    with torch.no_grad():
        hidden = decoder_hidden(model.get_decoder(), batch)
        logits = hidden.double() @ model.get_output_embeddings().weight.double().T
        exact = torch.log_softmax(logits, -1).gather(1, batch.labels.clamp(min=0)[:, None]).squeeze(1) * batch.mask
        fp32 = sequence_logprobs(model, batch, head_dtype="float32")
        bf16 = sequence_logprobs(model, batch)
    assert (fp32.double() - exact).abs().max() < 1e-5
    assert (bf16.double() - exact).abs().max() > 10 * (fp32.double() - exact).abs().max()
    assert math.isfinite(fp32.sum().item())


def test_float32_head_for_the_sampler(models):
    """float32_head: the model's own forward gives the float32 head's logits (what head_dtype=float32 gives the
    trainer), and the original head comes back after the block."""
    policy, _ = models
    model = load_causal_lm(policy).to(torch.bfloat16).eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        with float32_head(model):
            logits = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert logits.dtype == torch.float32 and after.dtype == torch.bfloat16
    torch.testing.assert_close(logits, hidden.float() @ model.get_output_embeddings().weight.float().T)
