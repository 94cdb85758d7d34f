import numpy as np
import pandas as pd
import pytest

from gts_lum.data.events import EventLog
from gts_lum.sequence.splits import held_out_users, hold_out_for_validation, holdout, leave_one_out


def _log():
    df = pd.DataFrame(
        {
            "user_id": ["u1"] * 5 + ["u2"] * 2 + ["u3"] * 3,
            "timestamp": [1, 2, 3, 4, 5, 1, 2, 10, 10, 10],
            "behavior_id": ["a", "b", "c", "d", "e", "a", "b", "x", "y", "z"],
        }
    )
    return EventLog.from_frame(df, seed=7)


def test_leave_one_out_targets_and_training_events():
    log = _log()
    split = leave_one_out(log)
    u1 = list(log.user_ids).index("u1")
    i = list(split.test.users).index(u1)
    assert log.behavior_ids[split.test.target[i]] == "e"
    assert log.behavior_ids[split.valid.target[list(split.valid.users).index(u1)]] == "d"
    assert split.test.history_end[i] - log.offsets[u1] == 4  # history a..d
    # u2 has 2 events: not evaluated, all its events train
    assert len(split.test) == 2 and split.train.num_events == 3 + 2 + 1
    # no target event is among the training events of an evaluated user
    for cases in (split.valid, split.test):
        for u, t in zip(cases.users, cases.target):
            s, e = split.train.offsets[u], split.train.offsets[u + 1]
            assert t not in split.train.behavior[s:e]


def test_tie_break_is_seeded_not_by_item_id():
    # u3's three events share one timestamp: which is last depends on the seed, not on the id order
    lasts = set()
    df = pd.DataFrame({"user_id": ["u"] * 3, "timestamp": [10] * 3, "behavior_id": ["x", "y", "z"]})
    for seed in range(12):
        log = EventLog.from_frame(df, seed=seed)
        lasts.add(log.behavior_ids[log.behavior[-1]])
    assert len(lasts) > 1
    assert np.array_equal(EventLog.from_frame(df, seed=3).behavior, EventLog.from_frame(df, seed=3).behavior)


def test_held_out_users_never_train():
    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame(
        {
            "user_id": np.repeat([f"u{i}" for i in range(n)], 5),
            "timestamp": np.tile(np.arange(5), n),
            "behavior_id": rng.integers(0, 30, 5 * n).astype(str),
        }
    )
    log = EventLog.from_frame(df)
    split = held_out_users(log, 0.25, seed=1)
    assert 60 < len(split.test) < 140
    assert (split.train.lengths()[split.test.users] == 0).all()
    assert not set(split.test.users) & set(split.valid.users)


def test_target_subset_picks_last_eligible_events_and_training_stops_before_validation():
    df = pd.DataFrame(
        {
            "user_id": ["u"] * 7,
            "timestamp": [1, 2, 3, 4, 5, 6, 7],
            "behavior_id": ["call", "ott1", "sms", "ott2", "call", "ott3", "sms"],
        }
    )
    log = EventLog.from_frame(df)
    ott = np.flatnonzero(np.char.startswith(log.behavior_ids.astype(str), "ott"))
    split = leave_one_out(log, target_behaviors=ott)
    assert log.behavior_ids[split.test.target[0]] == "ott3" and split.test.history_end[0] == 5
    assert log.behavior_ids[split.valid.target[0]] == "ott2" and split.valid.history_end[0] == 3
    assert list(log.behavior_ids[split.train.behavior]) == ["call", "ott1", "sms"]


def test_hold_out_for_validation_moves_the_last_training_events_to_validation():
    log = _log()
    split = leave_one_out(log)
    u1, u2, u3 = (list(log.user_ids).index(u) for u in ("u1", "u2", "u3"))
    moved = hold_out_for_validation(split, 2)
    # u1 trained on a, b, c: b and c move (a stays); c's history (a, b) ends with an unseen event, so c
    # is a case, b's (a) does not; u3 keeps x, its only training event; u2 is not validated and keeps
    # both events; the test set is unchanged
    assert list(log.behavior_ids[moved.train.behavior[moved.train.offsets[u1] : moved.train.offsets[u1 + 1]]]) == ["a"]
    assert moved.train.lengths()[u3] == 1 and moved.train.lengths()[u2] == 2 and moved.test is split.test
    extra = moved.valid.subset(np.arange(len(split.valid), len(moved.valid)))
    assert list(extra.users) == [u1] and list(log.behavior_ids[extra.target]) == ["c"]
    assert list(extra.history_end - log.offsets[u1]) == [2]  # history a, b of the full log
    np.testing.assert_array_equal(moved.valid.target[: len(split.valid)], split.valid.target)
    assert hold_out_for_validation(split, 0) is split


def test_hold_out_for_validation_makes_cases_of_target_behaviours_only():
    df = pd.DataFrame(
        {"user_id": ["u"] * 7, "timestamp": [1, 2, 3, 4, 5, 6, 7], "behavior_id": ["call", "ott1", "sms", "ott2", "call", "ott3", "sms"]}
    )
    log = EventLog.from_frame(df)
    ott = np.flatnonzero(np.char.startswith(log.behavior_ids.astype(str), "ott"))
    moved = hold_out_for_validation(leave_one_out(log, target_behaviors=ott), 3, ott)
    # training was call, ott1, sms: two leave it (the first stays); sms follows a moved event but is no
    # target, so no case; ott1's history (call) was trained on, so no case either
    assert list(log.behavior_ids[moved.train.behavior]) == ["call"]
    assert list(log.behavior_ids[moved.valid.target]) == ["ott2"]
    df = pd.DataFrame(
        {"user_id": ["u"] * 6, "timestamp": [1, 2, 3, 4, 5, 6], "behavior_id": ["call", "sms", "ott1", "call", "ott2", "ott3"]}
    )
    log = EventLog.from_frame(df)
    ott = np.flatnonzero(np.char.startswith(log.behavior_ids.astype(str), "ott"))
    moved = hold_out_for_validation(leave_one_out(log, target_behaviors=ott), 3, ott)
    # training call, sms, ott1, call: sms, ott1, call move; ott1 follows the moved sms and is a target
    assert list(log.behavior_ids[moved.train.behavior]) == ["call"]
    assert list(log.behavior_ids[moved.valid.target]) == ["ott2", "ott1"] and list(moved.valid.history_end) == [4, 2]


def test_holdout_is_seeded_and_disjoint():
    """Unstratified (the label tasks' report users): floor(n * fraction) rows, the same for a seed."""
    train, test = holdout(50, 0.3, seed=4)
    assert len(test) == 15 and len(train) == 35
    np.testing.assert_array_equal(np.sort(np.r_[train, test]), np.arange(50))
    np.testing.assert_array_equal(holdout(50, 0.3, seed=4)[1], test)
    assert not np.array_equal(holdout(50, 0.3, seed=5)[1], test)
    assert len(holdout(50, 0.0, seed=4)[1]) == 0  # nothing held out: early stopping off
    with pytest.raises(ValueError, match="fraction 1.0"):
        holdout(50, 1.0, 0)


def test_holdout_is_stratified():
    """With strata (a probe's classes) every stratum gives its share: 2 of 10 rare rows, 18 of 90."""
    classes = np.r_[np.zeros(90), np.ones(10)]
    train, valid = holdout(100, 0.2, seed=3, strata=classes)
    assert sorted(np.r_[train, valid]) == list(range(100))
    assert (classes[valid] == 1).sum() == 2 and len(valid) == 20
    np.testing.assert_array_equal(valid, holdout(100, 0.2, seed=3, strata=classes)[1])
    assert not np.array_equal(valid, holdout(100, 0.2, seed=4, strata=classes)[1])
