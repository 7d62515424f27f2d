"""The command line on first use: configuration and data errors as one line with exit status 2 (tracebacks with
--debug), unknown fields listing the valid ones, --help documenting every field, model directories and position
limits checked before anything loads, --out / --resume safety, readable results, small-data warnings, and the
pipeline plot showing only the curves a run has."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import matplotlib.image
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_fast import cli
from rlhf_fast.data import DataError
from rlhf_fast.data.embedded import build_tokenizer, save_tiny_default
from rlhf_fast.models import ScalarHeadModel, load_tokenizer
from rlhf_fast.train import common
from rlhf_fast.train.pipeline import PipelineConfig, plot
from rlhf_fast.train.ppo import PPOConfig
from rlhf_fast.train.sft import SFTConfig

torch.set_num_threads(1)

# an SFT run of two optimizer steps on the embedded default
TINY_SFT = ["num_examples=8", "batch_size=4", "epochs=1", "warmup_steps=0", "log_every=1", "eval_prompts=0",
            "progress=false", "threads=1"]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``rlhf-fast argv`` run in this process."""
    capsys.readouterr()  # what came before
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("argv, needles", [
    (["sft", "lrr=1"], ["unknown field 'lrr'", "valid fields: ", "lr, ", "max_len"]),
    (["pipeline", "ppo.klcoef=1"], ["unknown field 'ppo.klcoef'", "valid fields of ppo: ", "ppo.kl_coef"]),
    (["sft", "lr=abc"], ["lr:", "'abc'"]),
    (["rm", "epochs=1.5"], ["epochs:", "1.5"]),
    (["sft", "batch_size=0"], ["batch_size=0", "integer >= 1"]),
    (["sft", "epochs=0"], ["epochs=0", "integer >= 1"]),
    (["sft", "lr=-1e-4"], ["lr=-0.0001", "> 0"]),
    (["rm", "lr=nan"], ["lr=nan", "finite"]),
    (["sft", "max_len=1"], ["max_len=1", ">= 2"]),
    (["sft", "warmup_steps=-1"], ["warmup_steps=-1"]),
    (["sft", "device=gpu"], ["device='gpu'"]),
    (["rm", "heldout_fraction=1.0"], ["heldout_fraction=1.0", "(0, 1)"]),
    (["pipeline", "ppo.temperature=0"], ["ppo.temperature=0.0", "> 0"]),
    (["pipeline", "ppo.temperature=1e-39"], ["ppo.temperature=1e-39", "reciprocal"]),
    (["pipeline", "ppo.loss_agg=mean"], ["ppo.loss_agg='mean'", "token-mean"]),
    (["pipeline", "ppo.algo=grpo", "ppo.group_size=1"], ["ppo.group_size=1", "grpo"]),
    (["pipeline", "ppo.kl_kind=k4"], ["ppo.kl_kind='k4'", "k3"]),
    (["pipeline", "ppo.dual_clip=0.5"], ["ppo.dual_clip=0.5", "> 1"]),
    (["pipeline", "ppo.top_p=0"], ["ppo.top_p=0.0"]),
    (["pipeline", "sft.batch_size=0"], ["sft.batch_size=0"]),
    (["pipeline", "--data", "x.jsonl"], ["sft_data="]),
    (["sft", "--data", "no-such.jsonl"], ["data='no-such.jsonl': no such file"]),
    (["pipeline", "rm_data=no-such.jsonl"], ["rm_data='no-such.jsonl': no such file"]),
    (["sft", "--config", "no-such.yaml"], ["--config no-such.yaml"]),
    (["ppo"], ["ppo needs --model"]),
    (["ppo", "--model", "sft-dir"], ["reward_models=", "reward_fns="]),
    (["sft", "lr"], ["'lr'", "key=value"]),
])
def test_config_errors_are_one_line_with_exit_status_2(tmp_path, capsys, argv, needles):
    out = str(tmp_path / "out")
    code, _, err = run_cli(argv + ["--out", out], capsys)
    assert_one_line_error(code, err, *needles)
    assert not os.path.exists(out)  # refused before anything was written


def test_out_must_be_a_directory(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("")
    code, _, err = run_cli(["sft", "--out", str(path)], capsys)
    assert_one_line_error(code, err, f"out='{path}': must be a directory")


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    with pytest.raises(common.ConfigError, match="batch_size=0"):
        cli.main(["sft", "batch_size=0", "--debug", "--out", str(tmp_path)])
    monkeypatch.setenv("RLHF_FAST_DEBUG", "1")
    with pytest.raises(common.ConfigError, match="batch_size=0"):
        cli.main(["sft", "batch_size=0", "--out", str(tmp_path)])


def test_bad_yaml_and_data_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    code, _, err = run_cli(["sft", "--config", str(bad), "--out", str(tmp_path / "a")], capsys)
    assert_one_line_error(code, err, "not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochs: 1\nlearning_rate: 0.1\n")
    code, _, err = run_cli(["sft", "--config", str(unknown), "--out", str(tmp_path / "b")], capsys)
    assert_one_line_error(code, err, "unknown field 'learning_rate'")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "+1 2 =", "answer": "2 3"}\n')
    code, _, err = run_cli(["sft", "--data", str(data), "--out", str(tmp_path / "c"), *TINY_SFT], capsys)
    assert_one_line_error(code, err, f"{data}:1: expected a SFT row")


def test_real_bugs_keep_their_traceback(tmp_path, monkeypatch):
    """Only configuration and data errors are the user's: anything else still raises."""
    from rlhf_fast.train import sft

    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sft.SFTTrainer, "setup", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["sft", "--out", str(tmp_path / "out"), *TINY_SFT])


def test_entry_point_prints_one_line(tmp_path):
    """The installed command as a user runs it: one line on stderr, status 2, nothing else."""
    proc = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "rm", "batch_size=0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rlhf-fast rm: error: batch_size=0: must be an integer >= 1"


@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "rs", "dpo", "pipeline"])
def test_help_documents_every_field_with_its_default(capsys, command):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    cls = cli._stage(command)[0]
    comments = cli.field_comments(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            assert f"{f.name}.FIELD=" in out and f"rlhf-fast {f.name} --help" in out
            continue
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"{f.name}=")), None)
        assert line is not None, f.name
        assert line.split()[0] == f"{f.name}={cli._value(cli.default(f))}"
        if comments.get(f.name):
            assert comments[f.name] in " ".join(out.split()), f.name
    assert "= the embedded tiny default" in out  # a base class's comment
    if command == "ppo":  # a comment continued on the next line is taken whole
        assert "dr-grpo (docs/formulas.md), over the global minibatch" in comments["loss_agg"]
        assert cli._value(None) in out and "clip_high=null" in out


def gpt2_dirs(root) -> tuple[str, str]:
    """A GPT-2 of 64 positions with the embedded tokenizer, and a reward model on its body."""
    tok = build_tokenizer(0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=len(tok),
                                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id))
    policy, rm = os.path.join(root, "gpt2"), os.path.join(root, "gpt2-rm")
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    ScalarHeadModel.from_pretrained(policy).save_pretrained(rm)
    return policy, rm


def test_position_limit_is_checked_before_loading(tmp_path, capsys, monkeypatch):
    policy, rm = gpt2_dirs(str(tmp_path))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_loading)
    code, _, err = run_cli(["ppo", "--model", policy, f"reward_models={rm}", "--out", str(tmp_path / "p")], capsys)
    assert_one_line_error(code, err, "max_prompt_len + max_new_tokens = 266", "64 positions", "n_positions",
                          "lower max_prompt_len by 202")
    code, _, err = run_cli(["sft", "--model", policy, "--out", str(tmp_path / "s")], capsys)
    assert_one_line_error(code, err, "max_len = 128", "64 positions")
    code, _, err = run_cli(["pipeline", "--model", policy, "--out", str(tmp_path / "pl")], capsys)
    assert_one_line_error(code, err, "max_len = 128", "64 positions")  # SFT's, found before SFT trains
    # within the limit the checks pass; the reward model's own limit counts too
    PPOConfig(model=policy, reward_models=[rm], max_prompt_len=54, max_new_tokens=10).validate()
    SFTConfig(model=policy, max_len=64).validate()
    tiny = save_tiny_default(str(tmp_path / "tiny"))
    tiny_rm = str(tmp_path / "tiny-rm")
    ScalarHeadModel.from_pretrained(tiny).save_pretrained(tiny_rm)
    PPOConfig(model=tiny, reward_models=[tiny_rm], max_prompt_len=100).validate()
    with pytest.raises(common.ConfigError, match=f"110 exceeds the 64 positions of reward_models='{rm}'"):
        PPOConfig(model=tiny, reward_models=[rm], max_prompt_len=100).validate()
    PipelineConfig().validate()  # the embedded default fits every stage's defaults
    broken = str(tmp_path / "broken")
    shutil.copytree(policy, broken)
    with open(os.path.join(broken, "config.json"), "w") as f:
        f.write("{model_type: gpt2")
    with pytest.raises(common.ConfigError, match="config.json is not valid JSON"):
        SFTConfig(model=broken).validate()


def test_model_directories_are_local_and_complete(tmp_path, capsys, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("looked up on the hub")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_hub)
    for name in ("./no-such-dir", "my-llama"):
        code, _, err = run_cli(["sft", "--model", name, "--out", str(tmp_path / "o")], capsys)
        assert_one_line_error(code, err, f"no such local model directory: '{name}'")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["rm", "--model", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "missing config.json, weights", "tokenizer files")
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run_cli(["rm", "--model", str(empty), "from_scratch=true", "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "missing tokenizer files")  # from scratch: no weights needed
    assert "weights" not in err
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="missing tokenizer files"):  # the library says so too
        load_tokenizer(str(empty))


def test_reward_model_must_be_one(tmp_path, capsys):
    policy, _ = gpt2_dirs(str(tmp_path))
    code, _, err = run_cli(["ppo", "--model", policy, f"reward_models={policy}", "max_prompt_len=32", "--out",
                            str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, f"reward_models: '{policy}' holds no scalar_head.json", "rlhf-fast rm")


def test_out_holding_a_run_is_refused_without_resume(tmp_path, capsys):
    out = str(tmp_path / "sft")
    code, stdout, _ = run_cli(["sft", "--out", out, *TINY_SFT], capsys)
    assert code == 0
    # a readable summary: key: value lines, no dict, no None
    assert stdout.splitlines()[0].startswith("final_loss: ") and "steps: 2" in stdout.splitlines()
    assert "{" not in stdout and "None" not in stdout
    first = common.read_metrics(os.path.join(out, "metrics.jsonl"))

    code, _, err = run_cli(["sft", "--out", out, *TINY_SFT, "epochs=2"], capsys)
    assert_one_line_error(code, err, f"{out} already holds a run", "--resume", "overwrite=true")
    assert common.read_metrics(os.path.join(out, "metrics.jsonl")) == first  # untouched

    code, stdout, _ = run_cli(["sft", "--out", out, "--resume", *TINY_SFT], capsys)  # finished: nothing to train
    assert code == 0 and "steps: 2" in stdout.splitlines()
    assert common.read_metrics(os.path.join(out, "metrics.jsonl")) == first

    code, stdout, _ = run_cli(["sft", "--out", out, *TINY_SFT, "epochs=2", "overwrite=true"], capsys)
    assert code == 0 and "steps: 4" in stdout.splitlines()
    assert [r["step"] for r in common.read_metrics(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3, 4]


def test_resume_without_a_checkpoint(tmp_path, capsys):
    # nothing there yet (a launcher that always passes --resume): a fresh run, with a warning
    out = str(tmp_path / "fresh")
    with pytest.warns(UserWarning, match="no checkpoint in .* yet: starting from the beginning"):
        code, stdout, _ = run_cli(["sft", "--out", out, "--resume", *TINY_SFT], capsys)
    assert code == 0 and "steps: 2" in stdout.splitlines()
    # a checkpoint of the other format: refused, naming the field to set
    os.rename(os.path.join(out, "checkpoint.pt"), os.path.join(out, "checkpoint.dcp"))
    code, _, err = run_cli(["sft", "--out", out, "--resume", *TINY_SFT], capsys)
    assert_one_line_error(code, err, "holds checkpoint.dcp", "checkpoint=dcp")
    # a finished run whose checkpoint is gone: refused
    os.remove(os.path.join(out, "checkpoint.dcp"))
    code, _, err = run_cli(["sft", "--out", out, "--resume", *TINY_SFT], capsys)
    assert_one_line_error(code, err, "holds a run", "no checkpoint.pt to continue from")


def test_pipeline_out_holding_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "pipe"
    (out / "rm").mkdir(parents=True)
    (out / "rm" / "checkpoint.pt").write_bytes(b"")
    code, _, err = run_cli(["pipeline", "--out", str(out)], capsys)
    assert_one_line_error(code, err, "already holds a pipeline run", os.path.join(str(out), "rm", "checkpoint.pt"))
    assert not (out / "sft").exists()


def test_small_data_and_long_warmup_warn():
    with pytest.warns(UserWarning, match=r"warmup_steps=20 but the run has 10 optimizer steps: the learning rate "
                                         r"peaks at 15% of lr; set warmup_steps to about a tenth of the steps "
                                         r"\(warmup_steps=1\)"):
        common.check_warmup(20, 10)
    with pytest.warns(UserWarning, match="fewer than one batch"):
        common.check_rows(300, 512, "sft training rows")
    with pytest.raises(DataError, match="nothing to train on"):
        common.check_rows(0, 4, "rm training rows")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        common.check_warmup(20, 40)  # peaks at 52% of lr
        common.check_warmup(0, 3)
        common.check_rows(512, 512, "rows")


def test_small_dataset_run_warns(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "+1 2 =", "completion": "2 3 4"}) + "\n" for _ in range(3)))
    with pytest.warns(UserWarning) as record:
        code, _, _ = run_cli(["sft", "--data", str(data), "--out", str(tmp_path / "o"), "warmup_steps=20",
                              "batch_size=4", "eval_prompts=0", "progress=false"], capsys)
    assert code == 0
    messages = [str(w.message) for w in record]
    assert any("3 sft training rows, fewer than one batch (batch_size=4)" in m for m in messages), messages
    assert any("warmup_steps=20 but the run has 2 optimizer steps" in m for m in messages), messages


def test_eval_every_zero_evaluates_at_the_end(tmp_path, capsys):
    code, stdout, _ = run_cli(["rm", "--out", str(tmp_path / "rm"), "num_pairs=10", "batch_size=4", "epochs=1",
                               "eval_every=0", "log_every=1", "warmup_steps=0", "progress=false",
                               "threads=1"], capsys)
    assert code == 0 and "heldout_pairs: 1" in stdout.splitlines()
    rows = common.read_metrics(str(tmp_path / "rm" / "metrics.jsonl"))
    assert "heldout_accuracy" in rows[-1] and all("heldout_accuracy" not in r for r in rows[:-1])


def test_format_summary():
    text = cli.format_summary({"iterations": 3, "true_score_before": None, "final": {"step": 3, "kl": 0.0123456}})
    assert text.splitlines() == ["iterations: 3", "final.step: 3", "final.kl: 0.01235"]


def test_pipeline_plot_has_a_panel_per_curve(tmp_path):
    def write(stage, rows):
        (tmp_path / stage).mkdir(exist_ok=True)
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert plot(str(tmp_path)) is None  # nothing logged
    write("sft", [{"step": 2, "loss": 1.5, "lr": 1e-3}])  # user data, a short run: one logged row
    assert matplotlib.image.imread(plot(str(tmp_path))).shape[1] == 450
    write("rm", [{"step": 1, "loss": 0.7, "accuracy": 0.5, "heldout_accuracy": 0.6}])
    write("ppo", [{"step": i, "reward": 0.1 * i, "kl": 0.01 * i} for i in range(1, 4)])  # no true score
    assert matplotlib.image.imread(plot(str(tmp_path))).shape[1] == 3 * 450
    write("ppo", [{"step": i, "reward": 0.1 * i, "kl": 0.01 * i, "true_score": 0.5} for i in range(1, 4)])
    assert matplotlib.image.imread(plot(str(tmp_path))).shape[1] == 4 * 450
