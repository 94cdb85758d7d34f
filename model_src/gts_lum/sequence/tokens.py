"""`TokenSequences`: ragged (CSR) token sequences, the output of the timestamp process.

One sequence per prediction case (or per user). Tokens of sequence `i` are rows
`offsets[i]:offsets[i+1]` of the per-token arrays. A token is a behaviour, a semantic time descriptor
("weekday evening rush hour"), the interval separator [SEP], or a timestamp-text token (Table 3 "w txt
emb" variant); `kind` says which and `value` holds the behaviour index or descriptor id. See
`gts_lum.sequence.timestamp_process` for how sequences are built.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from pathlib import Path

import numpy as np

from gts_lum.data.events import ragged_arange


class TokenKind(IntEnum):
    BEHAVIOR = 0  # value: behaviour index
    DESCRIPTOR = 1  # value: descriptor id; opens an interval (tds_k in Eq. 1)
    SEP = 2  # value: -1; closes an interval that is followed by another one
    TIME_TEXT = 3  # value: descriptor id; timestamp text before one behaviour ("w txt emb")


SPECIAL_VALUE = -1  # `value` of tokens that carry no id ([SEP])
COMPONENT_NAMES = ("year", "month", "day", "hour", "minute", "second")

# Per-token arrays in save/load order; `components` is optional ("w comp emb" variant only).
_TOKEN_FIELDS = ("kind", "value", "time_id", "position", "timestamp", "week_slot", "source_row")


@dataclass
class TokenSequences:
    """Token sequences of `len(self)` cases. Per-token arrays have length `num_tokens`."""

    offsets: np.ndarray  # (S+1,) int64
    kind: np.ndarray  # (T,) uint8 TokenKind
    value: np.ndarray  # (T,) int32 behaviour index | descriptor id | -1
    time_id: np.ndarray  # (T,) int64 interval index since the epoch, in operator local time
    position: np.ndarray  # (T,) int32 position id for the decoder (shared inside an interval in "position")
    timestamp: np.ndarray  # (T,) int64 unix seconds UTC (special tokens: first/last event of their interval)
    week_slot: np.ndarray  # (T,) int16 interval-of-week slot: weekday (Mon=0) * slots_per_day + slot of day
    source_row: np.ndarray  # (T,) int64 row of the behaviour in the source EventLog, -1 for other tokens
    users: np.ndarray  # (S,) int64 user index of each sequence
    descriptor_texts: tuple[str, ...]  # descriptor id -> text
    variant: str
    timezone: str
    components: np.ndarray | None = None  # (T, 6) int16 local year, month, day, hour, minute, second

    def __post_init__(self) -> None:
        self.descriptor_texts = tuple(str(t) for t in self.descriptor_texts)
        n = int(self.offsets[-1]) if len(self.offsets) else -1
        if len(self.offsets) != len(self.users) + 1 or n < 0 or np.any(np.diff(self.offsets) < 0):
            raise ValueError(
                f"TokenSequences.offsets: expected a non-decreasing array of len(users) + 1 = {len(self.users) + 1}, "
                f"got length {len(self.offsets)}"
            )
        for name in _TOKEN_FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"TokenSequences.{name}: length {len(getattr(self, name))} != offsets[-1] = {n}")
        if self.components is not None and self.components.shape != (n, len(COMPONENT_NAMES)):
            raise ValueError(f"TokenSequences.components: shape {self.components.shape} != ({n}, {len(COMPONENT_NAMES)})")

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> dict[str, np.ndarray]:
        """The per-token arrays of sequence `i` (views, not copies)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i %= len(self)
        s, e = self.offsets[i], self.offsets[i + 1]
        out = {name: getattr(self, name)[s:e] for name in _TOKEN_FIELDS}
        if self.components is not None:
            out["components"] = self.components[s:e]
        return out

    def subset(self, idx: np.ndarray) -> TokenSequences:
        """The sequences `idx`, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths()[idx]
        rows = ragged_arange(self.offsets[idx], lengths)
        return self._with(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), rows, self.users[idx])

    def _with(self, offsets: np.ndarray, rows: np.ndarray, users: np.ndarray) -> TokenSequences:
        per_token = {name: getattr(self, name)[rows] for name in _TOKEN_FIELDS}
        components = None if self.components is None else self.components[rows]
        return TokenSequences(
            offsets=offsets,
            users=users,
            descriptor_texts=self.descriptor_texts,
            variant=self.variant,
            timezone=self.timezone,
            components=components,
            **per_token,
        )

    @classmethod
    def concat(cls, parts: list[TokenSequences]) -> TokenSequences:
        """Sequences of `parts` one after another (parts built with the same config)."""
        if not parts:
            raise ValueError("TokenSequences.concat: no parts")
        head = parts[0]
        for p in parts[1:]:
            if (p.variant, p.timezone, p.descriptor_texts) != (head.variant, head.timezone, head.descriptor_texts):
                raise ValueError("TokenSequences.concat: parts differ in variant, timezone or descriptor vocabulary")
            if (p.components is None) != (head.components is None):
                raise ValueError("TokenSequences.concat: some parts have time components and some do not")
        lengths = np.concatenate([p.lengths() for p in parts])
        per_token = {name: np.concatenate([getattr(p, name) for p in parts]) for name in _TOKEN_FIELDS}
        return cls(
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            users=np.concatenate([p.users for p in parts]),
            descriptor_texts=head.descriptor_texts,
            variant=head.variant,
            timezone=head.timezone,
            components=None if head.components is None else np.concatenate([p.components for p in parts]),
            **per_token,
        )

    def render(self, i: int, behavior_names: np.ndarray | list[str] | None = None, max_tokens: int | None = 60) -> str:
        """Sequence `i` as readable text for logs, e.g. `weekday noon | Streams video | [SEP] | ...`.

        `behavior_names` maps behaviour index -> text (e.g. `EventLog.behavior_ids` or the behaviours
        table's descriptions); without it behaviours print as `b<index>`. Only the last `max_tokens`
        tokens are shown (the most recent ones, which the budget keeps too).
        """
        tok = self.sequence(i)
        start = 0 if max_tokens is None else max(0, len(tok["kind"]) - max_tokens)
        words = ["..."] if start else []
        for t in range(start, len(tok["kind"])):
            kind, value = int(tok["kind"][t]), int(tok["value"][t])
            if kind == TokenKind.BEHAVIOR:
                word = str(behavior_names[value]) if behavior_names is not None else f"b{value}"
                if self.components is not None:
                    y, mo, d, h, mi, s = (int(c) for c in tok["components"][t])
                    word += f" @{y:04d}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d}"
            elif kind == TokenKind.DESCRIPTOR:
                word = self.descriptor_texts[value]
            elif kind == TokenKind.TIME_TEXT:
                word = f"<{self.descriptor_texts[value]}>"
            else:
                word = "[SEP]"
            words.append(word)
        return " | ".join(words)

    def save(self, path: str | Path) -> None:
        """One .npz file (no pickled objects): the artifact between the sequence step and training."""
        arrays = {name: getattr(self, name) for name in ("offsets", "users", *_TOKEN_FIELDS)}
        arrays["descriptor_texts"] = np.asarray(self.descriptor_texts, dtype=str)
        arrays["variant"] = np.asarray(self.variant)
        arrays["timezone"] = np.asarray(self.timezone)
        if self.components is not None:
            arrays["components"] = self.components
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> TokenSequences:
        with np.load(path, allow_pickle=False) as z:
            missing = sorted({f.name for f in fields(cls)} - {"components"} - set(z.files))
            if missing:
                raise ValueError(f"{path}: not a TokenSequences file, missing array(s) {missing}")
            return cls(
                offsets=z["offsets"],
                users=z["users"],
                descriptor_texts=tuple(z["descriptor_texts"].tolist()),
                variant=str(z["variant"]),
                timezone=str(z["timezone"]),
                components=z["components"] if "components" in z.files else None,
                **{name: z[name] for name in _TOKEN_FIELDS},
            )
