"""Scalar-head model for the reward model and the PPO critic: a causal LM body (``AutoModel``) and a linear head
H -> 1. ``forward`` gives a value at every position [B, T]; ``score`` reads it at each sequence's last non-pad token."""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn
from transformers import AutoModel

from .tiny import attn_implementation

HEAD_FILE = "scalar_head.pt"


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens, so left padding does not shift them: [B, T] int64."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last non-pad token of each row (rows may be left- or right-padded): [B] int64."""
    T = attention_mask.shape[-1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).amax(-1).clamp(min=0)


class ScalarHeadModel(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.config = body.config
        self.head = nn.Linear(body.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (body.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask [B, T] -> float32 values [B, T]."""
        h = self.body(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask)).last_hidden_state
        return self.head(h).squeeze(-1).float()

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The reward: the value at each sequence's last non-pad token, float32 [B]."""
        values = self(input_ids, attention_mask)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

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
