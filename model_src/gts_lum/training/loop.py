"""One training loop for every model trained by gradient steps: GTS-LUM phase I (the Q-former's
alignment) and phase II, and the sequential baselines (SASRec, HSTU, HLLM).

    stats = train_loop(task, task.cfg, checkpoint_dir)

A `TrainingTask` says what an epoch's batches are, what one step's loss is and how good the current
weights are on validation; the loop does the rest, the same way for every model:

- AdamW over the task's parameter groups (`param_groups`: one group of every trainable parameter under
  the config's settings, or the task's own split, e.g. no weight decay on biases and norms), a learning
  rate that is a function of the global step alone (`learning_rate`: constant or cosine down to
  `min_lr_ratio` x lr, after a linear warm-up), gradient clipping;
- each epoch its batches in the task's seeded order, then validation; the best epoch's weights are kept
  and restored at the end; early stop after `patience` epochs without a better one; `max_steps` stops
  the run after that many steps in all, mid-epoch too (a time-boxed or cut run: the schedule still
  spans the epochs, and a later run on the checkpoint folder carries on from there);
- a wall-time budget (`time_budget_s`, for comparing models at equal training time): after every epoch
  the run plans as many epochs as fit what is left of the budget at the pace of the epochs so far
  (validation included; at most `epochs`; `budget_plan`), and the schedule runs its course over them
  (the plan is part of the checkpoint);
- per epoch the mean of every figure the steps report, cases/s and positions/s (positions trained per
  second: the unit that compares models whose steps differ in size);
- checkpoints (`checkpoint_dir`): weights, optimizer state, best weights and the position (epoch, step,
  history) every `checkpoint_every` steps, at each epoch's end and at `max_steps`, all-or-nothing
  (`training.checkpoint.save_training_state`). A run restarted on the folder resumes there; each step's
  randomness comes from (seed, epoch, step), so its final weights equal an uninterrupted run's;
- data parallel under torchrun (WORLD_SIZE > 1): the process group on the device's backend, the module
  in DistributedDataParallel, each rank every world-th batch; rank 0 validates, logs and saves.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gts_lum.device import device_info
from gts_lum.training.checkpoint import load_training_state, save_training_state

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")


class LoopSettings(Protocol):
    """The fields of a model's train config that the loop reads. Optional, read when present:
    `min_improvement`, how much a validation figure must exceed the best so far to count as better
    (0 without it; probes selecting on minus a loss ignore gains below their tolerance)."""

    lr: float
    lr_schedule: str
    warmup_steps: int
    weight_decay: float
    epochs: int
    patience: int
    grad_clip: float | None
    seed: int
    select_metric: str
    checkpoint_every: int
    time_budget_s: float | None
    min_lr_ratio: float  # the cosine ends at min_lr_ratio x lr (0: at 0)
    max_steps: int | None  # stop after this many optimizer steps in all (None: the epochs decide)


class TrainingTask(Protocol):
    """Optional, read when present: `epoch_log_level`, the level of the per-epoch log line (INFO without
    it; a probe that runs hundreds of tiny epochs logs them at DEBUG)."""

    name: str
    module: nn.Module  # what trains; its state dict is what is checkpointed and restored
    find_unused_parameters: bool  # DDP: some steps leave parts of the module unused (e.g. a skipped term)

    def epoch_batches(self, epoch: int) -> list[Any]:
        """The epoch's batches in order: a function of (seed, epoch) only (resume replays them)."""

    def train_step(self, module: nn.Module, batch: Any, epoch: int, step: int, rank: int) -> dict[str, torch.Tensor]:
        """Loss of one batch through `module` (the DDP wrapper under torchrun): {"loss", "cases",
        "positions", other figures}. Seeds its own randomness from (epoch, step, rank)."""

    def validate(self) -> float:
        """The selection metric of the current weights (higher is better)."""

    def weights_changed(self) -> None:
        """Called after every update: tasks that cache tensors derived from the weights drop them."""

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: {"params": [...]} with any AdamW setting (weight_decay,
        betas) where it differs from the config's (`trainable`: every trainable parameter, one group)."""


def trainable(module: nn.Module) -> list[dict]:
    """One parameter group: every trainable parameter of `module`, under the config's settings."""
    return [{"params": [p for p in module.parameters() if p.requires_grad]}]


def check_schedule(cfg: LoopSettings, owner: str) -> None:
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"{owner}.lr_schedule {cfg.lr_schedule!r}: use one of {LR_SCHEDULES}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"{owner}.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"{owner}.min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"{owner}.max_steps must be >= 1 or null, got {cfg.max_steps}")


def learning_rate(cfg: LoopSettings, step: int, total_steps: int) -> float:
    """The rate of global optimizer step `step` (0-based) of `total_steps`: `warmup_steps` of linear
    warm-up, then constant or a cosine from lr down to `min_lr_ratio` x lr over the rest of the budget."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    done = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The torch seed of one training step (dropout, sampled negatives): a function of the position alone,
    so a resumed run draws what an uninterrupted one drew."""
    return seed * 1_000_003 + epoch * 10_007 + step * 101 + rank


def distributed_context(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend=device_info(device).dist_backend)
    return dist.get_rank(), dist.get_world_size()


def _broadcast(value: float) -> float:
    import torch.distributed as dist

    shared = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(shared, 0)
    return float(shared)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as named tensors + a JSON-able rest (safetensors holds no Python objects)."""
    state = optimizer.state_dict()
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, slots in state["state"].items():
        rest["state"][str(pid)] = {}
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                rest["state"][str(pid)][name] = value
    return tensors, rest


def _optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict = {int(pid): dict(slots) for pid, slots in rest["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def train_loop(task: TrainingTask, cfg: LoopSettings, checkpoint_dir: str | Path | None = None, device: torch.device | None = None) -> dict:
    """Train `task.module` (see the module docstring); returns the statistics of the run."""
    run = _Run(task, cfg, Path(checkpoint_dir) if checkpoint_dir else None, device)
    t_start = time.perf_counter()
    position = run.position
    if not cfg.time_budget_s or "planned_epochs" not in position:  # without a budget the config decides (a resume may extend it)
        position["planned_epochs"] = cfg.epochs
    while position["epoch"] < position["planned_epochs"] and position["bad_epochs"] < cfg.patience:
        epoch, t_epoch = position["epoch"], time.perf_counter()
        figures = run.train_epoch(epoch)
        if figures is None:  # max_steps reached inside the epoch: no validation of a part
            run.save()
            log.info("%s: stopped at max_steps %d (epoch %d, step %d)", task.name, cfg.max_steps, epoch, position["step"])
            break
        run.end_epoch(epoch, figures, max(time.perf_counter() - t_epoch, 1e-9))
        position.update(epoch=epoch + 1, step=0)
        if cfg.time_budget_s:
            run.plan(time.perf_counter() - t_epoch)
        run.save()
        if position["bad_epochs"] >= cfg.patience and run.rank == 0:
            log.info("%s: early stop after epoch %d (best epoch %d)", task.name, epoch, position["best_epoch"])
    if run.best_state is not None:
        task.module.load_state_dict(run.best_state)
    task.module.eval()
    task.weights_changed()
    return {
        "epochs": len(position["history"]),
        "steps": position["global_step"],
        "best_epoch": position["best_epoch"],
        f"valid_{cfg.select_metric}": position["best"],
        "train_seconds": time.perf_counter() - t_start,
        "num_parameters": sum(p.numel() for p in task.module.parameters()),
        "world_size": run.world,
        "history": position["history"],
    }


class _Run:
    """One `train_loop` call's state: the module (DDP-wrapped under torchrun), the optimizer, the position
    (epoch, step, best, history, the plan; what a checkpoint records) and the best weights."""

    def __init__(self, task: TrainingTask, cfg: LoopSettings, folder: Path | None, device: torch.device | None):
        self.task, self.cfg, self.folder = task, cfg, folder
        module = task.module
        device = device or next(module.parameters()).device
        self.rank, self.world = distributed_context(device)
        self.ddp = self.world > 1
        self.train_module = (
            nn.parallel.DistributedDataParallel(module, find_unused_parameters=task.find_unused_parameters) if self.ddp else module
        )
        param_groups = task.param_groups()
        self.params = [p for group in param_groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.position: dict = {"epoch": 0, "step": 0, "global_step": 0, "best": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.resume()
        log.info(
            "%s: %s trainable of %s parameters, device %s, world %d",
            task.name,
            f"{sum(p.numel() for p in self.params):,}",
            f"{sum(p.numel() for p in module.parameters()):,}",
            device,
            self.world,
        )

    def resume(self) -> None:
        loaded = load_training_state(self.folder) if self.folder is not None else None
        if loaded is None:
            return
        groups, position = loaded
        self.task.module.load_state_dict(groups["weights"])
        self.optimizer.load_state_dict(_optimizer_state(groups["optimizer"], position.pop("optimizer")))
        self.best_state = groups.get("best") if position["best_epoch"] >= 0 else None
        position["best"] = float(position["best"])
        position.setdefault("global_step", 0)  # a checkpoint written before the loop counted its steps
        self.position = position
        self.task.weights_changed()
        log.info("%s: resuming from %s at epoch %d step %d", self.task.name, self.folder, position["epoch"], position["step"])

    def save(self) -> None:
        if self.folder is None or self.rank != 0:
            return
        opt_tensors, opt_rest = _optimizer_tensors(self.optimizer)
        groups = {"weights": _cpu(self.task.module.state_dict()), "optimizer": opt_tensors}
        if self.best_state is not None:
            groups["best"] = _cpu(self.best_state)
        save_training_state(self.folder, groups, {**self.position, "optimizer": opt_rest})

    def train_epoch(self, epoch: int) -> tuple[dict[str, float], dict[str, int]] | None:
        """The epoch's steps from the position's step on: (sums, counts) of the figures the steps
        reported (a term can skip a step), or None when `max_steps` stopped it inside the epoch."""
        task, cfg, position, world = self.task, self.cfg, self.position, self.world
        batches = task.epoch_batches(epoch)
        batches = batches[: len(batches) - len(batches) % world] if self.ddp else batches  # equal steps per rank
        steps_per_epoch = len(batches) // world  # the schedule's unit (epochs hold about as many batches each)
        if steps_per_epoch == 0:
            raise ValueError(f"{task.name}: an epoch has no batch (fewer batches than processes, {world})")
        task.module.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        bar = tqdm(
            range(position["step"], steps_per_epoch),
            desc=f"{task.name} epoch {epoch}",
            leave=False,
            disable=None if self.rank == 0 else True,
        )
        for step in bar:
            if cfg.max_steps is not None and position["global_step"] >= cfg.max_steps:
                bar.close()
                return None
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, epoch * steps_per_epoch + step, position["planned_epochs"] * steps_per_epoch)
            out = task.train_step(self.train_module, batches[step * world + self.rank], epoch, step, self.rank)
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.optimizer.step()
            task.weights_changed()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
                counts[k] = counts.get(k, 0) + 1
            bar.set_postfix({k: f"{sums[k] / counts[k]:.3f}" for k in ("loss", "agnostic", "aware") if k in sums})
            position["step"] = step + 1
            position["global_step"] += 1
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                self.save()
        return sums, counts

    def end_epoch(self, epoch: int, figures: tuple[dict[str, float], dict[str, int]], seconds: float) -> None:
        """Validate (rank 0, shared with every rank), record the epoch, keep the best weights."""
        cfg, position, world = self.cfg, self.position, self.world
        sums, counts = figures
        value = self.task.validate() if self.rank == 0 else 0.0
        value = _broadcast(value) if self.ddp else value
        record = {
            "epoch": epoch,
            "lr": round(self.optimizer.param_groups[0]["lr"], 6),
            **{k: round(sums[k] / counts[k], 4) for k in sums if k not in ("cases", "positions")},
            # the figures of the steps this run took (a resumed epoch counts only those)
            "cases_per_s": round(sums.get("cases", 0.0) * world / seconds, 1),
            "positions_per_s": round(sums.get("positions", 0.0) * world / seconds, 1),
            f"valid_{cfg.select_metric}": value,
        }
        position["history"].append(record)
        if value > position["best"] + getattr(cfg, "min_improvement", 0.0):
            position.update(best=value, best_epoch=epoch, bad_epochs=0)
            self.best_state = {k: v.detach().clone() for k, v in self.task.module.state_dict().items()}
        else:
            position["bad_epochs"] += 1
        if self.rank == 0:
            log.log(getattr(self.task, "epoch_log_level", logging.INFO), "%s epoch %d: %s", self.task.name, epoch, record)

    def plan(self, pace: float) -> None:
        """The time budget's plan after an epoch of `pace` seconds (`budget_plan`), rank 0's for every rank."""
        position = self.position
        planned = budget_plan(self.cfg, position, pace)
        planned = int(_broadcast(planned) if self.ddp else planned)
        if planned != position["planned_epochs"]:
            log.info(
                "%s: %d epochs fit the budget of %.0f s (%.0f s spent, %d run)",
                self.task.name,
                planned,
                self.cfg.time_budget_s,
                position["elapsed_s"],
                position["epoch"],
            )
        position["planned_epochs"] = planned


def budget_plan(cfg: LoopSettings, position: dict, pace: float) -> int:
    """The epochs that fit `cfg.time_budget_s`, planned again after every epoch (`pace`: its seconds,
    validation included) from the time spent and the pace of the epochs after the first (the first pays
    warm-up; it alone decides only the first plan): a run whose later epochs are faster gets the epochs
    its budget buys, one on a busier machine stops once the next epoch would not fit. At most `epochs`,
    at least the epochs run; the learning-rate schedule follows the plan."""
    position["elapsed_s"] = position.get("elapsed_s", 0.0) + pace
    paces = position.setdefault("paces", [])
    paces.append(pace)
    typical = max(float(np.mean(paces[1:] if len(paces) > 1 else paces)), 1e-9)
    done = position["epoch"]
    return max(done, min(cfg.epochs, done + int((cfg.time_budget_s - position["elapsed_s"]) // typical)))


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The random stream of one epoch's data order (resume needs nothing but the epoch number)."""
    return np.random.default_rng([seed, epoch])
