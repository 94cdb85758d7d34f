"""The Feast feature store on the tiny simulated operator: exported sources, online histories that rebuild the
offline token sequences, point-in-time training sets, concurrent pushes from threads and processes,
pseudonymous keys and deletion. The online-store tests run on SQLite and on a real redis-server."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gts_lum.cli import main as cli_main
from gts_lum.data.ingest import prepare_dataset
from gts_lum.data.pseudonym import PSEUDONYM_KEY_ENV, pseudonymize
from gts_lum.data.validate import load_event_log
from gts_lum.sequence.splits import EvalSet, leave_one_out
from gts_lum.sequence.timestamp_process import BehaviorStats, TimeGrid, build_sequences
from gts_lum.serving.export import history_log
from gts_lum.serving.features import (
    SOURCE_FILES,
    USER_KEY,
    FeatureClient,
    dataset_sequence_config,
    export_feature_sources,
    open_store,
    publish_features,
    redis_client,
)
from gts_lum.tokenizer.semantic_ids import SemanticIds, tokenize_dataset
from tests.conftest import loopback_port, postgres_database, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2] / "feature_repo"
LAST_N = 512
TOKEN_FIELDS = ("kind", "value", "time_id", "position", "timestamp", "week_slot")


@pytest.fixture(scope="module", autouse=True)
def environment():
    """The pseudonym key comes only from the environment; the module's tests share one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PSEUDONYM_KEY_ENV, "a-test-key-that-lives-only-in-the-environment")
        yield mp


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return prepare_dataset("synth:tiny", tmp_path_factory.mktemp("synth"), progress=False)


@pytest.fixture(scope="module")
def semantic_ids(clean, tmp_path_factory, pytestconfig) -> Path:
    out = tmp_path_factory.mktemp("semantic_ids")
    cache = str(pytestconfig.cache.mkdir("gts-lum-text-embeddings"))  # shared with the tokenizer tests
    tokenize_dataset(clean, out, overrides={"encoder": {"cache_dir": cache, "device": "cpu"}}, progress=False)
    return out


@pytest.fixture(scope="module")
def sources(clean, semantic_ids, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sources")
    return out, export_feature_sources(clean, out, semantic_ids, last_n=LAST_N)


@pytest.fixture(scope="module")
def reference(clean):
    """The offline side: the clean EventLog, the data set's sequence settings, importance from the training split."""
    event_log = load_event_log(clean)
    cfg = dataset_sequence_config(clean)
    stats = BehaviorStats.fit(leave_one_out(event_log).train, cfg)
    by_length = np.argsort(-event_log.lengths(), kind="stable")
    return event_log, cfg, stats, by_length  # users, most events first: each test takes its own


def published(sources, tmp_path_factory, name: str, config: str | None = None) -> tuple[Path, str | None]:
    """A copy of feature_repo/ published over a copy of the sources (tests rewrite them)."""
    root = tmp_path_factory.mktemp(name)
    repo = root / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    data = shutil.copytree(sources[0], root / "sources")
    publish_features(repo, data, config)
    return repo, config


@pytest.fixture(scope="module")
def sqlite_store(sources, tmp_path_factory):
    return published(sources, tmp_path_factory, "sqlite")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A throwaway redis-server on a free port of 127.0.0.1, no persistence; stopped by its PID."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (CI installs it through .ci/run: apt-get install redis-server)")
    import redis

    port = loopback_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(redis.Redis(host="127.0.0.1", port=port).ping, proc, f"redis-server on port {port}", timeout=20)
        yield port
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def redis_store(redis_server, postgres_server, sources, tmp_path_factory, environment):
    """The production config as it is: Redis online store and the SQL registry on PostgreSQL (psycopg)."""
    environment.setenv("GTS_LUM_REDIS", f"127.0.0.1:{redis_server}")
    environment.setenv("GTS_LUM_FEAST_REGISTRY", postgres_database(postgres_server))
    return published(sources, tmp_path_factory, "redis", "production/feature_store.yaml")


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store(request):
    return request.getfixturevalue(f"{request.param}_store")


def history_tokens(history: dict, event_log, cfg, stats):
    """The scorer's path: a feature-store history -> a one-user EventLog (its given order kept) -> tokens."""
    behaviors = pd.Index(event_log.behavior_ids.astype(str)).get_indexer(history["behavior_ids"])
    assert (behaviors >= 0).all()
    one_user, cases = history_log("user", behaviors, history["timestamps"], event_log.behavior_ids)
    return build_sequences(one_user, cases, cfg, stats)


def assert_same_tokens(online, offline) -> None:
    assert online.num_tokens > 0
    for name in TOKEN_FIELDS:
        np.testing.assert_array_equal(getattr(online, name), getattr(offline, name), err_msg=f"token field {name}")


def test_pseudonyms_need_the_key_from_the_environment(monkeypatch):
    first = pseudonymize("U000001")
    assert len(first) == 64 and first == pseudonymize("U000001") and first != pseudonymize("U000002")
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "another key, also of at least 32 bytes")
    assert pseudonymize("U000001") != first
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "k")
    with pytest.raises(ValueError, match=rf"{PSEUDONYM_KEY_ENV} holds 1 bytes: a pseudonym key needs at least 32"):
        pseudonymize("U000001")
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "x" * 31)
    with pytest.raises(ValueError, match="at least 32"):
        FeatureClient(REPO)  # checked when a client is made, before any user is asked for
    monkeypatch.delenv(PSEUDONYM_KEY_ENV)
    with pytest.raises(ValueError, match=PSEUDONYM_KEY_ENV):
        pseudonymize("U000001")


def test_export_writes_pseudonymous_point_in_time_snapshots(sources, reference, semantic_ids):
    folder, manifest = sources
    event_log, cfg, _, _ = reference
    assert manifest["sequence_config"]["timezone"] == "Asia/Shanghai" == cfg.timezone
    snaps = pq.read_table(folder / SOURCE_FILES["user_sequence"]).to_pandas()
    assert len(snaps) == manifest["files"]["user_sequence"]["rows"] > event_log.num_users  # several days per user
    raw = set(event_log.user_ids.astype(str))
    for name in SOURCE_FILES.values():
        if "user" in name:
            keys = pq.read_table(folder / name).column(USER_KEY).to_pylist()
            assert not raw & set(keys) and all(len(k) == 64 for k in keys)
    grid = TimeGrid(cfg)
    for row in snaps.sample(50, random_state=0).itertuples():
        ts = np.asarray(row.timestamps)
        assert 0 < len(ts) <= LAST_N and np.all(np.diff(ts) >= 0)
        assert ts[-1] == row.event_timestamp.timestamp()  # a snapshot holds no event after its own time
        np.testing.assert_array_equal(row.time_ids, grid.time_id(ts))
    catalog = pq.read_table(folder / SOURCE_FILES["behavior_catalog"]).to_pandas()
    artifact = SemanticIds.load(semantic_ids)
    assert list(catalog["behavior_id"]) == list(event_log.behavior_ids)
    assert set(catalog["semantic_ids_version"]) == {artifact.version} == {manifest["semantic_ids_version"]}
    codes = artifact.lookup(catalog["behavior_id"])
    assert catalog["semantic_id"].tolist() == ["-".join(map(str, c)) for c in codes.tolist()]


def test_online_history_rebuilds_the_offline_sequence(store, reference):
    """History arrays from the online store -> EventLog -> timestamp process == the offline builder's sequence."""
    event_log, cfg, stats, users = reference
    client = FeatureClient(*store)
    assert client.sequence_config == cfg and client.last_n == LAST_N
    for u in users[:2]:  # the users with the most events: their history is cut to the last N
        history = client.get_history(event_log.user_ids[u])
        ts = np.asarray(history["timestamps"])
        assert len(ts) == LAST_N < event_log.lengths()[u]
        assert (np.diff(ts) == 0).any()  # simultaneous events: their stored order must survive
        np.testing.assert_array_equal(history["time_ids"], TimeGrid(cfg).time_id(ts))
        assert_same_tokens(history_tokens(history, event_log, cfg, stats), build_sequences(event_log, np.array([u]), cfg, stats))
    with pytest.raises(KeyError, match="nobody"):
        client.get_history("nobody")


def test_training_set_is_point_in_time_correct(sqlite_store, sources, reference, clean):
    """get_historical_features returns the snapshot before each row's time, never a later one, and it
    rebuilds the offline sequence of the history up to that time."""
    event_log, cfg, stats, users = reference
    u = int(users[2])
    pseudonym = pseudonymize(event_log.user_ids[u])
    snaps = pq.read_table(sources[0] / SOURCE_FILES["user_sequence"]).to_pandas()
    mine = snaps[snaps[USER_KEY] == pseudonym].sort_values("event_timestamp")
    before, after = mine.iloc[3], mine.iloc[4]
    window_end = pd.Timestamp(int(event_log.timestamp.max()), unit="s", tz="UTC")
    times = [before.event_timestamp + pd.Timedelta(seconds=1), window_end + pd.Timedelta(hours=1)]
    entity_df = pd.DataFrame({USER_KEY: [pseudonym, pseudonym], "event_timestamp": times})
    store = open_store(*sqlite_store)
    rows = store.get_historical_features(entity_df=entity_df, features=store.get_feature_service("user_training")).to_df()
    rows = rows.sort_values("event_timestamp").reset_index(drop=True)

    assert len(rows) == 2
    assert list(rows.loc[0, "timestamps"]) == list(before.timestamps) != list(after.timestamps)
    assert list(rows.loc[1, "timestamps"]) == list(mine.iloc[-1].timestamps)
    plan_tier = pd.read_parquet(clean / "users.parquet").set_index("user_id").loc[event_log.user_ids[u], "plan_tier"]
    assert [json.loads(a)["plan_tier"] for a in rows["attributes"]] == [plan_tier, plan_tier]  # the profile holds over the whole window

    history = {"behavior_ids": list(rows.loc[0, "behavior_ids"]), "timestamps": list(rows.loc[0, "timestamps"])}
    start, end = event_log.offsets[u], event_log.offsets[u + 1]
    history_end = start + int(np.searchsorted(event_log.timestamp[start:end], int(times[0].timestamp()), side="right"))
    cases = EvalSet(np.array([u]), np.array([history_end]), np.zeros(1, np.int32), np.array([int(times[0].timestamp())]))
    assert_same_tokens(history_tokens(history, event_log, cfg, stats), build_sequences(event_log, cases, cfg, stats))


def push_worker(repo: Path, config: str | None, user: str, worker: int, pushes: int, base: int, catalog: list[str]) -> None:
    client = FeatureClient(repo, config)
    for j in range(pushes):
        client.push_events(user, [catalog[(7 * worker + j) % len(catalog)]], [base + 10 * j + worker])


def test_concurrent_pushes_lose_no_event(store, reference):
    """8 threads x 25 pushes and 2 processes x 10 pushes for one user: every event is kept, in time order."""
    event_log, cfg, _, users = reference
    user = str(event_log.user_ids[users[3]])
    client = FeatureClient(*store)
    before = client.get_history(user)
    base = before["timestamps"][-1] + 60
    catalog = [str(b) for b in event_log.behavior_ids[:50]]
    plan = [(w, 25) for w in range(8)] + [(8, 10), (9, 10)]
    fork = multiprocessing.get_context("fork")  # the children reuse the imported Feast: no 10 s import each
    procs = [fork.Process(target=push_worker, args=(*store, user, w, n, base, catalog)) for w, n in plan[8:]]
    threads = [threading.Thread(target=push_worker, args=(*store, user, w, n, base, catalog)) for w, n in plan[:8]]
    for worker in procs + threads:
        worker.start()
    for worker in procs + threads:
        worker.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]

    expected = sorted((base + 10 * j + w, catalog[(7 * w + j) % len(catalog)]) for w, n in plan for j in range(n))
    after = client.get_history(user)
    ts = np.asarray(after["timestamps"])
    assert len(ts) == LAST_N and np.all(np.diff(ts) >= 0)
    assert list(zip(after["timestamps"][-len(expected) :], after["behavior_ids"][-len(expected) :])) == expected
    assert after["timestamps"][: LAST_N - len(expected)] == before["timestamps"][len(expected) + len(before["timestamps"]) - LAST_N :]
    np.testing.assert_array_equal(after["time_ids"], TimeGrid(cfg).time_id(ts))


def test_push_checks_its_input_and_starts_new_users(sqlite_store):
    client = FeatureClient(*sqlite_store)
    with pytest.raises(ValueError, match="2 behavior_ids but 1 timestamps"):
        client.push_events("U000007", ["a", "b"], [1])
    with pytest.raises(ValueError, match=r"timestamps\[1\]"):
        client.push_events("U000007", ["a", "b"], [1_700_000_000, 1.5])
    with pytest.raises(ValueError, match=r"behavior_ids\[0\]"):
        client.push_events("U000007", [""], [1_700_000_000])
    client.push_events("a new subscriber", ["voice.call", "sms.sent"], [1_700_000_100, 1_700_000_000])
    assert client.get_history("a new subscriber")["behavior_ids"] == ["sms.sent", "voice.call"]


def test_catalog_serves_semantic_ids(sqlite_store, semantic_ids):
    artifact = SemanticIds.load(semantic_ids)
    ids = [str(b) for b in artifact.behavior_ids[:3]]
    store = open_store(*sqlite_store)
    values = store.get_online_features(
        features=store.get_feature_service("behavior_semantic_ids"), entity_rows=[{"behavior_id": b} for b in ids]
    ).to_dict()
    assert values["semantic_codes"] == artifact.lookup(ids).tolist()
    assert set(values["semantic_ids_version"]) == {artifact.version}


def test_delete_user_removes_them_online_and_offline(store, reference):
    event_log, _, _, users = reference
    user, other = str(event_log.user_ids[users[5]]), str(event_log.user_ids[users[6]])
    pseudonym = pseudonymize(user)
    client = FeatureClient(*store)
    kept = client.get_history(other)
    assert client.get_history(user) and client.get_profile(user)
    online_file = store[0] / "data" / "online_store.db"
    if store[1] is None:  # SQLite: the store file holds pseudonyms, never a raw id
        blob = online_file.read_bytes()
        assert pseudonym.encode() in blob
        assert not [u for u in event_log.user_ids.astype(str) if u.encode() in blob]
    sources = [Path(fv.batch_source.path) for fv in client._user_views()]
    assert all(pseudonym in pq.read_table(p).column(USER_KEY).to_pylist() for p in sources)

    locks = store[0] / "data" / "locks"
    client.push_events(user, [str(event_log.behavior_ids[0])], [int(event_log.timestamp.max()) + 60])  # takes the user's lock
    removed = client.delete_user(user)
    assert removed["online_entries"] >= 1 and removed["offline_rows"] >= 1
    assert not list(locks.glob(f"*{pseudonym}*"))  # no lock file named by the deleted user's pseudonym (SQLite setup)
    with pytest.raises(KeyError, match="nothing deleted") as not_found:
        client.delete_user(user)  # a second time: not found, said so
    assert user not in str(not_found.value)
    with pytest.raises(KeyError, match=user):
        client.get_history(user)
    assert client.get_profile(user) == {}
    assert client.get_history(other) == kept
    assert not any(pseudonym in pq.read_table(p).column(USER_KEY).to_pylist() for p in sources)
    assert pseudonymize(other) in pq.read_table(sources[0]).column(USER_KEY).to_pylist()
    if store[1] is None:
        assert pseudonym.encode() not in online_file.read_bytes()  # secure_delete: no leftover in free pages
    else:  # Redis: no key of the user left (their hash held every view)
        redis = redis_client(client._store().config.online_store)
        assert not [k for k in redis.scan_iter() if pseudonym.encode() in k]


def test_redis_client_reads_feasts_connection_string():
    """The client of the per-user locks and deletions: Feast's documented connection-string format, values read
    as JSON where they parse (as Feast reads them); redis-py connects lazily, so no server is needed."""
    from types import SimpleNamespace

    from redis import Redis

    config = SimpleNamespace(connection_string="redis.example:6380,db=2,password=s3cret,ssl=true", redis_type="redis")
    client = redis_client(config)
    kwargs = client.connection_pool.connection_kwargs
    assert isinstance(client, Redis) and (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "redis.example",
        6380,
        2,
        "s3cret",
    )
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    with pytest.raises(ValueError, match="no host:port"):
        redis_client(SimpleNamespace(connection_string="db=0", redis_type="redis"))


def test_cli_on_a_data_set_without_users_table(cycle_data, tmp_path, capsys):
    """export / publish / delete-user through `gts-lum features`; no users table means empty profiles."""
    clean = cycle_data.root.parent / "clean"
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    assert (
        cli_main(["features", "export", "--clean", str(clean), "--out", str(tmp_path / "src"), "--last-n", "8", "--snapshot-days", "0"])
        == 0
    )
    assert cli_main(["features", "publish", "--repo", str(repo), "--sources", str(tmp_path / "src")]) == 0
    client = FeatureClient(repo)
    history = client.get_history("u00")
    assert len(history["behavior_ids"]) == 8 and client.get_profile("u00") == {}
    assert cli_main(["features", "delete-user", "--repo", str(repo), "u00"]) == 0
    assert "user deleted" in capsys.readouterr().out
    assert cli_main(["features", "delete-user", "--repo", str(repo), "u00"]) == 2  # not found: an error, not "deleted"
    assert not list((repo / "data" / "locks").glob("user-*.lock"))
    with pytest.raises(KeyError):
        client.get_history("u00")


def test_a_plain_feast_apply_works_on_a_fresh_clone_and_keeps_the_sequence_settings(sqlite_store, tmp_path):
    """The Feast CLI as a platform engineer runs it: every schema is declared (no data needed), and the
    settings serving extends sequences with live in the online store, which a re-apply leaves alone."""
    feast = [sys.executable, "-c", "from feast.cli.cli import cli; cli()"]
    fresh = tmp_path / "fresh"
    shutil.copytree(REPO, fresh, ignore=shutil.ignore_patterns("data", "__pycache__"))
    done = subprocess.run([*feast, "--chdir", str(fresh), "apply"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    repo, config = sqlite_store
    before = FeatureClient(repo, config).sequence_config
    done = subprocess.run([*feast, "--chdir", str(repo), "apply"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    client = FeatureClient(repo, config)
    assert client.sequence_config == before and client.last_n == LAST_N


def test_the_scorer_serves_histories_from_the_production_store(redis_store, reference, tiny_serving, tmp_path):
    """As the InferenceService runs it: its feature repo is the production feature_store.yaml alone (the
    ConfigMap's mount); the definitions come from the SQL registry on PostgreSQL, the histories from Redis."""
    import httpx

    from gts_lum.serving.scorer import launch_server

    repo = tmp_path / "feature_repo"
    repo.mkdir()
    shutil.copy(REPO / "production" / "feature_store.yaml", repo / "feature_store.yaml")
    event_log, _, _, by_length = reference
    u = int(by_length[-1])  # the shortest history: every event of it is online (under last_n)
    user = str(event_log.user_ids[u])
    server = launch_server(tiny_serving.export, tmp_path / "server.log", feature_repo=repo)
    try:
        url = f"{server.url}/v1/models/{server.name}:predict"
        found = httpx.post(url, json={"instances": [{"user_id": user, "top_k": 5}]}, timeout=60)
        assert found.status_code == 200, found.text
        prediction = found.json()["predictions"][0]
        assert prediction["history"] == {**prediction["history"], "source": "feature_store", "events": int(event_log.lengths()[u])}
        assert len(prediction["ranking"]) == 5
        unknown = httpx.post(url, json={"instances": [{"user_id": "nobody-at-all"}]}, timeout=60)
        assert unknown.status_code == 404 and "not in the feature store" in unknown.json()["error"]
    finally:
        server.stop()


def test_the_feature_server_reads_and_refuses_every_write(sqlite_store, reference, tmp_path):
    """The read-only feature server (what the manifests run) on 127.0.0.1: online features are served;
    /push, /write-to-online-store and /materialize(-incremental) are 404, and nothing reaches the store."""
    import subprocess
    import sys

    import httpx

    repo, config = sqlite_store
    event_log = reference[0]
    user = str(event_log.user_ids[0])
    before = FeatureClient(repo, config).get_history(user)
    port = loopback_port()
    log_file = open(tmp_path / "feature-server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gts_lum.serving.feature_server", "--repo", str(repo), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, proc, "the feature server", timeout=120)
        read = httpx.post(
            f"{url}/get-online-features",
            json={"features": ["user_sequence:behavior_ids"], "entities": {USER_KEY: [pseudonymize(user)]}},
            timeout=30,
        )
        assert read.status_code == 200, read.text
        assert read.json()["results"][1]["values"][0] == before["behavior_ids"]
        writes = {
            "/push": {
                "push_source_name": "user_sequence_push",
                "df": {USER_KEY: [pseudonymize(user)], "behavior_ids": [["x"]]},
                "to": "online",
            },
            "/write-to-online-store": {"feature_view_name": "user_sequence", "df": {USER_KEY: [pseudonymize(user)]}},
            "/materialize": {"start_ts": "2000-01-01T00:00:00", "end_ts": "2100-01-01T00:00:00"},
            "/materialize-incremental": {"end_ts": "2100-01-01T00:00:00"},
        }
        for path, body in writes.items():
            assert httpx.post(f"{url}{path}", json=body, timeout=30).status_code == 404, path
    finally:
        stop_process(proc)
        log_file.close()
    assert FeatureClient(repo, config).get_history(user) == before
