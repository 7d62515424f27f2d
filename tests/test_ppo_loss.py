import math

import pytest
import torch
from _testing import NewTensors, assert_within_ref_error, compiles_for_hopper, device_backends, usable_backends

import rlhf_fast
from rlhf_fast import AGG_MODES, loss_normalizer, loss_weights
from rlhf_fast.ops.ppo_loss import (POLICY_STATS, TOKEN_LOSS_BACKENDS, aggregate_ref, ppo_loss_from_logits_ref,
                                    ppo_objective_ref, ppo_policy_loss_backward_op, ppo_policy_loss_op,
                                    ppo_policy_loss_ref, ppo_token_loss_op, ppo_value_loss_backward_op,
                                    ppo_value_loss_op, ppo_value_loss_ref)
from rlhf_fast.ops.token_logprobs import LOGPROBS_BACKENDS

TOKEN_BACKENDS = usable_backends(TOKEN_LOSS_BACKENDS)  # of the standalone ppo_policy_loss / ppo_value_loss


def _tokens(shape, seed=0, masked_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(shape, generator=g) * 0.5 - 2.0
    old_logp = logp + torch.randn(shape, generator=g) * 0.4  # ratios both inside and outside the clip range
    advantages = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) >= masked_frac
    return logp, old_logp, advantages, mask


def _packed_seq_ids(n, seed=0):
    """Sequence ids of n packed tokens: a few sequences of random lengths, ids in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (n,), generator=g)
    ids = torch.repeat_interleave(torch.arange(n), lengths)[:n]
    return torch.randperm(n, generator=g)[ids]


def _logits_inputs(shape, dtype, seed=0):
    """logits [..., V] and [...] labels / old_logp / advantages / ref_logp / mask, with -100 at some masked labels."""
    g = torch.Generator().manual_seed(seed)
    *batch, vocab = shape
    logits = (torch.randn(shape, generator=g) * 2).to(dtype)
    labels = torch.randint(0, vocab, batch, generator=g)
    mask = torch.rand(batch, generator=g) >= 0.25
    labels = torch.where(~mask & (torch.rand(batch, generator=g) < 0.5), -100, labels)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    old_logp = logp + torch.randn(batch, generator=g) * 0.3
    ref_logp = logp + torch.randn(batch, generator=g) * 0.3
    advantages = torch.randn(batch, generator=g)
    return logits, labels, old_logp, advantages, mask, ref_logp


def _agg(agg, seq_ids=None, max_len=None):
    """Keyword arguments of the references for mode agg; packed modes dividing by a length get max_len = 9."""
    if seq_ids is not None and max_len is None and agg in ("seq-mean-token-sum-norm", "dr-grpo"):
        max_len = 9
    return dict(agg=agg, seq_ids=seq_ids, max_len=max_len)


def _use_backend(backend):
    if backend == "triton":  # the Triton log-prob kernels are a separate piece of work; run them once they exist
        pytest.importorskip("rlhf_fast.kernels.logprobs", reason="rlhf_fast/kernels/logprobs.py is not in this tree")
    return rlhf_fast.use_backend(backend)


# --------------------------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------------------------

# ratio, advantage, loss, d loss / d logp, clipped, dual-clipped; clip_low=0.2, clip_high=0.3, dual_clip=3
POLICY_CASES = [
    (1.1, 2.0, -2.2, -2.2, False, False),  # A > 0, ratio inside [0.8, 1.3]: -A * ratio
    (1.5, 2.0, -2.6, 0.0, True, False),  # A > 0, ratio above: -A * 1.3, no gradient
    (0.5, 2.0, -1.0, -1.0, False, False),  # A > 0, ratio below: max(-1.0, -1.6) = unclipped -A * ratio
    (1.5, -2.0, 3.0, 3.0, False, False),  # A < 0, ratio above: max(3.0, 2.6) = unclipped
    (0.5, -2.0, 1.6, 0.0, True, False),  # A < 0, ratio below: max(1.0, 1.6) = -A * 0.8, no gradient
    (2.0, -2.0, 4.0, 4.0, False, False),  # A < 0, dual bound -A * 3 = 6 not reached
    (4.0, -2.0, 6.0, 0.0, False, True),  # A < 0, unclipped 8 > 6: dual clip, no gradient
]


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
def test_policy_loss_hand_computed(backend):
    ratio, adv, loss, grad, clipped, dual = (torch.tensor(col) for col in zip(*POLICY_CASES))
    old_logp = torch.full_like(ratio, -1.0)
    logp = (old_logp + ratio.log()).requires_grad_(True)
    weights = loss_weights(torch.ones_like(ratio, dtype=torch.bool))  # token-mean: 1 / 7 each
    with rlhf_fast.use_backend(backend):
        out, stats = rlhf_fast.ppo_policy_loss(logp, old_logp, adv, weights, clip_low=0.2, clip_high=0.3,
                                               dual_clip=3.0)
    n = len(POLICY_CASES)
    torch.testing.assert_close(out, loss.mean())
    out.backward()
    torch.testing.assert_close(logp.grad, grad / n)
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(2 / n))
    torch.testing.assert_close(stats["dual_clip_frac"], torch.tensor(1 / n))
    torch.testing.assert_close(stats["ratio_mean"], ratio.mean())
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(4.0))
    torch.testing.assert_close(stats["approx_kl"], (ratio - 1 - ratio.log()).mean())
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in stats.values())


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
def test_policy_loss_symmetric_default_and_no_dual_clip(backend):
    # clip_high=None -> 0.2: ratio 1.25 with A = 2 clips at 1.2; without dual_clip the A < 0 loss is unbounded
    ratio, adv = torch.tensor([1.25, 4.0]), torch.tensor([2.0, -2.0])
    old_logp = torch.zeros(2)
    with rlhf_fast.use_backend(backend):
        out, stats = rlhf_fast.ppo_policy_loss(ratio.log(), old_logp, adv, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(out, torch.tensor(-2.4 * 0.5 + 8.0 * 0.25))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(0.5))
    assert stats["dual_clip_frac"] == 0


# value, old value, return, loss, d loss / d value, clipped; clip = 0.2
VALUE_CASES = [
    (1.0, 0.875, 0.0, 0.5, 1.0, False),  # |v - v_old| <= clip: both terms equal
    (1.5, 1.0, 0.0, 1.125, 1.5, False),  # clamp active, unclipped (1.5)^2 > clipped (1.2)^2
    (1.5, 1.0, 2.0, 0.32, 0.0, True),  # clamp active, clipped (1.2 - 2)^2 > (1.5 - 2)^2: no gradient
    (0.5, 1.0, 0.0, 0.32, 0.0, True),  # clamp active from below: (0.8)^2 > (0.5)^2
]


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
def test_value_loss_hand_computed(backend):
    v, v_old, ret, loss, grad, clipped = (torch.tensor(col) for col in zip(*VALUE_CASES))
    v.requires_grad_(True)
    with rlhf_fast.use_backend(backend):
        out, stats = rlhf_fast.ppo_value_loss(v, v_old, ret, loss_weights(torch.ones_like(v)), clip=0.2)
    torch.testing.assert_close(out, loss.mean())
    out.backward()
    torch.testing.assert_close(v.grad, grad / len(VALUE_CASES))
    torch.testing.assert_close(stats["clip_frac"], clipped.float().mean())

    v.grad = None
    with rlhf_fast.use_backend(backend):
        out, stats = rlhf_fast.ppo_value_loss(v, v_old, ret, loss_weights(torch.ones_like(v)), clip=None)
    torch.testing.assert_close(out, (0.5 * (v - ret) ** 2).mean())
    out.backward()
    torch.testing.assert_close(v.grad, (v - ret).detach() / len(VALUE_CASES))
    assert stats["clip_frac"] == 0


# per-token losses 0.5 * d^2 = [[1, 2, 3, (4)], [5, 6, (0), (0)], [(7), (7), (7), (7)]]; () masked
AGG_TOKEN_LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
AGG_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
AGG_EXPECTED = {
    "token-mean": 17 / 5,
    "seq-mean-token-sum": (6 + 11) / 2,  # the fully masked row is not a sequence
    "seq-mean-token-mean": (6 / 3 + 11 / 2) / 2,
    "seq-mean-token-sum-norm": 17 / 4,  # / max_len = T
    "dr-grpo": 17 / (3 * 4),  # / (B * max_len), the fully masked row counted
}
AGG_NORMALIZER = {"token-mean": 5, "seq-mean-token-sum": 2, "seq-mean-token-mean": 2, "seq-mean-token-sum-norm": 4,
                  "dr-grpo": 12}


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_agg_modes_hand_computed(backend, agg, layout):
    returns = torch.zeros_like(AGG_TOKEN_LOSS)
    values = (2 * AGG_TOKEN_LOSS).sqrt()
    mask, kw = AGG_MASK, dict(agg=agg)
    if layout == "packed":  # tokens in a shuffled order, sequences named by non-contiguous ids
        perm = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))
        values, returns, mask = values.flatten()[perm], returns.flatten()[perm], mask.flatten()[perm]
        kw = dict(agg=agg, seq_ids=torch.tensor([7] * 4 + [2] * 4 + [11] * 4)[perm], max_len=4)
    assert loss_normalizer(mask, **kw) == AGG_NORMALIZER[agg]
    weights = loss_weights(mask, **kw)
    assert weights.dtype == torch.float32 and weights.shape == mask.shape and (weights[mask == 0] == 0).all()
    values.requires_grad_(True)
    with rlhf_fast.use_backend(backend):
        out, _ = rlhf_fast.ppo_value_loss(values, values.detach(), returns, weights, clip=None)
    torch.testing.assert_close(out, torch.tensor(AGG_EXPECTED[agg]))
    ref, _ = ppo_value_loss_ref(values, values.detach(), returns, mask, clip=None, **kw)
    (grad,) = torch.autograd.grad(out, values)
    (grad_ref,) = torch.autograd.grad(ref, values)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_loss_weights_equal_per_mode_formula_padded_and_packed(agg):
    """sum(loss_weights * l) = the per-mode formula, on random batches with empty rows, padded and packed
    (shuffled tokens); a given normalizer replaces D; no token gives 0, never NaN."""
    g = torch.Generator().manual_seed(3)
    loss_tok = torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) < 0.6
    mask[1] = mask[4] = False  # empty sequences
    w = loss_weights(mask, agg)
    torch.testing.assert_close((w.double() * loss_tok).sum(), aggregate_ref(loss_tok, mask, agg))
    perm = torch.randperm(54, generator=g)
    seq_ids = torch.arange(6).repeat_interleave(9)[perm]
    packed_kw = dict(agg=agg, seq_ids=seq_ids, max_len=9)
    w_packed = loss_weights(mask.flatten()[perm], **packed_kw)
    torch.testing.assert_close(w_packed, w.flatten()[perm])
    torch.testing.assert_close((w_packed.double() * loss_tok.flatten()[perm]).sum(),
                               aggregate_ref(loss_tok.flatten()[perm], mask.flatten()[perm], **packed_kw))
    d = loss_normalizer(mask, agg)
    torch.testing.assert_close(loss_weights(mask, agg, normalizer=2 * d), w / 2)
    for empty in (torch.zeros(3, 5, dtype=torch.bool), torch.zeros(0, 5, dtype=torch.bool)):
        assert (loss_weights(empty, agg) == 0).all() and torch.isfinite(loss_normalizer(empty, agg))
    assert (loss_weights(mask, agg, normalizer=torch.tensor(0.0)) == 0).all()


def test_loss_weights_bad_input():
    mask = torch.ones(2, 5, dtype=torch.bool)
    cases = [
        (ValueError, "agg must be one of", lambda: loss_weights(mask, "mean")),
        (ValueError, "needs seq_ids", lambda: loss_weights(mask[0], "seq-mean-token-sum")),
        (ValueError, "needs seq_ids", lambda: loss_weights(mask[0], "dr-grpo", max_len=5)),
        (ValueError, "needs max_len", lambda: loss_weights(mask[0], "seq-mean-token-sum-norm")),
        (ValueError, "seq_ids is for packed", lambda: loss_weights(mask, seq_ids=torch.zeros(2, 5).long())),
        (ValueError, "seq_ids must be in", lambda: loss_weights(mask[0], "seq-mean-token-sum",
                                                                seq_ids=torch.full((5,), 5))),
        (TypeError, "seq_ids must be int64", lambda: loss_weights(mask[0], seq_ids=torch.zeros(5))),
        (ValueError, "mask must be", lambda: loss_weights(mask[None])),
        (ValueError, "max_len must be", lambda: loss_weights(mask, max_len=0)),
        (ValueError, "normalizer must be", lambda: loss_weights(mask, normalizer=torch.ones(2))),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()


# --------------------------------------------------------------------------------------------------------------
# Standalone losses against the references (values, stats, gradients)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", device_backends(TOKEN_LOSS_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_policy_and_value_loss_match_reference(device, backend, dtype, agg, layout):
    shape = (5, 37) if layout == "padded" else (173,)
    seq_ids = _packed_seq_ids(173).to(device) if layout == "packed" else None
    logp, old_logp, adv, mask = (x.to(device, dtype) if x.is_floating_point() else x.to(device)
                                 for x in _tokens(shape))
    agg_kw = _agg(agg, seq_ids)
    weights = loss_weights(mask, **agg_kw)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, **agg_kw)
    logp.requires_grad_(True)
    with rlhf_fast.use_backend(backend):
        out, stats = rlhf_fast.ppo_policy_loss(logp, old_logp, adv, weights, clip_low=0.2, clip_high=0.28,
                                               dual_clip=3.0)
    (grad,) = torch.autograd.grad(out, logp)
    ref, ref_stats = ppo_policy_loss_ref(logp, old_logp, adv, mask, **kw)
    (grad_ref,) = torch.autograd.grad(ref, logp)
    logp64 = logp.detach().double().requires_grad_(True)  # an fp64 leaf: the exact gradient is not rounded
    exact, _ = ppo_policy_loss_ref(logp64, old_logp.double(), adv.double(), mask, **kw)
    (grad_exact,) = torch.autograd.grad(exact, logp64)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_within_ref_error(out, ref, exact, name="policy loss")
    assert_within_ref_error(grad, grad_ref, grad_exact, name="policy grad")
    for key in POLICY_STATS:
        torch.testing.assert_close(stats[key], ref_stats[key].float(), msg=key)

    values, old_values, returns = logp.detach().clone().requires_grad_(True), old_logp, adv
    with rlhf_fast.use_backend(backend):
        out, stats = rlhf_fast.ppo_value_loss(values, old_values, returns, weights, clip=0.2)
    ref, ref_stats = ppo_value_loss_ref(values, old_values, returns, mask, clip=0.2, **agg_kw)
    values64 = values.detach().double().requires_grad_(True)
    exact, _ = ppo_value_loss_ref(values64, old_values.double(), returns.double(), mask, clip=0.2, **agg_kw)
    grads = [torch.autograd.grad(out, values)[0], torch.autograd.grad(ref, values)[0],
             torch.autograd.grad(exact, values64)[0]]
    assert_within_ref_error(out, ref, exact, name="value loss")
    assert_within_ref_error(*grads, name="value grad")
    torch.testing.assert_close(stats["clip_frac"], ref_stats["clip_frac"])
    assert 0 < stats["clip_frac"] < 1


@pytest.mark.parametrize("device, backend", device_backends(TOKEN_LOSS_BACKENDS))
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_standalone_losses_many_blocks(device, backend, layout):
    """10500 tokens: several kernel blocks and CPU tasks, sequences spanning blocks."""
    shape, agg = ((7, 1500), "seq-mean-token-mean") if layout == "padded" else ((10500,), "seq-mean-token-sum")
    seq_ids = torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(1)).to(device) \
        if layout == "packed" else None
    logp, old_logp, adv, mask = (x.to(device) for x in _tokens(shape))
    logp.requires_grad_(True)
    weights = loss_weights(mask, agg, seq_ids=seq_ids)
    for fast, ref_fn, kw in ((rlhf_fast.ppo_policy_loss, ppo_policy_loss_ref, dict(dual_clip=2.0)),
                             (rlhf_fast.ppo_value_loss, ppo_value_loss_ref, dict(clip=0.2))):
        with rlhf_fast.use_backend(backend):
            out, stats = fast(logp, old_logp, adv, weights, **kw)
        ref, ref_stats = ref_fn(logp, old_logp, adv, mask, agg=agg, seq_ids=seq_ids, **kw)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(torch.autograd.grad(out, logp)[0], torch.autograd.grad(ref, logp)[0])
        for key, value in stats.items():
            torch.testing.assert_close(value, ref_stats[key].float(), msg=key)


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
def test_masked_positions_are_ignored_whatever_their_values(backend):
    logp, old_logp, adv, mask = _tokens((4, 9))
    bad = torch.tensor([math.nan, math.inf, -math.inf])
    old_bad = torch.where(mask, old_logp, bad[torch.arange(36).view(4, 9) % 3])
    adv_bad = torch.where(mask, adv, bad[(torch.arange(36).view(4, 9) + 1) % 3])
    logp.requires_grad_(True)
    for agg in AGG_MODES:
        weights = loss_weights(mask, agg)
        with rlhf_fast.use_backend(backend):
            out, stats = rlhf_fast.ppo_policy_loss(logp, old_bad, adv_bad, weights, dual_clip=2.0)
        ref, _ = ppo_policy_loss_ref(logp, old_logp, adv, mask, dual_clip=2.0, agg=agg)
        torch.testing.assert_close(out, ref)
        (grad,) = torch.autograd.grad(out, logp)
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
        assert all(torch.isfinite(v) for v in stats.values())
        with rlhf_fast.use_backend(backend):
            out, _ = rlhf_fast.ppo_value_loss(logp, old_bad, adv_bad, weights)
        (grad,) = torch.autograd.grad(out, logp)
        assert torch.isfinite(out) and torch.isfinite(grad).all() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_all_masked_batch(backend, agg):
    logp, old_logp, adv, _ = _tokens((3, 8))
    weights = loss_weights(torch.zeros(3, 8), agg)
    logp.requires_grad_(True)
    with rlhf_fast.use_backend(backend):
        out, stats = rlhf_fast.ppo_policy_loss(logp, old_logp, adv, weights, dual_clip=3.0)
        out_v, stats_v = rlhf_fast.ppo_value_loss(logp, old_logp, adv, weights)
    grad, grad_v = (torch.autograd.grad(x, logp)[0] for x in (out, out_v))
    assert out == 0 and out_v == 0 and (grad == 0).all() and (grad_v == 0).all()
    assert all(v == 0 for v in [*stats.values(), *stats_v.values()])

    logits, labels, old_logp, adv, _, ref_logp = _logits_inputs((2, 5, 11), torch.float32)
    logits.requires_grad_(True)
    weights = loss_weights(torch.zeros(2, 5, dtype=torch.bool), agg)
    out, stats = rlhf_fast.ppo_loss_from_logits(logits, labels, old_logp, adv, weights, ref_logp=ref_logp,
                                                kl_coef=0.1, entropy_coef=0.01)
    out.backward()
    assert out == 0 and (logits.grad == 0).all() and all(v == 0 for v in stats.values())


# --------------------------------------------------------------------------------------------------------------
# ppo_loss_from_logits against the composite reference
# --------------------------------------------------------------------------------------------------------------


def _check_from_logits(backend, shape, dtype, kw, layout_seq_ids=None):
    logits, labels, old_logp, adv, mask, ref_logp = _logits_inputs(shape, dtype)
    agg_kw = _agg(kw.pop("agg"), layout_seq_ids)
    weights = loss_weights(mask, **agg_kw)
    logits.requires_grad_(True)
    with _use_backend(backend):
        out, stats = rlhf_fast.ppo_loss_from_logits(logits, labels, old_logp, adv, weights, ref_logp=ref_logp, **kw)
    kw = dict(kw, ref_logp=ref_logp, **agg_kw)
    (grad,) = torch.autograd.grad(out, logits)
    ref, ref_stats = ppo_loss_from_logits_ref(logits, labels, old_logp, adv, mask, **kw)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    exact_kw = dict(kw, ref_logp=ref_logp.double())
    logits64 = logits.detach().double().requires_grad_(True)  # an fp64 leaf: the exact gradient is not rounded
    exact, _ = ppo_loss_from_logits_ref(logits64, labels, old_logp.double(), adv.double(), mask, **exact_kw)
    (grad_exact,) = torch.autograd.grad(exact, logits64)
    assert out.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    assert_within_ref_error(out, ref, exact, name="loss")
    assert_within_ref_error(grad, grad_ref, grad_exact, name="grad_logits")
    assert set(stats) == set(ref_stats)
    for key, value in stats.items():
        torch.testing.assert_close(value, ref_stats[key].float(), msg=key, atol=1e-5, rtol=1e-4)
    return out, grad


FULL = dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, temperature=0.7, clip_low=0.2, clip_high=0.28,
            dual_clip=3.0)


@pytest.mark.parametrize("backend", usable_backends(LOGPROBS_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_from_logits_matches_composite(backend, dtype, layout):
    if layout == "padded":
        _check_from_logits(backend, (3, 13, 301), dtype, dict(FULL, agg="seq-mean-token-mean"))
    else:
        _check_from_logits(backend, (41, 301), dtype, dict(FULL, agg="seq-mean-token-sum"), _packed_seq_ids(41))


@pytest.mark.parametrize("backend", usable_backends(LOGPROBS_BACKENDS))
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3", "abs"])
def test_from_logits_kl_kinds_and_options(backend, kl_kind):
    for i, agg in enumerate(AGG_MODES):
        kw = dict(kl_coef=0.3, kl_kind=kl_kind, entropy_coef=(0.0, 0.02)[i % 2], temperature=(1.0, 1.3)[i % 2],
                  dual_clip=(None, 2.0)[i % 2], agg=agg)
        _check_from_logits(backend, (2, 1 + 3 * i, 97), torch.float32, kw)
    # ref_logp given with kl_coef = 0: reported in the stats, not in the loss
    logits, labels, old_logp, adv, mask, ref_logp = _logits_inputs((2, 4, 33), torch.float32)
    weights = loss_weights(mask)
    with _use_backend(backend):
        out, stats = rlhf_fast.ppo_loss_from_logits(logits, labels, old_logp, adv, weights, ref_logp=ref_logp,
                                                    kl_kind=kl_kind)
        plain, _ = rlhf_fast.ppo_loss_from_logits(logits, labels, old_logp, adv, weights)
    kl = rlhf_fast.kl_penalty(rlhf_fast.logprobs(logits, labels), ref_logp, kl_kind)
    assert out == plain
    torch.testing.assert_close(stats["kl"], kl[mask].mean())


@pytest.mark.parametrize("backend", usable_backends(LOGPROBS_BACKENDS))
def test_from_logits_packed_equals_padded(backend):
    logits, labels, old_logp, adv, mask, ref_logp = _logits_inputs((3, 6, 50), torch.float32)
    seq_ids = torch.arange(3).repeat_interleave(6)
    for agg in AGG_MODES:
        kw = dict(FULL, ref_logp=ref_logp)
        with _use_backend(backend):
            padded, _ = rlhf_fast.ppo_loss_from_logits(logits, labels, old_logp, adv, loss_weights(mask, agg), **kw)
            kw["ref_logp"] = ref_logp.flatten()
            weights = loss_weights(mask.flatten(), agg, seq_ids=seq_ids, max_len=6)
            packed, _ = rlhf_fast.ppo_loss_from_logits(logits.view(18, 50), labels.flatten(), old_logp.flatten(),
                                                       adv.flatten(), weights, **kw)
        torch.testing.assert_close(packed, padded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ppo_objective_matches_reference_and_is_the_from_logits_objective(dtype):
    """ppo_objective on given log-probs / entropy (values and gradients of both) against the reference, and
    ppo_loss_from_logits = logprobs_and_entropy + ppo_objective exactly."""
    logits, labels, old_logp, adv, mask, ref_logp = _logits_inputs((3, 7, 41), dtype)
    seq_ids = _packed_seq_ids(21)
    for agg_kw in (_agg("seq-mean-token-mean"), _agg("dr-grpo", seq_ids)):
        packed = agg_kw["seq_ids"] is not None
        flat = (lambda x: x.flatten(0, 1)) if packed else (lambda x: x)
        z, y, old, a, m, ref = (flat(x) for x in (logits, labels, old_logp, adv, mask, ref_logp))
        weights = loss_weights(m, **agg_kw)
        logp, ent = rlhf_fast.logprobs_and_entropy(z, y, temperature=0.7)
        logp, ent = logp.to(dtype).requires_grad_(True), ent.to(dtype).requires_grad_(True)
        kw = dict(FULL, ref_logp=ref)
        del kw["temperature"]
        out, stats = rlhf_fast.ppo_objective(logp, old, a, weights, entropy=ent, **kw)
        ref_out, ref_stats = ppo_objective_ref(logp, old, a, m, entropy=ent, **kw, **agg_kw)
        grads = torch.autograd.grad(out, (logp, ent))
        ref_grads = torch.autograd.grad(ref_out, (logp, ent))
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(out, ref_out.float(), **tol)
        for grad, grad_ref in zip(grads, ref_grads):
            assert grad.dtype == dtype and (grad[m == 0] == 0).all()
            torch.testing.assert_close(grad, grad_ref, **tol)
        assert set(stats) == set(ref_stats)
        for key, value in stats.items():
            torch.testing.assert_close(value, ref_stats[key].float(), msg=key, atol=1e-5, rtol=1e-4)
        lp, en = rlhf_fast.logprobs_and_entropy(z, y, temperature=0.7)
        composed, _ = rlhf_fast.ppo_objective(lp, old, a, weights, entropy=en, **kw)
        fused, _ = rlhf_fast.ppo_loss_from_logits(z, y, old, a, weights, temperature=0.7, **kw)
        assert fused == composed


@pytest.mark.parametrize("backend", usable_backends(LOGPROBS_BACKENDS[1:]))
def test_from_logits_writes_no_other_vocab_sized_tensor(backend):
    """The fused ops' outputs are per-token vectors forward and the gradient alone backward: no [B, T, V] tensor is
    produced by any op of the composition but grad_logits (dispatch-level view of every op's outputs)."""
    logits, labels, old_logp, adv, mask, ref_logp = _logits_inputs((2, 7, 64), torch.bfloat16)
    logits.requires_grad_(True)
    kw = dict(FULL, ref_logp=ref_logp)
    with _use_backend(backend):
        with NewTensors() as fwd:
            out, _ = rlhf_fast.ppo_loss_from_logits(logits, labels, old_logp, adv, loss_weights(mask), **kw)
        with NewTensors() as bwd:
            out.backward()
    big = lambda mode: [(op, dtype) for op, dtype, n in mode.created if n >= logits.numel()]  # noqa: E731
    assert big(fwd) == []
    assert big(bwd) == [("rlhf_fast.logprobs_entropy_backward.default", torch.bfloat16)]


# --------------------------------------------------------------------------------------------------------------
# opcheck and torch.compile
# --------------------------------------------------------------------------------------------------------------


def test_opcheck_token_loss():
    for dtype, with_terms, dual, kl_kind in ((torch.float32, False, None, "k3"), (torch.bfloat16, True, 2.0, "k3"),
                                             (torch.float32, True, None, "abs")):
        logp, old_logp, adv, mask = (x.to(dtype) if x.is_floating_point() else x for x in _tokens((3, 10)))
        ent = torch.rand(3, 10).to(dtype).requires_grad_(True) if with_terms else None
        ref_logp = (logp.float() + 0.2).to(dtype) if with_terms else None
        args = (logp.requires_grad_(True), ent, old_logp, adv, ref_logp, mask, 0.2, 0.28, dual, 0.1, kl_kind, 0.01)
        torch.library.opcheck(ppo_token_loss_op, args)


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
def test_opcheck_standalone_losses(backend):
    logp, old_logp, adv, mask = _tokens((3, 10))  # padded float32; dual clip
    policy_args = (logp, old_logp, adv, loss_weights(mask, "seq-mean-token-mean"), 0.2, 0.28, 2.0, backend)
    torch.library.opcheck(ppo_policy_loss_op, (logp.clone().requires_grad_(True), *policy_args[1:]))
    torch.library.opcheck(ppo_policy_loss_backward_op, (torch.tensor(0.7), *policy_args))
    values, old_values, returns, mask = (x.to(torch.bfloat16) if x.is_floating_point() else x for x in _tokens((30,)))
    weights = loss_weights(mask, "seq-mean-token-sum", seq_ids=_packed_seq_ids(30))
    value_args = (values, old_values, returns, weights, 0.2, backend)
    torch.library.opcheck(ppo_value_loss_op, (values.clone().requires_grad_(True), *value_args[1:]))
    torch.library.opcheck(ppo_value_loss_backward_op, (torch.tensor(-1.5), *value_args))


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
def test_standalone_losses_mixed_dtypes_strides_and_no_grad(backend):
    """bf16 logp with float32 old_logp/advantages, transposed (non-contiguous) inputs, and grad mode off."""
    logp, old_logp, adv, mask = _tokens((9, 6))
    logp_t = logp.to(torch.bfloat16).T.requires_grad_(True)
    args = (old_logp.T, adv.T, mask.T)
    w_mean, w_sum = (loss_weights(mask, agg).T for agg in ("seq-mean-token-mean", "seq-mean-token-sum"))
    with rlhf_fast.use_backend(backend):
        out, stats = rlhf_fast.ppo_policy_loss(logp_t, *args[:2], w_mean, dual_clip=2.0)
        out_v, stats_v = rlhf_fast.ppo_value_loss(logp_t, *args[:2], w_sum)
        with torch.no_grad():
            out_ng, stats_ng = rlhf_fast.ppo_policy_loss(logp_t, *args[:2], w_mean, dual_clip=2.0)
    # the references aggregate over rows: those of the transposed [6, 9] tensors are the original's columns
    ref, ref_stats = ppo_policy_loss_ref(logp_t.T, old_logp, adv, mask, dual_clip=2.0, agg="seq-mean-token-mean")
    ref_v, ref_stats_v = ppo_value_loss_ref(logp_t.T, old_logp, adv, mask, agg="seq-mean-token-sum")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_v, ref_v)
    assert out_ng == out and not out_ng.requires_grad
    for key in POLICY_STATS:
        torch.testing.assert_close(stats[key], ref_stats[key])
        assert stats_ng[key] == stats[key]
    torch.testing.assert_close(stats_v["clip_frac"], ref_stats_v["clip_frac"])
    for a, b in ((out, ref), (out_v, ref_v)):
        (grad,) = torch.autograd.grad(a, logp_t)
        (grad_ref,) = torch.autograd.grad(b, logp_t)
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad, grad_ref)


def test_torch_compile_fullgraph():
    logp, old_logp, adv, mask = _tokens((4, 12))
    seq_ids = _packed_seq_ids(48)
    logits, labels, old_l, adv_l, mask_l, ref_l = _logits_inputs((4, 12, 40), torch.float32)

    w_p = loss_weights(mask, "seq-mean-token-mean")
    w_v = loss_weights(mask.flatten(), "seq-mean-token-sum", seq_ids=seq_ids)
    w_l = loss_weights(mask_l, "dr-grpo")

    def run(policy, value, from_logits):
        x = logp.clone().requires_grad_(True)
        z = logits.clone().requires_grad_(True)
        loss_p, stats_p = policy(x, old_logp, adv, w_p, dual_clip=3.0)
        loss_v, _ = value(x.flatten(), old_logp.flatten(), adv.flatten(), w_v)
        loss_l, stats_l = from_logits(z, labels, old_l, adv_l, w_l, **dict(FULL, ref_logp=ref_l))
        (loss_p + loss_v + loss_l).backward()
        return loss_p, loss_v, loss_l, stats_p["clip_frac"], stats_l["entropy"], x.grad, z.grad

    compiled = [torch.compile(f, fullgraph=True, backend="aot_eager") for f in
                (rlhf_fast.ppo_policy_loss, rlhf_fast.ppo_value_loss, rlhf_fast.ppo_loss_from_logits)]
    with rlhf_fast.use_backend("cpp"):
        expected = run(rlhf_fast.ppo_policy_loss, rlhf_fast.ppo_value_loss, rlhf_fast.ppo_loss_from_logits)
        got = run(*compiled)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


def test_bad_input():
    logp, old_logp, adv, mask = _tokens((2, 5))
    logits, labels, old_l, adv_l, mask_l, ref_l = _logits_inputs((2, 5, 9), torch.float32)
    mask, mask_l = loss_weights(mask), loss_weights(mask_l)  # the weights
    policy = rlhf_fast.ppo_policy_loss
    cases = [
        (ValueError, "old_logp must have shape", lambda: policy(logp, old_logp[:, :4], adv, mask)),
        (ValueError, "weights must have shape", lambda: policy(logp, old_logp, adv, mask.T)),
        (TypeError, "weights must be float32", lambda: policy(logp, old_logp, adv, mask != 0)),
        (TypeError, "weights must be float32", lambda: rlhf_fast.ppo_loss_from_logits(
            logits, labels, old_l, adv_l, mask_l != 0)),
        (ValueError, "needs entropy", lambda: rlhf_fast.ppo_objective(logp, old_logp, adv, mask, entropy_coef=0.1)),
        (ValueError, "entropy must have shape", lambda: rlhf_fast.ppo_objective(
            logp, old_logp, adv, mask, entropy=adv[0], entropy_coef=0.1)),
        (TypeError, "advantages must be float32", lambda: policy(logp, old_logp, adv.long(), mask)),
        (ValueError, "clip_low", lambda: policy(logp, old_logp, adv, mask, clip_low=0.0)),
        (ValueError, "clip_low", lambda: policy(logp, old_logp, adv, mask, clip_low=1.0)),
        (ValueError, "clip_high", lambda: policy(logp, old_logp, adv, mask, clip_high=-0.1)),
        (ValueError, "dual_clip", lambda: policy(logp, old_logp, adv, mask, dual_clip=1.0)),
        (ValueError, "logp must be", lambda: policy(logp[None], old_logp[None], adv[None], mask[None])),
        (ValueError, "clip must be", lambda: rlhf_fast.ppo_value_loss(logp, old_logp, adv, mask, clip=0)),
        (ValueError, "returns must have shape", lambda: rlhf_fast.ppo_value_loss(logp, old_logp, adv[0], mask)),
        (ValueError, "kl_kind must be one of", lambda: rlhf_fast.ppo_loss_from_logits(
            logits, labels, old_l, adv_l, mask_l, ref_logp=ref_l, kl_coef=0.1, kl_kind="k4")),
        (ValueError, "needs ref_logp", lambda: rlhf_fast.ppo_loss_from_logits(
            logits, labels, old_l, adv_l, mask_l, kl_coef=0.1)),
        (ValueError, "labels must have shape", lambda: rlhf_fast.ppo_loss_from_logits(
            logits, labels[:, :3], old_l, adv_l, mask_l)),
        (ValueError, "ref_logp must have shape", lambda: rlhf_fast.ppo_loss_from_logits(
            logits, labels, old_l, adv_l, mask_l, ref_logp=ref_l[0], kl_coef=0.1)),
        (ValueError, "temperature", lambda: rlhf_fast.ppo_loss_from_logits(
            logits, labels, old_l, adv_l, mask_l, temperature=0.0)),
        (ValueError, "labels", lambda: rlhf_fast.ppo_loss_from_logits(logits, labels + 9, old_l, adv_l, mask_l)),
        (ValueError, "dual_clip", lambda: rlhf_fast.ppo_loss_from_logits(
            logits, labels, old_l, adv_l, mask_l, dual_clip=0.5)),
        (ValueError, "logits must be", lambda: rlhf_fast.ppo_loss_from_logits(
            logits[None], labels[None], old_l[None], adv_l[None], mask_l[None])),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()


COMPILE_FOR_HOPPER = """
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_fast.kernels.ppo_loss import _finalize_kernel, _ppo_policy_kernel, _ppo_value_kernel

target = GPUTarget("cuda", 90, 32)
common = dict(w_ptr="*fp32", g_ptr="*fp32", grad_ptr="*bf16", part_ptr="*fp32", n="i32")
flags = dict.fromkeys(["BACKWARD", "BLOCK"], "constexpr")
policy = dict(lp_ptr="*bf16", old_ptr="*fp32", adv_ptr="*fp32", **common, clip_lo="fp32", clip_hi="fp32",
              dual="fp32", HAS_DUAL="constexpr", **flags)
value = dict(v_ptr="*bf16", old_ptr="*fp32", ret_ptr="*fp32", **common, clip="fp32", HAS_CLIP="constexpr", **flags)
for fn, signature, flag in [(_ppo_policy_kernel, policy, "HAS_DUAL"), (_ppo_value_kernel, value, "HAS_CLIP")]:
    for backward, has_flag in [(False, True), (True, True), (True, False), (False, False)]:
        constexprs = {"BACKWARD": backward, "BLOCK": 1024, flag: has_flag}
        kernel = compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                         options=dict(num_warps=4))
        assert len(kernel.asm["cubin"]) > 0
finalize = dict(part_ptr="*fp32", n_parts="i32", loss_ptr="*fp32", stats_ptr="*fp32",
                **dict.fromkeys(["COLUMNS", "N_SUMS", "HAS_MAX", "BLOCK"], "constexpr"))
for columns, n_sums, has_max in [(7, 6, True), (3, 3, False)]:
    constexprs = dict(COLUMNS=columns, N_SUMS=n_sums, HAS_MAX=has_max, BLOCK=256)
    kernel = compile(ASTSource(fn=_finalize_kernel, signature=finalize, constexprs=constexprs), target=target,
                     options=dict(num_warps=4))
    assert len(kernel.asm["cubin"]) > 0
print("compiled")
"""


def test_triton_kernels_compile_for_hopper():
    """The Triton loss kernels compiled for sm_90 without a GPU: what the interpreter cannot check (types, globals)."""
    compiles_for_hopper(COMPILE_FOR_HOPPER)
