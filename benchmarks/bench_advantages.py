"""GAE over [B, T] response tokens: rlhf_fast backends vs the per-token Python loop of TRL / OpenRLHF / veRL.

python benchmarks/bench_advantages.py [--device cpu|cuda] [--quick] [--json PATH] [--shape B T] [--compile-loop]
                                     [--threads N]

Rows: the loop of veRL's `compute_gae_advantage_return` (written from its published formula; with a right-padded
mask it is TRL's and OpenRLHF's loop too), about 10 small ops per token; the same loop with its per-token step
compiled by `torch.compile` (compiling the whole unrolled loop took 210 s at T=128 on the 2-core dev machine, so it is
only timed with --compile-loop, meant for small T); every rlhf_fast backend usable on the device (on CUDA also each
CUDA kernel forced). Default shapes: CPU B=64, T=2048 (the issue's target shape) plus a long and a short-sequence
shape, and B=512, T=8192; CUDA B=512, T=8192. The "bandwidth floor" row copies a byte buffer of half the bytes GAE
must move (reading rewards, values and mask once and writing advantages and returns: read + write = all of them);
"x floor" is each row's time over it. "floor, fresh outputs" is the same copy into a newly allocated buffer,
as an op returning new tensors must write them: on the CPU it adds the page faults of first touching fresh pages
(large allocations are new mmap-ed pages on every call). On CUDA the last column is the fraction of HBM bandwidth
reached by moving those bytes.
"""

from __future__ import annotations

import torch
from common import hbm_fraction, median_ms, parser, peak_extra_mib, report

import rlhf_fast
from rlhf_fast import _backend
from rlhf_fast.ops.advantages import SCAN_BACKENDS

GAMMA, LAM = 0.99, 0.95


def loop_step(reward_t, value_t, mask_t, next_value, last_gae, gamma: float, lam: float):
    delta = reward_t + gamma * next_value - value_t
    gae_t = delta + gamma * lam * last_gae
    next_value = value_t * mask_t + (1 - mask_t) * next_value  # masked tokens are skipped
    last_gae = gae_t * mask_t + (1 - mask_t) * last_gae
    return next_value, last_gae


def python_loop(rewards, values, mask, gamma=GAMMA, lam=LAM, step=loop_step):
    """veRL's GAE loop (mask as float), without the whitening it applies afterwards."""
    next_value = torch.zeros_like(rewards[:, 0])
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[-1])):
        next_value, last_gae = step(rewards[:, t], values[:, t], mask[:, t], next_value, last_gae, gamma, lam)
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def implementations(device, compile_loop: bool):
    compiled_step = torch.compile(loop_step, fullgraph=True)
    impls = {
        "python loop (veRL/TRL)": lambda r, v, m, mf: python_loop(r, v, mf),
        "loop, torch.compile(step)": lambda r, v, m, mf: python_loop(r, v, mf, step=compiled_step),
    }
    if compile_loop:
        compiled_loop = torch.compile(python_loop)
        impls["torch.compile(loop)"] = lambda r, v, m, mf: compiled_loop(r, v, mf)
    for name in SCAN_BACKENDS:
        if _backend.built(name) and _backend.runs_on(name, device):
            def run(r, v, m, mf, _name=name):
                with rlhf_fast.use_backend(_name):
                    return rlhf_fast.gae(r, v, m, gamma=GAMMA, lam=LAM)
            impls[f"rlhf_fast[{name}]"] = run
    if device.type == "cuda" and _backend.built("cuda"):
        for algorithm, label in ((1, "thread/seq"), (2, "warp scan"), (3, "chunked scan")):
            impls[f"cuda kernel: {label}"] = lambda r, v, m, mf, _a=algorithm: torch.ops.rlhf_fast_C.gae_fwd(
                r, v, m, None, None, GAMMA, LAM, _a)
    return impls


def make_inputs(n_rows, n_steps, dtype, device):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(n_rows, n_steps, generator=gen).to(device=device, dtype=dtype)
    values = torch.randn(n_rows, n_steps, generator=gen).to(device=device, dtype=dtype)
    lengths = torch.randint(n_steps // 2, n_steps + 1, (n_rows, 1), generator=gen)
    mask = (torch.arange(n_steps)[None, :] < lengths).to(device)  # right-padded responses
    return rewards, values, mask


def main():
    p = parser(__doc__)
    p.add_argument("--shape", type=int, nargs=2, metavar=("B", "T"), help="one shape instead of the defaults")
    p.add_argument("--compile-loop", action="store_true", help="also torch.compile the whole loop (small T only)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's choice")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.shape:
        shapes = [(tuple(args.shape), torch.float32)]
    elif args.quick:
        shapes = [((4, 64), torch.float32)]
    elif device.type == "cuda":
        shapes = [((512, 8192), torch.float32), ((512, 8192), torch.bfloat16), ((8, 32768), torch.float32)]
    else:
        shapes = [((64, 2048), torch.float32), ((512, 8192), torch.float32), ((8, 16384), torch.float32),
                  ((1024, 256), torch.bfloat16)]
    impls = implementations(device, args.compile_loop)
    rows = []
    for (n_rows, n_steps), dtype in shapes:
        rewards, values, mask = make_inputs(n_rows, n_steps, dtype, device)
        mask_f = mask.to(dtype)
        moved = n_rows * n_steps * (2 * rewards.element_size() + 1 + 2 * 4)
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        floor_reps = max(args.reps, 21)  # cheap, and the noisiest row on a shared machine
        floor_ms = median_ms(lambda: dst.copy_(src), device, reps=floor_reps)
        # the same copy into a newly allocated buffer, as an op returning new outputs must write them
        fresh_ms = median_ms(lambda: torch.empty_like(src).copy_(src), device, reps=floor_reps)
        shape_rows = [{"shape": f"{n_rows}x{n_steps}", "dtype": str(dtype).replace("torch.", ""), "impl": name,
                       "median ms": ms, "peak extra MiB": None, "x loop": None, "x compiled step": None,
                       "x floor": ms / floor_ms, "HBM frac": hbm_fraction(device, moved, ms)}
                      for name, ms in (("bandwidth floor", floor_ms), ("floor, fresh outputs", fresh_ms))]
        del src, dst
        for name, fn in impls.items():
            def call(fn=fn):
                return fn(rewards, values, mask, mask_f)
            slow_loop = name.startswith(("python loop", "loop,")) and device.type == "cuda"
            ms = median_ms(call, device, reps=min(args.reps, 3) if slow_loop else args.reps)
            shape_rows.append({
                "shape": f"{n_rows}x{n_steps}", "dtype": str(dtype).replace("torch.", ""), "impl": name,
                "median ms": ms, "peak extra MiB": None if slow_loop else peak_extra_mib(call, device), "x loop": None,
                "x compiled step": None, "x floor": ms / floor_ms, "HBM frac": hbm_fraction(device, moved, ms),
            })
        loop_ms, step_ms = shape_rows[2]["median ms"], shape_rows[3]["median ms"]
        for row in shape_rows:
            row["x loop"] = loop_ms / row["median ms"]
            row["x compiled step"] = step_ms / row["median ms"]
        rows += shape_rows
    report(f"gae(rewards, values, mask, gamma={GAMMA}, lam={LAM})", rows, args, device)


if __name__ == "__main__":
    main()
