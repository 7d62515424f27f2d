"""rlhf_fast.models on packed TokenBatches against each sequence's own unpadded forward().logits, on tiny
Llama (untied, tied, with a head bias), Qwen2 and GPT-2 (absolute positions) models."""

import pytest
import torch
from torch import nn
from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from rlhf_fast.batch import TokenBatch
from rlhf_fast.models import ScalarHeadModel, disable_dropout, sequence_cross_entropy, sequence_logprobs

VOCAB = 101
KINDS = ["llama", "llama-tied", "llama-bias", "qwen2", "gpt2"]


def tiny_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":  # tied lm_head / wte, learned absolute positions, dropout 0.1 everywhere
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64)).eval()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=kind == "llama-tied")
    model = LlamaForCausalLM(config)
    if kind == "llama-bias":  # an lm_head with a bias: forward() uses it, so must the helper
        model.lm_head = nn.Linear(32, VOCAB, bias=True)
    return model.eval()


def sequences():
    """Mixed lengths (1 to 13 tokens) so that rows hold several sequences, and a sequence with no target."""
    g = torch.Generator().manual_seed(3)
    lens, prompts = [7, 13, 1, 4, 9, 2, 5], [3, 0, 1, 2, 8, 1, 4]
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens], prompts


def per_sequence(model, seqs, prompts, temperature):
    """Each sequence alone, unpadded, through the model's own forward: (logp, entropy) at every target position."""
    logps, ents = [], []
    for seq, p in zip(seqs, prompts):
        logits = model(input_ids=torch.tensor([seq])).logits[0].float() / temperature
        logp_all = torch.log_softmax(logits, -1)
        labels = TokenBatch.pack([seq], [p]).labels
        scored = labels != -100
        logp = logp_all.gather(-1, torch.where(scored, labels, 0)[:, None]).squeeze(-1)
        logps.append(torch.where(scored, logp, 0.0))
        ents.append(torch.where(scored, -(logp_all.exp() * logp_all).sum(-1), 0.0))
    return torch.cat(logps), torch.cat(ents)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_logprobs_equal_each_sequence_alone(kind):
    model = tiny_model(kind)
    seqs, prompts = sequences()
    batch = TokenBatch.pack(seqs, prompts)
    ids, _, _ = batch.rows()
    assert ids.shape[0] < len(seqs)  # some row holds several sequences: the packed mask is exercised
    weights = torch.randn(batch.num_tokens, generator=torch.Generator().manual_seed(5))

    logp, entropy = sequence_logprobs(model, batch, temperature=0.8, return_entropy=True)
    ((logp * weights).sum() + entropy.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ref_logp, ref_entropy = per_sequence(model, seqs, prompts, 0.8)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    ((ref_logp * weights).sum() + ref_entropy.sum()).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_cross_entropy_is_the_weighted_nll(kind):
    model = tiny_model(kind)
    seqs, prompts = sequences()
    batch = TokenBatch.pack(seqs, prompts)
    ref_logp, _ = per_sequence(model, seqs, prompts, 1.0)
    torch.testing.assert_close(sequence_cross_entropy(model, batch), -ref_logp.sum() / batch.mask.sum(),
                               rtol=1e-5, atol=1e-6)
    w = torch.rand(batch.num_tokens, generator=torch.Generator().manual_seed(1)) * batch.mask
    torch.testing.assert_close(sequence_cross_entropy(model, batch, weights=w), -(w * ref_logp).sum(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_scalar_head_on_packed_batches(kind):
    model = tiny_model(kind)
    head = ScalarHeadModel(model.get_decoder() if kind == "llama" else model.transformer).eval()
    seqs, prompts = sequences()
    batch = TokenBatch.pack(seqs, prompts)
    values = head(batch)
    alone = torch.cat([head.head(head.body(input_ids=torch.tensor([s])).last_hidden_state[0]).squeeze(-1)
                       for s in seqs])
    torch.testing.assert_close(values, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.score(batch), values[batch.last_index], rtol=0, atol=0)


def test_disable_dropout_makes_training_forward_deterministic():
    model = tiny_model("gpt2").train()
    batch = TokenBatch.pack(*sequences())
    assert not torch.equal(sequence_logprobs(model, batch), sequence_logprobs(model, batch))  # dropout 0.1
    disable_dropout(model)
    torch.testing.assert_close(sequence_logprobs(model, batch), sequence_logprobs(model.eval(), batch), rtol=0,
                               atol=0)


def test_softcapped_head_is_refused():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8, final_logit_softcapping=30.0))
    seqs, prompts = sequences()
    batch = TokenBatch.pack(seqs, prompts)
    with pytest.raises(ValueError, match="final_logit_softcapping = 30.0"):
        sequence_logprobs(model, batch)
    model.config.final_logit_softcapping = None  # without softcapping the head is a plain Linear: supported
    model.eval()
    torch.testing.assert_close(sequence_logprobs(model, batch), per_sequence(model, seqs, prompts, 1.0)[0],
                               rtol=1e-5, atol=1e-5)


def test_scaled_or_non_linear_head_is_refused():
    model = tiny_model("llama")
    batch = TokenBatch.pack(*sequences())
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        sequence_logprobs(model, batch)
    with pytest.raises(ValueError, match="sequence_cross_entropy does not support .*logit_scale"):
        sequence_cross_entropy(model, batch)
    model.config.logit_scale = None
    model.lm_head = nn.Sequential(nn.Linear(32, VOCAB))
    with pytest.raises(ValueError, match="not a torch.nn.Linear"):
        sequence_logprobs(model, batch)
    with pytest.raises(TypeError, match="model must be"):
        sequence_logprobs("gpt2", batch)
