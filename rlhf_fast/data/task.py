"""The embedded synthetic task: "count by k".

Prompt ``"+k s ="`` (k in 1..4, s a digit). The ideal response is RESPONSE_LEN digits starting at s, each one k more
(mod 10) than the previous one: ``"+3 7 ="`` -> ``"7 0 3 6 9 2 5 8"``.

True score (the rule, in [0, 1]): over the first RESPONSE_LEN tokens, count token 0 correct when it equals s and
token i > 0 correct when both it and token i-1 are digits and it is token i-1 + k (mod 10) — a slip costs one step,
not the rest of the sequence; divide by max(RESPONSE_LEN, response length), so stopping early or rambling on costs.

"Humans": the SFT demonstrator is mediocre (each digit replaced by a random one with probability ``noise``, and the
length is wrong 20% of the time); preference pairs are two demonstrator responses of random quality, labelled by a
Bradley–Terry draw on the true scores, P(a preferred) = sigmoid((score_a - score_b) / PREF_TEMPERATURE). So the reward
model must discover the rule from noisy comparisons, and PPO can push the policy past its demonstrations.
Everything is deterministic given the seed.
"""

from __future__ import annotations

import math
import random

RESPONSE_LEN = 8
STEPS = (1, 2, 3, 4)
VOCAB = tuple(str(d) for d in range(10)) + tuple(f"+{k}" for k in STEPS) + ("=",)
PREF_TEMPERATURE = 0.05
SFT_NOISE = 0.3


def make_prompt(rng: random.Random) -> str:
    return f"+{rng.choice(STEPS)} {rng.randrange(10)} ="


def parse_prompt(prompt: str) -> tuple[int, int]:
    step, start, _ = prompt.split()
    return int(step[1:]), int(start)


def ideal_response(prompt: str) -> str:
    k, s = parse_prompt(prompt)
    return " ".join(str((s + k * i) % 10) for i in range(RESPONSE_LEN))


def demonstrate(prompt: str, noise: float, rng: random.Random) -> str:
    """A response from the mediocre demonstrator: per-digit slips with probability ``noise``, 20% wrong lengths."""
    k, s = parse_prompt(prompt)
    length = RESPONSE_LEN if rng.random() < 0.8 else rng.choice([n for n in range(RESPONSE_LEN - 3, RESPONSE_LEN + 3)
                                                                 if n != RESPONSE_LEN])
    digits, prev = [], None
    for i in range(length):
        d = s if i == 0 else (prev + k) % 10
        if rng.random() < noise:
            d = rng.randrange(10)
        digits.append(d)
        prev = d
    return " ".join(map(str, digits))


def true_score(prompt: str, response: str) -> float:
    """The rule (see the module docstring): float in [0, 1]. ``response`` is whitespace-separated tokens."""
    k, s = parse_prompt(prompt)
    toks = response.split()
    if not toks:
        return 0.0
    correct = 0
    for i, t in enumerate(toks[:RESPONSE_LEN]):
        if not t.isdigit():
            continue
        if i == 0:
            correct += int(t) == s
        elif toks[i - 1].isdigit() and int(t) == (int(toks[i - 1]) + k) % 10:
            correct += 1
    return correct / max(RESPONSE_LEN, len(toks))


def sft_examples(n: int, seed: int, noise: float = SFT_NOISE) -> list[dict]:
    rng = random.Random(f"sft-{seed}")
    out = []
    for _ in range(n):
        p = make_prompt(rng)
        out.append({"prompt": p, "completion": demonstrate(p, noise, rng)})
    return out


def preference_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(f"pref-{seed}")
    out = []
    while len(out) < n:
        p = make_prompt(rng)
        a, b = (demonstrate(p, rng.uniform(0.0, 0.7), rng) for _ in range(2))
        if a == b:
            continue
        z = (true_score(p, a) - true_score(p, b)) / PREF_TEMPERATURE
        a_wins = rng.random() < 1.0 / (1.0 + math.exp(-z))
        out.append({"prompt": p, "chosen": a if a_wins else b, "rejected": b if a_wins else a})
    return out


def prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(f"prompt-{seed}")
    return [{"prompt": make_prompt(rng)} for _ in range(n)]


def reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """The true score as a programmatic reward (``reward_fns=rlhf_fast.data.task:reward``): TRL's reward-function
    signature, one float per completion."""
    return [true_score(p, c) for p, c in zip(prompts, completions)]
