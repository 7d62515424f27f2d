"""Benchmark of the PPO losses: ppo_loss_from_logits forward+backward against the eager composite (log_softmax,
gather, entropy, clipped ratio, KL, masked mean: ppo_loss_from_logits_ref) and torch.compile of that composite; and
the per-token losses ppo_policy_loss / ppo_value_loss (forward+backward, stats included) against their references,
eager and under torch.compile, on every rlhf_fast backend usable on the device.

Method (CPU). Each from-logits row runs in a fresh subprocess (so one row's allocations cannot hide another's) with
glibc's mmap threshold fixed at 64 KiB, so every large buffer is mmapped and returned to the OS when freed and the
resident set follows the live tensors. After the warm-up runs (torch.compile compiles there) the peak RSS is reset
(``/proc/self/clear_refs``), one forward+backward runs, and the peak extra memory is VmHWM minus the RSS before it:
all temporaries plus the logits' gradient. Time is the median of ``--reps`` forward+backward runs.
The per-token rows run in this process, at each of ``--threads`` (default 1 and 2).
Method (CUDA). In this process; peak extra memory from the caching allocator; times synchronise the device.

    python benchmarks/bench_ppo_loss.py [--device cpu|cuda] [--quick] [--thp] [--json PATH] [--reps N] [--threads 1,2]
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
from common import device_name, median_ms, peak_extra_mib, rss_kib, sync

CONFIGS = {  # name -> keyword arguments of ppo_loss_from_logits
    "full": dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, dual_clip=3.0),
    "no-entropy": dict(kl_coef=0.05, kl_kind="k3", entropy_coef=0.0, dual_clip=3.0),
}
IMPLS = {  # config -> implementations timed ("rlhf_fast [torch]": the composition on the reference log-prob backend)
    "full": ("eager composite", "compiled composite", "rlhf_fast [cpp]", "rlhf_fast [torch]"),
    "no-entropy": ("eager composite", "compiled composite", "rlhf_fast [cpp]"),
}
CUDA_IMPLS = ("eager composite", "compiled composite", "rlhf_fast [triton]", "rlhf_fast [cuda]")


def _inputs(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    *batch, vocab = shape
    logits = torch.randn(shape, generator=g).to(dtype)
    labels = torch.randint(0, vocab, batch, generator=g)
    old_logp = torch.randn(batch, generator=g) * 0.2 - 10.0
    ref_logp = torch.randn(batch, generator=g) * 0.2 - 10.0
    advantages = torch.randn(batch, generator=g)
    mask = torch.rand(batch, generator=g) < 0.9
    tensors = [x.to(device) for x in (logits, labels, old_logp, advantages, mask, ref_logp)]
    tensors[0].requires_grad_(True)
    return tuple(tensors)


def _from_logits_step(impl: str, logits, labels, old_logp, advantages, mask, kwargs):
    """-> a function running one forward+backward of ``impl`` (the logits' gradient is dropped after it). The
    composites aggregate over the mask (token-mean); rlhf_fast reads the token-mean loss weights, computed once
    before timing as a trainer computes them once per step."""
    import rlhf_fast
    from rlhf_fast.ops.ppo_loss import ppo_loss_from_logits_ref

    weights = mask
    if impl == "eager composite":
        fn = ppo_loss_from_logits_ref
    elif impl == "compiled composite":
        fn = torch.compile(ppo_loss_from_logits_ref)
    else:
        fn, weights = rlhf_fast.ppo_loss_from_logits, rlhf_fast.loss_weights(mask)
    backend = impl[impl.index("[") + 1:-1] if "[" in impl else "torch"

    def step():
        with rlhf_fast.use_backend(backend):
            loss, _ = fn(logits, labels, old_logp, advantages, weights, **kwargs)
        loss.backward()
        logits.grad = None

    return step


def _run_row(impl: str, shape, dtype_name: str, config: str, reps: int) -> dict:
    """One CPU row, in this (fresh) process: -> {"ms": median, "peak_mib": peak extra memory}."""
    logits, labels, old_logp, advantages, mask, ref_logp = _inputs(shape, getattr(torch, dtype_name))
    step = _from_logits_step(impl, logits, labels, old_logp, advantages, mask, dict(CONFIGS[config], ref_logp=ref_logp))
    for _ in range(2):  # warm-up (and compilation)
        step()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = rss_kib("VmRSS")
        # the gradient is freed at the end of step(); the peak includes it
        step()
        peak_mib = (rss_kib("VmHWM") - base) / 1024
    except OSError:
        peak_mib = float("nan")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "peak_mib": peak_mib}


def _cuda_rows(shape, dtype_name: str, config: str, reps: int) -> dict:
    """The from-logits rows on CUDA, in this process: impl -> {"ms", "peak_mib"}."""
    from rlhf_fast import _backend

    device = torch.device("cuda")
    tensors = _inputs(shape, getattr(torch, dtype_name), device=device)
    kwargs = dict(CONFIGS[config], ref_logp=tensors[-1])
    results = {}
    for impl in CUDA_IMPLS:
        if "[" in impl and not _backend.built(impl[impl.index("[") + 1:-1]):
            continue
        step = _from_logits_step(impl, *tensors[:-1], kwargs)
        ms = median_ms(step, device, reps=reps, warmup=2)
        results[impl] = {"ms": ms, "peak_mib": peak_extra_mib(step, device)}
    return results


def _subprocess_row(impl, shape, dtype_name, config, reps, thp: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               THP_MEM_ALLOC_ENABLE="1" if thp else "0")
    arg = json.dumps({"impl": impl, "shape": shape, "dtype": dtype_name, "config": config, "reps": reps})
    out = subprocess.run([sys.executable, __file__, "--row", arg], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"row {impl} {shape} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _interleaved_ms(impls: dict, x, args, kwargs, device: torch.device, reps: int) -> dict:
    """Median ms of one forward+backward of each implementation, timed in rounds that run every implementation once,
    so a change of the machine's load (a shared box) hits them all alike."""
    def step(fn):
        fn(*args, **kwargs)[0].backward()
        x.grad = None

    for fn in impls.values():  # warm-up (and compilation)
        for _ in range(3):
            step(fn)
    times = {impl: [] for impl in impls}
    for _ in range(reps):
        for impl, fn in impls.items():
            sync(device)
            start = time.perf_counter()
            step(fn)
            sync(device)
            times[impl].append(1e3 * (time.perf_counter() - start))
    return {impl: statistics.median(t) for impl, t in times.items()}


def token_loss_rows(shape, device: torch.device, threads: list, reps: int) -> list[dict]:
    """ppo_policy_loss / ppo_value_loss forward+backward on [B, T] float32 token vectors (stats included), in this
    process, timed interleaved (_interleaved_ms); the references aggregate over the mask (token-mean), rlhf_fast reads
    its loss weights, computed once before timing. On the CPU at each thread count: on a shared 2-core machine a
    two-thread parallel region can wait for the other core's scheduler slice (~20 ms measured)."""
    import rlhf_fast
    from rlhf_fast import _backend
    from rlhf_fast.ops.ppo_loss import TOKEN_LOSS_BACKENDS, ppo_policy_loss_ref, ppo_value_loss_ref

    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    mask = (torch.rand(shape, generator=g) < 0.9).to(device)
    weights = rlhf_fast.loss_weights(mask)
    x = a.clone().requires_grad_(True)
    cases = {
        "ppo_policy_loss": (rlhf_fast.ppo_policy_loss, ppo_policy_loss_ref, dict(dual_clip=3.0)),
        "ppo_value_loss": (rlhf_fast.ppo_value_loss, ppo_value_loss_ref, dict(clip=0.2)),
    }
    backends = [name for name in TOKEN_LOSS_BACKENDS if _backend.built(name) and _backend.runs_on(name, device)]
    rows = []
    for op, (fast, ref, kw) in cases.items():
        impls = {"eager reference": ref, "compiled reference": torch.compile(ref, dynamic=False)}
        for name in backends:
            def run(x, b, c, _mask, _name=name, **kwargs):
                with rlhf_fast.use_backend(_name):
                    return fast(x, b, c, weights, **kwargs)
            impls[f"rlhf_fast [{name}]"] = run
        for n_threads in threads if device.type == "cpu" else [None]:
            if n_threads:
                torch.set_num_threads(n_threads)
            times = _interleaved_ms(impls, x, (x, b, c, mask), kw, device, reps)
            for impl, ms in times.items():
                rows.append({"op": op, "shape": list(shape), "dtype": "float32", "impl": impl, "device": device.type,
                             "threads": n_threads, "ms": ms, "vs_eager": times["eager reference"] / ms,
                             "vs_compiled": times["compiled reference"] / ms})
    return rows


def _threads(text: str) -> list:
    return [int(t) for t in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5, quick 3)")
    parser.add_argument("--threads", type=_threads, default=[1, 2],
                        help="CPU thread counts of the per-token rows, comma-separated (default 1,2)")
    parser.add_argument("--per-token-only", action="store_true", help="only the per-token loss rows")
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

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    reps = args.reps or (3 if args.quick else 5)
    rows = []
    if not args.per_token_only:
        shape = [2, 64, 1000] if args.quick else [8, 512, 32000]
        logits_mib = torch.Size(shape).numel() * 4 / 2**20
        for config in ("full",) if cuda else CONFIGS:  # CUDA: one config, to keep torch.compile's time short
            if cuda:
                results = _cuda_rows(shape, "float32", config, reps * 4)
            else:
                results = {impl: _subprocess_row(impl, shape, "float32", config, reps, args.thp)
                           for impl in IMPLS[config]}
            for impl, r in results.items():
                rows.append({
                    "op": "ppo_loss_from_logits", "shape": shape, "dtype": "float32", "config": config, "impl": impl,
                    "device": device.type, "threads": None if cuda else torch.get_num_threads(), "thp": args.thp,
                    "ms": r["ms"], "peak_extra_mib": r["peak_mib"], "peak_vs_logits": r["peak_mib"] / logits_mib,
                    "vs_eager": results["eager composite"]["ms"] / r["ms"],
                    "vs_compiled": results["compiled composite"]["ms"] / r["ms"],
                })
        where = "in this process" if cuda else "in a fresh process per row"
        print(f"ppo_loss_from_logits forward+backward, {device_name(device)}"
              + ("" if cuda else f", transparent huge pages {'on' if args.thp else 'off'}")
              + f"; peak extra memory over one fwd+bwd (gradient included), {where}")
        print(tabulate([[f"{r['shape']} {r['config']}", r["impl"], f"{r['ms']:.2f}", f"{r['peak_extra_mib']:.0f}",
                         f"{r['peak_vs_logits']:.2f}x", f"{r['vs_eager']:.2f}x", f"{r['vs_compiled']:.2f}x"]
                        for r in rows],
                       headers=["shape, config", "impl", "median ms", "peak extra MiB", "peak / logits", "vs eager",
                                "vs compiled"]))
    if args.quick:
        token_shapes = [(4, 256)]
    else:
        token_shapes = [(64, 2048), (256, 8192)] if cuda else [(64, 2048)]
    token_rows = []
    for token_shape in token_shapes:
        token_rows += token_loss_rows(token_shape, device, args.threads, reps * (20 if cuda else 10))
    print(f"\nper-token losses forward+backward (stats included), float32, {device_name(device)}")
    print(tabulate([[r["op"], "x".join(map(str, r["shape"])), r["threads"] or "-", r["impl"], f"{r['ms']:.3f}",
                     f"{r['vs_eager']:.2f}x", f"{r['vs_compiled']:.2f}x"] for r in token_rows],
                   headers=["op", "shape", "threads", "impl", "median ms", "vs eager", "vs compiled"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "rows": rows + token_rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
