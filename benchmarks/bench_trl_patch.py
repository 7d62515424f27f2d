"""TRL patched vs unpatched: the replaced functions on their own, and a whole tiny GRPO run (time and memory).

python benchmarks/bench_trl_patch.py [--device cpu|cuda] [--quick] [--json out.json] [--parts functions,grpo,steps]

Functions (forward + backward, the way a trainer uses them):
  selective_log_softmax(logits [B, T, V], index [B, T])  eager log_softmax+gather, torch.compile of it, TRL, rlhf_fast
  entropy_from_logits(logits [B, T, V])                  eager, TRL, rlhf_fast
  lm_head log-probs (hidden [N, H], weight [V, H])       eager (full logits), TRL's ChunkedLogProbFunction (what
                                                         GRPO/RLOO/DPO/KTO/SFT use in trl >= 1.x), rlhf_fast
                                                         (rlhf_fast.ops.linear_logprobs, what patch() routes it to)
Whole run: TRL's GRPOTrainer on a tiny Llama built here (vocabulary 32k so the lm_head dominates), unpatched then
patched, same seed; wall time of trainer.train() and peak extra memory (CUDA allocator peak; on CPU the process's
peak resident set, VmHWM, above the resident set before the run).
Trainer steps: TRL's SFTTrainer and DPOTrainer (both on the fused lm_head path) on a random tiny Llama saved to a
local folder and loaded from it by path; median time of an optimizer step (after the first) and peak extra memory,
unpatched and patched runs alternating.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from common import median_ms, parser, peak_extra_mib, report

import rlhf_fast
from rlhf_fast.integrations import trl as rlhf_trl


def _grad_step(fn, *leaves):
    def run():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        for leaf in leaves:
            leaf.grad = None
    return run


def function_rows(args, device):
    from trl.trainer import utils as trl_utils

    trl_chunked = trl_utils._ChunkedLogProbFunction
    if args.quick:
        b, t, v, n, h = 2, 16, 1000, 64, 32
    elif device.type == "cuda":
        b, t, v, n, h = 8, 1024, 151936, 8192, 1024
    else:
        b, t, v, n, h = 4, 256, 32000, 1024, 256
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = torch.randn(b, t, v, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    index = torch.randint(0, v, (b, t), generator=gen).to(device)
    hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (0.05 * torch.randn(v, h, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)

    def eager_slsm():
        return torch.log_softmax(logits.float(), -1).gather(-1, index[..., None]).squeeze(-1)

    def eager_entropy():
        logp = torch.log_softmax(logits.float(), -1)
        return -(logp.exp() * logp).sum(-1)

    def eager_head():
        return torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[:, None]).squeeze(-1)

    compiled_slsm = torch.compile(eager_slsm)
    cases = {
        f"selective_log_softmax {b}x{t}x{v}": {
            "eager": eager_slsm, "torch.compile(eager)": compiled_slsm,
            "trl": lambda: trl_utils.selective_log_softmax(logits, index),
            "rlhf_fast": lambda: rlhf_trl.selective_log_softmax(logits, index),
        },
        f"entropy_from_logits {b}x{t}x{v}": {
            "eager": eager_entropy, "trl": lambda: trl_utils.entropy_from_logits(logits),
            "rlhf_fast": lambda: rlhf_trl.entropy_from_logits(logits),
        },
        f"lm_head logprobs N={n} H={h} V={v}": {
            "eager": eager_head,
            "trl": lambda: trl_chunked.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0, ("log_probs",)),
            "rlhf_fast": lambda: rlhf_trl.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 4096,
                                                                       None, 1.0, ("log_probs",)),
        },
    }
    rows = []
    for case, impls in cases.items():
        leaves = (hidden, weight) if case.startswith("lm_head") else (logits,)
        base = {}
        for name, fn in impls.items():
            step = _grad_step(fn, *leaves)
            ms = median_ms(step, device, reps=args.reps)
            base.setdefault("eager", ms)
            if name == "trl":
                base["trl"] = ms
            rows.append({"case": case, "dtype": str(dtype).replace("torch.", ""), "impl": name,
                         "fwd+bwd median ms": ms, "peak extra MiB": peak_extra_mib(step, device)})
        for row in rows:
            if row["case"] == case:
                row["x eager"] = base["eager"] / row["fwd+bwd median ms"]
                row["x trl"] = base["trl"] / row["fwd+bwd median ms"]
    return rows


def _tiny_llama(device, quick):
    """-> (model, tokenizer, words, hidden): a random 2-layer Llama and a word-level tokenizer built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_size = 1000 if quick else 32000
    words = [f"w{i}" for i in range(vocab_size - 3)]
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    hidden = 64 if quick else 256
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1)
    return LlamaForCausalLM(config).to(device), tokenizer, words, hidden


def _grpo_trainer(device, quick):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer, words, hidden = _tiny_llama(device, quick)
    vocab_size = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [" ".join(words[j] for j in torch.randint(0, 50, (16,), generator=gen)) for _ in range(64)]

    def reward(completions, **_):
        return [float(c.count("w1")) - 0.01 * len(c) for c in completions]

    out = tempfile.mkdtemp()
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=8, num_generations=8,
                      max_completion_length=8 if quick else 32, max_steps=2 if quick else 3, logging_steps=1,
                      learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=device.type == "cpu", seed=0,
                      dataloader_num_workers=0, disable_tqdm=True, beta=0.0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tokenizer)
    return trainer, f"V={vocab_size} H={hidden} T_completion={args.max_completion_length} batch=8 steps={args.max_steps}"


def grpo_rows(args, device):
    """Unpatched and patched runs alternate (``--grpo-repeats`` each), so load from other processes hits both."""
    times = {False: [], True: []}
    mems = {False: [], True: []}
    losses, shape = {}, ""
    _grpo_trainer(device, args.quick)[0].train()  # warm-up: CUDA context, kernels and caches outside the timed runs
    for _ in range(args.grpo_repeats):
        for patched in (False, True):
            if patched:
                rlhf_trl.patch()
            try:
                trainer, shape = _grpo_trainer(device, args.quick)
                result = {}

                def train(trainer=trainer, result=result):
                    start = time.perf_counter()
                    trainer.train()
                    result["s"] = time.perf_counter() - start

                mems[patched].append(peak_extra_mib(train, device))
                times[patched].append(result["s"])
                losses[patched] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            finally:
                rlhf_trl.unpatch()
    rows = []
    for patched in (False, True):
        rows.append({"run": f"GRPO {shape}", "impl": "rlhf_fast (patched)" if patched else "trl",
                     "train s (median)": statistics.median(times[patched]),
                     "all runs s": " ".join(f"{x:.1f}" for x in times[patched]),
                     "peak extra MiB (max)": max(mems[patched]),
                     "losses": " ".join(f"{x:.4g}" for x in losses[patched])})
    rows[1]["x trl"] = rows[0]["train s (median)"] / rows[1]["train s (median)"]
    return rows


def _saved_tiny_llama(device, quick) -> tuple[str, str]:
    """Saves the tiny Llama and its tokenizer to a local folder -> (path, shape description)."""
    model, tokenizer, _, hidden = _tiny_llama(device, quick)
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, f"V={model.config.vocab_size} H={hidden}"


class _StepTimer:
    """A TrainerCallback recording the wall time of every optimizer step."""

    def __init__(self, device):
        self.device, self.times, self.start = device, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - self.start)

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def _trainer(kind, path, device, quick, steps):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(device)
    gen = torch.Generator().manual_seed(0)
    n_words = 8 if quick else 48

    def text(n):
        return " ".join(f"w{j}" for j in torch.randint(0, 500, (n,), generator=gen).tolist())

    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-4,
                  report_to=[], save_strategy="no", use_cpu=device.type == "cpu", seed=0, logging_steps=1,
                  dataloader_num_workers=0, disable_tqdm=True, bf16=device.type == "cuda")
    if kind == "SFT":
        rows = [{"text": text(2 * n_words)} for _ in range(8 * steps)]
        args = SFTConfig(**common, max_length=2 * n_words + 8)
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer), \
            f"batch=8 T={2 * n_words}"
    rows = [{"prompt": text(n_words), "chosen": text(n_words), "rejected": text(n_words)} for _ in range(8 * steps)]
    args = DPOConfig(**common, max_length=2 * n_words + 8)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer), \
        f"batch=8 pairs, prompt+completion={2 * n_words}"


def trainer_step_rows(args, device):
    """SFTTrainer and DPOTrainer steps, unpatched and patched alternating (``--grpo-repeats`` runs each)."""
    path, shape = _saved_tiny_llama(device, args.quick)
    steps = 3 if args.quick else 6
    rows = []
    for kind in ("SFT", "DPO"):
        times, mems, losses = {False: [], True: []}, {False: [], True: []}, {}
        for _ in range(args.grpo_repeats):
            for patched in (False, True):
                if patched:
                    rlhf_trl.patch()
                try:
                    trainer, batch = _trainer(kind, path, device, args.quick, steps)
                    timer = _StepTimer(device)
                    trainer.add_callback(timer)
                    mems[patched].append(peak_extra_mib(trainer.train, device))
                    times[patched].extend(timer.times[1:])  # the first step warms up
                    losses[patched] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
                finally:
                    rlhf_trl.unpatch()
        for patched in (False, True):
            rows.append({"run": f"{kind} {shape} {batch}", "impl": "rlhf_fast (patched)" if patched else "trl",
                         "step ms (median)": 1e3 * statistics.median(times[patched]),
                         "steps timed": len(times[patched]), "peak extra MiB (max)": max(mems[patched]),
                         "losses": " ".join(f"{x:.4g}" for x in losses[patched])})
        rows[-1]["x trl"] = rows[-2]["step ms (median)"] / rows[-1]["step ms (median)"]
    return rows


def main():
    p = parser(__doc__)
    p.add_argument("--grpo-repeats", type=int, default=2, help="alternating unpatched/patched runs of each trainer")
    p.add_argument("--parts", default="functions,grpo,steps", help="comma-separated: functions, grpo, steps")
    args = p.parse_args()
    device = torch.device(args.device)
    parts = args.parts.split(",")
    print(f"rlhf_fast {rlhf_fast.__version__}")
    json_path = args.json
    for part, title, rows in (
            ("functions", "TRL functions, patched vs unpatched", function_rows),
            ("grpo", "TRL GRPOTrainer, tiny Llama, patched vs unpatched", grpo_rows),
            ("steps", "TRL SFTTrainer / DPOTrainer steps, tiny Llama loaded from a local folder, patched vs unpatched",
             trainer_step_rows)):
        if part in parts:
            args.json = json_path if not json_path or part == parts[0] else json_path.replace(".json", f"_{part}.json")
            report(title, rows(args, device), args, device)
    args.json = json_path


if __name__ == "__main__":
    main()
