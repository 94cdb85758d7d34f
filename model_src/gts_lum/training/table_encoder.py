"""Training of the `learned` table encoder (`encoders.table_learned`: an FT-Transformer pretrained on a
label or by masked-cell reconstruction) on `training.loop.train_loop`, like every other network here:
AdamW at a constant rate with clipping, the epoch with the lowest held-out loss kept, early stop after
`patience` epochs without one, checkpoints and an exact resume (`checkpoint_dir`).

    from gts_lum.training.table_encoder import fit_table_encoder
    enc = fit_table_encoder(build_table_encoder(cfg), frame, labels)   # any kind; labels=None: masked cells

The random draws are the ones the encoder's own loop drew before it moved here (`TableDraws`: one
generator for the row orders and the masked cells, replayed on a resume); only dropout is seeded per
step, from (seed, epoch, step), so that a resumed fit equals an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from gts_lum.device import select_device
from gts_lum.encoders.table_base import TableEncoder
from gts_lum.encoders.table_learned import ENCODE_BATCH, LearnedTableEncoder, TrainingRows, intra_op_threads
from gts_lum.training.heads import ProbeSettings, batches_of
from gts_lum.training.loop import step_seed, train_loop, trainable


class TableDraws:
    """The draws of one fit from a generator seeded once, in the order the encoder's loop drew them
    before `train_loop`: each epoch the row order, then for the masked objective one (rows, cells) block
    of uniform numbers per batch, in batch order. A draw other than the next (a resumed run) replays
    the ones before it: every draw is a function of (seed, epoch, batch)."""

    def __init__(self, rows: np.ndarray, seed: int, batch_size: int, cells: int):
        self.rows, self.seed, self.batch_size, self.cells = rows, seed, batch_size, cells
        self.batches = len(batches_of(rows, batch_size))
        self._restart()

    def _restart(self) -> None:
        self.generator, self.next = torch.Generator().manual_seed(self.seed), (0, -1)  # (epoch, batch); batch -1: the order

    def _draw(self) -> np.ndarray | torch.Tensor | None:
        epoch, batch = self.next
        if batch < 0:
            value = torch.randperm(len(self.rows), generator=self.generator).numpy()
        else:
            size = min(self.batch_size, len(self.rows) - batch * self.batch_size)
            value = torch.rand(size, self.cells, generator=self.generator) if self.cells else None
        self.next = (epoch + 1, -1) if batch + 1 >= self.batches else (epoch, batch + 1)
        return value

    def _at(self, position: tuple[int, int]):
        if position < self.next:
            self._restart()
        while self.next < position:
            self._draw()
        return self._draw()

    def order(self, epoch: int) -> np.ndarray:
        """The training rows in epoch `epoch`'s order."""
        return self.rows[self._at((epoch, -1))]

    def cells_of(self, epoch: int, batch: int) -> torch.Tensor | None:
        """(rows, cells) uniform numbers of a batch's masked cells; None for a label objective."""
        return self._at((epoch, batch))


class LearnedTableTask:
    """A learned table encoder's fit as a `training.loop.TrainingTask`: the training rows in batches,
    minus the held-out loss as the validation figure (without held-out rows the epoch number: the last
    epoch is kept)."""

    find_unused_parameters = False

    def __init__(self, encoder: LearnedTableEncoder, rows: TrainingRows, device: torch.device):
        lc = encoder.cfg.learned
        self.name, self.module, self.rows, self.device, self.seed = "learned table encoder", encoder.network, rows, device, lc.seed
        self.draws = TableDraws(rows.train, lc.seed, lc.batch_size, encoder.network.cells)
        self.batch_size, self.epoch = lc.batch_size, 0

    def _batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        idx = torch.as_tensor(rows)
        y = None if self.rows.y is None else self.rows.y[idx].to(self.device)
        return self.rows.x_num[idx].to(self.device), self.rows.x_cat[idx].to(self.device), y

    def epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        self.epoch = epoch
        return list(enumerate(batches_of(self.draws.order(epoch), self.batch_size)))

    def train_step(self, module: nn.Module, batch: tuple[int, np.ndarray], epoch: int, step: int, rank: int) -> dict[str, torch.Tensor]:
        index, rows = batch
        torch.manual_seed(step_seed(self.seed, epoch, step, rank))  # dropout
        loss = module(*self._batch(rows), self.draws.cells_of(epoch, index))
        return {"loss": loss, "cases": torch.tensor(float(len(rows)))}

    @torch.no_grad()
    def validate(self) -> float:
        """Minus the mean held-out loss; the masked objective draws the same masks every epoch."""
        valid = self.rows.valid
        if not len(valid):
            return float(self.epoch)
        self.module.eval()
        generator = torch.Generator().manual_seed(self.seed + 1)
        total = 0.0
        for s in range(0, len(valid), ENCODE_BATCH):
            chunk = valid[s : s + ENCODE_BATCH]
            draw = torch.rand(len(chunk), self.module.cells, generator=generator) if self.module.cells else None
            total += self.module(*self._batch(chunk), draw).item() * len(chunk)
        return -total / len(valid)

    def weights_changed(self) -> None:
        pass

    def param_groups(self) -> list[dict]:
        return trainable(self.module)


def train_table_encoder(
    encoder: LearnedTableEncoder,
    frame: pd.DataFrame,
    labels=None,
    *,
    checkpoint_dir: str | Path | None = None,
    max_steps: int | None = None,
) -> dict:
    """Fit `encoder`'s columns, scalers and vocabularies on `frame` and train its network on `labels` (one
    per row; None: masked cells) on the training loop; returns the loop's statistics. `checkpoint_dir`:
    the loop's checkpoints, a rerun on the folder resumes there; `max_steps` stops the run after that many
    steps (a rerun on the checkpoint folder carries on)."""
    lc = encoder.cfg.learned
    rows = encoder.prepare(frame, labels)
    device = select_device(lc.device)
    encoder.network.to(device)
    settings = ProbeSettings(
        epochs=lc.epochs,
        lr=lc.lr,
        weight_decay=lc.weight_decay,
        patience=lc.patience,
        seed=lc.seed,
        grad_clip=lc.grad_clip,
        min_improvement=0.0,
        max_steps=max_steps,
    )
    task = LearnedTableTask(encoder, rows, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), intra_op_threads(lc.cpu_threads, device):
        stats = train_loop(task, settings, checkpoint_dir, device=device)
    history = [
        {"epoch": r["epoch"], "train_loss": r["loss"], **({"valid_loss": -r["valid_neg_loss"]} if len(rows.valid) else {})}
        for r in stats["history"]
    ]
    encoder.mark_trained(history)
    return stats


def fit_table_encoder(encoder: TableEncoder, frame: pd.DataFrame, labels=None, *, checkpoint_dir: str | Path | None = None) -> TableEncoder:
    """Fit a table encoder of any kind on `frame`: `text` and `hf` fix their columns, `learned` also
    trains (`train_table_encoder`). Returns the encoder, ready to encode."""
    if isinstance(encoder, LearnedTableEncoder):
        train_table_encoder(encoder, frame, labels, checkpoint_dir=checkpoint_dir)
        return encoder
    return encoder.fit(frame, labels)
