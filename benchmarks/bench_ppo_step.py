"""Seconds per PPO iteration (generate / score / learn) and peak memory, in two cases:

* ``--case embedded`` (default): the embedded default, fused ops (the automatic backend: C++ on CPU, Triton/CUDA on
  GPU) vs ``--backend torch`` (the plain-PyTorch references), for several vocabulary sizes;
* ``--case llama``: a GRPO iteration (``--algo``, ``--batch-size`` prompts x ``--group-size`` samples,
  ``--max-new-tokens``) of a random-init Llama built here (``--llama hidden,layers,intermediate,heads``; default
  256,4,1024,4: 20.6 M parameters at V=32000), the rollout from ``rlhf_fast.generate`` with its static cache
  (shared prefill) vs its dynamic-cache path (``generate_cache=dynamic``, what the trainer used before the static
  path), e.g. ``--llama 512,8,1344,8 --max-new-tokens 128`` for bench_generate's config (b); also the learn
  phase's seconds inside matrix products (one more, profiled learn), the floor below which only fewer or faster
  GEMMs can take it;
* ``--case mixed``: the learn phase (policy and critic forward + backward over every minibatch) on a rollout of
  mixed lengths (prompts 8-256 tokens, responses 4-128), the trainer's packed batches vs the same computation on
  padded [S, L] rows with an attention mask: tokens/s and peak memory.

    python benchmarks/bench_ppo_step.py [--case embedded|mixed|llama] [--iterations 5] [--vocab-sizes 0,19,32000]
                                        [--llama 256,4,1024,4] [--algo grpo] [--group-size 4] [--quick]
                                        [--json out.json]

Each configuration runs in its own subprocess so its peak memory (max RSS on CPU, max allocated on CUDA) is its
own. Vocabulary 0 is the embedded default (8192 words: the task's 19 and reserved ones, see data/embedded.py); 19 is
the task's words alone, where the model's two layers are ~96 % of the step and no op can speed it up much; 32000 is
a Llama-2-sized vocabulary on the same layers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _models(tmp: str, vocab_size: int, llama: str = "") -> tuple[str, str]:
    from rlhf_fast.data.embedded import DEFAULT_VOCAB_SIZE, build_tokenizer
    from rlhf_fast.models import ScalarHeadModel, build_tiny_model

    tok = build_tokenizer(vocab_size or DEFAULT_VOCAB_SIZE)
    shape = dict(zip(("hidden_size", "num_layers", "intermediate_size", "num_heads"),
                     map(int, llama.split(",")))) if llama else {}
    build_tiny_model(tok, seed=0, **shape).save_pretrained(f"{tmp}/policy")
    tok.save_pretrained(f"{tmp}/policy")
    ScalarHeadModel.from_pretrained(f"{tmp}/policy").save_pretrained(f"{tmp}/rm")
    return f"{tmp}/policy", f"{tmp}/rm"


def _peak(device) -> int:
    import torch

    return (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def embedded_worker(args) -> dict:
    import torch

    import rlhf_fast
    from rlhf_fast.train.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        policy, rm = _models(tmp, args.vocab_size, args.llama if args.case == "llama" else "")
        cfg = PPOConfig(model=policy, reward_models=[rm], out=f"{tmp}/out", batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, eval_prompts=0, progress=False, threads=args.threads,
                        backend=None if args.backend == "auto" else args.backend, algo=args.algo,
                        group_size=args.group_size, generate_cache=args.generate_cache)
        with rlhf_fast.use_backend(args.backend) if args.backend != "auto" else contextlib.nullcontext():
            trainer = PPOTrainer(cfg)
            times = {"generate": [], "score": [], "learn": [], "total": []}
            for it in range(args.iterations + 1):  # iteration 0 warms up
                t0 = time.perf_counter()
                rollout = trainer.rollout(trainer.prompts(it))
                t1 = time.perf_counter()
                batch, _ = trainer.score(*rollout)
                t2 = time.perf_counter()
                trainer.learn(batch)
                t3 = time.perf_counter()
                if it:
                    for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                        times[k].append(v)
            peak = _peak(trainer.device)
            gemm = learn_gemm_time(trainer, batch) if args.case == "llama" else {}
    n_params = sum(p.numel() for p in trainer.policy.module.parameters())
    return {"backend": args.backend, "generate_cache": args.generate_cache, "params": n_params,
            **{k: statistics.median(v) for k, v in times.items()}, "peak_bytes": peak, **gemm}


GEMM_OPS = {"aten::mm": 0, "aten::bmm": 0, "aten::addmm": 1, "aten::addmm_": 1, "aten::baddbmm": 1}  # -> first factor


def learn_gemm_time(trainer, batch) -> dict:
    """One more (profiled) learn on ``batch``: the seconds spent inside matrix products and their GFLOP (from the
    recorded shapes: the profiler counts none for the in-place ``addmm_``), i.e. the floor that no change outside the
    GEMMs can go below."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        trainer.learn(batch)
    seconds = flops = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in GEMM_OPS:
            a, b = e.input_shapes[GEMM_OPS[e.key]:][:2]  # [..., M, K] x [..., K, N]
            batch_size = a[0] if len(a) == 3 else 1
            flops += 2 * batch_size * a[-2] * a[-1] * b[-1] * e.count
            seconds += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6
    return {"learn_gemm": seconds, "learn_gflop": flops / 1e9}


def padded_hidden(body, batch):
    """The padded baseline of ``rlhf_fast.models.decoder_hidden``: one right-padded row per sequence with an
    attention mask."""
    import torch

    ids = batch.padded(batch.input_ids)
    hidden = body(input_ids=ids, attention_mask=batch.padded(torch.ones_like(batch.input_ids)),
                  position_ids=batch.padded(batch.position_ids), use_cache=False).last_hidden_state
    return batch.unpadded(hidden)


def mixed_rollout(n_seqs: int, vocab: int, seed: int = 0):
    """A rollout of mixed lengths (prompts 8-256, responses 4-128 tokens; log-uniform, so most are short and a few
    long, as real responses are) with every per-token tensor the learn phase reads."""
    import torch

    from rlhf_fast.batch import TokenBatch

    g = torch.Generator().manual_seed(seed)
    log_uniform = lambda lo, hi: int(torch.exp(torch.empty(1).uniform_(  # noqa: E731
        torch.log(torch.tensor(lo)).item(), torch.log(torch.tensor(hi + 1)).item(), generator=g)))
    prompts, seqs = [], []
    for _ in range(n_seqs):
        p, r = log_uniform(8, 256), log_uniform(4, 128)
        seqs.append(torch.randint(30, vocab, (p + r,), generator=g).tolist())
        prompts.append(p)
    batch = TokenBatch.pack(seqs, prompts)
    m = batch.mask.float()
    for name in ("old_logp", "ref_logp", "values", "returns"):
        setattr(batch, name, torch.randn(batch.num_tokens, generator=g) * m)
    batch.old_logp = batch.old_logp.abs().neg() - 9.0 * m
    batch.advantages = torch.randn(batch.num_tokens, generator=g) * m
    return batch


def mixed_worker(args) -> dict:
    import torch

    import rlhf_fast.models.logprobs as logprobs
    import rlhf_fast.models.value_head as value_head
    from rlhf_fast.train.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(args.threads)
    if args.layout == "padded":
        logprobs.decoder_hidden = value_head.decoder_hidden = padded_hidden
    with tempfile.TemporaryDirectory() as tmp:
        policy, rm = _models(tmp, args.vocab_size)
        cfg = PPOConfig(model=policy, reward_models=[rm], out=f"{tmp}/out", batch_size=args.batch_size,
                        minibatch_size=args.batch_size // 4, epochs=1, max_new_tokens=128, eval_prompts=0,
                        progress=False, threads=args.threads)
        trainer = PPOTrainer(cfg)
        batch = mixed_rollout(args.batch_size, len(trainer.tokenizer))
        times = []
        for it in range(args.iterations + 1):  # iteration 0 warms up
            t0 = time.perf_counter()
            trainer.learn(batch)
            if it:
                times.append(time.perf_counter() - t0)
        padded_tokens = batch.num_seqs * int(batch.seq_lens.max())
        peak = _peak(trainer.device)
    learn = statistics.median(times)
    return {"layout": args.layout, "learn": learn, "tokens": batch.num_tokens, "padded_tokens": padded_tokens,
            "tokens_per_s": batch.num_tokens / learn, "peak_bytes": peak}


def _run(args, **worker_args) -> dict:
    cmd = [sys.executable, __file__, "--iterations", str(args.iterations), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--case", args.case,
           "--llama", args.llama, "--algo", args.algo, "--group-size", str(args.group_size)]
    for k, v in worker_args.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=("embedded", "mixed", "llama"), default="embedded")
    parser.add_argument("--llama", default="256,4,1024,4", help="llama case: hidden,layers,intermediate,heads")
    parser.add_argument("--algo", default=None, help="ppo | grpo | dr_grpo | rloo (default: ppo; llama case: grpo)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--vocab-sizes", default="0,19,32000", help="comma-separated; 0 = the embedded default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 iteration of 8 prompts, embedded vocabulary: a smoke run")
    parser.add_argument("--reps", type=int, help="alias of --iterations (the benchmark runner's flag)")
    parser.add_argument("--vocab-size", type=int, default=0, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)  # worker mode (embedded)
    parser.add_argument("--layout", default=None, help=argparse.SUPPRESS)  # worker mode (mixed)
    parser.add_argument("--generate-cache", default="auto", help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if args.reps:
        args.iterations = args.reps
    args.algo = args.algo or ("grpo" if args.case == "llama" else "ppo")
    if args.quick:
        args.iterations, args.batch_size, args.max_new_tokens, args.vocab_sizes = 1, 8, 4, "0"
    if args.backend or args.layout:
        print(json.dumps(embedded_worker(args) if args.backend else mixed_worker(args)))
        return
    from tabulate import tabulate

    vocabs = [int(v) for v in args.vocab_sizes.split(",")]
    rows, table = [], []
    if args.case == "llama":
        for cache in ("dynamic", "static"):
            rows.append(_run(args, backend="auto", vocab_size=32000, generate_cache=cache))
        samples = 1 if args.algo == "ppo" else args.group_size
        for r in rows:
            table.append([r["generate_cache"], f"{r['generate']:.3f}", f"{r['score']:.3f}", f"{r['learn']:.3f}",
                          f"{r['learn_gemm']:.3f}", f"{r['learn_gflop'] / r['learn_gemm']:.0f}",
                          f"{r['total']:.3f}", f"{r['peak_bytes'] / 2**20:.0f}",
                          f"{rows[0]['generate'] / r['generate']:.2f}x", f"{rows[0]['total'] / r['total']:.2f}x"])
        print(f"{args.algo} iteration, random-init Llama (hidden, layers, intermediate, heads = {args.llama}; "
              f"{rows[0]['params'] / 1e6:.1f} M parameters, V=32000), {args.batch_size} prompts x {samples} "
              f"sample(s), {args.max_new_tokens} new tokens, {args.threads} thread(s); median of {args.iterations} "
              "iterations (s)")
        print("learn GEMMs: the seconds of one more (profiled) learn spent in matrix products, and their GFLOP/s")
        print(tabulate(table, headers=["generate cache", "generate", "score", "learn", "learn GEMMs", "GEMM GFLOP/s",
                                       "total", "peak MiB", "generate speed-up", "total speed-up"]))
    elif args.case == "mixed":
        for vocab in vocabs:
            for layout in ("padded", "packed"):
                rows.append({"vocab": vocab, **_run(args, layout=layout, vocab_size=vocab)})
        for r in rows:
            base = next(b for b in rows if b["vocab"] == r["vocab"] and b["layout"] == "padded")
            table.append([r["vocab"] or "8192 (embedded)", r["layout"], r["tokens"], r["padded_tokens"],
                          f"{r['learn']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_bytes'] / 2**20:.0f}",
                          f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"])
        print(f"PPO learn phase, tiny Llama (2 x 192), {args.batch_size} sequences of mixed length (prompts 8-256, "
              f"responses 4-128), 4 minibatches, policy + critic, {args.threads} thread(s); median of "
              f"{args.iterations} (s)")
        print(tabulate(table, headers=["vocab", "layout", "tokens", "padded tokens", "learn s", "tokens/s",
                                       "peak MiB", "vs padded"]))
    else:
        for vocab in vocabs:
            for backend in ("torch", "auto"):
                rows.append({"vocab": vocab, **_run(args, backend=backend, vocab_size=vocab)})
        for r in rows:
            base = next(b for b in rows if b["vocab"] == r["vocab"] and b["backend"] == "torch")
            table.append([r["vocab"] or "8192 (embedded)", "torch" if r["backend"] == "torch" else "fused",
                          f"{r['generate']:.3f}", f"{r['score']:.3f}", f"{r['learn']:.3f}", f"{r['total']:.3f}",
                          f"{r['peak_bytes'] / 2**20:.0f}", f"{base['total'] / r['total']:.2f}x"])
        print(f"PPO iteration, tiny Llama (2 x 192), batch {args.batch_size}, "
              f"{args.max_new_tokens} new tokens, {args.threads} thread(s); median of {args.iterations} iterations (s)")
        print(tabulate(table, headers=["vocab", "ops", "generate", "score", "learn", "total", "peak MiB", "speed-up"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
