"""The table encoders' pipeline step (`gts-lum tables`, the pipeline's encode-tables step): the attribute
tables of a clean data set -> one embedding per behaviour and per user, the encoders saved beside them.

    encode_tables("data/clean", "artifacts/tables", user_overrides={"kind": "learned"})
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gts_lum.config import deep_merge, load_config, parse_overrides
from gts_lum.encoders.table import TableEncoderConfig, build_table_encoder
from gts_lum.training.table_encoder import fit_table_encoder


def encode_tables(
    clean_dir: str | Path,
    out_dir: str | Path,
    behaviors: str | Path | None = "pkg:encoders/table.yaml",
    behavior_overrides: list[str] | dict | None = None,
    users: str | Path | None = "pkg:encoders/table.yaml",
    user_overrides: list[str] | dict | None = None,
) -> dict:
    """Pipeline stage: attribute tables of a clean data set -> one embedding per behaviour and per user.

    Writes `behavior_table.npz` (behavior_ids, vectors: the Q-former's "table" modality) and
    `user_table.npz` (user_ids, vectors: the decoder's profile token), each encoder saved beside them.
    The free-text description is the text encoder's and the semantic IDs' input, not a table column.
    No label is read: a `learned` encoder pretrains by masked-cell reconstruction here, so nothing of a
    test target leaks into the embeddings. None skips a table.
    """
    clean, out = Path(clean_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    for name, key, config, overrides, extra_exclude in (
        ("behavior", "behavior_id", behaviors, behavior_overrides, ["description"]),
        ("user", "user_id", users, user_overrides, []),
    ):
        path = clean / f"{name}s.parquet"
        if config is None or not path.exists():
            continue
        frame = pd.read_parquet(path)
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        cfg = load_config(TableEncoderConfig, config, deep_merge({"id_column": key, "exclude": extra_exclude}, extra))
        if cfg.kind == "learned":
            cfg.learned.objective = "masked"
        encoder = fit_table_encoder(build_table_encoder(cfg), frame)
        vectors = encoder.encode(frame)
        np.savez(
            out / f"{name}_table.npz", **{f"{name}_ids": frame[key].astype(str).to_numpy().astype(str), "vectors": vectors}
        )  # unicode, not object: loads without pickle
        encoder.save(out / f"{name}_encoder")
        summary[name] = {"rows": len(frame), "dim": int(vectors.shape[1]), "kind": cfg.kind, "columns": list(encoder.schema.columns)}
    if not summary:
        raise FileNotFoundError(f"{clean}: neither a behaviours nor a users table to encode")
    return summary
