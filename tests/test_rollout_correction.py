"""rollout_correction and mismatch_metrics against hand-computed values (docs/formulas.md, "Rollout correction")."""

import math

import pytest
import torch

import rlhf_fast

# four tokens of one sequence; ratios exp(d) with d = logp_old - logp_behav
D = [math.log(0.25), math.log(0.95), math.log(1.5), math.log(8.0)]
RHO = [0.25, 0.95, 1.5, 8.0]


def _inputs():
    behav = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    old = behav + torch.tensor(D)
    mask = torch.ones(4, dtype=torch.bool)
    return old, behav, mask


@pytest.mark.parametrize("mode, expected, masked, truncated", [
    ("none", [1.0, 1.0, 1.0, 1.0], 0, 0),
    ("tis", [0.25, 0.95, 1.5, 2.0], 0, 1),
    ("mis", [0.25, 0.95, 1.5, 0.0], 1, 0),
    ("icepop", [0.0, 0.95, 1.5, 0.0], 2, 0),  # band [0.5, 5]
])
def test_token_modes(mode, expected, masked, truncated):
    old, behav, mask = _inputs()
    w, st = rlhf_fast.rollout_correction(old, behav, mask, mode=mode, cap=2.0, low=0.5, high=5.0)
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert st["is_masked_frac"].item() == masked / 4 and st["is_truncated_frac"].item() == truncated / 4
    assert st["is_weight_mean"].item() == pytest.approx(sum(expected) / 4, rel=1e-6)


def test_sequence_modes_packed_and_padded():
    # two sequences: tokens 0-1 (rho_s = 0.25 * 0.95 = 0.2375) and 2-3 (rho_s = 1.5 * 8 = 12)
    old, behav, mask = _inputs()
    seq_ids = torch.tensor([0, 0, 1, 1])
    w, st = rlhf_fast.rollout_correction(old, behav, mask, mode="seq_tis", cap=2.0, seq_ids=seq_ids)
    torch.testing.assert_close(w, torch.tensor([0.2375, 0.2375, 2.0, 2.0]))
    assert st["is_truncated_frac"].item() == 0.5
    w, st = rlhf_fast.rollout_correction(old, behav, mask, mode="seq_mis", cap=2.0, seq_ids=seq_ids)
    torch.testing.assert_close(w, torch.tensor([0.2375, 0.2375, 0.0, 0.0]))
    assert st["is_masked_frac"].item() == 0.5
    # the same as [2, 2] rows
    w2, _ = rlhf_fast.rollout_correction(old.view(2, 2), behav.view(2, 2), mask.view(2, 2), mode="seq_mis", cap=2.0)
    torch.testing.assert_close(w2.view(-1), w)


def test_masked_tokens_get_zero_and_never_leak_nan():
    old, behav, mask = _inputs()
    old[1], mask[1] = float("nan"), False
    seq_ids = torch.tensor([0, 0, 0, 0])
    for mode in rlhf_fast.IS_MODES:
        w, st = rlhf_fast.rollout_correction(old, behav, mask, mode=mode, seq_ids=seq_ids)
        assert w[1].item() == 0.0 and torch.isfinite(w).all(), mode
        assert all(torch.isfinite(v) for v in st.values())
    # the sequence ratio skips the masked token: 0.25 * 1.5 * 8 = 3 -> capped at 2
    w, _ = rlhf_fast.rollout_correction(old, behav, mask, mode="seq_tis", seq_ids=seq_ids)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 2.0, 2.0]))


def test_weights_are_detached():
    old, behav, mask = _inputs()
    old.requires_grad_(True)
    w, _ = rlhf_fast.rollout_correction(old, behav, mask, mode="tis")
    assert not w.requires_grad


def test_mismatch_metrics():
    old, behav, mask = _inputs()
    m = rlhf_fast.mismatch_metrics(old, behav, mask)
    r = torch.tensor(RHO, dtype=torch.float64)
    assert m["mismatch_ratio_mean"].item() == pytest.approx(r.mean().item(), rel=1e-6)
    assert m["mismatch_ratio_std"].item() == pytest.approx(r.std(unbiased=False).item(), rel=1e-5)
    assert m["mismatch_k3"].item() == pytest.approx((r - r.log() - 1).mean().item(), rel=1e-5)
    assert m["mismatch_outside_frac"].item() == 0.75  # 0.25, 1.5 and 8
    same = rlhf_fast.mismatch_metrics(behav, behav, mask)
    assert same["mismatch_k3"].item() == 0 and same["mismatch_ratio_mean"].item() == 1
    assert same["mismatch_outside_frac"].item() == 0 and same["mismatch_ratio_std"].item() == 0


@pytest.mark.parametrize("call, exc, match", [
    (lambda o, b, m: rlhf_fast.rollout_correction(o, b, m, mode="bogus"), ValueError, "mode must be one of"),
    (lambda o, b, m: rlhf_fast.rollout_correction(o, b, m, cap=0.0), ValueError, "cap must be > 0"),
    (lambda o, b, m: rlhf_fast.rollout_correction(o, b, m, mode="icepop", low=5.0, high=0.5), ValueError,
     "low and high"),
    (lambda o, b, m: rlhf_fast.rollout_correction(o, b, m, mode="seq_tis"), ValueError, "needs seq_ids"),
    (lambda o, b, m: rlhf_fast.rollout_correction(o, b[:2], m), ValueError, "logp_behav must have shape"),
    (lambda o, b, m: rlhf_fast.rollout_correction(o, b, m[:3]), ValueError, "mask must have shape"),
    (lambda o, b, m: rlhf_fast.rollout_correction(o.long(), b, m), TypeError, "logp_old must be float32"),
    (lambda o, b, m: rlhf_fast.rollout_correction(o, b, m, mode="seq_tis", seq_ids=torch.zeros(4, dtype=torch.int32)),
     TypeError, "seq_ids must be int64"),
])
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_inputs())


def test_rejection_token_and_sequence_levels():
    # d = log rho; k1 = -d, k2 = d^2 / 2, k3 = rho - 1 - d
    old, behav, mask = _inputs()
    keep, _, st = rlhf_fast.rollout_rejection(old, behav, mask, stat="k1", level="token",
                                           low=math.log(0.5), high=math.log(2.0))
    assert keep.tolist() == [False, True, True, False]  # -d in [log .5, log 2] <=> rho in [0.5, 2]
    assert st["rs_masked_frac"].item() == pytest.approx(0.5)
    keep, _, _ = rlhf_fast.rollout_rejection(old, behav, mask, stat="k3", level="token", high=0.2)
    k3 = [r - 1 - math.log(r) for r in RHO]  # 0.636, 0.0013, 0.0945, 4.92
    assert keep.tolist() == [k <= 0.2 for k in k3]
    # two sequences packed: tokens 0, 1 | 2, 3 ; seq_max of k2 and seq_mean of k1 (log of the geometric mean)
    ids = torch.tensor([0, 0, 1, 1])
    k2 = [0.5 * d * d for d in D]
    keep, _, st = rlhf_fast.rollout_rejection(old, behav, mask, stat="k2", level="seq_max", high=1.0, seq_ids=ids)
    assert keep.tolist() == [max(k2[:2]) <= 1.0] * 2 + [max(k2[2:]) <= 1.0] * 2
    want_mean = (2 * max(k2[:2]) + 2 * max(k2[2:])) / 4
    assert st["rs_statistic_mean"].item() == pytest.approx(want_mean, rel=1e-5)
    _, s, _ = rlhf_fast.rollout_rejection(old, behav, mask, stat="k2", level="seq_sum", high=1.0, seq_ids=ids)
    torch.testing.assert_close(s, torch.tensor([k2[0] + k2[1]] * 2 + [k2[2] + k2[3]] * 2))
    keep_p, _, _ = rlhf_fast.rollout_rejection(old, behav, mask, stat="k1", level="seq_mean", low=-0.5, high=0.5,
                                            seq_ids=ids)
    keep_b, _, _ = rlhf_fast.rollout_rejection(old.view(2, 2), behav.view(2, 2), mask.view(2, 2), stat="k1",
                                            level="seq_mean", low=-0.5, high=0.5)
    g = [-(D[0] + D[1]) / 2, -(D[2] + D[3]) / 2]  # 0.72, -1.24: both outside [-0.5, 0.5]
    assert keep_p.tolist() == keep_b.flatten().tolist() == [abs(g[0]) <= 0.5] * 2 + [abs(g[1]) <= 0.5] * 2


def test_rejection_masked_tokens_never_count():
    old, behav, mask = _inputs()
    old[3], mask[3] = float("nan"), False
    keep, _, st = rlhf_fast.rollout_rejection(old[None], behav[None], mask[None], stat="k1", level="seq_sum", low=-2.0,
                                           high=2.0)
    s = -(D[0] + D[1] + D[2])  # the NaN token is off the mask
    assert keep[0].tolist() == [abs(s) <= 2.0] * 3 + [False]
    assert torch.isfinite(st["rs_statistic_mean"])
    with pytest.raises(ValueError, match="needs seq_ids"):
        rlhf_fast.rollout_rejection(old, behav, mask, level="seq_sum", high=1.0)
    with pytest.raises(ValueError, match="stat must be one of"):
        rlhf_fast.rollout_rejection(old, behav, mask, stat="k4", high=1.0)
