"""rlhf_fast.linear_logprobs against the logprobs references on hidden @ weight.T + bias (same dtype) and float64."""

import contextlib
import importlib

import pytest
import torch

import rlhf_fast
from _testing import NewTensors, assert_within_ref_error, device_backends

ll = importlib.import_module("rlhf_fast.ops.linear_logprobs")  # the attribute rlhf_fast.ops.linear_logprobs is the op
BACKENDS = device_backends(ll.LINEAR_LOGPROBS_BACKENDS)


@pytest.fixture
def tiles_of(monkeypatch):
    """Force small logits tiles of ``elements`` floats (the default budget would put these shapes in one tile)."""
    def set_budget(elements):
        for device in ("cpu", "cuda"):
            monkeypatch.setitem(ll.CHUNK_BYTES, device, 4 * elements)
    return set_budget


def make_inputs(shape, hidden_size, vocab, dtype, bias=True, ignore_index=-100, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size ** 0.5 * 3).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    if labels.numel() > 2:
        labels.view(-1)[1] = ignore_index
        labels.view(-1)[-1] = ignore_index
    return tuple(None if x is None else x.to(device) for x in (hidden, weight, b, labels))


def exact(hidden, weight, bias, labels, temperature, ignore_index, kept_threshold=None):
    """The same in float64 throughout: the ground truth of the tolerance rule."""
    x = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    keep = labels != ignore_index
    picked = logp_all.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    if kept_threshold is not None:  # renormalised over the kept set (mask x >= m, plus the label)
        picked = ll.kept_logprobs_ref(x, labels, kept_threshold, temperature, ignore_index)
    return torch.where(keep, picked, 0.0), -(logp_all.exp() * logp_all).sum(-1)


def values_and_grads(fn, inputs, grad_logp, grad_entropy):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs[:3]]
    logp, ent = fn(*leaves, inputs[3])
    loss = (logp.double() * grad_logp).sum() + (ent.double() * grad_entropy).sum()
    wanted = [x for x in leaves if x is not None]
    return [logp, ent, *torch.autograd.grad(loss, wanted)]


def check_against_reference(inputs, temperature=1.0, ignore_index=-100, backend=None, kept_threshold=None):
    shape = inputs[3].shape
    g = torch.Generator().manual_seed(1)
    grad_logp = torch.randn(shape, generator=g).double().to(inputs[0].device)
    grad_entropy = torch.randn(shape, generator=g).double().to(inputs[0].device)

    def ours(h, w, b, y):
        return rlhf_fast.linear_logprobs(h, w, y, bias=b, temperature=temperature, ignore_index=ignore_index,
                                         return_entropy=True, kept_threshold=kept_threshold)

    with rlhf_fast.use_backend(backend) if backend else contextlib.nullcontext():
        out = values_and_grads(ours, inputs, grad_logp, grad_entropy)
    ref = values_and_grads(lambda h, w, b, y: ll.linear_logprobs_ref(h, w, y, b, temperature, ignore_index,
                                                                     kept_threshold), inputs, grad_logp, grad_entropy)
    ex = values_and_grads(lambda h, w, b, y: exact(h, w, b, y, temperature, ignore_index, kept_threshold), inputs,
                          grad_logp, grad_entropy)
    names = ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"]
    for name, o, r, e in zip(names, out, ref, ex):
        assert o.shape == e.shape, name
        assert o.dtype == (torch.float32 if name in ("logp", "entropy") else inputs[0].dtype), name
        assert_within_ref_error(o, r, e, name=name)
    keep = inputs[3] != ignore_index
    assert torch.all(out[0][~keep] == 0)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("budget, tile", [(21 * 21, (19, 21)), (37 * 37, (37, 34))], ids=["2d-tiles", "one-row-tile"])
def test_matches_reference(device, backend, dtype, budget, tile, tiles_of):
    # 37 tokens x V = 101 in tiles of 19 x 21, the last ones short (18 rows, 17 columns); or in one row of tiles
    # 37 x 34 (grad_weight written by one GEMM per column tile, in place)
    tiles_of(budget)
    assert ll.tile_shape(37, 101, torch.device(device)) == tile
    check_against_reference(make_inputs((37,), 24, 101, dtype, device=device), temperature=0.7, backend=backend)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gemm_accumulates_in_float32(device, dtype):
    # 1 + 2^-15 is a float32 but neither a bf16 nor an fp16: a sum rounded to the input dtype would lose the 2^-15
    a = torch.full((4, 8), 2.0 ** -6, dtype=dtype, device=device)
    b = torch.full((8, 3), 2.0 ** -9, dtype=dtype, device=device)
    acc = torch.full((4, 3), float("nan"), device=device)
    ll._gemm(acc, a, b, accumulate=False)  # written, the NaN ignored: 8 * 2^-15
    torch.testing.assert_close(acc, torch.full_like(acc, 2.0 ** -12), rtol=0, atol=0)
    acc.fill_(1.0)
    ll._gemm(acc, a[:, :1], b[:1], accumulate=True)
    assert torch.all(acc == 1.0 + 2.0 ** -15)


@pytest.mark.parametrize("shape", [(1,), (3, 5), (1, 1)], ids=["N=1", "3d", "3d-single"])
def test_shapes(shape, tiles_of):
    tiles_of(4 * 53)  # whole rows, several tokens
    check_against_reference(make_inputs(shape, 16, 53, torch.float32, ignore_index=7), ignore_index=7)


def test_no_bias_temperature_fp16(tiles_of):
    tiles_of(9 * 10)  # 18 tokens x V = 64 in tiles of 9 x 8
    check_against_reference(make_inputs((2, 9), 16, 64, torch.float16, bias=False), temperature=1.5)


def test_one_chunk_is_the_default_for_small_shapes():
    check_against_reference(make_inputs((4, 7), 32, 300, torch.float32))


def test_logp_only_gradient_and_frozen_inputs(tiles_of):
    tiles_of(49)  # tiles of 5 x 7
    hidden, weight, bias, labels = make_inputs((10,), 8, 50, torch.float32)
    grad = torch.randn(10)
    # only hidden requires grad: weight and bias get none, and the values match the other path
    h = hidden.clone().requires_grad_()
    logp = rlhf_fast.linear_logprobs(h, weight, labels, bias=bias)
    (gh,) = torch.autograd.grad(logp, h, grad)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = exact(hd, wd, bias, labels, 1.0, -100)[0]
    gh_ref, gw_ref = torch.autograd.grad(ref, (hd, wd), grad.double())
    torch.testing.assert_close(gh.double(), gh_ref, rtol=1e-5, atol=1e-5)  # fp32 GEMMs vs fp64
    # only weight requires grad
    w = weight.clone().requires_grad_()
    (gw,) = torch.autograd.grad(rlhf_fast.linear_logprobs(hidden, w, labels, bias=bias), w, grad)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-5)


def test_all_ignored_and_empty():
    hidden, weight, bias, labels = make_inputs((6,), 8, 20, torch.float32)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    logp, ent = rlhf_fast.linear_logprobs(h, w, torch.full_like(labels, -100), return_entropy=True)
    assert torch.all(logp == 0)
    torch.testing.assert_close(ent, exact(hidden, weight, None, labels, 1.0, -100)[1].float())
    gh, gw = torch.autograd.grad(logp.sum(), (h, w))
    assert torch.all(gh == 0) and torch.all(gw == 0)
    empty = torch.zeros(2, 0, 8, requires_grad=True)
    out = rlhf_fast.linear_logprobs(empty, w, torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2, 0) and out.dtype == torch.float32
    out.sum().backward()
    assert empty.grad.shape == empty.shape


def test_tile_shape_bounded_by_budget(tiles_of):
    cpu = torch.device("cpu")
    budget = 8 << 20  # float32 elements: 32 MiB
    tiles_of(budget)
    for n, vocab in [(1, 32000), (4096, 32000), (10**6, 128256), (3, 10**9), (10**6, 7), (0, 5)]:
        rows, cols = ll.tile_shape(n, vocab, cpu)
        assert 1 <= rows <= max(n, 1) and 1 <= cols <= vocab and rows * cols <= budget, (n, vocab, rows, cols)
    assert ll.tile_shape(4096, 32000, cpu) == (2048, 2688)  # square-ish, columns a multiple of 64: 2 x 12 tiles
    assert ll.tile_shape(10**6, 7, cpu)[1] == 7  # a small vocabulary keeps whole rows


def robust_thresholds(inputs):
    """Per-row kept thresholds halfway across the widest gap among the sorted float64 logits 3..30 (far from every
    logit, so that the dtype's rounding of the logits cannot move a token across it); rows 1 mod 4 everything kept
    (-inf), rows 3 mod 4 above every logit (only the label kept). Most random labels then lie below the threshold:
    the union rule."""
    hidden, weight, bias, _ = inputs
    x = (hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)).reshape(-1, weight.shape[0])
    top = x.sort(-1, descending=True).values[:, 3:31]
    gaps = top[:, :-1] - top[:, 1:]
    j = gaps.argmax(-1, keepdim=True)
    threshold = ((top.gather(1, j) + top.gather(1, j + 1)) / 2).squeeze(1)
    rows = torch.arange(x.shape[0], device=x.device)
    threshold = torch.where(rows % 4 == 1, float("-inf"), threshold)
    threshold = torch.where(rows % 4 == 3, x.amax(-1) + 1.0, threshold)
    return threshold.float().reshape(inputs[3].shape)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("budget", [21 * 21, 37 * 101], ids=["2d-tiles", "one-tile"])
def test_kept_matches_reference(device, backend, dtype, budget, tiles_of):
    # lse_kept merged over column tiles; the label's tile adds it to its kept set
    tiles_of(budget)
    inputs = make_inputs((37,), 24, 101, dtype, device=device)
    check_against_reference(inputs, temperature=0.7, backend=backend, kept_threshold=robust_thresholds(inputs))


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_kept_threshold_neg_inf_is_plain_bit_for_bit(device, backend, tiles_of):
    tiles_of(21 * 21)
    hidden, weight, bias, labels = make_inputs((37,), 24, 101, torch.bfloat16, device=device)
    g = torch.Generator().manual_seed(5)
    g_lp, g_ent = (torch.randn(37, generator=g).to(device) for _ in range(2))
    outs = []
    for threshold in (None, torch.full((37,), float("-inf"), device=device)):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        with rlhf_fast.use_backend(backend):
            logp, ent = rlhf_fast.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], temperature=0.9,
                                                  return_entropy=True, kept_threshold=threshold)
        outs.append([logp, ent, *torch.autograd.grad((logp * g_lp + ent * g_ent).sum(), leaves)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_kept_threshold_validation():
    hidden, weight, _, labels = make_inputs((2, 3), 4, 10, torch.float32)
    with pytest.raises(TypeError, match="kept_threshold must be float32"):
        rlhf_fast.linear_logprobs(hidden, weight, labels, kept_threshold=torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="kept_threshold must have shape"):
        rlhf_fast.linear_logprobs(hidden, weight, labels, kept_threshold=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="kept_threshold.* is NaN"):
        rlhf_fast.linear_logprobs(hidden, weight, labels, kept_threshold=torch.full((2, 3), float("nan")))


def test_never_materializes_all_logits():
    n, hidden_size, vocab, rows, cols = 64, 8, 101, 8, 30
    hidden, weight, bias, labels = make_inputs((n,), hidden_size, vocab, torch.float32)
    zeros = torch.zeros(n)
    with NewTensors() as mode:
        _, entropy, lse, _ = ll._linear_logprobs_fwd(hidden, weight, bias, labels, None, 1.0, -100, True, rows, cols,
                                                     "cpp")
        ll._linear_logprobs_bwd(torch.randn(n), zeros, zeros, None, hidden, weight, bias, labels, None, lse, None,
                                entropy, 1.0, -100, rows, cols, True, True, True, "cpp")
    assert mode.largest <= max(rows * cols, vocab * hidden_size, n * hidden_size) < n * vocab


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_opcheck(device, backend):
    hidden, weight, bias, labels = make_inputs((9,), 8, 33, torch.float32, device=device)
    hidden.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    thr = torch.full((9,), 0.5, device=device)
    thr[0] = float("-inf")
    torch.library.opcheck(ll.linear_logprobs_op, (hidden, weight, bias, labels, None, 0.9, -100, True, 4, 10, backend))
    torch.library.opcheck(ll.linear_logprobs_op, (hidden, weight, None, labels, None, 1.0, -100, False, 9, 33, backend))
    torch.library.opcheck(ll.linear_logprobs_op, (hidden, weight, bias, labels, thr, 0.9, -100, True, 4, 10, backend))
    _, entropy, lse, _ = ll.linear_logprobs_op(hidden, weight, bias, labels, None, 0.9, -100, True, 4, 10, backend)
    grads = [torch.randn(9, device=device) for _ in range(4)]
    args = (*grads[:3], None, hidden.detach(), weight.detach(), bias.detach(), labels, None, lse.detach(), None,
            entropy.detach(), 0.9, -100, 4, 10)
    torch.library.opcheck(ll.linear_logprobs_backward_op, (*args, True, True, True, backend))
    torch.library.opcheck(ll.linear_logprobs_backward_op, (*args, False, True, False, backend))
    _, entropy, lse, lse_kept = ll.linear_logprobs_op(hidden, weight, bias, labels, thr, 0.9, -100, True, 4, 10,
                                                      backend)
    args = (*grads, hidden.detach(), weight.detach(), bias.detach(), labels, thr, lse.detach(), lse_kept.detach(),
            entropy.detach(), 0.9, -100, 4, 10)
    torch.library.opcheck(ll.linear_logprobs_backward_op, (*args, True, True, True, backend))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_torch_compile_fullgraph(device):
    hidden, weight, bias, labels = make_inputs((2, 5), 8, 40, torch.float32, device=device)

    def f(h, w, b, y):
        logp, ent = rlhf_fast.linear_logprobs(h, w, y, bias=b, temperature=0.8, return_entropy=True)
        return (logp * 2 + ent).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = compiled(*leaves, labels)
    grads = torch.autograd.grad(out, leaves)
    leaves_e = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out_e = f(*leaves_e, labels)
    grads_e = torch.autograd.grad(out_e, leaves_e)
    torch.testing.assert_close(out, out_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_backend_choice_is_reported():
    assert "linear_logprobs" in rlhf_fast.ops.OP_BACKENDS
    hidden, weight, _, labels = make_inputs((3,), 4, 10, torch.float32)
    with rlhf_fast.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="linear_logprobs: backend 'cuda'"):
            rlhf_fast.linear_logprobs(hidden, weight, labels)


@pytest.mark.parametrize("case, error, match", [
    ("hidden_1d", ValueError, "hidden must be"),
    ("hidden_int", TypeError, "hidden must be float32"),
    ("weight_h", ValueError, "H = hidden.shape"),
    ("weight_3d", ValueError, "weight must be"),
    ("weight_dtype", TypeError, "weight must have the dtype of hidden"),
    ("bias_shape", ValueError, "bias must have shape"),
    ("bias_dtype", TypeError, "bias must have the dtype"),
    ("labels_dtype", TypeError, "labels must be int64"),
    ("labels_shape", ValueError, "labels must have shape"),
    ("labels_range", ValueError, r"labels\[2\] = 10 is outside \[0, 10\)"),
    ("labels_none", TypeError, "labels must be a torch.Tensor"),
    ("temperature", ValueError, "temperature must be"),
    ("ignore_index", TypeError, "ignore_index must be an int"),
])
def test_bad_input(case, error, match):
    hidden, weight, bias, labels = make_inputs((4,), 4, 10, torch.float32)
    labels = torch.tensor([0, 1, 2, 3])
    kwargs = dict(bias=bias)
    if case == "hidden_1d":
        hidden = hidden[0]
    elif case == "hidden_int":
        hidden = hidden.long()
    elif case == "weight_h":
        weight = weight[:, :3]
    elif case == "weight_3d":
        weight = weight[None]
    elif case == "weight_dtype":
        weight = weight.bfloat16()
    elif case == "bias_shape":
        kwargs["bias"] = bias[:5]
    elif case == "bias_dtype":
        kwargs["bias"] = bias.half()
    elif case == "labels_dtype":
        labels = labels.int()
    elif case == "labels_shape":
        labels = labels[None]
    elif case == "labels_range":
        labels[2] = 10
    elif case == "labels_none":
        labels = None
    elif case == "temperature":
        kwargs["temperature"] = 0.0
    elif case == "ignore_index":
        kwargs["ignore_index"] = 1.5
    with pytest.raises(error, match=match):
        rlhf_fast.linear_logprobs(hidden, weight, labels, **kwargs)
