import numpy as np
import pandas as pd

from gts_lum.data.events import EventLog, event_order, ragged_arange, tiebreak_keys


def test_event_order_equals_the_three_key_sort():
    rng = np.random.default_rng(0)
    n = 50_000
    user = rng.integers(0, 300, n).astype(np.int32)
    seconds = rng.integers(0, 500, n).astype(np.int64) + 1_600_000_000  # many ties
    behavior = rng.integers(0, 40, n).astype(np.int32)
    reference = np.lexsort((tiebreak_keys(user, behavior, np.arange(n), 5), seconds, user))
    assert np.array_equal(event_order(user, seconds, behavior, 5), reference)
    # already sorted input takes the no-sort path and still breaks ties by the hash
    u, t, b = user[reference], seconds[reference], behavior[reference]
    assert np.array_equal(event_order(u, t, b, 9), np.lexsort((tiebreak_keys(u, b, np.arange(n), 9), t, u)))


def test_select_users_and_events_keep_csr_consistent():
    df = pd.DataFrame({"user_id": list("aaabbc"), "timestamp": [1, 2, 3, 1, 2, 1], "behavior_id": list("xyzxyz")})
    log = EventLog.from_frame(df)
    sub = log.select_users(np.array([2, 0]))
    assert list(sub.user_ids) == ["c", "a"] and list(sub.offsets) == [0, 1, 4]
    kept = log.select_events(log.behavior != 0)
    assert list(kept.lengths()) == [2, 1, 1]
    assert list(ragged_arange(np.array([5, 0]), np.array([2, 3]))) == [5, 6, 0, 1, 2]


def test_save_load_roundtrip(tmp_path):
    df = pd.DataFrame({"user_id": ["u", "u"], "timestamp": [5, 6], "behavior_id": ["p", "q"], "value": [1.0, None]})
    log = EventLog.from_frame(df)
    log.save(tmp_path / "log.npz")
    back = EventLog.load(tmp_path / "log.npz")
    assert np.array_equal(back.behavior, log.behavior) and np.isnan(back.value[1])


def test_from_frame_reads_any_timestamp_unit_and_skips_unused_categories():
    df = pd.DataFrame(
        {
            "user_id": pd.Categorical(["b", "a"], categories=["z", "b", "a"]),  # "z" is in no event
            "timestamp": pd.Series(pd.to_datetime([5, 6], unit="s", utc=True)).dt.as_unit("ms"),
            "behavior_id": ["p", "q"],
        }
    )
    log = EventLog.from_frame(df)
    assert list(log.user_ids) == ["a", "b"] and list(log.timestamp) == [6, 5]
