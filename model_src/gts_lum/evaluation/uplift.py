"""Uplift (marketing intervention) evaluation: Qini and uplift curves, AUUC, Qini coefficient, and a
T-learner baseline on the raw user table.

Conventions (binary outcome y, randomized treatment t, a score where higher = target first):
- Users are targeted in descending score; users with tied scores form one block that is targeted at
  once, so the curves have a point only at block ends and are linear inside a block. This equals the
  average over every order of the tied users, and does not depend on the input row order.
- With the top-k users targeted, N_t(k)/N_c(k) treated/control users and Y_t(k)/Y_c(k) responders
  among them, N_t/N_c the arm totals and ATE = Y_t/N_t - Y_c/N_c:
    Qini curve    Q(k) = [Y_t(k) - Y_c(k) * N_t(k) / N_c(k)] / N_t        (Radcliffe; 0 when N_c(k) = 0)
    uplift curve  U(k) = [Y_t(k) / N_t(k) - Y_c(k) / N_c(k)] * k / N     (0 while an arm is empty)
  Both are normalized so that the curve ends at ATE when everyone is targeted; the x axis is the
  fraction targeted k/N. Targeting at random gives the straight line from (0, 0) to (1, ATE).
- `auuc` is the area under the uplift curve (trapezoid over [0, 1]); random targeting scores ~ATE/2.
- `qini_coefficient` is (area under Q - area under the random line) / (same for the perfect Qini
  curve): 1 for a perfect ranking, ~0 for a random one, negative for a ranking worse than random. The
  perfect curve targets treated responders first, control responders last, everyone else in between.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

MAX_CATEGORICAL_BINS = 255  # HistGradientBoostingClassifier's native categorical limit (max_bins)
# Below this many training rows the trees are grown on one OpenMP thread: spin-waiting threads made a
# 1,500-row fit take 21 s instead of 0.2 s on a busy 2-core machine.
SINGLE_THREAD_BELOW = 20_000


def _check_inputs(score: np.ndarray, y: np.ndarray, treatment: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    score, y, treatment = (np.asarray(a, np.float64).ravel() for a in (score, y, treatment))
    if not (len(score) == len(y) == len(treatment)):
        raise ValueError(f"uplift metrics: uplift_score, y and treatment differ in length ({len(score)}, {len(y)}, {len(treatment)})")
    if not np.isfinite(score).all():
        raise ValueError(
            f"uplift metrics: uplift_score holds {int((~np.isfinite(score)).sum())} non-finite value(s), "
            f"e.g. row {int(np.flatnonzero(~np.isfinite(score))[0])}"
        )
    for name, values in (("y", y), ("treatment", treatment)):
        bad = ~np.isin(values, (0.0, 1.0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"uplift metrics: {name} must be 0/1; row {row} holds {values[row].item()!r}")
    if treatment.min() == treatment.max():
        raise ValueError("uplift metrics: treatment holds only one arm; both treated (1) and control (0) users are needed")
    return score, y, treatment


def _cumulative_counts(score: np.ndarray, y: np.ndarray, treatment: np.ndarray) -> tuple[np.ndarray, ...]:
    """(k, N_t(k), N_c(k), Y_t(k), Y_c(k)) at 0 and at the end of every block of tied scores, best first."""
    order = np.argsort(-score, kind="stable")
    s, y, t = score[order], y[order], treatment[order]
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last row of each tie block
    counts = [np.cumsum(v)[ends] for v in (t, 1.0 - t, y * t, y * (1.0 - t))]
    return tuple(np.r_[0.0, c] for c in [ends + 1.0, *counts])


def qini_curve(uplift_score: np.ndarray, y: np.ndarray, treatment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fraction_targeted, qini), each (G + 1,) for G blocks of tied scores; see the module docstring."""
    score, y, treatment = _check_inputs(uplift_score, y, treatment)
    k, n_t, n_c, y_t, y_c = _cumulative_counts(score, y, treatment)
    control_scaled = np.divide(y_c * n_t, n_c, out=np.zeros_like(y_c), where=n_c > 0)
    return k / len(score), (y_t - control_scaled) / n_t[-1]


def uplift_curve(uplift_score: np.ndarray, y: np.ndarray, treatment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fraction_targeted, uplift gain), each (G + 1,); see the module docstring."""
    score, y, treatment = _check_inputs(uplift_score, y, treatment)
    k, n_t, n_c, y_t, y_c = _cumulative_counts(score, y, treatment)
    both = (n_t > 0) & (n_c > 0)
    rate_t = np.divide(y_t, n_t, out=np.zeros_like(y_t), where=both)
    rate_c = np.divide(y_c, n_c, out=np.zeros_like(y_c), where=both)
    return k / len(score), (rate_t - rate_c) * k / len(score)


def average_treatment_effect(y: np.ndarray, treatment: np.ndarray) -> float:
    """Difference in response rate, treated minus control (where every curve above ends)."""
    y, treatment = np.asarray(y, np.float64), np.asarray(treatment, np.float64)
    return float(y[treatment == 1].mean() - y[treatment == 0].mean())


def auuc(uplift_score: np.ndarray, y: np.ndarray, treatment: np.ndarray) -> float:
    """Area under the (normalized) uplift curve; random targeting gives about ATE / 2."""
    x, gain = uplift_curve(uplift_score, y, treatment)
    return float(np.trapezoid(gain, x))


def qini_coefficient(uplift_score: np.ndarray, y: np.ndarray, treatment: np.ndarray) -> float:
    """Area between the Qini curve and the random line over the same for the perfect ranking (1 = perfect,
    ~0 = random, < 0 = worse than random); NaN when nobody responded (no ranking can be told apart)."""
    score, y, treatment = _check_inputs(uplift_score, y, treatment)
    ate = average_treatment_effect(y, treatment)
    perfect = y * treatment - y * (1.0 - treatment)  # treated responders 1, control responders -1, others 0
    model_area = np.trapezoid(*qini_curve(score, y, treatment)[::-1])
    perfect_area = np.trapezoid(*qini_curve(perfect, y, treatment)[::-1])
    if perfect_area - ate / 2.0 <= 0.0:
        log.warning("qini_coefficient: no responder in either arm; the coefficient is undefined (NaN)")
        return float("nan")
    return float((model_area - ate / 2.0) / (perfect_area - ate / 2.0))


# -- raw table baseline -------------------------------------------------------------------------------


def _feature_columns(users_df: pd.DataFrame, id_column: str) -> list[str]:
    if id_column not in users_df.columns:
        raise KeyError(f"table_features: id column {id_column!r} not in the table; it has {list(users_df.columns)}")
    return [c for c in users_df.columns if c != id_column]


def _is_categorical(series: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series) or pd.api.types.is_datetime64_any_dtype(series))


def table_features(users_df: pd.DataFrame, id_column: str = "user_id") -> np.ndarray:
    """(N, F) float64 matrix of every column but `id_column`, rows as in `users_df`.

    Numbers stay numbers, booleans become 0/1, datetimes seconds since the epoch, anything else category
    codes in the sorted order of the values seen (ordinal codes: only trees should read them).
    Missing cells are NaN, which HistGradientBoostingClassifier routes natively.
    """
    columns = []
    for col in _feature_columns(users_df, id_column):
        series = users_df[col]
        if pd.api.types.is_bool_dtype(series):
            values = series.astype("float64").to_numpy(np.float64, na_value=np.nan)
        elif pd.api.types.is_datetime64_any_dtype(series):
            epoch = pd.Timestamp(0, tz=series.dt.tz)
            values = ((series - epoch) / pd.Timedelta(seconds=1)).to_numpy(np.float64, na_value=np.nan)
        elif pd.api.types.is_numeric_dtype(series):
            values = pd.to_numeric(series).to_numpy(np.float64, na_value=np.nan)
        else:
            codes = pd.Categorical(series.astype("string")).codes  # categories sorted; missing -> -1
            values = np.where(codes < 0, np.nan, codes).astype(np.float64)
        columns.append(values)
    return np.stack(columns, 1) if columns else np.zeros((len(users_df), 0))


def categorical_mask(users_df: pd.DataFrame, id_column: str = "user_id") -> np.ndarray:
    """(F,) bool: which `table_features` columns are category codes a tree may split natively
    (those with more than 255 categories stay ordinal: the native splitter's limit)."""
    return np.array(
        [_is_categorical(users_df[c]) and users_df[c].nunique() <= MAX_CATEGORICAL_BINS for c in _feature_columns(users_df, id_column)],
        dtype=bool,
    )


def gbt_threads(rows: int) -> threadpool_limits:
    """Context: OpenMP on one thread for fits and predictions on fewer than SINGLE_THREAD_BELOW rows."""
    return threadpool_limits(limits=1 if rows < SINGLE_THREAD_BELOW else None, user_api="openmp")


def gbt_proba(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, seed: int, categorical_features: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The raw-table baseline (scikit-learn's default gradient-boosted trees, native categorical splits
    where marked): (classes seen in training, (N_test, len(classes)) probabilities)."""
    mask = None if categorical_features is None or not np.any(categorical_features) else np.asarray(categorical_features, bool)
    with gbt_threads(max(len(X_train), len(X_test))):
        model = HistGradientBoostingClassifier(categorical_features=mask, random_state=seed).fit(X_train, y_train)
        return model.classes_, model.predict_proba(X_test)


def _arm_probability(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, seed: int, categorical_features, arm: str) -> np.ndarray:
    if len(y) == 0:
        raise ValueError(f"t_learner_uplift: no {arm} rows in the training set")
    if y.min() == y.max():
        log.warning("t_learner_uplift: every %s training row has outcome %g; its model predicts that constant", arm, y[0])
        return np.full(len(X_test), float(y[0]))
    classes, proba = gbt_proba(X, y, X_test, seed, categorical_features)
    return proba[:, list(classes).index(1)]


def t_learner_uplift(
    X_train: np.ndarray,
    y_train: np.ndarray,
    t_train: np.ndarray,
    X_test: np.ndarray,
    seed: int = 0,
    categorical_features: np.ndarray | None = None,
) -> np.ndarray:
    """(N_test,) uplift p1(x) - p0(x) from two gradient-boosted classifiers, one fitted on the treated rows
    and one on the control rows (the T-learner); `categorical_features` as from `categorical_mask`."""
    X_train, X_test = np.asarray(X_train, np.float64), np.asarray(X_test, np.float64)
    y_train, t_train = np.asarray(y_train).ravel(), np.asarray(t_train, np.float64).ravel()
    if not (len(X_train) == len(y_train) == len(t_train)):
        raise ValueError(f"t_learner_uplift: X_train, y_train, t_train differ in length ({len(X_train)}, {len(y_train)}, {len(t_train)})")
    bad = ~np.isin(t_train, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"t_learner_uplift: t_train must be 0/1; row {int(np.flatnonzero(bad)[0])} holds {t_train[bad][0]!r}")
    treated = t_train == 1
    p1 = _arm_probability(X_train[treated], y_train[treated], X_test, seed, categorical_features, "treated")
    p0 = _arm_probability(X_train[~treated], y_train[~treated], X_test, seed, categorical_features, "control")
    return p1 - p0
