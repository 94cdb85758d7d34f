"""Full-ranking evaluation of any model that scores candidates for a batch of histories.

A model is anything with `score(log, cases, candidates) -> (B, C) array`: the histories are prefixes
of `log` as `cases` (an `EvalSet` batch) describes them, the candidates are behaviour indices. Higher
is better. Scores of -inf are allowed (e.g. for filtered items).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from gts_lum.data.events import EventLog, ragged_arange
from gts_lum.evaluation.metrics import DEFAULT_KS, ranking_metrics, target_ranks
from gts_lum.sequence.splits import EvalSet

log = logging.getLogger(__name__)


class Scorer(Protocol):
    def score(self, log: EventLog, cases: EvalSet, candidates: np.ndarray) -> np.ndarray: ...


@dataclass
class EvalConfig:
    ks: tuple[int, ...] = DEFAULT_KS
    batch_size: int = 256
    history_filter: bool = False  # mask behaviours already in the history (MovieLens-style data)
    max_users: int | None = None  # evaluate a fixed seeded sample of cases when set
    seed: int = 0


def history_mask(log: EventLog, cases: EvalSet, candidates: np.ndarray) -> np.ndarray:
    """(B, C) bool: candidate c occurs in case b's history."""
    pos = np.full(log.num_behaviors, -1, dtype=np.int64)
    pos[candidates] = np.arange(len(candidates))
    mask = np.zeros((len(cases), len(candidates)), dtype=bool)
    starts = log.offsets[cases.users]
    lengths = cases.history_end - starts
    rows = np.repeat(np.arange(len(cases)), lengths)
    cols = pos[log.behavior[ragged_arange(starts, lengths)]]
    ok = cols >= 0
    mask[rows[ok], cols[ok]] = True
    return mask


def evaluate(
    model: Scorer,
    log: EventLog,
    cases: EvalSet,
    candidates: np.ndarray | None = None,
    cfg: EvalConfig | None = None,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Recall@K, NDCG@K and MRR of `model` over `cases`, ranking the whole candidate set.

    Cases whose target is outside the candidate set cannot be ranked: they are counted in
    `skipped_target_not_candidate` and left out of the averages.
    """
    cfg = cfg or EvalConfig()
    candidates = np.arange(log.num_behaviors) if candidates is None else np.asarray(candidates)
    col = np.full(log.num_behaviors, -1, dtype=np.int64)
    col[candidates] = np.arange(len(candidates))
    in_catalog = col[cases.target] >= 0
    skipped = int((~in_catalog).sum())
    cases = cases.subset(np.flatnonzero(in_catalog)).sample(cfg.max_users, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    ranks = []
    for start in tqdm(range(0, len(cases), cfg.batch_size), desc=desc, leave=False, disable=None):
        batch = cases.subset(np.arange(start, min(start + cfg.batch_size, len(cases))))
        scores = np.asarray(model.score(log, batch, candidates), dtype=np.float64)
        if cfg.history_filter:
            scores[history_mask(log, batch, candidates)] = -np.inf
        ranks.append(target_ranks(scores, col[batch.target], rng))
    ranks_all = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    out = ranking_metrics(ranks_all, tuple(cfg.ks))
    out["skipped_target_not_candidate"] = skipped
    out["num_candidates"] = int(len(candidates))
    return out


def validation_metric(metrics: dict[str, float], name: str) -> float:
    """The model-selection figure from `evaluate` on split.valid, with clear errors when there is none."""
    if name not in metrics:
        raise ValueError(f"select_metric {name!r} is not among the evaluated metrics {sorted(metrics)}; check EvalConfig.ks")
    if metrics.get("n", 0) == 0:
        raise ValueError("split.valid has no case whose target is a candidate: nothing to select on")
    return float(metrics[name])
