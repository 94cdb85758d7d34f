"""Validation: raw contract tables -> clean tables + quarantine + a summary.

Every row that fails is written aside to `quarantine/<table>.parquet` with the file, the row number
(1-based data row, as a spreadsheet would show it below the header), the field and the reason; nothing
is dropped silently. Structural problems (a missing file or required column) stop the run with an error
that names the file and the column.

Events are validated shard by shard so that a data set larger than memory streams through; duplicates
are found inside a shard and then across shards by a 64-bit key hash (a fix-up pass rewrites only the
shards that held a cross-shard duplicate).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from gts_lum.data.contract import TABLES, DatasetManifest, TableSpec, read_file, table_files
from gts_lum.data.timeparse import to_utc

log = logging.getLogger(__name__)


class ContractError(ValueError):
    """The input does not have the structure of the contract (a missing table or column)."""


@dataclass
class ValidationConfig:
    time_unit: str = "auto"  # for numeric timestamps: s, ms, us, ns or auto (by magnitude)
    time_format: str | None = None  # strftime format when the exports use a non-ISO layout
    require_known_users: bool = False  # events/labels of users missing from `users` are rejected
    max_quarantine_fraction: float = 0.5  # more rejected rows than this means a wrong mapping: stop


@dataclass
class TableReport:
    rows_in: int = 0
    rows_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def add(self, other: "TableReport") -> None:
        self.rows_in += other.rows_in
        self.rows_kept += other.rows_kept
        for k, v in other.rejected.items():
            self.rejected[k] = self.rejected.get(k, 0) + v


class _Rejects:
    """Collects the rows a check rejects, with why, for one table chunk (reasons as small int codes)."""

    def __init__(self, frame: pd.DataFrame, file: Path, first_row: int):
        self.frame = frame
        self.file = str(file)
        self.first_row = first_row
        self.code = np.zeros(len(frame), dtype=np.int16)  # 0 = kept, k = the k-th (reason, field) seen
        self.labels: list[tuple[str, str]] = []

    def mark(self, bad: np.ndarray, reason: str, column: str) -> None:
        new = bad & (self.code == 0)  # the first failure of a row is the one reported
        if new.any():
            self.labels.append((reason, column))
            self.code[new] = len(self.labels)

    @property
    def ok(self) -> np.ndarray:
        return self.code == 0

    def quarantined(self) -> pd.DataFrame:
        bad = np.flatnonzero(self.code)
        out = self.frame.iloc[bad].astype("string")
        labels = np.array([("", "")] + self.labels, dtype=object)
        out.insert(0, "_reason", labels[self.code[bad], 0])
        out.insert(1, "_field", labels[self.code[bad], 1])
        out.insert(2, "_file", self.file)
        out.insert(3, "_row", bad + self.first_row)
        return out.reset_index(drop=True)

    def report(self) -> TableReport:
        counts = np.bincount(self.code, minlength=len(self.labels) + 1)
        rejected: dict[str, int] = {}
        for (reason, _), n in zip(self.labels, counts[1:]):
            rejected[reason] = rejected.get(reason, 0) + int(n)
        return TableReport(len(self.frame), int(counts[0]), rejected)


def _strip(raw: pd.Series) -> pd.Series:
    """Strings without surrounding blanks; Arrow kernels (C++) rather than a Python call per cell.

    Categoricals stay categoricals: only their distinct values are stripped (two that become equal merge).
    """
    if isinstance(raw.dtype, pd.CategoricalDtype):
        remap, stripped = pd.factorize(pd.Index(raw.cat.categories.astype(str)).str.strip())
        codes = raw.cat.codes.to_numpy()
        codes = np.where(codes >= 0, remap[codes], -1)
        return pd.Series(pd.Categorical.from_codes(codes, categories=stripped), index=raw.index)
    return raw.astype("string[pyarrow]").str.strip()


def _attribute(raw: pd.Series) -> pd.Series:
    """Attribute columns: numbers where every non-blank cell is one, else text; blank cells are missing."""
    if not (pd.api.types.is_object_dtype(raw) or pd.api.types.is_string_dtype(raw)):
        return raw
    text = _strip(raw).replace("", pd.NA)
    numbers = pd.to_numeric(text, errors="coerce")
    if text.notna().any() and (numbers.notna() == text.notna()).all():
        return numbers.astype("float64")
    return text.astype(object).where(text.notna(), None)


def _check_columns(frame: pd.DataFrame, spec: TableSpec, file: Path) -> None:
    missing = [c for c in spec.required_columns if c not in frame.columns]
    if missing:
        raise ContractError(
            f"{file}: table '{spec.name}' lacks required column(s) {missing}; it has {list(frame.columns)}. "
            "Map the layout with an adapter (gts-lum ingest --mapping ...)."
        )


def _clean_typed(frame: pd.DataFrame, spec: TableSpec, rej: _Rejects, tz: str, cfg: ValidationConfig) -> pd.DataFrame:
    """Type every contract column; unreadable or missing required cells mark the row."""
    out = {}
    for col in spec.columns:
        if col.name not in frame.columns:
            continue
        raw = frame[col.name]
        null = raw.isna().to_numpy()
        if col.kind in ("id", "text"):
            value = _strip(raw)
            null |= (value == "").to_numpy(dtype=bool, na_value=True) if not isinstance(value.dtype, pd.CategoricalDtype) else (value.isna() | (value == "")).to_numpy()
        elif col.kind == "time":
            value = to_utc(raw, tz, cfg.time_unit, cfg.time_format)
            rej.mark(value.isna().to_numpy() & ~null, "bad_time", col.name)
        elif col.kind in ("float", "int", "bool"):
            value = pd.to_numeric(raw, errors="coerce")
            bad = value.isna().to_numpy() & ~null
            if col.kind == "int":
                bad |= ~null & ~value.isna().to_numpy() & (value.fillna(0) % 1 != 0).to_numpy()
            rej.mark(bad, f"bad_{col.kind}", col.name)
            value = value.astype("float32" if col.kind == "float" else "float64")
        else:  # pragma: no cover - specs are fixed in contract.py
            raise AssertionError(col.kind)
        if col.required:
            rej.mark(null, "null", col.name)
        out[col.name] = value
    if spec.extra_columns:
        for name in frame.columns:
            if name not in out:
                out[name] = _attribute(frame[name])
    return pd.DataFrame(out, index=frame.index)


def _mark_duplicates(typed: pd.DataFrame, spec: TableSpec, rej: _Rejects) -> None:
    dup = typed.duplicated(subset=list(spec.key), keep="first").to_numpy()
    rej.mark(dup & rej.ok, "duplicate", ",".join(spec.key))


def key_hash(typed: pd.DataFrame, columns: list[str]) -> np.ndarray:
    return pd.util.hash_pandas_object(typed[columns], index=False).to_numpy()


def _write(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False, compression="zstd")  # smaller and, here, faster to write than snappy


def _validate_small(
    spec: TableSpec, root: Path, out: Path, tz: str, cfg: ValidationConfig, checks
) -> tuple[pd.DataFrame | None, TableReport, list[pd.DataFrame]]:
    """Tables other than events fit in memory: read all shards, check, write one clean parquet."""
    files = table_files(root, spec.name)
    if not files:
        if spec.required:
            raise ContractError(f"{root}: required table '{spec.name}' not found (expected {spec.name}.parquet, {spec.name}.csv or a folder {spec.name}/)")
        return None, TableReport(), []
    kept, quarantine, report = [], [], TableReport()
    for file in files:
        frame = read_file(file)
        _check_columns(frame, spec, file)
        rej = _Rejects(frame, file, 1)
        typed = _clean_typed(frame, spec, rej, tz, cfg)
        for check in checks:
            check(typed, rej)
        kept.append(typed[rej.ok])
        quarantine.append(rej.quarantined())
        report.add(rej.report())
    clean = pd.concat(kept, ignore_index=True)
    dup = clean.duplicated(subset=list(spec.key), keep="first").to_numpy()
    if dup.any():  # across shards
        quarantine.append(clean[dup].astype("string").assign(_reason="duplicate", _field=",".join(spec.key), _file="(across shards)", _row=-1))
        report.rows_kept -= int(dup.sum())
        report.rejected["duplicate"] = report.rejected.get("duplicate", 0) + int(dup.sum())
        clean = clean[~dup].reset_index(drop=True)
    _write(clean, out / f"{spec.name}.parquet")
    return clean, report, quarantine


def _unknown(column: str, known: pd.Index, reason: str):
    def check(typed: pd.DataFrame, rej: _Rejects) -> None:
        rej.mark(~typed[column].isin(known).to_numpy() & rej.ok, reason, column)

    return check


def _duplicates(spec: TableSpec):
    return lambda typed, rej: _mark_duplicates(typed, spec, rej)


def validate_dataset(root: str | Path, out_dir: str | Path, cfg: ValidationConfig | None = None, progress: bool = True) -> dict:
    """Validate data set folder `root` into `out_dir` (clean tables, `quarantine/`, `validation_summary.json`)."""
    cfg = cfg or ValidationConfig()
    root, out = Path(root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = DatasetManifest.read(root)
    tz = manifest.timezone
    started = time.perf_counter()
    reports: dict[str, TableReport] = {}
    quarantine: dict[str, list[pd.DataFrame]] = {}

    has_events = bool(table_files(root, "events"))
    if has_events or table_files(root, "behaviors"):
        behaviors, reports["behaviors"], quarantine["behaviors"] = _validate_small(
            TABLES["behaviors"], root, out, tz, cfg, [_duplicates(TABLES["behaviors"])]
        )
    users, reports["users"], quarantine["users"] = _validate_small(TABLES["users"], root, out, tz, cfg, [_duplicates(TABLES["users"])])
    known_users = pd.Index(users["user_id"].astype(str)) if (users is not None and cfg.require_known_users) else None
    if has_events:
        catalog = pd.Index(behaviors["behavior_id"].astype(str))
        reports["events"], quarantine["events"] = _validate_events(root, out, tz, cfg, catalog, known_users, progress)
    elif users is None:
        raise ContractError(f"{root}: no events and no users table: nothing to validate")
    else:
        log.info("%s: no events table: a tabular data set (users, labels)", root)

    for name in ("labels", "scenarios"):
        checks = [_duplicates(TABLES[name])] + ([_unknown("user_id", known_users, "unknown_user")] if known_users is not None else [])
        _, reports[name], quarantine[name] = _validate_small(TABLES[name], root, out, tz, cfg, checks)

    qdir = out / "quarantine"
    for name, frames in quarantine.items():
        frames = [f for f in frames if len(f)]
        if frames:
            _write(pd.concat(frames, ignore_index=True), qdir / f"{name}.parquet")
    manifest.write(out)
    seconds = time.perf_counter() - started
    summary = {
        "dataset": manifest.name,
        "timezone": tz,
        "seconds": round(seconds, 3),
        "events_per_second": round(reports["events"].rows_in / max(seconds, 1e-9)) if "events" in reports else 0,
        "tables": {name: vars(rep) for name, rep in reports.items() if rep.rows_in or name in ("events", "behaviors")},
        "quarantine_dir": str(qdir),
    }
    (out / "validation_summary.json").write_text(json.dumps(summary, indent=2))
    for name, rep in reports.items():
        if rep.rows_in:
            log.info("%-9s rows in %10d  kept %10d  rejected %s", name, rep.rows_in, rep.rows_kept, rep.rejected or "none")
        if rep.rows_in and (rep.rows_in - rep.rows_kept) > cfg.max_quarantine_fraction * rep.rows_in:
            raise ContractError(
                f"{name}: {rep.rows_in - rep.rows_kept} of {rep.rows_in} rows rejected ({rep.rejected}); "
                f"more than max_quarantine_fraction={cfg.max_quarantine_fraction}: check the column mapping. "
                f"Rejected rows are in {qdir / (name + '.parquet')}"
            )
    return summary


def _validate_events(root, out, tz, cfg, catalog, known_users, progress) -> tuple[TableReport, list[pd.DataFrame]]:
    spec = TABLES["events"]
    files = table_files(root, "events")
    if not files:
        raise ContractError(f"{root}: required table 'events' not found (events/ folder of shards, events.parquet or events.csv)")
    report, quarantine = TableReport(), []
    shard_users = []
    clean_paths = []
    for i, file in enumerate(tqdm(files, desc="validate events", unit="shard", disable=not progress or None)):
        frame = read_file(file, dictionary=("user_id", "behavior_id", "source"))
        _check_columns(frame, spec, file)
        rej = _Rejects(frame, file, 1)
        typed = _clean_typed(frame, spec, rej, tz, cfg)
        codes = pd.Categorical(typed["behavior_id"], categories=catalog).codes
        rej.mark((codes < 0) & rej.ok, "unknown_behavior", "behavior_id")
        if known_users is not None:
            _unknown("user_id", known_users, "unknown_user")(typed, rej)
        ok_so_far = rej.ok
        dup = np.zeros(len(typed), dtype=bool)
        dup[ok_so_far] = typed[ok_so_far].duplicated(subset=list(spec.key), keep="first").to_numpy()
        rej.mark(dup, "duplicate", ",".join(spec.key))
        clean = typed[rej.ok].reset_index(drop=True)
        # Categorical columns: compact on disk (dictionary-encoded) and cheap to turn into an EventLog.
        clean["behavior_id"] = pd.Categorical(clean["behavior_id"], categories=catalog)
        clean["user_id"] = clean["user_id"].astype("category")
        if "source" in clean:
            clean["source"] = clean["source"].astype("category")
        path = out / "events" / f"part-{i:05d}.parquet"
        _write(clean, path)
        clean_paths.append(path)
        shard_users.append(clean["user_id"].cat.remove_unused_categories().cat.categories.astype(str).to_numpy())
        quarantine.append(rej.quarantined())
        report.add(rej.report())
    if len(files) > 1:
        _drop_cross_shard_duplicates(clean_paths, shard_users, report, quarantine)
    return report, quarantine


def _drop_cross_shard_duplicates(paths: list[Path], shard_users: list[np.ndarray], report: TableReport, quarantine: list) -> None:
    """A duplicate can span shards only through a user present in several; exports split by user have none.

    Only those users' rows are read again and hashed; the earliest shard keeps a row.
    """
    users, counts = np.unique(np.concatenate(shard_users), return_counts=True)
    shared = users[counts > 1]
    if not len(shared):
        return
    key = list(TABLES["events"].key)
    hashes, shard_of, pos = [], [], []
    for i, path in enumerate(paths):
        if not np.isin(shard_users[i], shared).any():
            continue
        frame = pd.read_parquet(path, columns=key)
        rows = np.flatnonzero(frame["user_id"].astype(str).isin(shared).to_numpy())
        hashes.append(key_hash(frame.iloc[rows], key))
        shard_of.append(np.full(len(rows), i, dtype=np.int32))
        pos.append(rows.astype(np.int64))
    hashes, shard_of, pos = np.concatenate(hashes), np.concatenate(shard_of), np.concatenate(pos)
    order = np.lexsort((shard_of, hashes))  # by hash, then shard: the earliest shard keeps the row
    sorted_h = hashes[order]
    later = np.zeros(len(hashes), dtype=bool)
    later[order[1:][sorted_h[1:] == sorted_h[:-1]]] = True
    if not later.any():
        return
    for shard in np.unique(shard_of[later]):
        drop = pos[later & (shard_of == shard)]
        frame = pd.read_parquet(paths[shard])
        mask = np.zeros(len(frame), dtype=bool)
        mask[drop] = True
        quarantine.append(frame[mask].astype("string").assign(_reason="duplicate", _field="user_id,timestamp,behavior_id", _file="(across shards)", _row=-1))
        _write(frame[~mask].reset_index(drop=True), paths[shard])
    n = int(later.sum())
    report.rows_kept -= n
    report.rejected["duplicate"] = report.rejected.get("duplicate", 0) + n
    log.warning("events: %d duplicate rows across shards quarantined", n)


def load_event_log(clean_dir: str | Path, seed: int = 0) -> "EventLog":
    """The validated events of `clean_dir` as an `EventLog` whose catalog is the behaviours table."""
    from gts_lum.data.events import EventLog

    clean_dir = Path(clean_dir)
    behaviors = pd.read_parquet(clean_dir / "behaviors.parquet", columns=["behavior_id"])
    events = pd.read_parquet(clean_dir / "events", columns=["user_id", "timestamp", "behavior_id", "value"] if _has_value(clean_dir) else ["user_id", "timestamp", "behavior_id"])
    return EventLog.from_frame(events, behavior_ids=behaviors["behavior_id"].astype(str).to_numpy(), seed=seed)


def _has_value(clean_dir: Path) -> bool:
    import pyarrow.parquet as pq

    first = sorted((clean_dir / "events").glob("*.parquet"))[:1]
    return bool(first) and "value" in pq.read_schema(first[0]).names


def summary_markdown(summary: dict) -> str:
    """The validation summary as a Markdown table (the Kubeflow UI shows it)."""
    lines = [
        f"## Validation of `{summary['dataset']}` (timezone {summary['timezone']})",
        "",
        "| table | rows in | kept | rejected | reasons |",
        "|---|---:|---:|---:|---|",
    ]
    for table, rep in summary["tables"].items():
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(rep["rejected"].items())) or "-"
        lines.append(f"| {table} | {rep['rows_in']:,} | {rep['rows_kept']:,} | {rep['rows_in'] - rep['rows_kept']:,} | {reasons} |")
    lines += ["", f"Rejected rows: `{summary['quarantine_dir']}`."]
    return "\n".join(lines) + "\n"
