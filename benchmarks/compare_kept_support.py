"""PPO (or GRPO) on the embedded task, sampling with top-p < 1: the trainer's log-probs over the full softmax
(``logprob_support=full``) against log-probs over the sampler's kept set (``kept``), from the same SFT policy and
reward model per seed, over several seeds. Evaluation as in compare_algorithms.py (true score and KL to the SFT
policy on 256 held-out prompts at T=1, unfiltered).

    python benchmarks/compare_kept_support.py [--seeds 0,1,2] [--algo ppo] [--top-p 0.8] [--top-k 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics

from compare_algorithms import BUDGETS, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--out", default="runs/compare_kept")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="pipeline overrides for every run")
    args = parser.parse_args()

    import transformers

    from rlhf_fast.train import common
    from rlhf_fast.train.pipeline import PipelineConfig, run_pipeline

    transformers.logging.set_verbosity_error()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}  # (seed, support) -> metrics
    for seed in seeds:
        shared = os.path.join(args.out, f"seed{seed}", "full")
        for support in ("full", "kept"):
            root = os.path.join(args.out, f"seed{seed}", support)
            os.makedirs(root, exist_ok=True)
            for stage in ("sft", "rm") if support != "full" else ():  # the same SFT policy and RM
                if not os.path.exists(os.path.join(root, stage)):
                    os.symlink(os.path.abspath(os.path.join(shared, stage)), os.path.join(root, stage))
            cfg = common.load_config(PipelineConfig, None, [
                f"out={root}", f"seed={seed}", f"algo={args.algo}", "progress=false", *BUDGETS[args.algo],
                f"ppo.top_p={args.top_p}", f"ppo.top_k={args.top_k}", f"ppo.logprob_support={support}", *args.set])
            run_pipeline(cfg, resume=True)
            stage = os.path.join(root, args.algo)
            metrics = common.read_metrics(os.path.join(stage, "metrics.jsonl"))
            policy, sft = os.path.join(stage, "model"), os.path.join(shared, "sft", "model")
            filtered = evaluate(policy, sft, seed, top_k=args.top_k, top_p=args.top_p)
            results[seed, support] = {**evaluate(policy, sft, seed), "true_filtered": filtered["true_score"],
                                      "ratio0": statistics.fmean(r["mismatch_ratio_mean"] for r in metrics),
                                      "outside0": statistics.fmean(r["mismatch_outside_frac"] for r in metrics)}

    lines = [f"# benchmarks/compare_kept_support.py --seeds {args.seeds} --algo {args.algo} --top-p {args.top_p} "
             f"--top-k {args.top_k}",
             "# true score and KL to SFT on 256 held-out prompts at T=1 (true: unfiltered, filt: with the training "
             "filters); ratio0 / outside0: the first minibatch's ratio to the behaviour policy and its fraction "
             "outside [0.9, 1.1], mean over iterations",
             f"{'support':8s} " + "  ".join(f"seed{s}: true  filt    KL" for s in seeds)
             + "   mean true  mean filt  mean KL  ratio0  outside0"]
    for support in ("full", "kept"):
        rows = [results[s, support] for s in seeds]
        cells = "  ".join(f"{m['true_score']:.3f} {m['true_filtered']:.3f} {m['kl_to_sft']:5.2f}" for m in rows)
        lines.append(f"{support:8s} {cells}   {statistics.fmean(m['true_score'] for m in rows):.3f}      "
                     f"{statistics.fmean(m['true_filtered'] for m in rows):.3f}      "
                     f"{statistics.fmean(m['kl_to_sft'] for m in rows):.2f}   "
                     f"{statistics.fmean(m['ratio0'] for m in rows):.4f}  "
                     f"{statistics.fmean(m['outside0'] for m in rows):.4f}")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "compare_kept.txt"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
