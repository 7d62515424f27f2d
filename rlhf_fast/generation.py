"""Batched rollout generation for 🤗 transformers causal LMs with rlhf_fast's sampler, returning the behaviour log-probs
of the generated tokens (so PPO need not recompute them), unfiltered and under the sampler's kept set, with each
token's kept threshold (the kept set is {v : logits_v >= threshold}, see rlhf_fast.sample).

Two paths, chosen by ``cache``:

* ``"static"``: a preallocated KV cache of ``W`` slots x ``L = P + max_new_tokens`` columns (``SlotCache``), written
  as a ring: every decode step writes column ``t % L`` of every slot and an additive attention bias [W, L] says which
  columns each slot sees (RoPE / position embeddings come from ``position_ids``, so a key's column is irrelevant).
  Prompts are prefilled in one batched forward and copied into their slots; with ``num_samples = G`` each prompt is
  prefilled once and its cache copied into G slots (shared prefill). When the batch has more rows than slots
  (``batch_size``), a finished slot is refilled with the next pending prompt (continuous batching): the outputs are
  the same rows, in the same order, as without refill. Every decode step has the same shapes, so it can be compiled
  (``compile``; on CUDA ``mode="reduce-overhead"``, i.e. CUDA graphs) together with the fused sampler.
* ``"dynamic"``: the model's own growing cache and attention mask, one forward per step; the fallback for models
  whose layers are not all full attention (sliding-window, chunked, linear-attention or KV-sharing layers) or whose
  forward has no ``cache`` argument (transformers < 5).

Host synchronisation: off CPU, the loop reads "which slots have stopped?" only every ``DONE_CHECK_EVERY`` steps (to
stop, or to refill); on CPU every step (where it costs nothing). Steps run after a row stopped write nothing.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _backend
from .ops.sampling import SAMPLE_BACKENDS, _row_param, sample, sample_op

DONE_CHECK_EVERY = 8  # decode steps between "which rows stopped?" reads off CPU (each one synchronises with the host)
CACHE_MODES = ("auto", "static", "dynamic")


class GenerateOutput(NamedTuple):
    """The rollout of ``generate``: R = B x num_samples rows (row b * G + g is sample g of prompt b) of P
    (left-padded) prompt tokens and N generated steps (N <= max_new_tokens)."""

    sequences: Tensor  # [R, P + N] int64: the prompt as given, then the response; pad_token_id after a row's EOS
    response_mask: Tensor  # [R, N], dtype of attention_mask: 1 on generated tokens (the EOS included), 0 after
    logprobs: Tensor  # [R, N] float32: behaviour log-prob of each generated token (temperature-scaled, unfiltered)
    filtered_logprobs: Tensor  # [R, N] float32: its log-prob under the renormalised kept set (top-k/top-p/min-p)
    kept_threshold: Tensor  # [R, N] float32: the kept set is {v : logit_v >= it} (rlhf_fast.sample; -inf: no filter)


def _eos_ids(eos_token_id, device) -> Tensor:
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.int64, device=device)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise TypeError(f"eos_token_id must be an int, a non-empty list of ints or None, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.int64, device=device)


def static_cache_unsupported(model) -> Optional[str]:
    """Why the static path cannot run ``model`` (None when it can)."""
    if "cache" not in inspect.signature(model.forward).parameters:
        return "its forward has no `cache` argument (transformers < 5 or a custom model)"
    from transformers.cache_utils import get_layer_types_and_kwargs
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    kinds = set(get_layer_types_and_kwargs(config)[0])
    if kinds != {"full_attention"}:
        return f"its layers are {sorted(kinds)}, not all full attention"
    return None


class SlotCache:
    """KV cache of ``slots`` rows x ``length`` columns per layer, duck-typed as a transformers ``Cache``: ``update``
    writes the new keys/values at ``self.columns`` (a [q] tensor, set before each forward) and returns the buffers'
    first ``self.visible`` columns (all of them unless set lower: the columns not yet written need no attention).
    Allocated on the first update (heads, head size and dtype come from the model)."""

    def __init__(self, slots: int, length: int, device):
        self.slots, self.length, self.visible = slots, length, length
        self.columns = torch.zeros(1, dtype=torch.int64, device=device)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):
            shape = (self.slots, key.shape[1], self.length)
            self.keys.append(key.new_zeros(*shape, key.shape[3]))
            self.values.append(value.new_zeros(*shape, value.shape[3]))
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.keys[-1])
                torch._dynamo.mark_static_address(self.values[-1])
        self.keys[layer_idx].index_copy_(2, self.columns, key)
        self.values[layer_idx].index_copy_(2, self.columns, value)
        return self.keys[layer_idx][:, :, :self.visible], self.values[layer_idx][:, :, :self.visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never used: every forward passes position_ids and a 4-D mask


def _bias_value(dtype) -> float:
    return torch.finfo(dtype).min  # finite: a fully masked (pad) query row stays finite


def _forward_logits(model, ids, bias, positions, cache) -> Tensor:
    """Logits of the last position [n, V] of one forward over ``ids`` [n, q] with additive bias [n, 1, q, L]."""
    out = model(input_ids=ids, attention_mask=bias, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1, :]


class _Decoder:
    """One decode step of the static path (forward + fused sampler), optionally compiled."""

    def __init__(self, cache: SlotCache, backend: str, compile: bool):
        self.cache, self.backend = cache, backend
        fn = self._step
        if compile:
            mode = "reduce-overhead" if cache.columns.device.type == "cuda" else None
            fn = torch.compile(fn, mode=mode, dynamic=False)
        self.fn = fn

    def _step(self, model, token, position, bias, uniforms, temperature, top_k, top_p, min_p):
        bias = bias[:, None, None, :self.cache.visible]
        logits = _forward_logits(model, token[:, None], bias, position[:, None], self.cache)
        return sample_op(logits.contiguous(), uniforms, temperature, top_k, top_p, min_p, self.backend)


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _decoder(model, W: int, L: int, device, backend: str, compile: bool) -> _Decoder:
    """The model's decoder for this shape, reused across calls (one per model: the compiled step and its CUDA graphs
    stay valid because the cache buffers keep their addresses)."""
    key = (W, L, str(device), backend, compile)
    cached = _DECODERS.get(model)
    if cached is None or cached[0] != key:
        cached = _DECODERS[model] = (key, _Decoder(SlotCache(W, L, device), backend, compile))
    return cached[1]


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: Union[float, Tensor] = 1.0,
    top_k: Union[int, Tensor] = 0,
    top_p: Union[float, Tensor] = 1.0,
    min_p: Union[float, Tensor] = 0.0,
    eos_token_id: Union[int, Sequence[int], None],
    pad_token_id: int,
    generator: Optional[torch.Generator] = None,
    num_samples: int = 1,
    batch_size: Optional[int] = None,
    cache: str = "auto",
    compile: Optional[bool] = None,
) -> GenerateOutput:
    """Samples up to ``max_new_tokens`` tokens after each prompt with ``rlhf_fast.sample`` and a KV cache.

    model: a 🤗 transformers causal LM. input_ids [B, P] int64, attention_mask [B, P] (0/1): prompts LEFT-padded,
    each with at least one token. temperature / top_k / top_p / min_p: as in ``rlhf_fast.sample``, numbers or per-
    prompt [B] tensors (temperature 0 is greedy). A row stops after it emits a token of ``eos_token_id`` (an int, a
    list of ints, or None for no stop token) or after ``max_new_tokens`` tokens.

    num_samples: G responses per prompt (rows b * G .. b * G + G - 1 of the output); the static path prefills each
    prompt once and shares its cache (no G-fold prompt compute). batch_size: rows decoded at once (static path; a
    multiple of G, default all B * G rows); when smaller than B * G, finished rows are refilled with the next pending
    prompts. cache: "static", "dynamic" or "auto" (static when the model supports it, see
    ``static_cache_unsupported``; otherwise dynamic with one warning). compile: torch.compile the static decode step
    (CUDA graphs on CUDA); default None = on CUDA only (on CPU the compile time exceeds what it saves on short
    rollouts). -> GenerateOutput.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise TypeError("input_ids must be an int64 tensor [B, P]")
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids are on {input_ids.device}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    G = num_samples
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < G or batch_size % G):
        raise ValueError(f"batch_size must be a positive multiple of num_samples={G}, got {batch_size!r}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    mask = attention_mask.to(torch.int64)
    # one read before the loop: each row must be 0...0 1...1 (left padding) with at least one prompt token
    if bool(((mask[:, 1:] < mask[:, :-1]).any() | (mask[:, -1] != 1).any()).item()):
        raise ValueError("attention_mask must be left-padded (each row 0...0 1...1) with at least one prompt token "
                         "per row; right-padded prompts would continue after their padding")
    eos = _eos_ids(eos_token_id, input_ids.device)
    B = input_ids.shape[0]
    # per-prompt sampling parameters (validated once), one entry per output row
    params = [_row_param(value, name, input_ids.new_empty(B, 1, dtype=torch.float32)).repeat_interleave(G)
              for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                  ("min_p", min_p))]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    if cache != "dynamic":
        reason = static_cache_unsupported(model)
        if reason is not None:
            if cache == "static":
                raise ValueError(f"cache='static' cannot run {type(model).__name__}: {reason}")
            _warn_once(type(model).__name__, reason)
            cache = "dynamic"
    if cache == "dynamic":
        if G > 1:
            input_ids, mask = input_ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
        out = _generate_dynamic(model, input_ids, mask, max_new_tokens, params, eos, pad_token_id, generator)
    else:
        out = _generate_static(model, input_ids, mask, max_new_tokens, params, eos, pad_token_id, generator, G,
                               batch_size or B * G, input_ids.is_cuda if compile is None else compile)
    sequences, response_mask, *per_token = out
    return GenerateOutput(sequences, response_mask.to(attention_mask.dtype), *per_token)


_WARNED: set = set()


def _warn_once(name: str, reason: str) -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"rlhf_fast.generate: {name} falls back to the dynamic cache ({reason})", stacklevel=3)


def _generate_static(model, input_ids, mask, N, params, eos, pad, generator, G, W, compile):
    device = input_ids.device
    B, P = input_ids.shape
    R = B * G
    W = min(W, R)
    L = P + N
    dtype = next(model.parameters()).dtype
    neg = _bias_value(dtype)
    backend = _backend.select("sample", SAMPLE_BACKENDS, device)
    lengths = mask.sum(1)
    lengths_host = lengths.tolist()

    decoder = _decoder(model, W, L, device, backend, compile)
    slots = decoder.cache
    bias = torch.full((W, L), neg, dtype=dtype, device=device)
    token = torch.full((W,), pad, dtype=torch.int64, device=device)
    position = torch.zeros(W, dtype=torch.int64, device=device)
    done = torch.ones(W, dtype=torch.bool, device=device)  # an unassigned slot counts as done
    count = torch.zeros(W, dtype=torch.int64, device=device)  # tokens generated by the slot's current row
    row_of = torch.full((W,), R, dtype=torch.int64, device=device)  # output row of each slot (R: none)
    slot_params = [p.new_zeros(W) for p in params]
    # outputs; row R and column N absorb the writes of stopped slots (no branch, no host read)
    res_tokens = torch.full((R + 1, N + 1), pad, dtype=torch.int64, device=device)
    # per-token float32 outputs of the sampler: logprobs, filtered_logprobs, kept_threshold
    res_float = torch.zeros(3, R + 1, N + 1, dtype=torch.float32, device=device)
    res_mask = torch.zeros(R + 1, N + 1, dtype=torch.int64, device=device)

    def record(tok, floats, live):
        """Writes the new token of each ``live`` slot and its sampler outputs ``floats`` [3, W]; advances its count;
        marks the stopped."""
        rows, cols = torch.where(live, row_of, R), torch.where(live, count, N)
        res_tokens[rows, cols] = tok
        res_float[:, rows, cols] = floats
        res_mask[rows, cols] = 1
        count.add_(live.long())
        done.copy_(done | (live & (torch.isin(tok, eos) | (count >= N))))
        token.copy_(torch.where(live, tok, token))

    def admit(prompts: list[int], free: list[int], t: int):
        """Prefills ``prompts`` (indices into the batch) once each and places each into G of the ``free`` slots,
        its prompt at columns (t - p .. t - 1) mod L; samples each row's first token."""
        n = len(prompts)
        p = max(lengths_host[i] for i in prompts)
        idx = torch.tensor(prompts, device=device)
        ids, m = input_ids[idx, P - p:], mask[idx, P - p:]
        causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
        eye = torch.eye(p, dtype=torch.bool, device=device)
        # a pad query sees itself, so no row is fully masked (no NaN under fp16/bf16, where `neg` may become -inf)
        pre_bias = torch.where(causal & (m.bool()[:, None, :] | eye), 0.0, neg).to(dtype)[:, None]
        pre = SlotCache(n, p, device)
        pre.columns = torch.arange(p, device=device)
        logits = _forward_logits(model, ids, pre_bias, (m.cumsum(1) - 1).clamp(min=0), pre)
        src = torch.arange(n, device=device).repeat_interleave(G)
        dst = torch.tensor(free[:n * G], device=device)
        cols = (t - p + torch.arange(p, device=device)) % L
        if slots.keys and (slots.keys[0].dtype, slots.keys[0].shape[1]) != (pre.keys[0].dtype, pre.keys[0].shape[1]):
            slots.keys.clear(), slots.values.clear()  # the previous call ran in another dtype (autocast)
        if not slots.keys:  # allocate the decode cache like the prefill one
            for k, v in zip(pre.keys, pre.values):
                slots.update(k.new_zeros(W, k.shape[1], 1, k.shape[3]), v.new_zeros(W, v.shape[1], 1, v.shape[3]),
                             len(slots.keys))
        for k, v, pk, pv in zip(slots.keys, slots.values, pre.keys, pre.values):
            k[dst[:, None], :, cols[None, :]] = pk[src].transpose(1, 2)
            v[dst[:, None], :, cols[None, :]] = pv[src].transpose(1, 2)
        row_bias = torch.full((n * G, L), neg, dtype=dtype, device=device)
        row_bias[:, cols] = torch.where(m.bool(), 0.0, neg).to(dtype)[src]
        bias[dst] = row_bias
        rows = (idx[:, None] * G + torch.arange(G, device=device)).reshape(-1)
        row_of[dst], count[dst], done[dst] = rows, 0, False
        position[dst] = lengths[idx].repeat_interleave(G)
        for sp, pp in zip(slot_params, params):
            sp[dst] = pp[rows]
        uniforms = torch.rand(n * G, generator=generator, device=device, dtype=torch.float32)
        tok, *floats = sample_op(logits[src].contiguous(), uniforms, *(pp[rows] for pp in params), backend)
        live_tok, live_floats = token.clone(), torch.zeros(3, W, dtype=torch.float32, device=device)
        live_tok[dst], live_floats[:, dst] = tok, torch.stack(floats)
        fresh = torch.zeros(W, dtype=torch.bool, device=device)
        fresh[dst] = True
        record(live_tok, live_floats, fresh)

    pending = list(range(B))
    t = P  # decode column counter: slot columns are t % L
    first = pending[:W // G]
    del pending[:W // G]
    admit(first, list(range(W)), t)
    check_every = 1 if device.type == "cpu" else DONE_CHECK_EVERY
    steps = 0
    while True:
        if steps % check_every == 0:
            stopped = done.tolist()
            if pending:
                free = [s for s, d in enumerate(stopped) if d]
                k = min(len(free) // G, len(pending))
                if k:
                    admit(pending[:k], free, t)
                    del pending[:k]
                    stopped = done.tolist()
            if all(stopped) and not pending:
                break
        col = t % L
        slots.columns.fill_(col)
        # eager: attend to the columns written so far (all once the ring has wrapped); compiled: one shape, all L
        slots.visible = L if compile or t >= L else t + 1
        bias[:, col] = 0.0
        uniforms = torch.rand(W, generator=generator, device=device, dtype=torch.float32)
        tok, *floats = decoder.fn(model, token, position, bias, uniforms, *slot_params)
        live = ~done
        position.add_(live.long())
        record(tok, torch.stack(floats), live)
        t += 1
        steps += 1
    n = int(res_mask[:R].sum(1).max())
    sequences = torch.cat([input_ids.repeat_interleave(G, 0), res_tokens[:R, :n]], dim=1)
    return (sequences, res_mask[:R, :n], *res_float[:, :R, :n])


def _generate_dynamic(model, input_ids, mask, N, params, eos, pad, generator):
    device = input_ids.device
    B, P = input_ids.shape
    full_mask = mask.new_zeros(B, P + N)
    full_mask[:, :P] = mask
    tokens = torch.full((B, N), pad, dtype=torch.int64, device=device)
    floats = torch.zeros(3, B, N, dtype=torch.float32, device=device)  # logprobs, filtered_logprobs, kept_threshold
    response_mask = mask.new_zeros(B, N)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    params = dict(zip(("temperature", "top_k", "top_p", "min_p"), params))

    params_fw = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params_fw else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params_fw else {}
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # pad positions get 0; they are masked out anyway
    next_position = position_ids[:, -1:] + 1
    step_input, cache = input_ids, None
    check_every = 1 if device.type == "cpu" else DONE_CHECK_EVERY
    steps = 0
    for t in range(N):
        out = model(input_ids=step_input, attention_mask=full_mask[:, : P + t], position_ids=position_ids,
                    use_cache=True, **{cache_kw: cache}, **extra)
        cache = out[cache_kw] if cache_kw in out else out.past_key_values
        token, *step_floats = sample(out.logits[:, -1, :], generator=generator, return_filtered_logprobs=True,
                                     return_kept_threshold=True, **params)
        active = ~done
        token = torch.where(active, token, pad)
        tokens[:, t] = token
        floats[:, :, t] = torch.where(active, torch.stack(step_floats), 0.0)
        response_mask[:, t] = active
        full_mask[:, P + t] = active  # the model attends to this token from the next step on
        done = done | torch.isin(token, eos)
        step_input, position_ids = token[:, None], next_position
        next_position = next_position + 1
        steps = t + 1
        if steps % check_every == 0 and bool(done.all()):
            break
    n = int(response_mask[:, :steps].any(0).sum())  # steps in which some row was still generating
    return (torch.cat([input_ids, tokens[:, :n]], dim=1), response_mask[:, :n], *floats[:, :, :n])
