"""`EventLog`: all events of a data set as integer arrays grouped by user (CSR layout).

Every model stage works on this structure rather than on DataFrames: it is compact (about 24 bytes an
event) and every operation on it is vectorized. Events are sorted by user, then timestamp, then a
seeded hash tie-break (see `tiebreak_keys`) so that equal timestamps are ordered without any bias from
item ids or file order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


def tiebreak_keys(user_index: np.ndarray, behavior_index: np.ndarray, row: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of (user, behaviour, row): orders events that share a timestamp.

    A hash (splitmix64) rather than the behaviour id, so that which of two simultaneous events counts
    as "last" (the leave-one-out test target) does not depend on how ids were assigned.
    """
    with np.errstate(over="ignore"):
        x = (
            user_index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            ^ behavior_index.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            ^ row.astype(np.uint64) * np.uint64(0x94D049BB133111EB)
            ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lengths)
    group_start = np.repeat(ends - lengths, lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64), lengths) + np.arange(total, dtype=np.int64) - group_start


def _codes(column: pd.Series, vocab: np.ndarray | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of an id column against `vocab` (sorted unique ids when None).

    Categorical columns (as validation writes them) are mapped through their categories, which is
    far cheaper than hashing millions of strings.
    """
    if isinstance(column.dtype, pd.CategoricalDtype):
        cats = column.cat.categories.astype(str)
        raw = column.cat.codes.to_numpy()
        if vocab is None:
            used = np.zeros(len(cats) + 1, dtype=bool)
            used[raw] = True  # marks the categories in use without sorting every event; -1 (missing) marks the spare last slot
            vocab_index = pd.Index(np.sort(cats[used[:-1]].to_numpy()))
        else:
            vocab_index = pd.Index(np.asarray(vocab, dtype=object))
        codes = np.append(vocab_index.get_indexer(cats), -1).astype(np.int32)[raw]  # -1 (missing) picks the appended -1
    elif vocab is None:
        codes, uniq = pd.factorize(column.astype(str), sort=True)
        vocab_index = pd.Index(uniq)
    else:
        vocab_index = pd.Index(np.asarray(vocab, dtype=object))
        codes = vocab_index.get_indexer(column.astype(str))
    if (codes < 0).any():
        bad = column.astype(str)[codes < 0].iloc[0]
        raise ValueError(f"events name {what} {bad!r} (and {int((codes < 0).sum()) - 1} more) outside the given {what} list")
    return codes.astype(np.int32, copy=False), np.asarray(vocab_index, dtype=object)


def event_order(user: np.ndarray, seconds: np.ndarray, behavior: np.ndarray, seed: int) -> np.ndarray:
    """The permutation that sorts events by (user, time, seeded hash tie-break).

    One int64 key (user, time) sorts in a single pass (and not at all when the input is already in
    order, as exports by user usually are); only the events that tie on it are ordered by the hash.
    """
    n = len(user)
    if n == 0:
        return np.zeros(0, np.int64)
    t0, span = int(seconds.min()), int(seconds.max()) - int(seconds.min())
    if span >= 1 << 34 or int(user.max()) >= 1 << 29:  # the key would overflow: three-key sort
        return np.lexsort((tiebreak_keys(user, behavior, np.arange(n), seed), seconds, user))
    key = (user.astype(np.int64) << 34) | (seconds - t0)
    in_order = bool(np.all(key[1:] >= key[:-1]))
    order = np.arange(n, dtype=np.int64) if in_order else np.argsort(key, kind="stable")
    k = key if in_order else key[order]
    tie = np.zeros(n, dtype=bool)
    same = np.flatnonzero(k[1:] == k[:-1])
    tie[same] = tie[same + 1] = True
    members = np.flatnonzero(tie)  # contiguous runs of equal keys
    if len(members):
        sub = order[members]
        order[members] = sub[np.lexsort((tiebreak_keys(user[sub], behavior[sub], sub, seed), k[members]))]
    return order


@dataclass
class EventLog:
    """Events grouped by user. Users `u`'s events are rows `offsets[u]:offsets[u+1]`, oldest first."""

    user_ids: np.ndarray  # (U,) str: external user id of user index u
    behavior_ids: np.ndarray  # (B,) str: external behaviour id of behaviour index b
    offsets: np.ndarray  # (U+1,) int64
    behavior: np.ndarray  # (N,) int32 behaviour index
    timestamp: np.ndarray  # (N,) int64 unix seconds, UTC
    value: np.ndarray | None = None  # (N,) float32, NaN where absent

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_behaviors(self) -> int:
        return len(self.behavior_ids)

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user_of_event(self) -> np.ndarray:
        """(N,) user index of every event."""
        return np.repeat(np.arange(self.num_users, dtype=np.int32), self.lengths())

    def sequence(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[u], self.offsets[u + 1]
        return self.behavior[s:e], self.timestamp[s:e]

    def select_events(self, keep: np.ndarray) -> EventLog:
        """A new log with only the events where boolean mask `keep` is true (users and catalog unchanged)."""
        counts = np.bincount(self.user_of_event()[keep], minlength=self.num_users)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return EventLog(
            self.user_ids,
            self.behavior_ids,
            offsets,
            self.behavior[keep],
            self.timestamp[keep],
            None if self.value is None else self.value[keep],
        )

    def select_users(self, users: np.ndarray) -> EventLog:
        """A new log with only the given user indices, in that order."""
        users = np.asarray(users, dtype=np.int64)
        lengths = self.lengths()[users]
        idx = ragged_arange(self.offsets[users], lengths)
        return EventLog(
            self.user_ids[users],
            self.behavior_ids,
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            self.behavior[idx],
            self.timestamp[idx],
            None if self.value is None else self.value[idx],
        )

    @classmethod
    def from_frame(
        cls,
        events: pd.DataFrame,
        behavior_ids: np.ndarray | None = None,
        user_ids: np.ndarray | None = None,
        seed: int = 0,
    ) -> EventLog:
        """Build from a clean `events` table (user_id, timestamp as datetime64 UTC or int seconds, behavior_id).

        `behavior_ids` fixes the catalog order (e.g. the behaviours table); ids outside it are an error
        here because validation has already quarantined them.
        """
        user_codes, user_ids = _codes(events["user_id"], user_ids, "user")
        beh_codes, behavior_ids = _codes(events["behavior_id"], behavior_ids, "behaviour")
        ts = events["timestamp"]
        seconds = (
            ts.array.asi8 // {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[ts.dt.unit]  # parquet may hold ms or us; asi8 is a view
            if pd.api.types.is_datetime64_any_dtype(ts)
            else ts.to_numpy(dtype=np.int64)
        )
        order = event_order(user_codes, seconds, beh_codes, seed)
        counts = np.bincount(user_codes, minlength=len(user_ids))
        value = events["value"].to_numpy(dtype=np.float32, na_value=np.nan)[order] if "value" in events else None
        return cls(
            user_ids=user_ids,
            behavior_ids=behavior_ids,
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            behavior=beh_codes[order],
            timestamp=seconds[order],
            value=value,
        )

    def save(self, path: str | Path) -> None:
        """One .npz file: the portable artifact passed between pipeline steps."""
        arrays = dict(
            user_ids=self.user_ids.astype(str),
            behavior_ids=self.behavior_ids.astype(str),
            offsets=self.offsets,
            behavior=self.behavior,
            timestamp=self.timestamp,
        )
        if self.value is not None:
            arrays["value"] = self.value
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> EventLog:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                user_ids=z["user_ids"].astype(object),
                behavior_ids=z["behavior_ids"].astype(object),
                offsets=z["offsets"],
                behavior=z["behavior"],
                timestamp=z["timestamp"],
                value=z["value"] if "value" in z else None,
            )
