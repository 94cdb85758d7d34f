"""The interface of the ID-based sequence networks (SASRec, HSTU): left-padded behaviour tokens and their
timestamps in, one hidden state per position out, with a tied item embedding table.

Behaviour index b is token b + 1; token 0 (`PAD`) is padding. Sequences are left-padded, so the most
recent event is always the last column and learned absolute positions count back from it.
"""

from __future__ import annotations

import torch
from torch import nn

PAD = 0


class SequenceEncoder(nn.Module):
    """(B, L) tokens + (B, L) unix seconds -> (B, L, D) hidden states; position t sees positions <= t only."""

    item_emb: nn.Embedding  # (num_behaviors + 1, D), row PAD unused

    def forward(self, items: torch.Tensor, times: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
