"""The telecom simulator: determinism, the data contract, and the structure each model component relies on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gts_lum.config import load_config
from gts_lum.data.catalog import CATEGORIES, build_catalog
from gts_lum.data.contract import TABLES, DatasetManifest, read_table, table_files
from gts_lum.data.events import EventLog
from gts_lum.data.simulator import RUSH_HOURS, CategoricalRows, SimulatorConfig, simulate
from gts_lum.data.validate import validate_dataset

TZ = "Asia/Shanghai"


def tiny(**overrides) -> SimulatorConfig:
    return load_config(SimulatorConfig, "pkg:synth/tiny.yaml", overrides)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A small operator (600 users x 21 days, ~600k events): enough users for the statistical checks."""
    root = tmp_path_factory.mktemp("synth")
    summary = simulate(tiny(users=600, days=21, users_per_shard=250), root, progress=False)
    tables = {name: read_table(root, name) for name in TABLES}
    behaviors = tables["behaviors"].set_index("behavior_id")
    events = tables["events"]
    events["type"] = behaviors.loc[events["behavior_id"], "type"].to_numpy()
    events["family"] = behaviors.loc[events["behavior_id"], "family"].to_numpy()
    events["app"] = behaviors.loc[events["behavior_id"], "app"].to_numpy()
    local = events["timestamp"].dt.tz_convert(TZ)
    events["hour"] = local.dt.hour
    events["weekday"] = local.dt.weekday < 5
    return dict(root=root, summary=summary, **tables)


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    simulate(tiny(), a, progress=False)
    simulate(tiny(), b, progress=False)
    simulate(tiny(seed=1), c, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) >= 7
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "events" / "part-00000.parquet").read_bytes() != (c / "events" / "part-00000.parquet").read_bytes()


def test_shards_hold_disjoint_sorted_users(tmp_path):
    simulate(tiny(users=250, users_per_shard=100), tmp_path, progress=False)
    shards = table_files(tmp_path, "events")
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    seen: set[str] = set()
    for path in shards:
        frame = pd.read_parquet(path)
        users = set(frame["user_id"])
        assert 0 < len(users) <= 100 and not users & seen
        seen |= users
        key = frame["user_id"] + frame["timestamp"].astype("int64").astype(str).str.zfill(20)
        assert key.is_monotonic_increasing  # sorted by user, then time
    assert len(seen) == 250


def test_tables_follow_the_contract(data):
    root = data["root"]
    manifest = DatasetManifest.read(root)
    assert manifest.timezone == TZ and manifest.provenance["config"]["users"] == 600
    for name, spec in TABLES.items():
        frame = data[name]
        assert frame is not None and len(frame) > 0, name
        missing = set(spec.required_columns) - set(frame.columns)
        assert not missing, (name, missing)
        assert not frame.duplicated(subset=list(spec.key)).any(), name
        for col in spec.columns:
            if col.name in frame and col.kind == "time":
                assert str(frame[col.name].dtype) == "datetime64[ns, UTC]", (name, col.name)
            if col.name in frame and col.kind in ("id", "text"):
                assert frame[col.name].map(type).eq(str).all(), (name, col.name)
    events, behaviors, users = data["events"], data["behaviors"], data["users"]
    assert events["behavior_id"].isin(behaviors["behavior_id"]).all()
    assert set(events["user_id"]) <= set(users["user_id"])
    assert data["labels"]["user_id"].isin(users["user_id"]).all()
    assert data["scenarios"]["user_id"].isin(users["user_id"]).all()
    assert set(data["labels"]["task"]) == {"churn", "upgrade", "downgrade", "campaign_response"}
    assert data["summary"]["events"] == len(events)
    # the project's own validator keeps every row, and the events load as an EventLog
    summary = validate_dataset(root, root.parent / "validated", progress=False)
    for name, report in summary["tables"].items():
        assert report["rows_in"] == report["rows_kept"], (name, report)
    log = EventLog.from_frame(events, behavior_ids=behaviors["behavior_id"].to_numpy())
    assert log.num_events == len(events) and log.num_users == 600


def test_volume_and_catalogue_size(data):
    assert 40 <= data["summary"]["events_per_user_per_day"] <= 60  # configured: 50
    behaviors = data["behaviors"]
    assert 600 <= len(behaviors) <= 1500
    assert behaviors["description"].is_unique
    assert {"ott", "voice", "sms", "data", "roaming", "billing", "topup", "plan", "care", "incident", "location", "usage"} <= set(
        behaviors["type"]
    )
    assert set(behaviors["app_category"].dropna()) == set(CATEGORIES)
    bigger = build_catalog(num_apps=192)
    assert bigger.num_behaviors > len(behaviors) and bigger.table["app"].nunique() == 192


def test_granularities_daily_records_at_local_midnight_and_bills_on_the_first(data):
    events, behaviors = data["events"], data["behaviors"]
    assert set(behaviors["granularity"]) == {"second", "day", "month"}
    local = events["timestamp"].dt.tz_convert(TZ)
    gran = behaviors.set_index("behavior_id").loc[events["behavior_id"], "granularity"].to_numpy()
    daily = local[gran == "day"]
    assert len(daily) > 0 and (daily.dt.hour == 0).all() and (daily.dt.minute == 0).all() and (daily.dt.second == 0).all()
    monthly = local[gran == "month"]
    assert len(monthly) > 0 and (monthly.dt.day == 1).all() and (monthly.dt.hour == 0).all()  # tiny holds April 1
    seconds = local[gran == "second"]
    assert (seconds.dt.second != 0).mean() > 0.9  # per-second events are not rounded


def test_commuters_weekday_rush_share_exceeds_night_workers(data):
    events, users = data["events"], data["users"]
    weekday = events[events["weekday"] & events["type"].isin(["ott", "voice", "location"])]
    weekday = weekday.merge(users[["user_id", "archetype"]], on="user_id")
    share = weekday.assign(rush=weekday["hour"].isin(RUSH_HOURS)).groupby("archetype")["rush"].mean()
    assert share["commuter"] > share["night_worker"] + 0.25
    late = weekday.assign(late=weekday["hour"].isin([23, 0, 1, 2, 3])).groupby("archetype")["late"].mean()
    assert late["night_worker"] > 2 * late["commuter"]


def _per_user(data) -> pd.DataFrame:
    events = data["events"]
    counts = events.groupby("user_id").agg(events=("type", "size"), incidents=("type", lambda t: int((t == "incident").sum())))
    labels = data["labels"].pivot(index="user_id", columns="task", values="label")
    return data["users"].set_index("user_id").join(counts).join(labels)


def test_rural_cells_and_4g_devices_have_more_incidents(data):
    users = _per_user(data)
    rate = users["incidents"] / users["events"]
    by_cell = rate.groupby(users["cell_type"]).mean()
    by_device = rate.groupby(users["device_network"]).mean()
    assert by_cell["rural"] > 1.5 * by_cell["urban"]
    assert by_device["4G"] > 1.3 * by_device["5G"]


def test_churn_rises_with_accumulated_incidents(data):
    users = _per_user(data)
    heavy = users["incidents"] > users["incidents"].median()
    assert users.loc[heavy, "churn"].mean() > 2 * users.loc[~heavy, "churn"].mean()
    assert 0.02 < users["churn"].mean() < 0.3


def test_campaign_is_randomized_and_the_offer_changes_response(data):
    campaign = data["labels"].query("task == 'campaign_response'").merge(data["users"], on="user_id")
    assert campaign["treatment"].isin([0, 1]).all()
    assert data["labels"].query("task != 'campaign_response'")["treatment"].isna().all()
    arm = campaign.groupby("treatment")
    assert abs(campaign["treatment"].mean() - 0.5) < 0.08
    # balanced on attributes (randomized, not targeted)
    assert abs(arm["tenure_months"].mean().diff().iloc[-1]) < 0.25 * campaign["tenure_months"].mean()
    five_g = arm["device_network"].apply(lambda s: (s == "5G").mean())
    assert abs(five_g[1] - five_g[0]) < 0.1
    response = arm["label"].mean()
    assert response[1] > response[0] + 0.05
    assert (campaign["plan_tier"] != "unlimited").all()  # only users with an upgrade path are eligible


def _preceded_within(events: pd.DataFrame, later: pd.Series, earlier: pd.Series, by: list[str], seconds: int) -> pd.Series:
    """For each `later` event: is an `earlier` event of the same `by` keys at most `seconds` before it?"""
    left = events[later].sort_values("timestamp")
    right = events[earlier].sort_values("timestamp")[by + ["timestamp"]].rename(columns={"timestamp": "before"})
    merged = pd.merge_asof(left, right, left_on="timestamp", right_on="before", by=by, direction="backward")
    return (merged["timestamp"] - merged["before"]).dt.total_seconds().le(seconds)


def test_bundles_co_occur_within_15_minutes(data):
    events = data["events"]
    bid = events["behavior_id"]
    failure, resolution, stall = (bid.str.contains(f"\\.{k}$") & (events["type"] == "incident") for k in ("failure", "resolution", "stall"))
    assert failure.sum() > 10
    assert _preceded_within(events, failure, resolution, ["user_id", "app"], 900).all()
    assert _preceded_within(events, resolution, stall, ["user_id", "app"], 900).all()
    redial = bid == "voice.redial"
    assert redial.sum() > 10
    assert _preceded_within(events, redial, bid.str.startswith("incident.call_drop"), ["user_id"], 900).all()
    otp = bid == "sms.otp"
    order = bid.str.contains(r"^ott\.shopping\..*\.order\.")
    assert _preceded_within(events, otp, order, ["user_id"], 900).mean() > 0.5


def test_app_choice_is_personal_and_sequential(data):
    ott = data["events"].query("type == 'ott'")[["user_id", "timestamp", "app"]]
    same_user = ott["user_id"].to_numpy()[1:] == ott["user_id"].to_numpy()[:-1]
    same_app = ott["app"].to_numpy()[1:] == ott["app"].to_numpy()[:-1]
    next_same = same_app[same_user].mean()
    # what a user's own app frequencies alone would give: sum of squared shares
    shares = ott.groupby("user_id")["app"].value_counts(normalize=True)
    by_taste = (shares**2).groupby(level=0).sum().mean()
    overall = ott["app"].value_counts(normalize=True)
    by_popularity = (overall**2).sum()
    assert next_same > 1.5 * by_taste  # sequence carries signal beyond the user's taste
    assert by_taste > 3 * by_popularity  # taste is personal, not just global popularity


def test_labels_are_dated_at_the_cutoff_after_every_event(data):
    labels, events, scenarios = data["labels"], data["events"], data["scenarios"]
    cutoff = labels["time"].unique()
    assert len(cutoff) == 1
    assert events["timestamp"].max() < cutoff[0]
    assert (scenarios["start"] <= scenarios["end"]).all() and scenarios["end"].max() < cutoff[0]


def test_scenarios_describe_the_events_in_their_window(data):
    scenarios, events = data["scenarios"], data["events"]
    kinds = scenarios["text"].str.extract(r"^(Poor video quality|Late-night gaming|Roaming abroad|Commute streaming)")[0]
    assert kinds.nunique() == 4
    poor = scenarios[kinds == "Poor video quality"].head(50)
    stalls = events[events["family"] == "incident_video"]
    merged = poor.merge(stalls[["user_id", "timestamp"]], on="user_id")
    inside = merged[(merged["timestamp"] >= merged["start"]) & (merged["timestamp"] <= merged["end"])]
    assert inside.groupby(["user_id", "start"]).ngroups == len(poor)


def test_categorical_rows_follow_their_weights():
    rng = np.random.default_rng(0)
    sampler = CategoricalRows(np.array([[1.0, 0.0, 3.0], [0.0, 1.0, 0.0], [1.0, 1.0, 2.0]]))
    rows = np.repeat([0, 1, 2], 20_000)
    draws = sampler.sample(rows, rng)
    freq = np.stack([np.bincount(draws[rows == r], minlength=3) / 20_000 for r in range(3)])
    np.testing.assert_allclose(freq, [[0.25, 0, 0.75], [0, 1, 0], [0.25, 0.25, 0.5]], atol=0.015)
    assert freq[0, 1] == 0 and freq[1, 1] == 1  # zero weights are never drawn
    with pytest.raises(ValueError, match="row 1"):
        CategoricalRows(np.array([[1.0, 2.0], [0.0, 0.0]]))


def test_categorical_rows_large_tables_search_inside_each_row():
    rng = np.random.default_rng(1)
    patterns = np.array([[1.0, 0.0, 3.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0, 1.0]])
    weights = np.tile(patterns, (5_000, 1))  # 50,000 entries: the per-row search, not the global one
    sampler = CategoricalRows(weights)
    assert not sampler.small
    rows = np.repeat(np.arange(len(weights)), 10)
    draws = sampler.sample(rows, rng)
    for parity, expected in enumerate([[0.25, 0, 0.75, 0, 0], [0, 0.5, 0, 0.25, 0.25]]):
        got = np.bincount(draws[rows % 2 == parity], minlength=5) / (len(rows) / 2)
        np.testing.assert_allclose(got, expected, atol=0.01)
        assert (got[np.array(expected) == 0] == 0).all()


@pytest.mark.parametrize(
    "override, field",
    [
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"users": 0}, "users"),
        ({"start_date": "04/01/2024"}, "start_date"),
        ({"campaign": {"treatment_fraction": 1.0}}, "campaign.treatment_fraction"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        simulate(
            tiny(**override) if "campaign" not in override else load_config(SimulatorConfig, "pkg:synth/tiny.yaml", override),
            tmp_path,
            progress=False,
        )
