"""REINFORCE++ returns (veRL's "reinforce_plus_plus": the discounted return restarts at every mask zero):
rlhf_fast.integrations.verl vs veRL's per-token loop, at [B, T] = [512, 2048] by default.

python benchmarks/bench_reinforce_pp.py [--device cpu|cuda] [--quick] [--json PATH] [--shape B T]

Rows: the loop (written from veRL's published formula: T steps of ``running = r[:, t] + gamma * running;
returns[:, t] = running; running = running * mask[:, t]``); the adapter's returns (one
``rlhf_fast.discounted_returns`` scan plus a few [B, T] elementwise ops, no loop over T); the whole adapter
(returns + masked whitening) against the loop + whitening. The two implementations are timed interleaved (medians).
"""

from __future__ import annotations

import torch
from common import median_ms, parser, report

from rlhf_fast.integrations import verl

GAMMA = 0.99


def loop_returns(rewards, mask, gamma=GAMMA):
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    return returns


def main():
    p = parser(__doc__)
    p.add_argument("--shape", type=int, nargs=2, metavar=("B", "T"), default=(512, 2048))
    args = p.parse_args()
    device = torch.device(args.device)
    b, t = (8, 64) if args.quick else args.shape
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(b, t, generator=gen).to(device)
    lengths = torch.randint(t // 2, t + 1, (b, 1), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths).float().to(device)
    mask[:, t // 4] = 0.0  # an interior hole (a multi-turn observation): the return restarts there
    impls = {
        "veRL loop returns": lambda: loop_returns(rewards, mask),
        "rlhf_fast returns": lambda: verl._returns_reset_at_mask_zero(rewards, mask, GAMMA),
        "veRL loop + masked_whiten": lambda: verl.masked_whiten(loop_returns(rewards, mask), mask) * mask,
        "rlhf_fast compute_reinforce_plus_plus_outcome_advantage": lambda:
            verl.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config={"gamma": GAMMA}),
    }
    diff = (impls["veRL loop returns"]() - impls["rlhf_fast returns"]()).abs().max().item()
    times: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(3):  # interleaved rounds, a median of medians
        for name, fn in impls.items():
            times[name].append(median_ms(fn, device, reps=args.reps))
    ms = {k: sorted(v)[1] for k, v in times.items()}
    base = {"veRL loop returns": "veRL loop returns", "rlhf_fast returns": "veRL loop returns",
            "veRL loop + masked_whiten": "veRL loop + masked_whiten",
            "rlhf_fast compute_reinforce_plus_plus_outcome_advantage": "veRL loop + masked_whiten"}
    rows = [{"shape": f"{b}x{t}", "impl": k, "median ms": v, "x loop": ms[base[k]] / v,
             "max |diff| vs loop": diff if k == "rlhf_fast returns" else None} for k, v in ms.items()]
    report(f"REINFORCE++ returns, gamma={GAMMA}", rows, args, device)


if __name__ == "__main__":
    main()
