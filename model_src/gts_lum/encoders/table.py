"""Table encoders (paper section 3.2: attribute tables -> business embeddings b^E; TableGPT2 in production).

One interface, three kinds (see `table_base` for the shared parts):

    from gts_lum.encoders.table import build_table_encoder, load_table_encoder
    enc = build_table_encoder("pkg:encoders/table.yaml", ["kind=learned", "id_column=user_id"])
    enc.fit(users, labels)              # text/hf: fixes the columns; learned: also trains
    emb = enc.encode(users)             # (N, D) float32, one row per table row
    enc.save("out/table_encoder"); enc = load_table_encoder("out/table_encoder")

Works the same for per-user tables (profile) and per-behaviour tables (service attributes, cell,
terminal): pass `id_column` so that the key is never read as a feature.
"""

from __future__ import annotations

from pathlib import Path

from gts_lum.config import deep_merge, load_config, parse_overrides
from gts_lum.encoders.table_base import (
    HFTableConfig,
    LearnedTableConfig,
    TableEncoder,
    TableEncoderConfig,
    TableSchema,
    TextFn,
    read_saved,
    serialize_rows,
)
from gts_lum.encoders.table_hf import HFTableEncoder
from gts_lum.encoders.table_learned import LearnedTableEncoder
from gts_lum.encoders.table_text import TextTableEncoder, default_text_encoder

ENCODERS: dict[str, type[TableEncoder]] = {cls.kind: cls for cls in (TextTableEncoder, LearnedTableEncoder, HFTableEncoder)}

__all__ = [
    "ENCODERS",
    "HFTableConfig",
    "HFTableEncoder",
    "LearnedTableConfig",
    "LearnedTableEncoder",
    "TableEncoder",
    "TableEncoderConfig",
    "TableSchema",
    "TextFn",
    "TextTableEncoder",
    "build_table_encoder",
    "default_text_encoder",
    "load_table_encoder",
    "serialize_rows",
]


def build_table_encoder(
    cfg: TableEncoderConfig | str | Path | None = None,
    overrides: list[str] | dict | None = None,
    text_encoder: TextFn | None = None,
) -> TableEncoder:
    """An unfitted encoder of `cfg.kind`. `cfg`: a config, a YAML path or `pkg:encoders/table.yaml`.

    `text_encoder` (texts -> (N, D)) serves the `text` kind; None uses gts_lum.tokenizer.text_encoder.
    """
    if not isinstance(cfg, TableEncoderConfig):
        cfg = load_config(TableEncoderConfig, cfg, overrides)
    elif overrides:
        raise ValueError("build_table_encoder: overrides apply to a YAML config, not to a config object")
    if cfg.kind == "text":
        return TextTableEncoder(cfg, text_encoder)
    return ENCODERS[cfg.kind](cfg)


def load_table_encoder(path: str | Path, text_encoder: TextFn | None = None) -> TableEncoder:
    """A fitted encoder saved with `TableEncoder.save`, ready to encode."""
    kind, cfg, schema, state, tensors = read_saved(path)
    if kind != cfg.kind:
        raise ValueError(f"{path}: saved kind {kind!r} does not match its config kind {cfg.kind!r}")
    encoder = build_table_encoder(cfg, text_encoder=text_encoder)
    encoder.schema = schema
    encoder.restore(state, tensors)
    return encoder


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
    import numpy as np
    import pandas as pd

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
        encoder = build_table_encoder(cfg)
        encoder.fit(frame)
        vectors = encoder.encode(frame)
        np.savez(
            out / f"{name}_table.npz", **{f"{name}_ids": frame[key].astype(str).to_numpy().astype(str), "vectors": vectors}
        )  # unicode, not object: loads without pickle
        encoder.save(out / f"{name}_encoder")
        summary[name] = {"rows": len(frame), "dim": int(vectors.shape[1]), "kind": cfg.kind, "columns": list(encoder.schema.columns)}
    if not summary:
        raise FileNotFoundError(f"{clean}: neither a behaviours nor a users table to encode")
    return summary
