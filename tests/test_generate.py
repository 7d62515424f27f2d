"""rlhf_fast.generate on tiny random-init Llama / GPT-2 / Qwen2 models built here (no download): greedy equals the
model's own forward step by step (no cache) and ``model.generate``, EOS handling, left padding, behaviour log-probs
(unfiltered, filtered, kept threshold) equal a teacher-forced recomputation, shared prefill (num_samples) and refill
(batch_size) give the rows of the plain batch, the dynamic fallback, the compiled step, reproducibility, bad input."""

import warnings

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import rlhf_fast
from rlhf_fast.ops.sampling import kept_mask_ref, threshold_with_margin

PAD, VOCAB = 0, 101


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, pad_token_id=PAD)
    # one thread: the ops of a model this small are far too short to share (and waiting on a busy machine's other
    # thread at every op costs milliseconds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LlamaForCausalLM(config).eval()
    torch.set_num_threads(threads)


def prompts(lengths, seed=0):
    """Left-padded prompts of the given lengths: input_ids, attention_mask [B, max(lengths)]."""
    gen = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD, dtype=torch.int64)
    mask = torch.zeros(len(lengths), P, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[b, P - n:] = 1
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_without_cache(model, ids, mask, n, eos):
    """Greedy decoding by the model's own full forward at every step; pad (mask 0) after a row's EOS."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
        token = torch.where(done, PAD, logits[:, -1].argmax(-1))
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        done |= torch.isin(token, torch.tensor(eos))
        if done.all():
            break
    return ids, mask


def test_greedy_equals_forward_step_by_step(model):
    ids, mask = prompts([5, 3, 7])
    out = rlhf_fast.generate(model, ids, mask, max_new_tokens=12, temperature=0.0, eos_token_id=None,
                             pad_token_id=PAD)
    expect, _ = greedy_without_cache(model, ids, mask, 12, [])
    assert out.sequences.shape == (3, 7 + 12)
    assert torch.equal(out.sequences, expect)
    assert (out.response_mask == 1).all() and (out.logprobs == 0).all()


def test_eos_stops_each_row_and_then_the_batch(model):
    ids, mask = prompts([5, 3, 7], seed=1)
    free = rlhf_fast.generate(model, ids, mask, max_new_tokens=12, temperature=0.0, eos_token_id=None,
                              pad_token_id=PAD).sequences[:, 7:]
    eos = int(free[0, 2])  # row 0 emits it at step 2 (or earlier)
    other = int(free[1, 4])
    out = rlhf_fast.generate(model, ids, mask, max_new_tokens=12, temperature=0.0, eos_token_id=[eos, other],
                             pad_token_id=PAD)
    expect, expect_mask = greedy_without_cache(model, ids, mask, 12, [eos, other])
    assert torch.equal(out.sequences, expect)
    assert torch.equal(out.response_mask, expect_mask[:, 7:])
    for b in range(3):
        hits = torch.isin(free[b], torch.tensor([eos, other])).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 12  # tokens generated, the EOS included
        resp = out.sequences[b, 7:]
        assert out.response_mask[b, :stop].all() and not out.response_mask[b, stop:].any()
        assert (resp[stop:] == PAD).all() and torch.equal(resp[:stop], free[b, :stop])
    # the batch ran until its last row stopped
    stops = [int(torch.isin(free[b], torch.tensor([eos, other])).nonzero()[0]) + 1 for b in (0, 1)]
    assert out.sequences.shape[1] - 7 == (12 if not torch.isin(free[2], torch.tensor([eos, other])).any()
                                          else max(out.response_mask.sum(1).tolist()))
    assert out.response_mask.sum(1)[:2].tolist() == stops


def test_left_padding_gives_the_unpadded_result(model):
    lengths = [6, 2, 4]
    ids, mask = prompts(lengths, seed=2)
    out = rlhf_fast.generate(model, ids, mask, max_new_tokens=8, temperature=0.0, eos_token_id=7, pad_token_id=PAD)
    P = ids.shape[1]
    for b, n in enumerate(lengths):
        alone = rlhf_fast.generate(model, ids[b:b + 1, P - n:], mask[b:b + 1, P - n:], max_new_tokens=8,
                                   temperature=0.0, eos_token_id=7, pad_token_id=PAD)
        k = alone.response_mask.shape[1]
        assert torch.equal(out.sequences[b, P:P + k], alone.sequences[0, n:])
        assert torch.equal(out.response_mask[b, :k], alone.response_mask[0])
        assert not out.response_mask[b, k:].any()


def test_behaviour_logprobs_equal_a_recomputation(model):
    ids, mask = prompts([5, 3, 7, 1], seed=3)
    temperature = 0.8
    out = rlhf_fast.generate(model, ids, mask, max_new_tokens=10, temperature=temperature, top_k=30, top_p=0.9,
                             min_p=0.01, eos_token_id=[3, 5], pad_token_id=PAD,
                             generator=torch.Generator().manual_seed(0))
    P = ids.shape[1]
    full_mask = torch.cat([mask, out.response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions(full_mask)).logits
    lp = torch.log_softmax(logits[:, P - 1:-1].double() / temperature, -1)
    lp = lp.gather(-1, out.sequences[:, P:, None]).squeeze(-1) * out.response_mask
    assert out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs.double(), lp, atol=1e-5)
    assert (out.logprobs[out.response_mask == 0] == 0).all()
    assert (out.sequences[:, P:][out.response_mask == 0] == PAD).all()
    # every sampled token survived the filters (min-p bound, with a hair of float32 slack)
    probs = torch.softmax(logits[:, P - 1:-1].double() / temperature, -1)
    picked = probs.gather(-1, out.sequences[:, P:, None]).squeeze(-1)
    on = out.response_mask == 1
    assert (picked[on] >= 0.01 * (1 - 1e-4) * probs.max(-1).values[on]).all()


def test_reproducible_and_per_row_temperature(model):
    ids, mask = prompts([4, 6, 3], seed=4)
    kw = dict(max_new_tokens=9, top_p=0.95, eos_token_id=11, pad_token_id=PAD)
    a = rlhf_fast.generate(model, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    b = rlhf_fast.generate(model, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    greedy = rlhf_fast.generate(model, ids, mask, temperature=0.0, **kw)
    mixed = rlhf_fast.generate(model, ids, mask, temperature=torch.tensor([0.0, 1.0, 0.0]),
                               generator=torch.Generator().manual_seed(1), **kw)
    for b in (0, 2):
        n = int(greedy.response_mask[b].sum())
        assert torch.equal(mixed.sequences[b, 6:6 + n], greedy.sequences[b, 6:6 + n])
        assert (mixed.logprobs[b] == 0).all()


def test_bad_input(model):
    ids, mask = prompts([3, 5])
    right = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        rlhf_fast.generate(model, ids, right, max_new_tokens=2, eos_token_id=1, pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rlhf_fast.generate(model, ids, mask, max_new_tokens=0, eos_token_id=1, pad_token_id=PAD)
    with pytest.raises(TypeError, match="eos_token_id"):
        rlhf_fast.generate(model, ids, mask, max_new_tokens=2, eos_token_id="</s>", pad_token_id=PAD)
    with pytest.raises(ValueError, match="top_p"):
        rlhf_fast.generate(model, ids, mask, max_new_tokens=2, top_p=0.0, eos_token_id=1, pad_token_id=PAD)
    with pytest.raises(ValueError, match="batch_size"):
        rlhf_fast.generate(model, ids, mask, max_new_tokens=2, eos_token_id=1, pad_token_id=PAD, num_samples=2,
                           batch_size=3)
    with pytest.raises(ValueError, match="cache"):
        rlhf_fast.generate(model, ids, mask, max_new_tokens=2, eos_token_id=1, pad_token_id=PAD, cache="paged")


def other_model(kind):
    torch.manual_seed(1)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=PAD,
                            initializer_range=0.2)
        return GPT2LMHeadModel(config).eval()
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=PAD, use_sliding_window=kind == "qwen2-sliding",
                         sliding_window=4, max_window_layers=0)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_greedy_equals_model_generate(model, kind):
    net = model if kind == "llama" else other_model(kind)
    ids, mask = prompts([6, 2, 4], seed=5)
    out = rlhf_fast.generate(net, ids, mask, max_new_tokens=10, temperature=0.0, eos_token_id=None,
                             pad_token_id=PAD, cache="static")
    ref = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                       pad_token_id=PAD)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_static_equals_dynamic(model, kind):
    """Same draws (same generator state), same tokens and log-probs (fp32, 1e-5) on both caches."""
    net = model if kind == "llama" else other_model(kind)
    ids, mask = prompts([5, 3, 7, 1], seed=6)
    kw = dict(max_new_tokens=9, temperature=0.9, top_p=0.95, eos_token_id=[3, 5], pad_token_id=PAD)
    a = rlhf_fast.generate(net, ids, mask, cache="static", generator=torch.Generator().manual_seed(2), **kw)
    b = rlhf_fast.generate(net, ids, mask, cache="dynamic", generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    for name in ("logprobs", "filtered_logprobs", "kept_threshold"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0), name


def recomputed_logprobs(model, ids, mask, out, temperature):
    P = ids.shape[1]
    full_mask = torch.cat([mask, out.response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions(full_mask)).logits
    lp = torch.log_softmax(logits[:, P - 1:-1].double() / temperature, -1)
    return lp.gather(-1, out.sequences[:, P:, None]).squeeze(-1) * out.response_mask


def test_shared_prefill_groups(model):
    ids, mask = prompts([5, 2, 7], seed=7)
    G = 4
    greedy = rlhf_fast.generate(model, ids, mask, max_new_tokens=8, temperature=0.0, eos_token_id=9,
                                pad_token_id=PAD, num_samples=G)
    alone = rlhf_fast.generate(model, ids, mask, max_new_tokens=8, temperature=0.0, eos_token_id=9,
                               pad_token_id=PAD)
    assert greedy.sequences.shape[0] == 3 * G
    for g in range(G):
        assert torch.equal(greedy.sequences[g::G], alone.sequences)
    out = rlhf_fast.generate(model, ids, mask, max_new_tokens=8, temperature=0.7, eos_token_id=9, pad_token_id=PAD,
                             num_samples=G, generator=torch.Generator().manual_seed(3))
    rids, rmask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    assert torch.equal(out.sequences[:, :ids.shape[1]], rids)
    assert torch.allclose(out.logprobs.double(), recomputed_logprobs(model, rids, rmask, out, 0.7), atol=1e-5)
    assert len({tuple(r) for r in out.sequences[:G].tolist()}) > 1  # the G samples of a prompt differ
    # per-prompt temperatures follow their G rows
    mixed = rlhf_fast.generate(model, ids, mask, max_new_tokens=8, temperature=torch.tensor([0.0, 1.0, 0.0]),
                               eos_token_id=9, pad_token_id=PAD, num_samples=G,
                               generator=torch.Generator().manual_seed(3))
    for b in (0, 2):
        assert torch.equal(mixed.sequences[b * G:(b + 1) * G], greedy.sequences[b * G:(b + 1) * G])


@pytest.mark.parametrize("G,width", [(1, 2), (2, 4)])
def test_refill_gives_the_rows_of_the_full_batch(model, G, width):
    lengths = [6, 2, 4, 3, 5, 1, 6]
    ids, mask = prompts(lengths, seed=8)
    free = rlhf_fast.generate(model, ids, mask, max_new_tokens=10, temperature=0.0, eos_token_id=None,
                              pad_token_id=PAD).sequences[:, ids.shape[1]:]
    eos = [int(free[0, 1]), int(free[3, 5])]  # rows stop at different steps
    kw = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD, num_samples=G)
    full = rlhf_fast.generate(model, ids, mask, temperature=0.0, **kw)
    refill = rlhf_fast.generate(model, ids, mask, temperature=0.0, batch_size=width, **kw)
    assert torch.equal(refill.sequences, full.sequences) and torch.equal(refill.response_mask, full.response_mask)
    assert len(set(full.response_mask.sum(1).tolist())) > 1
    out = rlhf_fast.generate(model, ids, mask, temperature=1.0, batch_size=width,
                             generator=torch.Generator().manual_seed(4), **kw)
    rids, rmask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    assert torch.allclose(out.logprobs.double(), recomputed_logprobs(model, rids, rmask, out, 1.0), atol=1e-5)
    assert (out.sequences[:, ids.shape[1]:][out.response_mask == 0] == PAD).all()


def recomputed_kept(model, ids, mask, out, G, temperature, top_k, top_p, min_p):
    """Teacher-forced: each generated token's logits from a plain forward of the full sequence, the reference's kept
    set with the same (per-prompt) parameters -> (filtered log-prob, kept threshold) [R, N], 0 after a row's end."""
    P = ids.shape[1]
    full_mask = torch.cat([mask, out.response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions(full_mask)).logits
    x = logits[:, P - 1:-1].float()  # [R, N, V]: the logits each token was drawn from
    R, N, V = x.shape
    per_row = [torch.as_tensor(v).expand(ids.shape[0] // G).repeat_interleave(G)[:, None].expand(R, N).reshape(-1)
               for v in (temperature, top_k, top_p, min_p)]
    t, k, p, m = per_row
    x = x.reshape(R * N, V)
    greedy = t == 0
    logp = torch.log_softmax(x / torch.where(greedy, 1.0, t)[:, None], -1)
    keep = kept_mask_ref(logp.exp(), k, p, m)
    active = ((k > 0) & (k < V)) | (p < 1) | (m > 0)
    thr = torch.where(active, torch.where(keep, x, float("inf")).amin(-1), float("-inf"))
    thr = threshold_with_margin(x, torch.where(greedy, x.max(-1).values, thr))
    lp = logp.double()
    tok = out.sequences[:, P:].reshape(-1, 1)
    flp = lp.gather(1, tok).squeeze(1) - torch.where(keep, lp, float("-inf")).logsumexp(-1)
    flp = torch.where(greedy, 0.0, flp)
    on = out.response_mask.bool()
    return (torch.where(on, flp.reshape(R, N), 0.0), torch.where(on, thr.reshape(R, N), 0.0))


@pytest.mark.parametrize("cache,G,width", [("static", 1, None), ("static", 2, 4), ("dynamic", 2, None)])
def test_filtered_logprobs_and_kept_threshold_equal_a_recomputation(model, cache, G, width):
    lengths = [5, 3, 7, 1, 4]
    ids, mask = prompts(lengths, seed=11)
    # per-prompt filters: top-k + top-p + min-p, top-p, none (-inf), greedy (the max logit), min-p
    params = dict(temperature=torch.tensor([0.8, 1.0, 1.0, 0.0, 0.7]), top_k=torch.tensor([30, 0, 0, 5, 0]),
                  top_p=torch.tensor([0.9, 0.7, 1.0, 1.0, 1.0]), min_p=torch.tensor([0.01, 0.0, 0.0, 0.0, 0.1]))
    eos = [3, 5, 7, 11, 13, 17, 19, 23]  # ~8 % a step: rows end at different steps
    out = rlhf_fast.generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD,
                             num_samples=G, batch_size=width, cache=cache, generator=torch.Generator().manual_seed(6),
                             **params)
    assert out.filtered_logprobs.dtype == out.kept_threshold.dtype == torch.float32
    assert out.filtered_logprobs.shape == out.kept_threshold.shape == out.logprobs.shape
    rids, rmask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    flp, thr = recomputed_kept(model, rids, rmask, out, G, **params)
    on = out.response_mask.bool()
    assert len(set(out.response_mask.sum(1).tolist())) > 1 and not on.all()  # rows end at different steps
    assert (out.filtered_logprobs[~on] == 0).all() and (out.kept_threshold[~on] == 0).all()
    assert torch.allclose(out.filtered_logprobs.double(), flp, atol=1e-5, rtol=0)
    assert torch.allclose(out.kept_threshold, thr, atol=1e-5, rtol=0)  # -inf exactly where no filter is on
    assert torch.equal(out.kept_threshold.isinf(), thr.isinf())
    row = torch.arange(out.sequences.shape[0]) // G  # prompt of each row
    assert (out.kept_threshold[(row == 2)[:, None] & on] == float("-inf")).all()  # no filter
    unfiltered = (row == 2)[:, None] & on
    assert torch.allclose(out.filtered_logprobs[unfiltered], out.logprobs[unfiltered], atol=1e-6, rtol=0)
    assert torch.isfinite(out.kept_threshold[(row != 2)[:, None] & on]).all()
    # the drawn tokens are in {v : logits_v >= threshold}; filtering raises the log-prob
    assert (out.filtered_logprobs[on] >= out.logprobs[on] - 1e-6).all()


def test_sliding_window_model_falls_back_with_one_warning():
    net = other_model("qwen2-sliding")
    ids, mask = prompts([5, 3], seed=9)
    kw = dict(max_new_tokens=6, temperature=0.0, eos_token_id=None, pad_token_id=PAD)
    with pytest.warns(UserWarning, match="falls back to the dynamic cache"):
        out = rlhf_fast.generate(net, ids, mask, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = rlhf_fast.generate(net, ids, mask, **kw)
    ref = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                       pad_token_id=PAD)
    assert torch.equal(out.sequences, ref) and torch.equal(again.sequences, ref)
    with pytest.raises(ValueError, match="sliding_attention"):
        rlhf_fast.generate(net, ids, mask, cache="static", **kw)


@pytest.mark.slow
def test_compiled_step_equals_eager(model):
    """torch.compile of the decode step (inductor on CPU; ~30 s of compile time)."""
    ids, mask = prompts([4, 2], seed=10)
    kw = dict(max_new_tokens=5, temperature=0.8, top_k=20, eos_token_id=None, pad_token_id=PAD)
    a = rlhf_fast.generate(model, ids, mask, compile=True, generator=torch.Generator().manual_seed(5), **kw)
    b = rlhf_fast.generate(model, ids, mask, compile=False, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a.sequences, b.sequences)
    for name in ("logprobs", "filtered_logprobs", "kept_threshold"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0), name
