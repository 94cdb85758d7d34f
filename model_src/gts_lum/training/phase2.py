"""Phase II (paper section 3.3): the target-aware decoder trained on next-behaviour prediction.

Every epoch trains every transition of every training sequence once (`training_windows`): windows
cut from each user's end under the token budget, each trained at every position (the case's own
positive from the last state, each kept behaviour's next event from the states inside). The windows'
token sequences are built once per fit; each epoch batches windows of similar length together in a
seeded order (`bucketed_batches`), so a step pads to its own longest window, not to the budget.

Loss: `GTSLUMNetwork.forward` (target-agnostic InfoNCE with in-batch + sampled negatives, logQ-corrected, then
target-aware InfoNCE over the positive and k negatives from the agnostic top `hard_negative_pool`, for
the cases whose positive made that list), AdamW, gradient clipping.

Determinism and resume: the epoch's batches come from (seed, epoch); each step seeds torch (dropout) and
its negative sampler from (seed, epoch, step). A checkpoint every `checkpoint_every` steps holds the
weights, the optimizer state and the position (epoch, step, selection history), all in safetensors +
JSON; a run restarted from it replays the rest of the data identically, so its final weights equal an
uninterrupted run's.

Distributed data parallel: under `torchrun` (WORLD_SIZE > 1) the process group starts on the device's
backend (HCCL on NPU, NCCL on CUDA, gloo on CPU), the network is wrapped in DistributedDataParallel,
each rank takes every world-th batch of the same seeded case order, and rank 0 validates, logs and
writes checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gts_lum.data.events import EventLog
from gts_lum.sequence.splits import EvalSet
from gts_lum.sequence.tokens import TokenKind, TokenSequences

log = logging.getLogger(__name__)


LR_SCHEDULES = ("constant", "cosine")


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
    hard_negatives: int = 4  # target-aware negatives per case (each one decoder pass)
    hard_negative_pool: int | None = None  # they come from the agnostic top-N (None: the model's re-ranking depth)
    agnostic_weight: float = 1.0
    aware_weight: float = 1.0
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on NPU/CUDA only (training.device)
    select_metric: str = "NDCG@10"
    valid_cases: int | None = 500  # fixed seeded sample of validation cases scored each epoch
    # The last N training events of each validated user leave phase II (`splits.hold_out_for_validation`):
    # a validation history then ends, as a test history does, with an event the model never trained on,
    # and N - 1 of them become validation cases too, up to N cases a user (0: off)
    valid_holdout_events: int = 0
    checkpoint_every: int = 0  # steps between checkpoints (0: at epoch ends only, when a folder is given)

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Phase2Config.lr_schedule {self.lr_schedule!r}: use one of {LR_SCHEDULES}")
        if self.warmup_steps < 0:
            raise ValueError(f"Phase2Config.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.valid_holdout_events < 0:
            raise ValueError(f"Phase2Config.valid_holdout_events must be >= 0, got {self.valid_holdout_events}")


def learning_rate(cfg: Phase2Config, step: int, total_steps: int) -> float:
    """The rate of global optimizer step `step` (0-based) of `total_steps` (see `Phase2Config.lr_schedule`)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    done = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


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
    out = cases[0]
    for more in cases[1:]:
        out = out.concat(more)
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


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
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


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict = {int(pid): dict(slots) for pid, slots in rest["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def distributed_context(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        from gts_lum.training.device import device_info

        dist.init_process_group(backend=device_info(device).dist_backend)
    return dist.get_rank(), dist.get_world_size()


class Phase2Trainer:
    """Trains `model.net` (a `GTSLUMNetwork`) for a `GTSLUM` model; see the module docstring."""

    def __init__(self, model, cfg: Phase2Config, checkpoint_dir: str | Path | None = None):
        self.model = model
        self.cfg = cfg
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self, optimizer, position: dict, best_state: dict | None) -> None:
        from safetensors.torch import save_file

        if self.checkpoint_dir is None:
            return
        folder = self.checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        net = self.model.net
        save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, folder / "weights.tmp")
        opt_tensors, opt_rest = _flatten_optimizer(optimizer)
        save_file(opt_tensors or {"_empty": torch.zeros(0)}, folder / "optimizer.tmp")
        if best_state is not None:
            save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, folder / "best.tmp")
        (folder / "position.tmp").write_text(json.dumps({**position, "optimizer": opt_rest}))
        # renames last, position file last of all: a kill mid-save leaves the previous checkpoint whole
        for name in ("weights", "optimizer", "best"):
            if (folder / f"{name}.tmp").exists():
                os.replace(folder / f"{name}.tmp", folder / f"{name}.safetensors")
        os.replace(folder / "position.tmp", folder / "position.json")

    def _load(self, optimizer) -> tuple[dict, dict | None] | None:
        from safetensors.torch import load_file

        folder = self.checkpoint_dir
        if folder is None or not (folder / "position.json").exists():
            return None
        position = json.loads((folder / "position.json").read_text())
        self.model.net.load_state_dict(load_file(folder / "weights.safetensors"))
        opt = {k: v for k, v in load_file(folder / "optimizer.safetensors").items() if k != "_empty"}
        optimizer.load_state_dict(_unflatten_optimizer(opt, position.pop("optimizer")))
        best = load_file(folder / "best.safetensors") if (folder / "best.safetensors").exists() and position.get("best_epoch", -1) >= 0 else None
        log.info("phase II: resuming from %s at epoch %d step %d", folder, position["epoch"], position["step"])
        return position, best

    # -- training ------------------------------------------------------------------------------------
    def fit(self, split, targets: np.ndarray | None, valid_fn) -> dict:
        """Train on `split.train`; `valid_fn()` -> validation metric value (higher is better)."""
        cfg, model = self.cfg, self.model
        net: nn.Module = model.net
        device = model.device
        rank, world = distributed_context(device)
        ddp = world > 1
        train_net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True) if ddp else net
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        position = {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
        best_state = None
        loaded = self._load(optimizer)
        if loaded is not None:
            position, best_state = loaded
            position["best"] = float(position["best"])
        train = split.train
        num_behaviors = train.num_behaviors
        allowed = None
        # negatives come from the behaviours that can be targets: an off-target negative is an easy
        # one (a shortcut: "is it a target type?"), never a competitor at scoring time
        pool = np.arange(num_behaviors, dtype=np.int64) if targets is None else np.unique(np.asarray(targets, np.int64))
        every_target = torch.as_tensor(pool, device=device) if cfg.sampled_negatives is None else None  # full softmax: once
        frequency = None  # each target behaviour's share of the training targets, for the logQ correction
        if cfg.sampled_negatives is not None and cfg.logq_correction:
            in_pool = np.zeros(num_behaviors, dtype=bool)
            in_pool[pool] = True
            counts = np.where(in_pool, np.bincount(train.behavior, minlength=num_behaviors), 0).astype(np.float64)
            frequency = torch.as_tensor(counts / max(counts.sum(), 1.0), dtype=torch.float32, device=device)
        # the target-aware term trains on the lists re-ranking will see: the model's re-ranking depth
        list_size = cfg.hard_negative_pool or max(getattr(model.cfg, "rerank_depth", 0), 2 * cfg.hard_negatives, 10)
        if targets is not None:
            allowed = torch.zeros(num_behaviors, dtype=torch.bool, device=device)
            allowed[torch.as_tensor(np.asarray(targets, np.int64), device=device)] = True
        t_start = time.perf_counter()
        log.info(
            "phase II: %s trainable of %s parameters, %d users, device %s, world %d",
            f"{sum(p.numel() for p in params):,}", f"{sum(p.numel() for p in net.parameters()):,}", train.num_users, device, world,
        )
        windows, tokens = training_windows(train, model.sequences, targets)
        lengths = tokens.lengths()
        log.info(
            "phase II: %d windows cover %d transitions (%.1f tokens a window on average)",
            len(windows), int(np.maximum(np.diff(train.offsets) - 1, 0).sum()), float(lengths.mean()),
        )
        while position["epoch"] < cfg.epochs and position["bad_epochs"] < cfg.patience:
            epoch = position["epoch"]
            picked = np.random.default_rng([cfg.seed, epoch]).permutation(len(windows))[: cfg.max_cases_per_epoch]
            batches = [picked[b] for b in bucketed_batches(lengths[picked], cfg.batch_size, cfg.seed * 7919 + epoch)]
            batches = batches[: len(batches) - len(batches) % world] if ddp else batches  # equal steps per rank
            steps_per_epoch = len(batches) // world  # the schedule's unit (epochs hold about as many cases each)
            net.train()
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}  # steps that reported each figure (the aware term can skip a step)
            t_epoch, seen, trained_positions = time.perf_counter(), 0, 0.0
            steps = range(position["step"], len(batches) // world)
            bar = tqdm(steps, desc=f"phase II epoch {epoch}", leave=False, disable=None if rank == 0 else True)
            for step in bar:
                idx = batches[step * world + rank]
                torch.manual_seed(cfg.seed * 1_000_003 + epoch * 10_007 + step)
                gen = np.random.default_rng([cfg.seed, epoch, step, rank])
                batch = model.batch(tokens.subset(idx), train, windows.history_end[idx])
                positives = torch.as_tensor(windows.target[idx].astype(np.int64), device=device)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, epoch * steps_per_epoch + step, cfg.epochs * steps_per_epoch)
                sampled = every_target if every_target is not None else torch.as_tensor(pool[gen.integers(0, len(pool), cfg.sampled_negatives)], device=device)
                with model.autocast():
                    out = train_net(batch, positives, sampled, cfg.hard_negatives, cfg.agnostic_weight, cfg.aware_weight, allowed, list_size, frequency, len(pool))
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                seen += len(idx) * world
                trained_positions += float(out["prefixes"]) * world
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                    counts[k] = counts.get(k, 0) + 1
                bar.set_postfix({k: f"{v / counts[k]:.3f}" for k, v in sums.items() if k != "scale"})
                position["step"] = step + 1
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and rank == 0:
                    self._save(optimizer, position, best_state)
            seconds = time.perf_counter() - t_epoch
            value = valid_fn() if rank == 0 else 0.0
            if ddp:
                import torch.distributed as dist

                shared = torch.tensor([value], dtype=torch.float64)
                dist.broadcast(shared, 0)
                value = float(shared)
            record = {"epoch": epoch, "lr": round(optimizer.param_groups[0]["lr"], 6), **{k: round(v / counts[k], 4) for k, v in sums.items()}, "cases_per_s": round(seen / max(seconds, 1e-9), 1),
                      "positions_per_s": round(trained_positions / max(seconds, 1e-9), 1),
                      f"valid_{cfg.select_metric}": value}
            position["history"].append(record)
            if value > position["best"]:
                position.update(best=value, best_epoch=epoch, bad_epochs=0)
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                position["bad_epochs"] += 1
            if rank == 0:
                log.info("phase II epoch %d: %s", epoch, record)
            position.update(epoch=epoch + 1, step=0)
            if rank == 0:
                self._save(optimizer, position, best_state)
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        return {
            "epochs": len(position["history"]),
            "best_epoch": position["best_epoch"],
            f"valid_{cfg.select_metric}": position["best"],
            "train_seconds": time.perf_counter() - t_start,
            "world_size": world,
            "history": position["history"],
        }
