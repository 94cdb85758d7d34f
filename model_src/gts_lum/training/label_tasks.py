"""The label tasks' probe: per task of a data set's `labels` table a head fitted on frozen user embeddings
of training users (`training.heads.fit_head`), reported on held-out users beside a gradient-boosted
baseline on the raw users table, the same trees on the table and the user embedding together (whether
behaviour adds what the table lacks), and a random-score floor (the figures of `evaluation.labels`):

    from gts_lum.config import load_config
    from gts_lum.evaluation.labels import format_label_table
    from gts_lum.modeling.heads import HeadsConfig
    results = evaluate_label_tasks(embed_users, clean_dir, load_config(HeadsConfig, "pkg:heads/default.yaml"))
    print(format_label_table(results))

It lives in training/, not evaluation/, because it trains: evaluation/ sits below training/ (the
training loops validate with `evaluation.protocol`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gts_lum.data.contract import read_table
from gts_lum.evaluation.labels import (
    baseline_scores,
    binary_curves,
    discover_tasks,
    head_scores,
    label_arrays,
    random_metrics,
    task_metrics,
)
from gts_lum.evaluation.uplift import average_treatment_effect, categorical_mask, table_features
from gts_lum.modeling.heads import HeadsConfig, LabelTask, build_head
from gts_lum.sequence.splits import holdout
from gts_lum.training.heads import fit_head

log = logging.getLogger(__name__)

EmbedFn = Callable[[np.ndarray, LabelTask], "np.ndarray | dict[str, np.ndarray]"]
TuneFn = Callable[[LabelTask, np.ndarray, np.ndarray, "np.ndarray | None"], dict]


@dataclass
class _LabelledUsers:
    """The users every task is evaluated on, split once: a user is on the same side for every task."""

    ids: np.ndarray  # (U,) str, sorted
    is_train: np.ndarray  # (U,) bool
    features: np.ndarray | None  # (U, F) users-table features (labelled users without a row: NaN); None: no table
    categorical: np.ndarray | None  # (F,) bool: which features are categories


def _known_labels(clean_dir: Path, known_users: np.ndarray | None) -> tuple[pd.DataFrame, int]:
    """The labels table without users outside `known_users` (no events to embed), and their count."""
    labels = read_table(clean_dir, "labels")
    if labels is None:
        raise FileNotFoundError(f"{clean_dir}: the data set has no labels table")
    if known_users is None:
        return labels, 0
    keep = labels["user_id"].astype(str).isin(np.asarray(known_users).astype(str))
    unknown = int(labels.loc[~keep, "user_id"].nunique())
    if unknown:
        log.warning("labels: %d labelled users have no events and are left out (%d label rows)", unknown, int((~keep).sum()))
    return labels[keep], unknown


def _labelled_users(clean_dir: Path, labels: pd.DataFrame, test_fraction: float, seed: int) -> _LabelledUsers:
    """Every labelled user, a seeded `test_fraction` of them held out, with the users table's features."""
    ids = np.unique(labels["user_id"].astype(str).to_numpy())
    train, test = holdout(len(ids), test_fraction, seed)
    if not len(train) or not len(test):
        raise ValueError(f"label tasks: {len(ids)} labelled users and test_fraction {test_fraction} leave an empty train or test set")
    is_train = np.zeros(len(ids), bool)
    is_train[train] = True
    users = read_table(clean_dir, "users")
    if users is None:
        log.warning("%s: no users table; the table baseline is left out", clean_dir)
        return _LabelledUsers(ids, is_train, None, None)
    users = users.assign(user_id=users["user_id"].astype(str)).drop_duplicates("user_id", keep="last")
    aligned = users.set_index("user_id").reindex(ids).reset_index()  # labelled users without a row: all NaN
    return _LabelledUsers(ids, is_train, table_features(aligned), categorical_mask(aligned))


def _embed(embed_users: EmbedFn, ids: np.ndarray, task: LabelTask) -> dict[str, torch.Tensor]:
    """{input name: (M, D) embeddings}: what `embed_users` returned, one array named "embedding" or several."""
    given = embed_users(ids, task)
    out = {}
    for name, emb in (given if isinstance(given, dict) else {"embedding": given}).items():
        emb = emb.detach() if isinstance(emb, torch.Tensor) else torch.as_tensor(np.asarray(emb))
        if emb.dim() != 2 or emb.shape[0] != len(ids):
            shape = tuple(emb.shape)
            raise ValueError(f"embed_users for task {task.name!r} ({name}): expected an array ({len(ids)}, D), got shape {shape}")
        out[name] = emb.float()
    return out


def _fit_best_head(task: LabelTask, inputs: dict[str, torch.Tensor], y: np.ndarray, t: np.ndarray | None, cfg: HeadsConfig, seed: int):
    """A head on each input; the one with the lowest held-out loss on the training users wins (the mean over
    `cfg.select_folds` folds, else the head's own held-out slice), fitted on every training user:
    (name, head, fit, {input: loss}; empty with one input)."""

    def fit(emb: torch.Tensor):
        head = build_head(task, emb.shape[1], cfg)
        return head, fit_head(head, emb, y, t, seed=seed, **dataclasses.asdict(cfg.train))

    splits = _fold_splits(task, y, t, cfg, seed) if len(inputs) > 1 else None
    fits, loss = {}, {}
    for name, emb in inputs.items():
        if splits is not None:
            loss[name] = _cross_validated_loss(task, emb, y, t, splits, cfg, seed)
        else:  # one input, or too few rows of a class for folds: the full fit's own held-out slice
            fits[name] = fit(emb)
            loss[name] = fits[name][1]["valid_loss"]
    loss = {name: value if np.isfinite(value) else np.inf for name, value in loss.items()}
    name = min(loss, key=loss.get)  # ties (and no held-out rows) keep the first input
    if len(inputs) > 1:
        how = "held-out" if splits is None else f"{len(splits)}-fold"
        log.info("task %r: head inputs by %s loss %s: %s", task.name, how, {k: round(v, 4) for k, v in loss.items()}, name)
    return name, *(fits[name] if name in fits else fit(inputs[name])), (loss if len(inputs) > 1 else {})


def _fold_splits(task: LabelTask, y: np.ndarray, t: np.ndarray | None, cfg: HeadsConfig, seed: int) -> list | None:
    """[(rest rows, fold rows)] of `cfg.select_folds` folds, stratified as the heads' held-out slice is; None for
    fewer than 2 folds or when a stratum is too small to cut two."""
    from sklearn.model_selection import StratifiedKFold

    yt = torch.as_tensor(np.asarray(y), dtype=torch.float32)
    tt = None if t is None else torch.as_tensor(np.asarray(t), dtype=torch.float32)
    strata = build_head(task, 1, cfg).stratum(yt, tt).numpy()  # a head's strata do not depend on its width
    counts = np.unique(strata, return_counts=True)[1]
    folds = min(cfg.select_folds, int(counts.min())) if len(counts) else 0
    if folds < 2:
        return None
    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(strata)), strata))


def _cross_validated_loss(
    task: LabelTask, emb: torch.Tensor, y: np.ndarray, t: np.ndarray | None, splits: list, cfg: HeadsConfig, seed: int
) -> float:
    """Mean loss on each fold of `splits` of a head fitted on the other rows: a choice of input on all training
    users, where one 20% slice of ~1,000 users swung it (BENCHMARKS.md "Label tasks")."""
    y, t = np.asarray(y), None if t is None else np.asarray(t)
    total = 0.0
    for rest, fold in splits:
        head = build_head(task, emb.shape[1], cfg)
        fit_head(head, emb[rest], y[rest], None if t is None else t[rest], seed=seed, **dataclasses.asdict(cfg.train))
        head.eval()
        with torch.no_grad():
            y_fold = torch.as_tensor(y[fold], dtype=torch.float32)
            t_fold = None if t is None else torch.as_tensor(t[fold], dtype=torch.float32)
            total += float(head.loss(head(emb[fold].float()), y_fold, t_fold)) * len(fold)
    return total / sum(len(fold) for _, fold in splits)


def _table_scores(task: LabelTask, features: np.ndarray, categorical: np.ndarray, emb: torch.Tensor, y, t, train, test, seed: int) -> dict:
    """Held-out scores of the trees on the users table, and of the same trees given the user embedding
    too: does behaviour add what the table lacks?"""
    stacked = np.hstack([features, emb.numpy().astype(np.float64)])
    with_embedding = np.concatenate([categorical, np.zeros(emb.shape[1], bool)])
    return {
        "table_gbt": baseline_scores(task, features, categorical, y, t, train, test, seed),
        "table_gbt_embedding": baseline_scores(task, stacked, with_embedding, y, t, train, test, seed),
    }


def _label_figures(task: LabelTask, y: np.ndarray, t: np.ndarray | None, train: np.ndarray, test: np.ndarray, scores: np.ndarray) -> dict:
    """What the task's labels look like: class counts or positive rate; the binary head's held-out curves;
    the uplift task's test-set treatment effect and treated share."""
    out = (
        {"class_counts": np.bincount(y, minlength=task.num_classes).tolist()}
        if task.kind == "multiclass"
        else {"positive_rate": float(y.mean())}
    )
    if task.kind == "binary":
        out["curves"] = binary_curves(y[test], scores, float(y[train].mean()))
    if task.kind == "uplift":
        t_test = t[test]
        out["ate_test"] = average_treatment_effect(y[test], t_test) if t_test.min() != t_test.max() else float("nan")
        out["treated_rate"] = float(t.mean())
    return out


def _evaluate_task(
    task: LabelTask,
    labels: pd.DataFrame,
    users: _LabelledUsers,
    embed_users: EmbedFn,
    cfg: HeadsConfig,
    seed: int,
    tune: TuneFn | None = None,
    on_head: Callable | None = None,
) -> dict | None:
    """One task's entry of `evaluate_label_tasks` (see there); None when one side of the split holds none of its users."""
    index, y, t = label_arrays(labels, users.ids, task)
    train, test = np.flatnonzero(users.is_train[index]), np.flatnonzero(~users.is_train[index])
    if not len(train) or not len(test):
        log.warning("task %r: %d train / %d test users; skipped", task.name, len(train), len(test))
        return None
    t_train, t_test = (None, None) if t is None else (t[train], t[test])
    tuned = None if tune is None else tune(task, users.ids[index][train], y[train], t_train)
    inputs = _embed(embed_users, users.ids[index], task)
    chosen, head, fit, input_losses = _fit_best_head(task, {k: v[train] for k, v in inputs.items()}, y[train], t_train, cfg, seed)
    emb = inputs[chosen]
    scores = {"head": head_scores(head, emb[test])}
    if users.features is not None:
        scores |= _table_scores(task, users.features[index], users.categorical, emb, y, t, train, test, seed)
    metrics = {name: task_metrics(task, y[test], s, t_test) for name, s in scores.items()}
    metrics["random"] = random_metrics(task, y[test], t_test, seed)
    entry = {
        "kind": task.kind,
        "num_classes": task.num_classes,
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "embedding_dim": int(emb.shape[1]),
        "input": chosen,
        "fit": fit,
        "input_losses": {k: float(v) if np.isfinite(v) else None for k, v in input_losses.items()},
        "metrics": metrics,
    }
    if tuned is not None:
        entry["task_token"] = tuned
    if on_head is not None:
        on_head(task, head, {**scores, "y": y[test], "treatment": t_test, "input": chosen})
    entry |= _label_figures(task, y, t, train, test, scores["head"])
    log.info("task %s (%s): %s", task.name, task.kind, {k: {m: round(v, 4) for m, v in d.items()} for k, d in metrics.items()})
    return entry


def evaluate_label_tasks(
    embed_users: EmbedFn,
    clean_dir: str | Path,
    cfg: HeadsConfig,
    seed: int = 0,
    tune: TuneFn | None = None,
    known_users: np.ndarray | None = None,
    on_head: Callable | None = None,
) -> dict:
    """Fit a head per task on embeddings of training users; report on held-out users.

    `embed_users(user_ids (M,) str array, task) -> (M, D)` embeds users for one task (the decoder puts
    that task's TASK token in front); it may return {name: (M, D_name)} instead, several inputs: a head is
    fitted on each and the one with the lowest held-out loss on the training users is kept (entry "input";
    "input_losses": each input's mean loss over `cfg.select_folds` folds of the training users).
    `tune(task, user_ids, y, treatment)`, when given, is called with the task's training users first
    (GTS-LUM tunes the task token there: training.task_tokens). Users are split once over every labelled
    user, so a user is on the same side for every task; with `known_users`, labelled users outside it (no
    events to embed) are counted and left out.
    `on_head(task, head, scores)` receives each kept head and its held-out scores (to save or plot them;
    scores["input"] names the input it reads).
    Returns {"tasks": {name: {...}}, "config", "seed", "users"}; each task holds its kind, counts, the
    head's fit stats and "metrics": {"head", "table_gbt", "table_gbt_embedding" (the same trees on the
    table and the user embedding), "random"} -> {"auc"} (binary),
    {"accuracy", "macro_auc"} (multiclass) or {"qini", "auuc"} (uplift).
    """
    clean_dir = Path(clean_dir)
    labels, unknown = _known_labels(clean_dir, known_users)
    tasks = discover_tasks(labels, cfg.max_classes)
    users = _labelled_users(clean_dir, labels, cfg.test_fraction, seed)
    results = {}
    for task in tqdm(tasks, desc="label tasks", unit="task", disable=None):
        entry = _evaluate_task(task, labels, users, embed_users, cfg, seed, tune, on_head)
        if entry is not None:
            results[task.name] = entry
    users_info = {"labelled": len(users.ids), "train": int(users.is_train.sum()), "left_out_without_events": unknown}
    return {"tasks": results, "config": dataclasses.asdict(cfg), "seed": seed, "users": users_info}
