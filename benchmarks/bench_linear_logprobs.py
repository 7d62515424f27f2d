"""Log-probs from hidden states and the lm_head weight: rlhf_fast.linear_logprobs vs the logits path and TRL.

python benchmarks/bench_linear_logprobs.py [--device cpu|cuda] [--quick] [--reps N] [--shape N,H,V] [--dtype bf16]
                                          [--json out.json]

Rows, forward (no grad: reference / old log-probs) and forward+backward (gradient w.r.t. hidden and weight, with a
random per-token upstream gradient): eager `hidden @ W.T` -> `log_softmax` -> `gather`; `torch.compile` of it;
TRL's chunked path `trl.kernels.chunked_logprob.ChunkedLogProbFunction` (log-probs only, TRL's chunk size) when trl
is installed; rlhf_fast.linear_logprobs on each compiled backend usable on the device. The floor rows time the GEMMs
no implementation can avoid: one logits GEMM for the forward; the logits, grad_hidden and grad_weight GEMMs for
forward+backward. "x floor" is time / floor time; on CUDA, "peak" is the fraction of the dense bf16/fp16 (or TF32)
peak reached counting 2*N*H*V FLOPs per GEMM (4 GEMMs for fwd+bwd, the logits recomputed in backward, as the issue
counts it). Peak memory is what the call allocates beyond its inputs (gradients included); on the CPU it is
measured in a fresh process per row (see memory_mib).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys

import torch
from common import median_ms, parser, peak_extra_mib, report

import rlhf_fast
from rlhf_fast import _backend
from rlhf_fast.ops.linear_logprobs import LINEAR_LOGPROBS_BACKENDS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_FLOPS = {"H100": {"bf16": 989e12, "fp32": 494e12}, "H200": {"bf16": 989e12, "fp32": 494e12}}  # dense, SXM


def eager(hidden, weight, labels):
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def implementations(device, only=None):
    """name -> fn(hidden, weight, labels); ``only``: just that one (the memory child skips importing trl)."""
    impls = {"eager": eager, "torch.compile(eager)": torch.compile(eager)}
    if only is None or only.startswith("trl"):
        impls.update(_trl())
    for name in LINEAR_LOGPROBS_BACKENDS:
        if name != "torch" and _backend.built(name) and _backend.runs_on(name, device):
            def run(hidden, weight, labels, _name=name):
                with rlhf_fast.use_backend(_name):
                    return rlhf_fast.linear_logprobs(hidden, weight, labels)
            impls[f"rlhf_fast[{name}]"] = run
    return impls if only is None else {only: impls[only]}


def _trl():
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        try:
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as trl_chunk
        except ImportError:
            trl_chunk = 32768

        def trl(hidden, weight, labels):
            return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, trl_chunk, None, 1.0, ())[0]

        return {"trl ChunkedLogProbFunction": trl}
    except ImportError:
        print("trl is not installed: no TRL row (pip install trl)", file=sys.stderr)
        return {}


def flops_fraction(device, dtype_name, flops, ms):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((p for key, p in PEAK_FLOPS.items() if key in name), None)
    if peaks is None:
        return None
    return flops / (ms * 1e-3) / peaks["fp32" if dtype_name == "fp32" else "bf16"]


def make_inputs(n, h, v, dtype, device):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    grad_out = torch.randn(n, generator=gen).to(device)
    return hidden, weight, labels, grad_out


def runner(fn, mode, hidden, weight, labels, grad_out):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(hidden, weight, labels)
    else:
        def run():
            hd, wd = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            fn(hd, wd, labels).backward(grad_out)
    return run


def child_memory(args, device, n, h, v, dtype):
    """--memory-of IMPL: peak extra MiB of one implementation, measured in this fresh process."""
    run = runner(implementations(device, args.memory_of)[args.memory_of], args.mode,
                 *make_inputs(n, h, v, dtype, device))
    run()  # compiles, loads kernels
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(peak_extra_mib(run, device))


def memory_mib(args, device, name, mode, shape_arg):
    """Peak memory of one implementation. CPU: in a fresh process where every allocation >= 1 MiB is mmap-ed (and
    returned to the system when freed), so the resident-set peak counts exactly the memory the call touches, with
    no heap left over by earlier rows."""
    if device.type == "cuda":
        return None  # measured in process, see main
    cmd = [sys.executable, __file__, "--memory-of", name, "--mode", mode, "--shape", shape_arg, "--dtype", args.dtype,
           "--device", str(device)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--shape", help="N,H,V (default: 4096,1024,32000 on CPU, 8192,4096,128256 on CUDA)")
    p.add_argument("--dtype", choices=DTYPES, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fwd+bwd", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.quick:
        n, h, v = 256, 64, 1000
    elif args.shape:
        n, h, v = (int(x) for x in args.shape.split(","))
    else:
        n, h, v = (4096, 1024, 32000) if device.type == "cpu" else (8192, 4096, 128256)
    args.dtype = args.dtype or ("fp32" if device.type == "cpu" else "bf16")
    dtype = DTYPES[args.dtype]
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True  # as a trainer would run it
    if args.memory_of:
        return child_memory(args, device, n, h, v, dtype)

    inputs = make_inputs(n, h, v, dtype, device)
    hidden, weight = inputs[:2]
    shape = f"N={n} H={h} V={v} {args.dtype}"
    reps = args.reps

    def gemm_floor(mode):
        """Median time of the GEMMs of ``mode``, measured just before its rows (the CPU here is shared)."""
        grad_logits = torch.randn(n, v, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        gemms = {"logits": lambda: hidden @ weight.T, "grad_hidden": lambda: grad_logits @ weight,
                 "grad_weight": lambda: grad_logits.T @ hidden}
        if mode == "fwd":
            gemms = {"logits": gemms["logits"]}
        gemm_ms = {name: median_ms(fn, device, reps=reps) for name, fn in gemms.items()}
        print(f"{shape} {mode}: GEMM medians (ms): " + ", ".join(f"{k} {ms:.4g}" for k, ms in gemm_ms.items()))
        return sum(gemm_ms.values())

    gemm_flops = 2 * n * h * v
    flops = {"fwd": gemm_flops, "fwd+bwd": 4 * gemm_flops}
    floors = {}
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        floors[mode] = gemm_floor(mode)
        rows.append({"shape": shape, "mode": mode, "impl": "floor: " + ("logits GEMM" if mode == "fwd" else
                                                                        "3 GEMMs (logits, grad_h, grad_W)"),
                     "median ms": floors[mode], "peak extra MiB": None})
        results = {}
        for name, fn in implementations(device).items():
            run = runner(fn, mode, *inputs)
            ms = median_ms(run, device, reps=reps)
            mib = peak_extra_mib(run, device) if device.type == "cuda" else memory_mib(args, device, name, mode,
                                                                                         f"{n},{h},{v}")
            results[name] = (ms, mib)
            rows.append({"shape": shape, "mode": mode, "impl": name, "median ms": ms, "peak extra MiB": mib})
        eager_ms, eager_mib = results["eager"]
        compiled_ms = results["torch.compile(eager)"][0]
        for row in rows:
            if row["mode"] != mode or row["impl"].startswith("floor"):
                continue
            row["vs eager"] = eager_ms / row["median ms"]
            row["vs compile"] = compiled_ms / row["median ms"]
            row["x floor"] = row["median ms"] / floors[mode]
            row["mem / eager"] = row["peak extra MiB"] / eager_mib if eager_mib else None
            frac = flops_fraction(device, args.dtype, flops[mode], row["median ms"])
            if frac is not None:
                row["of peak FLOP/s"] = frac
    report("linear_logprobs: log-probs from hidden states and the lm_head weight", rows, args, device)


if __name__ == "__main__":
    main()
