"""The timestamp process (paper section 3.2, Eq. 1) and the Table 3 variants: events -> token sequences.

Design
======

Intervals and time IDs.
    Each day of the operator's *local* calendar (IANA `timezone`, DST included) is cut into fixed
    intervals of `interval_minutes` (15 in the paper). An event's local wall-clock time is its UTC
    timestamp plus the zone offset in force at that instant (pandas `tz_convert`, vectorized). The
    **time ID** of an event is the index of its local interval counted from 1970-01-01 00:00 local time:
    global and comparable across users. Models use it only relatively: events of one user with the
    same time ID co-occur (one group), [SEP] goes between groups, the "position" variant shares a
    position ID per group, and the gap to the prediction time is a time-ID difference.
    The **interval-of-week slot** (`weekday * slots_per_day + slot_of_day`, Monday = 0) is exposed per
    token too. On the autumn DST change the repeated local hour maps onto the same intervals as its
    first pass (intervals follow the wall clock); groups are *runs* of consecutive events with equal time
    ID, so a sequence whose time ID steps back in that hour stays well formed.

Semantic descriptors.
    Every interval gets a descriptor "<day type> <day part>": day type is weekday or weekend
    (`weekend_days`, Saturday and Sunday by default), day parts are configurable clock ranges that must
    cover the day exactly once and fall on the interval grid (a clear error otherwise). Defaults, from
    the paper's six categories plus the afternoon the paper does not name:

        late night 23:00-06:00, normal morning hour 06:00-07:00 and 09:30-11:30,
        morning rush hour 07:00-09:30, noon 11:30-13:30, normal afternoon hour 13:30-17:00,
        evening rush hour 17:00-19:30, normal evening hour 19:30-23:00.

    The afternoon is its own "normal afternoon hour": folding 3.5 hours into "noon" or "normal evening
    hour" would give one descriptor two very different usage regimes. Following the paper's example
    (Monday 9:00 is "weekday morning rush hour", the same time on Sunday a "weekend normal hour"), a day
    part may name a `weekend_name`: on weekends the rush hours read as the normal hour of that half of
    the day. The default vocabulary thus has 7 weekday + 5 weekend = 12 descriptors; ids follow the
    clock from midnight, weekday texts first (`TimeGrid.descriptor_texts`). `describe_time` gives the
    descriptor of any instant (the serving layer's prediction time).

Main sequence.
    Telecom events come from sources of different granularity (per-second sessions, daily usage
    records stamped at local midnight, monthly bills). Each behaviour has a source: given (e.g. the
    behaviours table's type column) or inferred from training timestamps as the coarsest grid all its
    events lie on: "monthly" (local midnight of the 1st), "daily" (local midnight), "hourly" (whole
    local hours) or "event" (anything finer; also behaviours with fewer than `granularity_min_events`
    training events, whose grid cannot be told). `main_sequence="all"` puts every source on the one
    interval grid (a daily record lands in the late-night interval at midnight); `"longest"` keeps only
    the source with the most training events (the paper's "select the longest time series as the main
    sequence"); any other value names one source. Events of other sources are dropped from the token
    sequence (they reach the model through the table encoders).

Building one sequence (all sequences at once, vectorized over events; no Python loop per event/user).
    1. History: case i sees its user's log rows up to `history_end[i]` (exclusive; `EvalSet`), so a
       sequence never holds the target or anything after it (an event that shares the target's
       timestamp but precedes it in the log's tie-break order is history, as in the split); a user
       array means whole users. Cases are built in chunks of about `chunk_events` events.
    2. Main-sequence filter, local time, time IDs, groups (runs of equal time ID per sequence).
    3. `dedup_within_interval`: a behaviour repeated inside one interval is kept once, at its latest
       occurrence: ten location updates in 15 minutes say "was moving", not ten things, and the
       interval still ends on the behaviour it ended on (the next step's cue; see step 4).
    4. `max_behaviors_per_interval`: a burst keeps its latest behaviour and the most important others,
       `max_behaviors_per_interval` in all, so one busy interval cannot eat the budget. The latest
       always stays: it is where the interval ended, and in the last interval the strongest cue for
       what comes next (a burst of ratings would otherwise lose its last one to rarer titles).
    5. Token budget (`token_budget`, 240 in the paper), recency first: whole intervals are kept from
       the most recent backwards while their tokens fit, counting the descriptor and [SEP] tokens of
       the chosen variant; the oldest interval that does not fit whole (the boundary interval) gets
       the room left, filled the same way (its latest, then the most important); older intervals are
       dropped. The paper "samples by importance ratio"; we keep recency as the primary key because
       next-behaviour prediction depends most on the latest intervals, and use importance only where
       a choice inside an interval must be made (steps 4 and 5), deterministically so that training,
       evaluation and serving see the same sequence.
    Importance is the inverse document frequency of a behaviour over *training* users,
    `ln((1 + U) / (1 + df_b)) + 1` (`BehaviorStats.fit`), so a rare, informative event (a call drop)
    beats the 30th location update; ties go to the more recent event. `importance="uniform"` (or no
    stats) makes both choices purely by recency; callers may also pass their own weights.
    Kept behaviours stay in time order inside their interval.

Variants (Table 3), one function, `variant=`:
    interval   (GTS-LUM, Eq. 1)  tds_1 b_1 .. b_j [SEP] tds_2 b_j+1 .. [SEP] .. tds_k .. b_n
                                 (`separator: false`: the same without [SEP], the descriptor marks the boundary)
    none       ("w/o timestamp") behaviours only
    text       ("w txt emb")     t_1 b_1 t_2 b_2 ..: t_i is a TIME_TEXT token whose text is the
                                 descriptor of b_i's interval (the same vocabulary as tds_k)
    component  ("w comp emb", HLLM) behaviours only, plus per-token local (year, month, day, hour,
                                 minute, second) in `TokenSequences.components` for an embedding MLP
    position   ("w pos emb")     behaviours only; tokens of one interval share a position ID (the rank
                                 of the interval inside the kept sequence)
    Steps 3-5 are the same for every variant (only token costs differ), so the variants differ in how
    time is encoded, not in which behaviours they see, up to the budget. `position` is the token's
    index in its sequence except in the "position" variant. Descriptor and [SEP] tokens carry the
    time ID and week slot of their interval and the timestamp of its first / last kept behaviour, so
    timestamps never decrease along a sequence.

Output: `TokenSequences` (`gts_lum.sequence.tokens`), one CSR sequence per case, saved as .npz.
Speed: `bench_sequences` measures about 3 million events a second through `build_sequences` on 2 shared
CPU cores for a 10M-event log in Europe/Berlin (a lower bound; UTC skips the zone conversion).
"""

from __future__ import annotations

import logging
import math
import re
import time
import zoneinfo
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from gts_lum.data.events import EventLog, ragged_arange
from gts_lum.sequence.splits import EvalSet, leave_one_out
from gts_lum.sequence.tokens import SPECIAL_VALUE, TokenKind, TokenSequences

logger = logging.getLogger(__name__)

VARIANTS = ("interval", "none", "text", "component", "position")
IMPORTANCE_KINDS = ("idf", "uniform")
GRANULARITIES = ("event", "hourly", "daily", "monthly")  # inferred source names, finest first
SECONDS_PER_DAY = 86_400
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)
DAY_PART_KEYS = ("name", "start", "end", "weekend_name")


def _default_day_parts() -> list[dict]:
    return [
        {"name": "late night", "start": "23:00", "end": "06:00"},
        {"name": "normal morning hour", "start": "06:00", "end": "07:00"},
        {"name": "morning rush hour", "start": "07:00", "end": "09:30", "weekend_name": "normal morning hour"},
        {"name": "normal morning hour", "start": "09:30", "end": "11:30"},
        {"name": "noon", "start": "11:30", "end": "13:30"},
        {"name": "normal afternoon hour", "start": "13:30", "end": "17:00"},
        {"name": "evening rush hour", "start": "17:00", "end": "19:30", "weekend_name": "normal evening hour"},
        {"name": "normal evening hour", "start": "19:30", "end": "23:00"},
    ]


@dataclass
class SequenceConfig:
    """How event logs become token sequences. Package default: `pkg:sequence/default.yaml`."""

    interval_minutes: int = 15  # interval length; must divide a day
    timezone: str = "UTC"  # operator IANA timezone: pipelines set it from the data set's dataset.yaml
    variant: str = "interval"  # one of VARIANTS (Table 3)
    # [SEP] between intervals (Eq. 1). False: the next interval's descriptor alone marks the boundary, one
    # token less an interval; on sparse logs (1-2 behaviours an interval) that is a quarter of the tokens
    separator: bool = True
    token_budget: int = 240  # max tokens per sequence, descriptors and [SEP] included
    max_behaviors_per_interval: int | None = 16  # cap per interval (None: no cap)
    dedup_within_interval: bool = True  # keep one occurrence of a behaviour per interval
    main_sequence: str = "all"  # "all", "longest" or a source name
    importance: str = "idf"  # "idf" over training users or "uniform" (pure recency)
    granularity_min_events: int = 5  # fewer training events: source inferred as "event"
    weekend_days: list[int] = field(default_factory=lambda: [5, 6])  # Monday = 0
    day_parts: list[dict] = field(default_factory=_default_day_parts)  # name, start, end[, weekend_name]
    chunk_events: int = 4_000_000  # events per build chunk: bounds memory on large logs

    def __post_init__(self) -> None:
        _check_int("interval_minutes", self.interval_minutes, 1)
        if (24 * 60) % self.interval_minutes:
            raise ValueError(f"SequenceConfig.interval_minutes={self.interval_minutes} must divide a day (1440 minutes)")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError) as err:
            raise ValueError(f"SequenceConfig.timezone={self.timezone!r} is not an IANA timezone name") from err
        if self.variant not in VARIANTS:
            raise ValueError(f"SequenceConfig.variant={self.variant!r}: expected one of {VARIANTS}")
        _check_int("token_budget", self.token_budget, 2)
        if self.max_behaviors_per_interval is not None:
            _check_int("max_behaviors_per_interval", self.max_behaviors_per_interval, 1)
        if not isinstance(self.main_sequence, str) or not self.main_sequence:
            raise ValueError(f"SequenceConfig.main_sequence={self.main_sequence!r}: expected 'all', 'longest' or a source name")
        if self.importance not in IMPORTANCE_KINDS:
            raise ValueError(f"SequenceConfig.importance={self.importance!r}: expected one of {IMPORTANCE_KINDS}")
        _check_int("granularity_min_events", self.granularity_min_events, 1)
        _check_int("chunk_events", self.chunk_events, 1)
        days = list(self.weekend_days)
        if any(type(d) is not int or not 0 <= d <= 6 for d in days) or len(set(days)) != len(days):
            raise ValueError(f"SequenceConfig.weekend_days={self.weekend_days!r}: expected distinct ints in 0..6 (Monday = 0)")
        day_part_slots(self)  # validates day_parts


def _check_int(name: str, value, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise ValueError(f"SequenceConfig.{name}={value!r}: expected an integer >= {minimum}")


def _clock_minutes(value, where: str) -> int:
    """'HH:MM' (or minutes since midnight: unquoted YAML 23:00 reads as the base-60 int 1380) -> minutes."""
    if type(value) is int:
        minutes = value
    elif isinstance(value, str) and re.fullmatch(r"\d{1,2}:\d{2}", value.strip()):
        hours, mins = (int(p) for p in value.strip().split(":"))
        minutes = hours * 60 + mins if mins < 60 else -1
    else:
        raise ValueError(f"{where}={value!r}: expected a clock time 'HH:MM'")
    if not 0 <= minutes <= 24 * 60:
        raise ValueError(f"{where}={value!r}: expected a clock time between 00:00 and 24:00")
    return minutes


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def day_part_slots(cfg: SequenceConfig) -> tuple[list[str], list[str]]:
    """Day-part name of every interval of the day, on weekdays and on weekends (each `slots_per_day` long).

    Raises a ValueError naming the entry at fault when a boundary is off the interval grid, or when the
    parts leave part of the day uncovered or cover it twice.
    """
    step = cfg.interval_minutes
    slots = 24 * 60 // step
    weekday: list[str | None] = [None] * slots
    weekend: list[str | None] = [None] * slots
    if not isinstance(cfg.day_parts, (list, tuple)) or not cfg.day_parts:
        raise ValueError("SequenceConfig.day_parts: expected a non-empty list of {name, start, end[, weekend_name]}")
    for i, part in enumerate(cfg.day_parts):
        where = f"SequenceConfig.day_parts[{i}]"
        if not isinstance(part, dict) or not {"name", "start", "end"} <= set(part) or set(part) - set(DAY_PART_KEYS):
            raise ValueError(f"{where}={part!r}: expected a mapping with keys name, start, end and optional weekend_name")
        name, weekend_name = part["name"], part.get("weekend_name", part["name"])
        if not (isinstance(name, str) and name.strip() and isinstance(weekend_name, str) and weekend_name.strip()):
            raise ValueError(f"{where}: name and weekend_name must be non-empty strings")
        start, end = _clock_minutes(part["start"], f"{where}.start"), _clock_minutes(part["end"], f"{where}.end")
        for key, minutes in (("start", start), ("end", end)):
            if minutes % step:
                raise ValueError(
                    f"{where}.{key}={_clock(minutes)} does not fall on the {step}-minute interval grid: "
                    "move the boundary or change interval_minutes"
                )
        if start == end:
            raise ValueError(f"{where}: start and end are both {_clock(start)}; use 00:00-24:00 for a whole day")
        first, last = start // step, end // step
        covered = range(first, last) if first < last else [*range(first, slots), *range(0, last)]  # wraps midnight
        for slot in covered:
            if weekday[slot] is not None:
                raise ValueError(f"{where} ({name}) overlaps another day part at {_clock(slot * step)}")
            weekday[slot], weekend[slot] = name.strip(), weekend_name.strip()
    gaps = [_clock(s * step) for s, n in enumerate(weekday) if n is None]
    if gaps:
        raise ValueError(f"SequenceConfig.day_parts leave {len(gaps)} interval(s) uncovered, starting at {gaps[:4]}")
    return weekday, weekend  # type: ignore[return-value]


def civil_from_days(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(year, month, day) of day numbers since 1970-01-01 (proleptic Gregorian calendar), vectorized."""
    z = np.asarray(days, dtype=np.int64) + 719_468  # shift the epoch to 0000-03-01: leap day ends a year
    era = z // 146_097
    doe = z - era * 146_097  # day of the 400-year era
    yoe = (doe - doe // 1_460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)  # day of the March-based year
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2)
    return year, month, day


def time_components(local: np.ndarray) -> np.ndarray:
    """(N, 6) int16 local year, month, day, hour, minute, second of local seconds since the epoch."""
    days, sod = np.divmod(np.asarray(local, dtype=np.int64), SECONDS_PER_DAY)
    year, month, day = civil_from_days(days)
    return np.stack([year, month, day, sod // 3600, sod // 60 % 60, sod % 60], axis=1).astype(np.int16)


class TimeGrid:
    """The interval grid and descriptor vocabulary of a `SequenceConfig` (validated, ready to look up)."""

    def __init__(self, cfg: SequenceConfig):
        self.timezone = cfg.timezone
        self.interval_seconds = cfg.interval_minutes * 60
        self.slots_per_day = SECONDS_PER_DAY // self.interval_seconds
        weekday_parts, weekend_parts = day_part_slots(cfg)
        texts = list(dict.fromkeys([f"weekday {n}" for n in weekday_parts] + [f"weekend {n}" for n in weekend_parts]))
        self.descriptor_texts: tuple[str, ...] = tuple(texts)
        ids = {t: i for i, t in enumerate(texts)}
        weekday_ids = np.array([ids[f"weekday {n}"] for n in weekday_parts], dtype=np.int32)
        weekend_ids = np.array([ids[f"weekend {n}"] for n in weekend_parts], dtype=np.int32)
        is_weekend = np.isin(np.arange(7), cfg.weekend_days)
        # (7 * slots_per_day,) descriptor id of every interval-of-week slot
        self.slot_descriptor = np.where(is_weekend[:, None], weekend_ids[None, :], weekday_ids[None, :]).reshape(-1)

    def local_seconds(self, timestamp: np.ndarray) -> np.ndarray:
        """Local wall-clock seconds since 1970-01-01 00:00 local of unix timestamps (DST-aware, vectorized)."""
        ts = np.asarray(timestamp, dtype=np.int64)
        if self.timezone == "UTC":
            return ts
        utc = pd.DatetimeIndex(ts.astype("datetime64[s]")).tz_localize("UTC")
        return utc.tz_convert(self.timezone).tz_localize(None).as_unit("s").asi8

    def time_id(self, timestamp: np.ndarray) -> np.ndarray:
        return self.local_seconds(timestamp) // self.interval_seconds

    def week_slot_of_local(self, local: np.ndarray) -> np.ndarray:
        days = local // SECONDS_PER_DAY
        slot = local % SECONDS_PER_DAY // self.interval_seconds
        return ((days + EPOCH_WEEKDAY) % 7 * self.slots_per_day + slot).astype(np.int16)

    def descriptor(self, timestamp: np.ndarray) -> np.ndarray:
        """Descriptor id of each unix timestamp."""
        return self.slot_descriptor[self.week_slot_of_local(self.local_seconds(timestamp))]


def describe_time(timestamp: int, cfg: SequenceConfig) -> tuple[int, str]:
    """Descriptor id and text of one unix timestamp, e.g. the prediction time at serving."""
    grid = TimeGrid(cfg)
    desc = int(grid.descriptor(np.array([timestamp], dtype=np.int64))[0])
    return desc, grid.descriptor_texts[desc]


def infer_granularity(train: EventLog, grid: TimeGrid, min_events: int) -> np.ndarray:
    """(B,) index into GRANULARITIES: the coarsest local grid every training event of a behaviour lies on."""
    local = grid.local_seconds(train.timestamp)
    sod = local % SECONDS_PER_DAY
    level = np.zeros(len(local), dtype=np.int8)
    level[sod % 3600 == 0] = 1
    midnight = np.flatnonzero(sod == 0)
    level[midnight] = 2
    _, _, day = civil_from_days(local[midnight] // SECONDS_PER_DAY)
    level[midnight[day == 1]] = 3
    out = np.full(train.num_behaviors, len(GRANULARITIES) - 1, dtype=np.int8)
    for lvl in range(len(GRANULARITIES) - 2, -1, -1):  # one event on a finer grid makes the behaviour finer
        out[np.bincount(train.behavior[level <= lvl], minlength=train.num_behaviors) > 0] = lvl
    out[np.bincount(train.behavior, minlength=train.num_behaviors) < min_events] = 0
    return out


def idf_importance(train: EventLog) -> np.ndarray:
    """(B,) float32 smoothed inverse document frequency of each behaviour over training users."""
    nb = np.int64(max(train.num_behaviors, 1))
    key = np.sort(train.user_of_event().astype(np.int64) * nb + train.behavior)
    distinct = key[np.concatenate([[True], key[1:] != key[:-1]])] if len(key) else key
    df = np.bincount(distinct % nb, minlength=train.num_behaviors)
    users = int((train.lengths() > 0).sum())
    return (np.log((1.0 + users) / (1.0 + df)) + 1.0).astype(np.float32)


@dataclass
class BehaviorStats:
    """Per-behaviour facts the builder needs, learned from training events only."""

    importance: np.ndarray  # (B,) float32 > 0, higher = kept first inside an interval
    source: np.ndarray  # (B,) int16 index into source_names
    source_names: tuple[str, ...]
    source_events: np.ndarray  # (K,) int64 training events per source

    def __post_init__(self) -> None:
        self.source_names = tuple(str(s) for s in self.source_names)
        if len(self.importance) != len(self.source):
            raise ValueError(f"BehaviorStats: importance has {len(self.importance)} entries, source {len(self.source)}")
        if not np.all(np.isfinite(self.importance)):
            raise ValueError(f"BehaviorStats.importance: non-finite weight for behaviour {int(np.argmin(np.isfinite(self.importance)))}")
        if len(self.source_events) != len(self.source_names):
            raise ValueError("BehaviorStats.source_events: one count per source name expected")

    @property
    def num_behaviors(self) -> int:
        return len(self.importance)

    @classmethod
    def fit(
        cls,
        train: EventLog,
        cfg: SequenceConfig,
        source: np.ndarray | list[str] | None = None,
        importance: np.ndarray | None = None,
    ) -> BehaviorStats:
        """Learn importance and sources from `train` (= `Split.train`).

        `source`: (B,) source name per behaviour; inferred from timestamp granularity when None.
        `importance`: (B,) caller's weights (e.g. from a model); else as `cfg.importance` says.
        """
        B = train.num_behaviors
        if source is None:
            codes = infer_granularity(train, TimeGrid(cfg), cfg.granularity_min_events)
            names = GRANULARITIES
        else:
            source = np.asarray(source)
            if source.shape != (B,):
                raise ValueError(f"source: expected one name per behaviour, shape ({B},), got {source.shape}")
            unique, codes = np.unique(source.astype(str), return_inverse=True)
            names = tuple(unique.tolist())
        if importance is not None:
            importance = np.asarray(importance, dtype=np.float32)
            if importance.shape != (B,):
                raise ValueError(f"importance: expected one weight per behaviour, shape ({B},), got {importance.shape}")
        elif cfg.importance == "idf":
            importance = idf_importance(train)
        else:
            importance = np.ones(B, dtype=np.float32)
        codes = np.asarray(codes, dtype=np.int16)
        events = np.bincount(codes[train.behavior], minlength=len(names)).astype(np.int64)
        stats = cls(importance, codes, tuple(names), events)
        logger.info("behaviour sources (training events): %s", dict(zip(stats.source_names, events.tolist())))
        return stats

    def main_behaviors(self, main_sequence: str) -> np.ndarray | None:
        """(B,) bool: behaviours of the main sequence; None when every source is kept ("all")."""
        if main_sequence == "all":
            return None
        if main_sequence == "longest":
            main = int(np.argmax(self.source_events))
        elif main_sequence in self.source_names:
            main = self.source_names.index(main_sequence)
        else:
            raise ValueError(
                f"SequenceConfig.main_sequence={main_sequence!r}: no such source; use 'all', 'longest' or one of {list(self.source_names)}"
            )
        return self.source == main

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            importance=self.importance,
            source=self.source,
            source_names=np.asarray(self.source_names, dtype=str),
            source_events=self.source_events,
        )

    @classmethod
    def load(cls, path: str | Path) -> BehaviorStats:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["importance"], z["source"], tuple(z["source_names"].tolist()), z["source_events"])


@dataclass
class _Events:
    """The events of a build chunk, one entry per event, filtered step by step."""

    row: np.ndarray  # (M,) int64 row in the source log
    seq: np.ndarray  # (M,) int64 sequence (case) index within the chunk
    behavior: np.ndarray  # (M,) int32
    timestamp: np.ndarray  # (M,) int64 unix seconds
    local: np.ndarray  # (M,) int64 local wall-clock seconds
    time_id: np.ndarray  # (M,) int64
    group: np.ndarray  # (M,) int64 interval group: run of equal time ID in one sequence, 0..G-1

    def take(self, idx: np.ndarray) -> _Events:
        return _Events(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(x)[:-1]]).astype(np.int64) if len(x) else np.zeros(0, np.int64)


def _runs(seq: np.ndarray, time_id: np.ndarray) -> np.ndarray:
    """Group id of every event: a new group starts where the sequence or the time ID changes."""
    new = np.ones(len(seq), dtype=bool)
    new[1:] = (seq[1:] != seq[:-1]) | (time_id[1:] != time_id[:-1])
    return np.cumsum(new) - 1


def _latest_occurrences(group: np.ndarray, behavior: np.ndarray, num_behaviors: int) -> np.ndarray:
    """(M,) bool: the event is the latest of its behaviour in its group (a stable sort, no hashing)."""
    key = group * np.int64(max(num_behaviors, 1)) + behavior
    order = np.argsort(key, kind="stable")  # stable: equal keys stay in time order
    sorted_key = key[order]
    keep = np.ones(len(key), dtype=bool)
    keep[order[:-1][sorted_key[:-1] == sorted_key[1:]]] = False  # a later one of the same key follows
    return keep


def _group_cost(n: np.ndarray, is_last: np.ndarray, cfg: SequenceConfig) -> np.ndarray:
    """Tokens an interval with `n` behaviours takes: descriptor + [SEP] unless last (Eq. 1), text doubles."""
    if cfg.variant == "interval":
        return n + 1 + _has_separator(is_last, cfg)
    if cfg.variant == "text":
        return 2 * n
    return n


def _has_separator(is_last: np.ndarray, cfg: SequenceConfig) -> np.ndarray:
    """(G,) int64: 1 where an interval is followed by a [SEP] token."""
    return (~is_last).astype(np.int64) if cfg.separator else np.zeros(len(is_last), np.int64)


def _plan_budget(capped: np.ndarray, is_last: np.ndarray, cfg: SequenceConfig) -> np.ndarray:
    """(G,) behaviours each group keeps: whole groups from the latest back, then the boundary group.

    Groups are contiguous per sequence and `is_last` marks each sequence's last group.
    """
    cost = _group_cost(capped, is_last, cfg)
    csum = np.cumsum(cost)
    seq_rank = np.cumsum(np.concatenate([[True], is_last[:-1]])) - 1  # which sequence, among non-empty ones
    suffix = csum[np.flatnonzero(is_last)][seq_rank] - csum + cost  # tokens of this group and all later ones
    after = suffix - cost
    room = cfg.token_budget - after
    if cfg.variant == "interval":
        room_behaviors = room - 1 - _has_separator(is_last, cfg)
    elif cfg.variant == "text":
        room_behaviors = room // 2
    else:
        room_behaviors = room
    fits = suffix <= cfg.token_budget
    boundary = ~fits & (after <= cfg.token_budget)  # one per sequence at most: suffix grows backwards
    return np.where(fits, capped, np.where(boundary, np.clip(room_behaviors, 0, capped), 0))


def _select(ev: _Events, n: np.ndarray, keep_n: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """(M,) bool: per group, all events if keep_n == n, else its latest event and the keep_n - 1 most
    important others (ties: most recent)."""
    whole = keep_n == n
    keep = whole[ev.group]
    sub = np.flatnonzero(~keep & (keep_n > 0)[ev.group])
    if len(sub):
        latest = np.append(ev.group[1:] != ev.group[:-1], True)[sub]  # groups are contiguous, in time order
        order = np.lexsort((-sub, -importance[ev.behavior[sub]], ~latest, ev.group[sub]))  # group, latest, importance, recency
        g = ev.group[sub][order]
        new = np.concatenate([[True], g[1:] != g[:-1]])
        starts = np.flatnonzero(new)
        rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.append(starts, len(g))))
        keep[sub[order[rank < keep_n[g]]]] = True
    return keep


def _case_bounds(log: EventLog, cases: EvalSet | np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, starts, ends) of each sequence's history in `log`."""
    if cases is None:
        users = np.arange(log.num_users, dtype=np.int64)
        return users, log.offsets[:-1].astype(np.int64), log.offsets[1:].astype(np.int64)
    if isinstance(cases, EvalSet):
        users = np.asarray(cases.users, dtype=np.int64)
        ends = np.asarray(cases.history_end, dtype=np.int64)
    else:
        users = np.asarray(cases, dtype=np.int64)
        ends = None
    if users.ndim != 1:
        raise ValueError(f"cases: expected a 1-d array of user indices, got shape {users.shape}")
    bad = np.flatnonzero((users < 0) | (users >= log.num_users))
    if len(bad):
        raise ValueError(f"cases.users[{bad[0]}]={users[bad[0]]} is not a user index of the log (0..{log.num_users - 1})")
    starts, user_ends = log.offsets[users].astype(np.int64), log.offsets[users + 1].astype(np.int64)
    if ends is None:
        return users, starts, user_ends
    bad = np.flatnonzero((ends < starts) | (ends > user_ends))
    if len(bad):
        i = bad[0]
        raise ValueError(f"cases.history_end[{i}]={ends[i]} lies outside user {users[i]}'s rows [{starts[i]}, {user_ends[i]}] of the log")
    return users, starts, ends


def _build_chunk(
    log: EventLog,
    users: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    cfg: SequenceConfig,
    grid: TimeGrid,
    importance: np.ndarray,
    main: np.ndarray | None,
    counts: dict[str, int],
) -> TokenSequences:
    S = len(users)
    lengths = ends - starts
    rows = ragged_arange(starts, lengths)
    seq = np.repeat(np.arange(S, dtype=np.int64), lengths)
    counts["events"] += len(rows)
    if main is not None:
        on_main = main[log.behavior[rows]]
        rows, seq = rows[on_main], seq[on_main]
    behavior = log.behavior[rows]
    timestamp = log.timestamp[rows]
    local = grid.local_seconds(timestamp)
    time_id = local // grid.interval_seconds
    ev = _Events(rows, seq, behavior, timestamp, local, time_id, _runs(seq, time_id))
    counts["main_sequence"] += len(ev.row)
    if cfg.dedup_within_interval:
        ev = ev.take(_latest_occurrences(ev.group, ev.behavior, log.num_behaviors))  # every group keeps >= 1 event
    counts["deduplicated"] += len(ev.row)

    # Per group: cap, then the token budget (steps 4-5 of the module docstring).
    n = np.bincount(ev.group) if len(ev.row) else np.zeros(0, np.int64)  # (G,)
    capped = n if cfg.max_behaviors_per_interval is None else np.minimum(n, cfg.max_behaviors_per_interval)
    counts["capped"] += int(capped.sum())
    if len(n):
        g_seq = ev.seq[_exclusive_cumsum(n)]
        is_last = np.append(g_seq[1:] != g_seq[:-1], True)
        keep_n = _plan_budget(capped, is_last, cfg)
        ev = ev.take(_select(ev, n, keep_n, importance))
        ev.group = (np.cumsum(keep_n > 0) - 1)[ev.group]  # renumber the kept groups 0..G'-1
        cnt = keep_n[keep_n > 0]  # (G',)
    else:
        cnt = n
    counts["kept"] += len(ev.row)
    return _emit(ev, cnt, users, cfg, grid)


def _emit(ev: _Events, cnt: np.ndarray, users: np.ndarray, cfg: SequenceConfig, grid: TimeGrid) -> TokenSequences:
    """Lay out the tokens of the kept events. Every token points at one kept event (`tok_ev`): its own
    event for behaviours and time texts, the first / last event of its interval for descriptor / [SEP]."""
    M = len(ev.row)
    first = _exclusive_cumsum(cnt)  # (G',) first kept event of each group
    g_seq = ev.seq[first]
    is_last = np.append(g_seq[1:] != g_seq[:-1], True) if len(cnt) else np.zeros(0, bool)
    if cfg.variant == "interval":
        has_sep = _has_separator(is_last, cfg).astype(bool)
        g_start = _exclusive_cumsum(cnt + 1 + has_sep)
        T = int((cnt + 1 + has_sep).sum())
        tok_ev = np.empty(T, dtype=np.int64)
        kind = np.empty(T, dtype=np.uint8)
        tok_ev[g_start], kind[g_start] = first, TokenKind.DESCRIPTOR
        behavior_pos = g_start[ev.group] + 1 + (np.arange(M) - first[ev.group])
        tok_ev[behavior_pos], kind[behavior_pos] = np.arange(M), TokenKind.BEHAVIOR
        sep_pos = g_start[has_sep] + 1 + cnt[has_sep]
        tok_ev[sep_pos], kind[sep_pos] = (first + cnt - 1)[has_sep], TokenKind.SEP
    elif cfg.variant == "text":
        tok_ev = np.repeat(np.arange(M, dtype=np.int64), 2)
        kind = np.tile(np.array([TokenKind.TIME_TEXT, TokenKind.BEHAVIOR], dtype=np.uint8), M)
    else:
        tok_ev = np.arange(M, dtype=np.int64)
        kind = np.full(M, TokenKind.BEHAVIOR, dtype=np.uint8)

    week_slot = grid.week_slot_of_local(ev.local)[tok_ev]  # per event, then gathered: fewer divisions
    is_behavior = kind == TokenKind.BEHAVIOR
    value = np.where(
        is_behavior, ev.behavior[tok_ev], np.where(kind == TokenKind.SEP, SPECIAL_VALUE, grid.slot_descriptor[week_slot])
    ).astype(np.int32)
    lengths = np.bincount(ev.seq[tok_ev], minlength=len(users))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seq_start = np.repeat(offsets[:-1], lengths)  # (T,) first token of the token's sequence
    if cfg.variant == "position":
        group = ev.group[tok_ev]
        position = group - group[seq_start]  # rank of the interval inside the kept sequence
    else:
        position = np.arange(len(tok_ev)) - seq_start
    return TokenSequences(
        offsets=offsets,
        kind=kind,
        value=value,
        time_id=ev.time_id[tok_ev],
        position=position.astype(np.int32),
        timestamp=ev.timestamp[tok_ev],
        week_slot=week_slot,
        source_row=np.where(is_behavior, ev.row[tok_ev], -1),
        users=users,
        descriptor_texts=grid.descriptor_texts,
        variant=cfg.variant,
        timezone=cfg.timezone,
        components=time_components(ev.local[tok_ev]) if cfg.variant == "component" else None,
    )


def build_sequences(
    log: EventLog,
    cases: EvalSet | np.ndarray | None = None,
    cfg: SequenceConfig | None = None,
    stats: BehaviorStats | None = None,
) -> TokenSequences:
    """Token sequences of prediction cases (an `EvalSet`: prefixes ending at `history_end`), of whole
    users (an array of user indices) or of every user (None), in the order given.

    `stats` (from `BehaviorStats.fit` on training events) supplies importance and behaviour sources;
    without it importance is uniform (pure recency) and `cfg.main_sequence` must be "all".
    """
    cfg = cfg or SequenceConfig()
    grid = TimeGrid(cfg)
    if stats is None:
        if cfg.main_sequence != "all":
            raise ValueError(f"main_sequence={cfg.main_sequence!r} needs behaviour sources: pass stats=BehaviorStats.fit(...)")
        importance, main = np.ones(log.num_behaviors, dtype=np.float32), None
    else:
        if stats.num_behaviors != log.num_behaviors:
            raise ValueError(f"stats cover {stats.num_behaviors} behaviours, the log has {log.num_behaviors}")
        importance, main = stats.importance, stats.main_behaviors(cfg.main_sequence)
    users, starts, ends = _case_bounds(log, cases)
    # Chunks of whole sequences bound peak memory; each is built independently.
    cum = np.cumsum(ends - starts)
    total = int(cum[-1]) if len(cum) else 0
    cuts = np.searchsorted(cum, np.arange(1, math.ceil(total / cfg.chunk_events)) * cfg.chunk_events, side="right")
    edges = np.unique(np.concatenate([[0], cuts, [len(users)]]))
    edges = edges if len(edges) > 1 else np.array([0, 0])
    counts = dict.fromkeys(("events", "main_sequence", "deduplicated", "capped", "kept"), 0)
    parts = [
        _build_chunk(log, users[a:b], starts[a:b], ends[a:b], cfg, grid, importance, main, counts)
        for a, b in tqdm(list(zip(edges[:-1], edges[1:])), desc="sequences", unit="chunk", leave=False, disable=None)
    ]
    out = parts[0] if len(parts) == 1 else TokenSequences.concat(parts)
    logger.info(
        "built %d %s sequences, %d tokens: %d history events -> %d on the main sequence -> %d after dedup "
        "-> %d after the interval cap -> %d within the budget of %d",
        len(out),
        cfg.variant,
        out.num_tokens,
        *(counts[k] for k in ("events", "main_sequence", "deduplicated", "capped", "kept")),
        cfg.token_budget,
    )
    _warn_if_the_cap_drops_much(counts["deduplicated"], counts["capped"], cfg)
    return out


# The interval cap drops events only where many fall in one interval: a share this large means bursty or
# made-up timestamps (e.g. positions read as seconds), not the few bursts the cap is for.
CAP_WARN_SHARE = 0.10
_cap_warned = False


def _warn_if_the_cap_drops_much(reaching: int, capped: int, cfg: SequenceConfig) -> None:
    """One WARNING per process when the cap drops more than `CAP_WARN_SHARE` of the events it sees.

    Here, where the counts are, rather than at the data-set level (which sees only the tokens kept, and
    cannot tell the cap's drops from the budget's); once per process because the scorer builds a sequence
    per request and the share is a property of the data, not of one request. The budget's drops are by
    design (recency first) and not warned about.
    """
    global _cap_warned
    if _cap_warned or not reaching or (reaching - capped) / reaching <= CAP_WARN_SHARE:
        return
    _cap_warned = True
    logger.warning(
        "the interval cap (max_behaviors_per_interval=%s) dropped %.0f%% of %d events (warned once per process): "
        "many events share one %d-minute interval. Made-up or coarse timestamps? Map an ordered log without "
        "times with an ordinal time (README, 'Ordered logs without times'), or raise or unset the cap",
        cfg.max_behaviors_per_interval,
        100 * (reaching - capped) / reaching,
        reaching,
        cfg.interval_minutes,
    )


def synthetic_log(n_events: int, n_users: int, n_behaviors: int, seed: int = 0) -> EventLog:
    """A random telecom-like log for benchmarks: Zipf behaviours, bursty timestamps (many per interval)."""
    rng = np.random.default_rng(seed)
    lengths = rng.multinomial(n_events, np.full(n_users, 1.0 / n_users))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    popularity = 1.0 / np.arange(1, n_behaviors + 1) ** 1.1
    behavior = rng.choice(n_behaviors, size=n_events, p=popularity / popularity.sum()).astype(np.int32)
    bursty = rng.random(n_events) < 0.8  # 80% seconds-to-minutes apart, 20% hours apart
    gaps = np.where(bursty, rng.exponential(90.0, n_events), rng.exponential(4 * 3600.0, n_events)).astype(np.int64)
    clock = np.cumsum(gaps)
    user_start = rng.integers(1_672_531_200, 1_688_169_600, n_users)  # first half of 2023
    seq_start = np.repeat(offsets[:-1], lengths)
    timestamp = clock - clock[np.minimum(seq_start, max(n_events - 1, 0))] + np.repeat(user_start, lengths)
    return EventLog(
        user_ids=np.array([f"u{u}" for u in range(n_users)], dtype=object),
        behavior_ids=np.array([f"b{b}" for b in range(n_behaviors)], dtype=object),
        offsets=offsets,
        behavior=behavior,
        timestamp=timestamp,
    )


def bench_sequences(
    n_events: int = 10_000_000,
    n_users: int | None = None,
    n_behaviors: int = 5_000,
    cfg: SequenceConfig | None = None,
    event_log: EventLog | None = None,
    seed: int = 0,
) -> dict:
    """Time `BehaviorStats.fit` and `build_sequences` (whole users and leave-one-out test prefixes).

    Uses `event_log` when given (e.g. MovieLens), else a `synthetic_log` of `n_events` events and
    `n_users` users (default: 100 events per user). Returns the figures for BENCHMARKS.md.
    """
    cfg = cfg or SequenceConfig(timezone="Europe/Berlin")
    if event_log is None:
        event_log = synthetic_log(n_events, n_users or max(1, n_events // 100), n_behaviors, seed)
    split = leave_one_out(event_log)
    t0 = time.perf_counter()
    stats = BehaviorStats.fit(split.train, cfg)
    t1 = time.perf_counter()
    whole = build_sequences(event_log, None, cfg, stats)
    t2 = time.perf_counter()
    build_sequences(event_log, split.test, cfg, stats)  # timed only
    t3 = time.perf_counter()
    prefix_events = int((split.test.history_end - event_log.offsets[split.test.users]).sum())
    out = {
        "variant": cfg.variant,
        "timezone": cfg.timezone,
        "events": event_log.num_events,
        "users": event_log.num_users,
        "behaviors": event_log.num_behaviors,
        "fit_s": round(t1 - t0, 3),
        "build_users_s": round(t2 - t1, 3),
        "build_users_events_per_s": round(event_log.num_events / max(t2 - t1, 1e-9)),
        "build_cases_s": round(t3 - t2, 3),
        "build_cases_events_per_s": round(prefix_events / max(t3 - t2, 1e-9)),
        "tokens": whole.num_tokens,
        "mean_tokens_per_user": round(whole.num_tokens / max(len(whole), 1), 1),
    }
    logger.info("bench_sequences: %s", out)
    return out
