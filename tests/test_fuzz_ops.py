"""Property-based fuzzing of the ops against float64 references (hypothesis, derandomized and bounded so CI is
deterministic and fast): odd/empty/one-element shapes, the three float dtypes, non-contiguous and expanded views,
+-inf / NaN / +-1e4 logits, extreme temperatures, labels at 0, V-1 and ignore_index, masks all-zero / all-one / with
holes, on the cpp, torch and (tiny shapes) triton backends. Regressions found this way live in test_edge_cases.py."""

import math

import pytest
import torch
from _testing import device_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlhf_fast
from rlhf_fast.ops import advantages as A

CPU = [p.values[1] for p in device_backends(("torch", "cpp", "triton")) if p.values[0] == "cpu" and not p.marks]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FUZZ = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@st.composite
def logit_rows(draw, max_rows=6, max_vocab=40):
    """(logits [N, V] view of some dtype, labels [N]) with specials mixed in."""
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
    layout = draw(st.sampled_from(["contiguous", "transposed", "step", "expanded"]))
    x = x.to(dtype)
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "step":
        x = torch.stack([x, x], -1).flatten(-2)[:, ::2]
    elif layout == "expanded" and n:
        x = x[:1].expand(n, v)
    labels = torch.randint(0, v, (n,), generator=g)
    if n:
        labels[0] = draw(st.sampled_from([0, v - 1, -100]))
    return x, labels


def close(out, exact, dtype, name, z_scale=1.0):
    """Within the dtype's tolerance, plus the float32 rounding of z = logits / T itself (z_scale = max |z|)."""
    tol = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    out, exact = out.double(), exact.double()
    assert torch.equal(out.isnan(), exact.isnan()), f"{name}: NaN pattern"
    ok = ~exact.isnan()
    if not ok.any():
        return
    atol = tol * max(1.0, exact[ok].abs().max().item()) + 8 * 2.0**-24 * z_scale
    torch.testing.assert_close(out[ok], exact[ok], rtol=tol, atol=atol, msg=name)


@pytest.mark.parametrize("backend", CPU)
@FUZZ
@given(data=logit_rows(), temperature=st.sampled_from([1.0, 0.7, 1e-3, 50.0]))
def test_logprobs_entropy_kl(backend, data, temperature):
    x, labels = data
    if backend == "triton" and x.numel() > 120:
        return
    exact = x.double() / temperature
    zs = exact[exact.isfinite()].abs().max().item() if exact.isfinite().any() else 1.0
    logp_all = torch.log_softmax(exact, -1)
    keep = labels != -100
    ref_lp = torch.where(keep, logp_all.gather(-1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    p = logp_all.exp()
    ref_h = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    leaf = x.detach().clone().requires_grad_()
    with rlhf_fast.use_backend(backend):
        lp, h = rlhf_fast.logprobs_and_entropy(leaf, labels, temperature=temperature)
        kl = rlhf_fast.kl_divergence(x, x.flip(0) if x.shape[0] else x, temperature=temperature)
    close(lp, ref_lp, x.dtype, "logprobs", zs)
    close(h, ref_h, x.dtype, "entropy", zs)
    logq = torch.log_softmax(x.flip(0).double() / temperature, -1) if x.shape[0] else logp_all
    ref_kl = (p * torch.where(p > 0, logp_all - logq, 0.0)).sum(-1)
    finite = ref_kl.isfinite()  # q = 0 where p > 0 gives +inf; the backends' value there is not pinned down here
    close(kl[finite], ref_kl[finite], x.dtype, "kl_divergence", zs)
    if x.numel():  # gradient of sum(logp) against float64 autograd
        lp.sum().backward()
        e = x.double().requires_grad_()
        lpa = torch.log_softmax(e / temperature, -1)
        torch.where(keep, lpa.gather(-1, labels.clamp(min=0)[:, None])[:, 0], 0.0).sum().backward()
        close(leaf.grad, e.grad, x.dtype, "grad logprobs", zs)


@pytest.mark.parametrize("backend", CPU)
@FUZZ
@given(data=logit_rows(), temperature=st.sampled_from([1.0, 0.3, 1e-6, 5.0]),
       top_k=st.sampled_from([0, 1, 3]), top_p=st.sampled_from([1.0, 0.9, 0.1]), min_p=st.sampled_from([0.0, 0.5, 1.0]))
def test_sample_token_in_kept_set(backend, data, temperature, top_k, top_p, min_p):
    x, _ = data
    if x.shape[0] == 0 or (backend == "triton" and x.numel() > 120):
        return
    with rlhf_fast.use_backend(backend):
        tokens, logp, flp = rlhf_fast.sample(x, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                             generator=torch.Generator().manual_seed(0), return_filtered_logprobs=True)
    z = x.double() / temperature
    logp_all = torch.log_softmax(z, -1)
    picked = logp_all.gather(-1, tokens[:, None])[:, 0]
    assert (picked > -math.inf).all(), "sampled a token of probability 0"
    assert logp.isfinite().all() and flp.isfinite().all() and (flp >= logp - 1e-4).all()
    # min-p: the token is within min_p of the max (up to the dtype's rounding of the logits)
    assert (picked >= logp_all.max(-1).values + math.log(max(min_p, 1e-30)) - 1e-3).all()


@pytest.mark.parametrize("backend", [b for b in CPU if b != "triton"] + (["triton"] if "triton" in CPU else []))
@FUZZ
@given(b=st.integers(0, 5), t=st.integers(1, 9), seed=st.integers(0, 2**31 - 1),
       mask_kind=st.sampled_from(["ones", "zeros", "holes"]), gamma=st.sampled_from([1.0, 0.9]),
       lam=st.sampled_from([1.0, 0.95, 0.0]))
def test_gae_and_returns(backend, b, t, seed, mask_kind, gamma, lam):
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
