"""Log-prob / entropy / KL ops: every backend against the fp64 reference, values and gradients."""

import os
import subprocess
import sys

import pytest
import torch
from _testing import assert_within_ref_error, compiles_for_hopper, device_backends

import rlhf_fast
from rlhf_fast import _backend
from rlhf_fast.ops import token_logprobs as L

BACKENDS = device_backends(L.LOGPROBS_BACKENDS)
KL_BACKENDS = device_backends(L.KL_BACKENDS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SMALL_FOR_TRITON = 4096  # the Triton interpreter is slow: larger vocabularies run on the compiled backends only


def eager(logits, labels, temperature, ignore_index=-100):
    """(logp, entropy) by plain PyTorch in the dtype of ``logits`` (fp64 gives the exact result)."""
    z = logits / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    keep = labels != ignore_index
    logp = torch.where(keep, logp_all.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    p = logp_all.exp()
    ent = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return logp, ent


def make_inputs(shape, vocab, dtype, seed=0, scale=3.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels.view(-1)[:: max(1, labels.numel() // 3)] = -100  # some ignored positions
    return logits.to(device), labels.to(device)


def check_against_reference(backend, logits, labels, temperature, name, threshold=None):
    """Values and gradients of logprobs_and_entropy on ``backend`` (over the kept set when ``threshold`` is given) vs
    fp64, within the tolerance rule."""
    gen = torch.Generator().manual_seed(1 if threshold is None else 2)
    g_lp = torch.randn(labels.shape, generator=gen).to(logits.device)
    g_ent = torch.randn(labels.shape, generator=gen).to(logits.device)
    ref = (lambda x: eager(x, labels, temperature)) if threshold is None else (
        lambda x: eager_kept(x, labels, threshold, temperature))

    def run(fn, x):
        x = x.detach().requires_grad_()
        lp, ent = fn(x)
        (lp.double() * g_lp.double() + ent.double() * g_ent.double()).sum().backward()
        return lp.detach(), ent.detach(), x.grad

    with rlhf_fast.use_backend(backend):
        out = run(lambda x: rlhf_fast.logprobs_and_entropy(x, labels, temperature=temperature,
                                                           kept_threshold=threshold), logits)
    exact, lowp = run(ref, logits.double()), run(ref, logits)
    for what, o, e, r in zip(("logp", "entropy", "grad"), out, exact, lowp):
        assert o.dtype == (logits.dtype if what == "grad" else torch.float32)
        assert o.shape == e.shape
        assert_within_ref_error(o, r, e, name=f"{name} {what}")
    return exact


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 32000, 50257, 128256])
def test_logprobs_entropy_match_reference(device, backend, dtype, vocab):
    if backend == "triton" and device == "cpu" and vocab > SMALL_FOR_TRITON:
        pytest.skip("large vocabularies are too slow in the Triton interpreter (run on GPU by gpu_check.sh)")
    shape = (2, 3) if vocab < 1000 else (3,)
    logits, labels = make_inputs(shape, vocab, dtype, device=device)
    check_against_reference(backend, logits, labels, 0.7, f"{backend} {dtype} V={vocab}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_odd_shapes_temperature_and_non_contiguous(device, backend):
    base, labels = make_inputs((5, 4), 1501, torch.float32, seed=3, device=device)
    # a slice of a wider tensor (row stride != V) and a permuted [T, B, V] view
    wide = torch.randn(5, 4, 1600, device=device)
    wide[..., :1501] = base
    check_against_reference(backend, wide[..., :1501], labels, 1.3, f"{backend} row-strided")
    check_against_reference(backend, base.transpose(0, 1), labels.transpose(0, 1), 0.25, f"{backend} transposed")
    check_against_reference(backend, base[0, 0], labels[0, 0], 1.0, f"{backend} 1-D")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_extreme_logits(device, backend):
    logits, labels = make_inputs((4,), 999, torch.float32, seed=5, device=device)
    logits[0, :10] = 1e4
    logits[1, :] = -1e4
    logits[1, 3] = 1e4
    logits[2, ::2] = float("-inf")
    labels[2] = 1  # an odd index: a finite logit
    check_against_reference(backend, logits, labels, 1.0, f"{backend} extreme")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_neg_inf_row_gives_nan_like_torch(device, backend):
    logits = torch.randn(3, 50, device=device)
    logits[1] = float("-inf")
    labels = torch.tensor([1, 2, 3], device=device)
    with rlhf_fast.use_backend(backend):
        lp, ent = rlhf_fast.logprobs_and_entropy(logits, labels)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(lp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ignored_positions_are_zero_with_zero_gradient(device, backend):
    logits = torch.randn(4, 37, device=device, requires_grad=True)
    labels = torch.tensor([-100, 5, -100, 36], device=device)
    with rlhf_fast.use_backend(backend):
        lp = rlhf_fast.logprobs(logits, labels)
    lp.sum().backward()
    assert lp[0] == 0 and lp[2] == 0
    assert (logits.grad[[0, 2]] == 0).all() and (logits.grad[[1, 3]] != 0).any()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_entropy_and_logprobs_alone(device, backend):
    logits, labels = make_inputs((3, 2), 301, torch.float32, seed=7, device=device)
    exact_lp, exact_ent = eager(logits.double(), labels, 0.9)
    with rlhf_fast.use_backend(backend):
        torch.testing.assert_close(rlhf_fast.entropy(logits, temperature=0.9).double(), exact_ent, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(rlhf_fast.logprobs(logits, labels, temperature=0.9).double(), exact_lp,
                                   atol=2e-5, rtol=1e-5)
        x = logits.clone().requires_grad_()
        rlhf_fast.entropy(x, temperature=0.9).sum().backward()
    x64 = logits.double().requires_grad_()
    eager(x64, labels, 0.9)[1].sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_out_of_range_label_inside_the_op_gives_nan(device, backend):
    # The public API rejects it on CPU; the kernels themselves (what runs on CUDA, unchecked) must not read past V.
    logits = torch.randn(3, 20, device=device)
    labels = torch.tensor([3, 20, -7], device=device)
    logp, _, _, _ = L.logprobs_entropy_op(logits, labels, None, 1.0, -100, False, backend)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1]) and torch.isnan(logp[2])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_input_gives_empty_output(device, backend):
    with rlhf_fast.use_backend(backend):
        x = torch.randn(0, 5, 11, device=device, requires_grad=True)
        lp, ent = rlhf_fast.logprobs_and_entropy(x, torch.zeros(0, 5, dtype=torch.long, device=device))
        assert lp.shape == (0, 5) and ent.shape == (0, 5)
        (lp.sum() + ent.sum()).backward()
        assert x.grad.shape == x.shape
        if backend in L.KL_BACKENDS:
            assert rlhf_fast.kl_divergence(torch.randn(0, 4, device=device), torch.randn(0, 4, device=device)).shape == (0,)


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 5000, 32000])
def test_kl_divergence_matches_reference(device, backend, dtype, vocab):
    if backend == "triton" and device == "cpu" and vocab > SMALL_FOR_TRITON:
        pytest.skip("large vocabularies are too slow in the Triton interpreter (run on GPU by gpu_check.sh)")
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(2, 3, vocab, generator=gen) * 2).to(device=device, dtype=dtype)
    ref = (torch.randn(2, 3, vocab, generator=gen) * 2).to(device=device, dtype=dtype)
    ref[0, 0, : vocab // 2] = float("-inf") if vocab > 1 else 0.0  # q = 0 where p = 0 is fine
    logits[0, 0, : vocab // 2] = float("-inf") if vocab > 1 else 0.0
    g = torch.randn(2, 3, generator=gen).to(device)

    def run(fn, x, r):
        x = x.detach().requires_grad_()
        out = fn(x, r)
        (out.double() * g.double()).sum().backward()
        return out.detach(), x.grad

    def eager_kl(x, r):
        lp, lq = torch.log_softmax(x / 0.8, -1), torch.log_softmax(r / 0.8, -1)
        return (lp.exp() * torch.where(lp.exp() > 0, lp - lq, 0.0)).sum(-1)

    with rlhf_fast.use_backend(backend):
        out = run(lambda x, r: rlhf_fast.kl_divergence(x, r, temperature=0.8), logits, ref)
    exact = run(eager_kl, logits.double(), ref.double())
    lowp = run(eager_kl, logits, ref)
    for what, o, e, r in zip(("kl", "grad"), out, exact, lowp):
        assert_within_ref_error(o, r, e, name=f"{backend} {dtype} V={vocab} {what}")


@pytest.mark.parametrize("kind", L.KL_KINDS)
def test_kl_penalty_values_and_gradients(kind):
    logp = torch.tensor([-1.0, -2.0, -0.5, -30.0, -1.0, -0.1])
    ref_logp = torch.tensor([-1.5, -1.0, -0.5, -1.0, -25.0, -3.0])
    d = ref_logp - logp
    expected = {"k1": -d, "k2": 0.5 * d**2, "abs": d.abs(),
                "k3": (d.clamp(-20, 20).exp() - d.clamp(-20, 20) - 1).clamp(-10, 10)}[kind]
    a, b = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    out = rlhf_fast.kl_penalty(a, b, kind)
    torch.testing.assert_close(out, expected)
    g = torch.linspace(-1, 1, 6)
    (out * g).sum().backward()
    a2, b2 = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    (L.kl_penalty_ref(a2, b2, kind) * g).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_kl_penalty_k3_hand_computed():
    # d = ref - logp = log(2): k3 = 2 - log 2 - 1
    out = rlhf_fast.kl_penalty(torch.tensor([0.0]), torch.tensor([0.6931471805599453]), "k3")
    torch.testing.assert_close(out, torch.tensor([1.0 - 0.6931471805599453]))
    assert rlhf_fast.kl_penalty(torch.tensor([0.0]), torch.tensor([100.0]), "k3").item() == 10.0  # both clamps


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    x = torch.randn(6, 33, device=device, requires_grad=True)
    y = torch.randint(0, 33, (6,), device=device)
    thr = x.detach().median(-1).values
    thr[0] = float("-inf")
    torch.library.opcheck(L.logprobs_entropy_op, (x, y, None, 0.7, -100, True, backend))
    torch.library.opcheck(L.logprobs_entropy_op, (x, None, None, 1.0, -100, True, backend))
    torch.library.opcheck(L.logprobs_entropy_op,
                          (x.detach().bfloat16().requires_grad_(), y, None, 1.0, -100, False, backend))
    torch.library.opcheck(L.logprobs_entropy_op, (x, y, thr, 0.7, -100, True, backend))
    torch.library.opcheck(L.logprobs_entropy_op,
                          (x.detach().bfloat16().requires_grad_(), y, thr, 1.0, -100, False, backend))
    if backend in L.KL_BACKENDS:
        torch.library.opcheck(L.kl_divergence_op, (x, torch.randn(6, 33, device=device), 0.7, backend))


def test_opcheck_kl_penalty():
    for kind in L.KL_KINDS:
        torch.library.opcheck(L.kl_penalty_op, (torch.randn(7, requires_grad=True), torch.randn(7), kind))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    x = torch.randn(2, 5, 40, device=device, requires_grad=True)
    y = torch.randint(0, 40, (2, 5), device=device)

    def step(x, y):
        lp, ent = rlhf_fast.logprobs_and_entropy(x, y, temperature=0.5)
        kl = rlhf_fast.kl_divergence(x, x.detach() * 0.5) if backend in L.KL_BACKENDS else 0.0
        pen = rlhf_fast.kl_penalty(lp, lp.detach() - 0.1, "k3")
        kept = rlhf_fast.logprobs(x, y, kept_threshold=x.detach().amax(-1) - 1.0)
        return (lp + ent + kl + pen + rlhf_fast.logprobs(x, y) + rlhf_fast.entropy(x) + kept).sum()

    torch._dynamo.reset()
    with rlhf_fast.use_backend(backend):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
        compiled.backward()
        grad = x.grad.clone()
        x.grad = None
        eager_loss = step(x, y)
        eager_loss.backward()
    torch.testing.assert_close(compiled, eager_loss)
    torch.testing.assert_close(grad, x.grad)


def test_bad_input_errors_name_the_argument():
    x = torch.randn(2, 3, 10)
    y = torch.randint(0, 10, (2, 3))
    cases = [
        (lambda: rlhf_fast.logprobs(x, y.int()), TypeError, "labels must be int64"),
        (lambda: rlhf_fast.logprobs(x, y[:, :2]), ValueError, "labels must have shape"),
        (lambda: rlhf_fast.logprobs(x, y.float()), TypeError, "labels must be int64"),
        (lambda: rlhf_fast.logprobs(x.long(), y), TypeError, "logits must be float32"),
        (lambda: rlhf_fast.logprobs(x, torch.full((2, 3), 10)), ValueError, r"labels\[0, 0\] = 10 is outside \[0, 10\)"),
        (lambda: rlhf_fast.logprobs(x, torch.full((2, 3), -1)), ValueError, "not ignore_index=-100"),
        (lambda: rlhf_fast.logprobs(x, y, temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (lambda: rlhf_fast.logprobs(x, y, temperature=-1), ValueError, "temperature"),
        (lambda: rlhf_fast.logprobs(x, y, temperature=float("nan")), ValueError, "temperature"),
        (lambda: rlhf_fast.logprobs(x, y, temperature=torch.tensor(1.0)), TypeError, "temperature must be a Python number"),
        (lambda: rlhf_fast.logprobs(x, y, ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (lambda: rlhf_fast.logprobs(x, y.to("meta")), ValueError, "labels is on meta but logits is on cpu"),
        (lambda: rlhf_fast.logprobs(torch.randn(3, 0), torch.zeros(3, dtype=torch.long)), ValueError, "empty vocabulary"),
        (lambda: rlhf_fast.logprobs([1.0], y), TypeError, "logits must be a torch.Tensor"),
        (lambda: rlhf_fast.logprobs_and_entropy(x, None), TypeError, "labels must be a torch.Tensor"),
        (lambda: rlhf_fast.kl_divergence(x, x[:, :2]), ValueError, "ref_logits must have shape"),
        (lambda: rlhf_fast.kl_divergence(x, x.half()), TypeError, "ref_logits must have the dtype of logits"),
        (lambda: rlhf_fast.kl_penalty(y.float(), y.float(), "k4"), ValueError, "kind must be one of"),
        (lambda: rlhf_fast.kl_penalty(y.float(), y.float()[:1]), ValueError, "ref_logp must have shape"),
        (lambda: rlhf_fast.kl_penalty(y, y), TypeError, "logp must be float32"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_nan_logits_propagate():
    x = torch.randn(2, 9)
    x[0, 4] = float("nan")
    lp, ent = rlhf_fast.logprobs_and_entropy(x, torch.tensor([1, 1]))
    assert torch.isnan(lp[0]) and torch.isnan(ent[0]) and torch.isfinite(lp[1])


def test_backend_selection():
    cpu = torch.device("cpu")
    assert _backend.select("logprobs", L.LOGPROBS_BACKENDS, cpu) == ("cpp" if _backend.built("cpp") else "torch")
    with rlhf_fast.use_backend("torch"):
        assert _backend.select("logprobs", L.LOGPROBS_BACKENDS, cpu) == "torch"
        with rlhf_fast.use_backend("cpp"):
            assert _backend.requested_backend() == "cpp"
        assert _backend.requested_backend() == "torch"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with rlhf_fast.use_backend("fast"):
            pass
    with rlhf_fast.use_backend("cuda"):  # a CUDA backend cannot run on CPU tensors (or is not built)
        with pytest.raises(RuntimeError, match="backend 'cuda'"):
            rlhf_fast.logprobs(torch.randn(2, 3), torch.tensor([0, 1]))
    with rlhf_fast.use_backend("triton"):
        assert _backend.select("kl_penalty", ("torch",), cpu) == "torch"  # portable-only ops ignore the request
        if not _backend.triton_interpret():
            with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
                _backend.select("logprobs", L.LOGPROBS_BACKENDS, cpu)


def test_environment_variable_selects_backend():
    code = "import torch, rlhf_fast; from rlhf_fast import _backend; print(_backend.requested_backend())"
    env = {**os.environ, "RLHF_FAST_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["RLHF_FAST_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown backend 'bogus'" in bad.stderr


def test_info_lists_backends_and_ops():
    out = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", "info"], capture_output=True, text=True, check=True)
    assert "cpp" in out.stdout and "logprobs_and_entropy" in out.stdout and "torch " in out.stdout


# ---------------------------------------------------------------------------------------------------------------
# Kept-set log-probs (kept_threshold): renormalised over {v : logits_v >= m} plus the label; entropy stays full.
# ---------------------------------------------------------------------------------------------------------------


def eager_kept(logits, labels, threshold, temperature, ignore_index=-100):
    """(kept logp, full entropy) by plain PyTorch in the dtype of ``logits``: the mask, then log_softmax over it."""
    keep = labels != ignore_index
    y = torch.where(keep, labels, 0)
    kept = (logits >= threshold.to(logits.dtype)[..., None]) | (torch.arange(logits.shape[-1], device=logits.device)
                                                                == y[..., None]) | ~keep[..., None]
    z = logits / temperature
    lp_kept = torch.log_softmax(torch.where(kept, z, float("-inf")), dim=-1)
    logp = torch.where(keep, lp_kept.gather(-1, y.unsqueeze(-1)).squeeze(-1), 0.0)
    return logp, eager(logits, labels, temperature, ignore_index)[1]


def kept_inputs(shape, vocab, dtype, seed=0, device="cpu"):
    """Logits, labels and thresholds covering the cases of the contract: a threshold at a random logit (several
    logits tied exactly at it), everything kept (-inf), a label below the threshold (the union rule), a threshold
    above every logit (only the label kept), ignored labels."""
    logits, labels = make_inputs(shape, vocab, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    flat, flat_labels = logits.view(-1, vocab), labels.view(-1)
    n = flat.shape[0]
    pick = torch.randint(0, vocab, (n,), generator=gen)
    threshold = flat.float().gather(1, pick[:, None]).squeeze(1)
    if vocab >= 8:  # ties at the threshold: three more logits exactly equal to it
        flat[:, torch.randint(0, vocab, (3,), generator=gen)] = threshold[:, None].to(dtype)
        threshold = flat.float().gather(1, pick[:, None]).squeeze(1)
    cases = torch.arange(n) % 4
    threshold = torch.where(cases == 1, float("-inf"), threshold)
    threshold = torch.where(cases == 3, flat.float().amax(-1) + 1.0, threshold)
    below = (cases == 2) & (flat_labels >= 0)  # put the label strictly below its row's threshold
    if below.any() and vocab > 1:
        rows = below.nonzero().squeeze(1)
        lowest = flat.float().amin(-1)
        threshold[rows] = torch.maximum(threshold[rows], lowest[rows] + 0.5)
        flat[rows, flat_labels[rows]] = (lowest[rows] - 1.0).to(dtype)
    return logits.to(device), labels.to(device), threshold.view(shape).to(device)


def check_kept_against_reference(backend, logits, labels, threshold, temperature, name):
    exact = check_against_reference(backend, logits, labels, temperature, name, threshold)
    # the sort-free float64 reference of the op (autograd for its gradient)
    x64 = logits.double().requires_grad_()
    ref = L.kept_logprobs_ref(x64, labels, threshold, temperature)
    torch.testing.assert_close(ref, exact[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 9, 1000, 50257])
def test_kept_logprobs_match_reference(device, backend, dtype, vocab):
    if backend == "triton" and device == "cpu" and vocab > SMALL_FOR_TRITON:
        pytest.skip("large vocabularies are too slow in the Triton interpreter (run on GPU by gpu_check.sh)")
    shape = (3, 4) if vocab < 5000 else (4,)
    logits, labels, threshold = kept_inputs(shape, vocab, dtype, device=device)
    check_kept_against_reference(backend, logits, labels, threshold, 0.7, f"{backend} {dtype} V={vocab} kept")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_kept_cases_by_hand(device, backend):
    """Ties at the threshold are all kept; a threshold above every logit keeps the label alone (logp 0, gradient
    0); a label below the threshold joins the kept set; ignored labels give 0 and no gradient."""
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, -3.0],    # m = 1: ties {1, 2, 3} all kept with 0
                           [2.0, 1.0, 0.5, 1.0, -3.0],    # m = 5: above everything, only the label
                           [2.0, 1.0, 0.5, 1.0, -3.0],    # m = 1, label 4 below it: K = {0, 1, 3, 4}
                           [2.0, 1.0, 0.5, 1.0, -3.0]], device=device, requires_grad=True)
    labels = torch.tensor([1, 2, 4, -100], device=device)
    threshold = torch.tensor([1.0, 5.0, 1.0, 1.0], device=device)
    with rlhf_fast.use_backend(backend):
        lp = rlhf_fast.logprobs(logits, labels, kept_threshold=threshold)
    x = logits.detach().double()
    expected = torch.stack([x[0, 1] - x[0, :4].logsumexp(0), torch.zeros((), dtype=torch.float64),
                            x[2, 4] - x[2, [0, 1, 3, 4]].logsumexp(0), torch.zeros((), dtype=torch.float64)])
    torch.testing.assert_close(lp.double(), expected, rtol=1e-6, atol=1e-6)
    lp.sum().backward()
    assert (logits.grad[1] == 0).all() and (logits.grad[3] == 0).all()
    assert logits.grad[0, 4] == 0 and logits.grad[2, 2] == 0  # outside the kept set: no gradient
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(4, device=device), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_kept_label_far_below_the_max(device, backend):
    """The union rule at a small temperature: a label thousands of nats below the row's max (its mass relative to
    the max underflows float32) still counts; alone in the kept set it gives logp = 0 exactly."""
    logits = torch.tensor([[1.5, -0.3], [10.0, -5.0]], device=device, requires_grad=True)
    labels = torch.tensor([1, 1], device=device)
    threshold = torch.tensor([5.0, 10.0], device=device)  # row 0: above every logit; row 1: keeps the max
    with rlhf_fast.use_backend(backend):
        lp = rlhf_fast.logprobs(logits, labels, temperature=1e-3, kept_threshold=threshold)
    assert lp[0] == 0
    torch.testing.assert_close(lp[1].double(), torch.tensor(-15000.0, dtype=torch.float64, device=device),
                               rtol=1e-6, atol=0)
    lp.sum().backward()
    expected = torch.tensor([[0.0, 0.0], [-1000.0, 1000.0]], device=device)  # (onehot - q) / T
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kept_threshold_neg_inf_is_plain_bit_for_bit(device, backend, dtype):
    logits, labels = make_inputs((3, 5), 1100, dtype, seed=11, device=device)
    none = torch.full(labels.shape, float("-inf"), device=device)
    gen = torch.Generator().manual_seed(3)
    g_lp, g_ent = (torch.randn(labels.shape, generator=gen).to(device) for _ in range(2))
    outs = []
    for threshold in (None, none):
        x = logits.clone().requires_grad_()
        with rlhf_fast.use_backend(backend):
            lp, ent = rlhf_fast.logprobs_and_entropy(x, labels, temperature=0.8, kept_threshold=threshold)
        (lp * g_lp + ent * g_ent).sum().backward()
        outs.append((lp, ent, x.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_kept_threshold_is_the_samplers_kept_set(device, backend):
    """For rows filtered by top-k / top-p / min-p (the sampler's sort-based reference kept_mask_ref), the threshold
    m = min kept logit gives logp_kept = log(p_y / sum_kept p)."""
    from rlhf_fast.ops.sampling import kept_mask_ref

    gen = torch.Generator().manual_seed(4)
    B, V, T = 6, 300, 0.9
    logits = torch.randn(B, V, generator=gen) * 2
    top_k = torch.tensor([0, 5, 40, 0, 0, 17])
    top_p = torch.tensor([0.9, 1.0, 0.8, 1.0, 0.5, 0.95])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0, 0.02])
    probs = torch.softmax(logits.double() / T, -1)
    kept = kept_mask_ref(probs, top_k, top_p, min_p)
    threshold = torch.where(kept, logits, float("inf")).amin(-1)
    labels = torch.multinomial(torch.where(kept, probs, 0.0), 1, generator=gen).squeeze(1)
    labels[0] = torch.where(~kept[0], probs[0], -1.0).argmax()  # one label outside the kept set: the union rule
    expected = torch.log(probs.gather(1, labels[:, None]).squeeze(1)
                         / (torch.where(kept, probs, 0.0).sum(-1) + torch.where(kept.gather(1, labels[:, None]), 0.0,
                                                                                probs.gather(1, labels[:, None]))
                            .squeeze(1)))
    with rlhf_fast.use_backend(backend):
        lp = rlhf_fast.logprobs(logits.to(device), labels.to(device), temperature=T,
                                kept_threshold=threshold.to(device))
    torch.testing.assert_close(lp.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_kept_threshold_validation():
    logits, labels = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    with pytest.raises(TypeError, match="kept_threshold must be a torch.Tensor"):
        rlhf_fast.logprobs(logits, labels, kept_threshold=0.5)
    with pytest.raises(TypeError, match="kept_threshold must be float32"):
        rlhf_fast.logprobs(logits, labels, kept_threshold=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"kept_threshold must have shape \(2, 3\)"):
        rlhf_fast.logprobs_and_entropy(logits, labels, kept_threshold=torch.zeros(6))
    bad = torch.zeros(2, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"kept_threshold\[1, 2\] is NaN"):
        rlhf_fast.logprobs(logits, labels, kept_threshold=bad)


COMPILE_FOR_HOPPER = """
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_fast.kernels.logprobs import (_kl_div_bwd_kernel, _kl_div_fwd_kernel, _logprobs_bwd_kernel,
                                        _logprobs_fwd_kernel)

scalars = dict(V="i32", row_stride="i32", temperature="fp32")
kernels = [
    (_logprobs_fwd_kernel, ["logits_ptr"], ["labels_ptr"],
     ["threshold_ptr", "logp_ptr", "entropy_ptr", "lse_ptr", "lse_kept_ptr"], dict(ignore_index="i64"),
     dict(HAS_LABELS=True, COMPUTE_ENTROPY=True, KEPT=False)),
    (_logprobs_fwd_kernel, ["logits_ptr"], ["labels_ptr"],
     ["threshold_ptr", "logp_ptr", "entropy_ptr", "lse_ptr", "lse_kept_ptr"], dict(ignore_index="i64"),
     dict(HAS_LABELS=True, COMPUTE_ENTROPY=True, KEPT=True)),
    (_logprobs_bwd_kernel, ["logits_ptr", "grad_ptr"], ["labels_ptr"],
     ["grad_logp_ptr", "grad_entropy_ptr", "grad_lse_ptr", "grad_lse_kept_ptr", "threshold_ptr", "lse_ptr",
      "lse_kept_ptr", "entropy_ptr"], dict(ignore_index="i64"), dict(HAS_LABELS=True, KEPT=False)),
    (_logprobs_bwd_kernel, ["logits_ptr", "grad_ptr"], ["labels_ptr"],
     ["grad_logp_ptr", "grad_entropy_ptr", "grad_lse_ptr", "grad_lse_kept_ptr", "threshold_ptr", "lse_ptr",
      "lse_kept_ptr", "entropy_ptr"], dict(ignore_index="i64"), dict(HAS_LABELS=True, KEPT=True)),
    (_kl_div_fwd_kernel, ["logits_ptr", "ref_ptr"], [], ["kl_ptr", "max_p_ptr", "max_q_ptr", "log_s_p_ptr",
                                                         "mean_d_ptr"], dict(ref_row_stride="i32"), {}),
    (_kl_div_bwd_kernel, ["logits_ptr", "ref_ptr", "grad_ptr"], [],
     ["grad_kl_ptr", "max_p_ptr", "max_q_ptr", "log_s_p_ptr", "mean_d_ptr"], dict(ref_row_stride="i32"), {}),
]
for fn, bf16, i64, f32, extra, constexprs in kernels:
    signature = {}
    for name in fn.arg_names:
        signature[name] = ("*bf16" if name in bf16 else "*i64" if name in i64 else "*fp32" if name in f32
                           else scalars.get(name) or extra.get(name) or "constexpr")
    kernel = compile(ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs, BLOCK_V=1024)),
                     target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    assert len(kernel.asm["cubin"]) > 0
print("compiled")
"""


def test_triton_kernels_compile_for_hopper():
    """The Triton log-prob / entropy / KL kernels compiled for sm_90 without a GPU: what the interpreter cannot check
    (globals, types, scalar/block mixing)."""
    compiles_for_hopper(COMPILE_FOR_HOPPER)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kept", [False, True])
def test_backward_written_over_the_logits_equals_a_fresh_one(dtype, kept):
    """The fused-linear losses let the CPU kernel write d logits over the logits they are done with (no new [N, V]
    buffer): bit for bit the gradient into a new tensor, the label's entry included (read before the row is written)."""
    if kept:
        logits, labels, thr = kept_inputs((37,), 101, dtype)
    else:
        (logits, labels), thr = make_inputs((37,), 101, dtype), None
    gen = torch.Generator().manual_seed(3)
    _, entropy, lse, lse_kept = L._logprobs_fwd("cpp", logits, labels, thr, 0.7, -100, True)
    g_logp, g_ent, g_lse = (torch.randn(37, generator=gen) for _ in range(3))
    args = (g_logp, g_ent, g_lse, torch.randn(37, generator=gen) if kept else None, logits, labels, thr, lse,
            lse_kept if kept else None, entropy, 0.7, -100)
    fresh = L._logprobs_bwd("cpp", *args)
    over = logits.clone()
    assert L._logprobs_bwd_over_logits("cpp", *args[:4], over, *args[5:]).data_ptr() == over.data_ptr()
    assert torch.equal(over, fresh)
    with pytest.raises(RuntimeError, match="out must be a contiguous tensor"):
        torch.ops.rlhf_fast_C.logprobs_bwd_into(*args, logits[:5])
