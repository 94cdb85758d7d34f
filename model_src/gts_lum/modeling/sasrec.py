"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018).

Causal softmax self-attention over behaviour-id embeddings plus learned absolute positions, pre-norm
blocks (attention + position-wise feed-forward, residuals, dropout), output embeddings tied to the
input table. Trained on every position of the training sequences with sampled softmax
(`training.sequential`) rather than the paper's one-negative binary cross-entropy: it is the stronger,
now standard objective for full-ranking evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gts_lum.modeling.sequence_encoder import PAD, SequenceEncoder


@dataclass
class SASRecNetConfig:
    """The network's settings; `recommenders.sasrec.SASRecConfig` adds the training's (`train`)."""

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 1
    ffn_mult: int = 1  # feed-forward width = ffn_mult * dim (the paper uses dim)
    dropout: float = 0.2


class CausalSelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SASRecConfig: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(attn.transpose(1, 2).reshape(b, n, d)))  # (B, L, D)
        return x + self.drop(self.ffn(self.norm_ffn(x)))


class SASRecEncoder(SequenceEncoder):
    def __init__(self, num_behaviors: int, max_len: int, cfg: SASRecNetConfig):
        super().__init__()
        self.item_emb = nn.Embedding(num_behaviors + 1, cfg.dim, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_len, cfg.dim)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(cfg.dim, cfg.num_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.num_layers)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim)
        self.scale = math.sqrt(cfg.dim)
        nn.init.normal_(self.item_emb.weight, std=cfg.dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    def forward(self, items: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """items, times: (B, L) -> (B, L, D). `times` is unused: SASRec only knows the order."""
        n = items.shape[1]
        if n > self.pos_emb.num_embeddings:
            raise ValueError(f"sequence of {n} positions exceeds max_len {self.pos_emb.num_embeddings}")
        valid = items != PAD  # (B, L)
        # Left padding: the newest event always gets the last position embedding.
        positions = torch.arange(self.pos_emb.num_embeddings - n, self.pos_emb.num_embeddings, device=items.device)
        x = self.drop(self.item_emb(items) * self.scale + self.pos_emb(positions)) * valid.unsqueeze(-1)
        causal = torch.ones(n, n, dtype=torch.bool, device=items.device).tril()
        # Padding keys are hidden; a padding query may see itself so that no softmax row is empty (NaN).
        allowed = (causal & (valid.unsqueeze(1) | torch.eye(n, dtype=torch.bool, device=items.device))).unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed) * valid.unsqueeze(-1)
        return self.norm(x)  # (B, L, D)
