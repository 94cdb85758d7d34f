"""Adapters: other layouts -> the data contract, driven by a column mapping in YAML.

A mapping names, per contract table, the source files (globs relative to the source folder), which
source column fills each contract column, and optional extras:

    name: movielens-latest-small
    timezone: UTC
    tables:
      events:
        files: [ratings.csv]
        columns: {user_id: userId, behavior_id: movieId, timestamp: timestamp, value: rating}
        constants: {source: rating}
      behaviors:
        files: [movies.csv]
        columns: {behavior_id: movieId}
        template: {description: "{title}. Genres: {genres}. Tags: {tags}"}   # str.format over source columns
        aggregate:                                                          # top values of another file, joined
          tags: {files: [tags.csv], key: movieId, column: tag, top: 5}
        flags:                                                               # one-hot 0/1 columns -> the names set
          genres: {columns: [Action, Comedy, Drama], separator: ", "}
        keep: [genres]                                                       # attribute columns kept as they are
      labels:
        files: [churn.csv]
        columns: {user_id: customerID, label: Churn}
        constants: {task: churn}
        values: {label: {"Yes": 1, "No": 0}}                                 # recode cells

An ordered log without times (user, item lines in the order they happened) maps `order` instead of a
timestamp column: `order: rows` (each user's rows are in time order, files in name order) or
`order: COLUMN` (a number per row whose order is the time order within a user, e.g. a position; equal
numbers co-occur). Each user's events are then stamped one day apart, the last on `ORDINAL_END`: one
interval per event whatever `interval_minutes`, and weekday, hour and descriptors carry nothing.

`behaviors: {from_events: true}` builds the catalog from the distinct event behaviour ids when a
data set has no catalog file (the description is then the id, or `template` over event columns).
Shipped mappings live in `gts_lum/configs/adapters/`; any other layout needs only a new YAML file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from gts_lum.config import from_dict, read_yaml
from gts_lum.data.contract import (
    INTERNAL_COLUMNS,
    MALFORMED,
    SOURCE_FILE,
    SOURCE_ROW,
    TABLES,
    DatasetManifest,
    check_timezone,
    named_read,
    read_csv,
)

log = logging.getLogger(__name__)

# Ordinal time: each user's last event sits here, earlier ones a day apart. A day is the longest interval
# (`interval_minutes` divides a day), so every event has its own; 2020 keeps about 11,000 events per user
# inside validation's default window (from 1990), more than any token budget reads.
ORDINAL_END = pd.Timestamp("2020-01-01", tz="UTC")
ORDINAL_STEP = pd.Timedelta(days=1)
_ORDER = "_order"  # the ordering key of an events shard until `_ordinal_times` replaces it by a timestamp


@dataclass
class AggregateSpec:
    files: list[str]
    key: str
    column: str
    top: int = 5
    separator: str = ", "
    prefix: str = ""  # written before the joined values, only where there are values


@dataclass
class FlagSpec:
    """One-hot flag columns (one 0/1 column per category) -> the names of the set ones, joined."""

    columns: list[str]
    separator: str = ", "


_SET, _UNSET = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", ""}


@dataclass
class TableMapping:
    files: list[str] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)  # contract column -> source column
    constants: dict[str, object] = field(default_factory=dict)
    template: dict[str, str] = field(default_factory=dict)  # contract column -> format string
    values: dict[str, dict] = field(default_factory=dict)  # contract column -> {source value: value}
    aggregate: dict[str, AggregateSpec] = field(default_factory=dict)
    flags: dict[str, FlagSpec] = field(default_factory=dict)  # derived column -> its flag columns
    keep: list[str] | str = field(default_factory=list)  # attribute columns, or "all" remaining
    from_events: bool = False
    read_options: dict = field(default_factory=dict)  # e.g. {sep: ";", encoding: latin-1}
    order: str = ""  # events without times: "rows" or a column that orders each user's events (ordinal time)


@dataclass
class Mapping:
    name: str = "dataset"
    timezone: str = "UTC"
    description: str = ""
    tables: dict[str, TableMapping] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Mapping:
        data = read_yaml(path)
        tables = data.pop("tables", {}) or {}
        unknown = set(tables) - set(TABLES)
        if unknown:
            raise ValueError(f"mapping {path}: unknown table(s) {sorted(unknown)}; contract tables: {sorted(TABLES)}")
        mapping = from_dict(cls, data)
        check_timezone(mapping.timezone, f"mapping {path}")
        for name, spec in tables.items():
            spec = dict(spec)
            spec["aggregate"] = {k: from_dict(AggregateSpec, v) for k, v in (spec.get("aggregate") or {}).items()}
            spec["flags"] = {k: from_dict(FlagSpec, v) for k, v in (spec.get("flags") or {}).items()}
            files = spec.get("files", [])
            spec["files"] = [files] if isinstance(files, str) else files
            mapping.tables[name] = from_dict(TableMapping, spec)
        for name, spec in mapping.tables.items():
            if spec.order and name != "events":
                raise ValueError(f"mapping {path}: table '{name}': `order` (an ordinal time) is for the events table only")
            if spec.order and "timestamp" in spec.columns:
                raise ValueError(
                    f"mapping {path}: table 'events' maps both columns.timestamp and order: "
                    "keep the timestamp, or drop it for an ordinal time"
                )
        return mapping


def _source_files(source: Path, patterns: list[str], table: str) -> list[Path]:
    """The files under `source` that `patterns` match; a pattern or match that leaves `source` is an error."""
    for pattern in patterns:
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise ValueError(
                f"adapter: table '{table}': files pattern {pattern!r} leaves the source folder {source}: give a path inside it"
            )
    files = sorted({p for pattern in patterns for p in source.glob(pattern)})
    root = source.resolve()
    outside = [p for p in files if not p.resolve().is_relative_to(root)]  # e.g. through a symbolic link
    if outside:
        raise ValueError(f"adapter: table '{table}': {outside[0]} resolves outside the source folder {source}")
    if not files:
        raise FileNotFoundError(f"adapter: table '{table}': no file under {source} matches {patterns}")
    return files


def _read(path: Path, options: dict) -> pd.DataFrame:
    if path.suffix != ".parquet":
        return read_csv(path, options)
    with named_read(path):
        return pd.read_parquet(path)


def _aggregate(source: Path, spec: AggregateSpec, table: str) -> pd.Series:
    """The `top` most frequent values of `column` per `key`, joined into one string."""
    frame = pd.concat([_read(p, {}) for p in _source_files(source, spec.files, table)], ignore_index=True)
    if MALFORMED in frame:  # an aggregate only enriches a text: its unreadable lines are left out, said here
        log.warning(
            "adapter: table '%s': %d malformed lines of %s left out of the aggregate %s",
            table,
            int(frame[MALFORMED].notna().sum()),
            spec.files,
            spec.column,
        )
        frame = frame[frame[MALFORMED].isna()]
    frame[spec.column] = frame[spec.column].astype(str).str.strip().str.lower()
    counts = frame.groupby([spec.key, spec.column]).size().rename("n").reset_index()
    counts = counts.sort_values([spec.key, "n", spec.column], ascending=[True, False, True])
    top = counts.groupby(spec.key).head(spec.top)
    return spec.prefix + top.groupby(spec.key)[spec.column].agg(spec.separator.join)


def _flags(frame: pd.DataFrame, spec: FlagSpec, file: Path) -> pd.Series:
    """Per row, the names of the flag columns that are set (1, true, yes), joined; a cell that is neither
    set nor unset (0, false, no, blank) is an error naming its file, data row and column."""
    cells = frame[spec.columns].astype("string").fillna("").apply(lambda c: c.str.strip().str.lower())
    bad = ~cells.isin(_SET | _UNSET)
    if MALFORMED in frame:  # a malformed line has no cells; the quarantine reports it
        bad &= frame[MALFORMED].isna().to_numpy()[:, None]
    if bad.any().any():
        row, column = np.argwhere(bad.to_numpy())[0]
        raise ValueError(
            f"adapter: {file}: data row {row + 1}, flag column {spec.columns[column]!r}: "
            f"{frame[spec.columns[column]].iloc[row]!r} is not 0/1 (or true/false, yes/no)"
        )
    names = np.array(spec.columns, dtype=object)
    return pd.Series([spec.separator.join(names[mask]) for mask in cells.isin(_SET).to_numpy()], index=frame.index)


def _apply(frame: pd.DataFrame, mapping: TableMapping, table: str, file: Path, extra: dict[str, pd.Series]) -> pd.DataFrame:
    named = [*mapping.columns.values(), mapping.order, *(c for spec in mapping.flags.values() for c in spec.columns)]
    missing = [src for src in named if src not in frame.columns and src not in ("", "rows") and src not in mapping.flags]
    if missing:
        raise KeyError(f"adapter: {file}: mapping for '{table}' names column(s) {missing}, the file has {list(frame.columns)}")
    for name, spec in mapping.flags.items():  # before the columns and templates, which may use them
        frame[name] = _flags(frame, spec, file)
    for name, series in extra.items():
        key = mapping.columns.get("behavior_id") or mapping.columns.get("user_id")
        frame[name] = frame[key].map(series).fillna("")
    out = pd.DataFrame({dst: frame[src] for dst, src in mapping.columns.items()}, index=frame.index)
    for dst, fmt in mapping.template.items():
        out[dst] = [fmt.format_map(row) for row in frame.fillna("").astype(str).to_dict("records")]
    for dst, value in mapping.constants.items():
        out[dst] = value
    for dst, recode in mapping.values.items():
        recode = {str(k): v for k, v in recode.items()}
        out[dst] = out[dst].astype(str).map(recode).where(lambda s: s.notna(), out[dst])  # unmapped cells stay, validation flags them
    used = set(mapping.columns.values()) | set(INTERNAL_COLUMNS)
    keep = [c for c in frame.columns if c not in used] if mapping.keep == "all" else list(mapping.keep)
    for col in keep:
        if col not in out.columns:
            out[col] = frame[col]
    # where each row came from, for the quarantine (data row numbers as a spreadsheet shows them)
    out[SOURCE_FILE] = str(file)
    out[SOURCE_ROW] = np.arange(1, len(frame) + 1)
    if MALFORMED in frame:
        out[MALFORMED] = frame[MALFORMED]
    if mapping.order and mapping.order != "rows":
        out[_ORDER] = pd.to_numeric(frame[mapping.order], errors="coerce")  # not a number: no time, quarantined as null
    return out


def _ordinal_times(shards: list[Path]) -> None:
    """Replace the ordering key of every events shard by a timestamp: per user, dense ranks of the key
    (over all shards: a user may span files), the last on `ORDINAL_END`, one `ORDINAL_STEP` apart."""
    frames = [pd.read_parquet(p, columns=["user_id", _ORDER]) for p in shards]
    keys = pd.concat(frames, ignore_index=True)
    rank = keys.groupby("user_id", dropna=False)[_ORDER].rank(method="dense")
    last = rank.groupby(keys["user_id"], dropna=False).transform("max")
    times = ORDINAL_END - (last - rank) * ORDINAL_STEP
    start = 0
    for path, frame in zip(shards, frames):
        shard = pd.read_parquet(path).drop(columns=_ORDER)
        shard["timestamp"] = times.iloc[start : start + len(frame)].to_numpy()
        shard.to_parquet(path, index=False)
        start += len(frame)


def adapt(source: str | Path, mapping: Mapping, out_dir: str | Path, progress: bool = True) -> dict:
    """Write the data set of `source` in the contract layout under `out_dir` (not yet validated)."""
    source, out = Path(source), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    provenance = {"source": str(source), "adapter": mapping.name}
    events = mapping.tables.get("events")
    if events is not None and events.order:
        provenance["time"] = f"ordinal (order: {events.order}): one day per event, weekday and hour carry nothing"
    DatasetManifest(name=mapping.name, timezone=mapping.timezone, description=mapping.description, provenance=provenance).write(out)
    counts = {}
    for table, spec in mapping.tables.items():
        if spec.from_events:
            continue
        extra = {name: _aggregate(source, agg, table) for name, agg in spec.aggregate.items()}
        files = _source_files(source, spec.files, table)
        if table == "events":
            (out / "events").mkdir(exist_ok=True)
            n, shards = 0, []
            for i, file in enumerate(tqdm(files, desc="adapt events", unit="file", disable=not progress or None)):
                frame = _apply(_read(file, spec.read_options), spec, table, file, extra)
                if spec.order == "rows":  # the position in the files, read in name order
                    frame[_ORDER] = np.arange(n, n + len(frame), dtype=np.float64)
                shards.append(out / "events" / f"part-{i:05d}.parquet")
                frame.to_parquet(shards[-1], index=False)
                n += len(frame)
            if spec.order:
                _ordinal_times(shards)
            counts[table] = n
        else:
            frame = pd.concat([_apply(_read(f, spec.read_options), spec, table, f, extra) for f in files], ignore_index=True)
            frame.to_parquet(out / f"{table}.parquet", index=False)
            counts[table] = len(frame)
    behaviors = mapping.tables.get("behaviors")
    if behaviors is not None and behaviors.from_events:
        ids = pd.concat([pd.read_parquet(p, columns=["behavior_id"]) for p in sorted((out / "events").glob("*.parquet"))])[
            "behavior_id"
        ].dropna()  # a malformed line has no id
        catalog = pd.DataFrame({"behavior_id": pd.unique(ids.astype(str))})
        catalog["description"] = [
            behaviors.template.get("description", "{behavior_id}").format(behavior_id=b) for b in catalog["behavior_id"]
        ]
        catalog.to_parquet(out / "behaviors.parquet", index=False)
        counts["behaviors"] = len(catalog)
    log.info("adapted %s -> %s: %s", source, out, counts)
    return counts
