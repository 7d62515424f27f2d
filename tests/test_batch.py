"""TokenBatch: packing, sub-batches, the decoder's row layout, and rollouts of rlhf_fast.generate turned into packed
batches whose training forward gives the sampler's own behaviour log-probs."""

import pytest
import torch

import rlhf_fast
from rlhf_fast.batch import TokenBatch
from rlhf_fast.models import sequence_logprobs

from test_models_logprobs import VOCAB, tiny_model


def test_pack_hand_computed():
    b = TokenBatch.pack([[1, 2, 3, 4], [5, 6], [7, 8, 9]], [2, 1, 0])
    assert b.cu_seqlens.tolist() == [0, 4, 6, 9] and b.prompt_lens.tolist() == [2, 1, 0]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert b.seq_ids.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    # position t predicts token t + 1: response tokens 3, 4 | 6 | 8, 9 (no prompt: every token after the first)
    assert b.labels.tolist() == [-100, 3, 4, -100, 6, -100, 8, 9, -100]
    assert b.last_index.tolist() == [3, 5, 8]
    assert b.padded(b.input_ids, -1).tolist() == [[1, 2, 3, 4], [5, 6, -1, -1], [7, 8, 9, -1]]
    torch.testing.assert_close(b.unpadded(b.padded(b.input_ids)), b.input_ids)
    with pytest.raises(ValueError, match="at least one token"):
        TokenBatch.pack([[1], []], [1, 0])
    with pytest.raises(ValueError, match="2 sequences but 1 prompt"):
        TokenBatch.pack([[1], [2]], [1])


def test_select_keeps_every_field_in_order():
    b = TokenBatch.pack([[1, 2, 3, 4], [5, 6], [7, 8, 9]], [2, 1, 0])
    b.advantages = torch.arange(9.0)
    b.scores = torch.tensor([10.0, 11.0, 12.0])
    s = b.select([2, 0])
    assert s.input_ids.tolist() == [7, 8, 9, 1, 2, 3, 4] and s.cu_seqlens.tolist() == [0, 3, 7]
    assert s.labels.tolist() == [8, 9, -100, -100, 3, 4, -100] and s.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert s.advantages.tolist() == [6.0, 7.0, 8.0, 0.0, 1.0, 2.0, 3.0] and s.scores.tolist() == [12.0, 10.0]
    assert s.prompt_lens.tolist() == [0, 2] and s.old_logp is None


def test_rows_place_sequences_first_fit():
    b = TokenBatch.pack([[1, 2, 3, 4], [5, 6], [7, 8, 9]], [1, 1, 1])
    ids, pos, index = b.rows()
    assert ids.tolist() == [[1, 2, 3, 4], [7, 8, 9, 0], [5, 6, 0, 0]]
    # row padding restarts at 0: a sequence of its own, which no real token attends to
    assert pos.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert torch.equal(ids.reshape(-1)[index], b.input_ids) and torch.equal(pos.reshape(-1)[index], b.position_ids)
    ids, pos, index = b.rows(row_len=9)  # one row, as FlashAttention-2 varlen takes it
    assert ids.shape == (1, 9) and torch.equal(ids.reshape(-1)[index], b.input_ids)


def test_from_generation_hand_computed():
    seq = torch.tensor([[0, 0, 1, 2, 10, 11, 0], [0, 3, 4, 5, 12, 0, 0]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    b = TokenBatch.from_generation(seq, prompt_mask, response_mask,
                                   old_logp=torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0, 0]]))
    assert b.input_ids.tolist() == [1, 2, 10, 11, 3, 4, 5, 12] and b.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert b.labels.tolist() == [-100, 10, 11, -100, -100, -100, 12, -100]
    assert b.old_logp.tolist() == [0.0, -1.0, -2.0, 0.0, 0.0, 0.0, -3.0, 0.0] and b.prompt_lens.tolist() == [2, 3]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_sampler_logprobs_equal_the_training_forward(kind):
    """Left-padded prompts of different lengths: the packed training forward (no padding, per-sequence positions)
    gives exactly the behaviour log-probs of the KV-cache sampler, so the first PPO ratio is 1."""
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(0)
    lens = [2, 6, 4, 1]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        ids[i, -n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, -n:] = 1
    out = rlhf_fast.generate(model, ids, mask, max_new_tokens=6, temperature=0.9, eos_token_id=5, pad_token_id=0,
                             generator=g)
    batch = TokenBatch.from_generation(out.sequences, mask, out.response_mask, old_logp=out.logprobs)
    with torch.no_grad():
        logp = sequence_logprobs(model, batch, temperature=0.9)
    assert batch.mask.sum() == out.response_mask.sum()
    torch.testing.assert_close(logp, batch.old_logp, rtol=1e-5, atol=1e-5)
