"""The Feast feature store of gts-lum: export its sources, publish them, read and push at serving time.

Features (definitions in feature_repo/):
    user_profile       the data contract's users table attributes (one JSON object: each data set brings
                       its own columns, and the declared schema lets a plain `feast apply` run without data)
    user_sequence      the last N behaviour ids, timestamps (unix s) and time IDs of a user, oldest first:
                       what the timestamp process turns into tokens. The export writes one snapshot per
                       user and local day with events (point-in-time joins see no later event); serving
                       appends events through a PushSource
    behavior_catalog   description, type, semantic ID and semantic-ids version of each behaviour
    sequence_settings  one row (key "current"): the timestamp-process settings and N the stored time IDs
                       follow. In the online store, not in view tags, which a plain `feast apply` replaces
Training sets come from `FeatureStore.get_historical_features` (feature service user_training). Feast
0.67's file offline store leaves out an entity row for which a view has rows, but none within
[t - ttl, t] (e.g. a row before the user's first snapshot) instead of returning nulls.

Pseudonymisation. Users are keyed by `pseudonymize(user_id)`, an HMAC-SHA256 under the key in the
environment variable GTS_LUM_PSEUDONYM_KEY (never in a file): the stores hold no raw id, and without
the key a pseudonym cannot be linked back. `FeatureClient.delete_user` removes a user from the online
store and rewrites the offline parquet files without them.

Concurrent pushes. `push_events` is a read-modify-write of the user's arrays (read, append, keep the last
N, write back). Two writers interleaving would lose events, so the whole cycle holds a per-user lock:
    - SQLite setup: a `filelock.FileLock` (flock) on the file locks/<pseudonym>.lock beside the online
      store. Every acquisition opens the file anew, so the lock excludes threads of one process as well
      as other processes (flock locks belong to the open file, not to the process).
    - Redis setup: redis-py's `Lock` on gts_lum:<project>:lock:<name> in the online store's Redis (our own
      client of it, `redis_client`, from the store's config: Feast's client is private to it): a
      token set with a lease, released only by its holder, so that a holder never frees a lock that
      expired and was taken by someone else. The lease (30 s) bounds how long a crashed holder blocks the
      user; a cycle takes milliseconds.
Each thread (and each process) uses its own FeatureStore, so SQLite connections are never shared.
Pushes carry strictly increasing event timestamps per user (max of now, the newest event, and the stored
snapshot's time + 1 us): Redis drops writes that are not newer than what it holds.
Pushes go to the online store only. Feast 0.67's file offline store cannot append list-valued rows:
its type mapping knows Arrow's `list<item: ...>` but parquet files read back as `list<element: ...>`
(its own rewrite included), so PushMode.OFFLINE fails with KeyError 'list<element: string>'. Training
sets get new events through the batch path (`export_feature_sources` from the clean data).

    export_feature_sources("runs/x/clean", "runs/x/features", semantic_ids_dir="runs/x/semantic_ids")
    publish_features("feature_repo", "runs/x/features")
    client = FeatureClient("feature_repo")
    client.get_history("U000001")   # {"behavior_ids": [...], "timestamps": [...], "time_ids": [...]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import secrets
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml
from filelock import FileLock
from redis.exceptions import LockNotOwnedError
from tqdm.auto import tqdm

from gts_lum.config import from_dict, load_config
from gts_lum.data.contract import DatasetManifest, read_table
from gts_lum.data.events import EventLog, ragged_arange
from gts_lum.data.pseudonym import pseudonym_key, pseudonymize, pseudonymize_all
from gts_lum.data.validate import load_event_log
from gts_lum.sequence.timestamp_process import SECONDS_PER_DAY, SequenceConfig, TimeGrid

log = logging.getLogger(__name__)

FEATURE_DATA_ENV = "GTS_LUM_FEATURE_DATA"  # read by feature_repo/data_sources.py
USER_KEY = "user_pseudonym"
BEHAVIOR_KEY = "behavior_id"
PROFILE_VIEW, SEQUENCE_VIEW, CATALOG_VIEW, SETTINGS_VIEW = "user_profile", "user_sequence", "behavior_catalog", "sequence_settings"
SETTINGS_KEY, SETTINGS_ROW = "settings_key", "current"
SEQUENCE_PUSH = "user_sequence_push"
PROFILE_SERVICE = "user_profile_service"
SEQUENCE_FEATURES = ("behavior_ids", "timestamps", "time_ids")
SOURCE_FILES = {
    PROFILE_VIEW: "user_profile.parquet",
    SEQUENCE_VIEW: "user_sequence.parquet",
    CATALOG_VIEW: "behavior_catalog.parquet",
    SETTINGS_VIEW: "sequence_settings.parquet",
}
SOURCES_MANIFEST = "feature_sources.yaml"
TIME_COLUMNS = ("event_timestamp", "created")
SNAPSHOT_ELEMENTS = 4_000_000  # array elements per written row group: bounds the export's memory


def dataset_sequence_config(clean_dir: str | Path, sequence_config: str | None = None) -> SequenceConfig:
    """The timestamp-process settings of a clean data set: `sequence_config` with the data set's timezone."""
    timezone = DatasetManifest.read(clean_dir).timezone
    return load_config(SequenceConfig, sequence_config or "pkg:sequence/default.yaml", {"timezone": timezone})


def _utc(seconds: np.ndarray) -> pa.Array:
    """Unix seconds as the timestamp type of Feast's event_timestamp / created columns."""
    return pa.array(np.asarray(seconds, dtype=np.int64).astype("datetime64[s]").astype("datetime64[us]"), pa.timestamp("us", tz="UTC"))


def _sequence_snapshots(event_log: EventLog, grid: TimeGrid, last_n: int, snapshot_days: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ends, starts) of each snapshot's rows in `event_log`: one per user and bucket of `snapshot_days` local
    days with events (None: one per user), ending at the bucket's last event, holding at most `last_n`."""
    user = event_log.user_of_event()
    if snapshot_days is None:
        bucket = np.zeros(event_log.num_events, dtype=np.int64)
    else:
        bucket = grid.local_seconds(event_log.timestamp) // (SECONDS_PER_DAY * snapshot_days)
    last = np.ones(event_log.num_events, dtype=bool)
    last[:-1] = (user[1:] != user[:-1]) | (bucket[1:] != bucket[:-1])
    ends = np.flatnonzero(last) + 1  # exclusive
    starts = np.maximum(event_log.offsets[user[ends - 1]], ends - last_n)
    return ends, starts


def _write_sequences(
    event_log: EventLog, grid: TimeGrid, pseudonyms: np.ndarray, path: Path, last_n: int, snapshot_days: int | None, created: int
) -> dict:
    ends, starts = _sequence_snapshots(event_log, grid, last_n, snapshot_days)
    time_id = grid.time_id(event_log.timestamp)
    catalog = pa.array(event_log.behavior_ids.astype(str))
    user = event_log.user_of_event()
    schema = pa.schema(
        [
            (USER_KEY, pa.string()),
            ("behavior_ids", pa.list_(pa.string())),
            ("timestamps", pa.list_(pa.int64())),
            ("time_ids", pa.list_(pa.int64())),
            ("event_timestamp", pa.timestamp("us", tz="UTC")),
            ("created", pa.timestamp("us", tz="UTC")),
        ]
    )
    lengths = ends - starts
    # Chunks of whole snapshots with about SNAPSHOT_ELEMENTS array elements each.
    cuts = np.searchsorted(np.cumsum(lengths), np.arange(SNAPSHOT_ELEMENTS, int(lengths.sum()), SNAPSHOT_ELEMENTS), side="right")
    edges = np.unique(np.concatenate([[0], cuts, [len(ends)]]))
    with pq.ParquetWriter(path, schema) as writer:
        for a, b in tqdm(list(zip(edges[:-1], edges[1:])), desc="sequence snapshots", unit="chunk", leave=False, disable=None):
            rows = ragged_arange(starts[a:b], lengths[a:b])  # (E,) event rows, snapshot after snapshot
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths[a:b])]).astype(np.int32))
            writer.write_table(
                pa.table(
                    [
                        pa.array(pseudonyms[user[ends[a:b] - 1]].astype(str)),
                        pa.ListArray.from_arrays(offsets, catalog.take(pa.array(event_log.behavior[rows]))),
                        pa.ListArray.from_arrays(offsets, pa.array(event_log.timestamp[rows])),
                        pa.ListArray.from_arrays(offsets, pa.array(time_id[rows])),
                        _utc(event_log.timestamp[ends[a:b] - 1]),
                        _utc(np.full(b - a, created)),
                    ],
                    schema=schema,
                )
            )
    return {
        "rows": int(len(ends)),
        "users": int((event_log.lengths() > 0).sum()),
        "mean_length": round(float(lengths.mean()), 1) if len(ends) else 0.0,
        "event_time": [int(event_log.timestamp.min()), int(event_log.timestamp.max())] if event_log.num_events else [created, created],
    }


def _write_profile(clean_dir: Path, path: Path, valid_from: int, created: int) -> dict:
    users = read_table(clean_dir, "users")
    if users is None:  # the users table is optional in the contract: a profile without attributes
        users = pd.DataFrame({"user_id": pd.Series([], dtype=str)})
    clash = sorted(set(users.columns) & {USER_KEY, *TIME_COLUMNS})
    if clash:
        raise ValueError(f"{clean_dir}: users table column(s) {clash} clash with the feature store's key and time columns; rename them")
    # one JSON object per user, nulls left out (pandas writes numpy scalars and timestamps as JSON)
    rows = users.drop(columns=["user_id"]).to_json(orient="records", lines=True, date_format="iso").splitlines() if len(users) else []
    objects = [json.dumps({k: v for k, v in json.loads(row).items() if v is not None}) for row in rows]
    table = pa.table(
        {
            USER_KEY: pa.array(pseudonymize_all(users["user_id"].astype(str)).astype(str), pa.string()),
            "attributes": pa.array(objects, pa.string()),
        }
    )
    table = table.append_column("event_timestamp", _utc(np.full(len(users), valid_from)))
    table = table.append_column("created", _utc(np.full(len(users), created)))
    pq.write_table(table, path)
    return {"rows": len(users), "attributes": [c for c in users.columns if c != "user_id"], "event_time": [valid_from, valid_from]}


def _write_settings(path: Path, cfg: SequenceConfig, last_n: int, valid_from: int, created: int) -> dict:
    table = pa.table(
        {SETTINGS_KEY: [SETTINGS_ROW], "sequence_config": [json.dumps(dataclasses.asdict(cfg))], "last_n": pa.array([last_n], pa.int64())}
    )
    table = table.append_column("event_timestamp", _utc(np.array([valid_from]))).append_column("created", _utc(np.array([created])))
    pq.write_table(table, path)
    return {"rows": 1, "event_time": [valid_from, valid_from]}


def _write_catalog(clean_dir: Path, path: Path, semantic_ids_dir: str | Path | None, created: int) -> dict:
    behaviors = read_table(clean_dir, "behaviors")
    if behaviors is None:
        raise FileNotFoundError(f"{clean_dir}: no behaviors table (a clean data set always has one)")
    ids = behaviors["behavior_id"].astype(str).to_numpy()
    codes: pa.Array = pa.nulls(len(ids), pa.list_(pa.int32()))
    semantic_id: pa.Array = pa.nulls(len(ids), pa.string())
    version = None
    if semantic_ids_dir is not None:
        # the tokenizer pulls in torch and scikit-learn (~3 s), which the feature server never needs otherwise
        from gts_lum.tokenizer.semantic_ids import SemanticIds

        artifact = SemanticIds.load(semantic_ids_dir)
        found = artifact.lookup(ids)  # (B, depth + 1); KeyError naming behaviours the artifact lacks
        version = artifact.version
        codes = pa.ListArray.from_arrays(pa.array(np.arange(len(ids) + 1, dtype=np.int32) * found.shape[1]), pa.array(found.reshape(-1)))
        semantic_id = pa.array(["-".join(map(str, c)) for c in found.tolist()])
    kind = behaviors["type"].astype(str).where(behaviors["type"].notna(), None) if "type" in behaviors else pd.Series([None] * len(ids))
    table = pa.table(
        {
            BEHAVIOR_KEY: pa.array(ids),
            "description": pa.array(behaviors["description"].astype(str).to_numpy()),
            "type": pa.array(kind.to_numpy(dtype=object), pa.string()),
            "semantic_id": semantic_id,
            "semantic_codes": codes,
            "semantic_ids_version": pa.array([version] * len(ids), pa.string()),
            "event_timestamp": _utc(np.full(len(ids), created)),
            "created": _utc(np.full(len(ids), created)),
        }
    )
    pq.write_table(table, path)
    return {"rows": len(ids), "semantic_ids_version": version, "event_time": [created, created]}


def export_feature_sources(
    clean_dir: str | Path,
    out_dir: str | Path,
    semantic_ids_dir: str | Path | None = None,
    last_n: int = 512,
    snapshot_days: int | None = 1,
    sequence_config: str | None = None,
) -> dict:
    """Write the parquet files the feature repo's data sources read, and feature_sources.yaml describing them.

    - user_sequence.parquet: per user, a snapshot of the last `last_n` events at the last event of every
      `snapshot_days` local days with events (None: only the latest), so point-in-time joins never see
      a later event. Event order is the clean EventLog's (its seeded tie-break), as the sequence stage's.
    - user_profile.parquet: the users table, valid from the first event of the data window: the
      contract's users table has no history, so its slowly changing attributes (plan, device) are taken
      as known over the whole window, and training rows anywhere in it get a profile.
    - behavior_catalog.parquet: the behaviours table with semantic IDs from `semantic_ids_dir` (nulls
      without one), valid from the export time (a catalog version holds from its publication).
    Users are written as pseudonyms (`pseudonymize`); time IDs follow `sequence_config` (default
    pkg:sequence/default.yaml) in the data set's timezone. Returns the manifest.
    """
    clean_dir, out = Path(clean_dir), Path(out_dir)
    if type(last_n) is not int or last_n < 1:
        raise ValueError(f"last_n={last_n!r}: expected an integer >= 1")
    if snapshot_days is not None and (type(snapshot_days) is not int or snapshot_days < 1):
        raise ValueError(f"snapshot_days={snapshot_days!r}: expected an integer >= 1, or None for the latest snapshot only")
    pseudonym_key()  # fail before any work when the key is missing
    cfg = dataset_sequence_config(clean_dir, sequence_config)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    created = int(time.time())
    event_log = load_event_log(clean_dir)  # seed 0, as the sequence stage's default split
    pseudonyms = pseudonymize_all(event_log.user_ids)
    files = {
        SEQUENCE_VIEW: _write_sequences(
            event_log, TimeGrid(cfg), pseudonyms, out / SOURCE_FILES[SEQUENCE_VIEW], last_n, snapshot_days, created
        )
    }
    window_start = files[SEQUENCE_VIEW]["event_time"][0]
    files[PROFILE_VIEW] = _write_profile(clean_dir, out / SOURCE_FILES[PROFILE_VIEW], window_start, created)
    files[CATALOG_VIEW] = _write_catalog(clean_dir, out / SOURCE_FILES[CATALOG_VIEW], semantic_ids_dir, created)
    files[SETTINGS_VIEW] = _write_settings(out / SOURCE_FILES[SETTINGS_VIEW], cfg, last_n, window_start, created)
    times = [t for f in files.values() for t in f.pop("event_time")]
    manifest = {
        "dataset": DatasetManifest.read(clean_dir).name,
        "created": created,
        "last_n": last_n,
        "snapshot_days": snapshot_days,
        "sequence_config": dataclasses.asdict(cfg),
        "semantic_ids_version": files[CATALOG_VIEW]["semantic_ids_version"],
        "event_time_range": [min(times), max(times)],  # what publish materializes
        "files": {name: {"path": SOURCE_FILES[name], **facts} for name, facts in files.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / SOURCES_MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    log.info("feature sources written to %s: %s", out, {k: v["rows"] for k, v in manifest["files"].items()})
    return manifest


def read_sources_manifest(sources_dir: str | Path) -> dict:
    path = Path(sources_dir) / SOURCES_MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: write the sources with `gts-lum features export` first")
    return yaml.safe_load(path.read_text())


def load_feature_definitions(repo_path: str | Path, sources_dir: str | Path) -> list:
    """The Feast objects the repo's .py files define, with data sources pointing into `sources_dir`.

    As `feast apply` does, every .py file of the repo is imported (the files import each other by
    module name); the modules are dropped from sys.modules afterwards so that a second call, with
    other sources, imports them afresh.
    """
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    repo = Path(repo_path).resolve()
    names = sorted(p.stem for p in repo.glob("*.py") if p.stem != "__init__")
    if not names:
        raise FileNotFoundError(f"{repo}: no Feast definitions (*.py) in the feature repo")
    before = os.environ.get(FEATURE_DATA_ENV)
    os.environ[FEATURE_DATA_ENV] = str(Path(sources_dir).resolve())
    sys.path.insert(0, str(repo))
    for name in names:
        sys.modules.pop(name, None)
    try:
        modules = [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(repo))
        for name in names:
            sys.modules.pop(name, None)
        if before is None:
            os.environ.pop(FEATURE_DATA_ENV)
        else:
            os.environ[FEATURE_DATA_ENV] = before
    objects: list = []
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, (Entity, DataSource, FeatureView, FeatureService)) and not any(value is o for o in objects):
                objects.append(value)
    return objects


def _config_file(repo: Path, config: str | Path | None) -> Path:
    path = repo / (config or "feature_store.yaml")
    if not path.exists():
        raise FileNotFoundError(f"feature store config {path} not found (config is relative to the repo {repo})")
    return path


def open_store(repo_path: str | Path, config: str | Path | None = None):
    """A FeatureStore over `repo_path` with `config` (a feature_store.yaml relative to the repo; default its own)."""
    from feast import FeatureStore

    repo = Path(repo_path).resolve()
    return FeatureStore(repo_path=str(repo), fs_yaml_file=_config_file(repo, config))


def publish_features(repo_path: str | Path, sources_dir: str | Path, config: str | Path | None = None) -> dict:
    """`feast apply` + `feast materialize` through the Python API: register the repo's definitions with
    sources in `sources_dir` (written by `export_feature_sources`) and load the online store.

    On SQLite a publish replaces the online values (pushed events since the export included); Redis keeps
    a user's pushed sequence when it is newer than the export's snapshot.
    """
    from datetime import datetime, timedelta, timezone

    from feast import FeatureView

    manifest = read_sources_manifest(sources_dir)
    objects = load_feature_definitions(repo_path, sources_dir)
    views = {o.name: o for o in objects if isinstance(o, FeatureView)}
    if SEQUENCE_VIEW not in views:
        raise ValueError(f"{repo_path}: the feature repo defines no {SEQUENCE_VIEW!r} feature view")
    missing = {SEQUENCE_VIEW, SETTINGS_VIEW} - set(views)
    if missing:
        raise ValueError(f"{repo_path}: the feature repo defines no {sorted(missing)} feature view")
    store = open_store(repo_path, config)
    t0 = time.perf_counter()
    store.apply(objects, partial=False)
    t1 = time.perf_counter()
    first, last = manifest["event_time_range"]
    start = datetime.fromtimestamp(first, tz=timezone.utc) - timedelta(seconds=1)
    end = datetime.fromtimestamp(last, tz=timezone.utc) + timedelta(seconds=1)
    store.materialize(start_date=start, end_date=end, feature_views=sorted(set(views) - {PROFILE_VIEW}))
    if PROFILE_VIEW in views and manifest["files"][PROFILE_VIEW]["rows"]:
        # Online the profile carries its export time, not its valid-from time: Redis keeps only values
        # newer than those it holds, and a re-export of the same window must still replace attributes.
        profile = pd.read_parquet(Path(sources_dir) / SOURCE_FILES[PROFILE_VIEW])
        store.write_to_online_store(PROFILE_VIEW, profile.assign(event_timestamp=profile["created"]))
    t2 = time.perf_counter()
    summary = {
        "project": store.project,
        "online_store": store.config.online_store.type,
        "feature_views": sorted(views),
        "feature_services": sorted(o.name for o in store.list_feature_services()),
        "materialized": [start.isoformat(), end.isoformat()],
        "rows": {name: facts["rows"] for name, facts in manifest["files"].items()},
        "semantic_ids_version": manifest["semantic_ids_version"],
        "apply_s": round(t1 - t0, 2),
        "materialize_s": round(t2 - t1, 2),
    }
    log.info("feature store published: %s", summary)
    return summary


@contextlib.contextmanager
def file_lock(path: Path, remove: bool = False) -> Iterator[None]:
    """Exclusive lock on `path` (filelock: flock on Unix). A new FileLock each time, hence a descriptor of its own:
    excludes other threads and other processes alike. `remove`: unlink the file before letting go (a deleted
    user's lock, named by their pseudonym, must not stay)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        try:
            yield
        finally:
            if remove:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def redis_lock(client, key: str, lease_s: float = 30.0, wait_s: float = 60.0) -> Iterator[None]:
    """redis-py's Lock on `key`: held for at most `lease_s` (a crashed holder's lease expires), released only by
    its holder (a token checked on release); TimeoutError when another writer holds it past `wait_s`."""
    lock = client.lock(key, timeout=lease_s, sleep=0.01, blocking_timeout=wait_s)
    if not lock.acquire():
        raise TimeoutError(f"Redis lock {key} still held by another writer after {wait_s:.0f} s")
    try:
        yield
    finally:
        try:
            lock.release()
        except LockNotOwnedError:
            log.warning("Redis lock %s outlived its %g s lease: a concurrent writer may have entered", key, lease_s)


def redis_client(online_store):
    """A redis-py client of a Feast Redis online store, from its config's public fields: `connection_string`
    in Feast's documented format ("host:port[,host:port...],name=value,...", e.g. "redis:6379,db=0,ssl=true,
    password=..."; a value is read as JSON when it parses, as Feast reads it: ssl=true is True, db=0 is 0),
    `redis_type` (redis, redis_cluster, redis_sentinel) and `sentinel_master`. Ours rather than Feast's own
    client (`RedisOnlineStore._get_client`, a private method): the same server and settings, a pool of our own."""
    from redis import Redis, RedisCluster, Sentinel
    from redis.cluster import ClusterNode

    nodes, params = [], {}
    for part in online_store.connection_string.split(","):
        if "=" in part:
            name, value = part.split("=", 1)
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
            params[name] = value
        else:
            host, port = part.rsplit(":", 1)
            nodes.append((host, int(port)))
    if not nodes:
        raise ValueError("the Redis online store's connection_string names no host:port")
    kind = str(getattr(online_store.redis_type, "value", online_store.redis_type))
    if kind == "redis_cluster":
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **params)
    if kind == "redis_sentinel":
        return Sentinel(nodes, **params).master_for(online_store.sentinel_master)
    return Redis(host=nodes[0][0], port=nodes[0][1], **params)


def _check_events(behavior_ids: Sequence, timestamps: Sequence) -> tuple[list[str], np.ndarray]:
    if isinstance(behavior_ids, str) or isinstance(timestamps, str):
        raise ValueError("push_events: behavior_ids and timestamps must be lists, got a string")
    if len(behavior_ids) != len(timestamps):
        raise ValueError(f"push_events: {len(behavior_ids)} behavior_ids but {len(timestamps)} timestamps (one each per event)")
    ids = []
    for i, b in enumerate(behavior_ids):
        if not isinstance(b, str) or not b:
            raise ValueError(f"push_events: behavior_ids[{i}]={b!r} is not a non-empty string")
        ids.append(b)
    stamps = np.zeros(len(timestamps), dtype=np.int64)
    for i, t in enumerate(timestamps):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"push_events: timestamps[{i}]={t!r} is not a unix time in whole seconds")
        stamps[i] = t
    return ids, stamps


class FeatureClient:
    """Serving-side access to the feature store (see the module docstring for the locking scheme).

    `config` names an alternative feature_store.yaml relative to the repo, e.g. "production/feature_store.yaml".
    """

    def __init__(self, repo_path: str | Path, config: str | None = None):
        pseudonym_key()  # every read and write needs it: a missing or weak key fails here, not at the first user
        self.repo_path = Path(repo_path).resolve()
        self.config_path = _config_file(self.repo_path, config)
        self._local = threading.local()
        store = self._store()
        self.project = store.project
        self.online_store_type = store.config.online_store.type
        if self.online_store_type not in ("sqlite", "redis"):
            raise ValueError(
                f"{self.config_path}: online store type {self.online_store_type!r}; "
                "FeatureClient can lock sqlite (file locks) and redis (Redis locks) stores"
            )
        self._settings: tuple[SequenceConfig, TimeGrid, int] | None = None
        self._redis_client = None

    def _redis(self):
        """A redis-py client of the Redis online store (thread-safe: a connection pool), for the per-user locks and
        deletions, which Feast does not offer; built from the store's public config (`redis_client`)."""
        if self._redis_client is None:
            self._redis_client = redis_client(self._store().config.online_store)
        return self._redis_client

    def _store(self):
        """This thread's FeatureStore (a fresh one after a fork): SQLite connections are never shared."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.store, local.pid = open_store(self.repo_path, self.config_path), os.getpid()
        return local.store

    def _settings_of_store(self) -> tuple[SequenceConfig, TimeGrid, int]:
        if self._settings is None:
            row = (
                self._store()
                .get_online_features(
                    features=[f"{SETTINGS_VIEW}:sequence_config", f"{SETTINGS_VIEW}:last_n"], entity_rows=[{SETTINGS_KEY: SETTINGS_ROW}]
                )
                .to_dict()
            )
            if row["sequence_config"][0] is None:
                raise ValueError(f"the feature store holds no {SETTINGS_VIEW!r}: publish with `gts-lum features publish`")
            cfg = from_dict(SequenceConfig, json.loads(row["sequence_config"][0]))
            self._settings = (cfg, TimeGrid(cfg), int(row["last_n"][0]))
        return self._settings

    @property
    def sequence_config(self) -> SequenceConfig:
        """The timestamp-process settings the stored time IDs follow (timezone and interval of the data set)."""
        return self._settings_of_store()[0]

    @property
    def last_n(self) -> int:
        return self._settings_of_store()[2]

    @contextlib.contextmanager
    def _lock(self, name: str, remove: bool = False) -> Iterator[None]:
        store = self._store()
        if self.online_store_type == "sqlite":
            db = Path(store.config.online_store.path)
            folder = (db if db.is_absolute() else self.repo_path / db).parent / "locks"
            with file_lock(folder / f"{name}.lock", remove):
                yield
        else:
            with redis_lock(self._redis(), f"gts_lum:{self.project}:lock:{name}"):
                yield

    def _read_sequence(self, pseudonym: str) -> tuple[dict, int] | None:
        """The stored arrays and the snapshot's event time (ns), or None for an unknown user."""
        response = self._store().get_online_features(
            features=[f"{SEQUENCE_VIEW}:{f}" for f in SEQUENCE_FEATURES], entity_rows=[{USER_KEY: pseudonym}]
        )
        values = response.to_dict()
        if values["behavior_ids"][0] is None:
            return None
        names = list(response.proto.metadata.feature_names.val)
        stamp = response.proto.results[names.index("behavior_ids")].event_timestamps[0]
        history = {f: list(values[f][0] or []) for f in SEQUENCE_FEATURES}
        return history, stamp.seconds * 1_000_000_000 + stamp.nanos

    def warm_up(self) -> None:
        """Open this thread's FeatureStore and read one (absent) user through it: Feast's registry and request
        caches and the online store's connection are set up before the first real read on this thread."""
        self._read_sequence("gts-lum-warm-up")

    def get_history(self, user_id: str) -> dict:
        """{"behavior_ids": [str], "timestamps": [unix s], "time_ids": [int]} of the user's last N events,
        oldest first. KeyError naming the user when the store has no history for them."""
        found = self._read_sequence(pseudonymize(user_id))
        if found is None:
            raise KeyError(f"user {user_id!r} has no behaviour history in the feature store ({self.config_path})")
        return found[0]

    def get_profile(self, user_id: str) -> dict:
        """The user's profile attributes (empty when the store has none for them)."""
        store = self._store()
        service = store.get_feature_service(PROFILE_SERVICE, allow_cache=True)
        attributes = store.get_online_features(features=service, entity_rows=[{USER_KEY: pseudonymize(user_id)}]).to_dict()["attributes"][0]
        return json.loads(attributes) if attributes else {}

    def push_events(self, user_id: str, behavior_ids: list[str], timestamps: list[int]) -> None:
        """Append events to the user's history: read, merge in time order, keep the last N, write back,
        all under the user's lock so that concurrent pushes lose nothing."""
        from feast.data_source import PushMode

        ids, stamps = _check_events(behavior_ids, timestamps)
        if not ids:
            return
        _, grid, last_n = self._settings_of_store()
        pseudonym = pseudonymize(user_id)
        with self._lock(f"user-{pseudonym}"):
            found = self._read_sequence(pseudonym)
            old, stored_ns = found if found is not None else ({"behavior_ids": [], "timestamps": []}, 0)
            all_ids = np.asarray(old["behavior_ids"] + ids, dtype=object)
            all_ts = np.concatenate([np.asarray(old["timestamps"], dtype=np.int64), stamps])
            keep = np.argsort(all_ts, kind="stable")[-last_n:]  # stable: stored events first among equal times
            all_ids, all_ts = all_ids[keep], all_ts[keep]
            now_ns = time.time_ns()
            event_ns = max(now_ns, stored_ns + 1_000, int(all_ts[-1]) * 1_000_000_000) // 1_000 * 1_000  # strictly newer, in us
            row = pd.DataFrame(
                {
                    USER_KEY: [pseudonym],
                    "behavior_ids": [all_ids.tolist()],
                    "timestamps": [all_ts.tolist()],
                    "time_ids": [grid.time_id(all_ts).tolist()],
                    "event_timestamp": [pd.Timestamp(event_ns, unit="ns", tz="UTC")],
                    "created": [pd.Timestamp(now_ns // 1_000 * 1_000, unit="ns", tz="UTC")],
                }
            )
            self._store().push(SEQUENCE_PUSH, row, to=PushMode.ONLINE)

    def _user_views(self) -> list:
        return [fv for fv in self._store().list_feature_views() if USER_KEY in fv.join_keys]

    def _delete_online(self, pseudonym: str) -> int:
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.infra.online_stores.helpers import compute_table_id
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        # Feast has no public call that deletes one entity's rows, so this writes to the online store directly,
        # through the layout of Feast's Online Store Format (docs/specs/online_store_format.md, "part of Feast
        # public API contract"): rows keyed by the entity key serialised with the public `serialize_entity_key`.
        cfg = self._store().config
        key = EntityKey(join_keys=[USER_KEY], entity_values=[Value(string_val=pseudonym)])
        blob = serialize_entity_key(key, entity_key_serialization_version=cfg.entity_key_serialization_version)
        if self.online_store_type == "redis":  # one hash, the serialised key then the project name, holds every view of it
            return int(self._redis().delete(blob + self.project.encode("utf-8")))
        db = Path(cfg.online_store.path)
        versioning = cfg.registry.enable_online_feature_view_versioning
        conn = sqlite3.connect(db if db.is_absolute() else self.repo_path / db, timeout=30)
        try:
            conn.execute("PRAGMA secure_delete = ON")  # overwrite the freed pages: no pseudonym left on disk
            with conn:
                removed = sum(
                    conn.execute(f'DELETE FROM "{compute_table_id(self.project, fv, versioning)}" WHERE entity_key = ?', (blob,)).rowcount
                    for fv in self._user_views()
                )
        finally:
            conn.close()
        return removed

    def _delete_offline(self, pseudonym: str) -> int:
        from feast.infra.offline_stores.file_source import FileSource

        removed = 0
        sources = {
            str(FileSource.get_uri_for_file_path(self.repo_path, fv.batch_source.path)): fv.batch_source.file_options.s3_endpoint_override
            for fv in self._user_views()
        }
        for uri, endpoint in sorted(sources.items()):
            filesystem, path = FileSource.create_filesystem_and_path(uri, endpoint)
            filesystem = filesystem or pafs.LocalFileSystem()  # Feast returns None for local paths
            table = pq.read_table(path, filesystem=filesystem, memory_map=False)
            keep = pc.not_equal(table[USER_KEY], pseudonym)
            dropped = len(table) - pc.sum(keep).as_py() if len(table) else 0
            if dropped:
                tmp = f"{path}.tmp-{secrets.token_hex(4)}"
                pq.write_table(table.filter(keep), tmp, filesystem=filesystem)
                filesystem.move(tmp, path)  # a rename on local disks: readers see the old or the new file
                removed += dropped
        return removed

    def delete_user(self, user_id: str) -> dict:
        """Remove the user from the online store and from the offline parquet files (rewritten without them);
        returns the counts removed. KeyError (without the id) when neither store holds the user.

        Holds the user's lock (no push re-creates them meanwhile), removed with them, and a store-wide one
        (two deletions rewriting the same file would each drop only their own user)."""
        pseudonym = pseudonymize(user_id)
        with self._lock(f"user-{pseudonym}", remove=True), self._lock("offline"):
            removed = {"online_entries": self._delete_online(pseudonym), "offline_rows": self._delete_offline(pseudonym)}
        if not any(removed.values()):
            raise KeyError(
                f"no user with pseudonym {pseudonym[:12]}... in the online or offline store of {self.repo_path}: nothing deleted"
            )
        log.info("deleted user %s...: %s", pseudonym[:12], removed)
        return removed
