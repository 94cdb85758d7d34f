import json

import numpy as np
import pandas as pd
import pytest

from gts_lum.data.contract import DatasetManifest
from gts_lum.data.validate import ContractError, ValidationConfig, load_event_log, repeated_keys, validate_dataset


def _write_raw(root, events: pd.DataFrame, timezone="Asia/Shanghai", shards=1):
    DatasetManifest(name="t", timezone=timezone).write(root)
    pd.DataFrame({"behavior_id": ["a", "b", "c"], "description": ["watch video", "call", "sms"]}).to_csv(
        root / "behaviors.csv", index=False
    )
    (root / "events").mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(events)), shards)):
        events.iloc[part].to_csv(root / "events" / f"part-{i}.csv", index=False)


def test_bad_rows_are_quarantined_with_file_row_field_and_reason(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "", "u2", "u2", "u2", "u2"],
            "timestamp": [
                "2024-03-01 08:00",
                "not a time",
                "2024-03-01 08:05",
                "2024-03-01 09:00",
                "1709251200",
                "1709251200",
                "2024-03-01T10:00:00+08:00",
                "2024-03-01T02:00:00Z",
            ],
            "behavior_id": ["a", "b", "zzz", "a", "b", "b", "c", "c"],
            "value": ["1.5", "2", "3", "4", "x", "5", "6", "7"],
        }
    )
    _write_raw(raw, events)
    summary = validate_dataset(raw, tmp_path / "clean", ValidationConfig(max_quarantine_fraction=0.9), progress=False)
    ev = summary["tables"]["events"]
    assert (ev["rows_in"], ev["rows_kept"]) == (8, 3)  # row 6 stays: its twin (row 5) was rejected first
    assert ev["rejected"] == {"bad_time": 1, "unknown_behavior": 1, "null": 1, "bad_float": 1, "duplicate": 1}
    q = pd.read_parquet(tmp_path / "clean" / "quarantine" / "events.parquet").sort_values("_row")
    assert list(q["_row"]) == [2, 3, 4, 5, 8]
    assert list(q["_reason"]) == ["bad_time", "unknown_behavior", "null", "bad_float", "duplicate"]
    assert list(q["_field"]) == ["timestamp", "behavior_id", "user_id", "value", "user_id,timestamp,behavior_id"]
    assert q["_file"].str.endswith("part-0.csv").all()
    assert q.loc[q["_row"] == 2, "timestamp"].item() == "not a time"  # the raw cell is kept for the operator
    # naive times are local (Asia/Shanghai, UTC+8); "+08:00" and "Z" are taken as written
    clean = pd.read_parquet(tmp_path / "clean" / "events").sort_values(["timestamp", "user_id"])
    assert list(clean["timestamp"].astype(str)) == ["2024-03-01 00:00:00+00:00", "2024-03-01 00:00:00+00:00", "2024-03-01 02:00:00+00:00"]
    assert json.loads((tmp_path / "clean" / "validation_summary.json").read_text())["tables"]["events"]["rows_kept"] == 3


def test_duplicates_across_shards_are_found(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u1", "u3"],
            "timestamp": ["1700000100", "1700000200", "1700000100", "1700000300"],
            "behavior_id": ["a", "b", "a", "c"],
        }
    )
    _write_raw(raw, events, shards=2)
    summary = validate_dataset(raw, tmp_path / "clean", progress=False)
    assert summary["tables"]["events"]["rows_kept"] == 3
    assert summary["tables"]["events"]["rejected"] == {"duplicate": 1}
    assert len(load_event_log(tmp_path / "clean").behavior) == 3


def test_missing_column_names_file_and_column(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_raw(raw, pd.DataFrame({"user_id": ["u1"], "time": ["100"], "behavior_id": ["a"]}))
    with pytest.raises(ContractError, match=r"part-0\.csv.*lacks required column\(s\) \['timestamp'\]"):
        validate_dataset(raw, tmp_path / "clean", progress=False)


def test_mostly_rejected_table_stops_the_run(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_raw(raw, pd.DataFrame({"user_id": ["u1", "u2", "u3"], "timestamp": ["x", "y", "100"], "behavior_id": ["a", "a", "a"]}))
    with pytest.raises(ContractError, match="max_quarantine_fraction"):
        validate_dataset(raw, tmp_path / "clean", ValidationConfig(max_quarantine_fraction=0.5), progress=False)


def test_unknown_users_rejected_when_required(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_raw(raw, pd.DataFrame({"user_id": ["u1", "ghost"], "timestamp": ["1700000100", "1700000200"], "behavior_id": ["a", "b"]}))
    pd.DataFrame({"user_id": ["u1"], "plan": ["gold"]}).to_csv(raw / "users.csv", index=False)
    summary = validate_dataset(raw, tmp_path / "clean", ValidationConfig(require_known_users=True), progress=False)
    assert summary["tables"]["events"]["rejected"] == {"unknown_user": 1}


def test_parquet_ids_are_checked_on_their_distinct_values(tmp_path):
    raw = tmp_path / "raw"
    (raw / "events").mkdir(parents=True)
    DatasetManifest(name="t", timezone="UTC").write(raw)
    pd.DataFrame({"behavior_id": ["a", "b"], "description": ["x", "y"]}).to_parquet(raw / "behaviors.parquet")
    pd.DataFrame(
        {
            "user_id": [" u1", "u1", None, "u2", ""],
            "timestamp": pd.to_datetime([1_700_000_001, 1_700_000_002, 1_700_000_003, 1_700_000_004, 1_700_000_005], unit="s", utc=True),
            "behavior_id": ["a ", "b", "a", "c", "a"],
        }
    ).to_parquet(raw / "events" / "part-0.parquet")
    summary = validate_dataset(raw, tmp_path / "clean", ValidationConfig(max_quarantine_fraction=0.9), progress=False)
    assert summary["tables"]["events"]["rejected"] == {"null": 2, "unknown_behavior": 1}
    log = load_event_log(tmp_path / "clean")
    assert list(log.user_ids) == ["u1"] and list(log.behavior_ids[log.behavior]) == ["a", "b"]


@pytest.mark.parametrize(
    "user_scale, spacing",
    [
        (1, 10**9),  # (user, time in ns) fits one int64 as it is
        (2**24, 17_000_001 * 10**6),  # fits only once times are read in ms
        (2**30, 2**50 + 1),  # never fits: three-key sort
    ],
)
@pytest.mark.parametrize("presorted", [False, True])
def test_repeated_keys_equal_pandas_duplicated(user_scale, spacing, presorted):
    rng = np.random.default_rng(spacing)
    n = 20_000
    user = rng.integers(0, 200, n) * user_scale
    time = rng.integers(0, 60, n) * spacing - 10**15
    behavior = rng.integers(0, 4, n)
    if presorted:
        order = np.lexsort((time, user))
        user, time, behavior = user[order], time[order], behavior[order]
    expected = pd.DataFrame({"u": user, "t": time, "b": behavior}).duplicated(keep="first").to_numpy()
    assert expected.sum() > 1000
    assert np.array_equal(repeated_keys(user, time, behavior), expected)


def test_a_header_only_events_table_is_an_error_naming_it(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_raw(raw, pd.DataFrame({"user_id": [], "timestamp": [], "behavior_id": []}))
    with pytest.raises(ContractError, match=r"part-0\.csv: table 'events' holds no rows"):
        validate_dataset(raw, tmp_path / "clean", progress=False)


def test_implausible_times_are_quarantined_and_a_mostly_implausible_column_stops(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = [f"2024-03-01 0{h}:00" for h in range(8)]
    # a duration in seconds (1970), a year-2200 date and a row number among good times
    _write_raw(
        raw,
        pd.DataFrame(
            {"user_id": ["u1"] * 11, "timestamp": good + ["3600", "2200-01-01 00:00", "7"], "behavior_id": ["a", "b", "c"] * 3 + ["a", "b"]}
        ),
    )
    summary = validate_dataset(raw, tmp_path / "clean", progress=False)
    assert summary["tables"]["events"]["rejected"] == {"implausible_time": 3} and summary["time_window"][0] == "1990-01-01"
    q = pd.read_parquet(tmp_path / "clean" / "quarantine" / "events.parquet")
    assert sorted(q["timestamp"]) == ["2200-01-01 00:00", "3600", "7"] and set(q["_field"]) == {"timestamp"}
    # the window is configurable
    wide = validate_dataset(raw, tmp_path / "wide", ValidationConfig(earliest_time="1960-01-01", latest_time="2250-01-01"), progress=False)
    assert wide["tables"]["events"]["rows_kept"] == 11

    durations = tmp_path / "durations"
    durations.mkdir()
    _write_raw(
        durations,
        pd.DataFrame(
            {"user_id": ["u1"] * 6, "timestamp": ["30", "45", "60", "90", "120", "2024-03-01"], "behavior_id": ["a", "b", "c"] * 2}
        ),
    )
    with pytest.raises(ContractError, match=r"implausible_time.*durations, row numbers or another time_unit"):
        validate_dataset(durations, tmp_path / "clean2", progress=False)
    assert not (tmp_path / "clean2" / "VALIDATED").exists()


@pytest.mark.parametrize("name", ["events/part-0.csv", "events/part-1.parquet", "behaviors.csv"])
def test_a_zero_byte_file_is_named_in_the_error(tmp_path, name):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_raw(raw, pd.DataFrame({"user_id": ["u1"], "timestamp": ["2024-03-01"], "behavior_id": ["a"]}))
    (raw / name).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{name}: empty file \(0 bytes\)"):
        validate_dataset(raw, tmp_path / "clean", progress=False)


def test_a_zero_byte_source_file_is_named_by_the_adapter(tmp_path):
    from gts_lum.data.adapters import Mapping, adapt

    src = tmp_path / "src"
    src.mkdir()
    (src / "log.csv").write_bytes(b"")
    (tmp_path / "m.yaml").write_text(
        "name: x\ntables:\n  events:\n    files: [log.csv]\n    columns: {user_id: uid, timestamp: when, behavior_id: item}\n"
    )
    with pytest.raises(ValueError, match=r"log\.csv: empty file"):
        adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "out", progress=False)


def test_validating_a_folder_into_itself_is_refused(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_raw(raw, pd.DataFrame({"user_id": ["u1"], "timestamp": ["2024-03-01"], "behavior_id": ["a"]}))
    with pytest.raises(ContractError, match="another folder"):
        validate_dataset(raw, raw, progress=False)
    assert (raw / "events" / "part-0.csv").exists()
