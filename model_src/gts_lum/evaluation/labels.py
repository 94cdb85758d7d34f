"""Label and uplift tasks of a data set's `labels` table, and their evaluation on user embeddings.

Tasks are read from the data, never named in code. A task (the rows of one `task` value) is
- `uplift` when its `treatment` column holds both 0 and 1 (a randomized campaign); its label must be 0/1;
- `binary` when its labels are {0, 1};
- `multiclass` when its labels are integers with 2..`max_classes` (default 20) distinct values, e.g.
  a plan tier; classes are the sorted distinct values (class index 0 = the smallest).
Anything else (fractions, or integers with more values: a regression) is an error naming the task.

`evaluate_label_tasks` fits a head on frozen user embeddings for every task and reports it on held-out
users beside a gradient-boosted baseline on the raw users table, the same trees on the table and the user
embedding together (whether behaviour adds what the table lacks), and a random-score floor:

    from gts_lum.config import load_config
    from gts_lum.modeling.heads import HeadsConfig
    results = evaluate_label_tasks(embed_users, clean_dir, load_config(HeadsConfig, "pkg:heads/default.yaml"))
    print(format_label_table(results))
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from gts_lum.data.contract import read_table
from gts_lum.evaluation.uplift import (
    auuc,
    average_treatment_effect,
    categorical_mask,
    gbt_proba,
    qini_coefficient,
    t_learner_uplift,
    table_features,
)
from gts_lum.modeling.heads import KINDS, HeadsConfig, LabelTask, UpliftHead, build_head, fit_head  # noqa: F401 (KINDS, LabelTask: re-exported)
from gts_lum.sequence.splits import holdout

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("user_id", "task", "label")
RANDOM_DRAWS = 100  # random-score draws behind the floor's mean and spread
EmbedFn = Callable[[np.ndarray, "LabelTask"], "np.ndarray | dict[str, np.ndarray]"]
TuneFn = Callable[["LabelTask", np.ndarray, np.ndarray, "np.ndarray | None"], dict]


def _check_columns(labels_df: pd.DataFrame) -> None:
    absent = [c for c in LABEL_COLUMNS if c not in labels_df.columns]
    if absent:
        raise KeyError(f"labels table lacks column(s) {absent}; it has {list(labels_df.columns)}")


def _sample(values: np.ndarray, n: int = 5) -> list:
    return [v.item() if hasattr(v, "item") else v for v in values[:n]]


def _task_of(name: str, labels: np.ndarray, treatment: np.ndarray | None, max_classes: int) -> LabelTask:
    labels = labels[~np.isnan(labels)]
    if not len(labels):
        raise ValueError(f"labels task {name!r}: every label is missing")
    values = np.unique(labels)
    arms = set() if treatment is None else set(np.unique(treatment[~np.isnan(treatment)]).tolist())
    if arms - {0.0, 1.0}:
        raise ValueError(f"labels task {name!r}: treatment must be 0/1 (or missing); it holds {sorted(arms - {0.0, 1.0})[:5]}")
    if arms == {0.0, 1.0}:
        if not set(values.tolist()) <= {0.0, 1.0}:
            raise ValueError(f"labels task {name!r} has a treatment (an uplift task) but its labels are not 0/1: {_sample(values)}")
        return LabelTask(name, "uplift")
    if arms:
        log.warning("labels task %r: treatment holds only arm %s; evaluated as a plain label task", name, arms.pop())
    if set(values.tolist()) == {0.0, 1.0}:
        return LabelTask(name, "binary")
    fractional = values[values != np.round(values)]
    if len(fractional):
        raise ValueError(f"labels task {name!r}: labels are neither 0/1 nor integer classes; offending values {_sample(fractional)}")
    if len(values) < 2:
        raise ValueError(f"labels task {name!r}: every label is {values[0]:g}; a task needs at least two classes")
    if len(values) > max_classes:
        raise ValueError(
            f"labels task {name!r}: {len(values)} distinct integer labels (more than max_classes={max_classes}; "
            f"regression tasks are not supported), e.g. {_sample(values)}"
        )
    return LabelTask(name, "multiclass", len(values), tuple(float(v) for v in values))


def discover_tasks(labels_df: pd.DataFrame, max_classes: int = 20) -> list[LabelTask]:
    """Every task of the labels table with its kind (see the module docstring), sorted by name."""
    _check_columns(labels_df)
    if labels_df["task"].isna().any():
        raise ValueError(f"labels table: column 'task' is missing in row {int(np.flatnonzero(labels_df['task'].isna())[0])}")
    label = pd.to_numeric(labels_df["label"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    unparsable = np.isnan(label) & labels_df["label"].notna().to_numpy()
    if unparsable.any():
        row = int(np.flatnonzero(unparsable)[0])
        raise ValueError(
            f"labels table: label in row {row} (task {labels_df['task'].iloc[row]!r}) is not a number: {labels_df['label'].iloc[row]!r}"
        )
    treatment = (
        pd.to_numeric(labels_df["treatment"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        if "treatment" in labels_df.columns
        else None
    )
    tasks = labels_df["task"].astype(str).to_numpy()
    out = []
    for name in sorted(set(tasks)):
        rows = tasks == name
        out.append(_task_of(name, label[rows], None if treatment is None else treatment[rows], max_classes))
    log.info(
        "label tasks: %s", ", ".join(f"{t.name} ({t.kind}{f', {t.num_classes} classes' if t.kind == 'multiclass' else ''})" for t in out)
    )
    return out


def label_arrays(labels_df: pd.DataFrame, user_ids: np.ndarray, task: LabelTask | str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(user_index, y, treatment) of `task` for the users in `user_ids`, in the order of `user_ids`.

    user_index: (M,) int64 positions in `user_ids`; y: (M,) int64 class index (0/1 for binary and uplift
    tasks); treatment: (M,) float32 0/1 for uplift tasks, else None. Labels of users not in `user_ids`,
    rows with a missing label (or, for uplift, a missing treatment) are counted and logged; of several
    rows for one user the latest by `time` is kept (the last in table order among equal times).
    """
    _check_columns(labels_df)
    user_ids = np.asarray(user_ids).astype(str)
    position = pd.Index(user_ids)
    if not position.is_unique:
        raise ValueError(f"label_arrays: user_ids holds duplicates, e.g. {position[position.duplicated()][:3].tolist()}")
    name = task.name if isinstance(task, LabelTask) else str(task)
    rows = labels_df[labels_df["task"].astype(str) == name]
    if not len(rows):
        raise KeyError(
            f"label_arrays: no rows of task {name!r} in the labels table; its tasks: {sorted(labels_df['task'].astype(str).unique())}"
        )
    if not isinstance(task, LabelTask):
        (task,) = discover_tasks(rows)
    rows = rows.assign(_order=np.arange(len(rows)))
    if "time" in rows.columns:
        rows = rows.sort_values(["time", "_order"], na_position="first", kind="stable")
    users = rows["user_id"].astype(str)
    duplicated = users.duplicated(keep="last").to_numpy()
    if duplicated.any():
        log.warning("task %r: %d duplicate (user, task) row(s); the latest by time is kept", name, int(duplicated.sum()))
    rows, users = rows[~duplicated], users[~duplicated]
    index = position.get_indexer(users)
    unknown = index < 0
    if unknown.any():
        log.warning(
            "task %r: %d labelled user(s) not among the %d users given are left out, e.g. %s",
            name,
            int(unknown.sum()),
            len(user_ids),
            users[unknown].iloc[:3].tolist(),
        )
    label = pd.to_numeric(rows["label"]).to_numpy(np.float64, na_value=np.nan)
    treatment = pd.to_numeric(rows["treatment"]).to_numpy(np.float64, na_value=np.nan) if task.kind == "uplift" else None
    missing = np.isnan(label) if treatment is None else np.isnan(label) | np.isnan(treatment)
    if (missing & ~unknown).any():
        log.warning(
            "task %r: %d row(s) without a label%s left out",
            name,
            int((missing & ~unknown).sum()),
            "" if treatment is None else " or treatment",
        )
    keep = ~unknown & ~missing
    class_index = pd.Index(task.classes).get_indexer(label[keep])
    if (class_index < 0).any():
        bad = label[keep][class_index < 0]
        raise ValueError(f"task {name!r}: label(s) {_sample(np.unique(bad))} are not among the task's classes {list(task.classes)}")
    order = np.argsort(index[keep], kind="stable")
    user_index = index[keep][order].astype(np.int64)
    y = class_index[order].astype(np.int64)
    return user_index, y, None if treatment is None else treatment[keep][order].astype(np.float32)


# -- metrics ------------------------------------------------------------------------------------------


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC; NaN (logged) when the evaluated users hold a single class."""
    if len(np.unique(y)) < 2:
        log.warning("ROC-AUC undefined: the evaluated users hold one class only")
        return float("nan")
    return float(roc_auc_score(y, score))


def _metrics(task: LabelTask, y: np.ndarray, score: np.ndarray, treatment: np.ndarray | None) -> dict[str, float]:
    """binary: score (N,) P(1) -> auc; multiclass: score (N, C) -> accuracy, macro_auc; uplift: score (N,) uplift."""
    if task.kind == "binary":
        return {"auc": _auc(y, score)}
    if task.kind == "multiclass":
        # Mean one-vs-rest AUC over the classes both present and absent among the evaluated users.
        aucs = [roc_auc_score(y == c, score[:, c]) for c in range(task.num_classes) if 0 < (y == c).sum() < len(y)]
        return {"accuracy": float((score.argmax(1) == y).mean()), "macro_auc": float(np.mean(aucs)) if aucs else float("nan")}
    if treatment.min() == treatment.max():
        log.warning("task %r: the evaluated users hold one treatment arm only; uplift metrics undefined", task.name)
        return {"qini": float("nan"), "auuc": float("nan")}
    return {"qini": qini_coefficient(score, y, treatment), "auuc": auuc(score, y, treatment)}


def _baseline_scores(
    task: LabelTask,
    X: np.ndarray,
    categorical: np.ndarray,
    y: np.ndarray,
    t: np.ndarray | None,
    train: np.ndarray,
    test: np.ndarray,
    seed: int,
) -> np.ndarray:
    """Gradient-boosted trees on the raw users table: P(1), class probabilities, or T-learner uplift."""
    if task.kind == "uplift":
        return t_learner_uplift(X[train], y[train], t[train], X[test], seed, categorical)
    if len(np.unique(y[train])) < 2:
        log.warning("task %r: training users hold one class only; the table baseline predicts it", task.name)
        return (
            np.full(len(test), float(y[train][0])) if task.kind == "binary" else np.eye(task.num_classes)[np.full(len(test), y[train][0])]
        )
    classes, proba = gbt_proba(X[train], y[train], X[test], seed, categorical)
    if task.kind == "binary":
        return proba[:, list(classes).index(1)]
    full = np.zeros((len(test), task.num_classes))
    full[:, classes] = proba  # classes absent from training keep probability 0
    return full


def _random_metrics(task: LabelTask, y: np.ndarray, treatment: np.ndarray | None, seed: int, draws: int = RANDOM_DRAWS) -> dict[str, float]:
    """Mean and spread ("<metric>_std") of each metric over seeded random scores: how far from chance a
    model must be before the test users can tell it apart."""
    rng = np.random.default_rng([seed, 7])
    shape = (len(y), task.num_classes) if task.kind == "multiclass" else (len(y),)
    first = _metrics(task, y, rng.random(shape), treatment)
    if all(np.isnan(v) for v in first.values()):  # undefined on these users (one class or arm): say so once
        return {**first, **{f"{k}_std": float("nan") for k in first}}
    runs = pd.DataFrame([first] + [_metrics(task, y, rng.random(shape), treatment) for _ in range(draws - 1)])
    return {**runs.mean().to_dict(), **{f"{k}_std": v for k, v in runs.std(ddof=0).to_dict().items()}}


def _head_scores(head, emb: torch.Tensor) -> np.ndarray:
    scores = head.uplift(emb) if isinstance(head, UpliftHead) else head.predict_proba(emb)
    return scores.cpu().numpy().astype(np.float64)


# -- evaluation ---------------------------------------------------------------------------------------


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
    """A head on each input; the one with the lowest held-out loss (on training users) wins: (name, head, fit)."""
    fits = {}
    for name, emb in inputs.items():
        head = build_head(task, emb.shape[1], cfg)
        fits[name] = (head, fit_head(head, emb, y, t, seed=seed, **dataclasses.asdict(cfg.train)))
    loss = {name: fit["valid_loss"] if np.isfinite(fit["valid_loss"]) else np.inf for name, (_, fit) in fits.items()}
    name = min(fits, key=loss.get)  # ties (and no held-out rows) keep the first input
    if len(fits) > 1:
        log.info("task %r: head inputs by held-out loss %s: %s", task.name, {k: round(v, 4) for k, v in loss.items()}, name)
    return name, *fits[name]


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
    fitted on each and the one with the lowest held-out loss on the training users is kept (entry "input").
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
    labels = read_table(clean_dir, "labels")
    if labels is None:
        raise FileNotFoundError(f"{clean_dir}: the data set has no labels table")
    unknown = 0
    if known_users is not None:
        keep = labels["user_id"].astype(str).isin(np.asarray(known_users).astype(str))
        unknown = int(labels.loc[~keep, "user_id"].nunique())
        if unknown:
            log.warning("labels: %d labelled users have no events and are left out (%d label rows)", unknown, int((~keep).sum()))
        labels = labels[keep]
    tasks = discover_tasks(labels, cfg.max_classes)
    user_ids = np.unique(labels["user_id"].astype(str).to_numpy())
    train_users, test_users = holdout(len(user_ids), cfg.test_fraction, seed)
    if not len(train_users) or not len(test_users):
        n, fraction = len(user_ids), cfg.test_fraction
        raise ValueError(f"label tasks: {n} labelled users and test_fraction {fraction} leave an empty train or test set")
    is_train = np.zeros(len(user_ids), bool)
    is_train[train_users] = True

    users = read_table(clean_dir, "users")
    if users is None:
        log.warning("%s: no users table; the table baseline is left out", clean_dir)
        features = categorical = None
    else:
        users = users.assign(user_id=users["user_id"].astype(str)).drop_duplicates("user_id", keep="last")
        aligned = users.set_index("user_id").reindex(user_ids).reset_index()  # labelled users without a row: all NaN
        features, categorical = table_features(aligned), categorical_mask(aligned)

    results = {}
    for task in tqdm(tasks, desc="label tasks", unit="task", disable=None):
        index, y, t = label_arrays(labels, user_ids, task)
        train, test = np.flatnonzero(is_train[index]), np.flatnonzero(~is_train[index])
        if not len(train) or not len(test):
            log.warning("task %r: %d train / %d test users; skipped", task.name, len(train), len(test))
            continue
        tuned = None if tune is None else tune(task, user_ids[index][train], y[train], None if t is None else t[train])
        inputs = _embed(embed_users, user_ids[index], task)
        t_train = None if t is None else t[train]
        chosen, head, fit = _fit_best_head(task, {k: v[train] for k, v in inputs.items()}, y[train], t_train, cfg, seed)
        emb = inputs[chosen]
        y_test, t_test = y[test], None if t is None else t[test]
        scores = _head_scores(head, emb[test])
        metrics = {"head": _metrics(task, y_test, scores, t_test)}
        if features is not None:
            baseline = _baseline_scores(task, features[index], categorical, y, t, train, test, seed)
            metrics["table_gbt"] = _metrics(task, y_test, baseline, t_test)
            # the same trees given the user embedding too: does behaviour add what the table lacks?
            stacked = np.hstack([features[index], emb.numpy().astype(np.float64)])
            with_embedding = np.concatenate([categorical, np.zeros(emb.shape[1], bool)])
            stacked_scores = _baseline_scores(task, stacked, with_embedding, y, t, train, test, seed)
            metrics["table_gbt_embedding"] = _metrics(task, y_test, stacked_scores, t_test)
        metrics["random"] = _random_metrics(task, y_test, t_test, seed)
        entry = {
            "kind": task.kind,
            "num_classes": task.num_classes,
            "n_train": int(len(train)),
            "n_test": int(len(test)),
            "embedding_dim": int(emb.shape[1]),
            "input": chosen,
            "fit": fit,
            "metrics": metrics,
        }
        if tuned is not None:
            entry["task_token"] = tuned
        if on_head is not None:
            tables = {"table_gbt": baseline, "table_gbt_embedding": stacked_scores} if features is not None else {}
            on_head(task, head, {"head": scores, **tables, "y": y_test, "treatment": t_test, "input": chosen})
        if task.kind == "multiclass":
            entry["class_counts"] = np.bincount(y, minlength=task.num_classes).tolist()
        else:
            entry["positive_rate"] = float(y.mean())
        if task.kind == "binary":
            entry["curves"] = binary_curves(y_test, scores, float(y[train].mean()))
        if task.kind == "uplift":
            entry["ate_test"] = average_treatment_effect(y_test, t_test) if t_test.min() != t_test.max() else float("nan")
            entry["treated_rate"] = float(t.mean())
        results[task.name] = entry
        log.info("task %s (%s): %s", task.name, task.kind, {k: {m: round(v, 4) for m, v in d.items()} for k, d in metrics.items()})
    users_info = {"labelled": len(user_ids), "train": int(is_train.sum()), "left_out_without_events": unknown}
    return {"tasks": results, "config": dataclasses.asdict(cfg), "seed": seed, "users": users_info}


METRIC_NAMES = {"auc": "ROC-AUC", "accuracy": "accuracy", "macro_auc": "macro ROC-AUC", "qini": "Qini coefficient", "auuc": "AUUC"}


def binary_curves(y: np.ndarray, scores: np.ndarray, positive_rate: float, max_points: int = 200) -> dict:
    """The held-out ROC curve (at most `max_points` points) and the confusion matrix of a binary head, for
    a person to look at (the Kubeflow UI's ClassificationMetrics). The matrix flags as positive the same
    share of users as the training labels hold, so it does not depend on the head's calibration."""
    from sklearn.metrics import confusion_matrix, roc_curve

    fpr, tpr, thresholds = roc_curve(y, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).round().astype(int))
    cut = np.quantile(scores, 1.0 - positive_rate) if 0.0 < positive_rate < 1.0 else 0.5
    matrix = confusion_matrix(y, (scores >= cut).astype(int), labels=[0, 1])
    finite = np.where(np.isfinite(thresholds[keep]), thresholds[keep], np.nan_to_num(thresholds[keep], posinf=1.0))
    return {
        "fpr": fpr[keep].tolist(),
        "tpr": tpr[keep].tolist(),
        "thresholds": finite.tolist(),
        "threshold": float(cut),
        "confusion_matrix": matrix.tolist(),
        "categories": ["0", "1"],
    }


def format_label_table(results: dict) -> str:
    """Markdown table: one row per task and metric, the head beside the table baseline and the random
    floor (mean ± standard deviation over random scorings)."""
    lines = [
        "| task | kind | test users | metric | head | table GBT | table GBT + embedding | random (mean ± sd) |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, entry in results["tasks"].items():
        metrics = entry["metrics"]
        for metric in metrics["head"]:
            cells = [f"{metrics[s][metric]:.4f}" if s in metrics else "-" for s in ("head", "table_gbt", "table_gbt_embedding")]
            cells.append(f"{metrics['random'][metric]:.4f} ± {metrics['random'][metric + '_std']:.4f}")
            lines.append(
                f"| {name} | {entry['kind']} | {entry['n_test']} | {METRIC_NAMES.get(metric, metric)} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)
