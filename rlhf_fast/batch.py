"""The one batch type of the training loop: S sequences packed into N tokens, no padding.

SFT rows, preference pairs and rollouts all become a ``TokenBatch``; the models (``rlhf_fast.models``), the critic,
the reward model and the losses consume it. Per-token tensors are aligned with the *predicting* position: the value
at token t is about the next token t + 1 (its label), so ``labels``, ``old_logp``, ``advantages`` ... share one
index and one mask, ``labels != -100`` (the positions whose next token is trained on).

Shapes (N tokens, S sequences)::

    input_ids     [N] int64    the tokens of sequence 0, then of sequence 1, ...
    position_ids  [N] int64    0, 1, ... restarting at each sequence
    cu_seqlens    [S + 1] int64  sequence s is tokens cu_seqlens[s] : cu_seqlens[s + 1]
    prompt_lens   [S] int64    tokens of each sequence's prompt (the rest is its response)
    labels        [N] int64    input_ids[t + 1] where that token is a target (a response token), else -100
    old_logp, behaviour_logp, kept_threshold, is_weights,
    ref_logp, values, advantages, returns, weights             [N] float32 or None (rollouts)
    scores, group_ids                                          [S] or None (rollouts)

Under the hood the decoder runs on ``rows()``: the sequences laid first-fit into rows of ``row_len`` tokens with
per-sequence ``position_ids`` (🤗 transformers builds the block-diagonal causal mask from them), so padding is only
the rest of each row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100
PER_TOKEN = ("old_logp", "behaviour_logp", "kept_threshold", "is_weights", "ref_logp", "values", "advantages",
             "returns", "weights")
PER_SEQUENCE = ("scores", "group_ids")


@dataclass
class TokenBatch:
    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    prompt_lens: Tensor
    labels: Tensor
    old_logp: Optional[Tensor] = None
    behaviour_logp: Optional[Tensor] = None
    kept_threshold: Optional[Tensor] = None
    is_weights: Optional[Tensor] = None
    ref_logp: Optional[Tensor] = None
    values: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    returns: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    scores: Optional[Tensor] = None
    group_ids: Optional[Tensor] = None

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def pack(cls, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], device=None) -> "TokenBatch":
        """Token lists (prompt then response) and their prompt lengths -> a batch whose targets are the response
        tokens (a prompt length of 0 makes every token but the first a target)."""
        if len(sequences) != len(prompt_lens):
            raise ValueError(f"got {len(sequences)} sequences but {len(prompt_lens)} prompt lengths")
        if any(len(s) == 0 for s in sequences):
            raise ValueError("every sequence needs at least one token")
        ids, pos, labels = [], [], []
        for seq, p in zip(sequences, prompt_lens):
            n = len(seq)
            ids += list(seq)
            pos += range(n)
            first = max(p, 1)  # the first target token; position first - 1 predicts it
            labels += [IGNORE_INDEX] * (first - 1) + list(seq[first:]) + [IGNORE_INDEX]
        lens = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
        cu = torch.zeros(len(sequences) + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=cu[1:])
        t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
        return cls(t(ids), t(pos), cu.to(device), t(list(prompt_lens)), t(labels))

    @classmethod
    def from_generation(cls, sequences: Tensor, prompt_mask: Tensor, response_mask: Tensor,
                        **per_token: Optional[Tensor]) -> "TokenBatch":
        """A rollout of ``rlhf_fast.generate`` (left-padded prompts [B, P] then responses [B, R]) -> packed;
        ``per_token``: [B, R] values of the response tokens by field name (e.g. ``old_logp=out.logprobs``), placed at
        their predicting positions (None: left empty). One host read (the sequence lengths)."""
        B, P = prompt_mask.shape
        keep = torch.cat([prompt_mask.bool(), response_mask.bool()], 1)  # [B, P + R]
        # the label of position t is token t + 1 when that is a generated token
        labels = torch.full_like(sequences, IGNORE_INDEX)
        labels[:, P - 1:-1] = torch.where(response_mask.bool(), sequences[:, P:], IGNORE_INDEX)
        lens = keep.sum(1)
        cu = torch.zeros(B + 1, dtype=torch.int64, device=sequences.device)
        torch.cumsum(lens, 0, out=cu[1:])
        flat = keep.reshape(-1).nonzero().squeeze(1)
        position_ids = (keep.long().cumsum(1) - 1).reshape(-1)[flat]
        batch = cls(sequences.reshape(-1)[flat], position_ids, cu, prompt_mask.long().sum(1), labels.reshape(-1)[flat])
        def response_values(x: Tensor) -> Tensor:  # [B, R] response values at their predicting positions -> [N]
            out = torch.zeros_like(sequences, dtype=torch.float32)
            out[:, P - 1:-1] = torch.where(response_mask.bool(), x.float(), 0.0)
            return out.reshape(-1)[flat]

        for name, values in per_token.items():
            if name not in PER_TOKEN:
                raise TypeError(f"from_generation got {name!r}: not a per-token field {PER_TOKEN}")
            setattr(batch, name, None if values is None else response_values(values))
        return batch

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def seq_lens(self) -> Tensor:
        return self.cu_seqlens.diff()

    @property
    def seq_ids(self) -> Tensor:
        """[N] int64: the sequence of each token."""
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=self.input_ids.device), self.seq_lens,
                                       output_size=self.num_tokens)

    @property
    def mask(self) -> Tensor:
        """[N] bool: positions whose label is a target."""
        return self.labels != IGNORE_INDEX

    @property
    def last_index(self) -> Tensor:
        """[S] int64: each sequence's last token."""
        return self.cu_seqlens[1:] - 1

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device) -> "TokenBatch":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is not None})

    def select(self, seqs) -> "TokenBatch":
        """The sub-batch of sequences ``seqs`` (int64 tensor or list of indices), in that order."""
        seqs = torch.as_tensor(seqs, dtype=torch.int64, device=self.device)
        lens = self.seq_lens[seqs]
        cu = torch.zeros(seqs.numel() + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(lens, 0, out=cu[1:])
        n = int(cu[-1])
        # token i of the new batch: start of its sequence in the old batch + its offset within that sequence
        owner = torch.repeat_interleave(torch.arange(seqs.numel(), device=self.device), lens, output_size=n)
        index = self.cu_seqlens[seqs][owner] + torch.arange(n, device=self.device) - cu[:-1][owner]
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "cu_seqlens":
                continue
            fields[f.name] = value[seqs] if f.name in PER_SEQUENCE + ("prompt_lens",) else value[index]
        return TokenBatch(cu_seqlens=cu, **fields)

    def padded(self, x: Tensor, value: float = 0.0) -> Tensor:
        """A per-token [N] tensor as [S, L] rows (L the longest sequence), padded with ``value`` on the right."""
        L = int(self.seq_lens.max()) if self.num_seqs else 0
        out = x.new_full((self.num_seqs, L), value)
        seq_ids = self.seq_ids
        out[seq_ids, torch.arange(self.num_tokens, device=self.device) - self.cu_seqlens[seq_ids]] = x
        return out

    def unpadded(self, rows: Tensor) -> Tensor:
        """Inverse of ``padded``: [S, L] -> [N]."""
        seq_ids = self.seq_ids
        return rows[seq_ids, torch.arange(self.num_tokens, device=self.device) - self.cu_seqlens[seq_ids]]

    def rows(self, row_len: Optional[int] = None, pad_token_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """The decoder's layout: sequences placed first-fit (longest first) into rows of ``row_len`` tokens
        (default: the longest sequence, so no row costs more attention than a padded batch would).

        -> (input_ids [R, L], position_ids [R, L], index [N]: where token n sits in the flattened [R * L]).
        Row padding restarts its positions at 0, so it is a sequence of its own that no real token attends to."""
        lens = self.seq_lens.tolist()  # one host read per layout
        L = max(lens, default=1) if row_len is None else max(row_len, max(lens, default=1))
        free: list[int] = []  # free tokens left in each row
        place = [0] * len(lens)  # (row, offset) of each sequence, flattened as row * L + offset
        for s in sorted(range(len(lens)), key=lambda i: -lens[i]):
            for r, room in enumerate(free):
                if room >= lens[s]:
                    break
            else:
                r = len(free)
                free.append(L)
            place[s] = r * L + (L - free[r])
            free[r] -= lens[s]
        R = max(len(free), 1)
        starts = torch.tensor(place, dtype=torch.int64, device=self.device)
        index = starts[self.seq_ids] + self.position_ids if self.num_tokens else self.position_ids
        ids = torch.full((R * L,), pad_token_id, dtype=torch.int64, device=self.device)
        ids[index] = self.input_ids
        filled = torch.zeros(R * L, dtype=torch.bool, device=self.device)
        filled[index] = True
        pos = _run_positions(~filled.view(R, L)).reshape(-1)
        pos[index] = self.position_ids
        return ids.view(R, L), pos.view(R, L), index


def _run_positions(pad: Tensor) -> Tensor:
    """[R, L] bool padding -> 0, 1, 2, ... within each run of padding (anything elsewhere)."""
    idx = torch.arange(pad.shape[1], device=pad.device).expand_as(pad)
    last_real = torch.where(~pad, idx, -1).cummax(1).values  # index of the last real token at or before each slot
    return idx - last_real - 1
