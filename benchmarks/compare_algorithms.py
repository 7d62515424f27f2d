"""PPO, GRPO, DPO and rejection sampling on the embedded task, from the same SFT policy and reward model, at equal
budgets, over several seeds: one table and one PNG.

    python benchmarks/compare_algorithms.py [--seeds 0,1,2] [--algos ppo,grpo,dpo,rs] [--out runs/compare]

Budgets: the online methods sample the same number of responses (PPO 60 iterations x 64 prompts; GRPO 60 x 16
prompts x 4; rejection sampling 3 rounds x 160 prompts x 8 = 3840 each); DPO trains on the preference pairs the
reward model learns from (its defaults). Per seed, SFT and the RM train once (``rlhf-fast pipeline`` with --resume
skips finished stages) and every algorithm starts from them.

Every policy is evaluated the same way: the true score (the task's rule) and the KL to the SFT policy, both on 256
held-out prompts sampled at T=1; the KL is the mean over responses of sum_t (log pi(y_t) - log pi_SFT(y_t)).
Wall time is the aligning stage's own (SFT and RM excluded).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

BUDGETS = {
    "ppo": [],
    "grpo": ["ppo.batch_size=16", "ppo.group_size=4", "ppo.kl_kind=k3"],
    "dpo": [],
    "rs": ["rs.rounds=3", "rs.prompts_per_round=160", "rs.num_samples=8"],
}


@torch.no_grad()
def evaluate(policy_dir: str, sft_dir: str, seed: int, prompts: int = 256, max_new_tokens: int = 10, top_k: int = 0,
             top_p: float = 1.0) -> dict:
    """True score and KL to the SFT policy of ``policy_dir``'s T=1 samples (filtered by top_k / top_p) on held-out
    prompts."""
    from rlhf_fast import generate
    from rlhf_fast.batch import TokenBatch
    from rlhf_fast.data import prompt_batch, task
    from rlhf_fast.models import load_causal_lm, load_tokenizer, sequence_logprobs
    from rlhf_fast.train.common import decode_responses

    tok = load_tokenizer(policy_dir)
    policy, sft = load_causal_lm(policy_dir).eval(), load_causal_lm(sft_dir).eval()
    rows = task.prompts(prompts, seed=10_000 + seed)
    batch = prompt_batch(tok, rows, 64)
    out = generate(policy, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens, top_k=top_k,
                   top_p=top_p, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(seed))
    texts = decode_responses(tok, out.sequences, out.response_mask, batch["input_ids"].shape[1])
    packed = TokenBatch.from_generation(out.sequences, batch["attention_mask"], out.response_mask)
    diff = sequence_logprobs(policy, packed) - sequence_logprobs(sft, packed)
    kl = torch.zeros(packed.num_seqs).index_add_(0, packed.seq_ids, diff * packed.mask)
    return {"true_score": statistics.fmean(task.true_score(r["prompt"], t) for r, t in zip(rows, texts)),
            "kl_to_sft": kl.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algos", default="ppo,grpo,dpo,rs")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value",
                        help="pipeline overrides for every run (e.g. a quick smoke run)")
    args = parser.parse_args()

    import transformers

    from rlhf_fast.train import common
    from rlhf_fast.train.pipeline import PipelineConfig, run_pipeline

    transformers.logging.set_verbosity_error()
    seeds, algos = [int(s) for s in args.seeds.split(",")], args.algos.split(",")
    results = []  # (seed, algo, metrics)
    for seed in seeds:
        root = os.path.join(args.out, f"seed{seed}")
        sft_dir = os.path.join(root, "sft", "model")
        for algo in algos:
            cfg = common.load_config(PipelineConfig, None, [f"out={root}", f"seed={seed}", f"algo={algo}",
                                                            "progress=false", *BUDGETS[algo], *args.set])
            run_pipeline(cfg, resume=True)
            stage = os.path.join(root, algo)  # config.yaml is written as the stage starts, summary.json at its end
            wall = os.path.getmtime(f"{stage}/summary.json") - os.path.getmtime(f"{stage}/config.yaml")
            results.append((seed, algo, {**evaluate(os.path.join(root, algo, "model"), sft_dir, seed),
                                         "wall_s": wall}))
        results.append((seed, "sft", {**evaluate(sft_dir, sft_dir, seed), "wall_s": float("nan")}))

    lines = [f"# benchmarks/compare_algorithms.py --seeds {args.seeds} --algos {args.algos}",
             "# true score and KL to SFT on 256 held-out prompts at T=1; wall: the aligning stage alone",
             f"{'algo':6s} " + "  ".join(f"seed{s}: true   KL    wall" for s in seeds) + "   mean true  mean KL"]
    for algo in ["sft", *algos]:
        rows = [m for s in seeds for (s2, a, m) in results if s2 == s and a == algo]
        cells = "  ".join(f"{m['true_score']:.3f} {m['kl_to_sft']:5.2f} {m['wall_s']:5.0f}s" for m in rows)
        lines.append(f"{algo:6s} {cells}   {statistics.fmean(m['true_score'] for m in rows):.3f}      "
                     f"{statistics.fmean(m['kl_to_sft'] for m in rows):.2f}")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.txt"), "w") as f:
        f.write(table + "\n")
    plot(results, ["sft", *algos], os.path.join(args.out, "compare.png"))


def plot(results, algos, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, (key, title) in enumerate((("true_score", "true score (the rule)"), ("kl_to_sft", "KL to the SFT policy"),
                                      ("wall_s", "wall time of the stage (s)"))):
        for j, algo in enumerate(algos):
            values = [m[key] for (_, a, m) in results if a == algo]
            axes[i].scatter([j] * len(values), values, color=f"C{j}", alpha=0.8)
            axes[i].bar(j, statistics.fmean(values), color=f"C{j}", alpha=0.3)
        axes[i].set_xticks(range(len(algos)), algos)
        axes[i].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
