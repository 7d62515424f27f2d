"""rlhf_fast.linear_cross_entropy against -sum(coef * logprobs_ref(hidden @ weight.T + bias)) (same dtype) and
float64, with the tolerance rule of the log-prob ops."""

import contextlib
import importlib

import pytest
import torch
from test_linear_logprobs import make_inputs

import rlhf_fast
from _testing import NewTensors, assert_within_ref_error, device_backends, largest_new_tensor_in_backward

lce = importlib.import_module("rlhf_fast.ops.linear_cross_entropy")
BACKENDS = device_backends(lce.LINEAR_LOGPROBS_BACKENDS)


@pytest.fixture
def chunk_of(monkeypatch):
    """Force chunks of ``rows`` rows for a vocabulary of ``vocab`` (the default budget would fit one chunk)."""
    def set_rows(rows, vocab):
        for device in ("cpu", "cuda"):
            monkeypatch.setitem(lce.CHUNK_BYTES, device, 4 * rows * vocab)
    return set_rows


def coefficients(labels, weights, reduction, ignore_index):
    w = torch.where(labels != ignore_index, 1.0 if weights is None else weights.double(), 0.0)
    return w / w.sum() if reduction == "mean" else w


def exact(hidden, weight, bias, labels, coef, temperature, ignore_index):
    z = (hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)) / temperature
    keep = labels != ignore_index
    logp = torch.log_softmax(z, -1).gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    return -(coef * torch.where(keep, logp, 0.0)).sum()


def loss_and_grads(fn, inputs, upstream=1.7):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs[:3]]
    loss = fn(*leaves, inputs[3])
    return [loss, *torch.autograd.grad(loss * upstream, [x for x in leaves if x is not None])]


def check_against_reference(inputs, *, weights=None, reduction="mean", temperature=1.0, ignore_index=-100,
                            backend=None):
    labels = inputs[3]
    coef = coefficients(labels, weights, reduction, ignore_index)

    def ours(h, w, b, y):
        return rlhf_fast.linear_cross_entropy(h, w, y, weights=weights, bias=b, temperature=temperature,
                                              ignore_index=ignore_index, reduction=reduction)

    with rlhf_fast.use_backend(backend) if backend else contextlib.nullcontext():
        out = loss_and_grads(ours, inputs)
    ref = loss_and_grads(lambda h, w, b, y: lce.linear_cross_entropy_ref(h, w, y, coef.float(), b, temperature,
                                                                         ignore_index), inputs)
    ex = loss_and_grads(lambda h, w, b, y: exact(h, w, b, y, coef, temperature, ignore_index), inputs)
    for name, o, r, e in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], out, ref, ex):
        assert o.shape == e.shape, name
        assert o.dtype == (torch.float32 if name == "loss" else inputs[0].dtype), name
        assert_within_ref_error(o, r, e, name=name)
    return out


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction, weighted", [("mean", True), ("sum", False)], ids=["weighted-mean", "sum"])
def test_matches_reference(device, backend, dtype, reduction, weighted, chunk_of):
    chunk_of(8, 101)  # 37 tokens in chunks of 8 rows (the last one 5), V = 101
    assert lce.chunk_rows(37, 101, torch.device(device)) == 8
    inputs = make_inputs((37,), 24, 101, dtype, device=device)
    weights = torch.rand(37, generator=torch.Generator().manual_seed(3)).to(device) if weighted else None
    check_against_reference(inputs, weights=weights, reduction=reduction, temperature=0.7, backend=backend)


@pytest.mark.parametrize("shape", [(1,), (3, 5)], ids=["N=1", "3d"])
def test_shapes_fp16_no_bias(shape, chunk_of):
    chunk_of(4, 53)
    check_against_reference(make_inputs(shape, 16, 53, torch.float16, bias=False, ignore_index=7), ignore_index=7,
                            temperature=1.5)


def test_is_the_mean_token_nll_of_linear_logprobs():
    hidden, weight, bias, labels = make_inputs((2, 9), 16, 64, torch.float32)
    loss = rlhf_fast.linear_cross_entropy(hidden, weight, labels, bias=bias)
    logp = rlhf_fast.linear_logprobs(hidden, weight, labels, bias=bias)
    torch.testing.assert_close(loss, -logp.sum() / (labels != -100).sum())


def test_frozen_inputs_and_no_grad_mode():
    hidden, weight, bias, labels = make_inputs((10,), 8, 50, torch.float32)
    h = hidden.clone().requires_grad_()
    loss = rlhf_fast.linear_cross_entropy(h, weight, labels, bias=bias)
    (gh,) = torch.autograd.grad(loss, h)
    hd = hidden.double().requires_grad_()
    coef = coefficients(labels, None, "mean", -100)
    (gh_ref,) = torch.autograd.grad(exact(hd, weight, bias, labels, coef, 1.0, -100), hd)
    torch.testing.assert_close(gh.double(), gh_ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # forward only: no gradient is formed (the op returns empty ones)
        out = lce.linear_cross_entropy_op(hidden, weight, bias, labels, coef.float(), 1.0, -100, 4, False, False,
                                          False, "torch")
        assert all(g.numel() == 0 for g in out[1:])
        torch.testing.assert_close(rlhf_fast.linear_cross_entropy(h, weight, labels, bias=bias), loss.detach())


def test_gradient_is_not_copied_and_second_backward_is_refused():
    hidden, weight, bias, labels = make_inputs((10,), 8, 50, torch.float32)
    w = weight.clone().requires_grad_()
    loss = rlhf_fast.linear_cross_entropy(hidden, w, labels, bias=bias)
    (loss * 3).backward(retain_graph=True)
    saved = w.grad.data_ptr()
    coef = coefficients(labels, None, "mean", -100)
    wd = weight.double().requires_grad_()
    (gw_ref,) = torch.autograd.grad(exact(hidden, wd, bias, labels, coef, 1.0, -100) * 3, wd)
    torch.testing.assert_close(w.grad.double(), gw_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the saved gradients were scaled in place: a wrong second result is impossible
    assert w.grad.data_ptr() == saved


def test_backward_creates_no_gradient_sized_tensor():
    hidden, weight, bias, labels = make_inputs((10,), 8, 50, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = rlhf_fast.linear_cross_entropy(h, w, labels, bias=bias)
    # no zero gradients for the op's gradient outputs, no copy of the gradients formed in the forward
    assert largest_new_tensor_in_backward(loss * 2) < h.numel() < w.numel()


def test_all_ignored_and_empty():
    hidden, weight, _, labels = make_inputs((6,), 8, 20, torch.float32)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    for reduction in ("mean", "sum"):
        loss = rlhf_fast.linear_cross_entropy(h, w, torch.full_like(labels, -100), reduction=reduction)
        assert loss.item() == 0
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert torch.all(gh == 0) and torch.all(gw == 0)
    empty = torch.zeros(2, 0, 8, requires_grad=True)
    loss = rlhf_fast.linear_cross_entropy(empty, w, torch.zeros(2, 0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == empty.shape and torch.all(w.grad == 0)


def test_never_materializes_all_logits():
    n, hidden_size, vocab, rows = 64, 8, 101, 8
    hidden, weight, bias, labels = make_inputs((n,), hidden_size, vocab, torch.float32)
    with NewTensors() as mode:
        lce._linear_cross_entropy_fwd(hidden, weight, bias, labels, torch.rand(n), 1.0, -100, rows,
                                      (True, True, True), "cpp")
    assert mode.largest <= max(rows * vocab, vocab * hidden_size, n * hidden_size) < n * vocab


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_opcheck(device, backend):
    hidden, weight, bias, labels = make_inputs((9,), 8, 33, torch.float32, device=device)
    coef = torch.rand(9, device=device)
    for x in (hidden, weight, bias):
        x.requires_grad_()
    torch.library.opcheck(lce.linear_cross_entropy_op,
                          (hidden, weight, bias, labels, coef, 0.9, -100, 4, True, True, True, backend))
    torch.library.opcheck(lce.linear_cross_entropy_op,
                          (hidden, weight, None, labels, coef, 1.0, -100, 9, False, True, False, backend))


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels = make_inputs((2, 5), 8, 40, torch.float32)
    weights = torch.rand(2, 5)

    def f(h, w, b, y):
        return rlhf_fast.linear_cross_entropy(h, w, y, weights=weights, bias=b, temperature=0.8) * 3

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves, leaves_e = ([x.clone().requires_grad_() for x in (hidden, weight, bias)] for _ in range(2))
    out, out_e = compiled(*leaves, labels), f(*leaves_e, labels)
    torch.testing.assert_close(out, out_e)
    for a, b in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(out_e, leaves_e)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case, error, match", [
    ("reduction", ValueError, "reduction must be 'mean' or 'sum'"),
    ("weights_shape", ValueError, "weights must have shape"),
    ("weights_int", TypeError, "weights must be float32"),
    ("labels_range", ValueError, r"labels\[2\] = 10 is outside \[0, 10\)"),
    ("weight_h", ValueError, "H = hidden.shape"),
])
def test_bad_input(case, error, match):
    hidden, weight, _, _ = make_inputs((4,), 4, 10, torch.float32)
    labels, kwargs = torch.tensor([0, 1, 2, 3]), {}
    if case == "reduction":
        kwargs["reduction"] = "none"
    elif case == "weights_shape":
        kwargs["weights"] = torch.ones(5)
    elif case == "weights_int":
        kwargs["weights"] = torch.ones(4, dtype=torch.long)
    elif case == "labels_range":
        labels[2] = 10
    elif case == "weight_h":
        weight = weight[:, :3]
    with pytest.raises(error, match=match):
        rlhf_fast.linear_cross_entropy(hidden, weight, labels, **kwargs)
