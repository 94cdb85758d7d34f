"""Uplift metrics (hand-computed cases), the T-learner baseline, label-task discovery and arrays, and
`evaluate_label_tasks` end to end on the tiny simulated operator."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from gts_lum.config import load_config
from gts_lum.data.contract import read_table
from gts_lum.data.ingest import prepare_dataset
from gts_lum.evaluation.labels import LabelTask, discover_tasks, format_label_table, label_arrays
from gts_lum.evaluation.uplift import (
    auuc,
    average_treatment_effect,
    categorical_mask,
    qini_coefficient,
    qini_curve,
    t_learner_uplift,
    table_features,
    uplift_curve,
)
from gts_lum.modeling.heads import HeadsConfig
from gts_lum.training.label_tasks import evaluate_label_tasks

# Four users, best score first: a treated responder, a treated non-responder, a control responder,
# a control non-responder. N_t = N_c = 2, ATE = 1/2 - 1/2 = 0.
SCORE = np.array([4.0, 3.0, 2.0, 1.0])
Y = np.array([1.0, 0.0, 1.0, 0.0])
T = np.array([1.0, 1.0, 0.0, 0.0])


def test_qini_curve_by_hand():
    # k=1: Y_t=1, N_c=0 -> (1 - 0) / N_t = 0.5;  k=2: Y_t=1, N_t=2, N_c=0 -> 0.5
    # k=3: Y_t=1, Y_c=1, N_t=2, N_c=1 -> (1 - 1 * 2/1) / 2 = -0.5;  k=4: (1 - 1 * 2/2) / 2 = 0 (= ATE)
    x, q = qini_curve(SCORE, Y, T)
    np.testing.assert_allclose(x, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(q, [0, 0.5, 0.5, -0.5, 0])


def test_uplift_curve_and_auuc_by_hand():
    # k=1, 2: no control user yet -> 0;  k=3: (1/2 - 1/1) * 3/4 = -0.375;  k=4: (1/2 - 1/2) * 1 = 0
    x, gain = uplift_curve(SCORE, Y, T)
    np.testing.assert_allclose(gain, [0, 0, 0, -0.375, 0])
    # Trapezoids of width 1/4: (0 + 0 + 0 + (-0.375 + 0) / 2 * 2) / 4 -> -0.375 / 4 = -0.09375
    assert auuc(SCORE, Y, T) == pytest.approx(-0.09375)


def test_qini_coefficient_by_hand():
    # Model area: 0.25 * [(0 + .5) + (.5 + .5) + (.5 - .5) + (-.5 + 0)] / 2 = 0.125; random line area = ATE / 2 = 0.
    # Perfect ranking: treated responder (1), then both non-responders as one tie block (0), then the
    # control responder (-1): Q at k = 0, 1, 3, 4 is 0, .5, .5, 0 -> area .0625 + .25 + .0625 = 0.375.
    # Coefficient 0.125 / 0.375 = 1/3.
    assert qini_coefficient(SCORE, Y, T) == pytest.approx(1 / 3)


def test_tied_scores_are_one_block_whatever_the_row_order():
    # Scores (1, 1, 0, 0): the first block holds a treated responder and a control non-responder:
    # k=2: Y_t=1, N_t=1, N_c=1 -> (1 - 0) / 2 = 0.5 (qini), (1/1 - 0/1) * 2/4 = 0.5 (uplift); k=4: ATE = 0.
    score, y, t = np.array([1.0, 1, 0, 0]), np.array([1.0, 0, 0, 1]), np.array([1.0, 0, 1, 0])
    for order in ([0, 1, 2, 3], [1, 0, 3, 2], [3, 1, 2, 0]):
        x, q = qini_curve(score[order], y[order], t[order])
        np.testing.assert_allclose(x, [0, 0.5, 1])
        np.testing.assert_allclose(q, [0, 0.5, 0])
        np.testing.assert_allclose(uplift_curve(score[order], y[order], t[order])[1], [0, 0.5, 0])
    # One score for everyone is the random line itself.
    assert qini_coefficient(np.zeros(4), y, t) == pytest.approx(0.0)


def campaign(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features, treatment, outcome, true uplift: base rate 0.2, +0.4 when x0 > 0, -0.1 otherwise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    t = (rng.random(n) < 0.5).astype(float)
    tau = np.where(x[:, 0] > 0, 0.4, -0.1)
    y = (rng.random(n) < 0.2 + 0.1 + t * tau).astype(float)
    return x, t, y, tau


def test_perfect_and_random_rankings():
    _, t, y, _ = campaign(20000, 0)
    ate = average_treatment_effect(y, t)
    perfect = y * t - y * (1 - t)
    assert qini_coefficient(perfect, y, t) == pytest.approx(1.0)
    x, q = qini_curve(perfect, y, t)
    assert q[-1] == pytest.approx(ate) and x[-1] == 1.0
    # Breaking the perfect ranking's ties at random bends the last block below its chord: just under 1.
    jitter = perfect + 0.01 * np.random.default_rng(1).random(len(y))
    assert 0.95 < qini_coefficient(jitter, y, t) <= 1.0
    coefficients = [qini_coefficient(np.random.default_rng(s).random(len(y)), y, t) for s in range(5)]
    assert abs(np.mean(coefficients)) < 0.03
    assert auuc(np.random.default_rng(9).random(len(y)), y, t) == pytest.approx(ate / 2, abs=0.01)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="one arm"):
        qini_coefficient(SCORE, Y, np.ones(4))
    with pytest.raises(ValueError, match="y must be 0/1; row 2 holds 2.0"):
        qini_curve(SCORE, np.array([1.0, 0, 2, 0]), T)
    with pytest.raises(ValueError, match="non-finite"):
        auuc(np.array([1.0, np.nan, 0, 0]), Y, T)
    assert np.isnan(qini_coefficient(SCORE, np.zeros(4), T))  # nobody responded


def test_t_learner_finds_the_responsive_users():
    x, t, y, tau = campaign(4000, 3)
    uplift = t_learner_uplift(x[:3000], y[:3000], t[:3000], x[3000:], seed=0)
    assert uplift.shape == (1000,) and np.all(np.abs(uplift) <= 1)
    assert uplift[tau[3000:] > 0].mean() > uplift[tau[3000:] < 0].mean() + 0.3
    assert qini_coefficient(uplift, y[3000:], t[3000:]) > 0.5 * qini_coefficient(tau[3000:], y[3000:], t[3000:]) > 0.05


def test_table_features_types():
    users = pd.DataFrame(
        {
            "user_id": ["a", "b", "c"],
            "tier": ["gold", None, "basic"],
            "fee": [10.0, np.nan, 30.0],
            "lines": pd.array([1, 2, None], dtype="Int32"),
            "broadband": [True, False, True],
            "since": pd.to_datetime(["1970-01-02", None, "1970-01-01"], utc=True),
        }
    )
    x = table_features(users)
    expected = [[1, 10, 1, 1, 86400], [np.nan, np.nan, 2, 0, np.nan], [0, 30, np.nan, 1, 0]]  # basic=0, gold=1
    np.testing.assert_array_equal(x, np.array(expected, dtype=float))
    np.testing.assert_array_equal(categorical_mask(users), [True, False, False, False, False])
    with pytest.raises(KeyError, match="'uid'"):
        table_features(users, id_column="uid")


# -- label tasks --------------------------------------------------------------------------------------


def labels_frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "task", "label", "treatment", "time"]).assign(
        time=lambda f: pd.to_datetime(f["time"], utc=True)
    )


def test_discover_tasks_kinds_and_errors():
    frame = labels_frame(
        [
            ("u1", "churn", 1.0, np.nan, "2024-01-01"),
            ("u2", "churn", 0.0, np.nan, "2024-01-01"),
            ("u1", "tier", 1.0, np.nan, "2024-01-01"),
            ("u2", "tier", 5.0, np.nan, "2024-01-01"),
            ("u3", "tier", 2.0, np.nan, "2024-01-01"),
            ("u1", "offer", 1.0, 1.0, "2024-01-01"),
            ("u2", "offer", 0.0, 0.0, "2024-01-01"),
        ]
    )
    tasks = {t.name: t for t in discover_tasks(frame)}
    assert tasks["churn"] == LabelTask("churn", "binary")
    assert tasks["tier"] == LabelTask("tier", "multiclass", 3, (1.0, 2.0, 5.0))
    assert tasks["offer"].kind == "uplift"
    spend = labels_frame([("u1", "spend", 0.5, np.nan, "2024-01-01"), ("u2", "spend", 1.0, np.nan, "2024-01-01")])
    with pytest.raises(ValueError, match=r"'spend'.*offending values \[0.5\]"):
        discover_tasks(spend)
    many = labels_frame([(f"u{i}", "age", float(i), np.nan, "2024-01-01") for i in range(30)])
    with pytest.raises(ValueError, match=r"'age': 30 distinct integer labels"):
        discover_tasks(many)
    odd_arm = labels_frame([("u1", "offer", 1.0, 2.0, "2024-01-01"), ("u2", "offer", 0.0, 0.0, "2024-01-01")])
    with pytest.raises(ValueError, match=r"'offer': treatment must be 0/1"):
        discover_tasks(odd_arm)
    with pytest.raises(KeyError, match="label"):
        discover_tasks(frame.drop(columns="label"))


def test_label_arrays_order_unknown_users_and_duplicates(caplog):
    frame = labels_frame(
        [
            ("u3", "offer", 1.0, 1.0, "2024-01-01"),
            ("u1", "offer", 0.0, 0.0, "2024-01-05"),
            ("u1", "offer", 1.0, 1.0, "2024-01-02"),  # older: dropped
            ("zz", "offer", 1.0, 0.0, "2024-01-01"),  # not among the users given
            ("u2", "tier", 7.0, np.nan, "2024-01-01"),
            ("u1", "tier", 3.0, np.nan, "2024-01-01"),
        ]
    )
    users = np.array(["u1", "u2", "u3"])
    with caplog.at_level(logging.WARNING):
        index, y, t = label_arrays(frame, users, "offer")
    np.testing.assert_array_equal(index, [0, 2])
    np.testing.assert_array_equal(y, [0, 1])
    np.testing.assert_array_equal(t, [0.0, 1.0])
    assert "1 duplicate" in caplog.text and "1 labelled user(s) not among the 3 users" in caplog.text
    index, y, t = label_arrays(frame, users, LabelTask("tier", "multiclass", 2, (3.0, 7.0)))
    np.testing.assert_array_equal(index, [0, 1])
    np.testing.assert_array_equal(y, [0, 1])
    assert t is None
    with pytest.raises(KeyError, match="no rows of task 'nope'"):
        label_arrays(frame, users, "nope")
    with pytest.raises(ValueError, match="duplicates"):
        label_arrays(frame, np.array(["u1", "u1"]), "offer")


# -- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clean(tmp_path_factory):
    return prepare_dataset("synth:tiny", tmp_path_factory.mktemp("tiny"), progress=False)


def table_embedding(clean_dir):
    """A stand-in for the decoder: one-hot categorical + standardized numeric user attributes."""
    users = read_table(clean_dir, "users")
    features = users.drop(columns="user_id")
    categorical = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c]) or pd.api.types.is_bool_dtype(features[c])]
    numeric = features.drop(columns=categorical)
    table = pd.concat([pd.get_dummies(features[categorical].astype(str), dtype=float), (numeric - numeric.mean()) / numeric.std()], axis=1)
    table.index = users["user_id"].astype(str)
    seen = []

    def embed(user_ids: np.ndarray, task: LabelTask) -> np.ndarray:
        seen.append(task.name)
        return table.loc[user_ids].to_numpy(np.float32)

    return embed, seen


@pytest.mark.usefixtures("one_torch_thread")
def test_evaluate_label_tasks_on_tiny(tiny_clean):
    embed, seen = table_embedding(tiny_clean)
    cfg = load_config(HeadsConfig, "pkg:heads/default.yaml", {"train": {"epochs": 100}})
    results = evaluate_label_tasks(embed, tiny_clean, cfg, seed=0)
    labels = read_table(tiny_clean, "labels")
    assert set(results["tasks"]) == set(labels["task"].astype(str)) == set(seen)
    for name, entry in results["tasks"].items():
        assert entry["n_train"] + entry["n_test"] == (labels["task"] == name).sum()
        assert set(entry["metrics"]) == {"head", "table_gbt", "table_gbt_embedding", "random"}
        if entry["kind"] == "binary":
            for source in ("head", "table_gbt", "table_gbt_embedding", "random"):
                assert 0.0 <= entry["metrics"][source]["auc"] <= 1.0
            assert abs(entry["metrics"]["random"]["auc"] - 0.5) < 0.1
    offer = results["tasks"]["campaign_response"]
    assert offer["kind"] == "uplift" and 0.0 < offer["treated_rate"] < 1.0
    for source in ("head", "table_gbt", "table_gbt_embedding", "random"):
        metrics = offer["metrics"][source]
        assert set(metrics) >= {"qini", "auuc"} and np.isfinite(metrics["qini"]) and np.isfinite(metrics["auuc"])
        assert -1.5 < metrics["qini"] <= 1.0
    table = format_label_table(results)
    assert table.count("\n") == 1 + 3 + 2  # header, rule, three binary tasks, Qini and AUUC rows
    assert "| campaign_response | uplift |" in table and "Qini coefficient" in table


@pytest.mark.usefixtures("one_torch_thread")
def test_the_stacked_baseline_reads_the_embedding(tiny_clean):
    # An embedding that carries a noisy copy of the churn label (what behaviour might know and the table not):
    # the trees given table + embedding rank churn better than the trees on the table alone.
    labels = read_table(tiny_clean, "labels")
    churn = labels[labels["task"] == "churn"].set_index(labels.loc[labels["task"] == "churn", "user_id"].astype(str))["label"]
    noise = np.random.default_rng(0)

    def embed(user_ids: np.ndarray, task: LabelTask) -> np.ndarray:
        signal = churn.reindex(user_ids).fillna(0).to_numpy(np.float32)
        return np.stack([signal + noise.normal(0, 0.5, len(user_ids)), noise.normal(size=len(user_ids))], 1).astype(np.float32)

    cfg = load_config(HeadsConfig, "pkg:heads/default.yaml", {"train": {"epochs": 50}})
    metrics = evaluate_label_tasks(embed, tiny_clean, cfg, seed=0)["tasks"]["churn"]["metrics"]
    assert metrics["table_gbt_embedding"]["auc"] > metrics["table_gbt"]["auc"] + 0.1
    assert metrics["table_gbt_embedding"]["auc"] > 0.8


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("folds", [1, 5])  # the head's own held-out slice / five folds of the training users
def test_of_several_inputs_the_head_keeps_the_one_with_the_lowest_held_out_loss(tiny_clean, folds):
    labels = read_table(tiny_clean, "labels")
    rows = labels[labels["task"] == "churn"]
    churn = rows.set_index(rows["user_id"].astype(str))["label"]
    rng = np.random.default_rng(1)

    def embed(user_ids: np.ndarray, task: LabelTask) -> dict[str, np.ndarray]:
        signal = churn.reindex(user_ids).fillna(0).to_numpy(np.float32)
        noise = rng.normal(size=(len(user_ids), 2)).astype(np.float32)
        return {"noise": noise, "signal": np.stack([signal + rng.normal(0, 0.5, len(user_ids)), noise[:, 0]], 1).astype(np.float32)}

    cfg = load_config(HeadsConfig, "pkg:heads/default.yaml", {"train": {"epochs": 50}, "select_folds": folds})
    entry = evaluate_label_tasks(embed, tiny_clean, cfg, seed=0)["tasks"]["churn"]
    assert entry["input"] == "signal" and entry["metrics"]["head"]["auc"] > 0.8
    losses = entry["input_losses"]
    assert set(losses) == {"noise", "signal"} and losses["signal"] < losses["noise"]
    assert (losses["signal"] == entry["fit"]["valid_loss"]) == (folds == 1)  # the folds' mean is not the refit's slice


@pytest.mark.usefixtures("one_torch_thread")
def test_evaluate_label_tasks_multiclass(tiny_clean, tmp_path):
    # A 4-valued integer label (the plan tier as 1..4) beside the simulator's tasks, in a copy of the data set.
    users = read_table(tiny_clean, "users")
    tier = pd.Categorical(users["plan_tier"]).codes + 1.0
    labels = read_table(tiny_clean, "labels")
    extra = pd.DataFrame(
        {"user_id": users["user_id"], "task": "tier", "label": tier.astype(np.float32), "treatment": np.nan, "time": labels["time"].iloc[0]}
    )
    pd.concat([labels[labels["task"] == "churn"], extra], ignore_index=True).to_parquet(tmp_path / "labels.parquet")
    users.to_parquet(tmp_path / "users.parquet")
    embed, _ = table_embedding(tiny_clean)
    cfg = load_config(HeadsConfig, "pkg:heads/default.yaml", {"train": {"epochs": 100}})
    results = evaluate_label_tasks(embed, tmp_path, cfg, seed=1)
    entry = results["tasks"]["tier"]
    assert entry["kind"] == "multiclass" and entry["num_classes"] == len(np.unique(tier)) and sum(entry["class_counts"]) == len(users)
    # The tier is one of the table's columns: both read it off.
    assert entry["metrics"]["head"]["accuracy"] > 0.8 and entry["metrics"]["table_gbt"]["accuracy"] > 0.8
    assert entry["metrics"]["head"]["macro_auc"] > 0.95
    assert abs(entry["metrics"]["random"]["macro_auc"] - 0.5) < 0.1
    assert "| tier | multiclass |" in format_label_table(results) and "macro ROC-AUC" in format_label_table(results)
