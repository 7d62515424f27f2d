"""Orchestration tests: model/tokenizer loading, data errors, SFT / RM steps, a shortened SFT -> RM -> PPO pipeline
that must raise the true score, backend agreement, atomic checkpoints and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import rlhf_fast
from rlhf_fast.data import DataError, read_jsonl, sft_batch, task, write_jsonl
from rlhf_fast.models.tiny import build_tokenizer, load_causal_lm, load_tokenizer, save_tiny_default
from rlhf_fast.models.value_head import ScalarHeadModel, last_token_index
from rlhf_fast.train import common
from rlhf_fast.train.pipeline import PipelineConfig, run_pipeline
from rlhf_fast.train.ppo import PPOConfig, PPOTrainer
from rlhf_fast.train.ppo import train_ppo
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
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(rm.score(x.expand(2, -1), mask), rm2.score(x.expand(2, -1), mask), rtol=0, atol=0)
    assert last_token_index(mask).tolist() == [3, 5]


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


def test_sft_batch_masks_prompt_and_one_step_lowers_loss(tmp_path):
    path = save_tiny_default(str(tmp_path / "tiny"))
    tok, model = load_tokenizer(path), load_causal_lm(path)
    rows = [{"prompt": "+1 2 =", "completion": "2 3 4"}, {"prompt": "+4 9 =", "completion": "9 3"}]
    batch = sft_batch(tok, rows, 64)
    assert batch["labels"][0].tolist() == [-100] * 4 + tok("2 3 4", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    assert batch["labels"][1, -2:].tolist() == [tok.eos_token_id, -100] and batch["attention_mask"][1].sum() == 7
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = sft_loss(model, batch)
    # the loss equals the plain cross-entropy of the response tokens
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)
    torch.testing.assert_close(before, ce, rtol=1e-5, atol=1e-5)
    before.backward()
    opt.step()
    assert sft_loss(model, batch).item() < before.item() - 0.05


def test_bradley_terry_loss_and_accuracy():
    class Fixed(torch.nn.Module):
        def score(self, input_ids, attention_mask):
            return torch.tensor([2.0, 0.0, 1.0, 1.0])  # chosen (2, 0), rejected (1, 1)

    loss, acc = bradley_terry(Fixed(), {"input_ids": None, "attention_mask": None})
    expected = (torch.log1p(torch.exp(torch.tensor(-1.0))) + torch.log1p(torch.exp(torch.tensor(1.0)))) / 2
    torch.testing.assert_close(loss, expected)
    assert acc.item() == 0.5


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
    cfg = PPOConfig(model=os.path.join(out, "sft", "model"), reward_model=os.path.join(out, "rm", "model"),
                    out=os.path.join(out, f"ppo_{backend}"), iterations=1, batch_size=32, eval_prompts=0,
                    progress=False, backend=backend)
    with rlhf_fast.use_backend(backend):
        trainer = PPOTrainer(cfg)
        res, plen = trainer.rollout(trainer.prompts(0))
        ro, stats = trainer.score(res, plen)
        stats.update(trainer.learn(ro, plen))
    return ro, stats, trainer.policy


def test_torch_backend_agrees_with_fused_ops(pipeline):
    out, _ = pipeline
    fast = rlhf_fast._backend.select("logprobs", rlhf_fast.ops.token_logprobs.LOGPROBS_BACKENDS,
                                     torch.device("cpu"))
    if fast == "torch":
        pytest.skip("the compiled CPU extension is not built: nothing to compare the torch backend with")
    ro_t, st_t, pol_t = _one_iteration(out, "torch")
    ro_f, st_f, pol_f = _one_iteration(out, fast)
    assert torch.equal(ro_t.sequences, ro_f.sequences)  # same sampler stream
    for name in ("old_logp", "ref_logp", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(ro_f, name), getattr(ro_t, name), rtol=1e-4, atol=1e-4)
    for k in ("reward", "kl", "policy_loss", "entropy", "value_loss"):
        assert st_f[k] == pytest.approx(st_t[k], rel=1e-3, abs=1e-4), k
    for p_f, p_t in zip(pol_f.parameters(), pol_t.parameters()):
        torch.testing.assert_close(p_f, p_t, rtol=1e-3, atol=1e-4)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert common.load_checkpoint(path) == {"step": 1}  # the finished checkpoint survives a crash mid-write


def test_grpo_group_advantages_without_critic(pipeline, tmp_path):
    out, _ = pipeline
    cfg = PPOConfig(model=os.path.join(out, "sft", "model"), reward_model=os.path.join(out, "rm", "model"),
                    out=str(tmp_path / "grpo"), algo="grpo", iterations=2, batch_size=8, group_size=4,
                    minibatch_size=16, kl_kind="k3", eval_prompts=0, progress=False)
    trainer = PPOTrainer(cfg)
    assert trainer.critic is None
    res, plen = trainer.rollout(trainer.prompts(0))
    ro, _ = trainer.score(res, plen)
    assert ro.sequences.shape[0] == 32
    prompts = ro.sequences[:, :plen].view(8, 4, plen)
    assert torch.equal(prompts, prompts[:, :1].expand_as(prompts))  # G consecutive samples of each prompt
    # every response token of a sample carries its group-normalised score; nothing outside the response
    with torch.no_grad():
        raw = trainer.reward_model.score(ro.sequences, ro.attention_mask)
    s = ((raw - trainer.score_mean) / trainer.score_std).clamp(-cfg.reward_clip, cfg.reward_clip).view(8, 4)
    expected = ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(ro.advantages[:, 0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ro.advantages, expected[:, None] * ro.response_mask, rtol=1e-4, atol=1e-4)
    assert not ro.values.any() and not ro.returns.any()

    summary = trainer.train()
    rows = common.read_metrics(str(tmp_path / "grpo" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and "value_loss" not in rows[0] and "approx_kl" in rows[0]
    assert summary["iterations"] == 2 and not os.path.exists(tmp_path / "grpo" / "critic")
    load_causal_lm(str(tmp_path / "grpo" / "model"))


def test_resume_after_sigkill_matches_uninterrupted_run(pipeline, tmp_path):
    out, _ = pipeline
    overrides = [f"reward_model={os.path.join(out, 'rm', 'model')}", "iterations=4", "batch_size=16",
                 "minibatch_size=8", "save_every=1", "eval_prompts=0", "progress=false", "threads=1"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    # the uninterrupted run in this process (saves a process start-up); the killed and resumed ones as the CLI
    train_ppo(common.load_config(PPOConfig, None, overrides, model=os.path.join(out, "sft", "model"), out=full))
    args = [sys.executable, "-m", "rlhf_fast.cli", "ppo", "--model", os.path.join(out, "sft", "model"), *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    proc = subprocess.Popen(args + ["--out", killed], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(killed, "checkpoint.pt")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        state = common.load_checkpoint(ckpt) if os.path.exists(ckpt) else None
        if state is not None and state["iteration"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert common.load_checkpoint(ckpt)["iteration"] < 4
    subprocess.run(args + ["--out", killed, "--resume"], check=True, env=env, capture_output=True)

    a = common.read_metrics(os.path.join(full, "metrics.jsonl"))
    b = common.read_metrics(os.path.join(killed, "metrics.jsonl"))
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    assert len(a) == 4 and drop(a) == drop(b)
