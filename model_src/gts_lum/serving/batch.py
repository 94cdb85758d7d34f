"""Batch scoring: the top K behaviours of every user (or a list of users) from a serving export, as parquet.

    gts-lum batch-score runs/demo/export runs/demo/sequences --out runs/demo/batch --top-k 10

Users are scored in chunks of `chunk_size` through the same `ServingModel.rank` as the KServe scorer
(whole history, two-stage retrieval over the export's target behaviours). Each chunk becomes one file
`part-NNNNN.parquet` (user_id, rank, behavior_id, score): written under a temporary name, then renamed,
then recorded in `manifest.json` (itself replaced atomically). A run killed at any point resumes with
the same call: chunks in the manifest are skipped, a chunk renamed but not yet recorded is scored
again into the same file name, so no chunk is lost or duplicated. The manifest also holds the run's
settings; resuming with other settings (export version, users, chunk size, top K) is an error.

Each manifest entry records its chunk's row count and a hash of its user list. Every call first checks
every recorded chunk against it (the file is there, readable, with those rows and users): a chunk that
was deleted, truncated or replaced is logged by name and scored again, so `complete` means that every
user asked for is in the output (`users_in` = `users_out`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gts_lum.data.events import EventLog
from gts_lum.data.validate import load_event_log
from gts_lum.sequence.splits import EvalSet
from gts_lum.serving.export import ServingModel

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA = pa.schema([("user_id", pa.string()), ("rank", pa.int32()), ("behavior_id", pa.string()), ("score", pa.float32())])


def load_scoring_log(data_dir: str | Path, catalog: np.ndarray) -> tuple[EventLog, int]:
    """The events of a sequence data set (event_log.npz) or a clean data set, in the export's catalog
    order; events of behaviours the model does not know are dropped (returned: how many)."""
    data_dir = Path(data_dir)
    if (data_dir / "event_log.npz").exists():
        log_ = EventLog.load(data_dir / "event_log.npz")
    elif (data_dir / "behaviors.parquet").exists() and (data_dir / "events").exists():
        log_ = load_event_log(data_dir)
    else:
        raise FileNotFoundError(
            f"{data_dir}: neither a sequence data set (event_log.npz) nor a clean data set (behaviors.parquet + events/)"
        )
    if np.array_equal(log_.behavior_ids.astype(str), catalog.astype(str)):
        return log_, 0
    to_catalog = pd.Index(catalog.astype(str)).get_indexer(log_.behavior_ids.astype(str))  # log index -> catalog index (-1: unknown)
    known = to_catalog[log_.behavior] >= 0
    dropped = int((~known).sum())
    if dropped:
        unknown = np.unique(log_.behavior_ids[log_.behavior[~known]])
        log.warning(
            "%s: %d events of %d behaviours outside the model's catalog dropped, e.g. %s",
            data_dir,
            dropped,
            len(unknown),
            list(unknown[:3]),
        )
    kept = log_.select_events(known)
    remapped = EventLog(kept.user_ids, catalog, kept.offsets, to_catalog[kept.behavior].astype(np.int32), kept.timestamp, kept.value)
    return remapped, dropped


def _user_indices(log_: EventLog, users: list[str] | None) -> np.ndarray:
    if users is None:
        return np.arange(log_.num_users, dtype=np.int64)
    rows = pd.Index(log_.user_ids.astype(str)).get_indexer(pd.Index([str(u) for u in users]))
    if (rows < 0).any():
        missing = [str(u) for u, r in zip(users, rows) if r < 0]
        raise KeyError(f"users {missing[:5]} ({len(missing)} in all) are not in the data set")
    return rows.astype(np.int64)


def _users_sha256(user_ids) -> str:
    return hashlib.sha256("\n".join(str(u) for u in user_ids).encode()).hexdigest()


def _chunk_problem(path: Path, entry: dict) -> str | None:
    """Why the chunk file at `path` is not the one its manifest `entry` recorded; None when it is."""
    if not path.exists():
        return "missing"
    try:
        users = pq.read_table(path, columns=["user_id"])["user_id"].to_numpy(zero_copy_only=False)
    except (OSError, pa.ArrowException) as err:  # truncated, zero bytes, not parquet
        return f"unreadable ({str(err)[:120]})"
    if len(users) != entry["rows"]:
        return f"{len(users)} rows, the manifest recorded {entry['rows']}"
    if _users_sha256(pd.unique(users)) != entry["users_sha256"]:  # rows of a user are adjacent
        return "other users than the manifest recorded"
    return None


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_manifest(path: Path, manifest: dict) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(manifest, indent=1)))


@dataclass
class _Plan:
    """What a run scores: the users with a history, in chunks, and the settings a resumed run must repeat."""

    log: EventLog
    dropped: int  # events of behaviours outside the model's catalog
    picked: np.ndarray  # log rows of the users scored
    without_history: int  # users asked for but not scored
    chunks: list[np.ndarray]
    settings: dict


def _plan(serving: ServingModel, data_dir: str | Path, users: list[str] | None, chunk_size: int, top_k: int) -> _Plan:
    """Users without an event the model knows are left out (logged): they have nothing to rank on."""
    log_, dropped = load_scoring_log(data_dir, serving.catalog)
    picked = _user_indices(log_, users)
    has_history = log_.lengths()[picked] > 0
    if (~has_history).any():
        log.warning("%d of %d users have no events the model knows; not scored", int((~has_history).sum()), len(picked))
    picked = picked[has_history]
    chunks = [picked[i : i + chunk_size] for i in range(0, len(picked), chunk_size)]
    settings = {
        "export_version": serving.version,
        "data": str(Path(data_dir).resolve()),
        "users_sha256": _users_sha256(log_.user_ids[picked]),
        "chunk_size": chunk_size,
        "top_k": top_k,
        "rerank_depth": serving.model.cfg.rerank_depth,
        "num_chunks": len(chunks),
    }
    return _Plan(log_, dropped, picked, int((~has_history).sum()), chunks, settings)


def _open_manifest(out: Path, settings: dict) -> dict:
    """The manifest of `out` (a new one for a new run) with every chunk it records that fails its check
    dropped, so that the run scores those again; a run with other settings is an error."""
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"settings": settings, "done": {}}
    if manifest["settings"] != settings:
        changed = sorted(k for k in settings if manifest["settings"].get(k) != settings[k])
        raise ValueError(f"{out} holds a batch run with other settings ({changed}); use a new out_dir or the same settings")
    for stale in out.glob(".*.tmp"):  # a chunk or manifest a kill cut short
        stale.unlink()
    for key, entry in sorted(manifest["done"].items()):
        problem = _chunk_problem(out / entry["file"], entry) if "users_sha256" in entry else "written without a user hash"
        if problem is not None:
            log.warning("%s: chunk %s is %s; scoring it again", out / entry["file"], key, problem)
            del manifest["done"][key]
    return manifest


def _score_chunk(serving: ServingModel, log_: EventLog, users_i: np.ndarray, top_k: int, catalog: np.ndarray) -> pa.Table:
    """The top-K rows of the users `users_i` (log rows), each ranked on their whole history."""
    ends = log_.offsets[users_i + 1].astype(np.int64)
    cases = EvalSet(users_i, ends, np.zeros(len(users_i), np.int32), log_.timestamp[ends - 1].astype(np.int64))
    idx, scores = serving.rank(log_, cases, None, top_k)  # (B, K)
    k = idx.shape[1]
    return pa.table(
        {
            "user_id": np.repeat(log_.user_ids[users_i].astype(str), k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(users_i)),
            "behavior_id": catalog[idx.ravel()],
            "score": scores.ravel().astype(np.float32),
        },
        schema=SCHEMA,
    )


def batch_score(
    export: str | Path | ServingModel,
    data_dir: str | Path,
    out_dir: str | Path,
    users: list[str] | None = None,
    chunk_size: int = 256,
    top_k: int = 10,
    max_chunks: int | None = None,
    rerank_depth: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Score all users of `data_dir` (a sequence or clean data set), or `users`, into `out_dir`.

    `export`: an export folder or an already loaded `ServingModel` (`rerank_depth` then does not apply).
    `max_chunks`: stop after scoring this many new chunks (a bounded step; call again to go on).
    Returns a summary: chunks done / total, users and rows written, seconds, `complete`."""
    if chunk_size < 1 or top_k < 1:
        raise ValueError(f"chunk_size and top_k must be >= 1, got chunk_size={chunk_size}, top_k={top_k}")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    serving = export if isinstance(export, ServingModel) else ServingModel(export, rerank_depth=rerank_depth)
    plan = _plan(serving, data_dir, users, chunk_size, top_k)
    log_, chunks = plan.log, plan.chunks
    manifest_path = out / MANIFEST
    manifest = _open_manifest(out, plan.settings)

    catalog = serving.catalog.astype(str)
    todo = [i for i in range(len(chunks)) if f"{i:05d}" not in manifest["done"]]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    for i in tqdm(todo, desc="batch scoring", unit="chunk", disable=None if progress is None else not progress):
        users_i = chunks[i]
        table = _score_chunk(serving, log_, users_i, top_k, catalog)
        name = f"part-{i:05d}.parquet"
        _write_atomic(out / name, lambda p, table=table: pq.write_table(table, p))
        manifest["done"][f"{i:05d}"] = {
            "file": name,
            "users": int(len(users_i)),
            "rows": int(table.num_rows),
            "users_sha256": _users_sha256(log_.user_ids[users_i]),
        }
        _write_manifest(manifest_path, manifest)
    done = manifest["done"]
    manifest["users_in"], manifest["users_out"] = int(len(plan.picked)), int(sum(d["users"] for d in done.values()))
    _write_manifest(manifest_path, manifest)
    summary = {
        "out_dir": str(out),
        "chunks_total": len(chunks),
        "chunks_done": len(done),
        "chunks_this_call": len(todo),
        "complete": len(done) == len(chunks) and manifest["users_in"] == manifest["users_out"],
        "users_in": manifest["users_in"],
        "users_out": manifest["users_out"],
        "rows": int(sum(d["rows"] for d in done.values())),
        "users_without_history": plan.without_history,
        "dropped_events": plan.dropped,
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "batch scoring: %d / %d chunks done (%d this call), %d users -> %s", len(done), len(chunks), len(todo), summary["users_out"], out
    )
    return summary


def read_batch_scores(out_dir: str | Path) -> pd.DataFrame:
    """The scored chunks the manifest lists, as one frame (user_id, rank, behavior_id, score)."""
    out = Path(out_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    files = [out / d["file"] for _, d in sorted(manifest["done"].items())]
    if not files:
        return SCHEMA.empty_table().to_pandas()
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
