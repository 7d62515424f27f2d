"""Seconds per PPO iteration (generate / score / learn) and peak memory on the embedded default, fused ops (the
automatic backend: C++ on CPU, Triton/CUDA on GPU) vs ``--backend torch`` (the plain-PyTorch references).

    python benchmarks/bench_ppo_step.py [--iterations 5] [--vocab-sizes 0,19,32000] [--quick] [--json out.json]

Each (vocabulary, backend) runs in its own subprocess so its peak memory (max RSS on CPU, max allocated on CUDA) is
its own. Vocabulary 0 is the embedded default (8192 words: the task's 19 and reserved ones, see models/tiny.py);
19 is the task's words alone, where the model's two layers are ~96 % of the step and no op can speed it up much;
32000 is a Llama-2-sized vocabulary on the same layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def worker(args) -> dict:
    import torch

    import rlhf_fast
    from rlhf_fast.models.tiny import DEFAULT_VOCAB_SIZE, build_tiny_model, build_tokenizer
    from rlhf_fast.models.value_head import ScalarHeadModel
    from rlhf_fast.train.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(args.vocab_size or DEFAULT_VOCAB_SIZE)
        model = build_tiny_model(tok, seed=0)
        model.save_pretrained(f"{tmp}/policy")
        tok.save_pretrained(f"{tmp}/policy")
        ScalarHeadModel.from_pretrained(f"{tmp}/policy").save_pretrained(f"{tmp}/rm")
        cfg = PPOConfig(model=f"{tmp}/policy", reward_model=f"{tmp}/rm", out=f"{tmp}/out", batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, eval_prompts=0, progress=False, threads=args.threads,
                        backend=None if args.backend == "auto" else args.backend)
        with rlhf_fast.use_backend(args.backend) if args.backend != "auto" else _null():
            trainer = PPOTrainer(cfg)
            times = {"generate": [], "score": [], "learn": [], "total": []}
            for it in range(args.iterations + 1):  # iteration 0 warms up
                t0 = time.perf_counter()
                res, plen = trainer.rollout(trainer.prompts(it))
                t1 = time.perf_counter()
                ro, _ = trainer.score(res, plen)
                t2 = time.perf_counter()
                trainer.learn(ro, plen)
                t3 = time.perf_counter()
                if it:
                    for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                        times[k].append(v)
        device = trainer.device
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"backend": args.backend, **{k: statistics.median(v) for k, v in times.items()}, "peak_bytes": peak}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--vocab-sizes", default="0,19,32000", help="comma-separated; 0 = the embedded default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 iteration of 8 prompts, embedded vocabulary: a smoke run")
    parser.add_argument("--reps", type=int, help="alias of --iterations (the benchmark runner's flag)")
    parser.add_argument("--vocab-size", type=int, default=0, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.reps:
        args.iterations = args.reps
    if args.quick:
        args.iterations, args.batch_size, args.max_new_tokens, args.vocab_sizes = 1, 8, 4, "0"
    if args.backend:
        print(json.dumps(worker(args)))
        return

    rows = []
    for vocab in [int(v) for v in args.vocab_sizes.split(",")]:
        for backend in ("torch", "auto"):
            cmd = [sys.executable, __file__, "--backend", backend, "--iterations", str(args.iterations),
                   "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
                   "--vocab-size", str(vocab), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout
            rows.append({"vocab": vocab, **json.loads(out.strip().splitlines()[-1])})
    from tabulate import tabulate

    from rlhf_fast.models.tiny import DEFAULT_VOCAB_SIZE

    table = []
    for r in rows:
        base = next(b for b in rows if b["vocab"] == r["vocab"] and b["backend"] == "torch")
        table.append([r["vocab"] or f"{DEFAULT_VOCAB_SIZE} (embedded)", "torch" if r["backend"] == "torch" else "fused",
                      f"{r['generate']:.3f}",
                      f"{r['score']:.3f}", f"{r['learn']:.3f}", f"{r['total']:.3f}",
                      f"{r['peak_bytes'] / 2**20:.0f}", f"{base['total'] / r['total']:.2f}x"])
    print(f"PPO iteration, tiny Llama (2 x 192), batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, {args.threads} thread(s); median of {args.iterations} iterations (s)")
    print(tabulate(table, headers=["vocab", "ops", "generate", "score", "learn", "total", "peak MiB", "speed-up"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
