"""Log-probs of chosen tokens from logits [B, T, V]: rlhf_fast backends vs eager, TRL-style and torch.compile.

python benchmarks/bench_logprobs.py [--device cpu|cuda] [--quick] [--json out.json]

Rows, forward and forward+backward: eager `log_softmax(logits.float())` + `gather`; the row loop of TRL's
`selective_log_softmax` (written from its published formula; TRL's own function too when trl is installed);
`torch.compile` of the eager path; every rlhf_fast backend usable on the device; and one `torch.exp(logits, out=buf)`
pass, the compute floor of anything that exponentiates every logit. On CUDA the last column is the fraction of HBM
bandwidth reached by reading the logits once (forward) or reading them and writing their gradient (fwd+bwd).
"""

from __future__ import annotations

import torch
from common import hbm_fraction, median_ms, parser, peak_extra_mib, report

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


def main():
    args = parser(__doc__).parse_args()
    device = torch.device(args.device)
    if args.quick:
        shapes = [((2, 16, 1000), torch.float32)]
    elif device.type == "cuda":
        shapes = [((8, 1024, 151936), torch.bfloat16), ((8, 512, 32000), torch.float32), ((8, 512, 32000), torch.bfloat16)]
    else:
        shapes = [((8, 512, 32000), torch.float32), ((8, 512, 32000), torch.bfloat16)]
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
