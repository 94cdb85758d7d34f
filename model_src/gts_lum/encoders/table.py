"""Table encoders (paper section 3.2: attribute tables -> business embeddings b^E; TableGPT2 in production).

One interface, three kinds (see `table_base` for the shared parts):

    from gts_lum.encoders.table import build_table_encoder, load_table_encoder
    enc = build_table_encoder("pkg:encoders/table.yaml", ["kind=learned", "id_column=user_id"])
    enc = fit_table_encoder(enc, users, labels)   # gts_lum.training.table_encoder; text/hf: enc.fit(users)
    emb = enc.encode(users)             # (N, D) float32, one row per table row
    enc.save("out/table_encoder"); enc = load_table_encoder("out/table_encoder")

Works the same for per-user tables (profile) and per-behaviour tables (service attributes, cell,
terminal): pass `id_column` so that the key is never read as a feature.

A `learned` encoder trains on the one training loop, which sits above this package: it is fitted by
`gts_lum.training.table_encoder.fit_table_encoder` (any kind), encoded and loaded from here. The pipeline
step that fits the encoders of a data set and writes the table artifacts is `gts_lum.stages.tables`.
"""

from __future__ import annotations

from pathlib import Path

from gts_lum.config import load_config
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
