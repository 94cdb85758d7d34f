"""Task heads on a user embedding: labels (binary / multi-class) and a marketing-intervention (uplift) head.

The GTS-LUM decoder gives one user embedding (its last hidden state, with the task's TASK token in
front for label tasks). The heads here read that vector and nothing else, so they work with any user
embedding: `training.heads.fit_head` trains a head on FROZEN embeddings (a probe), which is how the
label and uplift tasks are evaluated (gts_lum.training.label_tasks.evaluate_label_tasks). This module holds
the heads and their configs only; their training is in `training.heads` and `training.task_tokens`.

- `LabelHead`: 1 logit (binary, BCE) or C logits (multi-class, cross-entropy).
- `UpliftHead`: two outcome logits, control and treated; each user's loss is the BCE of the arm the
  user actually received (the other arm's outcome is never observed), and
  uplift(x) = sigmoid(l_treated) - sigmoid(l_control). Optionally a transformed-outcome term pulls the
  uplift itself towards Z = y * (t / e - (1 - t) / (1 - e)) (e = share treated), whose expectation given
  x is the true uplift under randomization: a direct signal on the difference, which the two arm
  losses only fit indirectly. Z is noisy (values -1/(1-e), 0, 1/e), so keep its weight small.

Config: `HeadsConfig`, loaded with load_config(HeadsConfig, "pkg:heads/default.yaml").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("binary", "multiclass", "uplift")


# What a head predicts; `gts_lum.evaluation.labels.discover_tasks` reads the tasks from a data set's labels.
@dataclass(frozen=True)
class LabelTask:
    name: str
    kind: str  # binary | multiclass | uplift
    num_classes: int = 2  # uplift tasks: of the outcome
    classes: tuple[float, ...] = (0.0, 1.0)  # label value of each class index

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"LabelTask {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"LabelTask {self.name!r}: {self.num_classes} classes but {len(self.classes)} class values")


@dataclass
class HeadTrainConfig:
    """How `training.heads.fit_head` trains a head on frozen embeddings (its keyword arguments)."""

    epochs: int = 300
    lr: float = 1.0e-2
    weight_decay: float = 1.0e-2
    batch_size: int = 0  # 0: full batch
    valid_fraction: float = 0.2  # held out (stratified) for early stopping; 0: train every epoch, keep the last
    patience: int = 30  # epochs without a lower held-out loss before stopping
    standardize: bool = True  # scale every embedding dimension by its training mean / std (kept in the head)


@dataclass
class TaskTokenConfig:
    """How `training.task_tokens.tune_task_token` tunes a GTS-LUM task token (before the head is fitted)."""

    epochs: int = 8  # passes over the training users (one decoder forward + backward per user)
    lr: float = 1.0e-2  # the token and a temporary head
    batch_size: int = 64
    valid_fraction: float = 0.2  # held out (stratified); the token of the epoch with the lowest held-out loss is kept
    seed: int = 0


@dataclass
class HeadsConfig:
    mlp_hidden: int = 0  # 0: linear head; > 0: one hidden layer (GELU, dropout) of this width
    dropout: float = 0.1  # MLP only
    transformed_outcome_weight: float = 0.0  # UpliftHead: weight of the transformed-outcome term; 0 = off
    max_classes: int = 20  # integer labels with up to this many distinct values are multi-class
    test_fraction: float = 0.3  # users held out to report on (evaluate_label_tasks)
    # GTS-LUM: heads are fitted on the decoder state, on the history summary (mean b^F over the whole history:
    # the decoder reads the last token_budget tokens only) and on both; each task keeps the input with the
    # lowest held-out loss (BENCHMARKS.md "Label tasks"). false: the state only
    history_summary: bool = True
    # GTS-LUM: the user's profile row (the table encoder's embedding of the users table) as a head input too,
    # alone and beside the summary (a model with a profile table only)
    profile: bool = True
    # folds of the training users whose mean held-out loss chooses each task's input (above); 1: the head's
    # own held-out slice (train.valid_fraction) chooses
    select_folds: int = 5
    train: HeadTrainConfig = field(default_factory=HeadTrainConfig)
    task_token: TaskTokenConfig = field(default_factory=TaskTokenConfig)  # GTS-LUM only

    def __post_init__(self) -> None:
        checks = {
            "mlp_hidden": self.mlp_hidden >= 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "transformed_outcome_weight": self.transformed_outcome_weight >= 0.0,
            "max_classes": self.max_classes >= 2,
            "test_fraction": 0.0 < self.test_fraction < 1.0,
            "select_folds": self.select_folds >= 1,
            "train.epochs": self.train.epochs >= 1,
            "train.lr": self.train.lr > 0.0,
            "train.batch_size": self.train.batch_size >= 0,
            "train.valid_fraction": 0.0 <= self.train.valid_fraction < 1.0,
            "train.patience": self.train.patience >= 1,
            "task_token.epochs": self.task_token.epochs >= 1,
            "task_token.batch_size": self.task_token.batch_size >= 1,
            "task_token.valid_fraction": 0.0 <= self.task_token.valid_fraction < 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"HeadsConfig: invalid value for {bad}: {self}")


def _check_values(y: torch.Tensor, num_classes: int, head: str) -> None:
    bad = (y != y.round()) | (y < 0) | (y >= num_classes)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"fit_head: {head} needs labels in 0..{num_classes - 1}; row {row} holds {y[row].item()!r}")


class _Head(nn.Module):
    """Input scaling (buffers, so a saved head scales raw embeddings itself) + linear or one-hidden-layer MLP."""

    def __init__(self, hidden_size: int, out_features: int, mlp_hidden: int = 0, dropout: float = 0.1):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"head: hidden_size must be >= 1, got {hidden_size}")
        self.register_buffer("input_mean", torch.zeros(hidden_size))
        self.register_buffer("input_std", torch.ones(hidden_size))
        if mlp_hidden:
            self.net = nn.Sequential(
                nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_hidden, out_features)
            )
        else:
            self.net = nn.Linear(hidden_size, out_features)

    def set_input_stats(self, embeddings: torch.Tensor) -> None:
        """Standardize inputs with the mean / std of `embeddings` (N, D); constant dimensions are left unscaled."""
        std = embeddings.std(0, unbiased=False)
        self.input_mean.copy_(embeddings.mean(0))
        self.input_std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if emb.dim() != 2 or emb.shape[1] != self.input_mean.shape[0]:
            raise ValueError(f"{type(self).__name__}: expected embeddings (N, {self.input_mean.shape[0]}), got {tuple(emb.shape)}")
        return self.net((emb.to(self.input_mean.dtype) - self.input_mean) / self.input_std)

    def check_targets(self, y: torch.Tensor) -> None:
        """0/1 labels; LabelHead widens this to class indices for multi-class tasks."""
        _check_values(y, 2, type(self).__name__)

    def stratum(self, y: torch.Tensor, treatment: torch.Tensor | None) -> torch.Tensor:
        """(N,) group of each row for the stratified held-out slice."""
        return y.long()


class LabelHead(_Head):
    """User embedding (N, D) -> 1 logit (binary task) or C logits (multi-class task)."""

    def __init__(self, hidden_size: int, task: LabelTask, mlp_hidden: int = 0, dropout: float = 0.1):
        if task.kind not in ("binary", "multiclass"):
            raise ValueError(f"LabelHead: task {task.name!r} is of kind {task.kind!r}; use UpliftHead for uplift tasks")
        if task.kind == "multiclass" and task.num_classes < 2:
            raise ValueError(f"LabelHead: task {task.name!r} has {task.num_classes} class(es); at least 2 are needed")
        super().__init__(hidden_size, 1 if task.kind == "binary" else task.num_classes, mlp_hidden, dropout)
        self.kind, self.num_classes = task.kind, task.num_classes

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(N,) logits (binary) or (N, C) logits (multi-class)."""
        logits = super().forward(emb)
        return logits[:, 0] if self.kind == "binary" else logits

    def check_targets(self, y: torch.Tensor) -> None:
        _check_values(y, 2 if self.kind == "binary" else self.num_classes, f"LabelHead ({self.kind})")

    def loss(self, logits: torch.Tensor, y: torch.Tensor, treatment: torch.Tensor | None = None) -> torch.Tensor:
        """BCE on 0/1 labels or cross-entropy on class indices 0..C-1."""
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
        return F.cross_entropy(logits, y.long())

    @torch.no_grad()
    def predict_proba(self, emb: torch.Tensor) -> torch.Tensor:
        """(N,) P(y = 1) (binary) or (N, C) class probabilities (multi-class)."""
        self.eval()
        logits = self(emb)
        return torch.sigmoid(logits) if self.kind == "binary" else torch.softmax(logits, -1)


class UpliftHead(_Head):
    """User embedding (N, D) -> (N, 2) outcome logits [control, treated]; see the module docstring."""

    def __init__(self, hidden_size: int, mlp_hidden: int = 0, dropout: float = 0.1, transformed_outcome_weight: float = 0.0):
        super().__init__(hidden_size, 2, mlp_hidden, dropout)
        self.transformed_outcome_weight = transformed_outcome_weight
        self.register_buffer("propensity", torch.tensor(0.5))  # share treated, set by training.heads.fit_head from the training rows

    def loss(self, logits: torch.Tensor, y: torch.Tensor, treatment: torch.Tensor | None = None) -> torch.Tensor:
        """BCE of the received arm's logit, plus the optional transformed-outcome term."""
        if treatment is None:
            raise ValueError("UpliftHead.loss: treatment (0/1 per user) is required")
        y, t = y.to(logits.dtype), treatment.to(logits.dtype)
        received = logits.gather(1, t.long()[:, None])[:, 0]
        loss = F.binary_cross_entropy_with_logits(received, y)
        if self.transformed_outcome_weight > 0:
            e = self.propensity.clamp(1e-3, 1 - 1e-3)
            z = y * (t / e - (1 - t) / (1 - e))
            uplift = torch.sigmoid(logits[:, 1]) - torch.sigmoid(logits[:, 0])
            loss = loss + self.transformed_outcome_weight * F.mse_loss(uplift, z)
        return loss

    def stratum(self, y: torch.Tensor, treatment: torch.Tensor | None) -> torch.Tensor:
        return 2 * treatment.long() + y.long()

    @torch.no_grad()
    def predict_proba(self, emb: torch.Tensor) -> torch.Tensor:
        """(N, 2) outcome probabilities [if control, if treated]."""
        self.eval()
        return torch.sigmoid(self(emb))

    def uplift(self, emb: torch.Tensor) -> torch.Tensor:
        """(N,) P(y | treated) - P(y | control)."""
        p = self.predict_proba(emb)
        return p[:, 1] - p[:, 0]


def build_head(task: LabelTask, hidden_size: int, cfg: HeadsConfig) -> LabelHead | UpliftHead:
    """The head `cfg` describes for `task` (uplift tasks get an UpliftHead)."""
    if task.kind == "uplift":
        return UpliftHead(hidden_size, cfg.mlp_hidden, cfg.dropout, cfg.transformed_outcome_weight)
    return LabelHead(hidden_size, task, cfg.mlp_hidden, cfg.dropout)
