"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., "Actions Speak Louder than Words:
Trillion-Parameter Sequential Transducers for Generative Recommendations", ICML 2024), written from
the paper's equations (its section 3.1):

    U, V, Q, K = Split(phi1(f1(X)))                                   (1)
    A(X) V(X)  = phi2(Q K^T + rab^{p,t}) V                            (2)
    Y(X)       = f2(Norm(A(X) V(X)) * U(X))                           (3)

with phi1 = phi2 = SiLU. Attention is pointwise (no softmax): each weight stands on its own, so the
output keeps how *much* of the history relates to the query, not only its mix; it is divided by the
sequence length N, here the padded length max_len, so that no position depends on how many follow it.
rab^{p,t} is a learned relative attention bias indexed by the relative position (i - j) and by a
log-scale bucket of the time gap (t_i - t_j) between query event i and key event j. Layers are
residual, X <- X + Y(LN(X)) (pre-norm); there is no absolute position embedding, positions and time
enter through rab only.

The time gap is measured between events of the history (t_i - t_j >= 0 under the causal mask), so the
model never reads the time of the event it predicts. Trained with sampled softmax / InfoNCE
(`training.sequential`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gts_lum.modeling.sequence_encoder import PAD, SequenceEncoder


@dataclass
class HSTUNetConfig:
    """The network's settings; `recommenders.hstu.HSTUConfig` adds the training's (`train`)."""

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    qk_dim: int = 32  # per head, for Q and K
    v_dim: int = 32  # per head, for V and U
    dropout: float = 0.2
    num_time_buckets: int = 64
    time_bucket_base: float = 1.5  # bucket = floor(log_base(1 + gap seconds)), capped at num_time_buckets - 1


def time_buckets(times: torch.Tensor, base: float, num_buckets: int) -> torch.Tensor:
    """(B, L) unix seconds -> (B, L, L) bucket of the gap t_i - t_j on a log scale (negative gaps -> 0)."""
    gap = (times.unsqueeze(2) - times.unsqueeze(1)).clamp(min=0).float()  # fp32 is exact enough for a log bucket
    return (torch.log1p(gap) / math.log(base)).floor().long().clamp(max=num_buckets - 1)


class RelativeAttentionBias(nn.Module):
    """rab^{p,t}: one learned scalar per head for each relative position and for each time bucket."""

    def __init__(self, max_len: int, num_heads: int, num_time_buckets: int):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(num_heads, max_len))
        self.time = nn.Parameter(torch.zeros(num_heads, num_time_buckets))

    def forward(self, rel_pos: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        """rel_pos: (L, L) i - j clamped to [0, max_len); buckets: (B, L, L) -> (B, H, L, L)."""
        return self.position[:, rel_pos].unsqueeze(0) + self.time[:, buckets].transpose(0, 1)


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUNetConfig, max_len: int):
        super().__init__()
        self.h, self.dqk, self.dv = cfg.num_heads, cfg.qk_dim, cfg.v_dim
        self.norm_in = nn.LayerNorm(cfg.dim)
        self.f1 = nn.Linear(cfg.dim, self.h * (2 * self.dv + 2 * self.dqk))
        self.rab = RelativeAttentionBias(max_len, cfg.num_heads, cfg.num_time_buckets)
        self.norm_av = nn.LayerNorm(self.h * self.dv)
        self.f2 = nn.Linear(self.h * self.dv, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rel_pos: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D); mask: (B, 1, L, L) 1/N where key j <= query i is a real event, else 0 -> (B, L, D)."""
        b, n, _ = x.shape
        u, v, q, k = F.silu(self.f1(self.norm_in(x))).split([self.h * self.dv] * 2 + [self.h * self.dqk] * 2, dim=-1)
        q = q.view(b, n, self.h, self.dqk).transpose(1, 2)  # (B, H, L, dqk)
        k = k.view(b, n, self.h, self.dqk).transpose(1, 2)
        v = v.view(b, n, self.h, self.dv).transpose(1, 2)  # (B, H, L, dv)
        weights = F.silu(q @ k.transpose(-1, -2) + self.rab(rel_pos, buckets)) * mask  # (B, H, L, L)
        av = (self.drop(weights) @ v).transpose(1, 2).reshape(b, n, self.h * self.dv)
        return x + self.drop(self.f2(self.norm_av(av) * u))


class HSTUEncoder(SequenceEncoder):
    def __init__(self, num_behaviors: int, max_len: int, cfg: HSTUNetConfig):
        super().__init__()
        if cfg.time_bucket_base <= 1.0 or cfg.num_time_buckets < 1:
            raise ValueError(
                f"HSTUConfig: time_bucket_base must be > 1 and num_time_buckets >= 1, got {cfg.time_bucket_base}, {cfg.num_time_buckets}"
            )
        self.cfg = cfg
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_behaviors + 1, cfg.dim, padding_idx=PAD)
        self.layers = nn.ModuleList(HSTULayer(cfg, max_len) for _ in range(cfg.num_layers))
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim)
        self.scale = math.sqrt(cfg.dim)
        nn.init.normal_(self.item_emb.weight, std=cfg.dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    def forward(self, items: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """items, times: (B, L) tokens and unix seconds -> (B, L, D)."""
        n = items.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence of {n} positions exceeds max_len {self.max_len}")
        valid = items != PAD  # (B, L)
        idx = torch.arange(n, device=items.device)
        rel_pos = (idx.unsqueeze(1) - idx.unsqueeze(0)).clamp(0, self.max_len - 1)  # (L, L)
        buckets = time_buckets(times, self.cfg.time_bucket_base, self.cfg.num_time_buckets)  # (B, L, L)
        allowed = (idx.unsqueeze(1) >= idx.unsqueeze(0)) & valid.unsqueeze(1)  # (B, L, L) causal & real key
        # Pointwise weights are normalized by the sequence length N (the padded max_len, so that a
        # position's output cannot depend on how many events follow it).
        mask = (allowed.float() / self.max_len).unsqueeze(1)  # (B, 1, L, L)
        x = self.drop(self.item_emb(items) * self.scale) * valid.unsqueeze(-1)
        for layer in self.layers:
            x = layer(x, mask, rel_pos, buckets) * valid.unsqueeze(-1)
        return self.norm(x)
