"""rlhf_fast.models.sequence_logprobs / sequence_cross_entropy against the model's own forward().logits on tiny
transformers models."""

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf_fast.models import sequence_cross_entropy, sequence_logprobs, shift_labels

VOCAB = 101


def tiny_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":  # tied lm_head / wte
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=kind == "llama-tied")  # tied: the Qwen2-style small models
        model = LlamaForCausalLM(config)
        if kind == "llama-bias":  # an lm_head with a bias: forward() uses it, so must the helper
            model.lm_head = nn.Linear(32, VOCAB, bias=True)
    return model.eval()


def batch():
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[0, :3] = 0  # left padding
    attention_mask[1, 6:] = 0  # right padding
    labels = shift_labels(input_ids, attention_mask)
    labels[2, :2] = -100  # a prompt that is not scored
    return input_ids, attention_mask, labels


def from_logits(model, input_ids, attention_mask, labels, temperature):
    """The model's own forward: log_softmax(logits / T) at the labels, entropy, 0 where not scored."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    scored = (labels != -100) & (attention_mask == 1)
    logp = logp_all.gather(-1, torch.where(scored, labels, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(scored, logp, 0.0), torch.where(scored, entropy, 0.0)


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "llama-bias", "gpt2"])
def test_matches_model_forward(kind):
    model = tiny_model(kind)
    input_ids, attention_mask, labels = batch()
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(5))

    logp, entropy = sequence_logprobs(model, input_ids, attention_mask, labels, temperature=0.8, return_entropy=True)
    ((logp * weights).sum() + entropy.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ref_logp, ref_entropy = from_logits(model, input_ids, attention_mask, labels, 0.8)
    ((ref_logp * weights).sum() + ref_entropy.sum()).backward()

    assert logp.shape == labels.shape and logp.dtype == torch.float32
    assert torch.all(logp[labels == -100] == 0) and torch.all(logp[attention_mask == 0] == 0)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    head = model.get_output_embeddings()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "llama-bias", "gpt2"])
def test_cross_entropy_matches_model_forward(kind):
    model = tiny_model(kind)
    input_ids, attention_mask, labels = batch()
    loss = sequence_cross_entropy(model, input_ids, attention_mask, labels, temperature=0.8)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_logp, _ = from_logits(model, input_ids, attention_mask, labels, 0.8)
    scored = (labels != -100) & (attention_mask == 1)
    ref = -ref_logp.sum() / scored.sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_logp_only_matches_and_custom_ignore_index():
    model = tiny_model("llama")
    input_ids, attention_mask, labels = batch()
    labels[labels == -100] = -1
    logp = sequence_logprobs(model, input_ids, attention_mask, labels, ignore_index=-1)
    ref, _ = from_logits(model, input_ids, attention_mask, torch.where(labels == -1, -100, labels), 1.0)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)


def test_without_attention_mask():
    model = tiny_model("gpt2")
    input_ids, _, _ = batch()
    labels = shift_labels(input_ids)
    logp = sequence_logprobs(model, input_ids, None, labels)
    ref, _ = from_logits(model, input_ids, torch.ones_like(input_ids), labels, 1.0)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)


def test_shift_labels_hand_computed():
    input_ids = torch.tensor([[5, 6, 7, 8], [0, 0, 3, 4], [1, 2, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]])
    expected = torch.tensor([[6, 7, 8, -100], [-100, 3, 4, -100], [2, -100, -100, -100]])
    assert torch.equal(shift_labels(input_ids, attention_mask), expected)
    assert torch.equal(shift_labels(input_ids, ignore_index=-1), torch.tensor([[6, 7, 8, -1], [0, 3, 4, -1],
                                                                               [2, 0, 0, -1]]))


def test_softcapped_head_is_refused():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8, final_logit_softcapping=30.0))
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="final_logit_softcapping = 30.0"):
        sequence_logprobs(model, input_ids, attention_mask, labels)
    model.config.final_logit_softcapping = None  # without softcapping the head is a plain Linear: supported
    ref, _ = from_logits(model, input_ids, attention_mask, labels, 1.0)
    torch.testing.assert_close(sequence_logprobs(model, input_ids, attention_mask, labels), ref, rtol=1e-5,
                               atol=1e-5)


def test_scaled_or_non_linear_head_is_refused():
    model = tiny_model("llama")
    input_ids, attention_mask, labels = batch()
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        sequence_logprobs(model, input_ids, attention_mask, labels)
    with pytest.raises(ValueError, match="sequence_cross_entropy does not support .*logit_scale"):
        sequence_cross_entropy(model, input_ids, attention_mask, labels)
    model.config.logit_scale = None
    model.lm_head = nn.Sequential(nn.Linear(32, VOCAB))
    with pytest.raises(ValueError, match="not a torch.nn.Linear"):
        sequence_logprobs(model, input_ids, attention_mask, labels)


def test_bad_input():
    model = tiny_model("llama")
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="labels must have shape"):
        sequence_logprobs(model, input_ids, attention_mask, labels[:, 1:])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        sequence_logprobs(model, input_ids, attention_mask[:2], labels)
    with pytest.raises(ValueError, match="input_ids must be"):
        sequence_logprobs(model, input_ids[0], attention_mask[0], labels[0])
    with pytest.raises(TypeError, match="labels must be int64"):
        sequence_logprobs(model, input_ids, attention_mask, labels.int())
    with pytest.raises(TypeError, match="model must be"):
        sequence_logprobs("gpt2", input_ids, attention_mask, labels)
