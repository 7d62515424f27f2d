"""rlhf_fast.linear_dpo_loss against a float64 reference of the DPO family written here from the formulas, and the
same-dtype unfused composite linear_dpo_loss_ref (hidden @ W.T -> log-probs -> dpo_pair_loss, autograd), values and
gradients (tolerance rule of the log-prob ops): packed pairs in any token order and the padded [2P, T, H] layout,
chunk boundaries inside the batch, empty responses, pair and NLL weights, SimPO, opcheck, torch.compile."""

import contextlib
import importlib
import math

import pytest
import torch

import rlhf_fast
from _testing import assert_within_ref_error, device_backends, largest_new_tensor_in_backward

ll = importlib.import_module("rlhf_fast.ops.linear_losses")
lce = importlib.import_module("rlhf_fast.ops.linear_cross_entropy")
BACKENDS = device_backends(ll.LINEAR_LOGPROBS_BACKENDS)


def packed_pairs(lens, hidden_size, vocab, dtype, *, bias=True, shuffle=True, device="cpu", seed=0):
    """P pairs with response lengths lens = [(chosen, rejected)] (0 allowed), two prompt tokens each (ignored):
    hidden [N, H], weight, bias, labels [N], seq_ids [N] (token order shuffled with ``shuffle``), ref_c, ref_r [P]."""
    g = torch.Generator().manual_seed(seed)
    pairs = len(lens)
    seq_len = [n for n, _ in lens] + [n for _, n in lens]
    seq_ids = torch.cat([torch.full((2 + n,), s) for s, n in enumerate(seq_len)])
    labels = torch.randint(0, vocab, seq_ids.shape, generator=g)
    starts = torch.cumsum(torch.tensor([0] + [2 + n for n in seq_len[:-1]]), 0)
    for s in starts.tolist():
        labels[s:s + 2] = -100  # prompt positions
    if shuffle:
        perm = torch.randperm(seq_ids.numel(), generator=g)
        seq_ids, labels = seq_ids[perm], labels[perm]
    hidden = torch.randn(seq_ids.numel(), hidden_size, generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size ** 0.5 * 3).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    ref_c = -torch.rand(pairs, generator=g) * 4 * max(1, max(seq_len))
    ref_r = -torch.rand(pairs, generator=g) * 4 * max(1, max(seq_len))
    put = lambda x: None if x is None else x.to(device)  # noqa: E731
    return tuple(put(x) for x in (hidden, weight, b, labels, seq_ids, ref_c, ref_r))


def exact(hidden, weight, bias, labels, seq_ids, ref_c, ref_r, *, beta, loss_type, label_smoothing=0.0,
          simpo_gamma=None, nll_coef=0.0, pair_weights=None, nll_weights=None, temperature=1.0):
    """The DPO family from the formulas (docs/formulas.md, "DPO"), float64."""
    z = (hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)) / temperature
    keep = labels != -100
    logp = torch.log_softmax(z, -1).gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, 0.0)
    p = ref_c.shape[0]
    s = torch.zeros(2 * p, dtype=torch.float64).index_add(0, seq_ids.cpu(), logp.cpu())
    n = torch.zeros(2 * p, dtype=torch.float64).index_add(0, seq_ids.cpu(), keep.double().cpu()).clamp_min(1)
    if simpo_gamma is not None:
        rho_c, rho_r = s[:p] / n[:p], s[p:] / n[p:]
    else:
        rho_c, rho_r = s[:p] - ref_c.double().cpu(), s[p:] - ref_r.double().cpu()
    m = beta * (rho_c - rho_r) - (simpo_gamma or 0.0)
    eps = label_smoothing
    logsig = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        per = -(1 - eps) * logsig(m) - eps * logsig(-m)
    elif loss_type == "robust":
        per = (-(1 - eps) * logsig(m) + eps * logsig(-m)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        per = torch.clamp(1 - m, min=0)
    else:  # ipo: length-normalised log-ratios
        per = (rho_c / n[:p] - rho_r / n[p:] - 1 / (2 * beta)) ** 2
    pw = torch.full((p,), 1.0 / p, dtype=torch.float64) if pair_weights is None else pair_weights.double().cpu()
    if nll_weights is None:
        chosen = (keep & (seq_ids < p)).double()
        u = chosen / chosen.sum().clamp_min(1)
    else:
        u = nll_weights.double()
    return (pw * per).sum() + nll_coef * -(u.cpu() * logp.cpu()).sum()


def loss_and_grads(fn, leaves_in, upstream=0.7):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in leaves_in]
    loss = fn(*leaves)
    loss = loss[0] if isinstance(loss, tuple) else loss
    return [loss, *torch.autograd.grad(loss * upstream, [x for x in leaves if x is not None])]


CASES = [dict(loss_type="sigmoid", beta=0.1),
         dict(loss_type="sigmoid", label_smoothing=0.1, nll_coef=0.5, beta=0.2),
         dict(loss_type="robust", label_smoothing=0.2, beta=0.1),
         dict(loss_type="ipo", beta=0.5),
         dict(loss_type="hinge", beta=0.05),
         dict(loss_type="sigmoid", simpo_gamma=0.3, beta=2.0, nll_coef=0.2),
         dict(loss_type="hinge", simpo_gamma=0.5, beta=1.0)]
LENS = [(3, 4), (0, 2), (5, 1), (2, 2), (6, 3)]  # pair 1 has an empty chosen response


def check(inputs, kw, *, temperature=1.0, backend=None, seq_ids_arg=True):
    hidden, weight, bias, labels, seq_ids, ref_c, ref_r = inputs
    sid = dict(seq_ids=seq_ids) if seq_ids_arg else {}

    def ours(h, w, b):
        return rlhf_fast.linear_dpo_loss(h, w, labels, ref_c, ref_r, bias=b, temperature=temperature, **sid, **kw)

    with rlhf_fast.use_backend(backend) if backend else contextlib.nullcontext():
        out = loss_and_grads(ours, (hidden, weight, bias))
    same = loss_and_grads(lambda h, w, b: ll.linear_dpo_loss_ref(h, w, labels, ref_c, ref_r, bias=b,
                                                                 temperature=temperature, **sid, **kw),
                          (hidden, weight, bias))
    flat = lambda x: x.reshape(-1, x.shape[-1]) if x.dim() == 3 else x  # noqa: E731
    ex = loss_and_grads(lambda h, w, b: exact(flat(h), w, b, labels.reshape(-1), seq_ids.reshape(-1), ref_c, ref_r,
                                              temperature=temperature, **kw), (hidden, weight, bias))
    for name, o, r, e in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], out, same, ex):
        assert o.shape == e.shape, name
        # low precision: sequence sums of bf16/fp16-rounded logits, and chunked GEMMs of gathered rows round
        # otherwise than one full GEMM (measured on 6 seeds: loss errors of both within 2.5e-3 of float64): the
        # same-dtype error bound, or half a bf16 ulp at 1
        low = hidden.dtype != torch.float32
        assert_within_ref_error(o.cpu(), r.cpu(), e, name=name, factor=4.0 if low else 2.0,
                                floor=4e-3 if low else 1e-5)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kw", CASES, ids=[f"{c['loss_type']}-{i}" for i, c in enumerate(CASES)])
def test_packed_matches_reference(device, backend, dtype, kw, monkeypatch):
    # chunks of at most 12 rows of V = 41 logits: pairs 0-1 (9 response tokens), 2-3 (10), 4 (9)
    for dev in ("cpu", "cuda"):
        monkeypatch.setitem(lce.CHUNK_BYTES, dev, 4 * 12 * 41)
    assert ll._pair_chunks([7, 2, 6, 4, 9], 12) == [(0, 2, 0, 9), (2, 4, 9, 19), (4, 5, 19, 28)]
    check(packed_pairs(LENS, 16, 41, dtype, device=device), kw, temperature=0.9, backend=backend)


@pytest.mark.parametrize("kw", CASES, ids=[f"{c['loss_type']}-{i}" for i, c in enumerate(CASES)])
def test_a_pair_larger_than_the_chunk_budget_is_cut_into_pieces(monkeypatch, kw):
    """Pairs 0 (7 tokens) and 3 (5) span pieces of 3 rows; no chunk ever holds more than 3 rows of logits. Their
    pieces go through the logits once (gradients scaled by the pair's slope at the end), twice with an NLL term."""
    monkeypatch.setitem(lce.CHUNK_BYTES, "cpu", 4 * 3 * 41)
    assert ll._pair_chunks([7, 0, 2, 5], 3) == [(0, 1, 0, 7), (1, 3, 7, 9), (3, 4, 9, 14)]
    shapes, tile = [], ll._tile_logits
    monkeypatch.setattr(ll, "_tile_logits", lambda h, *a, **k: shapes.append(h.shape[0]) or tile(h, *a, **k))
    check(packed_pairs([(4, 3), (0, 0), (1, 1), (2, 3)], 16, 41, torch.float32), kw)
    twice = 2 if kw.get("nll_coef") else 1
    expected = [3, 3, 1] * twice + [2] + [3, 2] * twice
    assert max(shapes) == 3 and shapes[:len(expected)] == expected


def test_padded_layout_and_weights():
    """[2P, T, H] rows (TRL's layout), pair weights and NLL token weights of one's own choosing."""
    p, t = 3, 5
    hidden, weight, bias, labels, _, ref_c, ref_r = packed_pairs([(t - 2, t - 2)] * p, 8, 23, torch.float16,
                                                                 shuffle=False)
    hidden, labels = hidden.view(2 * p, t, -1), labels.view(2 * p, t)
    labels[-1, -2:] = -100  # padding of one rejected response
    seq_ids = torch.arange(2 * p).repeat_interleave(t)
    check((hidden, weight, bias, labels, seq_ids, ref_c, ref_r), CASES[1], seq_ids_arg=False)
    kw = dict(beta=0.3, nll_coef=0.4, pair_weights=torch.tensor([0.5, 0.0, 2.0]),
              nll_weights=torch.rand(2 * p, t, generator=torch.Generator().manual_seed(1)).view(-1))
    packed = (hidden.view(2 * p * t, -1), weight, bias, labels.view(-1), seq_ids, ref_c, ref_r)
    check(packed, dict(kw, loss_type="sigmoid"))
    padded_kw = dict(kw, nll_weights=kw["nll_weights"].view(2 * p, t))
    padded = rlhf_fast.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, **padded_kw)[0]
    h, w, _, y = packed[:4]
    assert padded == rlhf_fast.linear_dpo_loss(h, w, y, ref_c, ref_r, bias=bias, seq_ids=seq_ids, **kw)[0]


def test_stats_and_sequence_logps():
    hidden, weight, bias, labels, seq_ids, ref_c, ref_r = packed_pairs(LENS, 8, 30, torch.float32)
    _, stats, seq = rlhf_fast.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, seq_ids=seq_ids,
                                              beta=0.3, return_sequence_logps=True)
    logp = rlhf_fast.linear_logprobs(hidden, weight, labels, bias=bias)
    expect_seq = torch.zeros(10).index_add(0, seq_ids, logp)
    torch.testing.assert_close(seq, expect_seq, rtol=1e-5, atol=1e-5)
    assert seq[1] == 0  # pair 1's empty chosen response
    rc, rr = 0.3 * (expect_seq[:5] - ref_c), 0.3 * (expect_seq[5:] - ref_r)
    chosen = (labels != -100) & (seq_ids < 5)
    expect = {"chosen_rewards": rc.mean(), "rejected_rewards": rr.mean(), "margins": (rc - rr).mean(),
              "accuracy": (rc > rr).float().mean(), "nll": -logp[chosen].mean()}
    assert set(stats) == set(ll.DPO_STATS)
    for name, value in expect.items():
        torch.testing.assert_close(stats[name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert 0 < stats["accuracy"] < 1


def test_only_the_loss_is_differentiable_and_backward_copies_nothing():
    hidden, weight, bias, labels, seq_ids, ref_c, ref_r = packed_pairs(LENS, 8, 300, torch.float32)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss, stats, seq = rlhf_fast.linear_dpo_loss(h, w, labels, ref_c, ref_r, bias=bias, seq_ids=seq_ids,
                                                 return_sequence_logps=True)
    assert loss.requires_grad and not seq.requires_grad and not any(v.requires_grad for v in stats.values())
    # no zero gradients for the op's other outputs (two of them [N, H] and [V, H]), no copy of the gradients
    assert largest_new_tensor_in_backward(loss * 2) < h.numel() < w.numel()


def test_sigmoid_at_zero_margin_is_log2():
    hidden, weight, bias, labels, seq_ids, _, _ = packed_pairs([(3, 3), (2, 2)], 8, 10, torch.float32, shuffle=False)
    half = hidden.shape[0] // 2
    hidden, labels = torch.cat([hidden[:half], hidden[:half]]), torch.cat([labels[:half], labels[:half]])
    loss, stats = rlhf_fast.linear_dpo_loss(hidden, weight, labels, torch.zeros(2), torch.zeros(2), bias=bias,
                                            seq_ids=seq_ids)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and stats["margins"].item() == 0


def test_unfused_composite_on_a_causal_lm_batch():
    """The trainer's path: sequence_dpo_loss on a tiny Llama equals linear -> logprobs -> dpo_pair_loss of the
    model's own logits (values and parameter gradients)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_fast.batch import TokenBatch
    from rlhf_fast.models import sequence_dpo_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    seqs = [torch.randint(0, 40, (n,)).tolist() for n in (6, 5, 7, 4)]
    batch = TokenBatch.pack(seqs, [2, 3, 2, 2])
    ref = torch.tensor([-9.0, -7.0]), torch.tensor([-8.0, -6.0])
    loss, stats, seq = sequence_dpo_loss(model, batch, *ref, beta=0.2, nll_coef=0.3)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    pieces = []
    for s, n in zip(seqs, [2, 3, 2, 2]):
        logits = model(torch.tensor([s])).logits[0, :-1]
        pieces.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(s[1:])[:, None])[n - 1:, 0])
    sums = torch.stack([x.sum() for x in pieces])
    lens = torch.tensor([float(len(x)) for x in pieces])
    per = ll.dpo_pair_loss(sums[:2], sums[2:], *ref, lens[:2], lens[2:], beta=0.2)[0]
    composite = per.mean() + 0.3 * -torch.cat(pieces[:2]).mean()
    torch.testing.assert_close(seq, sums.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, composite, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(composite, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_opcheck(device, backend):
    hidden, weight, bias, labels, seq_ids, ref_c, ref_r = packed_pairs(LENS[:3], 8, 19, torch.float32, device=device)
    for x in (hidden, weight, bias):
        x.requires_grad_()
    pw = torch.full((3,), 1 / 3, device=device)
    nw = torch.rand(labels.shape, device=device)
    torch.library.opcheck(ll.linear_dpo_loss_op, (hidden, weight, bias, labels, seq_ids, ref_c, ref_r, pw, nw, 0.9,
                                                  -100, 0.1, "sigmoid", 0.1, None, 0.2, 5, True, True, True, backend))
    torch.library.opcheck(ll.linear_dpo_loss_op, (hidden, weight, None, labels, seq_ids, ref_c, ref_r, pw, nw, 1.0,
                                                  -100, 0.5, "hinge", 0.0, 0.4, 0.0, 64, False, True, False, backend))


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels, seq_ids, ref_c, ref_r = packed_pairs(LENS[:2], 8, 19, torch.float32)

    def f(h, w, b):
        loss, stats = rlhf_fast.linear_dpo_loss(h, w, labels, ref_c, ref_r, bias=b, seq_ids=seq_ids, nll_coef=0.3)
        return loss * 2, stats["margins"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves, leaves_e = ([x.clone().requires_grad_() for x in (hidden, weight, bias)] for _ in range(2))
    (out, m), (out_e, m_e) = compiled(*leaves), f(*leaves_e)
    torch.testing.assert_close(out, out_e)
    torch.testing.assert_close(m, m_e)
    for a, b in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(out_e, leaves_e)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case, error, match", [
    ("odd", ValueError, r"without seq_ids, hidden must be \[2P, T, H\]"),
    ("packed_3d", ValueError, r"with seq_ids, hidden must be packed \[N, H\]"),
    ("ref_shape", ValueError, r"ref_rejected_logp must have shape \(2,\)"),
    ("seq_range", ValueError, r"seq_ids must be in \[0, 2P\) = \[0, 4\)"),
    ("seq_dtype", TypeError, "seq_ids must be int64"),
    ("pair_weights", ValueError, "pair_weights must have shape"),
    ("nll_weights", ValueError, "nll_weights must have shape"),
    ("loss_type", ValueError, "loss_type"),
    ("smoothing", ValueError, "label_smoothing must be in"),
    ("simpo_ipo", ValueError, "simpo_gamma needs loss_type"),
])
def test_bad_input(case, error, match):
    hidden, weight, _, labels, seq_ids, ref_c, ref_r = packed_pairs([(2, 2), (1, 3)], 4, 10, torch.float32)
    kwargs = {"seq_ids": seq_ids}
    if case == "odd":
        hidden, labels = hidden[:9].view(3, 3, 4), labels[:9].view(3, 3)
        kwargs = {}
    elif case == "packed_3d":
        hidden, labels, kwargs["seq_ids"] = hidden[:12].view(4, 3, 4), labels[:12].view(4, 3), seq_ids[:12].view(4, 3)
    elif case == "ref_shape":
        ref_r = torch.zeros(3)
    elif case == "seq_range":
        kwargs["seq_ids"] = seq_ids.clone().index_fill_(0, torch.tensor([3]), 4)
    elif case == "seq_dtype":
        kwargs["seq_ids"] = seq_ids.int()
    elif case == "pair_weights":
        kwargs["pair_weights"] = torch.ones(3)
    elif case == "nll_weights":
        kwargs["nll_weights"] = torch.ones(3)
    elif case == "loss_type":
        kwargs["loss_type"] = "kto"
    elif case == "smoothing":
        kwargs["label_smoothing"] = 0.5
    elif case == "simpo_ipo":
        kwargs.update(loss_type="ipo", simpo_gamma=0.5)
    with pytest.raises(error, match=match):
        rlhf_fast.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, **kwargs)
