"""Timestamps of any granularity and representation -> UTC, the way an operator's exports write them.

- numbers: unix epoch in `unit` ("s", "ms", "us", "ns", or "auto" by magnitude);
- strings with an offset ("...+08:00", "...Z"): that instant;
- naive strings or datetimes ("2024-03-01", "2024-03", "2024-03-01 08:15:02"): local time in the operator's
  timezone (DST gaps shift forward; ambiguous fall-back hours are read as standard time);
- tz-aware datetimes: converted.
A cell without a date ("12:30", "8:15 PM") is unreadable: a lenient parser would date it today, and
the result would depend on the day of the run. Unparseable cells become NaT; the caller decides what
to do with them (validation quarantines them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

_OFFSET_RE = r"(?:Z|[+-]\d{2}:?\d{2})$"
_TIME_OF_DAY_RE = r"\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?\s*(?:[AaPp]\.?[Mm]\.?)?"


def _epoch(values: pd.Series, unit: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    if unit == "auto":  # per cell, so a column that mixes seconds and milliseconds still reads right
        magnitude = np.abs(numbers)
        scale = np.select([magnitude < 1e11, magnitude < 1e14, magnitude < 1e17], [1e9, 1e6, 1e3], 1.0)
    else:
        scale = np.full(len(numbers), {"s": 1e9, "ms": 1e6, "us": 1e3, "ns": 1.0}[unit])
    nanos = numbers * scale
    ok = np.isfinite(nanos) & (np.abs(nanos) < 9.2e18)
    out = np.full(len(numbers), np.datetime64("NaT"), dtype="datetime64[ns]")
    out[ok] = np.round(nanos[ok]).astype(np.int64).view("datetime64[ns]")
    return pd.Series(out, index=values.index).dt.tz_localize("UTC")


def _localize(naive: pd.Series, timezone: str) -> pd.Series:
    return naive.dt.tz_localize(timezone, ambiguous=np.zeros(len(naive), dtype=bool), nonexistent="shift_forward").dt.tz_convert("UTC")


def to_utc(values: pd.Series, timezone: str = "UTC", unit: str = "auto", fmt: str | None = None) -> pd.Series:
    """Parse a column of timestamps to datetime64[ns, UTC]; NaT where a cell cannot be read."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_any_dtype(values):
        return _localize(values, timezone)
    if pd.api.types.is_numeric_dtype(values):
        return _epoch(values, unit)
    text = values.astype("string").str.strip()
    out = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    numeric = text.str.fullmatch(r"[+-]?\d+(?:\.\d+)?").fillna(False).astype(bool)
    if numeric.any():
        out[numeric] = _epoch(text[numeric], unit)
    with_offset = (~numeric & text.str.contains(_OFFSET_RE, regex=True).fillna(False)).astype(bool)
    if with_offset.any():
        out[with_offset] = pd.to_datetime(text[with_offset], utc=True, errors="coerce", format=fmt or "ISO8601")
    naive = (~numeric & ~with_offset & text.notna()).astype(bool)
    if naive.any():
        parsed = pd.to_datetime(text[naive], errors="coerce", format=fmt or "ISO8601")
        retry = parsed.isna()
        if retry.any() and fmt is None:  # e.g. "03/01/2024 08:00": slower, row by row
            cells = text[naive][retry]
            dated = cells.str.replace(_TIME_OF_DAY_RE, "", regex=True).str.contains(r"\d").fillna(False).astype(bool)
            parsed[retry] = pd.to_datetime(cells.where(dated), errors="coerce", format="mixed")
        out[naive] = _localize(parsed, timezone)
    return out
