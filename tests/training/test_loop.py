"""The shared training loop on a task of its own: the schedule, the best epoch, the time budget."""

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gts_lum.training.loop import train_loop, trainable


@dataclass
class Settings:
    lr: float = 0.05
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    epochs: int = 50
    patience: int = 50
    grad_clip: float | None = 1.0
    seed: int = 0
    select_metric: str = "fit"
    checkpoint_every: int = 0
    time_budget_s: float | None = None
    min_lr_ratio: float = 0.0
    max_steps: int | None = None


class Regression:
    """y = x w: a task whose validation is minus the distance to the true weights."""

    name = "regression"
    find_unused_parameters = False

    def __init__(self, epoch_seconds: float = 0.0):
        torch.manual_seed(0)
        self.module = nn.Linear(4, 1, bias=False)
        self.x = torch.randn(256, 4)
        self.w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
        self.y = self.x @ self.w.T
        self.epoch_seconds = epoch_seconds  # seconds, or a function of the epoch
        self.calls: list[int] = []

    def epoch_batches(self, epoch):
        order = np.random.default_rng([0, epoch]).permutation(256)
        return [order[i : i + 32] for i in range(0, 256, 32)]

    def train_step(self, module, idx, epoch, step, rank):
        loss = ((module(self.x[idx]) - self.y[idx]) ** 2).mean()
        return {"loss": loss, "cases": torch.tensor(float(len(idx))), "positions": torch.tensor(float(len(idx)))}

    def validate(self):
        time.sleep(self.epoch_seconds(len(self.calls)) if callable(self.epoch_seconds) else self.epoch_seconds)
        self.calls.append(1)
        return -float((self.module.weight.detach() - self.w).norm())

    def weights_changed(self):
        pass

    def param_groups(self):
        return trainable(self.module)


def test_the_loop_learns_keeps_the_best_epoch_and_logs_positions_per_second():
    task = Regression()
    stats = train_loop(task, Settings(epochs=20), device=torch.device("cpu"))
    history = stats["history"]
    assert stats["epochs"] == 20 and history[-1]["loss"] < history[0]["loss"] / 10
    best = max(range(20), key=lambda e: history[e]["valid_fit"])
    assert stats["best_epoch"] == best and stats["valid_fit"] == history[best]["valid_fit"]
    assert all(h["positions_per_s"] > 0 and h["cases_per_s"] == h["positions_per_s"] for h in history)
    assert history[-1]["lr"] < 0.01  # the cosine ran its course over the 20 epochs


def test_a_time_budget_plans_the_epochs_after_the_first():
    """An epoch of ~0.2 s (validation included) under a 1 s budget: about 5 epochs, and the cosine
    schedule decays over those, not over the configured 50."""
    stats = train_loop(Regression(epoch_seconds=0.2), Settings(epochs=50, time_budget_s=1.0), device=torch.device("cpu"))
    assert 2 <= stats["epochs"] <= 5
    assert stats["history"][-1]["lr"] < 0.2 * Settings.lr


def test_epochs_slower_than_the_first_stop_at_the_budget():
    """Epoch 0 takes ~0.1 s, so ~10 epochs are planned for 1 s; the later ones take ~0.4 s (a busier
    machine): the run stops when the next epoch would not fit, after ~3 epochs, not 10."""
    task = Regression(epoch_seconds=lambda epoch: 0.1 if epoch == 0 else 0.4)
    stats = train_loop(task, Settings(epochs=50, time_budget_s=1.0), device=torch.device("cpu"))
    assert 2 <= stats["epochs"] <= 3


def test_epochs_faster_than_the_first_extend_the_plan():
    """Epoch 0 takes ~0.4 s (warm-up), the later ones ~0.1 s: the first plan under a 1.2 s budget is 3
    epochs, the plans after it use the later pace and the run spends the budget (~8 epochs, not 3)."""
    task = Regression(epoch_seconds=lambda epoch: 0.4 if epoch == 0 else 0.1)
    stats = train_loop(task, Settings(epochs=50, time_budget_s=1.2), device=torch.device("cpu"))
    assert 6 <= stats["epochs"] <= 9
    assert stats["history"][-1]["lr"] < 0.2 * Settings.lr  # the schedule followed the longer plan to its end


def test_max_steps_stops_inside_an_epoch_and_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    """8 steps an epoch: max_steps=11 stops inside epoch 1 (one validated epoch), checkpointed there; the
    run restarted on the folder without the cap ends with the weights of a run never stopped."""
    full = Regression()
    stats = train_loop(full, Settings(epochs=3), tmp_path / "full", device=torch.device("cpu"))
    assert stats["steps"] == 24 and stats["epochs"] == 3
    cut = train_loop(Regression(), Settings(epochs=3, max_steps=11), tmp_path / "cut", device=torch.device("cpu"))
    assert cut["steps"] == 11 and cut["epochs"] == 1
    resumed = Regression()
    stats = train_loop(resumed, Settings(epochs=3), tmp_path / "cut", device=torch.device("cpu"))
    assert stats["steps"] == 24 and stats["best_epoch"] == 2
    torch.testing.assert_close(resumed.module.weight, full.module.weight, rtol=0, atol=0)


def test_gains_below_min_improvement_are_no_better_epoch():
    """A settings object with `min_improvement` (optional): an epoch must beat the best by it, else it counts
    towards `patience`; the regression gains less than 10 a epoch, so epoch 0 stays the best."""

    @dataclass
    class Tolerant(Settings):
        min_improvement: float = 10.0

    stats = train_loop(Regression(), Tolerant(epochs=20, patience=3), device=torch.device("cpu"))
    assert (stats["best_epoch"], stats["epochs"]) == (0, 4)


def test_a_task_may_log_its_epochs_at_debug(caplog):
    task = Regression()
    task.epoch_log_level = logging.DEBUG
    with caplog.at_level(logging.INFO, logger="gts_lum.training.loop"):
        train_loop(task, Settings(epochs=3), device=torch.device("cpu"))
    assert "epoch" not in caplog.text and "parameters" in caplog.text
