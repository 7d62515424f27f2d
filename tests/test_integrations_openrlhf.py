"""OpenRLHF-compatible functions against references written from OpenRLHF's published formulas."""

import pytest
import torch
from _testing import assert_within_ref_error

from rlhf_fast.integrations import openrlhf as orl


def _logprobs_formula(logits, labels, temperature=1.0):
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _approx_kl_formula(log_probs, log_probs_base, kl_estimator):
    r = log_probs.double() - log_probs_base.double()
    kl = {"k1": r, "k2": r ** 2 / 2.0, "k3": (-r).exp() - 1 - (-r)}[kl_estimator]
    return kl.clamp(min=-10, max=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_from_logits(dtype, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 53, generator=gen)).to(dtype)
    labels = torch.randint(0, 53, (3, 7), generator=gen)
    before = logits.clone()
    out = orl.log_probs_from_logits(logits, labels, temperature)
    assert out.dtype == torch.float32 and out.shape == (3, 7)
    assert torch.equal(logits, before)  # OpenRLHF divides in place; rlhf_fast leaves the input alone
    exact = _logprobs_formula(logits.double(), labels, temperature)
    same_dtype = _logprobs_formula(logits, labels, temperature)
    assert_within_ref_error(out, same_dtype, exact, name="log_probs_from_logits")


def test_log_probs_from_logits_grad_and_float64():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 31, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 31, (2, 5), generator=gen)
    w = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(orl.log_probs_from_logits(logits, labels, 0.5), _logprobs_formula(logits, labels, 0.5))
    x = logits.detach().float().requires_grad_()
    (orl.log_probs_from_logits(x, labels, 0.5) * w.float()).sum().backward()
    (grad,) = torch.autograd.grad((_logprobs_formula(logits, labels, 0.5) * w).sum(), logits)
    torch.testing.assert_close(x.grad.double(), grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_compute_approx_kl(kl_estimator):
    gen = torch.Generator().manual_seed(2)
    log_probs = torch.randn(4, 9, generator=gen) * 3
    base = torch.randn(4, 9, generator=gen) * 3
    log_probs[0, :4] = torch.tensor([-30.0, 30.0, -12.0, 12.0])  # reaches the [-10, 10] clamp
    lp, lb = log_probs.clone().requires_grad_(), base.clone().requires_grad_()
    out = orl.compute_approx_kl(lp, lb, kl_estimator)
    ref_lp, ref_lb = log_probs.double().requires_grad_(), base.double().requires_grad_()
    ref = _approx_kl_formula(ref_lp, ref_lb, kl_estimator)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    w = torch.randn(4, 9, generator=gen)
    (out * w).sum().backward()
    g_lp, g_lb = torch.autograd.grad((ref * w.double()).sum(), (ref_lp, ref_lb))
    torch.testing.assert_close(lp.grad.double(), g_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lb.grad.double(), g_lb, atol=1e-4, rtol=1e-4)


def test_compute_approx_kl_default_and_bad_estimator():
    a, b = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 0.0])
    torch.testing.assert_close(orl.compute_approx_kl(a, b), a)  # default k1 = log_probs - log_probs_base
    with pytest.raises(ValueError, match="kl_estimator"):
        orl.compute_approx_kl(a, b, "k4")


def test_compute_entropy_and_masked_mean():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 17, generator=gen)
    p = torch.softmax(logits, -1)
    ref = torch.logsumexp(logits, -1) - (p * logits).sum(-1)  # OpenRLHF's formula
    torch.testing.assert_close(orl.compute_entropy(logits), ref, atol=1e-5, rtol=1e-5)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert orl.masked_mean(x, m).item() == pytest.approx(3.0)  # (1 + 2 + 6) / 3
    torch.testing.assert_close(orl.masked_mean(x, m, dim=-1), torch.tensor([1.5, 6.0]))
    assert orl.masked_mean(x, None).item() == pytest.approx(3.5)


def _policy_formula(lp, old, adv, m, low, high, token_level):
    ratio = (lp - old).exp()
    surr1, surr2 = ratio * adv, ratio.clamp(1 - low, 1 + high) * adv
    loss = -torch.min(surr1, surr2)
    loss = orl.masked_mean(loss, m) if token_level else orl.masked_mean(loss, m, dim=-1).mean()
    return loss, orl.masked_mean((surr2 < surr1).float(), m)


def _value_formula(v, old, ret, m, eps, token_level):
    loss = (v - ret) ** 2
    if eps is not None:
        loss = torch.max((old + (v - old).clamp(-eps, eps) - ret) ** 2, loss)
    loss = orl.masked_mean(loss, m) if token_level else orl.masked_mean(loss, m, dim=-1).mean()
    return 0.5 * loss


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("clips", [(0.2, 0.2), (0.2, 0.28)])
def test_policy_loss(token_level, clips):
    gen = torch.Generator().manual_seed(4)
    old = torch.randn(4, 8, generator=gen) - 2
    lp = (old + 0.4 * torch.randn(4, 8, generator=gen)).requires_grad_()
    adv = torch.randn(4, 8, generator=gen)
    m = (torch.rand(4, 8, generator=gen) < 0.7).float()
    m[:, 0] = 1.0
    loss, clip_ratio = orl.PolicyLoss(*clips, token_level_loss=token_level)(lp, old, adv, m)
    lp_ref = lp.detach().clone().requires_grad_()
    ref_loss, ref_clip = _policy_formula(lp_ref, old, adv, m, *clips, token_level)
    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(clip_ratio, ref_clip)
    (g,) = torch.autograd.grad(loss, lp)
    (g_ref,) = torch.autograd.grad(ref_loss, lp_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    no_mask = orl.PolicyLoss(*clips, token_level_loss=token_level)(lp, old, adv)[0]  # action_mask=None: all tokens
    torch.testing.assert_close(no_mask, _policy_formula(lp, old, adv, torch.ones_like(m), *clips, token_level)[0])


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss(token_level, clip_eps):
    gen = torch.Generator().manual_seed(5)
    old = torch.randn(3, 7, generator=gen)
    v = (old + 0.5 * torch.randn(3, 7, generator=gen)).requires_grad_()
    ret = torch.randn(3, 7, generator=gen)
    m = (torch.rand(3, 7, generator=gen) < 0.7).float()
    m[:, 0] = 1.0
    loss = orl.ValueLoss(clip_eps, token_level)(v, old, ret, m)
    v_ref = v.detach().clone().requires_grad_()
    ref = _value_formula(v_ref, old, ret, m, clip_eps, token_level)
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=1e-5)
    (g,) = torch.autograd.grad(loss, v)
    (g_ref,) = torch.autograd.grad(ref, v_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def test_compiles_fullgraph():
    logits, labels = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    lp, base = torch.randn(2, 3), torch.randn(2, 3)
    for fn, inputs in [(lambda a, b: orl.log_probs_from_logits(a, b, 0.7), (logits, labels)),
                       (lambda a, b: orl.compute_approx_kl(a, b, "k3"), (lp, base))]:
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(*inputs), fn(*inputs))


def test_pairwise_logexp_dpo_hand_computed():
    import math

    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  (-logsigmoid(x) = softplus(-x))
    assert orl.PairWiseLoss()(chosen, rejected).item() == pytest.approx((softplus(-1) + softplus(0)) / 2)
    margin = torch.tensor([1.0, -1.0])
    assert orl.PairWiseLoss()(chosen, rejected, margin).item() == pytest.approx((softplus(0) + softplus(-1)) / 2)
    assert orl.LogExpLoss()(chosen, rejected).item() == pytest.approx((softplus(-1) + softplus(0)) / 2)
    # DPO: x = (pc - pr) - (rc - rr) = (-1 - -3) - (-2 - -2) = 2
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    loss, ch, rj = orl.DPOLoss(beta=0.5, label_smoothing=0.1)(pc, pr, rc, rr)
    assert loss.item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0))
    assert ch.item() == pytest.approx(0.5) and rj.item() == pytest.approx(-0.5)
    loss_ipo, _, _ = orl.DPOLoss(beta=0.5, ipo=True)(pc, pr, rc, rr)
    assert loss_ipo.item() == pytest.approx((2 - 1) ** 2)
