"""Train / validation / test splits over an `EventLog`.

Leave-one-out (paper section 4.1): per user, the last event is the test target, the second-to-last the
validation target, the rest are training events. Users with fewer than `min_events` events are not
evaluated; their events all count as training. Held-out users (the paper's Table 1 trains and tests on
different users): a seeded hash puts a fraction of users aside; their last event is the test target.

Histories are prefixes of the full log: an `EvalSet` says where each user's history ends. Anything
learned from the data (popularity, graphs, clusters, importance weights) must read `Split.train` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gts_lum.data.events import EventLog, tiebreak_keys


@dataclass
class EvalSet:
    """Prediction cases: user `users[i]` sees events `log.offsets[u]:history_end[i]`, must rank `target[i]`."""

    users: np.ndarray  # (E,) int64 user index
    history_end: np.ndarray  # (E,) int64 exclusive end of the history in the full log
    target: np.ndarray  # (E,) int32 behaviour index of the event to predict
    target_time: np.ndarray  # (E,) int64 unix seconds of that event

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, idx: np.ndarray) -> "EvalSet":
        return EvalSet(self.users[idx], self.history_end[idx], self.target[idx], self.target_time[idx])

    def sample(self, n: int | None, seed: int) -> "EvalSet":
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


def _cases(log: EventLog, users: np.ndarray, back: int) -> EvalSet:
    """The event `back` places before the end of each user's sequence as target."""
    idx = log.offsets[users + 1] - back
    return EvalSet(users.astype(np.int64), idx.astype(np.int64), log.behavior[idx], log.timestamp[idx])


def leave_one_out(log: EventLog, min_events: int = 3) -> Split:
    lengths = log.lengths()
    users = np.flatnonzero(lengths >= min_events)
    keep = np.ones(log.num_events, dtype=bool)
    keep[log.offsets[users + 1] - 1] = False
    keep[log.offsets[users + 1] - 2] = False
    return Split(log, log.select_events(keep), _cases(log, users, 2), _cases(log, users, 1), "leave_one_out")


def held_out_users(log: EventLog, test_fraction: float = 0.1, seed: int = 0, min_events: int = 3) -> Split:
    """Test users never contribute training events; validation is leave-one-out on the training users."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    h = tiebreak_keys(np.arange(log.num_users), np.zeros(log.num_users, np.int64), np.zeros(log.num_users, np.int64), seed)
    is_test = (h % np.uint64(1_000_000)).astype(np.float64) < test_fraction * 1_000_000
    lengths = log.lengths()
    evaluable = lengths >= min_events
    train_users = np.flatnonzero(~is_test & evaluable)
    test_users = np.flatnonzero(is_test & evaluable)
    keep = ~np.repeat(is_test, lengths)
    keep[log.offsets[train_users + 1] - 1] = False
    return Split(log, log.select_events(keep), _cases(log, train_users, 1), _cases(log, test_users, 1), "held_out_users")


def make_split(log: EventLog, kind: str = "leave_one_out", **kwargs) -> Split:
    if kind == "leave_one_out":
        return leave_one_out(log, min_events=kwargs.get("min_events", 3))
    if kind == "held_out_users":
        return held_out_users(log, **kwargs)
    raise ValueError(f"unknown split kind {kind!r}: use leave_one_out or held_out_users")
