"""ppo_objective's loss_type= / ratio_level= variants (TRL 1.16's GRPO loss types): each against a case worked out by
hand from the formulas (docs/formulas.md, "Losses"), and against TRL 1.16's own ``GRPOTrainer._compute_loss`` run on
the same tensors (values and gradients)."""

import math
import types
from collections import defaultdict

import pytest
import torch

import rlhf_fast
from rlhf_fast.ops.ppo_loss import ppo_token_loss_op


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# One sequence of two tokens (one masked third token holding NaN), advantage A; weights token-mean: w = 1/2.
LOGP, OLD, A = [-1.0, -2.0], [-1.5, -1.9], 0.8


def _one_sequence(adv=A):
    logp = torch.tensor([LOGP + [float("nan")]], requires_grad=True)
    old = torch.tensor([OLD + [float("nan")]])
    mask = torch.tensor([[True, True, False]])
    return logp, old, torch.full((1, 3), adv), rlhf_fast.loss_weights(mask, "token-mean")


def _hand(loss_type, ratio_level="token", adv=A, cap=5.0, tau=(1.0, 1.05), k=(2.0, 3.0), lam=(3.0, 2.0)):
    """-> (loss, [dloss/dlogp_0, dloss/dlogp_1]) of the two-token case, from the formulas in plain Python."""
    lr = [a - b for a, b in zip(LOGP, OLD)]
    if ratio_level == "sequence":
        lr = [sum(lr) / 2] * 2
    r = [math.exp(x) for x in lr]
    w = 0.5
    if loss_type == "ppo":  # clip 0.2 both ways; gradient -A r where the unclipped term is taken
        losses = [max(-adv * x, -adv * min(max(x, 0.8), 1.2)) for x in r]
        d_lr = [(-adv * x if -adv * x >= -adv * min(max(x, 0.8), 1.2) else 0.0) for x in r]
    elif loss_type == "sapo":
        t = tau[0] if adv > 0 else tau[1]
        losses = [-adv * 4 / t * _sigmoid(t * (x - 1)) for x in r]
        d_lr = [-4 * adv * _sigmoid(t * (x - 1)) * (1 - _sigmoid(t * (x - 1))) * x for x in r]
    elif loss_type == "cispo":  # the capped ratio is a constant; d/dlogp = -c A
        c = [min(x, cap) for x in r]
        losses = [-ci * adv * lp for ci, lp in zip(c, LOGP)]
        return w * sum(losses), [-w * ci * adv for ci in c]
    else:  # vespo: w = exp(sum of log-ratios), phi(w) = exp(lam + k log w - lam w), a constant
        log_w = sum(a - b for a, b in zip(LOGP, OLD))
        kk, ll = (k[0], lam[0]) if adv >= 0 else (k[1], lam[1])
        phi = math.exp(ll + kk * log_w - ll * math.exp(log_w))
        return w * sum(-phi * adv * lp for lp in LOGP), [-w * phi * adv] * 2
    if ratio_level == "sequence":  # d lr_seq / d logp_t = 1/2 for both tokens
        g = sum(d_lr) * w / 2
        return w * sum(losses), [g, g]
    return w * sum(losses), [w * d for d in d_lr]


@pytest.mark.parametrize("adv", [A, -A])
@pytest.mark.parametrize("loss_type,ratio_level,kw", [
    ("ppo", "token", {}), ("ppo", "sequence", {}), ("sapo", "token", {}), ("sapo", "sequence", {}),
    ("cispo", "token", {"clip_high": 5.0}), ("cispo", "token", {"clip_high": 1.05}), ("vespo", "token", {}),
])
def test_variants_match_the_hand_computed_case(adv, loss_type, ratio_level, kw):
    """Values and gradients of a two-token sequence (plus a masked NaN token: 0 gradient) against plain Python."""
    logp, old, a, w = _one_sequence(adv)
    loss, stats = rlhf_fast.ppo_objective(logp, old, a, w, loss_type=loss_type, ratio_level=ratio_level, **kw)
    loss.backward()
    want, want_grad = _hand(loss_type, ratio_level, adv, cap=kw.get("clip_high", 5.0))
    assert loss.item() == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert logp.grad[0, :2].tolist() == pytest.approx(want_grad, rel=1e-5, abs=1e-7)
    assert logp.grad[0, 2].item() == 0.0
    if loss_type == "cispo":
        assert stats["clip_frac"].item() == pytest.approx(sum(x > kw["clip_high"] for x in
                                                              (math.exp(0.5), math.exp(-0.1))) / 2)


def test_sequence_level_packed_equals_padded_and_validates():
    """Packed [N] input with seq_ids gives the padded result; the sequence-level variants need seq_ids there."""
    gen = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 6, generator=gen) * 0.3 - 1).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(3, 6, generator=gen)
    adv = torch.randn(3, 1, generator=gen).expand(3, 6).contiguous()
    mask = torch.rand(3, 6, generator=gen) < 0.7
    mask[:, 0] = True
    w = rlhf_fast.loss_weights(mask, "seq-mean-token-mean")
    seq_ids = torch.arange(3).unsqueeze(1).expand(3, 6)[mask]
    lp_packed = logp.detach()[mask].clone().requires_grad_()
    for loss_type, level in (("ppo", "sequence"), ("sapo", "sequence"), ("vespo", "token")):
        padded, _ = rlhf_fast.ppo_objective(logp, old, adv, w, loss_type=loss_type, ratio_level=level)
        packed, _ = rlhf_fast.ppo_objective(lp_packed, old[mask], adv[mask], w[mask], loss_type=loss_type,
                                            ratio_level=level, seq_ids=seq_ids)
        g_pad, = torch.autograd.grad(padded, logp)
        g_pack, = torch.autograd.grad(packed, lp_packed)
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_pack, g_pad[mask], rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="needs seq_ids"):
            rlhf_fast.ppo_objective(lp_packed, old[mask], adv[mask], w[mask], loss_type=loss_type,
                                    ratio_level=level)
    for bad, match in ((dict(loss_type="grpo"), "loss_type must be one of"),
                       (dict(ratio_level="seq"), "ratio_level must be one of"),
                       (dict(loss_type="cispo"), "needs clip_high"),
                       (dict(loss_type="vespo", ratio_level="sequence"), "ratio_level must be 'token'"),
                       (dict(loss_type="sapo", dual_clip=3.0), "dual_clip is for loss_type='ppo'"),
                       (dict(loss_type="sapo", sapo_tau=(1.0, 0.0)), "sapo_tau")):
        with pytest.raises(ValueError, match=match):
            rlhf_fast.ppo_objective(logp, old, adv, w, **bad)


def test_opcheck_variants():
    gen = torch.Generator().manual_seed(1)
    logp = torch.randn(2, 5, generator=gen).requires_grad_()
    old, adv = logp.detach() + 0.1 * torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    mask = torch.rand(2, 5, generator=gen) < 0.8
    seq_lr = torch.randn(2, 1, generator=gen).expand(2, 5).contiguous().requires_grad_()
    for log_ratio, loss_type, params in ((None, "sapo", [1.0, 1.05]), (seq_lr, "ppo", None), (None, "cispo", None),
                                         (seq_lr.detach(), "vespo", [2.0, 3.0, 3.0, 2.0])):
        args = (logp, None, old, adv, None, mask, 0.2, 5.0, None, 0.0, "k3", 0.0, log_ratio, loss_type, params)
        torch.library.opcheck(ppo_token_loss_op, args)


# ---------------------------------------------------------------------------------------------------------------
# Against TRL 1.16's own GRPOTrainer._compute_loss, run unbound on a stand-in trainer whose model gives our log-probs.
# ---------------------------------------------------------------------------------------------------------------

# TRL loss_type -> (our loss_type, our aggregation, ratio_level TRL is run with)
TRL_CASES = {
    "grpo": ("ppo", "seq-mean-token-mean", "token"),
    "bnpo": ("ppo", "token-mean", "token"),
    "dr_grpo": ("ppo", "dr-grpo", "token"),
    "dapo": ("ppo", "token-mean", "token"),
    "gspo": ("ppo", "seq-mean-token-mean", "sequence"),  # TRL: loss_type="grpo", importance_sampling_level="sequence"
    "luspo": ("ppo", "seq-mean-token-sum", "sequence"),
    "cispo": ("cispo", "token-mean", "token"),
    "sapo": ("sapo", "seq-mean-token-mean", "token"),
    "vespo": ("vespo", "token-mean", "token"),
}


def _trl_loss(trl_loss_type, level, logp, old, adv, mask, epsilon_high, beta, ref):
    trainer_mod = pytest.importorskip("trl.trainer.grpo_trainer")
    GRPOTrainer, GRPOConfig = trainer_mod.GRPOTrainer, pytest.importorskip("trl").GRPOConfig
    loss_type = "grpo" if trl_loss_type == "gspo" else trl_loss_type
    args = GRPOConfig(output_dir="/tmp/unused", loss_type=loss_type, importance_sampling_level=level,
                      epsilon_high=epsilon_high, beta=beta, report_to="none", bf16=False, use_cpu=True,
                      use_bias_correction_kl=False)  # ours: the plain k3 term (docs/integrations.md)
    acc = types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                sync_gradients=True, gather_for_metrics=lambda x: x)
    stand_in = types.SimpleNamespace(
        args=args, loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, model=types.SimpleNamespace(training=True), accelerator=acc,
        current_gradient_accumulation_steps=1, max_completion_length=mask.shape[1], _metrics=defaultdict(
            lambda: defaultdict(list)), get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None))
    inputs = {"prompt_ids": torch.zeros(mask.shape[0], 1, dtype=torch.long), "prompt_mask": torch.ones_like(mask[:, :1]),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum().float()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(stand_in, None, inputs)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("trl_loss_type", list(TRL_CASES))
def test_variants_match_trl_compute_loss(trl_loss_type, beta):
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(3)
    B, T = 4, 7
    logp0 = torch.randn(B, T, generator=gen) * 0.5 - 1.5
    old = logp0 + 0.3 * torch.randn(B, T, generator=gen)
    ref = logp0 + 0.3 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.75
    mask[:, 0] = True
    ours_type, agg, level = TRL_CASES[trl_loss_type]
    eps_high = 1.3 if ours_type == "cispo" else None  # cispo's cap on the ratio: some ratios exceed it here
    if trl_loss_type == "vespo":  # phi(w) decays fast in w: keep the sequences' ratios near 1
        old = logp0 + 0.05 * torch.randn(B, T, generator=gen)

    lp_trl = logp0.clone().requires_grad_()
    want = _trl_loss(trl_loss_type, level, lp_trl, old, adv, mask, eps_high, beta, ref)
    want.backward()

    lp = logp0.clone().requires_grad_()
    w = rlhf_fast.loss_weights(mask, agg)
    got, _ = rlhf_fast.ppo_objective(lp, old, adv[:, None].expand(B, T), w, loss_type=ours_type, ratio_level=level,
                                     clip_high=eps_high, ref_logp=ref if beta else None, kl_coef=beta)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad, lp_trl.grad * mask, rtol=1e-5, atol=1e-6)
