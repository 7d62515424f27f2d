"""Reward models in the standard 🤗 format: what ``ScalarHeadModel.save_pretrained`` writes loads with
``AutoModelForSequenceClassification.from_pretrained(dir, num_labels=1)`` with no missing or unexpected weights and
scores at the last non-pad token (left or right padding) what ``ScalarHeadModel.score`` gives on packed batches, on
the embedded tiny Llama and a tiny GPT-2; directories in the older layout (body + scalar_head.pt) still load; a
critic's bias survives our own round trip; ``rlhf-fast rm`` output loads in the standard class."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2Model

from rlhf_fast.batch import TokenBatch
from rlhf_fast.data.embedded import build_tokenizer, save_tiny_default
from rlhf_fast.models import ScalarHeadModel, build_tiny_model
from rlhf_fast.train import common
from rlhf_fast.train.rm import RMConfig, train_rm

torch.set_num_threads(1)
PAD = 0
SEQS = [[1, 5, 6, 7, 8, 2], [1, 9, 2], [1, 4, 4, 10, 2]]


def body_of(kind: str, tok):
    torch.manual_seed(0)
    if kind == "llama":
        return build_tiny_model(tok, hidden_size=32, num_layers=2).get_decoder()
    return GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                pad_token_id=PAD, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0))


def padded(seqs, left: bool) -> dict:
    """input_ids, attention_mask and position_ids counted from each sequence's first token (GPT-2's absolute
    positions need them under left padding)."""
    T = max(map(len, seqs))
    rows = [([PAD] * (T - len(s)) + s) if left else (s + [PAD] * (T - len(s))) for s in seqs]
    ids = torch.tensor(rows)
    mask = (ids != PAD).long()
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp_min(0)}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_saved_reward_model_loads_in_the_standard_class(tmp_path, kind):
    tok = build_tokenizer(0)
    rm = ScalarHeadModel(body_of(kind, tok)).eval()
    torch.nn.init.normal_(rm.head.weight)
    rm.save_pretrained(str(tmp_path / "rm"))
    hf, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), num_labels=1,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.pad_token_id == PAD
    ours = rm.score(TokenBatch.pack(SEQS, [1] * len(SEQS)))
    hf.eval()
    with torch.no_grad():
        for left in (False, True):
            torch.testing.assert_close(hf(**padded(SEQS, left)).logits[:, 0], ours, rtol=1e-5, atol=1e-5)
    again = ScalarHeadModel.from_pretrained(str(tmp_path / "rm")).eval()
    torch.testing.assert_close(again.score(TokenBatch.pack(SEQS, [1] * 3)), ours, rtol=0, atol=0)


def test_older_layout_and_critic_bias_round_trip(tmp_path):
    tok = build_tokenizer(0)
    rm = ScalarHeadModel(body_of("llama", tok)).eval()
    torch.nn.init.normal_(rm.head.weight)
    torch.nn.init.constant_(rm.head.bias, 0.375)  # a critic's learnt offset
    batch = TokenBatch.pack(SEQS, [1] * 3)
    ours = rm.score(batch)
    old = str(tmp_path / "old")  # the layout of earlier versions: the AutoModel body and scalar_head.pt
    rm.body.save_pretrained(old)
    torch.save(rm.head.state_dict(), os.path.join(old, "scalar_head.pt"))
    torch.testing.assert_close(ScalarHeadModel.from_pretrained(old).eval().score(batch), ours, rtol=0, atol=0)

    new = str(tmp_path / "new")
    rm.save_pretrained(new)
    assert json.load(open(os.path.join(new, "scalar_head.json")))["bias"] == 0.375
    torch.testing.assert_close(ScalarHeadModel.from_pretrained(new).eval().score(batch), ours, rtol=0, atol=0)
    hf = AutoModelForSequenceClassification.from_pretrained(new, num_labels=1).eval()
    with torch.no_grad():  # the standard class has no bias: its scores are ours less the offset
        torch.testing.assert_close(hf(**padded(SEQS, left=False)).logits[:, 0], ours - 0.375, rtol=1e-5, atol=1e-5)


def test_rm_stage_output_is_a_standard_sequence_classifier(tmp_path):
    base = save_tiny_default(str(tmp_path / "base"))
    cfg = common.load_config(RMConfig, None, [f"model={base}", f"out={tmp_path / 'rm'}", "num_pairs=40",
                                              "epochs=1", "batch_size=16", "progress=false", "threads=1"])
    train_rm(cfg)
    out = str(tmp_path / "rm" / "model")
    info = json.load(open(os.path.join(out, "scalar_head.json")))
    assert {"score_mean", "score_std", "bias"} <= set(info) and info["bias"] == 0.0
    hf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    ours = ScalarHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(**padded(SEQS, left=True)).logits[:, 0],
                                   ours.score(TokenBatch.pack(SEQS, [1] * 3)), rtol=1e-5, atol=1e-5)
