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


def _policy_formula(lp, old, adv, m, low, high, token_level, dual=None, gspo=False, is_coef=None):
    """OpenRLHF's PPO / GSPO policy loss in plain PyTorch (HEAD: ratio from the clamped log-ratio)."""
    if gspo:
        ratio = (((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)).exp()[:, None] * m
        token_level = False
    else:
        ratio = (lp - old).clamp(-20, 20).exp()
    surr1, surr2 = ratio * adv, ratio.clamp(1 - low, 1 + high) * adv
    loss = -torch.min(surr1, surr2)
    if dual is not None:
        loss = torch.where(adv < 0, torch.min(loss, -dual * adv), loss)
    if is_coef is not None:
        loss = loss * is_coef
    rows = m.sum(-1) > 0
    per_row = (loss * m).sum(-1) / m.sum(-1).clamp(min=1)
    loss = orl.masked_mean(loss, m) if token_level else per_row[rows].mean()
    return loss, orl.masked_mean((surr2 < surr1).float(), m), orl.masked_mean(old - lp, m)


def _batch(seed, b=4, t=8):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(b, t, generator=gen) - 2
    lp = (old + 0.4 * torch.randn(b, t, generator=gen)).requires_grad_()
    adv = torch.randn(b, t, generator=gen)
    m = (torch.rand(b, t, generator=gen) < 0.7).float()
    m[:, 0] = 1.0
    return gen, old, lp, adv, m


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("clips", [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("kind", ["ppo", "gspo"])
def test_policy_loss(token_level, clips, dual, kind):
    _, old, lp, adv, m = _batch(4)
    m[3] = 0.0  # a fully masked row: left out of the sequence mean (OpenRLHF >= 0.10.3)
    out = orl.PolicyLoss(*clips, dual_clip=dual, token_level_loss=token_level, policy_loss_type=kind)(lp, old, adv, m)
    assert len(out) == 4 and out[3] is None
    lp_ref = lp.detach().clone().requires_grad_()
    ref = _policy_formula(lp_ref, old, adv, m, *clips, token_level, dual, kind == "gspo")
    for got, want in zip(out[:3], ref):
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
    (g,) = torch.autograd.grad(out[0], lp)
    (g_ref,) = torch.autograd.grad(ref[0], lp_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("is_type", ["tis", "icepop", "seq-mask-tis"])
def test_policy_loss_vllm_correction(is_type):
    gen, old, lp, adv, m = _batch(5)
    roll = old + 0.3 * torch.randn(4, 8, generator=gen)
    low, high = 0.8, 1.25
    c = (old - roll).exp()
    if is_type == "tis":
        coef = c.clamp(low, high)
    elif is_type == "icepop":
        coef = c * ((c >= low) & (c <= high))
    else:
        seq = orl.masked_mean(old - roll, m, dim=-1).exp()[:, None]
        coef = c * ((seq >= low) & (seq <= high))
    fn = orl.PolicyLoss(enable_vllm_is_correction=True, vllm_is_truncated_threshold=[low, high],
                        vllm_is_correction_type=is_type)
    loss, clip_ratio, ppo_kl, vllm_kl = fn(lp, old, adv, m, rollout_log_probs=roll)
    ref = _policy_formula(lp, old, adv, m, 0.2, 0.2, True, is_coef=coef)
    torch.testing.assert_close(loss, ref[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ppo_kl, ref[2].detach())  # the policy KL, not the rollout one
    torch.testing.assert_close(vllm_kl, orl.masked_mean(roll - old, m))
    with pytest.raises(ValueError, match="rollout_log_probs"):
        fn(lp, old, adv, m)
    with pytest.raises(ValueError, match="vllm_is_correction_type"):
        orl.PolicyLoss(vllm_is_correction_type="mis")


def test_policy_loss_global_batch_and_versions():
    _, old, lp, adv, m = _batch(6)
    full = orl.PolicyLoss()(lp, old, adv, m)[0]
    n = m.sum()
    # two data-parallel ranks: each divides its token sum by the global count and multiplies by dp_size
    ranks = [orl.PolicyLoss()(lp[i:i + 2], old[i:i + 2], adv[i:i + 2], m[i:i + 2], dp_size=2, batch_num_tokens=n)[0]
             for i in (0, 2)]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, full)
    seq_full = orl.PolicyLoss(token_level_loss=False)(lp, old, adv, m)[0]
    ranks = [orl.PolicyLoss(token_level_loss=False)(lp[i:i + 2], old[i:i + 2], adv[i:i + 2], m[i:i + 2], dp_size=2,
                                                    global_batch_size=torch.tensor(4.0))[0] for i in (0, 2)]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, seq_full)
    # v0.8.5: (loss, clip_ratio), no dual clip / gspo / vLLM correction, no global-batch arguments
    old_api = orl.PolicyLoss(0.2, 0.2, version="0.8")(lp, old, adv, m)
    assert len(old_api) == 2
    torch.testing.assert_close(old_api[0], full)
    with pytest.raises(ValueError, match="since OpenRLHF 0.9"):
        orl.PolicyLoss(dual_clip=3.0, version="0.8")
    with pytest.raises(ValueError, match="since OpenRLHF 0.10.3"):
        orl.PolicyLoss(version="0.9")(lp, old, adv, m, dp_size=2)
    assert len(orl.PolicyLoss(version="0.9")(lp, old, adv, m)) == 4
    with pytest.raises(ValueError, match="version"):
        orl.PolicyLoss(version="1.0")
    with pytest.raises(ValueError, match="dual_clip"):
        orl.PolicyLoss(dual_clip=1.0)


def _value_formula(v, old, ret, m, eps, token_level):
    loss = (v - ret) ** 2
    if eps is not None:
        loss = torch.max((old + (v - old).clamp(-eps, eps) - ret) ** 2, loss)
    loss = orl.masked_mean(loss, m) if token_level else orl.masked_mean(loss, m, dim=-1).mean()
    return 0.5 * loss


def test_aggregate_loss_hand_computed():
    loss = torch.tensor([[1.0, 3.0, float("nan")], [5.0, 7.0, 9.0], [2.0, 2.0, 2.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert orl.aggregate_loss(loss, m).item() == pytest.approx(9 / 3)  # NaN outside the mask ignored
    assert orl.aggregate_loss(loss, m, token_level_loss=False).item() == pytest.approx((2 + 5) / 2)  # empty row out
    assert orl.aggregate_loss(loss, m, dp_size=2, batch_num_tokens=6).item() == pytest.approx(9 / 6 * 2)
    assert orl.aggregate_loss(loss, m, False, 4, global_batch_size=8).item() == pytest.approx(7 / 8 * 4)
    assert orl.aggregate_loss(loss, torch.zeros_like(m)).item() == 0.0
    assert orl.SFTLoss()(-loss, m).item() == pytest.approx(3.0)


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


@pytest.mark.parametrize("token_level", [True, False])
def test_value_loss_global_batch(token_level):
    gen = torch.Generator().manual_seed(7)
    old, ret = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    v = old + 0.5 * torch.randn(4, 6, generator=gen)
    m = (torch.rand(4, 6, generator=gen) < 0.7).float()
    m[:, 0] = 1.0
    m[1] = 0.0
    fn = orl.ValueLoss(0.2, token_level)
    full = fn(v, old, ret, m)
    rows = m.sum(-1) > 0
    ref = _value_formula(v[rows], old[rows], ret[rows], m[rows], 0.2, token_level)  # empty row left out
    torch.testing.assert_close(full, ref)
    kw = {"batch_num_tokens": m.sum()} if token_level else {"global_batch_size": rows.sum()}
    parts = [fn(v[i:i + 2], old[i:i + 2], ret[i:i + 2], m[i:i + 2], dp_size=2, **kw) for i in (0, 2)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, full)


def test_gpt_lm_loss_and_compute_reward():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 5, 17, generator=gen, requires_grad=True)
    labels = torch.randint(0, 17, (2, 5), generator=gen)
    labels[0, :3] = -100
    loss = orl.GPTLMLoss()(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 17), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0])
    assert orl.GPTLMLoss()(logits, torch.full_like(labels, -100)).item() == 0.0  # OpenRLHF: NaN
    with pytest.raises(NotImplementedError):
        orl.GPTLMLoss(ring_attn_group=object())
    # reward r at each row's last action token, minus kl_coef * kl everywhere
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = orl.compute_reward(torch.tensor([2.0, 5.0]), 0.5, kl, mask)
    torch.testing.assert_close(out, torch.tensor([[-0.05, 2.0 - 0.1, -0.15], [5.0 - 0.25, 0.0, 0.0]]))
    out = orl.compute_reward(torch.tensor([2.0, 5.0]), -1.0, kl, mask, reward_clip_range=(-1.0, 1.0))
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_kto_losses_hand_computed():
    import math

    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    pc, pr, rc, rr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-1.5, -2.0]), \
        torch.tensor([-2.0, -2.0])
    # x_c = [0.5, 0], x_r = [-1, 1]; KL_c = 0.25, KL_r = max(0, 0) = 0
    loss, ch, rj = orl.VanillaKTOLoss(beta=2.0)(pc, pr, rc, rr)
    want = (1 - sig(2 * 0.5) + 1 - sig(0) + 1 - sig(2 * (0.25 + 1)) + 1 - sig(2 * (0.25 - 1))) / 4
    assert loss.item() == pytest.approx(want)
    torch.testing.assert_close(ch, torch.tensor([1.0, 0.0]))
    # uneven: KL from the KL batch = mean(policy_KL - reference_KL) = 0.3 (one process, world_size 1)
    pk, rk = torch.tensor([0.1, 0.5]), torch.tensor([-0.2, 0.2])
    loss, _, _, kl = orl.KTOLoss(1.0, 1.0, 2.0, 1, "cpu")(pc, pr, pk, rc, rr, rk)
    assert kl.item() == pytest.approx(0.3)
    want = (1 - sig(0.5 - 0.3) + 1 - sig(-0.3) + 2 * (1 - sig(0.3 + 1)) + 2 * (1 - sig(0.3 - 1))) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_compute_approx_kl_version_08_unclamped():
    a, b = torch.tensor([30.0, -30.0]), torch.zeros(2)
    torch.testing.assert_close(orl.compute_approx_kl(a, b, "k2", version="0.8"), torch.tensor([450.0, 450.0]))
    torch.testing.assert_close(orl.compute_approx_kl(a, b, "k2"), torch.tensor([10.0, 10.0]))


@pytest.mark.parametrize("installed,warns", [("0.8.4", True), ("0.8.5", False), ("0.9.10", False),
                                             ("0.11.0", False), ("0.12.0", True)])
def test_warns_for_uncovered_openrlhf(monkeypatch, installed, warns):
    import importlib.metadata
    import warnings

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        orl._warn_if_uncovered()
    assert any("openrlhf" in str(w.message) for w in caught) == warns
