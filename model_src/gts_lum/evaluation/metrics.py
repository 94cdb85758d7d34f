"""Ranking metrics from the rank of the true item (0 = ranked first). One relevant item per case."""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (5, 10, 50, 200)


def target_ranks(scores: np.ndarray, target_col: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Rank of the target column in each row of `scores` (B, C).

    Ties are broken at random (seeded): counting ties in the target's favour would reward a model that
    gives every candidate the same score, counting them against it would punish it.
    """
    rows = np.arange(len(scores))
    t = scores[rows, target_col][:, None]
    greater = (scores > t).sum(axis=1)
    equal = (scores == t).sum(axis=1) - 1
    if rng is None:
        rng = np.random.default_rng(0)
    return greater + np.floor(rng.random(len(scores)) * (equal + 1)).astype(np.int64)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks < k)) if len(ranks) else float("nan")


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    if not len(ranks):
        return float("nan")
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean())


def mrr(ranks: np.ndarray) -> float:
    return float(np.mean(1.0 / (ranks + 1.0))) if len(ranks) else float("nan")


def ranking_metrics(ranks: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"R@{k}"] = recall_at_k(ranks, k)
    for k in ks:
        out[f"NDCG@{k}"] = ndcg_at_k(ranks, k)
    out["MRR"] = mrr(ranks)
    out["n"] = int(len(ranks))
    return out
