"""Training of the ID-based sequence models (SASRec, HSTU, HLLM): next-behaviour prediction with sampled softmax.

A model is a `SequenceEncoder` (`modeling.sequence_encoder`) plus its recommender
(`recommenders.sequential.SequentialRecommender`), which builds the encoder and scores with it. This
module owns the training:

- training windows cut from the CSR `split.train` so that every training transition is a target once;
- the loss: sampled softmax / InfoNCE over shared uniform negatives and/or in-batch negatives, with the
  logQ correction (log of each item's expected count among the sampled negatives) and accidental hits
  (a negative equal to the positive) masked out;
- `SequentialTask`, the model's training for `training.loop.train_loop`, shared with GTS-LUM's phase II
  (AdamW, the learning-rate schedule, validation on `split.valid` every epoch, early stopping with the
  best weights, atomic checkpoints with exact resume, data parallel under torchrun); deterministic
  given `seed`.

Behaviour index b is token b + 1; token 0 is padding. Sequences are left-padded, so the most recent
event is always the last column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gts_lum.data.events import EventLog, ragged_arange
from gts_lum.evaluation.protocol import EvalConfig, evaluate, validation_metric
from gts_lum.modeling.sequence_encoder import PAD
from gts_lum.sequence.splits import Split
from gts_lum.training.loop import check_schedule, epoch_rng, step_seed, trainable

log = logging.getLogger(__name__)


@dataclass
class SequentialTrainConfig:
    max_len: int = 200  # events per training window and per scored history (most recent kept)
    batch_size: int = 64  # windows per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 100
    patience: int = 5  # epochs without a better validation metric before stopping
    # Windows trained per epoch: a fresh seeded sample each epoch (None: every window, every epoch).
    # Bounds an epoch on large logs, where validating more often beats one pass over everything.
    windows_per_epoch: int | None = None
    # full_softmax: every behaviour of the catalog is a negative (exact cross-entropy). Affordable for
    # catalogs up to ~10^5 on CPU and the strongest objective there (Klenitskiy & Vasilev 2023); the
    # sampled settings below are then ignored.
    full_softmax: bool = False
    num_negatives: int = 256  # uniform negatives shared by every position of a batch
    in_batch_negatives: int = 0  # negatives drawn from the batch's targets (popularity-distributed)
    temperature: float = 1.0
    l2_norm: bool = False  # cosine similarity between hidden states and item embeddings
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"  # see gts_lum.device.select_device
    amp: bool = True  # autocast in the device's amp dtype (bf16 on NPU/CUDA; never on CPU)
    select_metric: str = "NDCG@10"
    lr_schedule: str = "constant"  # constant | cosine, after `warmup_steps` of linear warm-up (training.loop)
    warmup_steps: int = 0
    checkpoint_every: int = 0  # steps between checkpoints (0: at epoch ends only, when a folder is given)
    # training wall time (s) to plan the epochs by after the first one (training.loop); None: `epochs`
    time_budget_s: float | None = None
    min_lr_ratio: float = 0.0  # the cosine schedule ends at min_lr_ratio x lr
    max_steps: int | None = None  # stop after this many steps in all (training.loop); None: `epochs`

    def __post_init__(self) -> None:
        check_schedule(self, "SequentialTrainConfig")


def left_padded(log_: EventLog, starts: np.ndarray, ends: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Events `starts[i]:ends[i]` of the flat log as rows of `width` columns, right-aligned.

    Returns tokens (B, width) int64 (behaviour + 1, PAD before the first event) and timestamps
    (B, width) int64 (0 under padding). Rows longer than `width` keep their last `width` events.
    """
    starts = np.maximum(np.asarray(starts, np.int64), np.asarray(ends, np.int64) - width)
    lengths = np.asarray(ends, np.int64) - starts
    rows = np.repeat(np.arange(len(starts)), lengths)
    cols = ragged_arange(width - lengths, lengths)
    idx = ragged_arange(starts, lengths)
    items = np.zeros((len(starts), width), np.int64)
    times = np.zeros((len(starts), width), np.int64)
    items[rows, cols] = log_.behavior[idx].astype(np.int64) + 1
    times[rows, cols] = log_.timestamp[idx]
    return items, times


def training_windows(log_: EventLog, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of windows covering every within-user transition exactly once.

    A window holds up to max_len inputs and their next events: rows `s:e` of the log with e - s <= max_len + 1.
    Windows are cut backwards from each user's last event, so short users give one window and the
    most recent events of long users keep their full context.
    """
    a, b = log_.offsets[:-1], log_.offsets[1:]
    transitions = np.maximum(b - a - 1, 0)
    per_user = -(-transitions // max_len)  # ceil
    user = np.repeat(np.arange(log_.num_users), per_user)
    k = ragged_arange(np.zeros(len(per_user), np.int64), per_user)
    ends = b[user] - k * max_len  # exclusive; the last target of the window
    starts = np.maximum(a[user], ends - 1 - max_len)
    return starts, ends


def sampled_softmax_loss(
    hidden: torch.Tensor,  # (P, D) states at positions with a target
    positives: torch.Tensor,  # (P,) target tokens
    negatives: torch.Tensor,  # (N,) sampled tokens, shared by all positions
    table: torch.Tensor,  # (V, D) output embeddings (already normalized if cosine)
    log_q: torch.Tensor | None,  # (V,) log expected count of each token among the N negatives
    temperature: float,
) -> torch.Tensor:
    """Mean cross-entropy of the positive against the sampled negatives (InfoNCE).

    With `log_q`, every logit is corrected by the log expected count of its item among the samples
    (Bengio & Senecal 2008; Yi et al. 2019), which removes the bias towards popular items that
    in-batch negatives otherwise cause. A negative equal to the positive is masked: it is no negative.
    """
    pos_logit = (hidden * table[positives]).sum(-1, keepdim=True) / temperature  # (P, 1)
    neg_logit = hidden @ table[negatives].T / temperature  # (P, N)
    if log_q is not None:
        pos_logit = pos_logit - log_q[positives].unsqueeze(1)
        neg_logit = neg_logit - log_q[negatives].unsqueeze(0)
    neg_logit = neg_logit.masked_fill(negatives.unsqueeze(0) == positives.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1).float()
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class SequentialTask:
    """A `recommenders.sequential.SequentialRecommender`'s training as a `training.loop.TrainingTask`: every window of the
    training log once an epoch (or a seeded `windows_per_epoch` of them), next event at every position."""

    find_unused_parameters = False

    def __init__(self, model, split: Split, eval_cfg: EvalConfig | None, candidates: np.ndarray | None):
        tc = model.train_cfg
        self.name, self.model, self.module, self.cfg = model.name, model, model.encoder, tc
        self.split, self.eval_cfg, self.candidates = split, eval_cfg, candidates
        self.num_tokens = split.train.num_behaviors + 1
        self.log_q = model._log_q(split.train, self.num_tokens)
        self.starts, self.ends = training_windows(split.train, tc.max_len)
        if len(self.starts) == 0:
            raise ValueError("split.train has no user with two or more events: nothing to learn a next event from")
        log.info("%s: %d training windows", model.name, len(self.starts))

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        order = epoch_rng(self.cfg.seed, epoch).permutation(len(self.starts))[: self.cfg.windows_per_epoch]
        return [order[lo : lo + self.cfg.batch_size] for lo in range(0, len(order), self.cfg.batch_size)]

    def train_step(self, module: nn.Module, idx: np.ndarray, epoch: int, step: int, rank: int) -> dict[str, torch.Tensor]:
        seed = step_seed(self.cfg.seed, epoch, step, rank)
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator().manual_seed(seed)  # negatives
        model, device = self.model, self.model.device
        tokens, times = left_padded(self.split.train, self.starts[idx], self.ends[idx], self.cfg.max_len + 1)
        loss = model._step_loss(
            module, torch.from_numpy(tokens).to(device), torch.from_numpy(times).to(device), self.num_tokens, self.log_q, gen
        )
        return {"loss": loss, "cases": torch.tensor(float(len(idx))), "positions": torch.tensor(float((tokens[:, :-1] != PAD).sum()))}

    def validate(self) -> float:
        metrics = evaluate(self.model, self.split.log, self.split.valid, self.candidates, self.eval_cfg, desc=f"{self.name} valid")
        return validation_metric(metrics, self.cfg.select_metric)

    def weights_changed(self) -> None:
        self.model._weights_changed()

    def param_groups(self) -> list[dict]:
        return trainable(self.module)
