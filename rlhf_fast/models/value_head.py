"""Scalar-head model for the reward model and the PPO critic: a causal LM body (``AutoModel``) and a linear head
H -> 1, on packed ``TokenBatch`` input. ``forward`` gives a value at every token [N]; ``score`` reads it at each
sequence's last token [S]."""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn
from transformers import AutoModel

from .loading import attn_implementation
from .logprobs import decoder_hidden

HEAD_FILE = "scalar_head.pt"


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
        """From a directory saved by ``save_pretrained`` or from a causal LM checkpoint (new head)."""
        device = torch.device(device)
        body = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                         attn_implementation=attn_implementation(device))
        model = cls(body)
        head = os.path.join(path, HEAD_FILE)
        if os.path.exists(head):
            model.head.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
        return model.to(device)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.body.save_pretrained(path)
        tmp = os.path.join(path, HEAD_FILE + ".tmp")
        torch.save(self.head.state_dict(), tmp)
        os.replace(tmp, os.path.join(path, HEAD_FILE))
        with open(os.path.join(path, "scalar_head.json"), "w") as f:
            json.dump({"kind": "scalar_head", "hidden_size": self.config.hidden_size}, f)
