"""The `learned` table encoder: an FT-Transformer (Gorishniy et al., "Revisiting Deep Learning Models for
Tabular Data", NeurIPS 2021) trained on the table itself; the row embedding is the CLS output.

Every feature becomes one token:
- numeric j:      standardized x_j * w_j + b_j (mean/std fitted on the training rows); a missing value
                  is a learned per-feature "missing" token instead;
- categorical j:  an embedding row + b_j; per column slot 0 = "unknown" (a value not seen in training,
                  or too rare to keep), slot 1 = "missing", slots 2.. = the fitted vocabulary.
A CLS token is prepended and a few pre-norm transformer layers mix them.

Pretraining: on a label (binary / multiclass / regression head on the CLS embedding, e.g. churn) or,
for tables without labels (behaviour attributes), by masked-cell reconstruction - masked numeric cells
are regressed, masked categories classified against the (tied) category embeddings of their column.

This module holds the network (`TableNetwork`: the FT-Transformer and its pretraining head, its forward
the loss) and the encoder that reads rows through it. The training is `gts_lum.training.table_encoder`'s,
on the one training loop (`training.loop.train_loop`): the loop sits above this package (training/
imports modeling/, which reads `encoders.node2vec`), so an encoder that trains is fitted from there:

    from gts_lum.training.table_encoder import fit_table_encoder
    enc = fit_table_encoder(build_table_encoder(cfg), frame, labels)   # labels=None: masked cells
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gts_lum.encoders.table_base import LearnedTableConfig, TableEncoder, TableEncoderConfig, TableSchema
from gts_lum.sequence.splits import holdout

UNKNOWN, MISSING, RESERVED = 0, 1, 2  # category slots before the vocabulary
OBJECTIVES = ("auto", "binary", "multiclass", "regression", "masked")
ENCODE_BATCH = 4096


@dataclass
class FeatureCodec:
    """Fitted per-column scalers and vocabularies: table cells -> model inputs."""

    numeric: list[str]
    categorical: list[str]
    mean: list[float]
    std: list[float]
    vocab: dict[str, list[str]] = field(default_factory=dict)  # column -> values in slot order (from slot 2)

    @classmethod
    def fit(cls, frame: pd.DataFrame, schema: TableSchema, cfg: LearnedTableConfig) -> FeatureCodec:
        x = schema.numbers(frame)
        with np.errstate(all="ignore"):
            mean, std = np.nanmean(x, 0), np.nanstd(x, 0)
        # An all-missing column has no mean; a constant one no spread: neither may divide by zero.
        mean, std = np.nan_to_num(mean), np.where(np.isfinite(std) & (std > 0), std, 1.0)
        vocab = {}
        for col in schema.categorical:
            counts = categories(frame[col]).value_counts(dropna=True)
            kept = counts[counts >= cfg.min_category_count].head(cfg.max_categories)  # most frequent first
            vocab[col] = sorted(kept.index.tolist())
        return cls(list(schema.numeric), list(schema.categorical), mean.tolist(), std.tolist(), vocab)

    @property
    def cardinalities(self) -> list[int]:
        return [RESERVED + len(self.vocab[c]) for c in self.categorical]

    def transform(self, frame: pd.DataFrame, schema: TableSchema) -> tuple[np.ndarray, np.ndarray]:
        """x_num (N, Fn) float32 standardized, NaN where missing; x_cat (N, Fc) int64 slots per column."""
        x_num = ((schema.numbers(frame) - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)
        x_cat = np.zeros((len(frame), len(self.categorical)), np.int64)
        for j, col in enumerate(self.categorical):
            values = categories(frame[col])
            codes = pd.Categorical(values, categories=self.vocab[col]).codes.astype(np.int64)  # -1: unseen or NaN
            x_cat[:, j] = np.where(codes >= 0, codes + RESERVED, np.where(values.isna().to_numpy(), MISSING, UNKNOWN))
        return x_num, x_cat


def categories(series: pd.Series) -> pd.Series:
    """Cells as strings, so that vocabularies survive YAML and parquet round trips unchanged."""
    return series.astype("string")


@dataclass
class LabelSpec:
    """How labels become targets: the objective, class names (multiclass), target scaling (regression)."""

    objective: str
    classes: list = field(default_factory=list)
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, labels: pd.Series | None, objective: str) -> LabelSpec:
        if objective not in OBJECTIVES:
            raise ValueError(f"LearnedTableConfig.objective: {objective!r} is not one of {OBJECTIVES}")
        if labels is None:
            if objective not in ("auto", "masked"):
                raise ValueError(f"objective {objective!r} needs labels; without labels use 'masked' (or 'auto')")
            return cls("masked")
        if objective == "masked":
            raise ValueError("objective 'masked' learns from the table alone: do not pass labels")
        if labels.isna().any():
            raise ValueError(f"labels: missing value at row(s) {labels.index[labels.isna()].tolist()[:5]}")
        numeric = is_number(labels)
        if objective == "auto":
            objective = "binary" if numeric and set(np.unique(labels)) <= {0, 1} else "regression" if numeric else "multiclass"
        if objective == "binary" and not (numeric and set(np.unique(labels)) <= {0, 1}):
            raise ValueError(f"objective 'binary' needs 0/1 labels, got values {sorted(pd.unique(labels))[:5]}")
        if objective == "regression":
            if not numeric:
                raise ValueError("objective 'regression' needs numeric labels")
            return cls(objective, mean=float(labels.mean()), std=float(labels.std(ddof=0)) or 1.0)
        classes = sorted(pd.unique(labels).tolist()) if objective == "multiclass" else []
        return cls(objective, classes=classes)

    @property
    def outputs(self) -> int:
        return len(self.classes) if self.objective == "multiclass" else 1

    def targets(self, labels: pd.Series) -> torch.Tensor:
        if self.objective == "multiclass":
            return torch.as_tensor(pd.Categorical(labels, categories=self.classes).codes.astype(np.int64))
        scaled = (labels.to_numpy(np.float64) - self.mean) / self.std if self.objective == "regression" else labels.to_numpy(np.float64)
        return torch.as_tensor(scaled, dtype=torch.float32)


def is_number(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


class FeatureTokenizer(nn.Module):
    """x_num (B, Fn), x_cat (B, Fc) -> tokens (B, 1 + Fn + Fc, D), CLS first."""

    def __init__(self, num_numeric: int, cardinalities: list[int], dim: int):
        super().__init__()
        bound = dim**-0.5  # FT-Transformer's uniform(-1/sqrt(d), 1/sqrt(d)) init
        self.num_weight = nn.Parameter(torch.empty(num_numeric, dim).uniform_(-bound, bound))
        self.num_bias = nn.Parameter(torch.empty(num_numeric, dim).uniform_(-bound, bound))
        self.num_missing = nn.Parameter(torch.empty(num_numeric, dim).uniform_(-bound, bound))
        # One table for all categorical columns; column j's slots start at offsets[j].
        self.cat_emb = nn.Embedding(max(sum(cardinalities), 1), dim)
        nn.init.uniform_(self.cat_emb.weight, -bound, bound)
        offsets = np.concatenate([[0], np.cumsum(cardinalities)[:-1]]).astype(np.int64) if cardinalities else np.zeros(0, np.int64)
        self.register_buffer("offsets", torch.as_tensor(offsets), persistent=False)
        with torch.no_grad():  # "unknown" starts neutral (bias only): a value never seen says nothing
            self.cat_emb.weight[self.offsets + UNKNOWN] = 0.0
        self.cat_bias = nn.Parameter(torch.empty(len(cardinalities), dim).uniform_(-bound, bound))
        self.cls = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(x_num).unsqueeze(-1)  # (B, Fn, 1)
        num = torch.where(missing, self.num_missing, torch.nan_to_num(x_num).unsqueeze(-1) * self.num_weight + self.num_bias)
        cat = self.cat_emb(x_cat + self.offsets) + self.cat_bias  # (B, Fc, D)
        return torch.cat([self.cls.expand(len(x_num), 1, -1), num, cat], 1)


class FTTransformer(nn.Module):
    """Feature tokens -> pre-norm transformer -> normalized tokens (B, 1 + F, D); token 0 is the row (CLS)."""

    def __init__(self, num_numeric: int, cardinalities: list[int], cfg: LearnedTableConfig):
        super().__init__()
        self.tokenizer = FeatureTokenizer(num_numeric, cardinalities, cfg.dim)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.num_heads, cfg.ffn_mult * cfg.dim, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.tokenizer(x_num, x_cat)))


class MaskedCellHead(nn.Module):
    """Masked-cell reconstruction from the feature tokens: regress numbers, classify categories (tied)."""

    def __init__(self, num_numeric: int, cardinalities: list[int], dim: int):
        super().__init__()
        self.num_weight = nn.Parameter(torch.zeros(num_numeric, dim))
        self.num_bias = nn.Parameter(torch.zeros(num_numeric))
        owner = np.repeat(np.arange(len(cardinalities)), cardinalities)  # column of every category slot
        self.register_buffer("slot_column", torch.as_tensor(owner, dtype=torch.long), persistent=False)

    def loss(
        self, tokens: torch.Tensor, mask: torch.Tensor, x_num: torch.Tensor, x_cat: torch.Tensor, backbone: FTTransformer
    ) -> torch.Tensor:
        """tokens (B, 1+F, D); mask (B, F) cells hidden from the input; x_num/x_cat the true cells."""
        fn = x_num.shape[1]
        num_mask = mask[:, :fn] & ~torch.isnan(x_num)  # a cell missing in truth teaches nothing
        pred = (tokens[:, 1 : 1 + fn] * self.num_weight).sum(-1) + self.num_bias  # (B, Fn)
        loss = F.mse_loss(pred[num_mask], x_num[num_mask]) if num_mask.any() else tokens.new_zeros(())
        cat_mask = mask[:, fn:] & (x_cat != MISSING)
        if cat_mask.any():
            rows, cols = cat_mask.nonzero(as_tuple=True)
            emb = backbone.tokenizer.cat_emb.weight  # (total slots, D), tied with the input embeddings
            logits = tokens[:, 1 + fn :][rows, cols] @ emb.T  # (M, total slots)
            logits = logits.masked_fill(self.slot_column[None, :] != cols[:, None], float("-inf"))  # own column only
            loss = loss + F.cross_entropy(logits, x_cat[rows, cols] + backbone.tokenizer.offsets[cols])
        return loss


class TableNetwork(nn.Module):
    """The FT-Transformer and its pretraining head, one module: what trains, what is saved
    ("backbone.*", "head.*"). Its forward is the pretraining loss of a batch."""

    def __init__(self, codec: FeatureCodec, label: LabelSpec, cfg: LearnedTableConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"LearnedTableConfig: dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
        self.objective, self.mask_prob = label.objective, cfg.mask_prob
        self.backbone = FTTransformer(len(codec.numeric), codec.cardinalities, cfg)
        self.head = (
            MaskedCellHead(len(codec.numeric), codec.cardinalities, cfg.dim)
            if label.objective == "masked"
            else nn.Linear(cfg.dim, label.outputs)
        )

    @property
    def cells(self) -> int:
        """Uniform draws per row that the masked objective needs (one per feature cell); 0 for a label."""
        return len(self.backbone.tokenizer.num_weight) + len(self.backbone.tokenizer.cat_bias) if self.objective == "masked" else 0

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor, y: torch.Tensor | None, draw: torch.Tensor | None) -> torch.Tensor:
        """The loss of a batch; `draw` (B, cells) uniform numbers decide the masked objective's hidden
        cells (drawn on the CPU by the caller: the same masks on any device)."""
        if self.objective == "masked":
            fn = x_num.shape[1]
            mask = draw.to(x_num.device) < self.mask_prob  # (B, F) cells hidden from the input
            tokens = self.backbone(x_num.masked_fill(mask[:, :fn], float("nan")), x_cat.masked_fill(mask[:, fn:], MISSING))
            return self.head.loss(tokens, mask, x_num, x_cat, self.backbone)
        out = self.head(self.backbone(x_num, x_cat)[:, 0])  # (B, outputs)
        if self.objective == "binary":
            return F.binary_cross_entropy_with_logits(out.squeeze(-1), y)
        if self.objective == "multiclass":
            return F.cross_entropy(out, y)
        return F.mse_loss(out.squeeze(-1), y)


@dataclass
class TrainingRows:
    """What `LearnedTableEncoder.prepare` hands to the training: the model inputs of every row, the
    targets (None: masked cells), the training and the held-out rows."""

    x_num: torch.Tensor
    x_cat: torch.Tensor
    y: torch.Tensor | None
    train: np.ndarray
    valid: np.ndarray


class LearnedTableEncoder(TableEncoder):
    """Encodes with a trained network; the training itself is `gts_lum.training.table_encoder`'s (on the
    one training loop, which sits above this package): fit it with
    `training.table_encoder.fit_table_encoder(encoder, frame, labels)`, or load a saved one."""

    kind = "learned"

    def __init__(self, cfg: TableEncoderConfig):
        super().__init__(cfg)
        self.codec: FeatureCodec | None = None
        self.label: LabelSpec | None = None
        self.network: TableNetwork | None = None
        self.trained = False
        self.history: list[dict] = []  # per epoch: train and validation loss of the last fit

    @property
    def dim(self) -> int:
        return self.cfg.learned.dim

    def fit(self, frame: pd.DataFrame, labels=None) -> LearnedTableEncoder:
        raise RuntimeError(
            "LearnedTableEncoder trains on the training loop: fit it with "
            "gts_lum.training.table_encoder.fit_table_encoder(encoder, frame, labels)"
        )

    def prepare(self, frame: pd.DataFrame, labels: np.ndarray | pd.Series | list | None = None) -> TrainingRows:
        """Fit the columns, scalers, vocabularies and the label of `frame` (`labels`: one per row, in row
        order; None: the masked objective), build the untrained network from `cfg.learned.seed` (the global
        torch RNG is left as it was) and split the rows into training and held-out ones."""
        super().fit(frame)
        lc = self.cfg.learned
        if not 0.0 <= lc.valid_fraction < 1.0:
            raise ValueError(f"LearnedTableConfig.valid_fraction: {lc.valid_fraction} is not in [0, 1)")
        if labels is not None:
            labels = pd.Series(np.asarray(labels), name="label")
            if len(labels) != len(frame):
                raise ValueError(f"labels: {len(labels)} values for {len(frame)} rows")
        self.label = LabelSpec.fit(labels, lc.objective)
        self.codec = FeatureCodec.fit(frame, self.schema, lc)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lc.seed)
            self.network = TableNetwork(self.codec, self.label, lc)
        self.trained, self.history = False, []
        x_num, x_cat = self._inputs(frame)
        y = self.label.targets(labels) if labels is not None else None
        train, valid = holdout(len(frame), lc.valid_fraction, lc.seed, y if self.label.objective in ("binary", "multiclass") else None)
        return TrainingRows(x_num, x_cat, y, train, valid)

    def mark_trained(self, history: list[dict]) -> None:
        """The training is done: the network's weights are the ones to encode with."""
        self.network.eval()
        self.trained, self.history = True, history

    def _inputs(self, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        schema = self.fitted_schema()
        schema.check(frame)
        x_num, x_cat = self.codec.transform(frame, schema)
        return torch.as_tensor(x_num), torch.as_tensor(x_cat)

    def _trained(self) -> TableNetwork:
        if self.network is None or not self.trained:
            raise RuntimeError(
                "LearnedTableEncoder: not trained; call fit_table_encoder(encoder, frame[, labels]) "
                "(gts_lum.training.table_encoder) before encode/predict, or load a saved one"
            )
        return self.network

    @torch.inference_mode()
    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        return self._forward(frame, lambda tokens: tokens[:, 0])

    @torch.inference_mode()
    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """The pretraining head: P(label = 1) (N,) binary, class probabilities (N, C) multiclass, values (N,)."""
        if self.label is None or self.label.objective == "masked":
            raise RuntimeError("LearnedTableEncoder.predict needs an encoder fitted on labels")
        out = self._forward(frame, lambda tokens: self.network.head(tokens[:, 0]))
        if self.label.objective == "binary":
            return 1.0 / (1.0 + np.exp(-out[:, 0]))
        if self.label.objective == "multiclass":
            shifted = np.exp(out - out.max(1, keepdims=True))  # softmax, overflow-safe
            return shifted / shifted.sum(1, keepdims=True)
        return out[:, 0] * self.label.std + self.label.mean

    def _forward(self, frame: pd.DataFrame, read) -> np.ndarray:
        network = self._trained()
        network.eval()
        x_num, x_cat = self._inputs(frame)
        device = next(network.parameters()).device
        with intra_op_threads(self.cfg.learned.cpu_threads, device):
            parts = [
                read(network.backbone(x_num[s : s + ENCODE_BATCH].to(device), x_cat[s : s + ENCODE_BATCH].to(device))).float().cpu().numpy()
                for s in range(0, len(frame), ENCODE_BATCH)
            ]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def extra_state(self) -> dict:
        self._trained()
        return {"codec": dataclasses.asdict(self.codec), "label": dataclasses.asdict(self.label)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._trained().state_dict())  # "backbone.*", "head.*"

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.codec, self.label = FeatureCodec(**state["codec"]), LabelSpec(**state["label"])
        self.network = TableNetwork(self.codec, self.label, self.cfg.learned)
        self.network.load_state_dict(tensors)
        self.mark_trained([])


@contextmanager
def intra_op_threads(threads: int, device: torch.device):
    """Run with `threads` intra-op CPU threads (0: leave torch's setting), restored afterwards.

    The model is tiny (tens of tokens of width ~32): splitting its ops across threads costs more in
    synchronisation than it saves - 15x slower with 2 threads than with 1 on a busy 2-core machine.
    """
    if threads <= 0 or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
