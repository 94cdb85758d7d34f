"""Validation: raw contract tables -> clean tables + quarantine + a summary.

Every row that fails is written aside to `quarantine/<table>.parquet` with the file, the row number
(1-based data row, as a spreadsheet would show it below the header), the field and the reason; nothing
is dropped silently. A row an adapter brought in names the operator's own file and row (its
`_source_file` / `_source_row`), not the intermediate raw file; a CSV line that could not be read (more
fields than the header, bytes not in the encoding) is quarantined as `malformed_line` with the line
number in `_malformed`, and the rest of the file is validated. Structural problems (a missing file or
required column) stop the run with an error that names the file and the column.

A run that completes writes the marker file `VALIDATED` last, after every table and the summary; a
run stopped on the way (a structural error, too many rows rejected) leaves none, and `require_validated`
(called by every reader of a clean folder) refuses such a folder with the reason.

Events are validated shard by shard so that a data set larger than memory streams through, as Arrow
columns and integer codes (ids are checked on their distinct values, never string by string); duplicates
are found inside a shard and then across shards by sorting integer keys (a fix-up pass rewrites only the
shards that held a cross-shard duplicate).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gts_lum.data.contract import (
    INTERNAL_COLUMNS,
    MALFORMED,
    SOURCE_FILE,
    SOURCE_ROW,
    TABLES,
    DatasetManifest,
    TableSpec,
    read_arrow,
    read_file,
    table_files,
)
from gts_lum.data.events import EventLog
from gts_lum.data.timeparse import to_utc

log = logging.getLogger(__name__)

COMPLETE_MARKER = "VALIDATED"


class ContractError(ValueError):
    """The input does not have the structure of the contract (a missing table or column)."""


@dataclass
class ValidationConfig:
    time_unit: str = "auto"  # for numeric timestamps: s, ms, us, ns or auto (by magnitude)
    time_format: str | None = None  # strftime format when the exports use a non-ISO layout
    require_known_users: bool = False  # events/labels of users missing from `users` are rejected
    max_quarantine_fraction: float = 0.5  # more rejected rows than this means a wrong mapping: stop
    # Times outside [earliest_time, latest_time] are quarantined as implausible_time: a column of durations,
    # row numbers or another unit reads as 1970 or far-future dates. latest_time None: one day after the
    # newest input file was written (no export holds events from after it was made).
    earliest_time: str = "1990-01-01"
    latest_time: str | None = None


@dataclass
class TableReport:
    rows_in: int = 0
    rows_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def add(self, other: TableReport) -> None:
        self.rows_in += other.rows_in
        self.rows_kept += other.rows_kept
        for k, v in other.rejected.items():
            self.rejected[k] = self.rejected.get(k, 0) + v


class _Rejects:
    """Collects the rows a check rejects, with why, for one table chunk (reasons as small int codes)."""

    def __init__(self, frame: pd.DataFrame | pa.Table, file: Path, first_row: int):
        self.frame = frame
        self.file = str(file)
        self.first_row = first_row
        self.code = np.zeros(len(frame), dtype=np.int16)  # 0 = kept, k = the k-th (reason, field) seen
        self.labels: list[tuple[str, str]] = []
        if MALFORMED in _names(frame):
            self.mark(_column(frame, MALFORMED).notna().to_numpy(), "malformed_line", MALFORMED)

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
        rows = self.frame.take(bad).to_pandas() if isinstance(self.frame, pa.Table) else self.frame.iloc[bad]
        adapted = SOURCE_FILE in rows.columns  # an adapter's row: name the operator's file and row
        out = rows.drop(columns=[SOURCE_FILE, SOURCE_ROW], errors="ignore").astype("string")
        labels = np.array([("", "")] + self.labels, dtype=object)
        out.insert(0, "_reason", labels[self.code[bad], 0])
        out.insert(1, "_field", labels[self.code[bad], 1])
        out.insert(2, "_file", rows[SOURCE_FILE].to_numpy() if adapted else self.file)
        out.insert(3, "_row", rows[SOURCE_ROW].to_numpy(dtype=np.int64) if adapted else bad + self.first_row)
        return out.reset_index(drop=True)

    def report(self) -> TableReport:
        bad = self.code[self.code != 0]  # counting only the rejected rows is far cheaper than all of them
        counts = np.bincount(bad, minlength=len(self.labels) + 1)
        counts[0] = len(self.code) - len(bad)
        rejected: dict[str, int] = {}
        for (reason, _), n in zip(self.labels, counts[1:]):
            rejected[reason] = rejected.get(reason, 0) + int(n)
        return TableReport(len(self.frame), int(counts[0]), rejected)


def _names(frame: pd.DataFrame | pa.Table) -> list[str]:
    return frame.column_names if isinstance(frame, pa.Table) else list(frame.columns)


def _column(frame: pd.DataFrame | pa.Table, name: str) -> pd.Series:
    return frame.column(name).to_pandas() if isinstance(frame, pa.Table) else frame[name]


def _origin(frame: pd.DataFrame | pa.Table, file: Path) -> str:
    """The file to name in an error about `frame`, read from `file`: the operator's, when an adapter wrote it."""
    if SOURCE_FILE in _names(frame) and len(frame):
        return f"{_column(frame, SOURCE_FILE).iloc[0]} (adapted into {file})"
    return str(file)


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


def _time_window(cfg: ValidationConfig) -> tuple[int, int]:
    """(earliest, latest) allowed time as UTC nanoseconds; `cfg.latest_time` is resolved by `validate_dataset`."""
    return pd.Timestamp(cfg.earliest_time, tz="UTC").value, pd.Timestamp(cfg.latest_time, tz="UTC").value


def _mark_implausible(nanos: np.ndarray, readable: np.ndarray, rej: _Rejects, cfg: ValidationConfig, column: str) -> None:
    earliest, latest = _time_window(cfg)
    rej.mark(readable & ((nanos < earliest) | (nanos > latest)), "implausible_time", column)


def _check_columns(frame: pd.DataFrame | pa.Table, spec: TableSpec, file: Path) -> None:
    columns = [c for c in _names(frame) if c not in INTERNAL_COLUMNS]
    missing = [c for c in spec.required_columns if c not in columns]
    if missing:
        raise ContractError(
            f"{_origin(frame, file)}: table '{spec.name}' lacks required column(s) {missing}; it has {columns}. "
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
            null |= (
                (value == "").to_numpy(dtype=bool, na_value=True)
                if not isinstance(value.dtype, pd.CategoricalDtype)
                else (value.isna() | (value == "")).to_numpy()
            )
        elif col.kind == "time":
            value = to_utc(raw, tz, cfg.time_unit, cfg.time_format)
            rej.mark(value.isna().to_numpy() & ~null, "bad_time", col.name)
            _mark_implausible(value.dt.as_unit("ns").array.asi8, value.notna().to_numpy(), rej, cfg, col.name)
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
            if name not in out and name not in INTERNAL_COLUMNS:
                out[name] = _attribute(frame[name])
    return pd.DataFrame(out, index=frame.index)


def _mark_duplicates(typed: pd.DataFrame, spec: TableSpec, rej: _Rejects) -> None:
    dup = typed.duplicated(subset=list(spec.key), keep="first").to_numpy()
    rej.mark(dup & rej.ok, "duplicate", ",".join(spec.key))


def _write(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False, compression="zstd")  # smaller; small tables and quarantine: the codec's speed does not matter


def _validate_small(
    spec: TableSpec, root: Path, out: Path, tz: str, cfg: ValidationConfig, checks
) -> tuple[pd.DataFrame | None, TableReport, list[pd.DataFrame]]:
    """Tables other than events fit in memory: read all shards, check, write one clean parquet."""
    files = table_files(root, spec.name)
    if not files:
        if spec.required:
            raise ContractError(
                f"{root}: required table '{spec.name}' not found (expected {spec.name}.parquet, {spec.name}.csv or a folder {spec.name}/)"
            )
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
    _require_rows(report, spec.name, files)
    clean = pd.concat(kept, ignore_index=True)
    dup = clean.duplicated(subset=list(spec.key), keep="first").to_numpy()
    if dup.any():  # across shards
        quarantine.append(
            clean[dup].astype("string").assign(_reason="duplicate", _field=",".join(spec.key), _file="(across shards)", _row=-1)
        )
        report.rows_kept -= int(dup.sum())
        report.rejected["duplicate"] = report.rejected.get("duplicate", 0) + int(dup.sum())
        clean = clean[~dup].reset_index(drop=True)
    _write(clean, out / f"{spec.name}.parquet")
    return clean, report, quarantine


def _require_rows(report: TableReport, table: str, files: list[Path]) -> None:
    if not report.rows_in:
        raise ContractError(
            f"{', '.join(map(str, files))}: table '{table}' holds no rows (a header only?): "
            "an empty input is an error, not an empty data set"
        )


def _newest_input_time(root: Path) -> pd.Timestamp:
    newest = max((p.stat().st_mtime for p in root.rglob("*") if p.is_file()), default=time.time())
    return pd.Timestamp(newest, unit="s", tz="UTC")


def _unknown(column: str, known: pd.Index, reason: str):
    def check(typed: pd.DataFrame, rej: _Rejects) -> None:
        rej.mark(~typed[column].isin(known).to_numpy() & rej.ok, reason, column)

    return check


def _duplicates(spec: TableSpec):
    return lambda typed, rej: _mark_duplicates(typed, spec, rej)


def is_validated(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).exists()


def require_validated(clean_dir: str | Path) -> None:
    """ContractError unless `clean_dir` holds a validation run that completed."""
    clean_dir = Path(clean_dir)
    if is_validated(clean_dir):
        return
    if (clean_dir / "validation_summary.json").exists():
        raise ContractError(
            f"{clean_dir}: its validation stopped before the end (no {COMPLETE_MARKER} marker; the reason is in the "
            "ingest's error and validation_summary.json): fix the input or mapping and ingest again"
        )
    raise ContractError(
        f"{clean_dir}: not a validated data set (no {COMPLETE_MARKER} marker): run `gts-lum ingest` or `gts-lum validate` first"
    )


def validate_dataset(root: str | Path, out_dir: str | Path, cfg: ValidationConfig | None = None, progress: bool = True) -> dict:
    """Validate data set folder `root` into `out_dir` (clean tables, `quarantine/`, `validation_summary.json`,
    and the `VALIDATED` marker last, only when the run completes)."""
    cfg = cfg or ValidationConfig()
    root, out = Path(root), Path(out_dir)
    if out.resolve() == root.resolve():  # the clean shards would replace the raw ones
        raise ContractError(f"{root}: validate into another folder than the data set's own")
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE_MARKER).unlink(missing_ok=True)  # a rerun that stops must not inherit an earlier run's mark
    for stale in (out / "events").glob("*.parquet"):  # an earlier run's shards beyond this run's count would be read as clean
        stale.unlink()
    manifest = DatasetManifest.read(root)
    tz = manifest.timezone
    if cfg.latest_time is None:
        cfg = dataclasses.replace(cfg, latest_time=(_newest_input_time(root) + pd.Timedelta(days=1)).ceil("s").isoformat())
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
        "time_window": [cfg.earliest_time, cfg.latest_time],
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
                f"more than max_quarantine_fraction={cfg.max_quarantine_fraction}: check the column mapping"
                + (
                    f" (times outside [{cfg.earliest_time}, {cfg.latest_time}]: durations, row numbers or another time_unit?)"
                    if rep.rejected.get("implausible_time")
                    else ""
                )
                + ". "
                f"Rejected rows are in {qdir / (name + '.parquet')}"
            )
    (out / COMPLETE_MARKER).write_text(json.dumps({"validated_at": time.time(), "source": str(root)}) + "\n")
    return summary


class _Ids:
    """An id column as integer codes (-1 where missing) into its distinct values, stripped of surrounding blanks.

    Stripping and every later check (blank, catalog, known users) run on the distinct values only.
    """

    def __init__(self, column: pa.ChunkedArray):
        if pa.types.is_dictionary(column.type):
            encoded = column.combine_chunks()  # one dictionary for the shard (chunks' dictionaries are unified)
            values = pd.Index(encoded.dictionary.to_pandas()).astype(str).str.strip()
        else:
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                column = pa.chunked_array([pa.array(column.to_pandas().astype("string[pyarrow]"))])  # numbers as pandas writes them
            encoded = pc.utf8_trim_whitespace(column).dictionary_encode().combine_chunks()
            values = pd.Index(encoded.dictionary.to_pandas())
        remap, uniques = pd.factorize(values)  # two values that become equal once stripped merge
        self.values = np.asarray(uniques, dtype=object)
        indices = encoded.indices
        codes = (pc.fill_null(indices, -1) if indices.null_count else indices).to_numpy()
        self.codes = codes if np.array_equal(remap, np.arange(len(remap))) else self.recode(remap, codes)

    @staticmethod
    def recode(remap: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """`remap[codes]` with -1 (missing) kept: the appended -1 is what index -1 picks."""
        return np.append(remap, -1).astype(np.int32)[codes]

    def missing(self) -> np.ndarray:
        blank = np.flatnonzero(self.values == "")  # at most one: values are distinct
        return (self.codes < 0) | (self.codes == (blank[0] if len(blank) else -2))

    def arrow(self, rows: np.ndarray) -> pa.DictionaryArray:
        codes = self.codes[rows]
        return pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), pa.array(self.values, pa.string()))


def _utc_nanos(column: pa.ChunkedArray, tz: str, cfg: ValidationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 UTC nanoseconds, missing cells, unreadable cells) of a time column."""
    if pa.types.is_timestamp(column.type) and column.type.tz is not None:  # instants already: nothing to parse
        nanos = column.cast(pa.timestamp("ns", column.type.tz)).cast(pa.int64())
        missing = nanos.is_null().to_numpy()
        return pc.fill_null(nanos, 0).to_numpy(), missing, np.zeros(len(column), dtype=bool)
    raw = column.to_pandas()
    value = to_utc(raw, tz, cfg.time_unit, cfg.time_format)
    missing = raw.isna().to_numpy()
    return value.dt.as_unit("ns").array.asi8, missing, value.isna().to_numpy() & ~missing


def _float32(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 values with NaN where missing, missing cells, unreadable cells) of a number column."""
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = column.to_numpy()  # NaN where null
        missing = np.isnan(values) if values.dtype.kind == "f" else np.zeros(len(values), dtype=bool)
        return values.astype(np.float32, copy=False), missing, np.zeros(len(values), dtype=bool)
    raw = column.to_pandas()
    number = pd.to_numeric(raw, errors="coerce")
    missing = raw.isna().to_numpy()
    return number.to_numpy(dtype=np.float32, na_value=np.nan), missing, number.isna().to_numpy() & ~missing


def _typed_events(table: pa.Table, spec: TableSpec, rej: _Rejects, tz: str, cfg: ValidationConfig) -> dict:
    """`_clean_typed` for events, on Arrow columns: ids become `_Ids`, times int64 ns, numbers float32."""
    out = {}
    for col in spec.columns:
        if col.name not in table.column_names:
            continue
        raw = table.column(col.name)
        if col.kind == "id":
            value = _Ids(raw)
            missing = value.missing()
        else:
            parse = {"time": lambda c: _utc_nanos(c, tz, cfg), "float": _float32}[col.kind]  # the kinds events have
            value, missing, unreadable = parse(raw)
            rej.mark(unreadable, f"bad_{col.kind}", col.name)
            if col.kind == "time":
                _mark_implausible(value, ~missing & ~unreadable, rej, cfg, col.name)
        if col.required:
            rej.mark(missing, "null", col.name)
        out[col.name] = value
    return out


def _coarsest_unit(nanos: np.ndarray) -> np.ndarray:
    """The times in the coarsest of s, ms, us that holds them exactly: fewer key bits for the same equality."""
    for unit in (10**9, 10**6, 10**3):
        if not np.any(nanos % unit):
            return nanos // unit
    return nanos


def repeated_keys(user: np.ndarray, time: np.ndarray, behavior: np.ndarray) -> np.ndarray:
    """Rows whose key (user, time, behaviour), all non-negative integers but time, occurs at an earlier row.

    (user, time) packs into one int64 when it fits, times read in the coarsest unit that holds them
    (s, ms, us), as it does for any real export: one sorted by user and time needs no sort at all, others
    one stable sort. Only the rows that tie on (user, time), a small share, are then sorted by behaviour
    and row number, so the earliest row of a key is the one kept.
    """
    n = len(user)
    repeated = np.zeros(n, dtype=bool)
    if n < 2:
        return repeated
    user_bits = int(user.max()).bit_length()
    t0, time_bits = int(time.min()), (int(time.max()) - int(time.min())).bit_length()
    if time_bits + user_bits > 63:
        time = _coarsest_unit(time)
        t0, time_bits = int(time.min()), (int(time.max()) - int(time.min())).bit_length()
    if time_bits + user_bits <= 63:
        key = (user.astype(np.int64) << time_bits) | (time - t0)
        order = None if bool(np.all(key[1:] >= key[:-1])) else np.argsort(key, kind="stable")
        k = key if order is None else key[order]
        same = k[1:] == k[:-1]
    else:
        order = np.lexsort((time, user))
        u, t = user[order], time[order]
        same = (u[1:] == u[:-1]) & (t[1:] == t[:-1])
    ties = np.flatnonzero(same)
    if not len(ties):
        return repeated
    members = np.zeros(n, dtype=bool)
    members[ties] = members[ties + 1] = True
    members = np.flatnonzero(members)  # positions (in sorted order) of runs of equal (user, time)
    group = np.cumsum(np.concatenate([[True], ~same[members[1:] - 1]]))  # run number of each member
    rows = members if order is None else order[members]
    o = np.lexsort((rows, behavior[rows], group))
    g, b, r = group[o], behavior[rows][o], rows[o]
    repeated[r[1:][(g[1:] == g[:-1]) & (b[1:] == b[:-1])]] = True
    return repeated


def _rows(mask: np.ndarray) -> slice | np.ndarray:
    """Indexer of the rows where `mask` holds: a slice (a view, no copy) when it holds everywhere, as it mostly does."""
    return slice(None) if mask.all() else np.flatnonzero(mask)


def _write_events(table: pa.Table, path: Path) -> None:
    # The clean shards are an intermediate read once, right after: snappy takes a third less CPU to
    # write than zstd (and reads faster) for files about 30% larger. Statistics of the string columns
    # cost a third of the write and no reader filters on them; a timestamp's min/max is cheap and lets
    # a reader skip row groups by time. Dictionary pages for times and numbers would only cost time.
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy", use_dictionary=["user_id", "behavior_id", "source"], write_statistics=["timestamp"])


def _validate_events(root, out, tz, cfg, catalog, known_users, progress) -> tuple[TableReport, list[pd.DataFrame]]:
    files = table_files(root, "events")
    if not files:
        raise ContractError(f"{root}: required table 'events' not found (events/ folder of shards, events.parquet or events.csv)")
    report, quarantine = TableReport(), []
    shard_users = []
    clean_paths = []
    catalog_values = pa.array(np.asarray(catalog, dtype=object), pa.string())
    for i, file in enumerate(tqdm(files, desc="validate events", unit="shard", disable=not progress or None)):
        clean, rej, users = _validate_events_shard(file, tz, cfg, catalog, catalog_values, known_users)
        clean_paths.append(out / "events" / f"part-{i:05d}.parquet")
        _write_events(clean, clean_paths[-1])
        shard_users.append(users)
        quarantine.append(rej.quarantined())
        report.add(rej.report())
    _require_rows(report, "events", files)
    if len(files) > 1:
        _drop_cross_shard_duplicates(clean_paths, shard_users, catalog, report, quarantine)
    return report, quarantine


def _validate_events_shard(file, tz, cfg, catalog, catalog_values, known_users) -> tuple[pa.Table, _Rejects, np.ndarray]:
    """One events shard: its clean rows, its rejected rows and the users it keeps."""
    spec = TABLES["events"]
    table = read_arrow(file, dictionary=("user_id", "behavior_id", "source"))
    _check_columns(table, spec, file)
    rej = _Rejects(table, file, 1)
    typed = _typed_events(table, spec, rej, tz, cfg)
    user = typed["user_id"]
    behavior = _Ids.recode(catalog.get_indexer(typed["behavior_id"].values), typed["behavior_id"].codes)
    rej.mark((behavior < 0) & rej.ok, "unknown_behavior", "behavior_id")
    if known_users is not None:
        known = np.append(pd.Index(user.values).isin(known_users), False)  # False for a missing user
        rej.mark(~known[user.codes] & rej.ok, "unknown_user", "user_id")
    ok = _rows(rej.ok)
    dup = np.zeros(len(table), dtype=bool)
    dup[ok] = repeated_keys(user.codes[ok], typed["timestamp"][ok], behavior[ok])
    rej.mark(dup, "duplicate", ",".join(spec.key))
    keep = _rows(rej.ok)
    # Ids stay dictionary-encoded: compact on disk and cheap to turn into an EventLog.
    columns = {
        "user_id": user.arrow(keep),
        "timestamp": pa.array(typed["timestamp"][keep], pa.timestamp("ns", "UTC")),
        "behavior_id": pa.DictionaryArray.from_arrays(pa.array(behavior[keep]), catalog_values),
    }
    for name in ("value", "duration", "source"):
        if isinstance(typed.get(name), _Ids):
            columns[name] = typed[name].arrow(keep)
        elif name in typed:
            kept = typed[name][keep]
            columns[name] = pa.array(kept, mask=np.isnan(kept))
    users = user.values[np.bincount(user.codes[keep], minlength=len(user.values)) > 0]
    return pa.table(columns), rej, users


def _dictionary_codes(column: pa.ChunkedArray, index: pd.Index) -> np.ndarray:
    """Codes of a clean (dictionary-encoded, null-free) id column in `index`; -1 where not in it."""
    encoded = column.combine_chunks()
    return _Ids.recode(index.get_indexer(encoded.dictionary.to_pandas()), encoded.indices.to_numpy())


def _drop_cross_shard_duplicates(
    paths: list[Path], shard_users: list[np.ndarray], catalog: pd.Index, report: TableReport, quarantine: list
) -> None:
    """A duplicate can span shards only through a user present in several; exports split by user have none.

    Only those users' rows are read again; the earliest shard keeps a row.
    """
    users, counts = np.unique(np.concatenate(shard_users), return_counts=True)
    shared = pd.Index(users[counts > 1])
    if not len(shared):
        return
    user, time, behavior, shard_of, pos = [], [], [], [], []
    for i, path in enumerate(paths):
        if not shared.isin(shard_users[i]).any():
            continue
        table = pq.read_table(path, columns=list(TABLES["events"].key))
        codes = _dictionary_codes(table["user_id"], shared)
        rows = np.flatnonzero(codes >= 0)
        user.append(codes[rows])
        time.append(table["timestamp"].cast(pa.int64()).to_numpy()[rows])
        behavior.append(_dictionary_codes(table["behavior_id"], catalog)[rows])
        shard_of.append(np.full(len(rows), i, dtype=np.int32))
        pos.append(rows)
    shard_of, pos = np.concatenate(shard_of), np.concatenate(pos)
    later = repeated_keys(np.concatenate(user), np.concatenate(time), np.concatenate(behavior))  # shards in order: earliest first
    if not later.any():
        return
    for shard in np.unique(shard_of[later]):
        table = pq.read_table(paths[shard])
        mask = np.zeros(len(table), dtype=bool)
        mask[pos[later & (shard_of == shard)]] = True
        quarantine.append(
            table.filter(mask)
            .to_pandas()
            .astype("string")
            .assign(_reason="duplicate", _field="user_id,timestamp,behavior_id", _file="(across shards)", _row=-1)
        )
        _write_events(table.filter(~mask), paths[shard])
    n = int(later.sum())
    report.rows_kept -= n
    report.rejected["duplicate"] = report.rejected.get("duplicate", 0) + n
    log.warning("events: %d duplicate rows across shards quarantined", n)


def load_event_log(clean_dir: str | Path, seed: int = 0) -> EventLog:
    """The validated events of `clean_dir` as an `EventLog` whose catalog is the behaviours table."""
    clean_dir = Path(clean_dir)
    require_validated(clean_dir)
    behaviors = pd.read_parquet(clean_dir / "behaviors.parquet", columns=["behavior_id"])
    events = pd.read_parquet(
        clean_dir / "events",
        columns=["user_id", "timestamp", "behavior_id", "value"] if _has_value(clean_dir) else ["user_id", "timestamp", "behavior_id"],
    )
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
