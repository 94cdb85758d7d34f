"""What every table encoder shares: its config, the fitted column schema, row serialization, save/load.

A table encoder maps the rows of an attribute table (per behaviour: service attributes, cell/location,
terminal; per user: the profile) to one embedding per row, (N, D) float32 - the business embeddings
b^E that the Q-former aligns with the semantic IDs (paper section 3.2, TableGPT2 in production). Three
implementations share this interface (`gts_lum.encoders.table` builds and loads them;
`gts_lum.training.table_encoder.fit_table_encoder` fits any of them, training the `learned` kind):

- `text`    rows serialized as "column: value; ..." and embedded by a sentence encoder (default);
- `learned` an FT-Transformer trained on the table (on a label, or by masked-cell reconstruction);
- `hf`      any local Hugging Face causal LM (TableGPT2), mean-pooled last hidden states.

A saved encoder is a folder: `table_encoder.yaml` (kind, config, fitted schema, kind-specific state
such as vocabularies and scalers) and, for models with weights, `weights.safetensors`. Never pickle.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors.torch import load_file, save_file

from gts_lum.config import from_dict

TextFn = Callable[[list[str]], np.ndarray]  # texts -> (N, D) float32, e.g. gts_lum.tokenizer.text_encoder.encode
CARD = "table_encoder.yaml"
WEIGHTS = "weights.safetensors"
KINDS = ("text", "learned", "hf")


@dataclass
class LearnedTableConfig:
    """FT-Transformer (Gorishniy et al. 2021): one token per feature, a CLS token, a few transformer layers."""

    dim: int = 32
    num_layers: int = 2
    num_heads: int = 4
    ffn_mult: int = 2  # feed-forward width = ffn_mult * dim
    dropout: float = 0.1
    max_categories: int = 1000  # per column: the most frequent values get a slot, the rest are "unknown"
    min_category_count: int = 1  # values seen fewer times in training are "unknown" (trains that slot)
    # "auto": binary for 0/1 labels, multiclass for string labels, regression for other numbers;
    # "masked" (the only choice without labels): reconstruct randomly masked cells.
    objective: str = "auto"
    mask_prob: float = 0.15  # share of cells masked per row by the "masked" objective
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 256
    epochs: int = 30
    patience: int = 5  # epochs without a lower validation loss before stopping
    valid_fraction: float = 0.1  # training rows held out for early stopping (stratified for classes)
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "cpu"  # a small model: CPU is fast enough; "auto" picks NPU/CUDA (gts_lum.device)
    cpu_threads: int = 1  # intra-op threads on CPU (0: torch's default); more only add sync cost at this size
    progress: bool = True  # read no more: the fit runs on training.loop, whose bar shows on a terminal (kept: saved configs load)


@dataclass
class HFTableConfig:
    """A local Hugging Face causal LM (TableGPT2 in production) read as a row encoder."""

    model_path: str = ""  # a folder saved with save_pretrained (model + tokenizer); never downloaded
    max_length: int = 512  # tokens per row; longer rows are truncated
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"  # "auto": fp32 on CPU, the device's amp dtype (bf16) on NPU/CUDA; or "float32"
    progress: bool = True


@dataclass
class TableEncoderConfig:
    kind: str = "text"  # "text" | "learned" | "hf"
    id_column: str | None = None  # the row key (user_id, behavior_id): never a feature
    columns: list[str] | None = None  # feature columns in this order; None = every column but id/exclude
    exclude: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)  # numeric columns to treat as categories (codes)
    prefix: str = ""  # text kinds: put before every serialized row, e.g. "Customer profile. "
    missing_value: str | None = "unknown"  # text kinds: how a missing cell reads; None omits the cell
    learned: LearnedTableConfig = field(default_factory=LearnedTableConfig)
    hf: HFTableConfig = field(default_factory=HFTableConfig)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TableEncoderConfig.kind: {self.kind!r} is not one of {KINDS}")


def is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


@dataclass
class TableSchema:
    """The feature columns fixed at fit time, in order, and which of them are numbers."""

    numeric: list[str]
    categorical: list[str]
    columns: list[str]  # all features in serialization order

    @classmethod
    def infer(cls, frame: pd.DataFrame, cfg: TableEncoderConfig) -> TableSchema:
        named = list(cfg.columns) if cfg.columns is not None else list(frame.columns)
        for option, wanted in (("columns", cfg.columns or []), ("exclude", cfg.exclude), ("categorical", cfg.categorical)):
            absent = [c for c in wanted if c not in frame.columns]
            if absent:
                raise KeyError(f"table encoder config `{option}`: column(s) {absent} not in the table; it has {list(frame.columns)}")
        columns = [c for c in named if c != cfg.id_column and c not in cfg.exclude]
        if not columns:
            raise ValueError(
                f"table encoder: no feature columns left in {list(frame.columns)} (id_column={cfg.id_column!r}, exclude={cfg.exclude})"
            )
        numeric = [c for c in columns if c not in cfg.categorical and is_numeric(frame[c])]
        return cls(numeric=numeric, categorical=[c for c in columns if c not in numeric], columns=columns)

    def check(self, frame: pd.DataFrame) -> None:
        """A table to encode must hold every fitted column, and numbers where numbers were fitted."""
        absent = [c for c in self.columns if c not in frame.columns]
        if absent:
            raise KeyError(f"table to encode lacks fitted column(s) {absent}; it has {list(frame.columns)}")
        for col in self.numeric:
            if not is_numeric(frame[col]):
                bad = pd.to_numeric(frame[col], errors="coerce").isna() & frame[col].notna()
                if bad.any():
                    row = frame.index[bad.to_numpy().argmax()]
                    raise ValueError(f"column {col!r} was numeric when fitted but row {row!r} holds {frame[col][row]!r}")

    def numbers(self, frame: pd.DataFrame) -> np.ndarray:
        """(N, len(numeric)) float64, NaN where missing."""
        columns = [pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64, na_value=np.nan) for c in self.numeric]
        return np.stack(columns, 1) if columns else np.zeros((len(frame), 0))


def format_numbers(values: np.ndarray) -> np.ndarray:
    """Numbers as short text: integers without ".0", others with 6 significant digits (29.85, 1889.5)."""
    out = np.char.mod("%.6g", np.nan_to_num(values)).astype(object)
    whole = np.isfinite(values) & (values == np.round(values)) & (np.abs(values) < 1e15)
    out[whole] = np.char.mod("%d", values[whole].astype(np.int64))
    return out


def serialize_rows(frame: pd.DataFrame, schema: TableSchema, missing_value: str | None = "unknown", prefix: str = "") -> list[str]:
    """Each row as "prefix" + "column: value; column: value"; a missing cell reads `missing_value` (None: left out)."""
    schema.check(frame)
    numbers = schema.numbers(frame)
    text = pd.Series(prefix, index=frame.index, dtype=object)
    for col in schema.columns:
        if col in schema.numeric:
            raw = numbers[:, schema.numeric.index(col)]
            missing, values = np.isnan(raw), format_numbers(raw)
        else:
            missing, values = frame[col].isna().to_numpy(), frame[col].astype("string").fillna("").to_numpy(object)
        cell = pd.Series(f"{col}: " + values + "; ", index=frame.index)  # object-array concatenation, per column
        text = text + cell.where(~missing, "" if missing_value is None else f"{col}: {missing_value}; ")
    return text.str.removesuffix("; ").tolist()


class TableEncoder(ABC):
    """Rows of a table -> (N, D) float32. `fit` fixes the columns (and learns, for kinds that learn)."""

    kind: ClassVar[str]

    def __init__(self, cfg: TableEncoderConfig):
        if cfg.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs kind={self.kind!r}, config says {cfg.kind!r}")
        self.cfg = cfg
        self.schema: TableSchema | None = None

    def fit(self, frame: pd.DataFrame, labels: Any = None) -> TableEncoder:
        """Fix the feature columns from `frame` (text/hf ignore `labels`). A kind that trains (`learned`)
        is fitted by `gts_lum.training.table_encoder.fit_table_encoder`, on the training loop."""
        if len(frame) == 0:
            raise ValueError("table encoder: cannot fit on an empty table")
        self.schema = TableSchema.infer(frame, self.cfg)
        return self

    def fitted_schema(self) -> TableSchema:
        if self.schema is None:
            raise RuntimeError(f"{type(self).__name__}: call fit(frame) before encode (it fixes the columns)")
        return self.schema

    @property
    @abstractmethod
    def dim(self) -> int:
        """D, the width of the embeddings."""

    @abstractmethod
    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """(N, D) float32, row i for frame row i."""

    def texts(self, frame: pd.DataFrame) -> list[str]:
        return serialize_rows(frame, self.fitted_schema(), self.cfg.missing_value, self.cfg.prefix)

    # Persistence: subclasses add their fitted state (plain YAML data) and tensors.
    def extra_state(self) -> dict:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Inverse of `extra_state` / `tensors`; the schema and config are already set."""

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        card = {
            "kind": self.kind,
            "config": dataclasses.asdict(self.cfg),
            "schema": dataclasses.asdict(self.fitted_schema()),
            "state": self.extra_state(),
        }
        (out / CARD).write_text(yaml.safe_dump(card, sort_keys=False, allow_unicode=True))
        tensors = self.tensors()
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, out / WEIGHTS)
        return out


def read_saved(path: str | Path) -> tuple[str, TableEncoderConfig, TableSchema, dict, dict[str, torch.Tensor]]:
    """(kind, config, schema, state, tensors) of an encoder folder written by `TableEncoder.save`."""
    path = Path(path)
    if not (path / CARD).exists():
        raise FileNotFoundError(f"{path}: no {CARD} (not a saved table encoder)")
    card = yaml.safe_load((path / CARD).read_text())
    tensors = load_file(path / WEIGHTS) if (path / WEIGHTS).exists() else {}
    return card["kind"], from_dict(TableEncoderConfig, card["config"]), TableSchema(**card["schema"]), card.get("state") or {}, tensors
