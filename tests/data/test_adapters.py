import shutil

import numpy as np
import pandas as pd
import pytest

from gts_lum.data.adapters import Mapping, adapt
from gts_lum.data.validate import load_event_log, validate_dataset


def test_movielens_mapping_builds_a_valid_dataset(movielens_dir, tmp_path):
    adapt(movielens_dir, Mapping.load("pkg:adapters/movielens.yaml"), tmp_path / "raw", progress=False)
    summary = validate_dataset(tmp_path / "raw", tmp_path / "clean", progress=False)
    assert summary["tables"]["events"] == {"rows_in": 100836, "rows_kept": 100836, "rejected": {}}
    beh = pd.read_parquet(tmp_path / "clean" / "behaviors.parquet").set_index("behavior_id")
    assert beh.loc["1", "description"].startswith("Toy Story (1995). Genres: Adventure|Animation")
    assert "pixar" in beh.loc["1", "description"]  # the most frequent tags enrich the text
    log = load_event_log(tmp_path / "clean")
    assert (log.num_users, log.num_events) == (610, 100836)
    assert (log.timestamp[1:] >= log.timestamp[:-1])[log.user_of_event()[1:] == log.user_of_event()[:-1]].all()


def test_telco_mapping_gives_users_and_churn_labels(telco_dir, tmp_path):
    adapt(telco_dir, Mapping.load("pkg:adapters/telco_churn.yaml"), tmp_path / "raw", progress=False)
    summary = validate_dataset(tmp_path / "raw", tmp_path / "clean", progress=False)
    assert summary["tables"]["users"]["rows_kept"] == 7043
    labels = pd.read_parquet(tmp_path / "clean" / "labels.parquet")
    assert set(labels["task"]) == {"churn"} and labels["label"].sum() == 1869
    users = pd.read_parquet(tmp_path / "clean" / "users.parquet")
    assert "Churn" not in users.columns  # the label must not leak into the attributes
    assert users["TotalCharges"].isna().sum() == 11  # the 11 blank cells (tenure 0) stay missing, not dropped


def test_mapping_errors_name_the_file_and_column(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame({"uid": ["1"], "when": ["2024-01-01"], "item": ["x"]}).to_csv(src / "log.csv", index=False)
    (tmp_path / "m.yaml").write_text(
        "name: x\ntables:\n  events:\n    files: [log.csv]\n    columns: {user_id: uid, timestamp: time, behavior_id: item}\n"
        "  behaviors:\n    from_events: true\n"
    )
    with pytest.raises(KeyError, match=r"log\.csv.*\['time'\]"):
        adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "out", progress=False)
    (tmp_path / "m.yaml").write_text((tmp_path / "m.yaml").read_text().replace("timestamp: time", "timestamp: when"))
    adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "out", progress=False)
    assert validate_dataset(tmp_path / "out", tmp_path / "clean", progress=False)["tables"]["events"]["rows_kept"] == 1


def test_unknown_table_in_mapping_is_an_error(tmp_path):
    (tmp_path / "m.yaml").write_text("name: x\ntables:\n  clicks: {files: [a.csv]}\n")
    with pytest.raises(ValueError, match="unknown table"):
        Mapping.load(tmp_path / "m.yaml")


@pytest.mark.parametrize("zone", ["../../etc/passwd", "/etc/passwd", "dateutil//etc/passwd", "Mars/Olympus", ""])
def test_a_timezone_must_be_an_iana_zone_name(tmp_path, zone):
    from gts_lum.data.contract import DatasetManifest

    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame({"uid": ["1"], "when": ["2024-01-01 08:00"], "item": ["x"]}).to_csv(src / "log.csv", index=False)
    mapping = (
        "tables:\n  events:\n    files: [log.csv]\n    columns: {user_id: uid, timestamp: when, behavior_id: item}\n"
        "  behaviors:\n    from_events: true\n"
    )
    (tmp_path / "m.yaml").write_text(f"name: x\ntimezone: {zone!r}\n" + mapping)
    with pytest.raises(ValueError, match="is not an IANA zone name"):
        Mapping.load(tmp_path / "m.yaml")
    (src / "dataset.yaml").write_text(f"name: x\ntimezone: {zone!r}\n")
    with pytest.raises(ValueError, match=r"dataset\.yaml: timezone .* is not an IANA zone name"):
        DatasetManifest.read(src)
    (tmp_path / "m.yaml").write_text("name: x\ntimezone: Asia/Shanghai\n" + mapping)
    adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "raw", progress=False)
    assert validate_dataset(tmp_path / "raw", tmp_path / "clean", progress=False)["timezone"] == "Asia/Shanghai"


@pytest.mark.parametrize("pattern", ["../secret.csv", "sub/../../secret.csv", "/etc/hostname", "link/*.csv"])
def test_mapping_files_cannot_leave_the_source_folder(tmp_path, pattern):
    src = tmp_path / "src"
    src.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    pd.DataFrame({"uid": ["1"], "when": ["2024-01-01"], "item": ["x"]}).to_csv(outside / "secret.csv", index=False)
    shutil.copy(outside / "secret.csv", tmp_path / "secret.csv")
    (src / "link").symlink_to(outside)
    (tmp_path / "m.yaml").write_text(
        f"name: x\ntables:\n  events:\n    files: [{pattern!r}]\n    columns: {{user_id: uid, timestamp: when, behavior_id: item}}\n"
    )
    with pytest.raises(ValueError, match="source folder"):
        adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "out", progress=False)


def _log_with_bad_lines(path):
    """A CSV of 8 data rows: row 3 has an extra field, row 5 a byte that is not UTF-8, row 7 a bad time."""
    lines = [b"uid,when,item"] + [f"u{i % 2},2024-01-0{i + 1} 08:00,x{i % 3}".encode() for i in range(8)]
    lines[3] = b"u0,2024-01-03 08:00,x2,surplus"
    lines[5] = b"u0,2024-01-05 08:00,caf\x9b"
    lines[7] = b"u0,not a time,x0"
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_malformed_csv_lines_are_quarantined_with_file_and_line_and_the_rest_ingests(tmp_path):
    from gts_lum.data.contract import DatasetManifest

    raw = tmp_path / "raw"
    raw.mkdir()
    DatasetManifest(name="t").write(raw)
    pd.DataFrame({"behavior_id": ["x0", "x1", "x2"], "description": ["a", "b", "c"]}).to_csv(raw / "behaviors.csv", index=False)
    _log_with_bad_lines(tmp_path / "log.csv")
    (raw / "events.csv").write_bytes((tmp_path / "log.csv").read_bytes().replace(b"uid,when,item", b"user_id,timestamp,behavior_id"))
    summary = validate_dataset(raw, tmp_path / "clean", progress=False)
    assert summary["tables"]["events"] == {"rows_in": 8, "rows_kept": 5, "rejected": {"malformed_line": 2, "bad_time": 1}}
    q = pd.read_parquet(tmp_path / "clean" / "quarantine" / "events.parquet").sort_values("_row")
    assert list(q["_row"]) == [3, 5, 7] and q["_file"].str.endswith("events.csv").all()
    assert list(q["_malformed"].fillna("")) == ["line 4: expected 3 fields, saw 4", "line 6: bytes that are not utf-8", ""]


def test_quarantine_names_the_operators_file_and_row_not_the_raw_intermediate(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _log_with_bad_lines(src / "log.csv")
    (tmp_path / "m.yaml").write_text(
        "name: x\ntables:\n  events:\n    files: [log.csv]\n    columns: {user_id: uid, timestamp: when, behavior_id: item}\n"
        "  behaviors:\n    from_events: true\n"
    )
    adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "raw", progress=False)
    summary = validate_dataset(tmp_path / "raw", tmp_path / "clean", progress=False)
    assert summary["tables"]["events"]["rejected"] == {"malformed_line": 2, "bad_time": 1}
    q = pd.read_parquet(tmp_path / "clean" / "quarantine" / "events.parquet").sort_values("_row")
    assert list(q["_row"]) == [3, 5, 7] and set(q["_file"]) == {str(src / "log.csv")}
    assert not {"_source_file", "_source_row"} & set(q.columns)
    assert set(pd.read_parquet(tmp_path / "clean" / "behaviors.parquet")["behavior_id"]) == {"x0", "x1", "x2"}
    assert not [c for c in pd.read_parquet(tmp_path / "clean" / "events").columns if c.startswith("_")]
    # a required column the mapping leaves out: the error names the operator's file
    (tmp_path / "m.yaml").write_text((tmp_path / "m.yaml").read_text().replace("timestamp: when, ", ""))
    adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "raw2", progress=False)
    with pytest.raises(
        ValueError,
        match=rf"{src / 'log.csv'} \(adapted into .*part-00000\.parquet\): table 'events' lacks required column\(s\) \['timestamp'\]",
    ):
        validate_dataset(tmp_path / "raw2", tmp_path / "clean2", progress=False)


def _ordinal_mapping(path, order):
    path.write_text(
        f"name: x\ntables:\n  events:\n    files: ['log*.csv']\n    columns: {{user_id: uid, behavior_id: item}}\n    order: {order}\n"
        "  behaviors:\n    from_events: true\n"
    )


@pytest.mark.parametrize("order", ["rows", "pos"])
def test_an_ordered_log_without_times_comes_in_with_one_interval_per_event(tmp_path, order):
    from gts_lum.data.contract import DatasetManifest

    src = tmp_path / "src"
    src.mkdir()
    # u0 rates 30 items in order (item x3 twice), across two files; u1 four; `pos` orders rows shuffled
    items = [f"x{i}" for i in range(30)]
    items[20] = "x3"
    rows = pd.DataFrame({"uid": ["u0"] * 30 + ["u1"] * 4, "item": items + ["x1", "x2", "x1", "x0"], "pos": list(range(30)) + [7, 8, 9, 10]})
    first, second = rows.iloc[:25], rows.iloc[25:]
    if order == "pos":
        first = first.sample(frac=1, random_state=0)
    first.to_csv(src / "log1.csv", index=False)
    second.to_csv(src / "log2.csv", index=False)
    _ordinal_mapping(tmp_path / "m.yaml", order)
    adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "raw", progress=False)
    summary = validate_dataset(tmp_path / "raw", tmp_path / "clean", progress=False)
    assert summary["tables"]["events"] == {"rows_in": 34, "rows_kept": 34, "rejected": {}}  # a repeat is no duplicate
    assert DatasetManifest.read(tmp_path / "clean").provenance["time"].startswith("ordinal")
    log = load_event_log(tmp_path / "clean")
    u0 = slice(log.offsets[0], log.offsets[1])
    assert list(log.behavior_ids[log.behavior[u0]]) == items  # the given order
    # a day apart: every event its own interval for any interval_minutes (a divisor of a day); last events aligned
    assert set(np.diff(log.timestamp[u0])) == {86400} and log.timestamp[u0][-1] == log.timestamp[log.offsets[2] - 1]


def test_ordinal_time_errors_name_the_mapping_and_the_cell(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame({"uid": ["u0", "u0", "u0"], "item": ["a", "b", "c"], "pos": ["1", "two", "3"]}).to_csv(src / "log.csv", index=False)
    _ordinal_mapping(tmp_path / "m.yaml", "position")
    with pytest.raises(KeyError, match=r"log\.csv.*\['position'\]"):
        adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "raw", progress=False)
    _ordinal_mapping(tmp_path / "m.yaml", "pos")
    adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "raw", progress=False)
    validate_dataset(tmp_path / "raw", tmp_path / "clean", progress=False)
    q = pd.read_parquet(tmp_path / "clean" / "quarantine" / "events.parquet")
    assert list(q["_row"]) == [2] and list(q["_field"]) == ["timestamp"] and set(q["_file"]) == {str(src / "log.csv")}
    (tmp_path / "m.yaml").write_text((tmp_path / "m.yaml").read_text().replace("item}", "item, timestamp: pos}"))
    with pytest.raises(ValueError, match=r"m\.yaml: table 'events' maps both columns.timestamp and order"):
        Mapping.load(tmp_path / "m.yaml")


# MovieLens 100k's u.item layout: no header, "|" between fields, Latin-1 text, one 0/1 column per genre
_GENRES = ["Action", "Comedy", "Drama"]
_ITEMS = "1|Toy Story (1995)|0|1|0\n2|GoldenEye (1995)|1|0|0\n3|Caf\xe9 au lait (1994)|0|1|1\n4|Unknown (1990)|0|0|0\n"
_ITEM_READ = """name: x
tables:
  behaviors:
    files: [u.item]
    read_options: {sep: "|", encoding: latin-1, names: [movie, title, Action, Comedy, Drama]}
    columns: {behavior_id: movie}
"""


def _item_mapping(genres: list[str]) -> str:
    return _ITEM_READ + f'    flags:\n      genres: {{columns: {genres}}}\n    template: {{description: "{{title}}. Genres: {{genres}}"}}\n'


def test_one_hot_flag_columns_become_the_behaviour_text(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "u.item").write_bytes(_ITEMS.encode("latin-1"))
    (tmp_path / "m.yaml").write_text(_item_mapping(_GENRES))
    adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "raw", progress=False)
    beh = pd.read_parquet(tmp_path / "raw" / "behaviors.parquet").set_index("behavior_id")["description"]
    assert list(beh) == [
        "Toy Story (1995). Genres: Comedy",
        "GoldenEye (1995). Genres: Action",
        "Café au lait (1994). Genres: Comedy, Drama",
        "Unknown (1990). Genres: ",
    ]
    (src / "u.item").write_bytes(_ITEMS.replace("2|GoldenEye (1995)|1|", "2|GoldenEye (1995)|x|").encode("latin-1"))
    with pytest.raises(ValueError, match=r"u\.item: data row 2, flag column 'Action': 'x' is not 0/1"):
        adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "raw", progress=False)
    (tmp_path / "m.yaml").write_text(_item_mapping(["Action", "Horror"]))
    with pytest.raises(KeyError, match=r"u\.item.*\['Horror'\]"):
        adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "raw", progress=False)


def test_a_headerless_file_with_a_malformed_line_is_read_with_its_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "u.item").write_bytes(_ITEMS.replace("2|GoldenEye (1995)|1|0|0", "2|GoldenEye (1995)|1|0|0|surplus").encode("latin-1"))
    (tmp_path / "m.yaml").write_text(_ITEM_READ + '    template: {description: "{title}"}\n')
    adapt(src, Mapping.load(tmp_path / "m.yaml"), tmp_path / "raw", progress=False)
    beh = pd.read_parquet(tmp_path / "raw" / "behaviors.parquet")
    assert list(beh["behavior_id"].fillna("-")) == ["1", "-", "3", "4"] and list(beh["_malformed"].fillna("")) == [
        "",
        "line 2: expected 5 fields, saw 6",
        "",
        "",
    ]
    assert beh["description"].iloc[2] == "Café au lait (1994)"
