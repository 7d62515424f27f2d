"""Scalar-head model for the reward model and the PPO critic: a causal LM body (``AutoModel``) and a linear head
H -> 1, on packed ``TokenBatch`` input. ``forward`` gives a value at every token [N]; ``score`` reads it at each
sequence's last token [S].

Saved in the 🤗 format of ``AutoModelForSequenceClassification`` (num_labels=1): the body under the family's
``base_model_prefix`` (``model.`` for Llama / Qwen2 / Mistral, ``transformer.`` for GPT-2) and the head's weight as
``score.weight``, so ``AutoModelForSequenceClassification.from_pretrained(dir, num_labels=1)`` scores at the last
non-pad token (``config.pad_token_id``) what ``score`` does. That class's head has no bias: ours is kept in
``scalar_head.json`` (a reward model's stays 0: the Bradley–Terry loss has no gradient for it; a critic's is
restored by ``from_pretrained`` here). Directories of older versions (body + ``scalar_head.pt``) still load.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .loading import attn_implementation
from .logprobs import decoder_hidden

HEAD_FILE = "scalar_head.pt"  # the head of directories saved by older versions
INFO_FILE = "scalar_head.json"


class ScalarHeadModel(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.config = body.config
        self.head = nn.Linear(body.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (body.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch) -> Tensor:
        """A packed ``TokenBatch`` -> float32 values [N], one per token (the critic's V of the state ending there)."""
        return self.head(decoder_hidden(self.body, batch)).squeeze(-1).float()

    def score(self, batch) -> Tensor:
        """The reward: the value at each sequence's last token, float32 [S]."""
        return self(batch)[batch.last_index]

    @classmethod
    def from_pretrained(cls, path: str, device: torch.device | str = "cpu") -> "ScalarHeadModel":
        """From a directory saved by ``save_pretrained`` (or any ``...ForSequenceClassification`` checkpoint with one
        label), an older one (body + ``scalar_head.pt``), or a causal LM checkpoint (new head)."""
        device = torch.device(device)
        kwargs = dict(dtype=torch.float32, local_files_only=True, attn_implementation=attn_implementation(device))
        architectures = AutoConfig.from_pretrained(path, local_files_only=True).architectures or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            hf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
            model = cls(getattr(hf, hf.base_model_prefix))
            with torch.no_grad():
                model.head.weight.copy_(hf.score.weight)
                model.head.bias.fill_(_read_info(path).get("bias", 0.0))
            return model.to(device)
        model = cls(AutoModel.from_pretrained(path, **kwargs))
        head = os.path.join(path, HEAD_FILE)
        if os.path.exists(head):
            model.head.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
        return model.to(device)

    def save_pretrained(self, path: str) -> None:
        """The 🤗 ``AutoModelForSequenceClassification`` (num_labels=1) format, plus ``scalar_head.json`` (kind,
        hidden size, the head's bias). The body's parameters are shared, not copied."""
        os.makedirs(path, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.num_labels = 1
        with torch.device("meta"):
            hf = AutoModelForSequenceClassification.from_config(config)
        setattr(hf, hf.base_model_prefix, self.body)
        hf.score = nn.Linear(config.hidden_size, 1, bias=False)
        hf.score.weight = self.head.weight
        hf.save_pretrained(path)
        with open(os.path.join(path, INFO_FILE), "w") as f:
            json.dump({"kind": "scalar_head", "hidden_size": self.config.hidden_size,
                       "bias": float(self.head.bias.detach().float().item())}, f)


def _read_info(path: str) -> dict:
    info = os.path.join(path, INFO_FILE)
    if not os.path.exists(info):
        return {}
    with open(info) as f:
        return json.load(f)
