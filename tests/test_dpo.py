"""DPO trainer: the loss, rewards and gradients at step 0 equal TRL's DPOTrainer (trl 1.16) on the same model and
pairs (sigmoid, ipo, hinge, robust, RPO; fp32), hand-computed losses of the family (cDPO, robust, hinge, IPO, SimPO,
RPO), end-to-end runs on the embedded default (precomputed = live reference at the start; the reference cache),
and resume after SIGKILL giving the same metrics as an uninterrupted run."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from _testing import kill_after_checkpoint
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rlhf_fast.batch import TokenBatch
from rlhf_fast.data import pair_batch, task
from rlhf_fast.data.embedded import build_tokenizer, save_tiny_default
from rlhf_fast.models import load_causal_lm
from rlhf_fast.train import checkpoint, common
from rlhf_fast.ops.linear_losses import dpo_pair_loss
from rlhf_fast.train.dpo import DPOConfig, dpo_loss, train_dpo

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# Equal to TRL's DPOTrainer at step 0
# ----------------------------------------------------------------------------------------------------------------


def tiny_llama(vocab: int, seed: int, tok) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config).float().eval()


def batch_from_trl(inputs: dict) -> TokenBatch:
    """TRL's collated batch (chosen rows then rejected rows, right-padded, completion_mask) as our packed batch."""
    seqs, prompt_lens = [], []
    for ids, attn, comp in zip(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]):
        keep = attn.bool()
        seqs.append(ids[keep].tolist())
        prompt_lens.append(int((keep & ~comp.bool()).sum()))
    return TokenBatch.pack(seqs, prompt_lens)


@pytest.mark.parametrize("loss_type,label_smoothing,rpo_alpha", [
    ("sigmoid", 0.0, 0.0), ("ipo", 0.0, 0.0), ("hinge", 0.0, 0.0), ("robust", 0.1, 0.0), ("sigmoid", 0.0, 0.5)])
def test_step_zero_equals_trl_dpo_trainer(tmp_path, loss_type, label_smoothing, rpo_alpha):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    build_tokenizer(0).save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    policy, ref = tiny_llama(len(tok), 0, tok), tiny_llama(len(tok), 1, tok)  # a reference unlike the policy
    ours = tiny_llama(len(tok), 0, tok)
    pairs = task.preference_pairs(4, seed=3)
    # plain text: TRL concatenates prompt + completion, and our word-level tokenizer splits on spaces
    rows = [{"prompt": p["prompt"], "chosen": f" {p['chosen']} {tok.eos_token}",
             "rejected": f" {p['rejected']} {tok.eos_token}"} for p in pairs]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", per_device_train_batch_size=4,
                         beta=0.2, loss_type=["sigmoid", "sft"] if rpo_alpha else [loss_type],
                         loss_weights=[1.0, rpo_alpha] if rpo_alpha else None, label_smoothing=label_smoothing,
                         use_cpu=True, bf16=False, max_length=None, seed=0, dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(rows))
    inputs = next(iter(trainer.get_train_dataloader()))
    policy.train()
    trl_loss = trainer.compute_loss(policy, inputs)
    trl_loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    batch = batch_from_trl(inputs)
    P = batch.num_seqs // 2
    with torch.no_grad():
        ref_logps = _seq_logps(ref, batch)
    cfg = DPOConfig(beta=0.2, loss_type=loss_type, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha)
    loss, stats, seq_logps = dpo_loss(ours, batch, *ref_logps.chunk(2), torch.full((P,), 1.0 / P), cfg)
    loss.backward()

    torch.testing.assert_close(loss, trl_loss.float(), rtol=1e-5, atol=1e-5)
    assert (seq_logps - ref_logps).abs().max() > 1e-2  # the reference differs from the policy: a real comparison
    for key, theirs in (("chosen_rewards", "rewards/chosen"), ("rejected_rewards", "rewards/rejected"),
                        ("margins", "rewards/margins"), ("accuracy", "rewards/accuracies")):
        assert abs(stats[key].item() - metrics[theirs]) < 1e-5, key
    for (name, p), q in zip(policy.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def _seq_logps(model, batch):
    from rlhf_fast.models import sequence_logprobs

    logp = sequence_logprobs(model, batch)
    return logp.new_zeros(batch.num_seqs).index_add(0, batch.seq_ids, logp)


def test_pair_batch_tokenizes_as_trl(tmp_path):
    """Our pair_batch of {prompt, chosen, rejected} gives TRL's token sequences and completion boundaries."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    build_tokenizer(0).save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    pairs = task.preference_pairs(3, seed=5)
    eos = tok.eos_token  # TRL appends it as text, so it must be its own word here
    rows = [{"prompt": p["prompt"], "chosen": f" {p['chosen']} {eos}", "rejected": f" {p['rejected']} {eos}"}
            for p in pairs]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", per_device_train_batch_size=3,
                         use_cpu=True, bf16=False, max_length=None)
    trainer = trl.DPOTrainer(model=tiny_llama(len(tok), 0, tok), ref_model=tiny_llama(len(tok), 1, tok), args=args,
                             processing_class=tok, train_dataset=datasets.Dataset.from_list(rows))
    theirs = batch_from_trl(next(iter(trainer.get_train_dataloader())))
    ours = pair_batch(tok, pairs, 128)
    key = lambda b: sorted(zip(b.input_ids.split(b.seq_lens.tolist()), b.prompt_lens.tolist()),  # noqa: E731
                           key=lambda x: (x[0].tolist(), x[1]))
    assert [(s.tolist(), p) for s, p in key(ours)] == [(s.tolist(), p) for s, p in key(theirs)]


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed losses
# ----------------------------------------------------------------------------------------------------------------


def _pair(**kw):
    # one pair: policy log-probs -3 (chosen, 2 tokens) and -8 (rejected, 4 tokens), reference -4 and -6
    t = lambda x: torch.tensor([x])  # noqa: E731
    loss, r_c, r_r = dpo_pair_loss(t(-3.0), t(-8.0), t(-4.0), t(-6.0), t(2.0), t(4.0), **kw)
    return loss.item(), r_c.item(), r_r.item()


def test_dpo_family_hand_computed():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # log-ratios: chosen -3 - (-4) = 1, rejected -8 - (-6) = -2; beta 0.5: margin 1.5, rewards 0.5 and -1
    loss, r_c, r_r = _pair(beta=0.5)
    assert (r_c, r_r) == (0.5, -1.0)
    assert loss == pytest.approx(-math.log(sig(1.5)), rel=1e-6)
    eps = 0.2
    assert _pair(beta=0.5, label_smoothing=eps)[0] == pytest.approx(  # conservative DPO
        -0.8 * math.log(sig(1.5)) - 0.2 * math.log(sig(-1.5)), rel=1e-6)
    assert _pair(beta=0.5, loss_type="robust", label_smoothing=eps)[0] == pytest.approx(
        (-0.8 * math.log(sig(1.5)) + 0.2 * math.log(sig(-1.5))) / 0.6, rel=1e-6)
    assert _pair(beta=0.5, loss_type="hinge")[0] == pytest.approx(0.0)  # margin 1.5 > 1
    assert _pair(beta=0.25, loss_type="hinge")[0] == pytest.approx(1 - 0.75, rel=1e-6)
    # ipo: length-normalised log-ratios 1/2 - (-2)/4 = 1, target 1 / (2 beta) = 1 / 0.5 = 2
    assert _pair(beta=0.25, loss_type="ipo")[0] == pytest.approx((1.0 - 2.0) ** 2, rel=1e-6)
    # SimPO: reference ignored; margin beta * (-3/2 - -8/4) - gamma = 0.5 * 0.5 - 0.1
    loss, r_c, r_r = _pair(beta=0.5, simpo_gamma=0.1)
    assert loss == pytest.approx(-math.log(sig(0.15)), rel=1e-6) and (r_c, r_r) == (-0.75, -1.0)
    assert _pair(beta=0.5, simpo_gamma=0.1, loss_type="hinge")[0] == pytest.approx(0.85, rel=1e-6)


def test_rpo_adds_the_chosen_token_nll(tmp_path):
    """rpo_alpha adds alpha times the mean NLL over the chosen response tokens, and only those."""
    tok = build_tokenizer(0)
    model = tiny_llama(len(tok), 0, tok)
    batch = pair_batch(tok, task.preference_pairs(3, seed=1), 64)
    ref = torch.zeros(3), torch.zeros(3)
    w = torch.full((3,), 1 / 3)
    base, _, _ = dpo_loss(model, batch, *ref, w, DPOConfig(reference_free=True))
    with_nll, stats, _ = dpo_loss(model, batch, *ref, w, DPOConfig(reference_free=True, rpo_alpha=0.7))
    from rlhf_fast.models import sequence_logprobs

    with torch.no_grad():
        logp = sequence_logprobs(model, batch)
    chosen = batch.mask & (batch.seq_ids < 3)
    nll = -logp[chosen].mean()
    torch.testing.assert_close(stats["nll"], nll)
    torch.testing.assert_close(with_nll, base + 0.7 * nll)


def test_config_refuses_bad_values():
    for bad in ({"loss_type": "kto"}, {"ref_logps": "never"}, {"beta": 0.0}, {"label_smoothing": 0.5},
                {"rpo_alpha": -1.0}, {"simpo": True, "loss_type": "ipo"}):
        with pytest.raises(common.ConfigError, match=f"{'loss_type' if 'simpo' in bad else next(iter(bad))}="):
            DPOConfig(**bad).validate()


# ----------------------------------------------------------------------------------------------------------------
# End to end on the embedded default
# ----------------------------------------------------------------------------------------------------------------

RUN = ["num_pairs=96", "batch_size=16", "log_every=1", "progress=false", "eval_prompts=0", "threads=1", "lr=5e-4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_default(str(tmp_path_factory.mktemp("dpo") / "base"), seed=0)


def _run(base, out, *overrides):
    cfg = common.load_config(DPOConfig, None, [*RUN, f"model={base}", f"out={out}", *overrides])
    return train_dpo(cfg), common.read_metrics(os.path.join(out, "metrics.jsonl"))


def test_dpo_end_to_end_precomputed_equals_live_reference(base, tmp_path):
    summary, pre = _run(base, tmp_path / "pre", "epochs=1")
    assert summary["steps"] == 6 and len(pre) == 6
    assert set(pre[0]) >= {"loss", "rewards/chosen", "rewards/rejected", "margins", "accuracy", "kl", "nll", "lr"}
    # step 1: the policy is the reference, so every log-ratio is 0 (up to the rounding of packed sums), the loss log 2
    assert pre[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(pre[0]["margins"]) < 1e-5
    assert abs(pre[0]["kl"]) < 1e-6
    assert pre[-1]["margins"] > 0 and pre[-1]["loss"] < math.log(2)  # it learns the preferences it is shown
    assert os.path.exists(tmp_path / "pre" / "ref_logps.pt")
    load_causal_lm(str(tmp_path / "pre" / "model"))
    _, live = _run(base, tmp_path / "live", "epochs=1", "ref_logps=live")
    assert not os.path.exists(tmp_path / "live" / "ref_logps.pt")
    for i, (a, b) in enumerate(zip(pre, live)):
        for k in a:
            if not (i == 0 and k == "accuracy"):  # at step 1 every margin is 0 up to rounding, so [r_c > r_r] is noise
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (i, k)


def test_dpo_on_a_local_checkpoint_and_chat_jsonl(base, tmp_path):
    """A user's JSONL: prompt/chosen/rejected rows and chat rows (the conversation so far, then the two replies);
    a malformed row is reported with its line."""
    from rlhf_fast.data import DataError, write_jsonl

    rows = []
    for i, p in enumerate(task.preference_pairs(24, seed=7)):
        rows.append(p if i % 2 else {"messages": [{"role": "user", "content": p["prompt"]}], "chosen": p["chosen"],
                                     "rejected": p["rejected"]})
    write_jsonl(str(tmp_path / "pairs.jsonl"), rows)
    summary, metrics = _run(base, tmp_path / "user", f"data={tmp_path / 'pairs.jsonl'}", "batch_size=8")
    assert summary["steps"] == 3 and "true_score" not in summary and len(metrics) == 3
    write_jsonl(str(tmp_path / "bad.jsonl"), rows[:2] + [{"messages": [], "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="bad.jsonl:3"):
        _run(base, tmp_path / "bad", f"data={tmp_path / 'bad.jsonl'}")


def test_dpo_simpo_and_reference_free_run(base, tmp_path):
    # the same 16 pairs at every step: their margin must grow
    _, rows = _run(base, tmp_path / "simpo", "simpo=true", "num_pairs=16", "epochs=4", "beta=2.0", "lr=1e-3",
                   "warmup_steps=1")
    assert "kl" not in rows[0] and not os.path.exists(tmp_path / "simpo" / "ref_logps.pt")
    assert rows[-1]["margins"] > rows[0]["margins"]
    _, rows = _run(base, tmp_path / "free", "reference_free=true", "num_pairs=16")
    assert "kl" not in rows[0] and not os.path.exists(tmp_path / "free" / "ref_logps.pt")


def test_dpo_reference_cache_is_reused_and_keyed(base, tmp_path, monkeypatch):
    from rlhf_fast.train import dpo

    out = tmp_path / "cache"
    _run(base, out, "num_pairs=32")
    calls = []
    real = dpo._sequence_logp_sums
    monkeypatch.setattr(dpo, "_sequence_logp_sums", lambda *a: calls.append(1) or real(*a))
    _run(base, out, "num_pairs=32", "overwrite=true")  # same rows, model and max_len: cached, no reference pass
    assert calls == []
    _run(base, out, "num_pairs=32", "max_len=16", "overwrite=true")  # another truncation: scored again
    assert calls


def test_dpo_resume_after_sigkill_matches_uninterrupted_run(base, tmp_path):
    overrides = [*RUN, "num_pairs=128", "batch_size=8", "save_every=1"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    args = [sys.executable, "-m", "rlhf_fast.cli", "dpo", "--model", base, *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(args + ["--out", full], check=True, env=env, capture_output=True)

    kill_after_checkpoint(args, killed, 3, env)
    assert checkpoint.load_checkpoint(os.path.join(killed, "checkpoint.pt"))["step"] < 16
    cache = os.path.join(killed, "ref_logps.pt")
    before = os.stat(cache).st_mtime_ns
    subprocess.run(args + ["--out", killed, "--resume"], check=True, env=env, capture_output=True)
    assert os.stat(cache).st_mtime_ns == before  # the reference pass is not redone

    a = common.read_metrics(os.path.join(full, "metrics.jsonl"))
    b = common.read_metrics(os.path.join(killed, "metrics.jsonl"))
    assert len(a) == 16 and a == b


def test_pipeline_algo_dpo_runs_sft_then_dpo(tmp_path):
    from rlhf_fast.train.pipeline import PipelineConfig, run_pipeline

    out = tmp_path / "pipe"
    cfg = common.load_config(PipelineConfig, None, [
        f"out={out}", "algo=dpo", "progress=false", "threads=1", "sft.num_examples=64", "sft.epochs=1",
        "sft.eval_prompts=16", "dpo.num_pairs=32", "dpo.batch_size=16", "dpo.eval_prompts=16"])
    summary = run_pipeline(cfg)
    assert summary["algo"] == "dpo" and set(summary) >= {"sft", "dpo"} and not os.path.exists(out / "rm")
    assert summary["dpo"]["steps"] == 2 and 0.0 <= summary["dpo"]["true_score"] <= 1.0
    dpo_cfg = (out / "dpo" / "config.yaml").read_text()
    assert f"model: {out / 'sft' / 'model'}" in dpo_cfg
    load_causal_lm(str(out / "dpo" / "model"))
