"""Benchmark: how much a table encoder keeps of what a table says about a label (telco churn ROC-AUC).

One fixed, seeded, stratified split of the IBM Telco customers; each row encoder is frozen and read by
a logistic regression, against a gradient-boosted tree (sklearn HistGradientBoostingClassifier) and a
one-hot logistic regression on the raw columns. The `learned` encoder is pretrained on the training
customers' churn labels; its own head is reported too.

    from gts_lum.stages.table_bench import telco_auc_comparison
    telco_auc_comparison("/work/shared/data/telco-churn")   # -> {"auc": {...}, "seconds": {...}, ...}

Any other table with a 0/1 label comes in through its own column mapping (`mapping`, `task`): users
(one row per customer, attribute columns) and labels of `task`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import make_column_transformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from gts_lum.config import load_config
from gts_lum.data.contract import read_table
from gts_lum.data.ingest import prepare_dataset
from gts_lum.encoders.table import LearnedTableEncoder, TableEncoderConfig, TextFn, build_table_encoder
from gts_lum.training.table_encoder import fit_table_encoder

log = logging.getLogger(__name__)


TELCO_MAPPING = "pkg:adapters/telco_churn.yaml"


def telco_table(
    data_dir: str | Path, workdir: str | Path, mapping: str = TELCO_MAPPING, task: str = "churn"
) -> tuple[pd.DataFrame, np.ndarray]:
    """Customers (users table, user_id first) and their `task` labels (0/1), row-aligned."""
    clean = prepare_dataset(data_dir, workdir, mapping=mapping, progress=False)
    users, labels = read_table(clean, "users"), read_table(clean, "labels")
    if users is None or labels is None or task not in set(labels["task"]):
        have = "no users table" if users is None else "no labels table" if labels is None else f"label tasks {sorted(set(labels['task']))}"
        raise ValueError(f"table-auc: {data_dir} (mapping {mapping}) has {have}: it needs users and labels of task {task!r}")
    churn = labels[labels["task"] == task].set_index("user_id")["label"]
    users = users[users["user_id"].isin(churn.index)].reset_index(drop=True)
    return users, churn.loc[users["user_id"]].to_numpy(np.int64)


def frozen_logreg_auc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int) -> float:
    """ROC-AUC of a standardized logistic regression read-out of frozen features."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    probe.fit(train_x, train_y)
    return float(roc_auc_score(test_y, probe.predict_proba(test_x)[:, 1]))


def raw_baselines(train: pd.DataFrame, test: pd.DataFrame, train_y: np.ndarray, test_y: np.ndarray, seed: int) -> dict[str, float]:
    """Gradient-boosted trees (native categorical splits, missing values as is) and one-hot LR on the raw columns."""
    categorical = [c for c in train.columns if not pd.api.types.is_numeric_dtype(train[c])]
    numeric = [c for c in train.columns if c not in categorical]

    def typed(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.astype({c: pd.CategoricalDtype(sorted(train[c].dropna().unique())) for c in categorical})

    gbt = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=seed).fit(typed(train), train_y)
    onehot = make_column_transformer(
        (OneHotEncoder(handle_unknown="ignore"), categorical),
        (make_pipeline(StandardScaler()), numeric),
    )
    logreg = make_pipeline(onehot, LogisticRegression(max_iter=5000, random_state=seed))
    logreg.fit(train.fillna({c: 0.0 for c in numeric}), train_y)
    return {
        "gbt_raw": float(roc_auc_score(test_y, gbt.predict_proba(typed(test))[:, 1])),
        "logreg_raw": float(roc_auc_score(test_y, logreg.predict_proba(test.fillna({c: 0.0 for c in numeric}))[:, 1])),
    }


def telco_auc_comparison(
    data_dir: str | Path,
    mapping: str = TELCO_MAPPING,
    task: str = "churn",
    config: str | Path = "pkg:encoders/table.yaml",
    overrides: list[str] | None = None,
    text_encoder: TextFn | None = None,
    include_text: bool = True,
    test_fraction: float = 0.2,
    seed: int = 0,
    workdir: str | Path | None = None,
) -> dict:
    """Test-split ROC-AUC of `task` (churn) of: raw GBT, raw one-hot LR, `learned` (+ its head, + frozen LR), `text` (+ LR).

    `overrides` apply to the table encoder config (e.g. ["learned.epochs=3"]); `text_encoder` feeds the
    `text` kind (None: the project's sentence encoder). Returns {"auc", "seconds", "rows", "config"}.
    """
    with tempfile.TemporaryDirectory() as tmp:
        users, y = telco_table(data_dir, workdir or tmp, mapping, task)
    train_idx, test_idx = train_test_split(np.arange(len(users)), test_size=test_fraction, stratify=y, random_state=seed)
    features = users.drop(columns="user_id")
    train, test = features.iloc[train_idx], features.iloc[test_idx]
    train_y, test_y = y[train_idx], y[test_idx]
    auc, seconds = {}, {}

    start = time.perf_counter()
    auc |= raw_baselines(train, test, train_y, test_y, seed)
    seconds["raw_baselines"] = time.perf_counter() - start

    cfg = load_config(TableEncoderConfig, config, (overrides or []) + ["kind=learned"])
    start = time.perf_counter()
    learned: LearnedTableEncoder = fit_table_encoder(build_table_encoder(cfg), train, train_y)
    seconds["learned_fit"] = time.perf_counter() - start
    auc["learned_head"] = float(roc_auc_score(test_y, learned.predict(test)))
    auc["learned_logreg"] = frozen_logreg_auc(learned.encode(train), train_y, learned.encode(test), test_y, seed)

    if include_text:
        text = build_table_encoder(load_config(TableEncoderConfig, config, (overrides or []) + ["kind=text"]), text_encoder=text_encoder)
        start = time.perf_counter()
        text.fit(train)
        train_x, test_x = text.encode(train), text.encode(test)
        seconds["text_encode"] = time.perf_counter() - start
        auc["text_logreg"] = frozen_logreg_auc(train_x, train_y, test_x, test_y, seed)

    auc["learned_head_minus_gbt"] = auc["learned_head"] - auc["gbt_raw"]
    result = {
        "auc": {k: round(v, 4) for k, v in auc.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "rows": {"train": len(train), "test": len(test), "churn_rate": round(float(y.mean()), 4)},
        "config": {"learned": vars(cfg.learned), "seed": seed, "test_fraction": test_fraction, "mapping": mapping, "task": task},
    }
    log.info("%s ROC-AUC: %s", task, result["auc"])
    return result
