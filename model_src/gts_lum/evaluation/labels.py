"""Label and uplift tasks of a data set's `labels` table, and the figures they are evaluated by.

Tasks are read from the data, never named in code. A task (the rows of one `task` value) is
- `uplift` when its `treatment` column holds both 0 and 1 (a randomized campaign); its label must be 0/1;
- `binary` when its labels are {0, 1};
- `multiclass` when its labels are integers with 2..`max_classes` (default 20) distinct values, e.g.
  a plan tier; classes are the sorted distinct values (class index 0 = the smallest).
Anything else (fractions, or integers with more values: a regression) is an error naming the task.

Here: the tasks (`discover_tasks`) and their arrays (`label_arrays`), the metrics of a task's scores,
the gradient-boosted baselines on the raw users table, the random-score floor and the report table.
Nothing here trains a head: `training.label_tasks.evaluate_label_tasks` fits one per task on frozen user
embeddings and reports it with these figures on held-out users.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from gts_lum.evaluation.uplift import auuc, gbt_proba, qini_coefficient, t_learner_uplift
from gts_lum.modeling.heads import KINDS, LabelTask, UpliftHead  # noqa: F401 (KINDS, LabelTask: re-exported)

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("user_id", "task", "label")
RANDOM_DRAWS = 100  # random-score draws behind the floor's mean and spread


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


def task_metrics(task: LabelTask, y: np.ndarray, score: np.ndarray, treatment: np.ndarray | None) -> dict[str, float]:
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


def baseline_scores(
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


def random_metrics(task: LabelTask, y: np.ndarray, treatment: np.ndarray | None, seed: int, draws: int = RANDOM_DRAWS) -> dict[str, float]:
    """Mean and spread ("<metric>_std") of each metric over seeded random scores: how far from chance a
    model must be before the test users can tell it apart."""
    rng = np.random.default_rng([seed, 7])
    shape = (len(y), task.num_classes) if task.kind == "multiclass" else (len(y),)
    first = task_metrics(task, y, rng.random(shape), treatment)
    if all(np.isnan(v) for v in first.values()):  # undefined on these users (one class or arm): say so once
        return {**first, **{f"{k}_std": float("nan") for k in first}}
    runs = pd.DataFrame([first] + [task_metrics(task, y, rng.random(shape), treatment) for _ in range(draws - 1)])
    return {**runs.mean().to_dict(), **{f"{k}_std": v for k, v in runs.std(ddof=0).to_dict().items()}}


def head_scores(head, emb: torch.Tensor) -> np.ndarray:
    """A fitted head's scores of embeddings (N, D): (N,) P(1), (N, C) class probabilities or (N,) uplift."""
    scores = head.uplift(emb) if isinstance(head, UpliftHead) else head.predict_proba(emb)
    return scores.cpu().numpy().astype(np.float64)


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
