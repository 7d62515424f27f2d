"""Property-based fuzzing of the ops against float64 references (hypothesis, derandomized and bounded so CI is
deterministic and fast): odd/empty/one-element shapes, the three float dtypes, non-contiguous and expanded views,
+-inf / NaN / +-1e4 logits, extreme temperatures, vocabularies up to 200k, labels at 0, V-1, ignore_index (also inside
[0, V)) and out of range, masks all-zero / all-one / with holes, kl_penalty, the fused hidden-state (linear) ops, on
the cpp, torch and (tiny shapes) triton backends; log-probs over a kept set (kept_threshold) too. Regressions found this way live in test_edge_cases.py.

Each test counts the examples it checked (those not skipped as too large for the Triton interpreter); the counts are
printed at the end of the module's run ("fuzz examples checked"), for the record of what the suite covers.

The NaN contract checked here (docs/formulas.md, "Non-finite inputs"): a row of logits holding NaN or +inf, or only
-inf, gives NaN for that row's log-prob (0 when its label is ignore_index), entropy and KL, and a NaN gradient row;
every other row is exact. Nothing raises, except sample on CPU (a row without a distribution to sample from)."""

import collections
import math

import pytest
import torch
from _testing import assert_within_ref_error, device_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlhf_fast
from rlhf_fast.ops import advantages as A
from rlhf_fast.ops import linear_losses as LL
from rlhf_fast.ops import ppo_loss as P
from rlhf_fast.ops import sampling

COUNTS: collections.Counter = collections.Counter()


TRITON_EXAMPLES = 10  # the Triton interpreter is slow: it checks the first 10 examples of each test only


def checked(name: str, backend: str) -> bool:
    """Counts an example as checked and returns True, or False (skip it) once a Triton test has had its share."""
    key = f"{name}[{backend}]"
    if "triton" in backend and COUNTS[key] >= TRITON_EXAMPLES:
        return False
    COUNTS[key] += 1
    return True


@pytest.fixture(scope="module", autouse=True)
def report_example_counts(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None or not COUNTS:
        return
    with capture.global_and_fixture_disabled():  # shown in the run's output, not captured
        reporter.write_line("")
        reporter.write_line(f"fuzz examples checked: {sum(COUNTS.values())} in all")
        for key, n in sorted(COUNTS.items()):
            reporter.write_line(f"  {key}: {n}")


CPU = [p.values[1] for p in device_backends(("torch", "cpp", "triton")) if p.values[0] == "cpu" and not p.marks]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@st.composite
def logit_rows(draw, max_rows=6, max_vocab=40, nonfinite=True):
    """(logits [N, V] view of some dtype, labels [N], ignore_index) with specials mixed in; with ``nonfinite``, one
    row may hold a NaN, a +inf, or only -inf."""
    n = draw(st.integers(0, max_rows))
    v = draw(st.sampled_from([1, 2, 3, 7, draw(st.integers(1, max_vocab))]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if n and v > 1 and draw(st.booleans()):  # -inf entries, never a whole row
        x[torch.rand(n, v, generator=g) < 0.3] = -math.inf
        x[:, 0] = torch.randn(n, generator=g, dtype=torch.float64)
    special = draw(st.sampled_from(["none", "nan", "+inf", "-inf row"])) if nonfinite and n else "none"
    if special != "none":
        row, col = int(torch.randint(0, n, (1,), generator=g)), int(torch.randint(0, v, (1,), generator=g))
        if special == "-inf row":
            x[row] = -math.inf
        else:
            x[row, col] = math.nan if special == "nan" else math.inf
    layout = draw(st.sampled_from(["contiguous", "transposed", "step", "expanded"]))
    x = x.to(dtype)
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "step":
        x = torch.stack([x, x], -1).flatten(-2)[:, ::2]
    elif layout == "expanded" and n:
        x = x[:1].expand(n, v)
    ignore_index = draw(st.sampled_from([-100, -1, 0]))  # 0: a valid token id that is ignored
    labels = torch.randint(0, v, (n,), generator=g)
    if n:
        labels[0] = draw(st.sampled_from([0, v - 1, ignore_index]))
    return x, labels, ignore_index


def close(out, exact, dtype, name, z_scale=1.0):
    """Within the dtype's tolerance, plus the float32 rounding of z = logits / T itself (z_scale = max |z|; for a
    gradient, max |z| / T: an error of one rounding of z in a log-prob is multiplied by 1 / T there). NaN exactly
    where the exact result is NaN, and the same infinities."""
    tol = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    out, exact = out.double(), exact.double()
    assert torch.equal(out.isnan(), exact.isnan()), f"{name}: NaN pattern"
    inf = exact.isinf()
    assert torch.equal(out[inf], exact[inf]), f"{name}: infinities"
    ok = exact.isfinite()
    if not ok.any():
        return
    atol = tol * max(1.0, exact[ok].abs().max().item()) + 8 * 2.0**-24 * z_scale
    torch.testing.assert_close(out[ok], exact[ok], rtol=tol, atol=atol, msg=name)


def exact_logprobs_entropy_kl(x, ref, labels, ignore_index, temperature):
    """float64 autograd references: (logp, entropy, kl) and the leaf they were computed from."""
    e = x.double().requires_grad_()
    logp_all = torch.log_softmax(e / temperature, -1)
    keep = labels != ignore_index
    lp = torch.where(keep, logp_all.gather(-1, torch.where(keep, labels, 0)[:, None])[:, 0], 0.0)
    p = logp_all.exp()
    h = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    logq = torch.log_softmax(ref.double() / temperature, -1)
    kl = (p * torch.where(p > 0, logp_all - logq, 0.0)).sum(-1)
    return lp, h, kl, e


def exact_grad(out, leaf):
    leaf.grad = None
    out.sum().backward(retain_graph=True)
    return leaf.grad


@pytest.mark.parametrize("backend", CPU)
@FUZZ
@given(data=logit_rows(), temperature=st.sampled_from([1.0, 0.7, 1e-3, 50.0]))
def test_logprobs_entropy_kl(backend, data, temperature):
    """Values and gradients of logprobs, entropy and kl_divergence against float64 autograd, NaN/inf rows included."""
    x, labels, ignore_index = data
    if backend == "triton" and x.numel() > 120:
        return
    if not checked("logprobs_entropy_kl", backend):
        return
    ref = x.flip(0)
    finite = x.double()[x.isfinite()]
    zs = finite.abs().max().item() / temperature if finite.numel() else 1.0
    ref_lp, ref_h, ref_kl, e = exact_logprobs_entropy_kl(x, ref, labels, ignore_index, temperature)
    outs = {}
    with rlhf_fast.use_backend(backend):
        for name, fn in (("logprobs", lambda t: rlhf_fast.logprobs(t, labels, temperature=temperature,
                                                                   ignore_index=ignore_index)),
                         ("entropy", lambda t: rlhf_fast.entropy(t, temperature=temperature)),
                         ("kl_divergence", lambda t: rlhf_fast.kl_divergence(t, ref, temperature=temperature))):
            leaf = x.detach().clone().requires_grad_()
            out = fn(leaf)
            if x.numel():
                out.sum().backward()
            outs[name] = out, leaf.grad
        lp2, h2 = rlhf_fast.logprobs_and_entropy(x, labels, temperature=temperature, ignore_index=ignore_index)
    for name, exact in (("logprobs", ref_lp), ("entropy", ref_h), ("kl_divergence", ref_kl)):
        out, grad = outs[name]
        close(out, exact, x.dtype, name, zs)
        if x.numel():
            g = exact_grad(exact, e)
            # where the exact KL is +inf (q = 0 where p > 0) its gradient is not a number to compare
            rows = exact.isfinite() | exact.isnan() if name == "kl_divergence" else torch.ones_like(exact, dtype=bool)
            close(grad[rows], g[rows], x.dtype, f"grad {name}", zs / temperature)
    for fused, alone in ((lp2, outs["logprobs"][0]), (h2, outs["entropy"][0])):  # the fused op: the same numbers
        torch.testing.assert_close(fused, alone.detach(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", CPU)
@FUZZ
@given(data=logit_rows(), temperature=st.sampled_from([1.0, 0.7, 1e-3, 50.0]),
       where=st.sampled_from(["a logit", "the label's logit", "-inf", "above all", "mixed"]))
def test_kept_logprobs(backend, data, temperature, where):
    """logprobs with kept_threshold (the kept set {x >= m} plus the label) against the float64 sort-free reference,
    values and gradients; rows without a distribution (NaN / +inf / only -inf) are NaN, as without a threshold."""
    from rlhf_fast.ops.token_logprobs import kept_logprobs_ref

    x, labels, ignore_index = data
    if backend == "triton" and x.numel() > 120:
        return
    if not checked("kept_logprobs", backend):
        return
    n, v = x.shape
    g = torch.Generator().manual_seed(n * 131 + v)
    xf = x.float()
    finite = torch.where(xf.isfinite(), xf, 0.0)
    pick = finite.gather(1, torch.randint(0, v, (n, 1), generator=g)).squeeze(1)
    label_logit = finite.gather(1, torch.where(labels == ignore_index, 0, labels)[:, None].clamp(0, v - 1))[:, 0]
    choices = {"a logit": pick, "the label's logit": label_logit, "-inf": torch.full((n,), -math.inf),
               "above all": finite.amax(-1) + 1.0 if n else torch.zeros(0)}
    threshold = choices.get(where)
    if threshold is None:  # each row one of the others
        stacked = torch.stack(list(choices.values()), -1) if n else torch.zeros(0, 4)
        threshold = stacked.gather(1, torch.randint(0, 4, (n, 1), generator=g)).squeeze(1)
    keep = labels != ignore_index
    no_distribution = xf.isnan().any(-1) | (xf == math.inf).any(-1) | (xf == -math.inf).all(-1)
    e = x.double().requires_grad_()
    exact = kept_logprobs_ref(e, labels, threshold, temperature, ignore_index)
    exact = torch.where(no_distribution & keep, math.nan, exact)
    leaf = x.detach().clone().requires_grad_()
    with rlhf_fast.use_backend(backend):
        out = rlhf_fast.logprobs(leaf, labels, temperature=temperature, ignore_index=ignore_index,
                                 kept_threshold=threshold)
        lp2, _ = rlhf_fast.logprobs_and_entropy(x, labels, temperature=temperature, ignore_index=ignore_index,
                                                kept_threshold=threshold)
    zs = finite.abs().max().item() / temperature if x.numel() else 1.0
    close(out, exact, x.dtype, "kept logprobs", zs)
    torch.testing.assert_close(lp2, out.detach(), rtol=0, atol=0, equal_nan=True)
    if x.numel():
        out.sum().backward()
        rows = ~no_distribution  # the reference's gradient of a row without a distribution is not the contract's
        grad = exact_grad(torch.where(no_distribution & keep, 0.0, exact), e)
        close(leaf.grad[rows], grad[rows], x.dtype, "grad kept logprobs", zs / temperature)
        assert leaf.grad[no_distribution & keep].isnan().all()


@pytest.mark.parametrize("backend", [b for b in CPU if b != "triton"])
@settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 3), v=st.integers(100_000, 200_000), dtype=st.sampled_from(DTYPES),
       temperature=st.sampled_from([1.0, 0.6]), seed=st.integers(0, 2**31 - 1))
def test_large_vocabulary(backend, n, v, dtype, temperature, seed):
    """V up to 200k (several chunks of the cpp kernels, odd tails): values and the log-prob gradient vs float64."""
    checked("large_vocabulary", backend)
    g = torch.Generator().manual_seed(seed)
    x = (4 * torch.randn(n, v, generator=g)).to(dtype)
    ref = (x.float() + torch.randn(n, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0] = v - 1
    ref_lp, ref_h, ref_kl, e = exact_logprobs_entropy_kl(x, ref, labels, -100, temperature)
    leaf = x.detach().clone().requires_grad_()
    with rlhf_fast.use_backend(backend):
        lp, h = rlhf_fast.logprobs_and_entropy(leaf, labels, temperature=temperature)
        kl = rlhf_fast.kl_divergence(x, ref, temperature=temperature)
    close(lp, ref_lp, dtype, "logprobs")
    close(h, ref_h, dtype, "entropy")
    close(kl, ref_kl, dtype, "kl_divergence")
    lp.sum().backward()
    close(leaf.grad, exact_grad(ref_lp, e), dtype, "grad logprobs")


LABEL_OPS = {  # name -> op(logits [N, V], labels [N]); the hidden-state ops use hidden = logits, weight = identity
    "logprobs": lambda x, y: rlhf_fast.logprobs(x, y),
    "logprobs_and_entropy": lambda x, y: rlhf_fast.logprobs_and_entropy(x, y),
    "ppo_loss_from_logits": lambda x, y: rlhf_fast.ppo_loss_from_logits(x, y, *[torch.zeros(y.shape)] * 2,
                                                                        torch.ones(y.shape)),
    "linear_logprobs": lambda x, y: rlhf_fast.linear_logprobs(x, torch.eye(x.shape[1]), y),
    "linear_cross_entropy": lambda x, y: rlhf_fast.linear_cross_entropy(x, torch.eye(x.shape[1]), y),
    "linear_ppo_loss": lambda x, y: rlhf_fast.linear_ppo_loss(x, torch.eye(x.shape[1]), y,
                                                              *[torch.zeros(y.shape)] * 2, torch.ones(y.shape)),
    "linear_dpo_loss": lambda x, y: rlhf_fast.linear_dpo_loss(x.view(2, -1, x.shape[1]), torch.eye(x.shape[1]),
                                                              y.view(2, -1), torch.zeros(1), torch.zeros(1)),
}


@pytest.mark.parametrize("op", LABEL_OPS)
@FUZZ
@given(n=st.integers(1, 4), v=st.integers(1, 9), bad=st.sampled_from(["V", "V+k", "-1", "-k", "2**40"]),
       seed=st.integers(0, 2**31 - 1))
def test_labels_out_of_range_raise(op, n, v, bad, seed):
    """A label outside [0, V) that is not ignore_index raises a ValueError naming `labels` and the bad position,
    before any kernel runs (CPU, eager); never a read past the row or a silent number."""
    checked("labels_out_of_range_raise", op)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, v, generator=g)
    y = torch.randint(0, v, (2 * n,), generator=g)
    k = int(torch.randint(2, 50, (1,), generator=g))
    row = int(torch.randint(0, 2 * n, (1,), generator=g))
    y[row] = {"V": v, "V+k": v + k, "-1": -1, "-k": -k, "2**40": 2**40}[bad]
    where = rf"\[{row}\]" if op != "linear_dpo_loss" else rf"\[{row // n}, {row % n}\]"  # DPO: labels [2, n]
    with pytest.raises(ValueError, match=rf"labels{where} = {int(y[row])} is outside \[0, {v}\)"):
        LABEL_OPS[op](x, y)


KL_PENALTY_BOUNDS = {"k1": None, "k2": None, "abs": None, "k3": (-20.0, 20.0)}


@FUZZ
@given(n=st.integers(0, 40), kind=st.sampled_from(list(KL_PENALTY_BOUNDS)), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([0.1, 3.0, 40.0]), seed=st.integers(0, 2**31 - 1), with_nan=st.booleans())
def test_kl_penalty(n, kind, dtype, scale, seed, with_nan):
    """kl_penalty values and gradients (w.r.t. logp and ref_logp) against float64 autograd of the formulas, across
    the clamps of k3 (d beyond +-20, results beyond 10); NaN in gives NaN out, only there."""
    checked("kl_penalty", "torch")
    g = torch.Generator().manual_seed(seed)
    logp = (-scale * torch.rand(n, generator=g)).to(dtype)
    ref_logp = (-scale * torch.rand(n, generator=g)).to(dtype)
    if with_nan and n:
        logp[int(torch.randint(0, n, (1,), generator=g))] = math.nan
    a, b = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_()
    out = rlhf_fast.kl_penalty(a, b, kind)
    assert out.dtype == torch.float32
    a64, b64 = logp.double().requires_grad_(), ref_logp.double().requires_grad_()
    d = b64 - a64
    exact = {"k1": lambda: -d, "k2": lambda: d * d / 2, "abs": lambda: d.abs(),
             "k3": lambda: (d.clamp(-20, 20).exp() - d.clamp(-20, 20) - 1).clamp(-10, 10)}[kind]()
    close(out, exact, torch.float32, "kl_penalty")
    if n:
        out.sum().backward()
        exact.sum().backward()
        close(a.grad.float(), a64.grad, dtype, "grad logp")
        close(b.grad.float(), b64.grad, dtype, "grad ref_logp")


@pytest.mark.parametrize("backend", CPU)
@FUZZ
@given(data=logit_rows(nonfinite=False), temperature=st.sampled_from([1.0, 0.3, 1e-6, 5.0]),
       top_k=st.sampled_from([0, 1, 3]), top_p=st.sampled_from([1.0, 0.9, 0.1]), min_p=st.sampled_from([0.0, 0.5, 1.0]))
def test_sample_token_in_kept_set(backend, data, temperature, top_k, top_p, min_p):
    x, _, _ = data
    if x.shape[0] == 0 or (backend == "triton" and x.numel() > 120):
        return
    if not checked("sample_token_in_kept_set", backend):
        return
    with rlhf_fast.use_backend(backend):
        tokens, logp, flp, thr = rlhf_fast.sample(x, temperature=temperature, top_k=top_k, top_p=top_p,
                                                  min_p=min_p, generator=torch.Generator().manual_seed(0),
                                                  return_filtered_logprobs=True, return_kept_threshold=True)
    z = x.double() / temperature
    logp_all = torch.log_softmax(z, -1)
    picked = logp_all.gather(-1, tokens[:, None])[:, 0]
    assert (picked > -math.inf).all(), "sampled a token of probability 0"
    assert logp.isfinite().all() and flp.isfinite().all() and (flp >= logp - 1e-4).all()
    # min-p: the token is within min_p of the max (up to the dtype's rounding of the logits)
    assert (picked >= logp_all.max(-1).values + math.log(max(min_p, 1e-30)) - 1e-3).all()
    # the kept threshold: -inf exactly without an active filter, else at or below the token's logit, with no logit of
    # the row strictly between it and the smallest logit at or above it (the midpoint rule of threshold_with_margin)
    active = (0 < top_k < x.shape[1]) or top_p < 1 or min_p > 0
    xf = x.float()
    if not active:
        assert (thr == -math.inf).all()
    else:
        kept_min = torch.where(xf >= thr[:, None], xf, math.inf).amin(-1)
        assert torch.equal(sampling.threshold_with_margin(xf, kept_min), thr)
    assert (xf.gather(-1, tokens[:, None])[:, 0] >= thr).all()


def k_exact(logp, ref_logp, kind):
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return d * d / 2
    if kind == "abs":
        return d.abs()
    dc = d.clamp(-20, 20)
    return (dc.exp() - dc - 1).clamp(-10, 10)


LINEAR_OPS = ("linear_logprobs", "linear_cross_entropy", "linear_ppo_loss", "linear_dpo_loss")


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("op", LINEAR_OPS)
@FUZZ
@given(b=st.integers(1, 3), t=st.integers(1, 4), h=st.sampled_from([1, 3, 8]), v=st.sampled_from([1, 2, 5, 33]),
       dtype=st.sampled_from(DTYPES), with_bias=st.booleans(), temperature=st.sampled_from([1.0, 0.7, 0.05]),
       scale=st.sampled_from([1.0, 4.0]), seed=st.integers(0, 2**31 - 1), packed=st.booleans(),
       variant=st.integers(0, 3), strided=st.booleans())
def test_linear_ops(backend, op, b, t, h, v, dtype, with_bias, temperature, scale, seed, packed, variant, strided):
    """The fused hidden-state ops against float64 autograd of the plain formulas (full logits): value and gradients
    w.r.t. hidden, weight and bias; labels with ignore_index holes, weights with zeros; [N, H] or [B, T, H]; hidden
    and weight contiguous or non-contiguous views (step-sliced hidden, column-major weight)."""
    if backend == "triton" and b * t * v > 200:
        return
    if not checked("linear_ops", f"{op}-{backend}"):
        return
    g = torch.Generator().manual_seed(seed)
    rows = 2 * b if op == "linear_dpo_loss" else b  # DPO: chosen rows then rejected rows
    hid = (scale * torch.randn(rows, t, h, generator=g) / math.sqrt(h)).to(dtype)
    wgt = torch.randn(v, h, generator=g).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype) if with_bias else None
    labels = torch.randint(0, v, (rows, t), generator=g)
    labels[torch.rand(rows, t, generator=g) < 0.25] = -100
    if packed and op != "linear_dpo_loss":
        hid, labels = hid.reshape(-1, h), labels.reshape(-1)
    keep = labels != -100
    weights = torch.where(torch.rand(labels.shape, generator=g) < 0.2, 0.0, torch.rand(labels.shape, generator=g))
    leaves = [x.detach().clone().requires_grad_() for x in (hid, wgt, bias) if x is not None]
    views = [x for x in leaves]  # what the op is given: the leaves, or non-contiguous views of them
    if strided:
        views[0] = torch.stack([leaves[0], leaves[0]], -1).flatten(-2)[..., ::2]
        views[1] = leaves[1].t().contiguous().t()
    exact_leaves = [x.detach().double().requires_grad_() for x in (hid, wgt, bias) if x is not None]

    def logp_of(hd, wt, bs, float64):
        logits = hd @ wt.T + (bs if bs is not None else 0)
        logits = logits.double() if float64 else logits.float()
        logp_all = torch.log_softmax(logits / temperature, -1)
        lp = torch.where(keep, logp_all.gather(-1, torch.where(keep, labels, 0)[..., None])[..., 0], 0.0)
        p = logp_all.exp()
        return lp, -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)

    # the per-op inputs drawn once (from the exact log-probs, so that ratios and rewards are of realistic sizes)
    lp64, ent64 = (x.detach() for x in logp_of(*exact_leaves, *([None] if bias is None else []), True))
    old_logp = (lp64 + 0.3 * torch.randn(labels.shape, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(labels.shape, generator=g)
    ref_logp = (lp64 + 0.5 * torch.randn(labels.shape, generator=g, dtype=torch.float64)).float()
    kind = ("k1", "k2", "k3", "abs")[variant]
    loss_type = ("sigmoid", "robust", "ipo", "hinge")[variant]
    ref_c = (lp64[:b].sum(-1) + torch.randn(b, generator=g, dtype=torch.float64)).float() if rows == 2 * b else None
    ref_r = (lp64[b:].sum(-1) + torch.randn(b, generator=g, dtype=torch.float64)).float() if rows == 2 * b else None

    def run(hd, wt, bs, mode):
        """mode "op": the fused op; "ref": the formulas on full logits in the input dtype (float32 math after the
        GEMM); "exact": the same in float64."""
        kw = dict(bias=bs, temperature=temperature)
        f = torch.float64 if mode == "exact" else torch.float32
        if mode != "op":
            lp, ent = logp_of(hd, wt, bs, mode == "exact")
        if op == "linear_logprobs":
            if mode == "op":
                lp, ent = rlhf_fast.linear_logprobs(hd, wt, labels, return_entropy=True, **kw)
            return lp.sum() + 0.5 * ent.sum()
        if op == "linear_cross_entropy":
            if mode == "op":
                return rlhf_fast.linear_cross_entropy(hd, wt, labels, weights=weights, **kw)
            w = torch.where(keep, weights.to(f), 0.0)
            return -(w * lp).sum() / w.sum().clamp_min(1e-38)
        if op == "linear_ppo_loss":
            extra = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0 if variant % 2 else None, kl_coef=0.1,
                         entropy_coef=0.01 * variant)
            if mode == "op":
                return rlhf_fast.linear_ppo_loss(hd, wt, labels, old_logp, adv, weights, ref_logp=ref_logp,
                                                 kl_kind=kind, **extra, **kw)[0]
            pol = P._policy_tokens_ref(lp, old_logp.to(f), adv.to(f), 0.2, 0.28, extra["dual_clip"])[0]
            tok = pol + 0.1 * k_exact(lp, ref_logp.to(f), kind) - extra["entropy_coef"] * ent
            return torch.where(keep & (weights != 0), weights.to(f) * tok, 0.0).sum()
        extra = dict(beta=0.3, loss_type=loss_type, label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0,
                     nll_coef=0.5)
        if mode == "op":
            return rlhf_fast.linear_dpo_loss(hd, wt, labels, ref_c, ref_r, **extra, **kw)[0]
        seq, lens = lp.sum(-1), keep.sum(-1).to(f)
        pair = LL._dpo_pair_terms(seq[:b], seq[b:], ref_c.to(f), ref_r.to(f), lens[:b], lens[b:], 0.3, loss_type,
                                  extra["label_smoothing"], None)[0]
        return pair.mean() + 0.5 * -seq[:b].sum() / keep[:b].sum().clamp_min(1)

    split = lambda xs: (xs[0], xs[1], xs[2] if bias is not None else None)  # noqa: E731
    ref_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    with rlhf_fast.use_backend(backend):
        out = run(*split(views), "op")
    out.backward()
    ref = run(*split(ref_leaves), "ref")
    ref.backward()
    exact = run(*split(exact_leaves), "exact")
    exact.backward()
    # The GEMMs run in the input dtype: the op's error against float64 must stay within 3 times that of the plain
    # formulas in the same dtype, plus a floor: 1e-4, or 4 roundings of the largest z = logits / T in the dtype (the
    # op's GEMM rounds differently from the plain one, and the plain one may be lucky on a few tokens).
    z_max = (exact_leaves[0].detach() @ exact_leaves[1].detach().T).abs().max().item() / temperature
    floor = max(1e-4, 4 * torch.finfo(dtype).eps * z_max) if dtype != torch.float32 else 1e-4
    assert_within_ref_error(out, ref, exact, name=f"{op} value", factor=3.0, floor=floor)
    for leaf, r, e, name in zip(leaves, ref_leaves, exact_leaves, ("hidden", "weight", "bias")):
        assert_within_ref_error(leaf.grad, r.grad, e.grad, name=f"{op} grad {name}", factor=3.0, floor=floor)


TOKEN_LOSS_CPU = [b for b in CPU if b in P.TOKEN_LOSS_BACKENDS]


@pytest.mark.parametrize("backend", TOKEN_LOSS_CPU)
@FUZZ
@given(n=st.integers(0, 50), scale=st.sampled_from([0.1, 5.0, 40.0]), adv_scale=st.sampled_from([1.0, 1e4]),
       clip_high=st.sampled_from([None, 0.28]), dual_clip=st.sampled_from([None, 3.0]), value_clip=st.sampled_from(
           [None, 0.2]), seed=st.integers(0, 2**31 - 1), zero_weight_nan=st.booleans())
def test_ppo_token_losses(backend, n, scale, adv_scale, clip_high, dual_clip, value_clip, seed, zero_weight_nan):
    """ppo_policy_loss / ppo_value_loss at extreme inputs (log-ratios beyond the +-20 clamp, advantages of 1e4, weights
    with zeros, NaN / inf on tokens of weight 0) against float64 autograd: value and gradient; a token of weight 0
    contributes exactly 0 and gets exactly 0 gradient."""
    if not checked("ppo_token_losses", backend):
        return
    g = torch.Generator().manual_seed(seed)
    logp, old = -scale * torch.rand(n, generator=g), -scale * torch.rand(n, generator=g)
    adv = adv_scale * torch.randn(n, generator=g)
    values, old_values, returns = (scale * torch.randn(n, generator=g) for _ in range(3))
    w = torch.where(torch.rand(n, generator=g) < 0.25, 0.0, torch.rand(n, generator=g))
    if zero_weight_nan:
        logp, values = torch.where(w == 0, math.nan, logp), torch.where(w == 0, math.inf, values)
    a, v = logp.clone().requires_grad_(), values.clone().requires_grad_()
    with rlhf_fast.use_backend(backend):
        pol, _ = rlhf_fast.ppo_policy_loss(a, old, adv, w, clip_low=0.2, clip_high=clip_high, dual_clip=dual_clip)
        val, _ = rlhf_fast.ppo_value_loss(v, old_values, returns, w, clip=value_clip)
    (pol + val).backward()
    a64, v64 = logp.double().requires_grad_(), values.double().requires_grad_()
    tok = P._policy_tokens_ref(a64, old.double(), adv.double(), 0.2, clip_high, dual_clip)[0]
    vc = v64 if value_clip is None else old_values.double() + (v64 - old_values.double()).clamp(-value_clip,
                                                                                              value_clip)
    tok_v = 0.5 * torch.maximum((v64 - returns.double()) ** 2, (vc - returns.double()) ** 2)
    exact_pol = torch.where(w > 0, w.double() * tok, 0.0).sum()
    exact_val = torch.where(w > 0, w.double() * tok_v, 0.0).sum()
    (exact_pol + exact_val).backward()
    close(pol, exact_pol, torch.float32, "ppo_policy_loss")
    close(val, exact_val, torch.float32, "ppo_value_loss")
    close(a.grad, torch.where(w > 0, a64.grad, 0.0), torch.float32, "grad ppo_policy_loss")
    close(v.grad, torch.where(w > 0, v64.grad, 0.0), torch.float32, "grad ppo_value_loss")
    assert torch.equal(a.grad[w == 0], torch.zeros_like(a.grad[w == 0]))


@pytest.mark.parametrize("backend", [b for b in CPU if b != "triton"] + (["triton"] if "triton" in CPU else []))
@FUZZ
@given(b=st.integers(0, 5), t=st.integers(1, 9), seed=st.integers(0, 2**31 - 1),
       mask_kind=st.sampled_from(["ones", "zeros", "holes"]), gamma=st.sampled_from([1.0, 0.9]),
       lam=st.sampled_from([1.0, 0.95, 0.0]))
def test_gae_and_returns(backend, b, t, seed, mask_kind, gamma, lam):
    if not checked("gae_and_returns", backend):
        return
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    mask = {"ones": torch.ones(b, t, dtype=torch.bool), "zeros": torch.zeros(b, t, dtype=torch.bool),
            "holes": torch.rand(b, t, generator=g) < 0.6}[mask_kind]
    with rlhf_fast.use_backend(backend):
        adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=gamma, lam=lam)
        disc = rlhf_fast.discounted_returns(rewards, mask, gamma=gamma)
    ref_adv, ref_ret = A.gae_ref(rewards.double(), values.double(), mask, gamma, lam)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(disc.double(), A.discounted_returns_ref(rewards.double(), mask, gamma),
                               rtol=1e-5, atol=1e-5)
