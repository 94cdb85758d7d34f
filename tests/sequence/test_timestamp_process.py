"""Timestamp process and token-sequence building: hand-checked examples, a loop-based reference, invariants."""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest
import yaml

from gts_lum.config import load_config
from gts_lum.data.events import EventLog
from gts_lum.sequence.splits import EvalSet, leave_one_out
from gts_lum.sequence.timestamp_process import (
    VARIANTS,
    BehaviorStats,
    SequenceConfig,
    TimeGrid,
    build_sequences,
    civil_from_days,
    describe_time,
    idf_importance,
    infer_granularity,
    synthetic_log,
)
from gts_lum.sequence.tokens import TokenKind, TokenSequences

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
B, D, S, TT = TokenKind.BEHAVIOR, TokenKind.DESCRIPTOR, TokenKind.SEP, TokenKind.TIME_TEXT
EPOCH = datetime(1970, 1, 1)


def utc(*args) -> int:
    return int(datetime(*args, tzinfo=timezone.utc).timestamp())


def local_time_id(*args, minutes: int = 15) -> int:
    """Time ID of a naive local wall-clock time, by plain datetime arithmetic (no timezone code)."""
    return int((datetime(*args) - EPOCH).total_seconds()) // (minutes * 60)


def make_log(users: list[list[tuple[int, int]]], num_behaviors: int) -> EventLog:
    """A log from per-user lists of (unix seconds, behaviour index), already in time order."""
    lengths = [len(u) for u in users]
    flat = [e for u in users for e in u]
    return EventLog(
        user_ids=np.array([f"u{i}" for i in range(len(users))], dtype=object),
        behavior_ids=np.array([f"b{i}" for i in range(num_behaviors)], dtype=object),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        behavior=np.array([b for _, b in flat], dtype=np.int32),
        timestamp=np.array([t for t, _ in flat], dtype=np.int64),
    )


def desc_id(cfg: SequenceConfig, text: str) -> int:
    return TimeGrid(cfg).descriptor_texts.index(text)


# --------------------------------------------------------------------------- hand-checked examples


def test_berlin_spring_dst_change_gives_exact_tokens():
    cfg = SequenceConfig(timezone="Europe/Berlin")
    events = [
        (utc(2024, 3, 30, 22, 50), 0),  # Sat 23:50 CET
        (utc(2024, 3, 31, 0, 55), 1),  # Sun 01:55 CET
        (utc(2024, 3, 31, 1, 5), 2),  # Sun 03:05 CEST: clocks jumped 02:00 -> 03:00 at 01:00 UTC
        (utc(2024, 3, 31, 1, 10), 3),  # Sun 03:10 CEST: same interval as the previous event
        (utc(2024, 4, 1, 6, 20), 4),  # Mon 08:20 CEST
        (utc(2024, 4, 1, 7, 35), 5),  # Mon 09:35 CEST
    ]
    seqs = build_sequences(make_log([events], 6), None, cfg)
    tok = seqs.sequence(0)
    late, rush, normal = (desc_id(cfg, t) for t in ("weekend late night", "weekday morning rush hour", "weekday normal morning hour"))
    assert tok["kind"].tolist() == [D, B, S, D, B, S, D, B, B, S, D, B, S, D, B]
    assert tok["value"].tolist() == [late, 0, -1, late, 1, -1, late, 2, 3, -1, rush, 4, -1, normal, 5]
    ids = [
        local_time_id(2024, 3, 30, 23, 45),
        local_time_id(2024, 3, 31, 1, 45),
        local_time_id(2024, 3, 31, 3, 0),
        local_time_id(2024, 4, 1, 8, 15),
        local_time_id(2024, 4, 1, 9, 30),
    ]
    assert tok["time_id"].tolist() == [ids[0]] * 3 + [ids[1]] * 3 + [ids[2]] * 4 + [ids[3]] * 3 + [ids[4]] * 2
    # 10 real minutes between 01:55 CET and 03:05 CEST are 5 intervals on the wall clock
    assert ids[2] - ids[1] == 5
    assert tok["position"].tolist() == list(range(15))
    assert tok["source_row"].tolist() == [-1, 0, -1, -1, 1, -1, -1, 2, 3, -1, -1, 4, -1, -1, 5]
    # descriptor / [SEP] carry the first / last kept event's timestamp of their interval
    ts = [e[0] for e in events]
    assert tok["timestamp"].tolist() == [
        ts[0],
        ts[0],
        ts[0],
        ts[1],
        ts[1],
        ts[1],
        ts[2],
        ts[2],
        ts[3],
        ts[3],
        ts[4],
        ts[4],
        ts[4],
        ts[5],
        ts[5],
    ]
    # Monday 08:15 is slot 33 of Monday (weekday 0); Saturday 23:45 is slot 95 of weekday 5
    assert tok["week_slot"][11] == 0 * 96 + 33 and tok["week_slot"][1] == 5 * 96 + 95
    assert seqs.render(0) == (
        "weekend late night | b0 | [SEP] | weekend late night | b1 | [SEP] | weekend late night | b2 | b3 | [SEP] | "
        "weekday morning rush hour | b4 | [SEP] | weekday normal morning hour | b5"
    )


def test_berlin_autumn_fold_keeps_runs_and_time_order():
    cfg = SequenceConfig(timezone="Europe/Berlin")
    events = [(utc(2024, 10, 27, 0, 50), 0), (utc(2024, 10, 27, 1, 10), 1)]  # 02:50 CEST, then 02:10 CET
    tok = build_sequences(make_log([events], 2), None, cfg).sequence(0)
    assert tok["kind"].tolist() == [D, B, S, D, B]
    assert tok["time_id"].tolist() == [local_time_id(2024, 10, 27, 2, 45)] * 3 + [local_time_id(2024, 10, 27, 2, 0)] * 2
    assert np.all(np.diff(tok["timestamp"]) >= 0)


def test_shanghai_descriptors_and_describe_time():
    cfg = SequenceConfig(timezone="Asia/Shanghai")
    cases = {
        utc(2024, 1, 1, 1, 0): "weekday morning rush hour",  # Monday 09:00 (the paper's example)
        utc(2024, 1, 7, 1, 0): "weekend normal morning hour",  # Sunday 09:00
        utc(2024, 1, 3, 4, 0): "weekday noon",  # Wednesday 12:00
        utc(2024, 1, 3, 6, 0): "weekday normal afternoon hour",  # 14:00
        utc(2024, 1, 6, 10, 0): "weekend normal evening hour",  # Saturday 18:00 (rush on weekdays)
        utc(2024, 1, 3, 15, 59): "weekday late night",  # 23:59
        utc(2024, 1, 5, 22, 0): "weekend normal morning hour",  # Saturday 06:00 local is Friday 22:00 UTC
    }
    grid = TimeGrid(cfg)
    ts = np.array(list(cases), dtype=np.int64)
    assert [grid.descriptor_texts[i] for i in grid.descriptor(ts)] == list(cases.values())
    for t, text in cases.items():
        assert describe_time(t, cfg) == (grid.descriptor_texts.index(text), text)
    # Wednesday 09:00 local: weekday 2, slot 36
    assert grid.week_slot_of_local(grid.local_seconds(np.array([utc(2024, 1, 3, 1, 0)])))[0] == 2 * 96 + 36
    assert grid.time_id(np.array([utc(2024, 1, 3, 1, 0)]))[0] == local_time_id(2024, 1, 3, 9, 0)


def test_interval_grouping_boundaries():
    cfg = SequenceConfig(timezone="Asia/Shanghai", dedup_within_interval=False)
    t0 = utc(2024, 1, 3, 6, 0)  # 14:00 local
    events = [(t0, 0), (t0 + 899, 1), (t0 + 900, 2), (t0 + 900, 2), (t0 + 3600, 3)]
    tok = build_sequences(make_log([events], 4), None, cfg).sequence(0)
    assert tok["kind"].tolist() == [D, B, B, S, D, B, B, S, D, B]
    assert tok["value"][tok["kind"] == B].tolist() == [0, 1, 2, 2, 3]
    dedup = build_sequences(make_log([events], 4), None, SequenceConfig(timezone="Asia/Shanghai")).sequence(0)
    assert dedup["value"][dedup["kind"] == B].tolist() == [0, 1, 2, 3]
    assert dedup["source_row"][dedup["kind"] == B].tolist() == [0, 1, 3, 4]  # the latest occurrence is kept
    again = build_sequences(make_log([[(t0, 0), (t0 + 10, 1), (t0 + 20, 0)]], 4), None, SequenceConfig(timezone="Asia/Shanghai")).sequence(
        0
    )
    assert again["value"][again["kind"] == B].tolist() == [1, 0]  # the interval still ends on what it ended on


def test_variants_shape_and_content():
    t0 = utc(2024, 1, 3, 6, 0)  # Wed 14:00 Asia/Shanghai
    events = [(t0, 0), (t0 + 61, 1), (t0 + 1800, 2), (t0 + 86400 * 3 + 7, 1)]  # last: Saturday 14:00:07
    lg = make_log([events], 3)
    out = {v: build_sequences(lg, None, SequenceConfig(timezone="Asia/Shanghai", variant=v)).sequence(0) for v in VARIANTS}
    cfg = SequenceConfig(timezone="Asia/Shanghai")
    wd, we = desc_id(cfg, "weekday normal afternoon hour"), desc_id(cfg, "weekend normal afternoon hour")
    assert out["interval"]["value"].tolist() == [wd, 0, 1, -1, wd, 2, -1, we, 1]
    for v in ("none", "component", "position"):
        assert out[v]["kind"].tolist() == [B] * 4 and out[v]["value"].tolist() == [0, 1, 2, 1]
    assert out["none"]["position"].tolist() == [0, 1, 2, 3]
    assert out["position"]["position"].tolist() == [0, 0, 1, 2]
    assert out["text"]["kind"].tolist() == [TT, B] * 4
    assert out["text"]["value"].tolist() == [wd, 0, wd, 1, wd, 2, we, 1]
    assert out["component"]["components"].tolist() == [
        [2024, 1, 3, 14, 0, 0],
        [2024, 1, 3, 14, 1, 1],
        [2024, 1, 3, 14, 30, 0],
        [2024, 1, 6, 14, 0, 7],
    ]
    for v in VARIANTS:
        assert ("components" in out[v]) == (v == "component")


def test_civil_from_days_matches_datetime():
    days = np.concatenate([[-719_162, 2_932_896], np.random.default_rng(0).integers(-719_162, 2_932_896, 2_000)])
    y, m, d = civil_from_days(days)
    epoch = date(1970, 1, 1).toordinal()
    assert [(int(a), int(b), int(c)) for a, b, c in zip(y, m, d)] == [
        (x.year, x.month, x.day) for x in (date.fromordinal(int(n) + epoch) for n in days)
    ]
    assert (y[0], m[0], d[0], y[1], m[1], d[1]) == (1, 1, 1, 9999, 12, 31)


# --------------------------------------------------------------------------- a loop-based reference


def reference_tokens(lg: EventLog, start: int, end: int, cfg: SequenceConfig, importance: np.ndarray) -> list[tuple]:
    """Eq. 1 and the truncation rules written as plain loops, with zoneinfo per event."""
    tz = ZoneInfo(cfg.timezone)
    step = cfg.interval_minutes * 60
    groups: list[list[tuple[int, int, int]]] = []  # [(row, behaviour, time_id)]
    for row in range(start, end):
        wall = datetime.fromtimestamp(int(lg.timestamp[row]), tz).replace(tzinfo=None)
        tid = int((wall - EPOCH).total_seconds()) // step
        if groups and groups[-1][-1][2] == tid:
            groups[-1].append((row, int(lg.behavior[row]), tid))
        else:
            groups.append([(row, int(lg.behavior[row]), tid)])

    def top(group, k):  # the latest, then the most important (ties to the most recent); back in time order
        best = sorted(group, key=lambda e: (e is not group[-1], -importance[e[1]], -e[0]))[:k]
        return sorted(best)

    if cfg.dedup_within_interval:
        groups = [[e for i, e in enumerate(g) if e[1] not in {x[1] for x in g[i + 1 :]}] for g in groups]
    if cfg.max_behaviors_per_interval is not None:
        groups = [top(g, cfg.max_behaviors_per_interval) for g in groups]
    per_behavior = 2 if cfg.variant == "text" else 1
    kept, used = [], 0
    for i in range(len(groups) - 1, -1, -1):
        overhead = (1 + (i < len(groups) - 1)) if cfg.variant == "interval" else 0
        room = (cfg.token_budget - used - overhead) // per_behavior
        if room >= len(groups[i]):
            kept.insert(0, groups[i])
            used += overhead + per_behavior * len(groups[i])
            continue
        if room > 0:
            kept.insert(0, top(groups[i], room))
        break
    grid = TimeGrid(cfg)
    tokens = []
    for j, g in enumerate(kept):
        desc = int(grid.descriptor(np.array([lg.timestamp[g[0][0]]]))[0])
        if cfg.variant == "interval":
            tokens.append((D, desc, -1, j))
        for row, b, _ in g:
            if cfg.variant == "text":
                tokens.append((TT, desc, -1, j))
            tokens.append((B, b, row, j))
        if cfg.variant == "interval" and j < len(kept) - 1:
            tokens.append((S, -1, -1, j))
    return tokens


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tz", ["Europe/Berlin", "UTC"])
def test_matches_reference_and_respects_budget(variant, tz):
    lg = synthetic_log(6_000, 30, 40, seed=3)
    lg.timestamp += 1_711_843_200 - 1_672_531_200  # move into spring 2024: crosses the March DST change
    split = leave_one_out(lg)
    cfg = SequenceConfig(timezone=tz, variant=variant, token_budget=37, max_behaviors_per_interval=3, chunk_events=1_000)
    stats = BehaviorStats.fit(split.train, cfg)
    seqs = build_sequences(lg, split.test, cfg, stats)
    assert len(seqs) == len(split.test) and np.all(seqs.lengths() <= cfg.token_budget)
    for i in range(len(seqs)):
        u = split.test.users[i]
        ref = reference_tokens(lg, lg.offsets[u], split.test.history_end[i], cfg, stats.importance)
        tok = seqs.sequence(i)
        got = list(zip(tok["kind"].tolist(), tok["value"].tolist(), tok["source_row"].tolist()))
        assert got == [r[:3] for r in ref], f"case {i}"
        if variant == "position":
            assert tok["position"].tolist() == [r[3] for r in ref]
        else:
            assert tok["position"].tolist() == list(range(len(ref)))
        assert np.all(np.diff(tok["timestamp"]) >= 0)


def test_without_separator_the_descriptor_alone_marks_an_interval():
    t0 = utc(2024, 1, 3, 6, 0)  # Wed 14:00 Asia/Shanghai
    events = [(t0, 0), (t0 + 61, 1), (t0 + 1800, 2), (t0 + 86400 * 3 + 7, 1)]
    cfg = SequenceConfig(timezone="Asia/Shanghai", separator=False)
    out = build_sequences(make_log([events], 3), None, cfg).sequence(0)
    wd, we = desc_id(cfg, "weekday normal afternoon hour"), desc_id(cfg, "weekend normal afternoon hour")
    assert out["value"].tolist() == [wd, 0, 1, wd, 2, we, 1]
    # the budget counts one token an interval less: ten one-behaviour intervals, 2 tokens each
    ten = [(utc(2024, 1, 3, 0, 0) + 900 * k, k) for k in range(10)]
    budget = SequenceConfig(timezone="UTC", token_budget=11, importance="uniform", separator=False)
    tok = build_sequences(make_log([ten], 10), None, budget).sequence(0)
    assert tok["value"][tok["kind"] == B].tolist() == [5, 6, 7, 8, 9]
    assert len(tok["kind"]) == 10 and not (tok["kind"] == S).any()


def test_budget_keeps_the_most_recent_intervals():
    cfg = SequenceConfig(timezone="UTC", token_budget=11, importance="uniform")
    t0 = utc(2024, 1, 3, 0, 0)
    events = [(t0 + 900 * k, k) for k in range(10)]  # ten intervals of one behaviour: 3 tokens each, 2 for the last
    tok = build_sequences(make_log([events], 10), None, cfg).sequence(0)
    # 11 = 3 + 3 + 3 + 2: the last four intervals fit whole (the boundary interval would need 3 more)
    assert tok["value"][tok["kind"] == B].tolist() == [6, 7, 8, 9]
    assert len(tok["kind"]) == 11


def test_importance_keeps_rare_behaviour_in_boundary_and_burst():
    # training: behaviours 0-19 (location updates) at every user, 20 (call drop) at one user, 21 at half of them
    train_users = [[(utc(2024, 1, 1, 0, 0) + i, b) for i, b in enumerate(range(20))] for _ in range(10)]
    train_users[0].append((utc(2024, 1, 1, 1, 0), 20))
    for u in range(5):
        train_users[u].append((utc(2024, 1, 1, 2, 0), 21))
    train = make_log(train_users, 22)
    cfg = SequenceConfig(timezone="UTC", token_budget=8, max_behaviors_per_interval=None)
    stats = BehaviorStats.fit(train, cfg)
    assert stats.importance[20] > stats.importance[21] > stats.importance[0]
    t0 = utc(2024, 1, 2, 8, 0)
    old = [(t0 + 10, 3), (t0 + 20, 20), (t0 + 30, 4), (t0 + 40, 21), (t0 + 50, 5)]
    recent = [(t0 + 3600, 0), (t0 + 3610, 1), (t0 + 3620, 2)]
    tok = build_sequences(make_log([old + recent], 22), None, cfg, stats).sequence(0)
    # budget 8 = recent interval (1 + 3) + boundary (descriptor, 2 behaviours, [SEP]): its latest (5) and
    # the most important other (the call drop, 20), in time order
    assert tok["kind"].tolist() == [D, B, B, S, D, B, B, B]
    assert tok["value"][tok["kind"] == B].tolist() == [20, 5, 0, 1, 2]
    # a burst of 12 distinct location updates plus the call drop, capped at 4 per interval
    burst = [(t0 + k, b) for k, b in enumerate([0, 1, 2, 3, 4, 5, 20, 6, 7, 8, 9, 10, 11])]
    capped = SequenceConfig(timezone="UTC", max_behaviors_per_interval=4)
    tok = build_sequences(make_log([burst], 22), None, capped, stats).sequence(0)
    kept = tok["value"][tok["kind"] == B].tolist()
    assert len(kept) == 4 and 20 in kept
    # location updates tie on importance: the most recent ones win
    assert kept == [20, 9, 10, 11]
    # the latest behaviour survives the cap even where rarer ones fill it: it is where the interval ended
    rare_then_common = [(t0 + k, b) for k, b in enumerate([20, 21, 1, 2, 3, 0])]
    capped = SequenceConfig(timezone="UTC", max_behaviors_per_interval=2)
    tok = build_sequences(make_log([rare_then_common], 22), None, capped, stats).sequence(0)
    assert tok["value"][tok["kind"] == B].tolist() == [20, 0]


# --------------------------------------------------------------------------- prefixes, determinism, files


def test_prefixes_never_see_the_target_or_later():
    lg = synthetic_log(5_000, 40, 60, seed=7)
    split = leave_one_out(lg)
    cfg = SequenceConfig(timezone="Europe/Berlin", token_budget=64)
    stats = BehaviorStats.fit(split.train, cfg)
    cases = split.valid
    seqs = build_sequences(lg, cases, cfg, stats)
    starts = np.repeat(lg.offsets[cases.users], seqs.lengths())
    ends = np.repeat(cases.history_end, seqs.lengths())
    rows = seqs.source_row
    is_b = seqs.kind == B
    assert np.all((rows[is_b] >= starts[is_b]) & (rows[is_b] < ends[is_b]))
    # the same as building whole users of a log cut at each history end
    cut = np.zeros(lg.num_events, dtype=bool)
    for u, end in zip(cases.users, cases.history_end):
        cut[lg.offsets[u] : end] = True
    whole = build_sequences(lg.select_events(cut), cases.users, cfg, stats)
    for name in ("offsets", "kind", "value", "time_id", "position", "timestamp", "week_slot"):
        np.testing.assert_array_equal(getattr(seqs, name), getattr(whole, name), err_msg=name)


def test_deterministic_and_save_load_roundtrip(tmp_path):
    lg = synthetic_log(3_000, 20, 50, seed=1)
    cfg = SequenceConfig(timezone="Asia/Shanghai", variant="component", token_budget=50)
    stats = BehaviorStats.fit(lg, cfg)
    a, b = build_sequences(lg, None, cfg, stats), build_sequences(lg, None, cfg, stats)
    a.save(tmp_path / "seq.npz")
    c = TokenSequences.load(tmp_path / "seq.npz")
    for other in (b, c):
        for name in ("offsets", "kind", "value", "time_id", "position", "timestamp", "week_slot", "source_row", "users", "components"):
            np.testing.assert_array_equal(getattr(a, name), getattr(other, name), err_msg=name)
        assert (other.descriptor_texts, other.variant, other.timezone) == (a.descriptor_texts, a.variant, a.timezone)
    stats.save(tmp_path / "stats.npz")
    s2 = BehaviorStats.load(tmp_path / "stats.npz")
    np.testing.assert_array_equal(s2.importance, stats.importance)
    assert s2.source_names == stats.source_names
    # subset and chunking do not change sequences
    sub = a.subset(np.array([3, 0]))
    np.testing.assert_array_equal(sub.sequence(0)["value"], a.sequence(3)["value"])
    chunked = build_sequences(
        lg, None, SequenceConfig(timezone="Asia/Shanghai", variant="component", token_budget=50, chunk_events=7), stats
    )
    np.testing.assert_array_equal(chunked.value, a.value)
    np.testing.assert_array_equal(chunked.offsets, a.offsets)


def test_empty_histories_and_empty_log():
    lg = make_log([[(utc(2024, 1, 1), 0), (utc(2024, 1, 2), 1)], []], 2)
    seqs = build_sequences(lg, EvalSet(np.array([0, 1]), np.array([0, 2]), np.zeros(2, np.int32), np.zeros(2, np.int64)))
    assert seqs.lengths().tolist() == [0, 0]
    assert build_sequences(lg, np.zeros(0, np.int64)).num_tokens == 0


# --------------------------------------------------------------------------- sources and main sequence


def test_main_sequence_selection_with_inferred_granularity():
    cfg = SequenceConfig(timezone="Asia/Shanghai", granularity_min_events=2)
    midnight = utc(2024, 1, 9, 16, 0)  # 2024-01-10 00:00 local
    first_of_month = utc(2024, 1, 31, 16, 0)  # 2024-02-01 00:00 local
    users = []
    for u in range(3):
        users.append(
            sorted(
                [(midnight - 86400 * 5 + 3 * k + u, 0) for k in range(5)]  # sessions, per second
                + [(midnight - 3600 * 3 + 3600 * k, 1) for k in range(2)]  # hourly
                + [(midnight + 86400 * k, 2) for k in range(3)]  # daily usage at local midnight
                + [(first_of_month, 3)]  # monthly bill
                + [(midnight + 17 * u, 4)]  # too few events to tell: "event"
            )
        )
    lg = make_log(users, 5)
    assert infer_granularity(lg, TimeGrid(cfg), 2).tolist() == [0, 1, 2, 3, 0]
    stats = BehaviorStats.fit(lg, cfg)
    assert stats.source_names == ("event", "hourly", "daily", "monthly")
    assert stats.source_events.tolist() == [18, 6, 9, 3]
    for main, kept in (("all", {0, 1, 2, 3, 4}), ("longest", {0, 4}), ("daily", {2}), ("monthly", {3})):
        seqs = build_sequences(lg, None, SequenceConfig(timezone="Asia/Shanghai", main_sequence=main), stats)
        assert set(seqs.value[seqs.kind == B].tolist()) == kept, main
    with pytest.raises(ValueError, match="main_sequence='weekly'"):
        build_sequences(lg, None, SequenceConfig(main_sequence="weekly"), stats)
    with pytest.raises(ValueError, match="needs behaviour sources"):
        build_sequences(lg, None, SequenceConfig(main_sequence="longest"))
    given = BehaviorStats.fit(lg, cfg, source=np.array(["sess", "sess", "cdr", "bill", "sess"]))
    assert given.source_names == ("bill", "cdr", "sess") and given.source_events.tolist() == [3, 9, 24]
    seqs = build_sequences(lg, None, SequenceConfig(main_sequence="longest"), given)
    assert set(seqs.value[seqs.kind == B].tolist()) == {0, 1, 4}


def test_idf_importance_by_hand():
    lg = make_log([[(1, 0), (2, 0), (3, 1)], [(1, 0)], [(5, 2)], []], 4)
    # 3 users with events; df = [2, 1, 1, 0]
    expected = np.log(4.0 / (1.0 + np.array([2, 1, 1, 0]))) + 1.0
    np.testing.assert_allclose(idf_importance(lg), expected, rtol=1e-6)


# --------------------------------------------------------------------------- config


def test_package_yaml_is_the_dataclass_default():
    assert load_config(SequenceConfig, "pkg:sequence/default.yaml") == SequenceConfig()
    cfg = load_config(SequenceConfig, "pkg:sequence/default.yaml", ["variant=position", "timezone=Asia/Shanghai"])
    assert (cfg.variant, cfg.timezone) == ("position", "Asia/Shanghai")
    assert len(TimeGrid(cfg).descriptor_texts) == 12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"interval_minutes": 60}, r"day_parts\[2\]\.end=09:30 does not fall on the 60-minute"),
        ({"interval_minutes": 7}, "must divide a day"),
        ({"timezone": "Mars/Olympus"}, "not an IANA timezone"),
        ({"variant": "hstu"}, "variant='hstu'"),
        ({"token_budget": 1}, "token_budget=1"),
        ({"weekend_days": [5, 7]}, "weekend_days"),
        ({"day_parts": [{"name": "day", "start": "00:00", "end": "12:00"}]}, "uncovered, starting at .'12:00'"),
        (
            {"day_parts": [{"name": "a", "start": "00:00", "end": "24:00"}, {"name": "b", "start": "23:00", "end": "01:00"}]},
            r"day_parts\[1\] \(b\) overlaps another day part at 23:00",
        ),
        ({"day_parts": [{"name": "a", "start": "0:00", "end": "25:00"}]}, r"day_parts\[0\]\.end='25:00'"),
        ({"day_parts": [{"name": "a", "begin": "0:00", "end": "24:00"}]}, r"day_parts\[0\]="),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequenceConfig(**kwargs)


def test_unquoted_yaml_clock_times_are_accepted():
    # PyYAML reads unquoted 23:00 as the base-60 integer 1380 = minutes since midnight
    parts = yaml.safe_load("[{name: day, start: 06:00, end: 23:00}, {name: night, start: 23:00, end: 06:00}]")
    assert parts[0]["end"] == 1380
    grid = TimeGrid(SequenceConfig(day_parts=parts))
    # descriptor ids follow the clock from midnight: weekday parts, then weekend parts
    assert grid.descriptor_texts == ("weekday night", "weekday day", "weekend night", "weekend day")
    assert grid.slot_descriptor[[0, 24, 95, 5 * 96 + 24, 6 * 96 + 95]].tolist() == [0, 1, 0, 3, 2]


def test_bad_cases_are_a_clear_error():
    lg = make_log([[(1, 0), (2, 1)], [(3, 0)]], 2)
    with pytest.raises(ValueError, match=r"history_end\[0\]=3 lies outside user 0"):
        build_sequences(lg, EvalSet(np.array([0]), np.array([3]), np.zeros(1, np.int32), np.zeros(1, np.int64)))
    with pytest.raises(ValueError, match=r"cases.users\[1\]=5"):
        build_sequences(lg, np.array([0, 5]))


def test_a_cap_that_drops_a_large_share_warns_once_per_process(monkeypatch, caplog):
    from gts_lum.sequence import timestamp_process

    monkeypatch.setattr(timestamp_process, "_cap_warned", False)
    spread = make_log([[(utc(2024, 1, 1) + 900 * i, i) for i in range(40)]], 40)  # one event per interval
    positions = make_log([[(i, i) for i in range(40)]], 40)  # positions read as seconds: one interval
    with caplog.at_level("INFO", logger="gts_lum.sequence.timestamp_process"):
        build_sequences(spread)
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        build_sequences(positions)
        build_sequences(positions)  # e.g. the next scorer request: no second warning
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "dropped 60% of 40 events" in warnings[0] and "ordinal time" in warnings[0]


# --------------------------------------------------------------------------- real data


def test_movielens_builds():
    ratings = DATA / "movielens-latest-small" / "ratings.csv"
    if not ratings.exists():
        pytest.skip(f"MovieLens data not found at {ratings}")
    frame = pd.read_csv(ratings).rename(columns={"userId": "user_id", "movieId": "behavior_id"})
    lg = EventLog.from_frame(frame)
    split = leave_one_out(lg)
    cfg = SequenceConfig(timezone="America/Chicago")  # MovieLens is run from Minnesota
    stats = BehaviorStats.fit(split.train, cfg)
    assert stats.source_names[int(np.argmax(stats.source_events))] == "event"
    for variant in VARIANTS:
        seqs = build_sequences(lg, split.test, SequenceConfig(timezone="America/Chicago", variant=variant), stats)
        assert len(seqs) == len(split.test) and seqs.lengths().max() <= 240
        is_b = seqs.kind == B
        ends = np.repeat(split.test.history_end, seqs.lengths())
        assert np.all(seqs.source_row[is_b] < ends[is_b])
        assert np.all(seqs.lengths() > 0)
    assert "|" in seqs.render(0, behavior_names=lg.behavior_ids)
