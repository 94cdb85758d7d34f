"""The data contract: the tables an operator brings, their columns and types, and how a data set sits on disk.

A data set is a folder:

    dataset.yaml          name, timezone (decides weekday and hour), free-form provenance
    events/               one or more parquet/CSV shards: user_id, timestamp, behavior_id [, value, duration, source]
    behaviors.(parquet|csv)  behavior_id, description [, type, attribute columns...]
    users.(parquet|csv)      user_id [, attribute columns...]            (optional)
    labels.(parquet|csv)     user_id, task, label [, treatment, time]    (optional)
    scenarios.(parquet|csv)  user_id, start, end, text                   (optional)

`events` may also be a single file `events.parquet` / `events.csv`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import re
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str  # "id" (string key), "time", "float", "int", "text", "bool"
    required: bool = True


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: tuple[ColumnSpec, ...]
    key: tuple[str, ...]  # duplicate rows on this key are rejected
    required: bool = True
    extra_columns: bool = False  # attribute tables keep any other column

    @property
    def required_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.required]


EVENTS = TableSpec(
    "events",
    (
        ColumnSpec("user_id", "id"),
        ColumnSpec("timestamp", "time"),
        ColumnSpec("behavior_id", "id"),
        ColumnSpec("value", "float", required=False),
        ColumnSpec("duration", "float", required=False),
        ColumnSpec("source", "id", required=False),
    ),
    key=("user_id", "timestamp", "behavior_id"),
)
BEHAVIORS = TableSpec(
    "behaviors",
    (ColumnSpec("behavior_id", "id"), ColumnSpec("description", "text"), ColumnSpec("type", "id", required=False)),
    key=("behavior_id",),
    extra_columns=True,
)
USERS = TableSpec("users", (ColumnSpec("user_id", "id"),), key=("user_id",), required=False, extra_columns=True)
LABELS = TableSpec(
    "labels",
    (
        ColumnSpec("user_id", "id"),
        ColumnSpec("task", "id"),
        ColumnSpec("label", "float"),
        ColumnSpec("treatment", "int", required=False),
        ColumnSpec("time", "time", required=False),
    ),
    key=("user_id", "task"),
    required=False,
)
SCENARIOS = TableSpec(
    "scenarios",
    (ColumnSpec("user_id", "id"), ColumnSpec("start", "time"), ColumnSpec("end", "time"), ColumnSpec("text", "text")),
    key=("user_id", "start", "end"),
    required=False,
)
TABLES: dict[str, TableSpec] = {t.name: t for t in (EVENTS, BEHAVIORS, USERS, LABELS, SCENARIOS)}
TABLE_FORMATS = (".parquet", ".csv")
# Columns a raw table may carry beside the contract's: why a CSV line could not be read (None when it
# could; its cells are then empty), and the operator's file and data row an adapter read the row from.
# Validation quarantines malformed lines and names the source in the quarantine; no clean table keeps them.
MALFORMED, SOURCE_FILE, SOURCE_ROW = "_malformed", "_source_file", "_source_row"
INTERNAL_COLUMNS = (MALFORMED, SOURCE_FILE, SOURCE_ROW)
_CSV_OPTIONS = {"sep", "delimiter", "encoding", "quotechar", "header", "names"}  # what the line-by-line reader honours
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes `surrogateescape` kept from an undecodable line


@functools.cache
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_timezone(name: object, where: str) -> str:
    """`name` when it is an IANA zone name of the zoneinfo database (e.g. "Asia/Shanghai", "UTC"); else a
    ValueError. Only names from the list are accepted: the zone name is looked up as a file by the time
    libraries, so a path such as "../../etc/passwd" must never reach them."""
    if not isinstance(name, str) or name not in _zone_names():
        raise ValueError(f"{where}: timezone {str(name)[:80]!r} is not an IANA zone name (e.g. 'Asia/Shanghai', 'Europe/Berlin', 'UTC')")
    return name


@dataclass
class DatasetManifest:
    name: str = "dataset"
    timezone: str = "UTC"  # operator timezone: decides weekday and hour of every event
    description: str = ""
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_timezone(self.timezone, f"data set {self.name!r}")

    @classmethod
    def read(cls, root: str | Path) -> DatasetManifest:
        path = Path(root) / "dataset.yaml"
        if not path.exists():
            return cls(name=Path(root).name)
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        check_timezone(data.get("timezone", "UTC"), str(path))
        return cls(**data)

    def write(self, root: str | Path) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "dataset.yaml").write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def table_files(root: str | Path, table: str) -> list[Path]:
    """The files that hold `table` in data set folder `root` (shards sorted by name); [] when absent."""
    root = Path(root)
    folder = root / table
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in TABLE_FORMATS)
        if not files:
            raise FileNotFoundError(f"{folder}: folder holds no .parquet or .csv shard")
        return files
    return [root / f"{table}{ext}" for ext in TABLE_FORMATS if (root / f"{table}{ext}").exists()][:1]


class UnreadableFile(ValueError):
    """A table file that cannot be read at all (zero bytes, truncated, not the format its name says)."""


@contextlib.contextmanager
def named_read(path: Path):
    """Reading `path`: a file that cannot be read at all is an `UnreadableFile` naming it (the readers' own
    errors, e.g. "Parquet file size is 0 bytes" or "No columns to parse from file", do not)."""
    if path.stat().st_size == 0:
        raise UnreadableFile(f"{path}: empty file (0 bytes): an interrupted copy or export? Replace it or remove it from the input")
    try:
        yield
    except (pa.ArrowException, pd.errors.EmptyDataError) as err:
        raise UnreadableFile(f"{path}: cannot be read as {path.suffix.lstrip('.') or 'a table'}: {err}") from None


def read_csv(path: Path, options: dict | None = None) -> pd.DataFrame:
    """A CSV file with every cell as a string (blank: missing), as written.

    A file with malformed lines (more fields than the header, bytes not in the encoding) is read again
    line by line: those lines become rows with empty cells and the reason in `MALFORMED`, in their place,
    so the rest of the file is read and every line keeps its data row number."""
    options = options or {}
    with named_read(path):
        try:
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], **options)
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            if set(options) - _CSV_OPTIONS or options.get("header", 0) not in (0, None):
                raise ValueError(
                    f"{path}: {err} (malformed lines are quarantined only with the read_options {sorted(_CSV_OPTIONS)})"
                ) from None
            return _read_csv_lines(path, options)


def _read_csv_lines(path: Path, options: dict) -> pd.DataFrame:
    encoding = options.get("encoding", "utf-8")
    text = path.read_bytes().decode(encoding, errors="surrogateescape")
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=options.get("sep", options.get("delimiter", ",")), quotechar=options.get("quotechar", '"')
    )
    # as pandas: `names` without `header` means the file has no header line; `header: 0` with `names` replaces it
    header_line = next(reader) if options.get("header", None if "names" in options else 0) == 0 else None
    header = list(options.get("names") or header_line or [])
    if not header:
        raise ValueError(f"{path}: read_options header: null needs names: [...] (the file's column names)")
    rows, reasons, line = [], [], reader.line_num
    for record in reader:
        first, line = line + 1, reader.line_num
        if not record:  # a blank line: pandas skips it too
            continue
        reason = None
        if len(record) > len(header):
            reason = f"line {first}: expected {len(header)} fields, saw {len(record)}"
        elif any(_UNDECODABLE.search(cell) for cell in record):
            reason = f"line {first}: bytes that are not {encoding}"
        rows.append([None] * len(header) if reason else [c or None for c in record] + [None] * (len(header) - len(record)))
        reasons.append(reason)
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    frame[MALFORMED] = reasons
    return frame


def read_file(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read one parquet or CSV file. CSV cells are read as strings so validation sees them as written."""
    if path.suffix != ".parquet":
        frame = read_csv(path)
        return frame if columns is None else frame[[c for c in frame.columns if c in columns or c == MALFORMED]]
    with named_read(path):
        have = pq.read_schema(path)
        if columns is not None:
            columns = [c for c in columns if c in have.names]
        return pq.read_table(path, columns=columns).to_pandas()


def read_arrow(path: Path, dictionary: tuple[str, ...] = ()) -> pa.Table:
    """`read_file` as an Arrow table, for large tables that are checked without a pandas round trip.

    Parquet string columns named in `dictionary` stay dictionary-encoded: ids repeat millions of times,
    and checks on the few distinct values are far cheaper than on every cell. CSV is read as `read_file`
    reads it (cells as strings), so both formats are validated alike.
    """
    if path.suffix != ".parquet":
        return pa.Table.from_pandas(read_file(path), preserve_index=False)
    with named_read(path):
        have = pq.read_schema(path)
        return pq.read_table(path, read_dictionary=[c for c in dictionary if c in have.names and pa.types.is_string(have.field(c).type)])


def read_table(root: str | Path, table: str, columns: list[str] | None = None) -> pd.DataFrame | None:
    """Concatenate all shards of `table`; None when the data set has no such table."""
    files = table_files(root, table)
    if not files:
        return None
    frames = [read_file(f, columns) for f in files]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
