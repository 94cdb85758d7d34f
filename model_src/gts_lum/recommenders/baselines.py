"""Count-based baselines: popularity and a first-order Markov chain over behaviours.

Both learn from `split.train` only and are strong floors: on data with few behaviours (telecom
services) or strong local order (a rating session in MovieLens) the Markov chain is hard to beat, and a
sequence model that does not beat it is not working.

Run one from its config:

    from gts_lum.recommenders.registry import build_model
    model = build_model("markov", "pkg:models/markov.yaml", ["smoothing=10"])
    stats = model.fit(split, eval_cfg)
    scores = model.score(split.log, split.test, candidates)  # (B, C)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from gts_lum.data.events import EventLog
from gts_lum.evaluation.protocol import EvalConfig, evaluate, validation_metric
from gts_lum.sequence.splits import EvalSet, Split

log = logging.getLogger(__name__)


def check_catalog(log_: EventLog, num_behaviors: int | None, model: str) -> None:
    """Scoring a log whose catalog differs from the training catalog would silently mis-index behaviours."""
    if num_behaviors is None:
        raise RuntimeError(f"{model}: score() called before fit()")
    if log_.num_behaviors != num_behaviors:
        raise ValueError(
            f"{model}: log has {log_.num_behaviors} behaviours but the model was fit on {num_behaviors}; "
            "score with the log the split was made from"
        )


@dataclass
class PopularityConfig:
    # Half-life in days for recency-weighted counts (an event `d` days older than the newest training
    # event counts 0.5 ** (d / half_life)); None counts every event once.
    half_life_days: float | None = None


class Popularity:
    """Scores every candidate by its (optionally recency-weighted) frequency in the training events."""

    def __init__(self, cfg: PopularityConfig | None = None):
        self.cfg = cfg or PopularityConfig()
        self.counts: np.ndarray | None = None  # (num_behaviors,) float64

    @staticmethod
    def describe() -> str:
        return "popularity: build_model('popularity', 'pkg:models/popularity.yaml'); fit(split, eval_cfg); score(log, cases, candidates)"

    def fit(self, split: Split, eval_cfg: EvalConfig | None = None, candidates: np.ndarray | None = None) -> dict:
        train = split.train
        if self.cfg.half_life_days is None:
            weights = None
        else:
            if self.cfg.half_life_days <= 0:
                raise ValueError(f"PopularityConfig.half_life_days must be positive, got {self.cfg.half_life_days}")
            age_days = (train.timestamp.max(initial=0) - train.timestamp) / 86400.0
            weights = 0.5 ** (age_days / self.cfg.half_life_days)
        self.counts = np.bincount(train.behavior, weights=weights, minlength=train.num_behaviors).astype(np.float64)
        return {"train_events": int(train.num_events), "behaviors_seen": int((self.counts > 0).sum())}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"counts": torch.from_numpy(self.counts)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.counts = tensors["counts"].numpy().astype(np.float64)

    def probabilities(self) -> np.ndarray:
        """(num_behaviors,) training frequency as a distribution (uniform when there is no training event)."""
        if self.counts is None:
            raise RuntimeError("popularity: probabilities() called before fit()")
        total = self.counts.sum()
        return self.counts / total if total > 0 else np.full(len(self.counts), 1.0 / len(self.counts))

    def score(self, log: EventLog, cases: EvalSet, candidates: np.ndarray) -> np.ndarray:
        check_catalog(log, None if self.counts is None else len(self.counts), "popularity")
        return np.broadcast_to(self.counts[candidates], (len(cases), len(candidates))).copy()


@dataclass
class MarkovConfig:
    # Dirichlet smoothing towards popularity: P(j | i) = (C[i, j] + s * P_pop(j)) / (C[i, :].sum() + s).
    # A source seen often trusts its own transitions, a rare one falls back to popularity. None selects
    # s from `smoothing_grid` on the validation cases.
    smoothing: float | None = None
    smoothing_grid: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1000.0])
    popularity: PopularityConfig = field(default_factory=PopularityConfig)
    select_metric: str = "NDCG@10"


class MarkovChain:
    """First-order next-behaviour model: transition counts between consecutive training events of a user.

    A history is scored from its last behaviour; an empty history gets the popularity prior.
    """

    def __init__(self, cfg: MarkovConfig | None = None):
        self.cfg = cfg or MarkovConfig()
        self.popularity = Popularity(self.cfg.popularity)
        self.transitions: sp.csr_matrix | None = None  # (num_behaviors, num_behaviors) counts
        self.smoothing: float | None = self.cfg.smoothing

    @staticmethod
    def describe() -> str:
        return "markov: build_model('markov', 'pkg:models/markov.yaml'); fit(split, eval_cfg) selects the smoothing on split.valid"

    def fit(self, split: Split, eval_cfg: EvalConfig | None = None, candidates: np.ndarray | None = None) -> dict:
        train = split.train
        self.popularity.fit(split)
        # Consecutive pairs inside one user's sequence: drop the pair that crosses into the next user.
        same_user = np.ones(max(train.num_events - 1, 0), dtype=bool)
        boundaries = train.offsets[1:-1] - 1
        same_user[boundaries[(boundaries >= 0) & (boundaries < len(same_user))]] = False
        src, dst = train.behavior[:-1][same_user], train.behavior[1:][same_user]
        n = train.num_behaviors
        self.transitions = sp.csr_matrix((np.ones(len(src)), (src, dst)), shape=(n, n), dtype=np.float64)
        self.transitions.sum_duplicates()
        stats = {"transitions": int(len(src)), "nonzero_pairs": int(self.transitions.nnz)}
        if self.cfg.smoothing is not None:
            if self.cfg.smoothing < 0:
                raise ValueError(f"MarkovConfig.smoothing must be >= 0, got {self.cfg.smoothing}")
            self.smoothing = float(self.cfg.smoothing)
            return {**stats, "smoothing": self.smoothing}
        if not self.cfg.smoothing_grid:
            raise ValueError("MarkovConfig: smoothing is None and smoothing_grid is empty; set one of them")
        results = {}
        for s in self.cfg.smoothing_grid:
            self.smoothing = float(s)
            metrics = evaluate(self, split.log, split.valid, candidates, eval_cfg, desc=f"markov valid s={s}")
            results[float(s)] = validation_metric(metrics, self.cfg.select_metric)
            log.info("markov smoothing=%g valid %s=%.4f", s, self.cfg.select_metric, results[float(s)])
        # Ties go to the first (smallest) value in grid order: deterministic.
        self.smoothing = max(results, key=results.get)
        return {**stats, "smoothing": self.smoothing, f"valid_{self.cfg.select_metric}": results[self.smoothing], "grid": results}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = self.transitions
        return {
            "transitions.data": torch.from_numpy(t.data),
            "transitions.indices": torch.from_numpy(t.indices.astype(np.int64)),
            "transitions.indptr": torch.from_numpy(t.indptr.astype(np.int64)),
            "popularity.counts": torch.from_numpy(self.popularity.counts),
            "smoothing": torch.tensor(self.smoothing, dtype=torch.float64),
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], device: str = "cpu") -> None:
        n = len(tensors["popularity.counts"])
        self.transitions = sp.csr_matrix(
            (tensors["transitions.data"].numpy(), tensors["transitions.indices"].numpy(), tensors["transitions.indptr"].numpy()),
            shape=(n, n),
        )
        self.popularity.load_state_tensors({"counts": tensors["popularity.counts"]})
        self.smoothing = float(tensors["smoothing"])

    def score(self, log: EventLog, cases: EvalSet, candidates: np.ndarray) -> np.ndarray:
        check_catalog(log, None if self.transitions is None else self.transitions.shape[0], "markov")
        prior = self.popularity.probabilities()[candidates]  # (C,)
        has_history = cases.history_end > log.offsets[cases.users]
        last = np.where(has_history, log.behavior[np.maximum(cases.history_end - 1, 0)], 0)
        rows = self.transitions[last]  # (B, num_behaviors) sparse
        counts = rows[:, candidates].toarray()  # (B, C)
        totals = np.asarray(rows.sum(axis=1)).ravel()  # (B,) all transitions out of `last`, not only to candidates
        counts[~has_history] = 0.0
        totals[~has_history] = 0.0
        s = self.smoothing
        denom = totals + s
        # s = 0 with an unseen source leaves nothing to rank by: fall back to the prior.
        return np.where(denom[:, None] > 0, (counts + s * prior[None, :]) / np.maximum(denom, 1e-12)[:, None], prior[None, :])
