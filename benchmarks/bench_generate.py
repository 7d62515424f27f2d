"""Rollout generation: tokens/s and peak extra memory of 🤗 ``model.generate`` (dynamic cache), ``model.generate``
with a static cache + torch.compile, and ``rlhf_fast.generate`` (static slot cache; eager and compiled decode step).

Cases: (a) the embedded tiny model (2 layers, width 192, V=8192) at the embedded rollout shape; (b) a random-init Llama
(V=32000, hidden 512, 8 layers) at B in {1, 16, 64}, prompt 64, 128 new tokens; a long-tail length mix (stop tokens
cover 2 % of the vocabulary, so lengths are geometric, cut at 128) over 64 prompts at width 16, with refill vs. four
batches of 16; group sampling G=8 of 8 prompts of 512 tokens with and without shared prefill.

Sampling: temperature 1, no filters (HF and rlhf_fast draw from the same distribution). Timings are medians of
``--reps`` runs, the implementations interleaved; "first s" is the first call (compile included). tokens/s counts the
generated tokens (EOS included). Usage: python benchmarks/bench_generate.py [--quick] [--cases a,b,tail,group]
[--batches 1,16,64] [--new-tokens 128] [--no-compile] [--reps 3] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import CompileConfig

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, peak_extra_mib, sync  # noqa: E402

import rlhf_fast  # noqa: E402
from rlhf_fast.data.embedded import build_tokenizer  # noqa: E402
from rlhf_fast.models import build_tiny_model  # noqa: E402


def llama_b(device, vocab=32000, hidden=512, layers=8):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden * 2 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=1024, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device).eval()


def prompts(B, P, vocab, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, P), generator=gen)
    mask = torch.ones(B, P, dtype=torch.int64)
    mask[: B // 2, : P // 4] = 0  # half the prompts left-padded
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


def implementations(model, ids, mask, N, eos, *, compile_ok, G=1, width=None):
    """name -> fn() returning the number of generated tokens."""
    P = ids.shape[1]
    eos_list = eos if isinstance(eos, list) else [eos]

    def hf(static):
        kw = {}
        if static:
            cc = CompileConfig(fullgraph=False, dynamic=False)
            cc._compile_all_devices = True
            kw = dict(cache_implementation="static", compile_config=cc)

        def run():
            n = 0
            chunk = width or ids.shape[0] * G
            for i in range(0, ids.shape[0], chunk // G):
                with torch.no_grad():
                    seq = model.generate(input_ids=ids[i:i + chunk // G], attention_mask=mask[i:i + chunk // G],
                                         max_new_tokens=N, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                         num_return_sequences=G, eos_token_id=eos_list, pad_token_id=0, **kw)
                resp = seq[:, P:]
                stop = torch.isin(resp, torch.tensor(eos_list, device=resp.device)).int().cumsum(1)
                n += int(((stop == 0) | ((stop == 1) & torch.isin(resp, torch.tensor(eos_list)))).sum())
            return n
        return run

    def ours(compile, refill=True, shared=True):
        def run():
            if shared:
                chunks = [(ids, mask)] if refill or width is None else \
                    [(ids[i:i + width // G], mask[i:i + width // G]) for i in range(0, ids.shape[0], width // G)]
                n = 0
                for cid, cm in chunks:
                    out = rlhf_fast.generate(model, cid, cm, max_new_tokens=N, eos_token_id=eos, pad_token_id=0,
                                             num_samples=G, batch_size=width if refill else None, compile=compile)
                    n += int(out.response_mask.sum())
                return n
            rid, rm = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
            out = rlhf_fast.generate(model, rid, rm, max_new_tokens=N, eos_token_id=eos, pad_token_id=0,
                                     compile=compile)
            return int(out.response_mask.sum())
        return run

    impls = {"hf generate (dynamic)": hf(False)}
    if compile_ok:
        impls["hf generate (static+compile)"] = hf(True)
    if width is not None:
        impls["rlhf_fast, batches of width"] = ours(False, refill=False)
        impls["rlhf_fast, refill"] = ours(False)
    elif G > 1:
        impls["rlhf_fast, G-fold prefill"] = ours(False, shared=False)
        impls["rlhf_fast, shared prefill"] = ours(False)
    else:
        impls["rlhf_fast"] = ours(False)
        if compile_ok:
            impls["rlhf_fast (compiled)"] = ours(True)
    return impls


def measure(case, impls, reps, device):
    first, times, tokens = {}, {k: [] for k in impls}, {}
    for name, fn in impls.items():  # first call: compile / warm-up
        start = time.perf_counter()
        tokens[name] = fn()
        sync(device)
        first[name] = time.perf_counter() - start
    for _ in range(reps):  # interleaved
        for name, fn in impls.items():
            start = time.perf_counter()
            tokens[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, fn in impls.items():
        s = statistics.median(times[name])
        rows.append({"case": case, "impl": name, "first s": first[name], "median s": s,
                     "tokens/s": tokens[name] / s, "peak MiB": peak_extra_mib(fn, device)})
    base = rows[0]["tokens/s"]
    static = next((r["tokens/s"] for r in rows if "static+compile" in r["impl"]), None)
    for r in rows:
        r["x hf dyn"] = r["tokens/s"] / base
        r["x hf static"] = r["tokens/s"] / static if static else None
    print(tabulate(rows, headers="keys", floatfmt=".3g", tablefmt="github"), flush=True)  # progress
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--cases", default="a,b,tail,group")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--group-new-tokens", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled implementations")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = args.cases.split(",")
    N = 8 if args.quick else args.new_tokens
    compile_ok = not args.no_compile
    rows = []
    if "a" in cases:
        tok = build_tokenizer()
        model = build_tiny_model(tok).to(device).eval()
        ids, mask = prompts(4 if args.quick else 32, 16, len(tok), device)
        rows += measure(f"(a) embedded, {ids.shape[0]}x16+10", implementations(model, ids, mask, 10, tok.eos_token_id,
                                                                  compile_ok=compile_ok), args.reps, device)
    model = llama_b(device, vocab=1000, hidden=64, layers=2) if args.quick else llama_b(device)  # --quick: a toy
    V = model.config.vocab_size
    if "b" in cases:
        for B in [int(b) for b in args.batches.split(",")]:
            ids, mask = prompts(B, 16 if args.quick else 64, V, device)
            rows += measure(f"(b) B={B}, P={ids.shape[1]}, N={N}", implementations(model, ids, mask, N, V - 1,
                                                                       compile_ok=compile_ok), args.reps, device)
    if "tail" in cases:
        ids, mask = prompts(16 if args.quick else 64, 16 if args.quick else 64, V, device, seed=1)
        eos = list(range(1, 1 + V // 50))
        rows += measure(f"(b) long tail, {ids.shape[0]} prompts, width {4 if args.quick else 16}, N<={N}",
                        implementations(model, ids, mask, N, eos, compile_ok=False, width=4 if args.quick else 16),
                        args.reps, device)
    if "group" in cases:
        ids, mask = prompts(2 if args.quick else 8, 32 if args.quick else 512, V, device, seed=2)
        Ng = 8 if args.quick else args.group_new_tokens
        rows += measure(f"(b) G=8, {ids.shape[0]} prompts x {ids.shape[1]}, N={Ng}",
                        implementations(model, ids, mask, Ng, V - 1, compile_ok=False, G=8), args.reps, device)
    print(f"# bench_generate on {device_name(device)} (torch {torch.__version__})")
    print(tabulate(rows, headers="keys", floatfmt=".3g", tablefmt="github"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
