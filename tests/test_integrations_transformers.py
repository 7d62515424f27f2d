"""patch_causal_lm on tiny Llama / Mistral / Qwen2 / GPT-2 models built here, against model(...).logits."""

import pytest
import torch
import transformers

from rlhf_fast.integrations.transformers import patch_causal_lm

V = 61


def _tiny(family):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=64, pad_token_id=0))


def _batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, V, (3, 11), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding
    attention_mask[2, :3] = 0  # left padding
    return input_ids, attention_mask


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rlhf_logprobs_matches_logits(family, temperature):
    model = patch_causal_lm(_tiny(family)).eval()
    input_ids, attention_mask = _batch()
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    labels[:, :-1].masked_fill_(attention_mask[:, 1:] == 0, -100)
    labels[:, :4] = -100  # score the "response" only

    logp, ent = model.rlhf_logprobs(input_ids, attention_mask, labels, temperature=temperature, return_entropy=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature
    ref_logp_all = torch.log_softmax(logits, -1)
    keep = (labels != -100) & attention_mask.bool()
    ref = torch.where(keep, ref_logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ref_ent = torch.where(keep, -(ref_logp_all.exp() * ref_logp_all).sum(-1), 0.0)
    assert logp.shape == input_ids.shape and logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rlhf_logprobs_gradients_and_default_labels(family):
    model = patch_causal_lm(_tiny(family)).eval()  # GPT-2 has dropout
    input_ids, attention_mask = _batch()
    logp = model.rlhf_logprobs(input_ids, attention_mask)  # default labels: every next real token
    grads = torch.autograd.grad(logp.sum(), list(model.parameters()), allow_unused=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # a pad position scores nothing
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ref = torch.where(keep, ref, 0.0)
    torch.testing.assert_close(logp[:, :-1], ref, atol=1e-5, rtol=1e-5)
    assert torch.all(logp[:, -1] == 0)
    ref_grads = torch.autograd.grad(ref.sum(), list(model.parameters()), allow_unused=True)
    for g, g_ref in zip(grads, ref_grads):
        if g_ref is None:
            assert g is None or torch.all(g == 0)
        else:
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_refused():
    config = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="model_type 'gemma2'.*not supported.*llama"):
        patch_causal_lm(transformers.Gemma2ForCausalLM(config))
    with pytest.raises(ValueError, match="not supported"):
        patch_causal_lm(torch.nn.Linear(3, 3))
