"""Log-probs of chosen tokens from logits [B, T, V]: rlhf_fast backends vs eager, TRL-style and torch.compile.

python benchmarks/bench_logprobs.py [--device cpu|cuda] [--quick] [--kept-only] [--json out.json]

Rows, forward and forward+backward: eager `log_softmax(logits.float())` + `gather`; the row loop of TRL's
`selective_log_softmax` (written from its published formula; TRL's own function too when trl is installed);
`torch.compile` of the eager path; every rlhf_fast backend usable on the device; and one `torch.exp(logits, out=buf)`
pass, the compute floor of anything that exponentiates every logit. On CUDA the last column is the fraction of HBM
bandwidth reached by reading the logits once (forward) or reading them and writing their gradient (fwd+bwd).

Second table, "kept-set vs plain": each compiled backend's logprobs with kept_threshold (the sampler's kept set,
here each row's 50th-largest logit, a top-k / top-p sized set) against the same call without it, forward and
forward+backward, timed interleaved (plain, kept, plain, ...) and reported as medians and their ratio (GPU target:
<= 1.10). With --json PATH it goes to PATH with ".kept" before the suffix (to PATH itself with --kept-only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import hbm_fraction, median_ms, parser, peak_extra_mib, report, sync

import rlhf_fast
from rlhf_fast import _backend
from rlhf_fast.ops.token_logprobs import LOGPROBS_BACKENDS



def eager(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def trl_style(logits, labels):
    """TRL's selective_log_softmax: logsumexp row by row for fp32, log_softmax row by row for low precision."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack([torch.log_softmax(row.float(), dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
                        for row, lab in zip(logits, labels)])


def implementations(device):
    impls = {"eager": eager, "trl-style loop": trl_style, "torch.compile(eager)": torch.compile(eager)}
    try:
        from trl.trainer.utils import selective_log_softmax

        impls["trl.selective_log_softmax"] = selective_log_softmax
    except ImportError:
        pass
    for name in LOGPROBS_BACKENDS:
        if _backend.built(name) and _backend.runs_on(name, device):
            def run(logits, labels, _name=name):
                with rlhf_fast.use_backend(_name):
                    return rlhf_fast.logprobs(logits, labels)
            impls[f"rlhf_fast[{name}]"] = run
    return impls


def interleaved_medians(fns: dict, device, reps: int) -> dict:
    """Median ms of each fn, the fns run in turn within every repetition (after one warm-up round)."""
    times = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if rep > 0:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def kept_vs_plain(shapes, device, reps: int) -> list[dict]:
    out = []
    for shape, dtype in shapes:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
        labels = torch.randint(0, shape[-1], shape[:-1], generator=gen).to(device)
        grad_out = torch.randn(shape[:-1], device=device)
        threshold = logits.float().topk(min(50, shape[-1]), dim=-1).values[..., -1].contiguous()
        for backend in LOGPROBS_BACKENDS:
            if backend == "torch" or not (_backend.built(backend) and _backend.runs_on(backend, device)):
                continue
            leaf = logits.detach().requires_grad_()

            def run(kept, backward, backend=backend, leaf=leaf):
                with rlhf_fast.use_backend(backend):
                    if not backward:
                        return rlhf_fast.logprobs(logits, labels, kept_threshold=kept)
                    rlhf_fast.logprobs(leaf, labels, kept_threshold=kept).backward(grad_out)
                    leaf.grad = None

            for mode, backward in (("forward", False), ("fwd+bwd", True)):
                ms = interleaved_medians({"plain": lambda b=backward: run(None, b),
                                          "kept": lambda b=backward: run(threshold, b)}, device, reps)
                out.append({"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
                            "backend": backend, "mode": mode, "plain ms": ms["plain"], "kept ms": ms["kept"],
                            "kept / plain": ms["kept"] / ms["plain"]})
    return out


def main():
    p = parser(__doc__)
    p.add_argument("--kept-only", action="store_true", help="only the kept-set vs plain table")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.quick:
        shapes = [((2, 16, 1000), torch.float32)]
    elif device.type == "cuda":
        shapes = [((8, 1024, 151936), torch.bfloat16), ((8, 512, 32000), torch.float32), ((8, 512, 32000), torch.bfloat16)]
    else:
        shapes = [((8, 512, 32000), torch.float32), ((8, 512, 32000), torch.bfloat16)]
    kept_args = argparse.Namespace(**vars(args))
    if args.json and not args.kept_only:
        stem, dot, suffix = args.json.rpartition(".")
        kept_args.json = f"{stem}.kept.{suffix}" if dot else args.json + ".kept"
    kept_rows = kept_vs_plain(shapes, device, max(args.reps, 3))
    report("logprobs(logits, labels, kept_threshold=m) vs plain, interleaved medians", kept_rows, kept_args, device)
    if args.kept_only:
        return
    rows = []
    for shape, dtype in shapes:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
        labels = torch.randint(0, shape[-1], shape[:-1], generator=gen).to(device)
        grad_out = torch.randn(shape[:-1], device=device)
        logits_bytes = logits.numel() * logits.element_size()
        buf = torch.empty_like(logits)
        results = {"floor: torch.exp pass": (lambda: torch.exp(logits, out=buf), None)}
        for name, fn in implementations(device).items():
            leaf = logits.detach().requires_grad_()

            def fwd_bwd(fn=fn, leaf=leaf):
                fn(leaf, labels).backward(grad_out)
                leaf.grad = None

            results[name] = (lambda fn=fn: fn(logits, labels), fwd_bwd)
        eager_ms = {}
        for mode in ("forward", "fwd+bwd"):
            for name, fns in results.items():
                fn = fns[0] if mode == "forward" else fns[1]
                if fn is None:
                    continue
                ms = median_ms(fn, device, reps=args.reps)
                if name == "eager":
                    eager_ms[mode] = ms
                moved = logits_bytes * (1 if mode == "forward" else 3)
                rows.append({
                    "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""), "mode": mode,
                    "impl": name, "median ms": ms, "peak extra MiB": peak_extra_mib(fn, device),
                    "logits MiB": logits_bytes / 2**20, "x eager": None, "HBM frac": hbm_fraction(device, moved, ms),
                })
        for row in rows:
            if row["shape"] == "x".join(map(str, shape)) and row["dtype"] == str(dtype).replace("torch.", ""):
                base = eager_ms.get(row["mode"])
                row["x eager"] = base / row["median ms"] if base else None
    report("logprobs(logits, labels)", rows, args, device)


if __name__ == "__main__":
    main()
