"""The candidate catalog to rank: all behaviours, or those a filter over the behaviours table selects.

A filter is `column=value[,value...]`, e.g. `family=ott` to rank only OTT-service behaviours as in the
paper's downstream task. Several filters separated by `;` must all hold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def select_candidates(behaviors: pd.DataFrame, behavior_ids: np.ndarray, expr: str | None) -> np.ndarray:
    """Behaviour indices (into `behavior_ids`) whose row in `behaviors` passes filter `expr`."""
    if not expr:
        return np.arange(len(behavior_ids))
    table = behaviors.set_index(behaviors["behavior_id"].astype(str))
    keep = pd.Series(True, index=table.index)
    for clause in expr.split(";"):
        if "=" not in clause:
            raise ValueError(f"candidate filter {clause!r}: expected column=value[,value...]")
        column, values = (part.strip() for part in clause.split("=", 1))
        if column not in table.columns:
            raise ValueError(f"candidate filter {clause!r}: behaviours have no column {column!r}; columns: {list(table.columns)}")
        keep &= table[column].astype(str).isin([v.strip() for v in values.split(",")])
    chosen = pd.Index(np.asarray(behavior_ids, dtype=str)).isin(keep.index[keep])
    out = np.flatnonzero(chosen)
    if not len(out):
        raise ValueError(f"candidate filter {expr!r} selects no behaviour")
    return out
