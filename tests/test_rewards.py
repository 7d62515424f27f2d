"""Rewards of samples (several reward models, programmatic reward functions, their combination rules), PPO-ptx and
rejection sampling: hand-computed combinations and selections, the reward-function contract and its error reports,
the mixed ptx objective, and short runs (with resume) on the embedded default and on a user's checkpoint and JSONL."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _testing import kill_after_checkpoint

from rlhf_fast import loss_weights, ppo_objective
from rlhf_fast.data import DataError, read_jsonl, task, write_jsonl
from rlhf_fast.data.embedded import save_tiny_default
from rlhf_fast.models import ScalarHeadModel, load_causal_lm, sequence_cross_entropy, sequence_logprobs
from rlhf_fast.train import common, rewards
from rlhf_fast.train.pipeline import PipelineConfig, run_pipeline
from rlhf_fast.train.ppo import PPOConfig, PPOTrainer
from rlhf_fast.train.rm import RMConfig, bradley_terry, train_rm
from rlhf_fast.train.rs import RSConfig, RSTrainer, best_of, kept_row


def test_weighted_rule_by_hand():
    scores = torch.tensor([[1.0, -2.0], [0.5, 4.0], [1.0, 0.0]])  # two models then one function
    out = rewards.combine(scores, n_models=2, weights=[2.0, -1.0, 0.5])
    torch.testing.assert_close(out, torch.tensor([2.0 - 0.5 + 0.5, -4.0 - 4.0 + 0.0]))
    torch.testing.assert_close(rewards.combine(scores, n_models=2), scores.sum(0))
    with pytest.raises(ValueError, match="reward_weights needs one weight per reward model and reward function"):
        rewards.combine(scores, n_models=2, weights=[1.0, 1.0])


def test_llama2_rule_by_hand():
    # helpfulness, safety, one function; threshold -0.5: rows 1 and 3 unsafe by score, row 2 flagged a safety prompt
    scores = torch.tensor([[0.3, 1.0, 2.0, -1.0],
                           [0.0, -0.6, 0.4, -2.0],
                           [1.0, 1.0, 0.0, 0.0]])
    flagged = torch.tensor([False, False, True, False])
    out = rewards.combine(scores, n_models=2, rule="llama2", safety_threshold=-0.5, safety_rows=flagged,
                          weights=[3.0])
    torch.testing.assert_close(out, torch.tensor([0.3 + 3.0, -0.6 + 3.0, 0.4, -2.0]))
    with pytest.raises(ValueError, match="exactly two reward_models"):
        rewards.combine(scores, n_models=1, rule="llama2")
    with pytest.raises(ValueError, match="one weight per reward function"):
        rewards.combine(scores, n_models=2, rule="llama2", weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="reward_rule must be one of"):
        rewards.combine(scores, n_models=2, rule="max")


def test_reward_fn_loading_errors():
    assert rewards.load_reward_fn("rlhf_fast.data.task:reward") is task.reward
    for spec, match in [("rlhf_fast.data.task", "module:function"), ("no_such_module_xyz:f", "cannot import"),
                        ("rlhf_fast.data.task:nope", "no attribute"), ("rlhf_fast.data.task:VOCAB", "not a callable")]:
        with pytest.raises(ValueError, match=match):
            rewards.load_reward_fn(spec)


def _fails_on_seven(prompts, completions, **fields):
    return [1.0 / (len(c) != 7) for c in completions]


def test_reward_fn_errors_name_the_row():
    prompts, completions = ["a", "b", "c"], ["x", "seven!!", "y"]
    with pytest.raises(rewards.RewardError, match=r"_fails_on_seven on row 1 \(prompt 'b', completion 'seven!!'\) "
                                                   r"raised ZeroDivisionError"):
        rewards.call_reward_fn(_fails_on_seven, "_fails_on_seven", prompts, completions, {})
    with pytest.raises(rewards.RewardError, match="returned 2 values for 3 completions"):
        rewards.call_reward_fn(lambda prompts, completions: [0.0, 1.0], "short", prompts, completions, {})
    with pytest.raises(rewards.RewardError, match=r"returned nan on row 2 .*must be finite"):
        rewards.call_reward_fn(lambda prompts, completions: [0.0, 1.0, float("nan")], "nan", prompts, completions, {})
    with pytest.raises(rewards.RewardError, match="must return a list of floats"):
        rewards.call_reward_fn(lambda prompts, completions: ["good", 1, 2], "text", prompts, completions, {})
    got = rewards.call_reward_fn(task.reward, "reward", ["+1 2 ="], ["2 3 4 5 6 7 8 9"], {})
    assert got.dtype == torch.float32 and got.tolist() == [1.0]


def test_source_names_and_row_fields():
    assert rewards.source_names(["runs/rm_help/model", "runs/rm_safe/model/", "x/y"], ["m.n:score", "k:score"]) == \
        ["rm_help", "rm_safe", "y", "score.3", "score.4"]
    rows = [{"prompt": "p", "answer": 1}, {"messages": [{"role": "user", "content": "q"}], "answer": 2}]
    assert rewards.row_prompts(rows) == ["p", [{"role": "user", "content": "q"}]]
    assert rewards.row_fields(rows) == {"answer": [1, 2]}


def test_list_fields_take_plain_and_comma_separated_values():
    cfg = common.load_config(PPOConfig, None, ["reward_fns=rlhf_fast.data.task:reward", "reward_models=a,b/c",
                                               "reward_weights=[1,0.5,2]"])
    assert cfg.reward_fns == ["rlhf_fast.data.task:reward"] and cfg.reward_models == ["a", "b/c"]
    assert cfg.reward_weights == [1.0, 0.5, 2.0]
    nested = common.load_config(PipelineConfig, None, ["ppo.reward_fns=rlhf_fast.data.task:reward"])
    assert nested.ppo.reward_fns == ["rlhf_fast.data.task:reward"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The embedded (untrained) base as the policy, a reward model on its body, and the embedded SFT JSONL."""
    root = tmp_path_factory.mktemp("rewards")
    policy = save_tiny_default(str(root / "policy"))
    rm = str(root / "rm")
    torch.manual_seed(1)
    ScalarHeadModel.from_pretrained(policy).save_pretrained(rm)
    return policy, rm, str(root)


def _short(**kw):
    base = dict(iterations=2, batch_size=8, minibatch_size=8, group_size=4, epochs=1, max_new_tokens=8,
                eval_prompts=0, progress=False, save_every=1)
    return PPOConfig(**{**base, **kw})


def test_grpo_on_a_programmatic_reward_alone(tiny, tmp_path):
    """The embedded task's rule as the only reward: the logged reward is exactly the sampled true score."""
    policy, _, _ = tiny
    cfg = _short(model=policy, reward_fns=["rlhf_fast.data.task:reward"], algo="grpo", out=str(tmp_path / "g"))
    PPOTrainer(cfg).train()
    rows = common.read_metrics(str(tmp_path / "g" / "metrics.jsonl"))
    assert len(rows) == 2
    for r in rows:
        assert r["reward"] == pytest.approx(r["true_score"], abs=1e-6)
        assert r["reward/reward"] == pytest.approx(r["true_score"], abs=1e-6)


def _length_reward(prompts, completions, target, **fields):
    return [-abs(len(c.split()) - t) for c, t in zip(completions, target)]


def test_two_reward_models_and_a_function_on_user_data(tiny, tmp_path):
    """A user's checkpoint and JSONL with an extra field the reward function reads; Llama 2's rule over two reward
    models; per-source metrics logged and the combined reward follows the rule."""
    policy, rm, _ = tiny
    data = str(tmp_path / "prompts.jsonl")
    write_jsonl(data, [{"prompt": p["prompt"], "target": 3 + i % 4, "safety": i % 3 == 0}
                       for i, p in enumerate(task.prompts(16, 3))])
    cfg = _short(model=policy, data=data, reward_models=[rm, rm], reward_fns=[f"{__name__}:_length_reward"],
                 reward_rule="llama2", safety_threshold=0.0, safety_field="safety", reward_weights=[0.1],
                 out=str(tmp_path / "p"))
    trainer = PPOTrainer(cfg)
    assert trainer.rewards.names == ["rm.0", "rm.1", "_length_reward"]
    batch, rows, texts = trainer.rollout(trainer.prompts(0))
    batch, stats = trainer.score(batch, rows, texts)
    with torch.no_grad():
        raw = trainer.rewards.models[0].score(batch)
    mean, std = rewards.score_statistics(rm)
    s = ((raw - mean) / std).clamp(-cfg.reward_clip, cfg.reward_clip)  # both models are the same one: gate = s
    length = torch.tensor(_length_reward(None, texts, [r["target"] for r in rows]), dtype=torch.float32)
    torch.testing.assert_close(batch.scores, s + 0.1 * length)
    assert stats["reward/_length_reward"] == pytest.approx(length.mean().item(), abs=1e-5)
    assert stats["rm_score/rm.0"] == pytest.approx(raw.mean().item(), abs=1e-5)
    trainer.train()
    assert {"reward/rm.0", "reward/rm.1", "rm_score/rm.1", "reward/_length_reward"} <= \
        set(common.read_metrics(str(tmp_path / "p" / "metrics.jsonl"))[-1])


def test_a_failing_reward_fn_names_the_row(tiny, tmp_path):
    policy, _, _ = tiny
    data = str(tmp_path / "prompts.jsonl")
    write_jsonl(data, [{"prompt": "+1 2 ="}] * 8)  # no `target` field: _length_reward cannot run
    cfg = _short(model=policy, data=data, reward_fns=[f"{__name__}:_length_reward"], algo="grpo",
                 out=str(tmp_path / "f"))
    with pytest.raises(rewards.RewardError, match=r"_length_reward on row 0 \(prompt '\+1 2 =', "
                                                   r"completion '.*'\) raised TypeError: .*'target'"):
        PPOTrainer(cfg).train()


def test_reward_config_is_checked_before_any_model_loads():
    for cls, name in ((PPOConfig, "ppo"), (RSConfig, "rs")):
        with pytest.raises(common.ConfigError, match=f"{name} needs reward_models= .* and/or reward_fns="):
            cls(model="no-such-dir").validate()
    with pytest.raises(common.ConfigError, match="cannot import 'nope'"):
        PPOConfig(model="no-such-dir", reward_fns=["nope:f"]).validate()
    with pytest.raises(common.ConfigError, match="needs exactly two reward_models"):
        RSConfig(model="no-such-dir", reward_models=["a"], reward_rule="llama2").validate()
    with pytest.raises(common.ConfigError, match=r"ppo.reward_weights needs one weight per reward model .* \(2\)"):
        PipelineConfig(ppo=PPOConfig(reward_fns=["rlhf_fast.data.task:reward"], reward_weights=[1.0])).validate()


def test_ptx_mixes_the_causal_lm_loss_into_the_step(tiny, tmp_path, monkeypatch):
    """One minibatch holding the whole rollout: the loss stepped on is the PPO objective plus ptx_coef x the SFT
    loss of the first ptx batch (computed here independently, before the step)."""
    policy, rm, _ = tiny
    sft = str(tmp_path / "sft.jsonl")
    write_jsonl(sft, task.sft_examples(32, 5))
    cfg = _short(model=policy, reward_models=[rm], ptx_coef=0.7, ptx_data=sft, ptx_batch_size=4,
                 out=str(tmp_path / "x"))
    trainer = PPOTrainer(cfg)
    batch, _ = trainer.score(*trainer.rollout(trainer.prompts(0)))
    ptx, ptx_w = trainer.ptx_minibatch(0)
    assert ptx.num_seqs == 4 and ptx_w.sum().item() == pytest.approx(1.0)
    model = trainer.policy.local(lambda m: m)
    with torch.no_grad():
        logp, entropy = sequence_logprobs(model, batch, return_entropy=True)
        w = loss_weights(batch.mask, "token-mean")
        ppo_loss, _ = ppo_objective(logp, batch.old_logp, batch.advantages, w, entropy=entropy)
        ptx_loss = sequence_cross_entropy(model, ptx, weights=ptx_w)
        expected = ppo_loss + 0.7 * ptx_loss
    stepped = []
    real_step = common.optimizer_step
    monkeypatch.setattr(common, "optimizer_step", lambda loss, *a, **k: (stepped.append(loss.detach()),
                                                                        real_step(loss, *a, **k)))
    stats = trainer.learn(batch)
    assert stepped[0].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert stats["ptx_loss"] == pytest.approx(ptx_loss.item(), rel=1e-5)
    assert stats["policy_loss"] == pytest.approx(ppo_loss.item(), rel=1e-5, abs=1e-6)


def test_ptx_on_the_embedded_default_runs_and_resumes(tiny, tmp_path):
    """ptx_data="" takes the embedded SFT data; a run stopped after one iteration and resumed ends where an
    uninterrupted run does."""
    policy, rm, _ = tiny
    full = _short(model=policy, reward_models=[rm], ptx_coef=0.5, out=str(tmp_path / "full"))
    PPOTrainer(full).train()
    part = _short(model=policy, reward_models=[rm], ptx_coef=0.5, out=str(tmp_path / "part"), iterations=1)
    PPOTrainer(part).train()
    resumed = _short(model=policy, reward_models=[rm], ptx_coef=0.5, out=str(tmp_path / "part"))
    PPOTrainer(resumed, resume=True).train()
    a = common.read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    b = common.read_metrics(str(tmp_path / "part" / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2] and "ptx_loss" in a[-1]
    for key in ("ptx_loss", "policy_loss", "reward"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-5, abs=1e-7)


def test_best_of_k_by_hand():
    scores = torch.tensor([0.1, 0.9, 0.3, 2.0, 2.0, -1.0])
    index, best = best_of(scores, 3)
    assert index.tolist() == [1, 3] and best.tolist() == pytest.approx([0.9, 2.0])  # ties: the first sample
    assert kept_row({"prompt": "p", "id": 3}, "c", 0.5) == {"prompt": "p", "completion": "c", "reward": 0.5}
    conv = [{"role": "user", "content": "q"}]
    assert kept_row({"messages": conv}, "a", 1.0)["messages"] == [*conv, {"role": "assistant", "content": "a"}]


def test_rejection_sampling_keeps_the_best_and_resumes(tiny, tmp_path):
    """Two rounds with the task's rule as the reward: each round's kept sample is the best of K by that reward (so
    its true score is the best of K), the policy trains on them, and a run stopped after round 0 and resumed ends
    where an uninterrupted one does."""
    policy, _, _ = tiny
    kw = dict(model=policy, reward_fns=["rlhf_fast.data.task:reward"], rounds=2, prompts_per_round=16, num_samples=4,
              batch_size=8, max_new_tokens=8, log_every=1, save_every=2, eval_prompts=0, progress=False)
    summary = RSTrainer(RSConfig(out=str(tmp_path / "full"), **kw)).train()
    kept = read_jsonl(str(tmp_path / "full" / "rounds" / "round_0.jsonl"), "sft")
    assert len(kept) == 16 and all(r["reward"] == pytest.approx(task.true_score(r["prompt"], r["completion"]))
                                   for r in kept)
    rows = common.read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and summary["steps"] == 4
    assert rows[0]["reward_best"] >= rows[0]["reward_mean"] and rows[0]["true_score_best"] == rows[0]["reward_best"]
    assert "reward_best" in rows[2] and "reward_best" not in rows[1]
    load_causal_lm(str(tmp_path / "full" / "model"))

    class Interrupted(Exception):
        pass

    class StopsAfterRoundZero(RSTrainer):  # killed after the checkpoint at step 2, before round 1 is sampled
        def train_step(self):
            if self.step == 2:
                raise Interrupted
            return super().train_step()

    with pytest.raises(Interrupted):
        StopsAfterRoundZero(RSConfig(out=str(tmp_path / "part"), **kw)).train()
    RSTrainer(RSConfig(out=str(tmp_path / "part"), **kw), resume=True).train()
    resumed = common.read_metrics(str(tmp_path / "part" / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b.get("reward_best") == a.get("reward_best")


def test_pipeline_algos_share_sft_and_rm(tmp_path):
    """algo=rs then algo=grpo into one folder with --resume: SFT and the RM train once, each algorithm gets its own
    stage folder, trained from the SFT model against the pipeline's RM."""
    out = tmp_path / "pipe"
    short = [f"out={out}", "progress=false", "threads=1", "sft.num_examples=64", "sft.epochs=1", "sft.eval_prompts=16",
             "rm.num_pairs=64", "rm.epochs=1", "rs.rounds=1", "rs.prompts_per_round=16", "rs.num_samples=2",
             "rs.batch_size=16", "rs.eval_prompts=16", "ppo.iterations=1", "ppo.batch_size=4", "ppo.minibatch_size=8",
             "ppo.eval_prompts=16"]
    rs = run_pipeline(common.load_config(PipelineConfig, None, short + ["algo=rs"]))
    sft_mtime = os.path.getmtime(out / "sft" / "model" / "model.safetensors")
    grpo = run_pipeline(common.load_config(PipelineConfig, None, short + ["algo=grpo"]), resume=True)
    assert os.path.getmtime(out / "sft" / "model" / "model.safetensors") == sft_mtime
    assert rs["algo"] == "rs" and rs["rs"]["steps"] == 1 and 0.0 <= rs["rs"]["true_score"] <= 1.0
    assert grpo["algo"] == "grpo" and grpo["grpo"]["iterations"] == 1 and grpo["sft"] == rs["sft"]
    rm_dir = str(out / "rm" / "model")
    for stage in ("rs", "grpo"):
        cfg = (out / stage / "config.yaml").read_text()
        assert f"model: {out / 'sft' / 'model'}" in cfg and rm_dir in cfg
    assert "algo: grpo" in (out / "grpo" / "config.yaml").read_text()
    with pytest.raises(common.ConfigError, match="algo='sac'"):
        common.load_config(PipelineConfig, None, ["algo=sac"]).validate()


def test_rm_margin_term_by_hand_and_on_user_pairs(tiny, tmp_path):
    """Llama 2's margin: -log sigmoid(r_c - r_r - m) per pair; a user's pairs with a margin field train, a row
    without it is refused naming the row."""
    policy, _, _ = tiny

    class Fixed(torch.nn.Module):
        def score(self, batch):
            return torch.tensor([2.0, 0.5, 1.0, 1.0])  # chosen 2.0, 0.5; rejected 1.0, 1.0

    w = torch.tensor([0.5, 0.5])
    loss, correct = bradley_terry(Fixed(), None, w, torch.tensor([1.0, -0.25]))
    expected = -(0.5 * torch.nn.functional.logsigmoid(torch.tensor(0.0))
                 + 0.5 * torch.nn.functional.logsigmoid(torch.tensor(-0.25)))
    assert loss.item() == pytest.approx(expected.item()) and correct.tolist() == [1.0, 0.0]
    assert bradley_terry(Fixed(), None, w)[0].item() == pytest.approx(
        -(0.5 * torch.nn.functional.logsigmoid(torch.tensor([1.0, -0.5]))).sum().item())

    pairs = [{**p, "margin": float(i % 3)} for i, p in enumerate(task.preference_pairs(40, 0))]
    data = str(tmp_path / "pairs.jsonl")
    write_jsonl(data, pairs)
    cfg = RMConfig(model=policy, data=data, margin_field="margin", out=str(tmp_path / "rm"), epochs=1, batch_size=8,
                   warmup_steps=0, eval_every=0, progress=False)
    summary = train_rm(cfg)
    assert summary["heldout_pairs"] == 4 and os.path.exists(tmp_path / "rm" / "model" / "scalar_head.json")
    write_jsonl(data, pairs[:5] + [{k: v for k, v in pairs[5].items() if k != "margin"}])
    with pytest.raises(DataError, match="row 6 .* no numeric 'margin'"):
        train_rm(RMConfig(model=policy, data=data, margin_field="margin", out=str(tmp_path / "rm2"), progress=False))


def test_rs_resume_after_sigkill_on_user_data(tiny, tmp_path):
    """The CLI on a local checkpoint and a prompts JSONL: killed inside round 1 and resumed, the metrics (and each
    round's kept samples) equal an uninterrupted run's."""
    policy, _, _ = tiny
    data = str(tmp_path / "prompts.jsonl")
    write_jsonl(data, task.prompts(16, 7))
    args = [sys.executable, "-m", "rlhf_fast.cli", "rs", "--model", policy, "--data", data,
            "reward_fns=rlhf_fast.data.task:reward", "rounds=2", "prompts_per_round=16", "num_samples=4",
            "batch_size=4", "warmup_steps=0", "log_every=1", "save_every=1", "eval_prompts=0", "progress=false",
            "threads=1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(args + ["--out", full], check=True, env=env, capture_output=True)
    kill_after_checkpoint(args, killed, 5, env)
    subprocess.run(args + ["--out", killed, "--resume"], check=True, env=env, capture_output=True)
    assert common.read_metrics(os.path.join(killed, "metrics.jsonl")) == \
        common.read_metrics(os.path.join(full, "metrics.jsonl"))
    for r in (0, 1):
        name = os.path.join("rounds", f"round_{r}.jsonl")
        assert read_jsonl(os.path.join(killed, name), "sft") == read_jsonl(os.path.join(full, name), "sft")
