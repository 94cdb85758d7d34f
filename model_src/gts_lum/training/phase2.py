"""Phase II (paper section 3.3): the target-aware decoder trained on next-behaviour prediction.

Every epoch trains every transition of every training sequence once (`training_windows`): windows
cut from each user's end under the token budget, each trained at every position (the case's own
positive from the last state, each kept behaviour's next event from the states inside). The windows'
token sequences are built once per fit; each epoch batches windows of similar length together in a
seeded order (`bucketed_batches`), so a step pads to its own longest window, not to the budget.

Loss: `GTSLUMNetwork.forward` (target-agnostic InfoNCE with in-batch + sampled negatives, logQ-corrected, then
target-aware InfoNCE over the positive and k negatives from the agnostic top `hard_negative_pool`, for
the cases whose positive made that list), AdamW, gradient clipping.

The loop (`training.loop.train_loop`, shared with the sequential baselines) does the rest: AdamW,
the learning-rate schedule, clipping, validation and the best epoch, atomic checkpoints with exact
resume, data parallel under torchrun. Each step seeds torch (dropout) and its negative sampler from
(seed, epoch, step), the epoch's batches come from (seed, epoch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from gts_lum.data.events import EventLog
from gts_lum.modeling.gts_lum_model import Phase2Objective
from gts_lum.sequence.splits import EvalSet
from gts_lum.sequence.tokens import TokenKind, TokenSequences
from gts_lum.training.loop import check_schedule, epoch_rng, trainable

log = logging.getLogger(__name__)


@dataclass
class Phase2Config:
    batch_size: int = 32  # cases per optimizer step (per process under DDP)
    lr: float = 1e-3
    # "constant", or "cosine": from lr down to 0 over the whole budget (epochs x steps an epoch). Either
    # starts with `warmup_steps` of linear warm-up. The rate is a function of the step alone, so resume
    # needs no state.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    epochs: int = 10
    patience: int = 3
    max_cases_per_epoch: int | None = None  # a seeded cap on an epoch's windows (None: all; see the module docstring)
    # uniform negatives over the target behaviours, shared by a batch (plus the in-batch targets); None:
    # every target behaviour, a full softmax over the target catalog (cheap while the adapter is frozen:
    # one projection of the catalog's cached b^F per step)
    sampled_negatives: int | None = 256
    # Correct the sampled agnostic softmax for how often each behaviour is among a step's candidates
    # (logQ, as in sampling-bias-corrected retrieval): the in-batch targets are drawn by popularity, so
    # uncorrected, a popular behaviour is a negative at nearly every step and a rare one almost never,
    # and the model learns to rank rare behaviours too high. No effect with the full softmax (None above).
    logq_correction: bool = True
    # in-batch negatives: None, every prefix's target in the step is a column for every prefix (a (P, P)
    # product: a batch of long windows costs the square of its prefixes); N, N of those targets drawn
    # at random (by popularity, logQ-corrected like the uniform ones) with each prefix's own positive
    # scored beside them: a step's loss is linear in its prefixes, as the sequential baselines' is
    in_batch_negatives: int | None = None
    # What phase II learns to predict where the split ranks a subset of behaviours (e.g. the next OTT
    # service): "split", only next events in that subset (negatives from it too); "all", every next event
    # against every behaviour, as the sequential baselines train (far more positions per window; the
    # ranking still scores the subset only)
    targets: str = "split"
    hard_negatives: int = 4  # target-aware negatives per case (each one decoder pass)
    hard_negative_pool: int | None = None  # they come from the agnostic top-N (None: the model's re-ranking depth)
    agnostic_weight: float = 1.0
    aware_weight: float = 1.0
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on NPU/CUDA only (gts_lum.device)
    select_metric: str = "NDCG@10"
    valid_cases: int | None = 500  # fixed seeded sample of validation cases scored each epoch
    # The last N training events of each validated user leave phase II (`splits.hold_out_for_validation`):
    # a validation history then ends, as a test history does, with an event the model never trained on,
    # and N - 1 of them become validation cases too, up to N cases a user (0: off)
    valid_holdout_events: int = 0
    checkpoint_every: int = 0  # steps between checkpoints (0: at epoch ends only, when a folder is given)
    # training wall time (s) to plan the epochs by after the first one (training.loop); None: `epochs`
    time_budget_s: float | None = None
    min_lr_ratio: float = 0.0  # the cosine schedule ends at min_lr_ratio x lr
    max_steps: int | None = None  # stop after this many steps in all (training.loop); None: `epochs`

    def __post_init__(self) -> None:
        check_schedule(self, "Phase2Config")
        if self.targets not in ("split", "all"):
            raise ValueError(f"Phase2Config.targets {self.targets!r}: use 'split' or 'all'")
        if self.valid_holdout_events < 0:
            raise ValueError(f"Phase2Config.valid_holdout_events must be >= 0, got {self.valid_holdout_events}")
        if self.in_batch_negatives is not None and self.in_batch_negatives < 1:
            raise ValueError(f"Phase2Config.in_batch_negatives must be >= 1 or null, got {self.in_batch_negatives}")


def training_windows(train: EventLog, build, targets: np.ndarray | None = None) -> tuple[EvalSet, TokenSequences]:
    """Cases that train every transition of the training log once: windows cut from each user's end.

    A window is a case (history `start:e`, positive = event `e`): its token sequence, built by
    `build(log, cases)` (the timestamp process under the token budget), trains the positive from the
    last state and each kept behaviour's next event from the states inside (`SequenceBatch.next_event`).
    The first window of a user ends at its last training event; the next one ends at the first event the
    budget kept in it, and so on back to the user's second event, so each transition is the target of
    exactly one position (events the interval cap or the dedup dropped are trained as targets, never as
    inputs). Windows depend on the log and the sequence settings alone: built once per fit, not per epoch.
    A positive outside `targets` is marked -1 (its window still trains the allowed inner targets).
    """
    allowed = None
    if targets is not None:
        allowed = np.zeros(train.num_behaviors, bool)
        allowed[np.asarray(targets, np.int64)] = True
    start = train.offsets[:-1].astype(np.int64)
    ends = train.offsets[1:].astype(np.int64) - 1
    users = np.arange(train.num_users, dtype=np.int64)
    cases, parts = [], []
    active = ends > start
    while active.any():
        u, e = users[active], ends[active]
        target = train.behavior[e].astype(np.int32)
        if allowed is not None:
            target = np.where(allowed[target], target, -1).astype(np.int32)
        window = EvalSet(u, e, target, train.timestamp[e])
        tokens = build(train, window)
        case_of = np.repeat(np.arange(len(window)), tokens.lengths())
        is_b = tokens.kind == TokenKind.BEHAVIOR
        first_kept = e.copy()
        np.minimum.at(first_kept, case_of[is_b], tokens.source_row[is_b])
        cases.append(window)
        parts.append(tokens)
        ends[active] = np.minimum(first_kept, e - 1)  # always moves back, even when nothing was kept
        active = ends > start
    if not cases:
        raise ValueError("the training log has no user with two or more events: nothing to learn a next event from")
    out = EvalSet(*(np.concatenate([getattr(c, f.name) for c in cases]) for f in fields(EvalSet)))
    return out, TokenSequences.concat(parts) if len(parts) > 1 else parts[0]


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """Batches of cases of similar token length, in a seeded random order.

    Cases are sorted by length (ties broken at random, so batches differ between epochs) and cut into
    batches of `batch_size`: a batch pads to its own longest case, so almost no compute goes to padding.
    """
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class Phase2Task:
    """Phase II as a `training.loop.TrainingTask`: trains `model.net` (a `GTSLUMNetwork`) of a `GTSLUM`."""

    name = "phase II"
    find_unused_parameters = True  # the target-aware term skips steps where no case qualifies

    def __init__(self, model, split, targets: np.ndarray | None, valid_fn):
        cfg, device = model.cfg.train, model.device
        self.model, self.cfg, self.train, self.valid_fn = model, cfg, split.train, valid_fn
        self.module = model.net
        num_behaviors = self.train.num_behaviors
        # negatives come from the behaviours that can be targets: an off-target negative is an easy
        # one (a shortcut: "is it a target type?"), never a competitor at scoring time
        self.pool = np.arange(num_behaviors, dtype=np.int64) if targets is None else np.unique(np.asarray(targets, np.int64))
        self.every_target = torch.as_tensor(self.pool, device=device) if cfg.sampled_negatives is None else None  # full softmax
        self.frequency = None  # each target behaviour's share of the training targets, for the logQ correction
        if cfg.sampled_negatives is not None and cfg.logq_correction:
            in_pool = np.zeros(num_behaviors, dtype=bool)
            in_pool[self.pool] = True
            counts = np.where(in_pool, np.bincount(self.train.behavior, minlength=num_behaviors), 0).astype(np.float64)
            self.frequency = torch.as_tensor(counts / max(counts.sum(), 1.0), dtype=torch.float32, device=device)
        # the target-aware term trains on the lists re-ranking will see: the model's re-ranking depth
        self.list_size = cfg.hard_negative_pool or max(getattr(model.cfg, "rerank_depth", 0), 2 * cfg.hard_negatives, 10)
        self.allowed = None
        if targets is not None:
            self.allowed = torch.zeros(num_behaviors, dtype=torch.bool, device=device)
            self.allowed[torch.as_tensor(np.asarray(targets, np.int64), device=device)] = True
        self.objective = Phase2Objective(
            hard_negatives=cfg.hard_negatives,
            agnostic_weight=cfg.agnostic_weight,
            aware_weight=cfg.aware_weight,
            allowed_targets=self.allowed,
            hard_negative_pool=self.list_size,
            target_frequency=self.frequency,
            pool_size=len(self.pool),
            in_batch_negatives=cfg.in_batch_negatives,
        )
        self.windows, self.tokens = training_windows(self.train, model.sequences, targets)
        self.lengths = self.tokens.lengths()
        log.info(
            "phase II: %d windows cover %d transitions (%.1f tokens a window on average)",
            len(self.windows),
            int(np.maximum(np.diff(self.train.offsets) - 1, 0).sum()),
            float(self.lengths.mean()),
        )

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        cfg = self.cfg
        picked = epoch_rng(cfg.seed, epoch).permutation(len(self.windows))[: cfg.max_cases_per_epoch]
        return [picked[b] for b in bucketed_batches(self.lengths[picked], cfg.batch_size, cfg.seed * 7919 + epoch)]

    def train_step(self, module: nn.Module, idx: np.ndarray, epoch: int, step: int, rank: int) -> dict[str, torch.Tensor]:
        cfg, model, device = self.cfg, self.model, self.model.device
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 10_007 + step)
        gen = np.random.default_rng([cfg.seed, epoch, step, rank])
        batch = model.batch(self.tokens.subset(idx), self.train, self.windows.history_end[idx])
        positives = torch.as_tensor(self.windows.target[idx].astype(np.int64), device=device)
        if self.every_target is not None:
            sampled = self.every_target
        else:
            sampled = torch.as_tensor(self.pool[gen.integers(0, len(self.pool), cfg.sampled_negatives)], device=device)
        with model.autocast():
            out = module(batch, positives, sampled, self.objective)
        out["positions"] = out.pop("prefixes")
        out["cases"] = torch.tensor(float(len(idx)))
        return out

    def validate(self) -> float:
        return self.valid_fn()

    def weights_changed(self) -> None:
        """The network reads its weights live; nothing is cached across updates while training."""

    def param_groups(self) -> list[dict]:
        return trainable(self.module)
