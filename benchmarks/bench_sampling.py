"""Batched sampling (temperature / top-k / top-p / min-p) and rollout generation: rlhf_fast vs 🤗 transformers.

python benchmarks/bench_sampling.py [--device cpu|cuda] [--quick] [--json out.json]

Sampler rows, per shape and filter setting: 🤗 transformers' logits warpers (TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper: sort + cumsum + mask) + softmax + torch.multinomial, the way
`model.generate` samples; plain softmax + multinomial (no filtering: the floor of the usual path); the sort-based
reference (rlhf_fast's torch backend) eager and under torch.compile; every rlhf_fast backend usable on the device;
on CUDA, FlashInfer's top_k_top_p_sampling_from_logits when flashinfer is installed.
Generation rows: tokens/s of rlhf_fast.generate vs `model.generate` (same settings, KV cache, sampling) on a tiny Llama.
"""

from __future__ import annotations

import json
import time
from datetime import date

import torch
from common import device_name, median_ms, parser, peak_extra_mib, report
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import rlhf_fast
from rlhf_fast import _backend
from rlhf_fast.ops import sampling as S


def hf_sampler(temperature, top_k, top_p, min_p):
    """The sampling step of 🤗 `generate`: its warpers in its order, softmax, multinomial."""
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    processors = LogitsProcessorList(warpers)

    def run(logits):
        scores = processors(None, logits.float())
        return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)

    return run


def flashinfer_sampler(device, st):
    """FlashInfer's sorting-free GPU sampler (token ids only, no log-prob), when installed and the setting suits it."""
    if device.type != "cuda" or st["min_p"] or not (st["top_k"] or st["top_p"] < 1):
        return None
    try:
        from flashinfer.sampling import top_k_top_p_sampling_from_logits
    except ImportError:
        return None
    k = st["top_k"] or 2**31 - 1

    def run(logits):
        return top_k_top_p_sampling_from_logits(logits / st["temperature"], k, st["top_p"])

    return run


def plain_sampler(logits):
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(1)


def reference(logits, uniforms, t, k, p, m):
    return S.sample_ref(logits, uniforms, t, k, p, m)


def sampler_rows(args, device):
    if args.quick:
        shapes = [(8, 1000, torch.float32)]
    elif device.type == "cuda":
        shapes = [(64, 128256, torch.float32), (64, 128256, torch.bfloat16), (256, 151936, torch.bfloat16)]
    else:
        shapes = [(64, 128256, torch.float32), (64, 128256, torch.bfloat16)]
    settings = [dict(temperature=1.0, top_k=50, top_p=0.9, min_p=0.0),
                dict(temperature=0.7, top_k=0, top_p=0.95, min_p=0.0),
                dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05)]
    compiled_ref = torch.compile(reference)
    rows = []
    for B, V, dtype in shapes:
        logits = (torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3).to(device=device, dtype=dtype)
        for st in settings:
            t, k, p, m = (S._row_param(st[n], n, logits) for n in ("temperature", "top_k", "top_p", "min_p"))
            uniforms = torch.rand(B, device=device)
            impls = {
                "hf warpers + multinomial": lambda: hf_sampler(**st)(logits),
                "softmax + multinomial (no filter)": lambda: plain_sampler(logits),
                "reference (sort), eager": lambda: reference(logits, uniforms, t, k, p, m),
                "reference (sort), torch.compile": lambda: compiled_ref(logits, uniforms, t, k, p, m),
            }
            flashinfer = flashinfer_sampler(device, st)
            if flashinfer is not None:
                impls["flashinfer top_k_top_p_sampling_from_logits"] = lambda: flashinfer(logits)
            for name in S.SAMPLE_BACKENDS:
                if name != "torch" and _backend.built(name) and _backend.runs_on(name, device):
                    impls[f"rlhf_fast[{name}]"] = lambda name=name: S.sample_op(logits, uniforms, t, k, p, m, name)
            times = {name: median_ms(fn, device, reps=args.reps) for name, fn in impls.items()}
            setting = ", ".join(f"{key}={value}" for key, value in st.items())
            for name, fn in impls.items():
                rows.append({
                    "B x V": f"{B}x{V}", "dtype": str(dtype).replace("torch.", ""), "setting": setting, "impl": name,
                    "median ms": times[name], "peak extra MiB": peak_extra_mib(fn, device),
                    "x hf": times["hf warpers + multinomial"] / times[name],
                    "x ref eager": times["reference (sort), eager"] / times[name],
                    "x ref compiled": times["reference (sort), torch.compile"] / times[name],
                })
    return rows


def tiny_llama(device, vocab):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    return LlamaForCausalLM(config).to(device).eval()


def generation_rows(args, device):
    B, P, N, vocab = (4, 8, 16, 1000) if args.quick else (32, 32, 64, 32000)
    model = tiny_llama(device, vocab)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (B, P), generator=gen).to(device)
    mask = torch.ones(B, P, dtype=torch.int64, device=device)
    mask[: B // 2, : P // 2] = 0  # half the prompts left-padded
    settings = dict(temperature=1.0, top_k=50, top_p=0.9)
    eos = vocab - 1  # rarely drawn: both run close to the full length; tokens/s counts the generated ones

    def ours():
        out = rlhf_fast.generate(model, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=0, **settings)
        return int(out.response_mask.sum())

    def hf():
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, do_sample=True,
                                 eos_token_id=eos, pad_token_id=0, **settings)
        return int((seq[:, P:] != 0).sum())

    rows = []
    for name, fn in (("hf model.generate", hf), ("rlhf_fast.generate", ours)):
        fn()  # warm-up
        times, tokens = [], 0
        for _ in range(max(1, args.reps // 2)):
            start = time.perf_counter()
            tokens = fn()
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        rows.append({"model": f"tiny llama V={vocab}", "B x P + N": f"{B}x{P}+{N}", "impl": name,
                     "median s": seconds, "tokens/s": tokens / seconds})
    base = rows[0]["tokens/s"]
    for row in rows:
        row["x hf"] = row["tokens/s"] / base
    return rows


def main():
    args = parser(__doc__).parse_args()
    device = torch.device(args.device)
    json_path, args.json = args.json, None
    rows = sampler_rows(args, device)
    report("sample(logits): one token per row", rows, args, device)
    gen_rows = generation_rows(args, device)
    report("generate: tokens/s", gen_rows, args, device)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "date": str(date.today()),
                       "sample": rows, "generate": gen_rows}, f, indent=1)


if __name__ == "__main__":
    main()
