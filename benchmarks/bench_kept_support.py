"""Rollout-trainer agreement under top-k / top-p sampling: sample with ``rlhf_fast.generate`` (T=1, top_k=50,
top_p=0.8 by default), recompute the trainer's log-probs of the sampled tokens on the packed batch
(``rlhf_fast.models.sequence_logprobs``) over the full softmax and over the sampler's kept set, and compare each with
the behaviour log-probs (the kept set's, which the tokens were drawn from): the ratio of a fully on-policy first
minibatch, its spread, the fraction outside [0.9, 1.1] and the k3 mismatch. Then the price of the kept set: forward +
backward of the trainer's log-probs with and without the threshold (medians, ratio).

    python benchmarks/bench_kept_support.py [--prompts 64] [--max-new-tokens 32] [--top-k 50] [--top-p 0.8]

Models: the embedded default (V=8192; prompts of its 19 words) and a random-init Llama with V=32000.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import rlhf_fast
from rlhf_fast.batch import TokenBatch
from rlhf_fast.models import load_causal_lm, sequence_logprobs

sys.path.insert(0, str(Path(__file__).parent))
from common import median_ms, parser, report  # noqa: E402


def _models(tmp: str, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_fast.data.embedded import save_tiny_default

    yield "embedded default (V=8192)", load_causal_lm(save_tiny_default(f"{tmp}/tiny", seed=0)).eval(), 19
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64 if quick else 256, intermediate_size=128 if quick else 512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    yield "random-init Llama (V=32000)", LlamaForCausalLM(cfg).eval(), 32000


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.8)
    args = p.parse_args()
    device = torch.device("cpu")  # generate + the trainer's log-probs; the ops' GPU cost is in bench_logprobs
    B, N = (4, 4) if args.quick else (args.prompts, args.max_new_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, words in _models(tmp, args.quick):
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(3, words, (B, args.prompt_len), generator=gen)
            mask = torch.ones_like(ids)
            out = rlhf_fast.generate(model, ids, mask, max_new_tokens=N, temperature=1.0, top_k=args.top_k,
                                     top_p=args.top_p, eos_token_id=None, pad_token_id=0, generator=gen)
            batch = TokenBatch.from_generation(out.sequences, mask, out.response_mask,
                                               behaviour_logp=out.filtered_logprobs,
                                               kept_threshold=out.kept_threshold)
            full_ms = None
            for support, threshold in (("full", None), ("kept", batch.kept_threshold)):
                with torch.no_grad():
                    logp = sequence_logprobs(model, batch, kept_threshold=threshold)
                m = rlhf_fast.mismatch_metrics(logp, batch.behaviour_logp, batch.mask)

                def step():
                    model.zero_grad(set_to_none=True)
                    sequence_logprobs(model, batch, kept_threshold=threshold).sum().backward()

                ms = median_ms(step, device, reps=args.reps)
                full_ms = full_ms or ms
                rows.append({"model": name, "support": support, "ratio mean": m["mismatch_ratio_mean"].item(),
                             "ratio std": m["mismatch_ratio_std"].item(),
                             "outside [0.9, 1.1]": m["mismatch_outside_frac"].item(), "k3": m["mismatch_k3"].item(),
                             "fwd+bwd ms": ms, "x full": ms / full_ms})
    report(f"First-minibatch ratio to the behaviour policy, T=1, top_k={args.top_k}, top_p={args.top_p}, {B} prompts "
           f"x {N} tokens", rows, args, device)


if __name__ == "__main__":
    main()
