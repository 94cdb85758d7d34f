"""Training of the task heads (`modeling.heads`) on frozen user embeddings, on `training.loop.train_loop`.

`fit_head` trains a head on FROZEN embeddings (a probe), which is how the label and uplift tasks are
evaluated (`training.label_tasks.evaluate_label_tasks`); `training.task_tokens.tune_task_token`
tunes a task token with a head through the frozen decoder. Both are `TrainingTask`s of the one loop
(AdamW, best epoch, early stop, checkpoints) with the `ProbeSettings` here: a constant rate, no
clipping, and the epoch with the lowest held-out loss kept (the loop keeps the highest validation
figure: they report minus the loss). Their held-out slice is `sequence.splits.holdout`, stratified
by class (uplift: by arm x outcome).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gts_lum.modeling.heads import LabelHead, UpliftHead
from gts_lum.sequence.splits import holdout
from gts_lum.training.loop import step_seed, train_loop, trainable

log = logging.getLogger(__name__)


@dataclass
class ProbeSettings:
    """`training.loop.LoopSettings` of a probe: AdamW at a constant rate, no clipping, selection on minus
    the held-out loss."""

    epochs: int
    lr: float
    weight_decay: float
    patience: int
    seed: int
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = None
    select_metric: str = "neg_loss"
    min_improvement: float = 1.0e-6  # a lower held-out loss by less than this is no better epoch
    checkpoint_every: int = 0
    time_budget_s: float | None = None
    min_lr_ratio: float = 0.0
    max_steps: int | None = None


class SeededOrders:
    """Each epoch's row order: the epoch-th draw of one generator seeded once, as the hand-written loops
    before `train_loop` drew them (so a seed gives the figures it gave then). Asking for an epoch other
    than the next (a resumed run) replays the draws before it: the order is a function of (seed, epoch)."""

    def __init__(self, rows: np.ndarray, new_generator: Callable[[], object], draw: Callable[[object, int], np.ndarray]):
        self.rows, self.new_generator, self.draw = rows, new_generator, draw
        self.generator, self.next_epoch = new_generator(), 0

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch < self.next_epoch:
            self.generator, self.next_epoch = self.new_generator(), 0
        for _ in range(self.next_epoch, epoch):
            self.draw(self.generator, len(self.rows))
        self.next_epoch = epoch + 1
        return self.rows[self.draw(self.generator, len(self.rows))]


def batches_of(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """`order` cut into batches of `batch_size` rows (0: one batch)."""
    step = batch_size or len(order)
    return [order[s : s + step] for s in range(0, len(order), step)]


def _as_tensor(values, dtype: torch.dtype, device: torch.device, what: str, n: int) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values).to(device, dtype)
    if tensor.shape != (n,):
        raise ValueError(f"fit_head: {what} must have shape ({n},) like the embeddings' rows, got {tuple(tensor.shape)}")
    return tensor


class HeadTask:
    """`fit_head`'s training as a `training.loop.TrainingTask`: the training rows in batches, minus the
    held-out loss as the validation figure (without held-out rows the epoch number: the last is kept)."""

    find_unused_parameters = False
    epoch_log_level = logging.DEBUG  # up to `epochs` (300) tiny epochs a head: fit_head logs one line a fit

    def __init__(self, head, x: torch.Tensor, y: torch.Tensor, treatment, train: np.ndarray, valid: np.ndarray, seed: int, batch_size: int):
        self.name, self.module = f"fit {type(head).__name__}", head
        self.x, self.y, self.treatment, self.valid, self.seed, self.batch_size = x, y, treatment, valid, seed, batch_size
        self.orders = SeededOrders(train, lambda: torch.Generator().manual_seed(seed), lambda g, n: torch.randperm(n, generator=g).numpy())
        self.epoch = 0

    def rows_loss(self, module: nn.Module, rows: np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(rows, device=self.x.device)
        return self.module.loss(module(self.x[idx]), self.y[idx], None if self.treatment is None else self.treatment[idx])

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        self.epoch = epoch
        return batches_of(self.orders(epoch), self.batch_size)

    def train_step(self, module: nn.Module, rows: np.ndarray, epoch: int, step: int, rank: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(step_seed(self.seed, epoch, step, rank))  # dropout of an MLP head
        return {"loss": self.rows_loss(module, rows), "cases": torch.tensor(float(len(rows)))}

    def param_groups(self) -> list[dict]:
        return trainable(self.module)

    def validate(self) -> float:
        if not len(self.valid):
            return float(self.epoch)
        self.module.eval()
        with torch.no_grad():
            return -self.rows_loss(self.module, self.valid).item()

    def weights_changed(self) -> None:
        pass


def fit_head(
    head: LabelHead | UpliftHead,
    embeddings: torch.Tensor,
    y,
    treatment=None,
    epochs: int = 300,
    lr: float = 1.0e-2,
    weight_decay: float = 1.0e-2,
    seed: int = 0,
    valid_fraction: float = 0.2,
    batch_size: int = 0,
    patience: int = 30,
    standardize: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> dict:
    """Train `head` on frozen `embeddings` (N, D) with AdamW; returns stats.

    `y`: (N,) 0/1 labels or class indices; `treatment`: (N,) 0/1, required for an UpliftHead. A stratified
    `valid_fraction` of the rows is held out and the weights of the epoch with the lowest held-out loss
    are kept (early stopping after `patience` epochs without a new best); without held-out rows every
    epoch trains and the last is kept. The head is re-initialized from `seed`, and its dropout and batch
    order use `seed` too, so equal inputs give equal heads (the global torch RNG is left as it was). Runs
    on the embeddings' device. `checkpoint_dir`: the loop's checkpoints, a rerun resumes there.
    """
    started = time.perf_counter()
    if embeddings.dim() != 2:
        raise ValueError(f"fit_head: embeddings must be (N, D), got {tuple(embeddings.shape)}")
    if epochs < 1:
        raise ValueError(f"fit_head: epochs must be >= 1, got {epochs}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"fit_head: valid_fraction {valid_fraction} is not in [0, 1)")
    device, n = embeddings.device, len(embeddings)
    x = embeddings.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError(f"fit_head: embeddings hold non-finite values (first bad row {int((~torch.isfinite(x).all(1)).nonzero()[0])})")
    y = _as_tensor(y, torch.float32, device, "y", n)
    head.check_targets(y)
    if isinstance(head, UpliftHead):
        if treatment is None:
            raise ValueError("fit_head: an UpliftHead needs treatment (0/1 per row)")
        treatment = _as_tensor(treatment, torch.float32, device, "treatment", n)
        if not torch.isin(treatment, torch.tensor([0.0, 1.0], device=device)).all():
            raise ValueError("fit_head: treatment must be 0/1")
    train, valid = holdout(n, valid_fraction, seed, head.stratum(y, treatment).cpu().numpy())
    if not len(train):
        raise ValueError(f"fit_head: no training rows left from {n} rows with valid_fraction={valid_fraction}")
    head.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for module in head.modules():
            if module is not head and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        train_rows = torch.as_tensor(train, device=device)
        if standardize:
            head.set_input_stats(x[train_rows])
        if isinstance(head, UpliftHead):
            head.propensity.fill_(float(treatment[train_rows].mean()))
        task = HeadTask(head, x, y, treatment, train, valid, seed, batch_size)
        settings = ProbeSettings(epochs=epochs, lr=lr, weight_decay=weight_decay, patience=patience, seed=seed)
        run = train_loop(task, settings, checkpoint_dir, device=device)
    stats = {
        "epochs_run": run["epochs"],
        "best_epoch": run["best_epoch"],
        "train_loss": run["history"][-1]["loss"],
        "valid_loss": -run["valid_neg_loss"] if len(valid) else float("nan"),
        "n_train": int(len(train)),
        "n_valid": int(len(valid)),
        "seconds": time.perf_counter() - started,
    }
    log.info(
        "%s: %d train / %d held-out rows, %d epochs (best %d), held-out loss %.4f",
        type(head).__name__,
        stats["n_train"],
        stats["n_valid"],
        stats["epochs_run"],
        stats["best_epoch"],
        stats["valid_loss"],
    )
    return stats
