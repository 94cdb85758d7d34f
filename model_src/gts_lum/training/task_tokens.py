"""Task tokens for heterogeneous labels (paper section 3.2: the target at the front is a learned task token).

Phase II trains the decoder on next behaviours. A label task (churn, plan change, campaign response)
gets its own front token, tuned here with everything else frozen (decoder, Q-former, projections): only
the token and a temporary head learn, through the decoder (prompt tuning). One trained decoder then
serves every task, and adding a task never changes next-behaviour scoring. The head that is reported
and served is fitted afterwards on the tuned embeddings (`training.heads.fit_head`).

    model.set_tasks(["churn", "campaign"])
    stats = tune_task_token(model, log_, cases, y, treatment, model.task_index("churn"), head, TaskTokenConfig())

`gts_lum.stages.labels.run_label_stage` is the pipeline's label step (`gts-lum labels`): every task of the data set's labels
table gets its token tuned and its head fitted on training users, is reported on held-out users beside
the table baselines (gradient-boosted trees; a T-learner for uplift, with Qini curves), and the heads
plus the model with its tuned tokens are written for `gts-lum export`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gts_lum.data.events import EventLog
from gts_lum.modeling.heads import LabelHead, TaskTokenConfig, UpliftHead
from gts_lum.sequence.splits import EvalSet, holdout
from gts_lum.training.heads import ProbeSettings, SeededOrders, batches_of
from gts_lum.training.loop import step_seed, train_loop, trainable

log = logging.getLogger(__name__)


class _TokenAndHead(nn.Module):
    """What tuning trains, one module for the loop (its state is what is checkpointed and kept): the
    network's task-token table and the head. The rest of the network is no part of it."""

    def __init__(self, task_tokens: nn.Embedding, head: LabelHead | UpliftHead):
        super().__init__()
        self.task_tokens, self.head = task_tokens, head


class TaskTokenTask:
    """`tune_task_token`'s training as a `training.loop.TrainingTask`: the training cases in batches, minus
    the held-out loss as the validation figure (without held-out cases minus the epoch's training loss)."""

    find_unused_parameters = False

    def __init__(self, name: str, module: _TokenAndHead, loss_of, train: np.ndarray, valid: np.ndarray, cfg: TaskTokenConfig):
        self.name, self.module, self.loss_of, self.valid, self.cfg = name, module, loss_of, valid, cfg
        self.orders = SeededOrders(train, lambda: np.random.default_rng(cfg.seed), lambda g, n: g.permutation(n))
        self.train_total, self.train_rows = 0.0, 0

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        self.train_total, self.train_rows = 0.0, 0
        return batches_of(self.orders(epoch), self.cfg.batch_size)

    def train_step(self, module: nn.Module, rows: np.ndarray, epoch: int, step: int, rank: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(step_seed(self.cfg.seed, epoch, step, rank))  # dropout of an MLP head
        loss = self.loss_of(rows)
        self.train_total, self.train_rows = self.train_total + loss.item() * len(rows), self.train_rows + len(rows)
        return {"loss": loss, "cases": torch.tensor(float(len(rows)))}

    def param_groups(self) -> list[dict]:
        return trainable(self.module)

    def validate(self) -> float:
        self.module.eval()
        with torch.no_grad():
            return -float(self.loss_of(self.valid)) if len(self.valid) else -self.train_total / self.train_rows

    def weights_changed(self) -> None:
        pass


@contextlib.contextmanager
def _only_task_tokens_train(net):
    """The network frozen and in eval mode (no dropout: the token is tuned against the network as it
    scores) but its task tokens; only the tuned task's row is looked up, so the other rows get no gradient
    and keep their tokens. Restores both on exit."""
    frozen = {name: p.requires_grad for name, p in net.named_parameters()}
    was_training = net.training
    for p in net.parameters():
        p.requires_grad_(False)
    net.task_tokens.weight.requires_grad_(True)
    net.eval()
    try:
        yield
    finally:
        for name, p in net.named_parameters():
            p.requires_grad_(frozen[name])
        net.train(was_training)


def tune_task_token(
    model,
    log_: EventLog,
    cases: EvalSet,
    y: np.ndarray,
    treatment: np.ndarray | None,
    task_index: int,
    head: LabelHead | UpliftHead,
    cfg: TaskTokenConfig,
    summary: np.ndarray | None = None,
    checkpoint_dir: str | Path | None = None,
) -> dict:
    """Train row `task_index` of `model.net.task_tokens` (and `head`) on cases (one per user) and labels.

    `summary` (N, D): fixed features of each case the head reads after the decoder's state (the history
    summary, `model.history_summary`). Every other weight of the network stays as it is. The token and
    head of the epoch with the lowest held-out loss are kept (`training.loop.train_loop`, AdamW without
    weight decay; `checkpoint_dir`: its checkpoints, a rerun resumes there). Returns stats (epochs,
    held-out loss per epoch)."""
    net = model.net
    started = time.perf_counter()
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.float32, device=model.device)
    t_t = None if treatment is None else torch.as_tensor(np.asarray(treatment), dtype=torch.float32, device=model.device)
    head.check_targets(y_t)
    if isinstance(head, UpliftHead) and t_t is None:
        raise ValueError("tune_task_token: an uplift task needs its treatment flags")
    train, valid = holdout(len(cases), cfg.valid_fraction, cfg.seed, head.stratum(y_t, t_t).cpu().numpy())
    tokens = model.sequences(log_, cases)
    history_end = np.asarray(cases.history_end)
    task = torch.tensor([task_index], device=model.device)
    extra = None if summary is None else torch.as_tensor(np.asarray(summary), dtype=torch.float32, device=model.device)

    def states(rows: np.ndarray) -> torch.Tensor:
        """(N, H [+ D]) user embeddings of cases `rows` with the task token in front (then the summary); grad
        to the token only."""
        with torch.no_grad():
            ctx = net.context(model.batch(tokens.subset(rows), log_, history_end[rows]))
        state = net.user_states(ctx, task=task.expand(len(rows)))
        return state if extra is None else torch.cat([state, extra[torch.as_tensor(rows, device=model.device)]], 1)

    def loss_of(rows: np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(rows, device=model.device)
        return head.loss(head(states(rows)), y_t[idx], None if t_t is None else t_t[idx])

    with _only_task_tokens_train(net):
        with torch.no_grad():  # standardize the head's inputs on the untuned embeddings
            head.set_input_stats(torch.cat([states(train[s : s + cfg.batch_size]) for s in range(0, len(train), cfg.batch_size)]))
        if isinstance(head, UpliftHead):
            head.propensity.fill_(float(t_t[torch.as_tensor(train, device=model.device)].mean()))
        head.to(model.device).train()
        initial_token = net.task_tokens.weight[task_index].detach().clone()
        with torch.no_grad():  # the untuned token under the freshly initialized head: where tuning starts
            initial_loss = float(loss_of(valid)) if len(valid) else float("nan")
            initial_train_loss = float(loss_of(train))
        module = _TokenAndHead(net.task_tokens, head)
        settings = ProbeSettings(epochs=cfg.epochs, lr=cfg.lr, weight_decay=0.0, patience=cfg.epochs, seed=cfg.seed, min_improvement=0.0)
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            run = train_loop(TaskTokenTask(f"task token {task_index}", module, loss_of, train, valid, cfg), settings, checkpoint_dir)
        token_change = float((net.task_tokens.weight[task_index].detach() - initial_token).norm())
    head.eval()
    best_loss = -run["valid_neg_loss"]
    log.info(
        "task token %d: %d train / %d held-out users, held-out loss %.4f -> %.4f in %.1f s",
        task_index,
        len(train),
        len(valid),
        initial_loss,
        best_loss,
        time.perf_counter() - started,
    )
    history = [
        {"epoch": h["epoch"], "train_loss": round(h["loss"], 5), "valid_loss": round(-h["valid_neg_loss"], 5)} for h in run["history"]
    ]
    return {
        "epochs": len(history),
        "initial_train_loss": initial_train_loss,
        "initial_valid_loss": initial_loss,
        "best_valid_loss": best_loss,
        "token_change": token_change,
        "history": history,
        "seconds": time.perf_counter() - started,
    }


def user_cases(log_: EventLog, user_ids: np.ndarray, before: np.ndarray | None = None) -> EvalSet:
    """One case per user id: the user's history in `log_` (KeyError naming ids the log lacks).

    `before` (M,) unix seconds: each history ends before that instant (a label's `time`: the label must
    not see what happened after it); NaN, or no `before`, keeps the whole history."""
    import pandas as pd

    rows = pd.Index(log_.user_ids.astype(str)).get_indexer(np.asarray(user_ids).astype(str))
    if (rows < 0).any():
        missing = np.asarray(user_ids)[rows < 0]
        raise KeyError(f"{len(missing)} user id(s) not in the event log, e.g. {missing[:5].tolist()}")
    starts, ends = log_.offsets[rows].astype(np.int64), log_.offsets[rows + 1].astype(np.int64)
    if before is not None and len(log_.timestamp):
        cut = np.asarray(before, np.float64)
        # one search over (user, time) keys: users are contiguous and their timestamps sorted
        t0 = int(log_.timestamp.min())
        span = int(log_.timestamp.max()) - t0 + 2
        event_user = np.repeat(np.arange(len(log_.offsets) - 1, dtype=np.int64), np.diff(log_.offsets))
        keys = event_user * span + (log_.timestamp.astype(np.int64) - t0)
        offset = np.clip(np.nan_to_num(cut - t0, nan=span - 1), 0, span - 1).astype(np.int64)
        ends = np.searchsorted(keys, rows.astype(np.int64) * span + offset, side="left").astype(np.int64)
    last = np.maximum(ends - 1, starts)
    return EvalSet(
        rows.astype(np.int64),
        ends,
        np.zeros(len(rows), np.int32),
        log_.timestamp[np.minimum(last, len(log_.timestamp) - 1)].astype(np.int64),
    )
