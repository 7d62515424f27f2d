"""veRL-compatible functions against references written from veRL's published formulas (core_algos.py,
torch_functional.py)."""

import pytest
import torch
from _testing import assert_within_ref_error

from rlhf_fast.integrations import verl

AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ---- references, from veRL's formulas ------------------------------------------------------------------------------

def _masked_mean(x, m, axis=None):
    return (x * m).sum(axis=axis) / m.sum(axis=axis).clamp(min=1e-8)


def _agg(loss, m, mode):
    rows = m.sum(-1) > 0  # veRL >= 0.6.1: sequences without a token are left out of the seq-means
    if mode == "token-mean":
        return _masked_mean(loss, m)
    if mode == "seq-mean-token-sum":
        return (loss * m).sum(-1)[rows].mean()
    if mode == "seq-mean-token-mean":
        return ((loss * m).sum(-1)[rows] / m.sum(-1)[rows]).mean()
    return (loss * m).sum() / m.shape[-1]


def _kl_ref(lp, ref, kind):
    if kind in ("kl", "k1"):
        return lp - ref
    if kind == "abs":
        return (lp - ref).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (lp - ref).square()
    d = (ref - lp).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(-10, 10)


def _gae_ref(r, v, m, gamma, lam):
    next_v, last = torch.zeros_like(r[:, 0]), torch.zeros_like(r[:, 0])
    out = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_v - v[:, t]
        cur = delta + gamma * lam * last
        next_v = v[:, t] * m[:, t] + (1 - m[:, t]) * next_v
        last = cur * m[:, t] + (1 - m[:, t]) * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    returns = adv + v
    mean = _masked_mean(adv, m)
    var = _masked_mean((adv - mean) ** 2, m) * (m.sum() / (m.sum() - 1))
    return (adv - mean) * torch.rsqrt(var + 1e-8), returns


def _policy_ref(old, lp, adv, m, low, high, c, mode):
    neg_kl = (lp - old).clamp(-20.0, 20.0)
    ratio = neg_kl.exp()
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
    clip1 = torch.maximum(l1, l2)
    l3 = -adv * c
    loss = torch.where(adv < 0, torch.min(l3, clip1), clip1)
    return (_agg(loss, m, mode), _masked_mean((l2 > l1).float(), m), _masked_mean(-neg_kl, m),
            _masked_mean(((clip1 > l3) & (adv < 0)).float(), m))


def _value_ref(vpreds, returns, values, m, eps, mode):
    clipped = torch.max(torch.min(vpreds, values + eps), values - eps)
    l1, l2 = (vpreds - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * _agg(torch.max(l1, l2), m, mode), _masked_mean((l2 > l1).float(), m)


def _batch(seed=0, b=4, t=9):
    gen = torch.Generator().manual_seed(seed)
    m = (torch.rand(b, t, generator=gen) < 0.75).float()
    m[0, :] = 1.0
    m[1, 5:] = 0.0  # right padding
    m[2, 2:4] = 0.0  # interior hole (multi-turn)
    return gen, m


# ---- torch_functional ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_from_logits(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(3, 6, 41, generator=gen)).to(dtype)
    labels = torch.randint(0, 41, (3, 6), generator=gen)
    exact = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    same = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    out = verl.logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    assert_within_ref_error(out, same, exact, name="logprobs_from_logits")

    def entropy(x):  # veRL: logsumexp(x) - sum(softmax(x) * x)
        return torch.logsumexp(x, -1) - (torch.softmax(x, -1) * x).sum(-1)

    assert_within_ref_error(verl.entropy_from_logits(logits), entropy(logits), entropy(logits.double()),
                            name="entropy_from_logits")


def test_logprobs_from_logits_grad():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 29, generator=gen, requires_grad=True)
    labels = torch.randint(0, 29, (2, 5), generator=gen)
    w = torch.randn(2, 5, generator=gen)
    (g,) = torch.autograd.grad((verl.logprobs_from_logits(logits, labels) * w).sum(), logits)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def test_masked_whiten_and_var():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -7.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # mean 2.5, unbiased var of [1, 2, 3, 4] = 5/3
    assert verl.masked_var(x, m).item() == pytest.approx(5 / 3)
    expected = (x - 2.5) / (5 / 3 + 1e-8) ** 0.5  # every position, masked ones too
    torch.testing.assert_close(verl.masked_whiten(x, m), expected)
    torch.testing.assert_close(verl.masked_whiten(x, m, shift_mean=False), expected + 2.5)
    with pytest.raises(ValueError, match="sum of the mask is one"):
        verl.masked_var(x, torch.tensor([[1.0, 0, 0], [0, 0, 0]]))


# ---- core_algos ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"])
def test_kl_penalty(kind):
    gen = torch.Generator().manual_seed(2)
    lp = torch.randn(3, 8, generator=gen) * 4
    ref = torch.randn(3, 8, generator=gen) * 4
    lp[0, :3] = torch.tensor([-40.0, 40.0, 15.0])  # d clamp at +-20 and result clamp at 10 for k3
    a, b = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    out = verl.kl_penalty(a, b, kind)
    torch.testing.assert_close(out, _kl_ref(lp, ref, kind), atol=1e-5, rtol=1e-5)
    w = torch.randn(3, 8, generator=gen)
    (out * w).sum().backward()
    a2, b2 = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    ga, gb = torch.autograd.grad((_kl_ref(a2, b2, kind) * w).sum(), (a2, b2))
    torch.testing.assert_close(a.grad, ga, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.grad, gb, atol=1e-4, rtol=1e-4)


def test_kl_penalty_straight_through_and_errors():
    lp = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    ref = torch.tensor([0.1, 0.4, -0.5])
    out = verl.kl_penalty(lp, ref, "k3+")
    torch.testing.assert_close(out, _kl_ref(lp, ref, "k3").detach())  # value of k3 ...
    (g,) = torch.autograd.grad(out.sum(), lp)
    torch.testing.assert_close(g, (lp - ref).detach())  # ... gradient of k2 = (lp - ref)
    torch.testing.assert_close(verl.kl_penalty(lp, ref, "k2+"), _kl_ref(lp, ref, "k2"))
    with pytest.raises(NotImplementedError):
        verl.kl_penalty(lp, ref, "full")
    with pytest.raises(ValueError, match="kl_penalty"):
        verl.kl_penalty(lp, ref, "k7")


def test_agg_loss_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert verl.agg_loss(loss, m, "token-mean").item() == pytest.approx(7 / 3)
    # veRL >= 0.6.1: the empty third row is not a sequence of the mean
    assert verl.agg_loss(loss, m, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    assert verl.agg_loss(loss, m, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 3)  # / T = 3
    assert verl.agg_loss(loss, m, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    # the global counts veRL's callers pass (**global_batch_info): loss = local sum / global count * dp_size
    assert verl.agg_loss(loss, m, "token-mean", dp_size=2, batch_num_tokens=7).item() == pytest.approx(7 / 7 * 2)
    assert verl.agg_loss(loss, m, "seq-mean-token-sum", dp_size=4, global_batch_size=8).item() == pytest.approx(
        7 / 8 * 4)
    assert verl.agg_loss(loss, m, "seq-mean-token-sum-norm", loss_scale_factor=10).item() == pytest.approx(0.7)
    nan_outside = loss.masked_fill(m == 0, float("nan"))
    assert verl.agg_loss(nan_outside, m, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert verl.agg_loss(loss, torch.zeros_like(m), "token-mean").item() == 0.0  # veRL: 0/0; ours 0 (documented)
    assert verl.masked_mean(nan_outside, m).item() == pytest.approx(7 / 3)  # NaN outside the mask ignored
    assert verl.masked_mean(loss, torch.zeros_like(m)).item() == 0.0  # an empty mask gives 0
    with pytest.raises(ValueError, match="loss_agg_mode"):
        verl.agg_loss(loss, m, "token-sum")


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("clips", [(0.2, None, None, 3.0), (None, 0.2, 0.28, 3.0), (0.1, None, None, 1.5)])
def test_compute_policy_loss(mode, clips):
    cliprange, low, high, c = clips
    gen, m = _batch(3)
    old = torch.randn(4, 9, generator=gen) - 2
    lp = (old + 0.4 * torch.randn(4, 9, generator=gen)).requires_grad_()
    adv = torch.randn(4, 9, generator=gen) * 2
    out = verl.compute_policy_loss(old, lp, adv, m, cliprange=cliprange, cliprange_low=low, cliprange_high=high,
                                   clip_ratio_c=c, loss_agg_mode=mode)
    lp_ref = lp.detach().clone().requires_grad_()
    ref = _policy_ref(old, lp_ref, adv, m, low or cliprange, high or cliprange, c, mode)
    assert len(out) == 4
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out[0], lp)
    (g_ref,) = torch.autograd.grad(ref[0], lp_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def test_compute_policy_loss_checks_and_empty_rows():
    gen, m = _batch(4)
    old, lp, adv = torch.randn(3, 4, 9, generator=gen).unbind(0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        verl.compute_policy_loss(old, lp, adv, m, cliprange=0.2, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="cliprange"):
        verl.compute_policy_loss(old, lp, adv, m)
    m[3] = 0.0  # one sequence without tokens: seq-means still divide by all 4 rows, as veRL does
    for mode in AGG_MODES:
        got = verl.compute_policy_loss(old, lp, adv, m, cliprange=0.2, loss_agg_mode=mode)[0]
        want = _policy_ref(old, lp, adv, m, 0.2, 0.2, 3.0, mode)[0]
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_compute_value_loss(mode):
    gen, m = _batch(5)
    values = torch.randn(4, 9, generator=gen)
    vpreds = (values + 0.5 * torch.randn(4, 9, generator=gen)).requires_grad_()
    returns = torch.randn(4, 9, generator=gen)
    loss, frac = verl.compute_value_loss(vpreds, returns, values, m, 0.2, mode)
    vp_ref = vpreds.detach().clone().requires_grad_()
    ref_loss, ref_frac = _value_ref(vp_ref, returns, values, m, 0.2, mode)
    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(frac, ref_frac)
    (g,) = torch.autograd.grad(loss, vpreds)
    (g_ref,) = torch.autograd.grad(ref_loss, vp_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_compute_gae_advantage_return(gamma, lam):
    gen, m = _batch(6)
    rewards = torch.randn(4, 9, generator=gen)
    values = torch.randn(4, 9, generator=gen)
    adv, ret = verl.compute_gae_advantage_return(rewards, values, m, gamma, lam)
    adv_ref, ret_ref = _gae_ref(rewards, values, m, gamma, lam)
    torch.testing.assert_close(adv, adv_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ret_ref, atol=1e-5, rtol=1e-5)


def test_compiles_fullgraph():
    gen, m = _batch(7)
    old, lp, adv = torch.randn(3, 4, 9, generator=gen).unbind(0)
    logits, labels = torch.randn(2, 3, 11, generator=gen), torch.randint(0, 11, (2, 3), generator=gen)
    cases = [(verl.logprobs_from_logits, (logits, labels)), (lambda a, b: verl.kl_penalty(a, b, "k3+"), (lp, old)),
             (lambda *a: verl.compute_policy_loss(*a, cliprange=0.2, loss_agg_mode="seq-mean-token-mean"),
              (old, lp, adv, m))]
    for fn, inputs in cases:
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(*inputs), fn(*inputs))


# ---- policy-loss registry (veRL >= 0.6: compute_policy_loss_<name>(old, logp, adv, mask, mode, config, is_w)) -------

class _Cfg(dict):
    """A config as veRL passes it: attribute-less mapping with ``get`` (DictConfig-like)."""


def _cfg(**kw):
    base = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    base.update(kw)
    return _Cfg(base)


def _registry_ref(name, old, lp, adv, m, mode, is_w, low=0.2, high=0.28, c=3.0, tau=(1.0, 1.05)):
    """Plain-PyTorch per-token losses of each registered loss, aggregated as veRL >= 0.6.1 does."""
    d = (lp - old).clamp(-20, 20)
    r = d.exp()
    if name == "vanilla":
        return _policy_ref(old, lp, adv, m, low, high, c, mode)[0] if is_w is None else _agg(
            torch.where(adv < 0, torch.min(-adv * c, torch.max(-adv * r, -adv * r.clamp(1 - low, 1 + high))),
                        torch.max(-adv * r, -adv * r.clamp(1 - low, 1 + high))) * is_w, m, mode)
    if name == "gspo":
        seq = ((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
        s = (lp - lp.detach() + seq.detach()[:, None]).clamp(max=10).exp()
        loss = torch.max(-adv * s, -adv * s.clamp(1 - low, 1 + high))
        mode = "seq-mean-token-mean"
    elif name == "sapo":
        t = torch.where(adv > 0, tau[0], tau[1])
        loss = -torch.sigmoid(t * (r - 1)) * 4 / t * adv
        mode = "seq-mean-token-mean"
    elif name == "cispo":
        loss = -r.clamp(1 - low, 1 + high).detach() * adv * lp
    elif name == "gpg":
        loss = -lp * adv
    return _agg(loss if is_w is None else loss * is_w, m, mode)


@pytest.mark.parametrize("name", ["vanilla", "gspo", "sapo", "cispo", "gpg"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("with_is", [False, True])
def test_policy_loss_registry(name, mode, with_is):
    gen, m = _batch(8)
    old = torch.randn(4, 9, generator=gen) - 2
    lp = (old + 0.4 * torch.randn(4, 9, generator=gen)).requires_grad_()
    adv = torch.randn(4, 9, generator=gen)
    is_w = torch.rand(4, 9, generator=gen) + 0.5 if with_is else None
    loss, metrics = verl.get_policy_loss_fn(name)(old, lp, adv, m, mode, _cfg(), is_w)
    lp_ref = lp.detach().clone().requires_grad_()
    ref = _registry_ref(name, old, lp_ref, adv, m, mode, is_w)
    torch.testing.assert_close(loss, ref.detach(), atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(loss, lp)
    (g_ref,) = torch.autograd.grad(ref, lp_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    expected_keys = set() if name == "gpg" else {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert set(metrics) == expected_keys and all(isinstance(v, float) for v in metrics.values())
    if expected_keys:
        assert metrics["actor/ppo_kl"] == pytest.approx(_masked_mean(old - lp.detach(), m).item(), abs=1e-6)


def test_vanilla_metrics_global_batch_info_and_versions():
    loss_mat_old = torch.zeros(2, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.0, 1.0, 2.0]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -2.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    cfg = _cfg(clip_ratio_high=0.2)
    # per-token losses on the 3 masked tokens: ratio 1.5, A=1 -> -1.2 (clipped); ratio .5, A=-1 -> .8 (clipped);
    # ratio 1, A=-1 -> 1
    loss, metrics = verl.compute_policy_loss_vanilla(loss_mat_old, lp, adv, m, "token-mean", cfg)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 1.0) / 3)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(2 / 3)
    # veRL 0.7: config.global_batch_info = {dp_size, batch_num_tokens, ...}: local sum / global tokens * dp_size
    cfg_g = _cfg(clip_ratio_high=0.2, global_batch_info={"dp_size": 2, "batch_num_tokens": 12})
    loss_g, _ = verl.compute_policy_loss_vanilla(loss_mat_old, lp, adv, m, "token-mean", cfg_g)
    assert loss_g.item() == pytest.approx((-1.2 + 0.8 + 1.0) / 12 * 2)
    assert verl.compute_policy_loss_vanilla(loss_mat_old, lp, adv, m, "token-mean", cfg_g,
                                            version="0.6.1")[0].item() == pytest.approx(loss.item())  # ignored
    # veRL 0.6.0: four tensors, and the seq-means divide by every row (an empty row counts)
    out = verl.compute_policy_loss_vanilla(loss_mat_old, lp, adv, m.clone(), "seq-mean-token-sum", cfg,
                                           version="0.6.0")
    assert len(out) == 4 and out[1].item() == pytest.approx(2 / 3)
    assert out[0].item() == pytest.approx(((-1.2 + 0.8) + 1.0) / 2)
    m3 = torch.cat([m, torch.zeros(1, 3)])
    old3, lp3, adv3 = (torch.cat([x, torch.zeros(1, 3)]) for x in (loss_mat_old, lp, adv))
    assert verl.compute_policy_loss_vanilla(old3, lp3, adv3, m3, "seq-mean-token-sum", cfg, version="0.6.0"
                                            )[0].item() == pytest.approx(0.6 / 3)
    assert verl.compute_policy_loss_vanilla(old3, lp3, adv3, m3, "seq-mean-token-sum", cfg
                                            )[0].item() == pytest.approx(0.6 / 2)  # >= 0.6.1: 2 non-empty rows
    empty = verl.compute_policy_loss_vanilla(old3, lp3, adv3, torch.zeros_like(m3), "token-mean", cfg)[1]
    assert empty == {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": 0.0, "actor/pg_clipfrac_lower": 0.0}
    with pytest.raises(ValueError, match="config"):
        verl.compute_policy_loss_vanilla(old3, lp3, adv3, m3)
    with pytest.raises(ValueError, match="version"):
        verl.compute_policy_loss_vanilla(old3, lp3, adv3, m3, "token-mean", cfg, version="0.5")
    with pytest.raises(ValueError, match="since veRL 0.7"):
        verl.agg_loss(lp, m, "token-mean", dp_size=2, version="0.6.1")
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        verl.get_policy_loss_fn("no_such_loss")


def test_gspo_sequence_ratio_hand_computed():
    # one row, 2 tokens, log-ratios 0.2 and 0.4 -> s = exp(0.3) ~ 1.35 > 1.28: clipped for A > 0
    old = torch.zeros(1, 3)
    lp = torch.tensor([[0.2, 0.4, 9.0]], requires_grad=True)
    m = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = verl.compute_policy_loss_gspo(old, lp, torch.ones(1, 3), m, config=_cfg())
    assert loss.item() == pytest.approx(-1.28)
    assert metrics["actor/pg_clipfrac"] == 1.0
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.equal(g, torch.zeros(1, 3))  # clipped: no gradient
    loss_neg, _ = verl.compute_policy_loss_gspo(old, lp, -torch.ones(1, 3), m, config=_cfg())
    (g,) = torch.autograd.grad(loss_neg, lp)  # A < 0: max(-A s, -A clip(s)) = s, d/dlogp_t = s / n_tokens
    torch.testing.assert_close(g, torch.tensor([[1.0, 1.0, 0.0]]) * torch.exp(torch.tensor(0.3)) / 2)


def test_clip_cov_kl_cov_geo_mean():
    gen, m = _batch(9)
    old = torch.randn(4, 9, generator=gen) - 2
    lp = old + 0.3 * torch.randn(4, 9, generator=gen)
    adv = torch.randn(4, 9, generator=gen)
    # kl_cov: the unclipped -A r, plus coef |log r| on the top-k (by centred covariance) response tokens
    cfg = _cfg(policy_loss={"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.5})
    loss, metrics = verl.compute_policy_loss_kl_cov(old, lp, adv, m, "token-mean", cfg)
    sel = m.bool()
    cov = (adv[sel] - adv[sel].mean()) * (lp[sel] - lp[sel].mean())
    k = max(1, int(sel.sum() * 0.1))
    per_tok = -adv[sel] * (lp - old)[sel].exp()
    per_tok[cov.topk(k).indices] += 0.5 * (lp - old)[sel].abs()[cov.topk(k).indices]
    assert loss.item() == pytest.approx(per_tok.mean().item(), abs=1e-6)
    assert metrics == {"actor/ppo_kl": pytest.approx((lp - old)[sel].abs().mean().item(), abs=1e-6)}
    # clip_cov with an interval that no covariance reaches: plain PPO-clip without ratio clamp or dual clip
    cfg = _cfg(policy_loss={"clip_cov_ratio": 0.5, "clip_cov_lb": 1e6, "clip_cov_ub": 1e7})
    loss, metrics = verl.compute_policy_loss_clip_cov(old, lp, adv, m, "token-mean", cfg)
    r = (lp - old).exp()
    assert loss.item() == pytest.approx(_masked_mean(torch.max(-adv * r, -adv * r.clamp(0.8, 1.28)), m).item(),
                                        abs=1e-6)
    assert metrics["actor/pg_clipfrac"] == 0.0
    # ... and an interval that every covariance is in: max(1, int(0.5 * tokens)) of the unclipped tokens dropped
    cfg = _cfg(policy_loss={"clip_cov_ratio": 0.5, "clip_cov_lb": -1e6, "clip_cov_ub": 1e6})
    _, metrics = verl.compute_policy_loss_clip_cov(old, lp, adv, m, "token-mean", cfg)
    unclipped = int((m.bool() & ~(-adv * r.clamp(0.8, 1.28) > -adv * r)).sum())
    assert metrics["actor/pg_clipfrac"] == pytest.approx(min(int(0.5 * m.sum()), unclipped) / m.sum().item())
    # geo_mean: mean over rows of -mean(A) * exp(mean of sign-wise clipped log-ratios)
    adv_seq = torch.randn(4, 1, generator=gen).expand(4, 9)
    loss, _ = verl.compute_policy_loss_geo_mean(old, lp, adv_seq, m, config=_cfg(clip_ratio_high=0.2))
    d = lp - old
    d_clip = torch.where(adv_seq > 0, d.clamp(max=0.2), d.clamp(min=-0.2))
    n = m.sum(-1)
    ref = (-adv_seq[:, 0] * torch.exp((d_clip * m).sum(-1) / n)).mean()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


# ---- advantage estimators ----------------------------------------------------------------------------------------

def test_index_based_grpo_rloo_hand_computed():
    # groups by uid, unequal and shuffled: "a" = rows 0, 2, 3 (scores 1, 3, 5), "b" = rows 1, 4 (2, 6), "c" = row 5
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 6.0, 7.0])
    m = torch.tensor([[1.0, 1.0, 0.0]] * 6)
    r = torch.zeros(6, 3)
    r[:, 1] = scores  # the outcome reward on the last response token
    index = ["a", "b", "a", "a", "b", "c"]
    mean_a, std_a, mean_b, std_b = 3.0, 2.0, 4.0, 8 ** 0.5
    adv, ret = verl.compute_grpo_outcome_advantage(r, m, index)
    want = torch.tensor([(1 - mean_a) / (std_a + 1e-6), (2 - mean_b) / (std_b + 1e-6), (3 - mean_a) / (std_a + 1e-6),
                         (5 - mean_a) / (std_a + 1e-6), (6 - mean_b) / (std_b + 1e-6), 7 / (1 + 1e-6)])
    torch.testing.assert_close(adv, want[:, None] * m)
    assert torch.equal(adv, ret)
    adv, _ = verl.compute_grpo_outcome_advantage(r, m, index, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(adv[:, 0], torch.tensor([-2.0, -2.0, 0.0, 2.0, 2.0, 7.0]))
    adv_v, _ = verl.compute_grpo_vectorized_outcome_advantage(r, m, index)
    torch.testing.assert_close(adv_v, want[:, None] * m)  # variances >= eps: the floor is inactive
    # RLOO: s_i - mean of the others; the loop version keeps a lone score, the vectorized one gives it 0
    rloo = torch.tensor([1 - 4.0, 2 - 6.0, 3 - 3.0, 5 - 2.0, 6 - 2.0, 7.0])
    torch.testing.assert_close(verl.compute_rloo_outcome_advantage(r, m, index)[0][:, 0], rloo)
    torch.testing.assert_close(verl.compute_rloo_vectorized_outcome_advantage(r, m, index)[0][:, 0],
                               torch.cat([rloo[:5], torch.zeros(1)]))
    ids = torch.tensor([0, 1, 0, 0, 1, 2])  # tensor labels work the same
    torch.testing.assert_close(verl.compute_grpo_outcome_advantage(r, m, ids)[0], want[:, None] * m)


def test_reinforce_pp_resets_at_mask_zeros():
    r = torch.tensor([[1.0, 0.0, 5.0, 2.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])
    _, returns = verl.compute_reinforce_plus_plus_outcome_advantage(r, m, config={"gamma": 0.5})
    # right to left: t4 = 0, t3 = 2, t2 (masked) = 5 + 1 = 6 then reset, t1 = 0, t0 = 1
    torch.testing.assert_close(returns, torch.tensor([[1.0, 0.0, 6.0, 2.0, 0.0]]))
    adv, _ = verl.compute_reinforce_plus_plus_outcome_advantage(r, m, config={"gamma": 0.5})
    torch.testing.assert_close(adv, verl.masked_whiten(returns, m) * m)
    with pytest.raises(ValueError, match="gamma"):
        verl.compute_reinforce_plus_plus_outcome_advantage(r, m)
    # with baseline: group-centred outcome at every response token, whitened over the mask
    rb = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 4.0]])
    mb = torch.ones(3, 2)
    adv, _ = verl.compute_reinforce_plus_plus_baseline_outcome_advantage(rb, mb, ["x", "x", "y"])
    centred = torch.tensor([-1.0, 1.0, 4.0])[:, None].expand(3, 2)
    torch.testing.assert_close(adv, verl.masked_whiten(centred, mb))


def test_remax_opo_gpg_compute_rewards():
    r = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = verl.compute_remax_outcome_advantage(r, torch.tensor([1.0, 0.25]), m)
    torch.testing.assert_close(ret, torch.tensor([[3.0, 3.0, 2.0], [0.5, 0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2.0, 2.0, 1.0], [0.25, 0.0, 0.0]]))
    # OPO: baseline = length-weighted group mean = (3 * 3 + 1 * 0.5) / 4
    adv, _ = verl.compute_opo_outcome_advantage(r, m, ["g", "g"])
    b = (3 * 3.0 + 1 * 0.5) / 4
    torch.testing.assert_close(adv, torch.tensor([[3 - b] * 3, [0.5 - b, 0, 0]]))
    # GPG: (s - mean) * B / (nonzero scores) / f_norm
    adv, _ = verl.compute_gpg_outcome_advantage(torch.tensor([[1.0], [0.0], [3.0]]), torch.ones(3, 1), [0, 0, 1],
                                                f_norm=2.0)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.5, -0.5, 3.0]) * 1.5 / 2)
    scores, old, ref = torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(verl.compute_rewards(scores, old, ref, 0.1), torch.tensor([[0.95, 2.1]]))


@pytest.mark.parametrize("installed,warns", [("0.5.3", True), ("0.6.0", False), ("0.7.0", False),
                                             ("0.8.0.dev", False), ("0.8.0", True), ("0.9.1", True)])
def test_warns_for_uncovered_verl(monkeypatch, installed, warns):
    import importlib.metadata
    import warnings

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        verl._warn_if_uncovered()
    assert any("verl" in str(w.message) for w in caught) == warns


def test_reinforce_pp_returns_match_the_loop_on_random_batches():
    # veRL's rule restated: R[t] = r[t] + gamma * R[t+1], except that R[t+1] is not carried when mask[t+1] is 0
    g = torch.Generator().manual_seed(3)
    r = torch.randn(7, 60, generator=g)
    m = (torch.rand(7, 60, generator=g) < 0.8).float()
    for gamma in (1.0, 0.97, 0.0):
        want = torch.zeros_like(r)
        for t in reversed(range(60)):
            carried = want[:, t + 1] * m[:, t + 1] if t + 1 < 60 else 0.0
            want[:, t] = r[:, t] + gamma * carried
        _, returns = verl.compute_reinforce_plus_plus_outcome_advantage(r, m, config={"gamma": gamma})
        torch.testing.assert_close(returns, want, atol=2e-5, rtol=1e-5)


def test_grpo_passk_hand_computed():
    r = torch.zeros(5, 2)
    r[:, 1] = torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0])
    m = torch.ones(5, 2)
    index = ["a", "a", "a", "b", "b"]
    adv, ret = verl.compute_grpo_passk_outcome_advantage(r, m, index, config={"norm_adv_by_std_in_grpo": False})
    # group a: best is row 1 (3), second 2 -> 1; group b: a tie (5, 5) -> 0; all other rows 0
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    assert adv is ret or torch.equal(adv, ret)
    adv, _ = verl.compute_grpo_passk_outcome_advantage(r, m, index, config={})  # default: divided by the std
    torch.testing.assert_close(adv[1, 0], torch.tensor(1.0 / (1.0 + 1e-6)))  # std of (1, 3, 2) is 1
    with pytest.raises(ValueError, match="at least 2 samples"):
        verl.compute_grpo_passk_outcome_advantage(r, m, ["a", "a", "a", "b", "c"], config={})
    with pytest.raises(ValueError, match="needs config"):
        verl.compute_grpo_passk_outcome_advantage(r, m, index)


def _bypass_config(**corr):
    return {"clip_ratio": 0.2, "policy_loss": {"rollout_correction": corr}}


def test_reinforce_loss_hand_computed_and_bypass_mode():
    roll = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]])
    lp = (roll + torch.tensor([[0.1, -0.3, 0.0], [0.9, 0.0, 0.2]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    isw = torch.tensor([[0.5, 2.0, 9.0], [1.0, 1.0, 1.0]])
    loss, metrics = verl.compute_policy_loss_reinforce(roll, lp, adv, m, "seq-mean-token-sum", {}, isw)
    # per row sum of -A * logp * w over the mask, then the mean over the 2 rows
    row0 = -(1.0 * lp[0, 0] * 0.5 + 1.0 * lp[0, 1] * 2.0)
    row1 = 2.0 * (lp[1, 0] + lp[1, 1] + lp[1, 2])
    torch.testing.assert_close(loss, (row0 + row1) / 2)
    assert metrics["actor/ppo_kl"] == pytest.approx(float(((roll - lp.detach()) * m).sum() / 5), abs=1e-6)
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv * isw * m / 2)
    # bypass, ppo_clip: PPO with ratio pi / pi_rollout on the tokens the k1 band keeps (ratio in [0.5, 2])
    cfg = _bypass_config(loss_type="ppo_clip", rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold=2.0)
    loss, metrics = verl.compute_policy_loss_bypass_mode(roll, lp.detach(), adv, m, "token-mean", cfg)
    kept = m.clone()
    kept[1, 0] = 0.0  # ratio exp(0.9) = 2.46 > 2
    want, _ = verl.compute_policy_loss_vanilla(roll, lp.detach(), adv, kept, "token-mean", cfg)
    torch.testing.assert_close(loss, want)
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(0.2)
    # bypass, reinforce: the REINFORCE loss times the truncated token IS weights min(ratio, 2)
    cfg = _bypass_config(loss_type="reinforce", rollout_is="token", rollout_is_threshold=2.0)
    loss, _ = verl.compute_policy_loss_bypass_mode(roll, lp.detach(), adv, m, "token-mean", cfg)
    w = (lp.detach() - roll).exp().clamp(max=2.0) * m
    torch.testing.assert_close(loss, (-adv * lp.detach() * w).sum() / 5)
    with pytest.raises(ValueError, match="loss_type"):
        verl.compute_policy_loss_bypass_mode(roll, lp, adv, m, "token-mean", _bypass_config(loss_type="x"))
    assert verl.get_policy_loss_fn("bypass_mode") is verl.compute_policy_loss_bypass_mode


def test_rollout_correction_weights_hand_computed():
    lr = torch.log(torch.tensor([[0.25, 1.0, 4.0], [2.0, 1.0, 1.0]]))
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w, metrics = verl.compute_rollout_correction_weights(lr, m, "token", 2.0)
    torch.testing.assert_close(w, torch.tensor([[0.25, 1.0, 2.0], [2.0, 1.0, 0.0]]))
    assert metrics["rollout_is_mean"] == pytest.approx((0.25 + 1 + 4 + 2 + 1) / 5)  # before truncation
    assert metrics["rollout_is_ratio_fraction_high"] == pytest.approx(1 / 5)  # only 4 > 2
    assert metrics["rollout_is_ratio_fraction_low"] == pytest.approx(1 / 5)  # only 0.25 < 1/2
    assert metrics["rollout_is_max"] == pytest.approx(4.0) and metrics["rollout_is_min"] == pytest.approx(0.25)
    # ESS of the weights clamped to [0.5, 2]: (0.5, 1, 2, 2, 1), mean 1.3
    c = torch.tensor([0.5, 1.0, 2.0, 2.0, 1.0])
    assert metrics["rollout_is_eff_sample_size"] == pytest.approx(1 / ((c / 1.3) ** 2).mean().item(), rel=1e-5)
    w, metrics = verl.compute_rollout_correction_weights(lr, m, "sequence", 2.0, True)
    # rho_s = 0.25 * 1 * 4 = 1 and 2 * 1 = 2 (capped at 2): normalised by their mean over sequences, 1.5
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]) / 1.5)
    assert metrics["rollout_is_batch_norm_factor"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="Invalid rollout_is"):
        verl.compute_rollout_correction_weights(lr, m, "geometric")


def test_rollout_rejection_mask_hand_computed():
    lr = torch.log(torch.tensor([[0.25, 1.0, 1.1], [1.2, 0.9, 3.0]]))
    m = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.int64)
    mask, metrics = verl.compute_rollout_rejection_mask(lr, m, "token_k1", "0.5_2.0")
    # k1 = -log rho in [log 0.5, log 2] <=> rho in [0.5, 2]: only the 0.25 token is out (3.0 is off the mask)
    assert mask.tolist() == [[0, 1, 1], [1, 1, 0]] and mask.dtype == torch.int64
    assert metrics["rollout_rs_token_k1_masked_fraction"] == pytest.approx(1 / 5)
    assert metrics["rollout_rs_seq_masked_fraction"] == pytest.approx(1 / 2)
    # seq_max_k2: max of (log rho)^2 / 2 over each sequence: row 0 = 0.96 (from 0.25), row 1 = 0.017
    mask, metrics = verl.compute_rollout_rejection_mask(lr, m, "seq_max_k2", 0.5)
    assert mask.tolist() == [[0, 0, 0], [1, 1, 0]]
    assert metrics["rollout_rs_seq_max_k2_seq_max"] == pytest.approx(0.5 * torch.log(torch.tensor(4.0)).item() ** 2)
    # two options: both must pass
    mask, _ = verl.compute_rollout_rejection_mask(lr, m, "token_k1,seq_max_k2", "0.8_1.25,0.5")
    assert mask.tolist() == [[0, 0, 0], [1, 1, 0]]
    for bad, match in (("token_k9", "Invalid rollout_rs option"), ("seq_max_k1", "Invalid rollout_rs option")):
        with pytest.raises(ValueError, match=match):
            verl.compute_rollout_rejection_mask(lr, m, bad, 2.0)
    with pytest.raises(ValueError, match="one upper bound"):
        verl.compute_rollout_rejection_mask(lr, m, "token_k2", "0.1_0.2")


def test_offpolicy_metrics_and_combined_hand_computed():
    old = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    roll = torch.tensor([[-1.5, -2.0], [-0.5, -1.5]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    metrics = verl.compute_offpolicy_metrics(old, roll, m)
    # per-sequence mean log-probs: training (-1.5, -0.5), rollout (-1.75, -0.5)
    assert metrics["training_log_ppl"] == pytest.approx(1.0)
    assert metrics["rollout_log_ppl"] == pytest.approx(1.125)
    assert metrics["kl"] == pytest.approx(-0.5 / 3)
    assert metrics["log_ppl_diff"] == pytest.approx(-0.125) and metrics["log_ppl_diff_min"] == pytest.approx(-0.25)
    rho = torch.tensor([0.5, 0.0, 0.0]).exp()
    assert metrics["k3_kl"] == pytest.approx(float((rho - rho.log() - 1).mean()), rel=1e-5)
    assert metrics["chi2_seq"] == pytest.approx(float((torch.tensor([1.0, 0.0]).exp().mean()) - 1), rel=1e-5)
    weights, mask, combined = verl.compute_rollout_correction_and_rejection_mask(old, roll, m, "token", 2.0)
    torch.testing.assert_close(weights.batch["rollout_is_weights"], torch.tensor([[0.5, 0.0], [0.0, 0.0]]).exp() * m)
    assert torch.equal(mask, m) and combined["rollout_corr/kl"] == metrics["kl"]
    assert verl.compute_rollout_correction_and_rejection_mask(old, roll, m)[0] is None
    with pytest.raises(ValueError, match="rollout_rs_threshold"):
        verl.compute_rollout_correction_and_rejection_mask(old, roll, m, rollout_rs="token_k1")


def _ratios_case():
    # IS ratios pi_train / pi_rollout per token; row 0 has three tokens, row 1 two
    rho = torch.tensor([[3.0, 1.0, 0.4, 1.0], [1.5, 0.6, 1.0, 1.0]])
    return torch.log(rho), torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def test_v07_rejection_by_ratio_hand_computed():
    lr, m = _ratios_case()
    # "token": each ratio in [0.5, 2] (lower defaults to 1 / upper): 3 and 0.4 go
    mask, metrics = verl.compute_rollout_rejection_mask(lr, m, "token", 2.0, version="0.7")
    assert torch.equal(mask, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    assert metrics["rollout_rs_masked_fraction"] == pytest.approx(2 / 5)
    assert metrics["rollout_rs_seq_masked_fraction"] == pytest.approx(1 / 2)
    assert metrics["rollout_rs_mean"] == pytest.approx((3 + 1 + 0.4 + 1.5 + 0.6) / 5)
    assert (metrics["rollout_rs_max"], metrics["rollout_rs_min"]) == (pytest.approx(3.0), pytest.approx(0.4))
    assert metrics["rollout_rs_ratio_fraction_high"] == pytest.approx(1 / 5)
    assert metrics["rollout_rs_ratio_fraction_low"] == pytest.approx(1 / 5)
    # "sequence": products 1.2 and 0.9 against [0.8, 1.1]: row 0 goes whole
    mask, metrics = verl.compute_rollout_rejection_mask(lr, m, "sequence", 1.1, 0.8, version="0.6.1")
    assert torch.equal(mask, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    assert metrics["rollout_rs_masked_fraction"] == pytest.approx(3 / 5)
    assert (metrics["rollout_rs_max"], metrics["rollout_rs_min"]) == (pytest.approx(1.2), pytest.approx(0.9))
    assert metrics["rollout_rs_ratio_fraction_high"] == pytest.approx(1 / 2)
    # "geometric": 1.2 ** (1/3) = 1.063 and 0.9 ** (1/2) = 0.949 against [0.9, 1.05]
    mask, metrics = verl.compute_rollout_rejection_mask(lr, m, "geometric", 1.05, 0.9, version="0.7")
    assert torch.equal(mask, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    assert metrics["rollout_rs_max"] == pytest.approx(1.2 ** (1 / 3), rel=1e-5)
    assert metrics["rollout_rs_seq_masked_fraction"] == pytest.approx(1 / 2)


def test_v07_veto_hand_computed():
    lr, m = _ratios_case()
    roll = torch.full_like(lr, -1.0)
    old = roll + lr
    # a token with ratio 0.4 < 0.5 vetoes row 0 whole; the IS weights are untouched (min(rho, 2), 0 off the mask)
    weights, mask, metrics = verl.compute_rollout_correction_and_rejection_mask(
        old, roll, m, rollout_is="token", rollout_token_veto_threshold=0.5, version="0.7")
    assert torch.equal(mask, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    expected = torch.tensor([[2.0, 1.0, 0.4, 0.0], [1.5, 0.6, 0.0, 0.0]])
    assert torch.allclose(weights.batch["rollout_is_weights"], expected)
    assert metrics["rollout_corr/rollout_is_veto_fraction"] == pytest.approx(1 / 2)
    assert metrics["rollout_corr/rollout_is_catastrophic_token_fraction"] == pytest.approx(1 / 5)
    # veto after the rejection: "token" in [0.5, 2] drops 3 and 0.4, the veto then row 0's last token
    _, mask, metrics = verl.compute_rollout_correction_and_rejection_mask(
        old, roll, m, rollout_rs="token", rollout_rs_threshold=2.0, rollout_token_veto_threshold=0.5, version="0.6.1")
    assert torch.equal(mask, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(2 / 5)  # before the veto
    _, mask, metrics = verl.compute_rollout_correction_and_rejection_mask(old, roll, m, version="0.7")
    assert torch.equal(mask, m) and metrics["rollout_corr/rollout_is_veto_fraction"] == 0.0
    assert "rollout_corr/rollout_is_veto_fraction" not in verl.compute_rollout_correction_and_rejection_mask(
        old, roll, m)[2]  # HEAD: no veto


def test_rollout_correction_versions_not_mixed():
    lr, m = _ratios_case()
    old = lr - 1.0
    roll = torch.full_like(lr, -1.0)
    with pytest.raises(ValueError, match="rollout_rs"):
        verl.compute_rollout_rejection_mask(lr, m, "token", 2.0)  # HEAD has k-options only
    with pytest.raises(ValueError, match="rollout_rs"):
        verl.compute_rollout_rejection_mask(lr, m, "token_k1", 2.0, version="0.7")
    with pytest.raises(ValueError, match="threshold_lower"):
        verl.compute_rollout_rejection_mask(lr, m, "token_k1", 2.0, 0.5)
    with pytest.raises(ValueError, match="veto"):
        verl.compute_rollout_correction_and_rejection_mask(old, roll, m, rollout_token_veto_threshold=1e-4)
    with pytest.raises(ValueError, match="0.6.0"):
        verl.compute_rollout_correction_weights(lr, m, version="0.6.0")
    with pytest.raises(ValueError, match="positive"):
        verl.compute_rollout_correction_and_rejection_mask(old, roll, m, rollout_token_veto_threshold=0.0,
                                                           version="0.7")


def test_v061_sequence_batch_normalize_counts_empty_rows():
    lr, m = _ratios_case()
    lr, m = torch.cat([lr, torch.zeros(1, 4)]), torch.cat([m, torch.zeros(1, 4)])
    # sequence weights 1.2 and 0.9 (below the cap 2); HEAD / 0.7 divide by their mean 1.05, 0.6.1 by (1.2+0.9+0)/3
    for version, mean in (("0.8.dev", 1.05), ("0.7", 1.05), ("0.6.1", 0.7)):
        w, metrics = verl.compute_rollout_correction_weights(lr, m, "sequence", 2.0, True, version=version)
        assert metrics["rollout_is_batch_norm_factor"] == pytest.approx(mean)
        assert w[0, 0].item() == pytest.approx(1.2 / mean) and w[1, 1].item() == pytest.approx(0.9 / mean)


def test_v07_bypass_mode_and_head_version_of_losses():
    lr, m = _ratios_case()
    roll = torch.full_like(lr, -1.0)
    lp, adv = roll + lr, torch.ones_like(lr)
    cfg = _bypass_config(loss_type="ppo_clip", rollout_rs="token", rollout_rs_threshold=2.0,
                         rollout_token_veto_threshold=0.5)
    _, metrics = verl.compute_policy_loss_bypass_mode(roll, lp, adv, m, "token-mean", cfg, version="0.7")
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(2 / 5)
    assert metrics["rollout_corr/rollout_is_veto_fraction"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="bypass_mode"):
        verl.compute_policy_loss_bypass_mode(roll, lp, adv, m, "token-mean", cfg, version="0.6.1")
    # "0.8.dev" (HEAD) is "0.7" for the policy losses and agg_loss
    vcfg = {"clip_ratio": 0.2}
    assert verl.compute_policy_loss_vanilla(roll, lp, adv, m, "seq-mean-token-mean", vcfg, version="0.8.dev")[0] \
        .item() == pytest.approx(verl.compute_policy_loss_vanilla(roll, lp, adv, m, "seq-mean-token-mean", vcfg)[0]
                                 .item())
    assert verl.agg_loss(lp, m, "token-mean", dp_size=2, version="0.8.dev").item() == pytest.approx(
        verl.agg_loss(lp, m, "token-mean", dp_size=2).item())
