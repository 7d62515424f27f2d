"""Data-parallel scaling of the trainers: samples/s and peak memory per rank for 1 and N processes (gloo on CPU,
NCCL on GPUs) on the embedded default, DDP and FSDP2.

    python benchmarks/bench_scaling.py [--procs 1,2] [--stages sft,ppo] [--steps 5] [--quick] [--json out.json]

Weak scaling, as the trainers define it: the batch per rank is fixed (SFT 64 rows, PPO 64 prompts; ``--quick`` 8),
so N ranks process N times the samples per step; efficiency = (samples/s with N ranks) / (N x samples/s with 1).
Each configuration runs in fresh processes forked from this one (which has only imported the libraries), one per
rank with one intra-op thread each (``--threads``), joined through a file rendezvous. Step time is the
median over ``--steps`` steps after one warm-up step, of the slowest rank. Peak memory per rank: the process's peak
resident set (CPU; it includes the ~0.5 GiB of imported libraries) and the peak extra resident set during the timed
steps, or the peak allocated CUDA memory on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import rss_kib  # noqa: E402


def _build(path: str, quick: bool) -> str:
    from rlhf_fast.data.embedded import save_tiny_default
    from rlhf_fast.models import ScalarHeadModel

    kwargs = {"hidden_size": 64, "intermediate_size": 128} if quick else {}
    save_tiny_default(f"{path}/policy", **kwargs)
    ScalarHeadModel.from_pretrained(f"{path}/policy").save_pretrained(f"{path}/rm")
    return path


def _sft_steps(args, device, path: str):
    from rlhf_fast.data import sft_batch, task
    from rlhf_fast.models import load_causal_lm, load_tokenizer
    from rlhf_fast.train import distributed
    from rlhf_fast.train.sft import sft_loss

    tok = load_tokenizer(f"{path}/policy")
    model = distributed.wrap(load_causal_lm(f"{path}/policy", device), fsdp=args.mode == "fsdp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = task.sft_examples(args.batch * distributed.world_size() * (args.steps + 1), seed=0)
    G = args.batch * distributed.world_size()

    def step(i: int) -> int:
        idx = distributed.shard(list(range(i * G, (i + 1) * G)))
        batch = sft_batch(tok, [rows[j] for j in idx], 128).to(device)
        loss = model(sft_loss, batch, distributed.global_weights(batch.mask))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return len(idx)

    return step


def _ppo_steps(args, device, path: str):
    from rlhf_fast.train.ppo import PPOConfig, PPOTrainer

    cfg = PPOConfig(model=f"{path}/policy", reward_models=[f"{path}/rm"], out=f"{path}/ppo", batch_size=args.batch,
                    minibatch_size=args.batch // 2, max_new_tokens=args.max_new_tokens, eval_prompts=0,
                    progress=False, threads=args.threads, fsdp=args.mode == "fsdp", device=device.type)
    trainer = PPOTrainer(cfg)

    def step(i: int) -> int:
        batch, _ = trainer.score(*trainer.rollout(trainer.prompts(i)))
        trainer.learn(batch)
        return batch.num_seqs

    return step


def _rank(local_rank: int, args, world: int, path: str) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    from rlhf_fast.train import distributed

    if world > 1:  # a file rendezvous (no port to race for); distributed.setup then finds the group joined
        if args.device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl" if args.device == "cuda" else "gloo",
                                init_method=f"file://{path}/rendezvous", rank=local_rank, world_size=world,
                                timeout=datetime.timedelta(minutes=5))
    device = distributed.setup(args.device)
    torch.manual_seed(0)
    step = (_sft_steps if args.stage == "sft" else _ppo_steps)(args, device, path)
    step(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM)
        base = rss_kib("VmRSS") * 1024
    times, samples = [], 0
    for i in range(1, args.steps + 1):
        distributed.barrier()
        t0 = time.perf_counter()
        samples += step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(distributed.reduce_floats({"t": time.perf_counter() - t0}, "max")["t"])
    if device.type == "cuda":
        peak, extra = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_allocated(device) - base
    else:
        peak, extra = rss_kib("VmHWM") * 1024, rss_kib("VmHWM") * 1024 - base
    rows = distributed.all_gather_object({"samples": samples, "peak": peak, "extra": extra})
    if distributed.is_main():
        out = {"step_s": statistics.median(times), "samples_per_step": sum(r["samples"] for r in rows) / args.steps,
               "peak_mib": max(r["peak"] for r in rows) / 2**20, "extra_mib": max(r["extra"] for r in rows) / 2**20}
        with open(f"{path}/result.json", "w") as f:
            json.dump(out, f)
    del step  # the models (and DDP's reducer, which holds the process group) go before the group
    distributed.shutdown()


def run(args, stage: str, world: int, mode: str, models: str) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(f"{models}/policy", f"{tmp}/policy")
        os.symlink(f"{models}/rm", f"{tmp}/rm")
        a = argparse.Namespace(**{**vars(args), "stage": stage, "mode": mode})
        mp.start_processes(_rank, args=(a, world, tmp), nprocs=world, start_method="fork")
        with open(f"{tmp}/result.json") as f:
            r = json.load(f)
    return {"stage": stage, "procs": world, "mode": mode if world > 1 else "-", "batch/rank": args.batch,
            "s/step": r["step_s"], "samples/s": r["samples_per_step"] / r["step_s"], "peak MiB/rank": r["peak_mib"],
            "extra MiB/rank": r["extra_mib"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", default="1,2", help="comma-separated world sizes")
    p.add_argument("--stages", default="sft,ppo")
    p.add_argument("--modes", default="ddp,fsdp", help="for more than one process")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64, help="rows (SFT) or prompts (PPO) per rank and step")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (one GPU per rank, NCCL)")
    p.add_argument("--quick", action="store_true", help="smaller model, 8 per rank, 1 step, DDP: a smoke run")
    p.add_argument("--reps", type=int, help="alias of --steps (the benchmark runner's flag)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    if args.reps:
        args.steps = args.reps
    if args.quick:
        args.batch, args.steps, args.max_new_tokens, args.modes = 8, 1, 4, "ddp"
    import transformers

    import rlhf_fast.train.ppo  # noqa: F401 (imported once here: the forked ranks start with it)

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    torch.set_num_threads(1)  # no OpenMP thread team in this process before it forks the ranks

    rows = []
    with tempfile.TemporaryDirectory() as models:
        _build(models, args.quick)
        for stage in args.stages.split(","):
            for world in (int(w) for w in args.procs.split(",")):
                for mode in (args.modes.split(",") if world > 1 else ["ddp"]):
                    rows.append(run(args, stage, world, mode, models))
    for r in rows:
        one = next(b for b in rows if b["stage"] == r["stage"] and b["procs"] == 1)
        r["efficiency"] = r["samples/s"] / (r["procs"] * one["samples/s"])
    from tabulate import tabulate

    model = "tiny Llama 2 x 64 (--quick)" if args.quick else "tiny Llama 2 x 192 (embedded default)"
    print(f"Data-parallel scaling, {model}, {args.device}, {args.threads} thread(s) per rank, {os.cpu_count()} "
          f"cores; median of {args.steps} step(s); PPO step = generate + score + learn")
    print(tabulate(rows, headers="keys", floatfmt=".3g"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
