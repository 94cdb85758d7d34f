"""Task tokens for heterogeneous labels (paper section 3.2: the target at the front is a learned task token).

Phase II trains the decoder on next behaviours. A label task (churn, plan change, campaign response)
gets its own front token, tuned here with everything else frozen (decoder, Q-former, projections): only
the token and a temporary head learn, through the decoder (prompt tuning). One trained decoder then
serves every task, and adding a task never changes next-behaviour scoring. The head that is reported
and served is fitted afterwards on the tuned embeddings (`modeling.heads.fit_head`).

    model.set_tasks(["churn", "campaign"])
    stats = tune_task_token(model, log_, cases, y, treatment, model.task_index("churn"), head, TaskTokenConfig())

`gts_lum.stages.labels.run_label_stage` is the pipeline's label step (`gts-lum labels`): every task of the data set's labels
table gets its token tuned and its head fitted on training users, is reported on held-out users beside
the table baselines (gradient-boosted trees; a T-learner for uplift, with Qini curves), and the heads
plus the model with its tuned tokens are written for `gts-lum export`.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from gts_lum.data.events import EventLog
from gts_lum.modeling.heads import LabelHead, TaskTokenConfig, UpliftHead
from gts_lum.sequence.splits import EvalSet, holdout

log = logging.getLogger(__name__)


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
) -> dict:
    """Train row `task_index` of `model.net.task_tokens` (and `head`) on cases (one per user) and labels.

    `summary` (N, D): fixed features of each case the head reads after the decoder's state (the history
    summary, `model.history_summary`). Every other weight of the network stays as it is. Returns stats
    (epochs, held-out loss per epoch)."""
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

    frozen = {name: p.requires_grad for name, p in net.named_parameters()}
    for p in net.parameters():
        p.requires_grad_(False)
    net.task_tokens.weight.requires_grad_(True)
    was_training = net.training
    net.eval()  # no dropout in the frozen network: the token is tuned against the network as it scores
    history = []
    try:
        generator = np.random.default_rng(cfg.seed)
        with torch.no_grad():  # standardize the head's inputs on the untuned embeddings
            head.set_input_stats(torch.cat([states(train[s : s + cfg.batch_size]) for s in range(0, len(train), cfg.batch_size)]))
        if isinstance(head, UpliftHead):
            head.propensity.fill_(float(t_t[torch.as_tensor(train, device=model.device)].mean()))
        head.to(model.device).train()
        optimizer = torch.optim.AdamW([net.task_tokens.weight, *head.parameters()], lr=cfg.lr, weight_decay=0.0)
        initial_token = net.task_tokens.weight[task_index].detach().clone()
        with torch.no_grad():  # the untuned token under the freshly initialized head: where tuning starts
            initial_loss = float(loss_of(valid)) if len(valid) else float("nan")
            initial_train_loss = float(loss_of(train))
        best_loss, best = float("inf"), None
        for epoch in tqdm(range(cfg.epochs), desc=f"task token {task_index}", unit="epoch", leave=False, disable=None):
            order = generator.permutation(train)
            total = 0.0
            for s in range(0, len(order), cfg.batch_size):
                rows = order[s : s + cfg.batch_size]
                loss = loss_of(rows)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                net.task_tokens.weight.grad[torch.arange(len(net.task_tokens.weight)) != task_index] = 0.0  # other tasks keep theirs
                optimizer.step()
                total += loss.item() * len(rows)
            with torch.no_grad():
                valid_loss = float(loss_of(valid)) if len(valid) else total / len(order)
            history.append({"epoch": epoch, "train_loss": round(total / len(order), 5), "valid_loss": round(valid_loss, 5)})
            if valid_loss < best_loss:
                best_loss = valid_loss
                best = (net.task_tokens.weight[task_index].detach().clone(), copy.deepcopy(head.state_dict()))
        with torch.no_grad():
            net.task_tokens.weight[task_index] = best[0]
        head.load_state_dict(best[1])
        token_change = float((best[0] - initial_token).norm())
    finally:
        for name, p in net.named_parameters():
            p.requires_grad_(frozen[name])
        net.train(was_training)
    head.eval()
    log.info(
        "task token %d: %d train / %d held-out users, held-out loss %.4f -> %.4f in %.1f s",
        task_index,
        len(train),
        len(valid),
        initial_loss,
        best_loss,
        time.perf_counter() - started,
    )
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
