"""Fused hidden-state losses: rlhf_fast.linear_ppo_loss / linear_dpo_loss vs the 3-GEMM floor, the eager composite
(`hidden @ W.T` -> log_softmax -> gather -> loss, autograd) and torch.compile of it; PPO also with
ratio_level="sequence" (GSPO, sequences of 256 tokens) and loss_type="cispo", against the token-level PPO-clip of
the same backend; DPO also the per-token linear_logprobs (4 GEMMs) followed by the formula. (No Liger rows yet: its
fused-linear GRPO/DPO losses are not installed here.)

python benchmarks/bench_linear_losses.py [--device cpu|cuda] [--quick] [--reps N] [--shape N,H,V] [--dtype fp32]
                                        [--loss ppo|dpo|both] [--json out.json]

Every row is forward+backward (gradients w.r.t. hidden and weight). The floor is the three full-size GEMMs no method
avoids (logits, grad_hidden, grad_weight). Implementations are timed interleaved (one rep of each in turn, medians
over --reps rounds): the CPU box is shared and noisy. Peak memory: extra MiB beyond the inputs (CUDA allocator peak;
CPU: peak resident set, measured in-process after the timing runs). DPO: the N tokens are 2P rows of T = 1024
tokens (chosen rows, then rejected rows), 2P * T = N.
"""

from __future__ import annotations

import statistics
import time

import torch
from common import parser, peak_extra_mib, report, sync

import rlhf_fast
from rlhf_fast import _backend
from rlhf_fast.ops.linear_losses import LINEAR_LOGPROBS_BACKENDS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ppo_eager(hidden, weight, labels, old, adv, w):
    logp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(torch.clamp(logp - old, -20, 20))
    pol = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    return (w * pol).sum()


def dpo_eager(hidden, weight, labels, ref_c, ref_r):
    logp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    seq = logp.reshape(2 * ref_c.shape[0], -1).sum(-1)
    p = ref_c.shape[0]
    return -torch.nn.functional.logsigmoid(0.1 * ((seq[:p] - ref_c) - (seq[p:] - ref_r))).mean()


def dpo_from_linear_logprobs(hidden, weight, labels, ref_c, ref_r):
    """The DPO trainer's path before linear_dpo_loss: fused per-token log-probs (4 GEMMs), then the formula."""
    seq = rlhf_fast.linear_logprobs(hidden, weight, labels).reshape(2 * ref_c.shape[0], -1).sum(-1)
    p = ref_c.shape[0]
    return -torch.nn.functional.logsigmoid(0.1 * ((seq[:p] - ref_c) - (seq[p:] - ref_r))).mean()


def floor(hidden, weight, *_):
    logits = hidden @ weight.T
    g = logits  # stands for grad_logits: same shape and dtype
    return g @ weight, g.T @ hidden


def make(kind, n, h, v, dtype, device):
    gen = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(n, h, generator=gen, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=gen, device=device) / h ** 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    if kind == "ppo":
        old = -torch.rand(n, generator=gen, device=device) * 10 - 5
        adv = torch.randn(n, generator=gen, device=device)
        return hidden, weight, labels, old, adv, torch.full((n,), 1.0 / n, device=device)
    seq = min(1024, n // 2)
    pairs = n // (2 * seq)
    ref = -torch.rand(2, pairs, generator=gen, device=device) * seq * 10
    return hidden[:2 * pairs * seq], weight, labels[:2 * pairs * seq], ref[0], ref[1]


def ppo_variants(n, device):
    """linear_ppo_loss options of the PPO rows: token-level PPO-clip, GSPO's sequence ratio (sequences of 256
    tokens, chunks of whole sequences), CISPO."""
    seq_ids = torch.arange(n, device=device) // 256
    return {"": {}, " ratio_level=sequence": dict(ratio_level="sequence", seq_ids=seq_ids),
            " loss_type=cispo": dict(loss_type="cispo", clip_high=5.0)}


def implementations(kind, device, n):
    eager = ppo_eager if kind == "ppo" else dpo_eager
    impls = {"3-GEMM floor": floor, "eager composite": eager, "torch.compile(composite)": torch.compile(eager)}
    if kind == "dpo":
        impls["linear_logprobs -> formula"] = dpo_from_linear_logprobs
    for name in LINEAR_LOGPROBS_BACKENDS:
        if name == "torch" or not (_backend.built(name) and _backend.runs_on(name, device)):
            continue
        if kind == "ppo":
            for label, kw in ppo_variants(n, device).items():
                def ours(hidden, weight, labels, old, adv, w, _name=name, _kw=kw):
                    with rlhf_fast.use_backend(_name):
                        return rlhf_fast.linear_ppo_loss(hidden, weight, labels, old, adv, w, **_kw)[0]
                impls[f"rlhf_fast.linear_ppo_loss[{name}]{label}"] = ours
            continue

        def ours(hidden, weight, labels, ref_c, ref_r, _name=name):
            with rlhf_fast.use_backend(_name):
                p, h = ref_c.shape[0], hidden.shape[-1]
                return rlhf_fast.linear_dpo_loss(hidden.view(2 * p, -1, h), weight, labels.view(2 * p, -1),
                                                 ref_c, ref_r)[0]
        impls[f"rlhf_fast.linear_{kind}_loss[{name}]"] = ours
    return impls


def runner(fn, inputs):
    hidden, weight, *rest = inputs
    if fn is floor:
        return lambda: fn(hidden, weight)

    def run():
        hd, wd = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        fn(hd, wd, *rest).backward()
    return run


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--shape", default="4096,1024,32000")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--loss", default="both", choices=["ppo", "dpo", "both"])
    args = p.parse_args()
    device = torch.device(args.device)
    n, h, v = (256, 64, 1000) if args.quick else map(int, args.shape.split(","))
    kinds = ["ppo", "dpo"] if args.loss == "both" else [args.loss]
    for kind in kinds:
        inputs = make(kind, n, h, v, DTYPES[args.dtype], device)
        impls = implementations(kind, device, inputs[0].shape[0])
        runs = {name: runner(fn, inputs) for name, fn in impls.items()}
        for run in runs.values():  # warm-up, compile
            run()
        times = {name: [] for name in runs}
        for _ in range(args.reps):  # interleaved
            for name, run in runs.items():
                sync(device)
                start = time.perf_counter()
                run()
                sync(device)
                times[name].append((time.perf_counter() - start) * 1e3)
        med = {name: statistics.median(t) for name, t in times.items()}
        mem = {name: peak_extra_mib(run, device) for name, run in runs.items()}
        rows = [{"impl": name, "ms": med[name], "x floor": med[name] / med["3-GEMM floor"],
                 "eager / this": med["eager composite"] / med[name], "peak extra MiB": mem[name],
                 "mem / eager": mem[name] / max(mem["eager composite"], 1e-9)} for name in runs]
        for row in rows:  # the PPO variants against the token-level PPO-clip of the same backend
            base = row["impl"].split(" ")[0]
            if kind == "ppo" and base != row["impl"] and base in med:
                row["impl"] += f" ({med[row['impl']] / med[base]:.2f}x token ppo)"
        report(f"{kind} loss fwd+bwd, N={inputs[0].shape[0]} H={h} V={v} {args.dtype} (interleaved, medians of "
               f"{args.reps})", rows, args, device)


if __name__ == "__main__":
    main()
