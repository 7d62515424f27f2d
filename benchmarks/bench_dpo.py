"""Seconds per DPO optimiser step and peak memory: rlhf_fast's ``DPOTrainer`` vs TRL's ``DPOTrainer`` on the same
random-init Llama (default V=32000, hidden 256, 2 layers), the same pairs (prompts of 64-128 tokens, responses of
64-128, so sequences up to ~256) and AdamW, fp32, with a live frozen reference and with precomputed reference
log-probs (TRL ``precompute_ref_log_probs=True``; ours ``ref_logps=precompute``), where the one-off pass is not
timed.

    python benchmarks/bench_dpo.py [--pairs 4] [--steps 3] [--reps 2] [--vocab 32000] [--hidden 256] [--quick]
                                   [--json out.json]

Method. Each (implementation, repetition) runs in its own fresh subprocess, the implementations interleaved
within every repetition; a worker builds its trainer, runs one warm-up step (which also allocates AdamW's state),
then ``--steps`` timed steps. Step time: the median over all timed steps of all repetitions, in wall time and in
process CPU time (all threads: on a machine shared with other jobs the CPU time is the steadier of the two).
Memory: glibc is made to mmap every allocation of 64 KiB or more (MALLOC_MMAP_THRESHOLD_, fixed, so freed tensors
go back to the OS) and trimmed before the timed steps; "step peak" is the peak resident set during the timed steps
(VmHWM, reset through /proc/self/clear_refs) minus the resident set before them, i.e. what a step needs beyond the
models and optimizer state (gradients are freed between steps, so they count); "peak RSS" is the process's whole
peak over the timed steps. Both implementations
run the lm_head without [B, T, V] logits (TRL 1.16's chunked fused head scores every padded position on CPU; ours
scores the response tokens of packed sequences only).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

IMPLS = ("trl, live ref", "rlhf_fast, live ref", "trl, precomputed ref", "rlhf_fast, precomputed ref")


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _setup(root: str, args) -> None:
    from rlhf_fast.data.embedded import build_tokenizer
    from rlhf_fast.models import build_tiny_model

    tok = build_tokenizer(args.vocab)
    model = build_tiny_model(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                             intermediate_size=4 * args.hidden, max_positions=2 * args.max_len, seed=0)
    model.save_pretrained(f"{root}/model")
    tok.save_pretrained(f"{root}/model")
    rng = random.Random(0)
    words = [f"<reserved_{i}>" for i in range(args.vocab - 64)]
    lo, hi = args.max_len // 4, args.max_len // 2
    text = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    rows = [{"prompt": text(), "chosen": text(), "rejected": text()} for _ in range(args.pairs * (args.steps + 2))]
    with open(f"{root}/ours.jsonl", "w") as f:  # our pair_batch appends EOS
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(f"{root}/trl.jsonl", "w") as f:  # TRL concatenates prompt + completion text and appends EOS as text
        eos = tok.eos_token
        f.writelines(json.dumps({"prompt": r["prompt"], "chosen": f" {r['chosen']} {eos}",
                                 "rejected": f" {r['rejected']} {eos}"}) + "\n" for r in rows)


def _trl_step_fn(root: str, args, precompute: bool):
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{root}/model")
    load = lambda: AutoModelForCausalLM.from_pretrained(f"{root}/model", dtype=torch.float32)  # noqa: E731
    cfg = trl.DPOConfig(output_dir=f"{root}/trl_out", report_to="none", per_device_train_batch_size=args.pairs,
                        learning_rate=1e-5, use_cpu=True, bf16=False, max_length=None, seed=0,
                        precompute_ref_log_probs=precompute, dataloader_num_workers=0, disable_tqdm=True)
    data = datasets.Dataset.from_json(f"{root}/trl.jsonl")
    trainer = trl.DPOTrainer(model=load(), ref_model=None if precompute else load(), args=cfg,
                             processing_class=tok, train_dataset=data)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train() sets before its first training_step
    batches = iter(trainer.get_train_dataloader())
    trainer.model.train()

    def step():
        trainer.training_step(trainer.model, next(batches))  # forward, loss, backward
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return step


def _our_step_fn(root: str, args, precompute: bool):
    from rlhf_fast.train import common
    from rlhf_fast.train.dpo import DPOConfig, DPOTrainer

    cfg = DPOConfig(model=f"{root}/model", data=f"{root}/ours.jsonl", out=f"{root}/ours_out_{os.getpid()}",
                    batch_size=args.pairs, lr=1e-5, max_len=2 * args.max_len, progress=False, eval_prompts=0,
                    threads=args.threads, ref_logps="precompute" if precompute else "live")
    ctx = common.run_context(cfg)
    ctx.__enter__()
    trainer = DPOTrainer(cfg)

    def step():
        trainer.train_step()
        trainer.step += 1
    return step


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precompute = "precomputed" in args.worker
    make = _trl_step_fn if args.worker.startswith("trl") else _our_step_fn
    step = make(args.root, args, precompute)
    step()  # warm-up: also allocates the optimizer state
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kib("VmRSS")
    times, cpu = [], []
    for _ in range(args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    hwm = _kib("VmHWM")
    print(json.dumps({"times": times, "cpu": cpu, "step_peak_mib": (hwm - before) / 1024, "peak_rss_mib": hwm / 1024,
                      "before_mib": before / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks that the script works")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.max_len, args.steps, args.reps = 1000, 64, 32, 2, 1
    if args.worker:
        return worker(args)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore",
           "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    results = {name: [] for name in IMPLS}
    with tempfile.TemporaryDirectory() as root:
        _setup(root, args)
        for rep in range(args.reps):
            for name in IMPLS:  # interleaved: every repetition runs each implementation once
                cmd = [sys.executable, __file__, "--worker", name, "--root", root, *sys.argv[1:]]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"rep {rep} {name}: {results[name][-1]}", file=sys.stderr)
    rows = []
    for name in IMPLS:
        runs = results[name]
        rows.append({"impl": name, "s/step": statistics.median(t for r in runs for t in r["times"]),
                     "cpu s/step": statistics.median(t for r in runs for t in r["cpu"]),
                     "step peak MiB": statistics.median(r["step_peak_mib"] for r in runs),
                     "peak RSS MiB": statistics.median(r["peak_rss_mib"] for r in runs)})
    for row in rows:
        trl_row = rows[0] if "live" in row["impl"] else rows[2]
        row["x faster than trl"] = trl_row["s/step"] / row["s/step"]
        row["x less cpu than trl"] = trl_row["cpu s/step"] / row["cpu s/step"]
        row["step peak / trl"] = row["step peak MiB"] / max(trl_row["step peak MiB"], 1e-9)
        row["peak RSS / trl"] = row["peak RSS MiB"] / trl_row["peak RSS MiB"]
    import torch
    from tabulate import tabulate

    title = (f"DPO step, random-init Llama V={args.vocab} hidden {args.hidden} x {args.layers} layers, {args.pairs} "
             f"pairs, prompts and responses {args.max_len // 4}-{args.max_len // 2} tokens, fp32, "
             f"{args.threads} threads, torch {torch.__version__}; medians of {args.reps} interleaved runs x "
             f"{args.steps} steps")
    print(title)
    print(tabulate(rows, headers="keys", floatfmt=".3g", tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
