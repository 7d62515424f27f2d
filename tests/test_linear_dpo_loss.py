"""rlhf_fast.linear_dpo_loss against a float64 reference of the DPO losses written here from the formulas and the
same-dtype reference linear_dpo_loss_ref (tolerance rule of the log-prob ops), values and gradients."""

import contextlib
import importlib
import math

import pytest
import torch
from test_linear_logprobs import make_inputs

import rlhf_fast
from _testing import assert_within_ref_error, device_backends

ll = importlib.import_module("rlhf_fast.ops.linear_losses")
lce = importlib.import_module("rlhf_fast.ops.linear_cross_entropy")
BACKENDS = device_backends(ll.LINEAR_LOGPROBS_BACKENDS)


def pair_inputs(pairs, seq, hidden_size, vocab, dtype, bias=True, device="cpu", seed=0):
    hidden, weight, b, labels = make_inputs((2 * pairs, seq), hidden_size, vocab, dtype, bias=bias, seed=seed,
                                            device=device)
    labels[:, :2] = -100  # prompt positions
    labels[-1, -3:] = -100  # padding of one rejected response
    g = torch.Generator().manual_seed(seed + 1)
    ref_c = (-torch.rand(pairs, generator=g) * seq * 4).to(device)
    ref_r = (-torch.rand(pairs, generator=g) * seq * 4).to(device)
    return (hidden, weight, b, labels), ref_c, ref_r


def exact(hidden, weight, bias, labels, ref_c, ref_r, *, beta, loss_type, label_smoothing, nll_coef, temperature):
    """The DPO losses from the formulas, float64."""
    z = (hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)) / temperature
    keep = labels != -100
    logp = torch.log_softmax(z, -1).gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    seq = torch.where(keep, logp, 0.0).sum(-1)
    p = hidden.shape[0] // 2
    u = (seq[:p] - ref_c.double()) - (seq[p:] - ref_r.double())
    ls = label_smoothing
    logsig = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        per = -(1 - ls) * logsig(beta * u) - ls * logsig(-beta * u)
    elif loss_type == "robust":
        per = (-(1 - ls) * logsig(beta * u) + ls * logsig(-beta * u)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        per = torch.clamp(1 - beta * u, min=0)
    else:
        per = (u - 1 / (2 * beta)) ** 2
    return per.mean() + nll_coef * -seq[:p].sum() / keep[:p].sum()


def loss_and_grads(fn, inputs, upstream=0.7):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs[:3]]
    loss = fn(*leaves)
    loss = loss[0] if isinstance(loss, tuple) else loss
    return [loss, *torch.autograd.grad(loss * upstream, [x for x in leaves if x is not None])]


CASES = [dict(loss_type="sigmoid", label_smoothing=0.0, nll_coef=0.0, beta=0.1),
         dict(loss_type="sigmoid", label_smoothing=0.1, nll_coef=0.5, beta=0.2),
         dict(loss_type="robust", label_smoothing=0.2, nll_coef=0.0, beta=0.1),
         dict(loss_type="ipo", label_smoothing=0.0, nll_coef=0.0, beta=0.5),
         dict(loss_type="hinge", label_smoothing=0.0, nll_coef=0.0, beta=0.05)]


def check(inputs, ref_c, ref_r, kw, *, temperature=1.0, backend=None):
    labels = inputs[3]

    def ours(h, w, b):
        return rlhf_fast.linear_dpo_loss(h, w, labels, ref_c, ref_r, bias=b, temperature=temperature, **kw)

    with rlhf_fast.use_backend(backend) if backend else contextlib.nullcontext():
        out = loss_and_grads(ours, inputs)
    same = loss_and_grads(lambda h, w, b: ll.linear_dpo_loss_ref(h, w, labels, ref_c, ref_r, bias=b,
                                                                 temperature=temperature, **kw), inputs)
    ex = loss_and_grads(lambda h, w, b: exact(h, w, b, labels, ref_c, ref_r, temperature=temperature, **kw), inputs)
    for name, o, r, e in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], out, same, ex):
        assert o.shape == e.shape, name
        # low precision: sequence sums of bf16/fp16-rounded logits; chunked and full GEMMs round differently
        assert_within_ref_error(o, r, e, name=name, factor=2.0 if inputs[0].dtype == torch.float32 else 4.0)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kw", CASES, ids=[f"{c['loss_type']}-{i}" for i, c in enumerate(CASES)])
def test_matches_reference(device, backend, dtype, kw, monkeypatch):
    # 5 pairs of 6 tokens, V = 41: a budget of 2 pairs (24 rows) per chunk, the last chunk one pair
    for dev in ("cpu", "cuda"):
        monkeypatch.setitem(lce.CHUNK_BYTES, dev, 4 * 24 * 41)
    assert ll.dpo_pairs_per_chunk(5, 6, 41, torch.device(device)) == 2
    inputs, ref_c, ref_r = pair_inputs(5, 6, 16, 41, dtype, device=device)
    check(inputs, ref_c, ref_r, kw, temperature=0.9, backend=backend)


def test_fp16_no_bias_one_pair():
    inputs, ref_c, ref_r = pair_inputs(1, 4, 8, 23, torch.float16, bias=False)
    check(inputs, ref_c, ref_r, CASES[1])


def test_stats():
    inputs, ref_c, ref_r = pair_inputs(6, 5, 8, 30, torch.float32)
    hidden, weight, bias, labels = inputs
    _, stats = rlhf_fast.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, beta=0.3)
    seq = rlhf_fast.linear_logprobs(hidden, weight, labels, bias=bias).sum(-1)
    rc, rr = 0.3 * (seq[:6] - ref_c), 0.3 * (seq[6:] - ref_r)
    expect = {"chosen_rewards": rc.mean(), "rejected_rewards": rr.mean(), "margins": (rc - rr).mean(),
              "accuracy": (rc > rr).float().mean(), "nll": -seq[:6].sum() / (labels[:6] != -100).sum()}
    assert set(stats) == set(ll.DPO_STATS)
    for name, value in expect.items():
        torch.testing.assert_close(stats[name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert 0 < stats["accuracy"] < 1


def test_sigmoid_at_zero_margin_is_log2():
    inputs, _, _ = pair_inputs(2, 3, 8, 10, torch.float32)
    hidden, weight, bias, labels = inputs
    hidden = torch.cat([hidden[:2], hidden[:2]])  # rejected == chosen
    labels = torch.cat([labels[:2], labels[:2]])
    loss, stats = rlhf_fast.linear_dpo_loss(hidden, weight, labels, torch.zeros(2), torch.zeros(2), bias=bias)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and stats["margins"].item() == 0


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_opcheck(device, backend):
    (hidden, weight, bias, labels), ref_c, ref_r = pair_inputs(3, 4, 8, 19, torch.float32, device=device)
    for x in (hidden, weight, bias):
        x.requires_grad_()
    torch.library.opcheck(ll.linear_dpo_loss_op, (hidden, weight, bias, labels, ref_c, ref_r, 0.9, -100, 0.1,
                                                  "sigmoid", 0.1, 0.2, 2, True, True, True, backend))
    torch.library.opcheck(ll.linear_dpo_loss_op, (hidden, weight, None, labels, ref_c, ref_r, 1.0, -100, 0.5,
                                                  "ipo", 0.0, 0.0, 3, False, True, False, backend))


def test_torch_compile_fullgraph():
    (hidden, weight, bias, labels), ref_c, ref_r = pair_inputs(2, 4, 8, 19, torch.float32)

    def f(h, w, b):
        loss, stats = rlhf_fast.linear_dpo_loss(h, w, labels, ref_c, ref_r, bias=b, nll_coef=0.3)
        return loss * 2, stats["margins"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves, leaves_e = ([x.clone().requires_grad_() for x in (hidden, weight, bias)] for _ in range(2))
    (out, m), (out_e, m_e) = compiled(*leaves), f(*leaves_e)
    torch.testing.assert_close(out, out_e)
    torch.testing.assert_close(m, m_e)
    for a, b in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(out_e, leaves_e)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case, error, match", [
    ("odd", ValueError, r"hidden must be \[2P, T, H\]"),
    ("ref_shape", ValueError, "ref_chosen_logp must have shape"),
    ("loss_type", ValueError, "loss_type"),
    ("smoothing", ValueError, "label_smoothing must be in"),
])
def test_bad_input(case, error, match):
    (hidden, weight, _, labels), ref_c, ref_r = pair_inputs(2, 3, 4, 10, torch.float32)
    kwargs = {}
    if case == "odd":
        hidden, labels = hidden[:3], labels[:3]
    elif case == "ref_shape":
        ref_c = torch.zeros(3)
    elif case == "loss_type":
        kwargs["loss_type"] = "kto"
    elif case == "smoothing":
        kwargs["label_smoothing"] = 0.5
    with pytest.raises(error, match=match):
        rlhf_fast.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, **kwargs)
