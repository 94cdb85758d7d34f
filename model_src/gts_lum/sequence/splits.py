"""Train / validation / test splits over an `EventLog`.

Leave-one-out (paper section 4.1): per user, the last event is the test target, the second-to-last the
validation target, the rest are training events. Users with fewer than `min_events` events are not
evaluated; their events all count as training. Held-out users (the paper's Table 1 trains and tests on
different users): a seeded hash puts a fraction of users aside; their last event is the test target.

Histories are prefixes of the full log: an `EvalSet` says where each user's history ends. Anything
learned from the data (popularity, graphs, clusters, importance weights) must read `Split.train` only.

`holdout` splits rows (users of a labels table, rows of a table, training cases) into a fitted and a
held-out part: the report users of the label tasks and the early-stopping slice of every probe and
table encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from gts_lum.data.events import EventLog, ragged_arange, tiebreak_keys


@dataclass
class EvalSet:
    """Prediction cases: user `users[i]` sees events `log.offsets[u]:history_end[i]`, must rank `target[i]`."""

    users: np.ndarray  # (E,) int64 user index
    history_end: np.ndarray  # (E,) int64 exclusive end of the history in the full log
    target: np.ndarray  # (E,) int32 behaviour index of the event to predict
    target_time: np.ndarray  # (E,) int64 unix seconds of that event

    def __len__(self) -> int:
        return len(self.users)

    def concat(self, other: EvalSet) -> EvalSet:
        return EvalSet(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields(EvalSet)))

    def subset(self, idx: np.ndarray) -> EvalSet:
        return EvalSet(self.users[idx], self.history_end[idx], self.target[idx], self.target_time[idx])

    def sample(self, n: int | None, seed: int) -> EvalSet:
        """A fixed, seeded sample of at most `n` cases (all when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self.subset(idx)


@dataclass
class Split:
    log: EventLog  # the full log: histories index into it
    train: EventLog  # training events only
    valid: EvalSet
    test: EvalSet
    kind: str


def _last_eligible(log: EventLog, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the row of the last and second-to-last eligible event (-1 where there is none)."""
    user = log.user_of_event()
    rows = np.flatnonzero(eligible)
    last = np.full(log.num_users, -1, dtype=np.int64)
    second = np.full(log.num_users, -1, dtype=np.int64)
    last[user[rows]] = rows  # rows ascend, so the last write per user wins
    rest = rows[rows != last[user[rows]]]
    second[user[rest]] = rest
    return last, second


def _cases(log: EventLog, rows: np.ndarray) -> EvalSet:
    """Cases whose targets are the events at `rows`; each history is everything of its user before it."""
    users = log.user_of_event()[rows].astype(np.int64)
    return EvalSet(users, rows.astype(np.int64), log.behavior[rows], log.timestamp[rows])


def _eligible(log: EventLog, target_behaviors: np.ndarray | None) -> np.ndarray:
    if target_behaviors is None:
        return np.ones(log.num_events, dtype=bool)
    mask = np.zeros(log.num_behaviors, dtype=bool)
    mask[target_behaviors] = True
    return mask[log.behavior]


def leave_one_out(log: EventLog, min_events: int = 3, target_behaviors: np.ndarray | None = None) -> Split:
    """Last (eligible) event = test, the one before = validation, events before that = training.

    `target_behaviors` restricts targets to a behaviour subset (e.g. OTT services, the paper's
    downstream task): the test target is the user's last such event and training stops before the
    validation target, so no event at or after it is learned from.
    """
    last, second = _last_eligible(log, _eligible(log, target_behaviors))
    starts = log.offsets[:-1]
    evaluated = (second >= 0) & (second - starts >= max(min_events - 2, 1))
    users = np.flatnonzero(evaluated)
    # training: everything of non-evaluated users; evaluated users up to their validation target
    cut = np.where(evaluated, second, log.offsets[1:])
    position = np.arange(log.num_events) - np.repeat(starts, log.lengths())
    keep = position < np.repeat(cut - starts, log.lengths())
    return Split(log, log.select_events(keep), _cases(log, second[users]), _cases(log, last[users]), "leave_one_out")


def held_out_users(
    log: EventLog, test_fraction: float = 0.1, seed: int = 0, min_events: int = 3, target_behaviors: np.ndarray | None = None
) -> Split:
    """Test users never contribute training events; validation is the last (eligible) event of training users."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    h = tiebreak_keys(np.arange(log.num_users), np.zeros(log.num_users, np.int64), np.zeros(log.num_users, np.int64), seed)
    is_test = (h % np.uint64(1_000_000)).astype(np.float64) < test_fraction * 1_000_000
    last, _ = _last_eligible(log, _eligible(log, target_behaviors))
    starts = log.offsets[:-1]
    evaluable = (last >= 0) & (last - starts >= max(min_events - 1, 1))
    train_users = np.flatnonzero(~is_test & evaluable)
    test_users = np.flatnonzero(is_test & evaluable)
    cut = np.where(~is_test & evaluable, last, np.where(is_test, starts, log.offsets[1:]))
    position = np.arange(log.num_events) - np.repeat(starts, log.lengths())
    keep = position < np.repeat(cut - starts, log.lengths())
    return Split(log, log.select_events(keep), _cases(log, last[train_users]), _cases(log, last[test_users]), "held_out_users")


def hold_out_for_validation(split: Split, n: int, target_behaviors: np.ndarray | None = None) -> Split:
    """`split` with the last `n` training events of every validated user out of training, `n - 1` of them cases.

    With leave-one-out, a validation history ends exactly where the sequence a model trains on ends, a
    test history one unseen event later. After the move every validation history ends with an event the
    model never trained on: the original validation case, and a case for each moved event but the
    first (whose history still ends with a trained event), where it is a target behaviour; so up to `n`
    cases a user. Every user keeps at least its first training event. The test set is unchanged.
    """
    if n <= 0:
        return split
    train, log_ = split.train, split.log
    users = np.unique(split.valid.users)
    moved = np.minimum(n, np.maximum(train.lengths()[users] - 1, 0))
    users, moved = users[moved > 0], moved[moved > 0]
    # the j-th training event of user u is row offsets[u] + j of both logs: training holds a prefix of each user
    train_rows = ragged_arange(train.offsets[users + 1] - moved, moved)
    user_of_row = np.repeat(users, moved)
    log_rows = train_rows - train.offsets[user_of_row] + log_.offsets[user_of_row]
    if not np.array_equal(log_.behavior[log_rows], train.behavior[train_rows]) or not np.array_equal(
        log_.timestamp[log_rows], train.timestamp[train_rows]
    ):
        raise ValueError("hold_out_for_validation: the training log is not a per-user prefix of the full log")
    keep = np.ones(train.num_events, dtype=bool)
    keep[train_rows] = False
    after_unseen = np.isin(train_rows - 1, train_rows)  # the previous event moved too
    rows = log_rows[after_unseen & _eligible(log_, target_behaviors)[log_rows]]
    return Split(log_, train.select_events(keep), split.valid.concat(_cases(log_, rows)), split.test, split.kind)


def holdout(n: int, fraction: float, seed: int, strata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out): sorted row indices of `n` rows; a seeded random `fraction` is held out.

    With `strata` (N,) non-negative ints (a class, or treatment arm x outcome), every stratum gives the
    same share: floor(its size * fraction) of its rows, so rare classes are held out in proportion. Without,
    floor(n * fraction) rows, the first of a seeded permutation of the rows. Either may be empty: callers
    that need both sides (a test set) say so themselves.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout: fraction {fraction} is not in [0, 1)")
    rng = np.random.default_rng(seed)
    groups = np.zeros(n, np.int64) if strata is None else np.asarray(strata).astype(np.int64)
    order = rng.permutation(n)
    # Rank of each row within its stratum in the shuffled order: the first `fraction` of each are held out.
    ranked = order[np.argsort(groups[order], kind="stable")]
    sizes = np.bincount(groups[ranked])
    rank = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    held = np.zeros(n, bool)
    held[ranked] = rank < np.repeat(np.floor(sizes * fraction).astype(np.int64), sizes)
    return np.flatnonzero(~held), np.flatnonzero(held)
