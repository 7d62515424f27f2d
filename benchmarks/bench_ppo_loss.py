"""Benchmark of the PPO losses: ppo_loss_from_logits forward+backward against the eager composite (log_softmax,
gather, entropy, clipped ratio, KL, masked mean: ppo_loss_from_logits_ref) and torch.compile of that composite; and
the per-token losses ppo_policy_loss / ppo_value_loss against their references.

Method. Each from-logits row runs in a fresh subprocess (so one row's allocations cannot hide another's) with glibc's
mmap threshold fixed at 64 KiB, so every large buffer is mmapped and returned to the OS when freed and the resident
set follows the live tensors. After the warm-up runs (torch.compile compiles there) the peak RSS is reset
(``/proc/self/clear_refs``), one forward+backward runs, and the peak extra memory is VmHWM minus the RSS before it:
all temporaries plus the logits' gradient, which stays alive. Time is the median of ``--reps`` forward+backward runs.

    python benchmarks/bench_ppo_loss.py [--quick] [--thp] [--json PATH] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = {  # name -> keyword arguments of ppo_loss_from_logits
    "full": dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, dual_clip=3.0),
    "no-entropy": dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.0, dual_clip=3.0),
}
IMPLS = {  # config -> implementations timed ("rlhf_fast [torch]": the composition on the reference log-prob backend)
    "full": ("eager composite", "compiled composite", "rlhf_fast [cpp]", "rlhf_fast [torch]"),
    "no-entropy": ("eager composite", "compiled composite", "rlhf_fast [cpp]"),
}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    *batch, vocab = shape
    logits = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, batch, generator=g)
    old_logp = torch.randn(batch, generator=g) * 0.2 - 10.0
    ref_logp = torch.randn(batch, generator=g) * 0.2 - 10.0
    advantages = torch.randn(batch, generator=g)
    mask = torch.rand(batch, generator=g) < 0.9
    return logits, labels, old_logp, advantages, mask, ref_logp


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _run_row(impl: str, shape, dtype_name: str, config: str, reps: int) -> dict:
    """One row, in this (fresh) process: -> {"ms": median, "peak_mib": peak extra memory}."""
    import rlhf_fast
    from rlhf_fast.ops.ppo_loss import ppo_loss_from_logits_ref

    dtype = getattr(torch, dtype_name)
    logits, labels, old_logp, advantages, mask, ref_logp = _inputs(shape, dtype)
    kwargs = dict(CONFIGS[config], ref_logp=ref_logp)
    if impl == "eager composite":
        fn = ppo_loss_from_logits_ref
    elif impl == "compiled composite":
        fn = torch.compile(ppo_loss_from_logits_ref)
    else:
        fn = rlhf_fast.ppo_loss_from_logits
    backend = impl[impl.index("[") + 1:-1] if "[" in impl else "torch"

    def step():
        with rlhf_fast.use_backend(backend):
            loss, _ = fn(logits, labels, old_logp, advantages, mask, **kwargs)
        loss.backward()

    for _ in range(2):  # warm-up (and compilation)
        step()
        logits.grad = None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _memory_kib("VmRSS")
        step()
        peak_mib = (_memory_kib("VmHWM") - base) / 1024
    except OSError:
        peak_mib = float("nan")
    logits.grad = None
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        logits.grad = None
    return {"ms": 1e3 * statistics.median(times), "peak_mib": peak_mib}


def _subprocess_row(impl, shape, dtype_name, config, reps, thp: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               THP_MEM_ALLOC_ENABLE="1" if thp else "0")
    arg = json.dumps({"impl": impl, "shape": shape, "dtype": dtype_name, "config": config, "reps": reps})
    out = subprocess.run([sys.executable, __file__, "--row", arg], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"row {impl} {shape} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def token_loss_rows(shape, reps: int) -> list[dict]:
    """ppo_policy_loss / ppo_value_loss forward+backward on [B, T] token vectors, in this process, on one thread:
    these ops are a few microseconds each, and on a shared 2-core machine a two-thread parallel region waits for
    the other core's scheduler slice (~20 ms measured), which would swamp them."""
    import rlhf_fast

    torch.set_num_threads(1)
    from rlhf_fast.ops.ppo_loss import ppo_policy_loss_ref, ppo_value_loss_ref

    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(shape, generator=g) for _ in range(3))
    mask = torch.rand(shape, generator=g) < 0.9
    x = a.clone().requires_grad_(True)
    cases = {
        "ppo_policy_loss": (rlhf_fast.ppo_policy_loss, ppo_policy_loss_ref, dict(dual_clip=3.0)),
        "ppo_value_loss": (rlhf_fast.ppo_value_loss, ppo_value_loss_ref, dict(clip=0.2)),
    }
    rows = []
    for op, (fast, ref, kw) in cases.items():
        compiled = torch.compile(ref)
        times = {}
        for impl, fn in (("eager reference", ref), ("compiled reference", compiled), ("rlhf_fast [torch]", fast)):
            times[impl] = _median_ms(lambda: fn(x, b, c, mask, **kw)[0].backward(), reps)
        for impl, ms in times.items():
            rows.append({"op": op, "shape": list(shape), "dtype": "float32", "impl": impl, "threads": 1, "ms": ms,
                         "vs_eager": times["eager reference"] / ms, "vs_compiled": times["compiled reference"] / ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5, quick 3)")
    parser.add_argument("--thp", action="store_true",
                        help="THP_MEM_ALLOC_ENABLE=1: PyTorch asks for transparent huge pages for large CPU tensors "
                             "(page faults of freshly allocated [B, T, V] tensors dominate otherwise)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        spec = json.loads(args.row)
        print(json.dumps(_run_row(spec["impl"], spec["shape"], spec["dtype"], spec["config"], spec["reps"])))
        return

    from tabulate import tabulate

    reps = args.reps or (3 if args.quick else 5)
    shapes = [[2, 64, 1000]] if args.quick else [[8, 512, 32000]]
    rows = []
    for shape in shapes:
        logits_mib = torch.Size(shape).numel() * 4 / 2**20
        for config in CONFIGS:
            results = {impl: _subprocess_row(impl, shape, "float32", config, reps, args.thp)
                       for impl in IMPLS[config]}
            for impl, r in results.items():
                rows.append({
                    "op": "ppo_loss_from_logits", "shape": shape, "dtype": "float32", "config": config, "impl": impl,
                    "threads": torch.get_num_threads(), "thp": args.thp,
                    "ms": r["ms"], "peak_extra_mib": r["peak_mib"], "peak_vs_logits": r["peak_mib"] / logits_mib,
                    "vs_eager": results["eager composite"]["ms"] / r["ms"],
                    "vs_compiled": results["compiled composite"]["ms"] / r["ms"],
                })
    print(f"ppo_loss_from_logits forward+backward, CPU ({torch.get_num_threads()} threads, transparent huge pages "
          f"{'on' if args.thp else 'off'}); peak extra memory = VmHWM growth over one fwd+bwd (gradient included), "
          "in a fresh process per row")
    print(tabulate([[f"{r['shape']} {r['config']}", r["impl"], f"{r['ms']:.1f}", f"{r['peak_extra_mib']:.0f}",
                     f"{r['peak_vs_logits']:.2f}x", f"{r['vs_eager']:.2f}x", f"{r['vs_compiled']:.2f}x"]
                    for r in rows],
                   headers=["shape, config", "impl", "median ms", "peak extra MiB", "peak / logits", "vs eager",
                            "vs compiled"]))
    token_shape = (4, 256) if args.quick else (64, 2048)
    token_rows = token_loss_rows(token_shape, reps * 10)
    print(f"\nper-token losses forward+backward on {list(token_shape)} float32, 1 thread")
    print(tabulate([[r["op"], r["impl"], f"{r['ms']:.3f}", f"{r['vs_eager']:.2f}x", f"{r['vs_compiled']:.2f}x"]
                    for r in token_rows], headers=["op", "impl", "median ms", "vs eager", "vs compiled"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "cpu", "rows": rows + token_rows}, f, indent=1)


if __name__ == "__main__":
    main()
