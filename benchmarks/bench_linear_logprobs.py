"""Log-probs from hidden states and the lm_head weight: rlhf_fast.linear_logprobs vs the logits path, TRL and Liger.

python benchmarks/bench_linear_logprobs.py [--device cpu|cuda] [--quick] [--reps N] [--shape N,H,V] [--dtype bf16]
                                          [--json out.json]

Rows, forward (no grad: reference / old log-probs) and forward+backward (gradient w.r.t. hidden and weight, with a
random per-token upstream gradient): eager `hidden @ W.T` -> `log_softmax` -> `gather`; `torch.compile` of it;
TRL's chunked path `trl.kernels.chunked_logprob.ChunkedLogProbFunction` (log-probs only, TRL's chunk size) when trl
is installed; Liger's `LigerFusedLinearCrossEntropyLoss` (forward+backward only, when liger_kernel is installed: it
returns a scalar loss, sum of -log-probs, so it forms the gradients in its forward, 3 GEMMs, which a per-token
output with an arbitrary upstream gradient cannot do); rlhf_fast.linear_logprobs on each compiled backend usable on
the device. Forward+backward also has the scalar-loss rows, whose upstream gradient is known in the forward: eager
`cross_entropy(hidden @ W.T, labels, reduction="sum")`, Liger, and rlhf_fast.linear_cross_entropy (3 GEMMs).

Floor rows time plain GEMMs at the full size: the logits GEMM [N, H] x [H, V] for the forward; for forward+backward
the three GEMMs no implementation can avoid (logits, grad_hidden, grad_weight) and, as "4 GEMMs", those plus a
second logits GEMM: the structural floor of any per-token op that does not keep the [N, V] logits, since
grad_weight = sum_n g_n (onehot(y_n) - p_n) hidden_n^T needs p again once the upstream g is known. "x floor" is time
/ the 3-GEMM floor (fwd: / the logits GEMM). "TFLOP/s" counts 2*N*H*V per GEMM: 1 GEMM for fwd rows, 4 for fwd+bwd
rows (as the issue counts it), the GEMMs actually run for floor rows; on CUDA "of peak" divides it by the dense
bf16/fp16 (or TF32) peak of the card (H100/H200 SXM: 989 / 494 TFLOP/s), and the logits floor row is the practical
ceiling measured on this card. Peak memory is what the call allocates beyond its inputs (gradients included); on
the CPU it is measured in a fresh process per row (see memory_mib).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time

import torch
from common import median_ms, parser, peak_extra_mib, report

import rlhf_fast
from rlhf_fast import _backend
from rlhf_fast.ops.linear_logprobs import LINEAR_LOGPROBS_BACKENDS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense tensor-core peaks (FLOP/s, no sparsity): bf16/fp16, and TF32 for fp32 inputs. First match in the name wins.
PEAK_FLOPS = {"H100 PCIe": (756e12, 378e12), "H100 NVL": (835e12, 418e12), "H100": (989e12, 494e12),
              "H200": (989e12, 494e12), "H20": (148e12, 74e12), "A100": (312e12, 156e12)}


def eager(hidden, weight, labels):
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def eager_cross_entropy(hidden, weight, labels):
    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")


def implementations(device, mode, only=None):
    """name -> fn(hidden, weight, labels) for ``mode``; ``only``: just that one (a memory child imports no more)."""
    impls = {"eager": eager, "torch.compile(eager)": torch.compile(eager)}
    if only is None or only.startswith("trl"):
        impls.update(_trl())
    compiled = [name for name in LINEAR_LOGPROBS_BACKENDS
                if name != "torch" and _backend.built(name) and _backend.runs_on(name, device)]
    for name in compiled:
        def run(hidden, weight, labels, _name=name):
            with rlhf_fast.use_backend(_name):
                return rlhf_fast.linear_logprobs(hidden, weight, labels)
        impls[f"rlhf_fast[{name}]"] = run
    if mode == "fwd+bwd":  # scalar losses: the upstream gradient is known in the forward
        impls["eager cross_entropy (scalar loss)"] = eager_cross_entropy
        if only is None or only.startswith("liger"):
            impls.update(_liger())
        for name in compiled:
            def loss(hidden, weight, labels, _name=name):
                with rlhf_fast.use_backend(_name):
                    return rlhf_fast.linear_cross_entropy(hidden, weight, labels, reduction="sum")
            impls[f"rlhf_fast.linear_cross_entropy[{name}] (scalar loss)"] = loss
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


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        print("liger_kernel is not installed: no Liger row (pip install liger-kernel)", file=sys.stderr)
        return {}
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def liger(hidden, weight, labels):  # a scalar: sum of -log-probs (its gradients are formed in the forward)
        return loss(weight, hidden, labels)

    return {"liger FusedLinearCrossEntropy (scalar loss)": liger}


def peak_flops(device, dtype_name):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((p for key, p in PEAK_FLOPS.items() if key in name), None)
    return None if peaks is None else peaks[1 if dtype_name == "fp32" else 0]


def make_inputs(n, h, v, dtype, device):
    """hidden [n, h], weight [v, h] (scaled so that logits are O(1)), labels [n], upstream gradient [n]; drawn on the
    device (drawing 10^9 numbers on the host and copying them would take longer than the benchmark)."""
    gen = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(n, h, generator=gen, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=gen, device=device) / h ** 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    grad_out = torch.randn(n, generator=gen, device=device)
    return hidden, weight, labels, grad_out


def runner(fn, mode, hidden, weight, labels, grad_out):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(hidden, weight, labels)
    else:
        def run():
            hd, wd = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            out = fn(hd, wd, labels)
            out.backward() if out.dim() == 0 else out.backward(grad_out)
    return run


def child_memory(args, device, n, h, v, dtype):
    """--memory-of IMPL: peak extra MiB of one implementation, measured in this fresh process."""
    run = runner(implementations(device, args.mode, args.memory_of)[args.memory_of], args.mode,
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
    started = time.perf_counter()
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
    gemm_flops = 2 * n * h * v
    peak = peak_flops(device, args.dtype)

    def floor_rows(mode):
        """Median times of the GEMMs of ``mode`` at the full size, measured just before its rows (the CPU here is
        shared, so a floor measured earlier would not compare)."""
        gemms = {"logits": lambda: hidden @ weight.T}
        if mode == "fwd+bwd":
            grad_logits = torch.randn(n, v, device=device, generator=torch.Generator(device).manual_seed(1)).to(dtype)
            gemms.update({"grad_hidden": lambda: grad_logits @ weight, "grad_weight": lambda: grad_logits.T @ hidden})
        gemm_ms = {name: median_ms(fn, device, reps=reps) for name, fn in gemms.items()}
        print(f"{shape} {mode}: GEMM medians (ms): " + ", ".join(f"{k} {ms:.4g}" for k, ms in gemm_ms.items())
              + f"; logits GEMM {gemm_flops / (gemm_ms['logits'] * 1e-3) / 1e12:.3g} TFLOP/s", flush=True)
        if mode == "fwd":
            return [("floor: logits GEMM", gemm_ms["logits"], 1)]
        three = sum(gemm_ms.values())
        return [("floor: 3 GEMMs (logits, grad_h, grad_W)", three, 3),
                ("4 GEMMs (3 + logits again: recompute floor)", three + gemm_ms["logits"], 4)]

    rows = []
    for mode in ("fwd+bwd",) if args.quick else ("fwd", "fwd+bwd"):  # quick: a smoke run (the test suite's)
        floors = floor_rows(mode)
        floor_ms = floors[0][1]
        for name, ms, count in floors:
            rows.append({"shape": shape, "mode": mode, "impl": name, "median ms": ms, "peak extra MiB": None,
                         "x floor": ms / floor_ms, "TFLOP/s": count * gemm_flops / (ms * 1e-3) / 1e12})
        results = {}
        for name, fn in implementations(device, mode).items():
            run = runner(fn, mode, *inputs)
            ms = median_ms(run, device, reps=reps)
            mib = peak_extra_mib(run, device) if device.type == "cuda" else memory_mib(args, device, name, mode,
                                                                                         f"{n},{h},{v}")
            results[name] = (ms, mib)
            rows.append({"shape": shape, "mode": mode, "impl": name, "median ms": ms, "peak extra MiB": mib})
            print(f"  {mode} {name}: {ms:.4g} ms, {mib} MiB ({time.perf_counter() - started:.0f} s so far)",
                  flush=True)
        eager_ms, eager_mib = results["eager"]
        compiled_ms = results["torch.compile(eager)"][0]
        counted = gemm_flops * (1 if mode == "fwd" else 4)
        for row in rows:
            if row["mode"] != mode:
                continue
            if not row["impl"].startswith(("floor", "4 GEMMs")):
                row["vs eager"] = eager_ms / row["median ms"]
                row["vs compile"] = compiled_ms / row["median ms"]
                row["x floor"] = row["median ms"] / floor_ms
                row["mem / eager"] = row["peak extra MiB"] / eager_mib if eager_mib else None
                row["TFLOP/s"] = counted / (row["median ms"] * 1e-3) / 1e12
            if peak is not None:
                row["of peak"] = row["TFLOP/s"] * 1e12 / peak
    report("linear_logprobs: log-probs from hidden states and the lm_head weight", rows, args, device)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
