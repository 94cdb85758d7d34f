"""The label stage (`gts-lum labels`): task tokens tuned through the frozen GTS-LUM decoder, heads fitted
and evaluated against the table baselines, everything saved so that the export serves the heads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from gts_lum.config import load_config
from gts_lum.modeling.heads import HeadsConfig

FAST = ["task_token.epochs=3", "train.epochs=60"]


@pytest.fixture(scope="module")
def label_stage(tiny_serving, tmp_path_factory, one_thread_module):
    from gts_lum.stages.labels import run_label_stage

    out = tmp_path_factory.mktemp("labels")
    cfg = load_config(HeadsConfig, "pkg:heads/default.yaml", FAST)
    return out, run_label_stage(tiny_serving.model_dir, tiny_serving.sequences, tiny_serving.clean, out, cfg)


def test_every_task_is_tuned_fitted_reported_and_saved(label_stage):
    import yaml

    out, results = label_stage
    tasks = results["tasks"]
    assert {"churn", "campaign_response"} <= set(tasks)  # the simulator's binary and randomized-campaign tasks
    heads = yaml.safe_load((out / "heads" / "heads.yaml").read_text())
    card = yaml.safe_load((out / "model" / "model.yaml").read_text())
    names = card["config"]["net"]["tasks"]
    assert sorted(heads) == sorted(tasks) == sorted(names)
    for name, entry in tasks.items():
        assert heads[name]["task_token"] == names.index(name)  # each head reads its own token's embedding
        tuned = entry["task_token"]
        # tuning optimizes: the training loss falls below the untuned start (on 200 tiny users the held-out
        # loss need not: it is reported, not asserted)
        assert tuned["history"][-1]["train_loss"] < tuned["initial_train_loss"]
        assert np.isfinite(tuned["initial_valid_loss"]) and np.isfinite(tuned["best_valid_loss"])
        assert tuned["token_change"] > 0.0  # the gradient reached the task token itself, not only the head
        assert {"head", "table_gbt", "random"} <= set(entry["metrics"])
    assert tasks["campaign_response"]["kind"] == "uplift" and "qini" in tasks["campaign_response"]["metrics"]["table_gbt"]
    assert (out / "qini_campaign_response.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| churn | binary |" in (out / "labels.md").read_text()
    # the ROC curve and confusion matrix the Kubeflow UI shows (ClassificationMetrics)
    curves = tasks["churn"]["curves"]
    assert curves["fpr"][0] == 0.0 and curves["fpr"][-1] == 1.0 and curves["tpr"][-1] == 1.0
    assert all(a <= b for a, b in zip(curves["fpr"], curves["fpr"][1:])) and len(curves["fpr"]) == len(curves["thresholds"]) <= 200
    assert np.sum(curves["confusion_matrix"]) == tasks["churn"]["n_test"] and "curves" not in tasks["campaign_response"]
    assert json.loads((out / "labels.json").read_text())["users"]["left_out_without_events"] == 0


def test_only_the_task_tokens_change(label_stage, tiny_serving):
    out, _ = label_stage
    before = load_file(tiny_serving.model_dir / "weights.safetensors")
    after = load_file(out / "model" / "weights.safetensors")
    assert set(before) == set(after)
    changed = [k for k in before if before[k].shape != after[k].shape or not bool((before[k] == after[k]).all())]
    assert changed == ["task_tokens.weight"]  # next-behaviour scoring is untouched by label tasks
    tokens = after["task_tokens.weight"]
    assert len(tokens) == len(out.joinpath("heads", "heads.yaml").read_text().split("task_token:")) - 1
    assert float(np.linalg.matrix_rank(tokens.numpy())) == len(tokens)  # distinct, tuned tokens


def test_the_export_serves_the_tuned_heads(label_stage, tiny_serving, tmp_path):
    from gts_lum.sequence.dataset import SequenceDataset
    from gts_lum.serving.export import export_model, load_export
    from gts_lum.training.task_tokens import user_cases

    out, results = label_stage
    export_model(out / "model", tmp_path / "export", heads_dir=out / "heads", sequences_dir=tiny_serving.sequences)
    serving = load_export(tmp_path / "export")
    log_ = SequenceDataset.load(tiny_serving.sequences).event_log
    cases = user_cases(log_, log_.user_ids[:3])
    rows = serving.head_outputs(log_, cases, sorted(results["tasks"]))
    assert 0.0 <= rows[0]["churn"]["probability"] <= 1.0
    assert set(rows[0]["campaign_response"]) == {"kind", "uplift", "p_control", "p_treated"}
    with pytest.raises(KeyError, match="not in the event log"):
        user_cases(log_, np.array(["no-such-user"]))


def test_label_histories_end_at_the_label_time():
    import pandas as pd

    from gts_lum.data.events import EventLog
    from gts_lum.training.task_tokens import user_cases

    frame = pd.DataFrame({"user_id": ["a"] * 4 + ["b"] * 3, "behavior_id": "x", "timestamp": [10, 20, 30, 40, 15, 25, 35]})
    log_ = EventLog.from_frame(frame, behavior_ids=np.array(["x"], dtype=object))
    a, b = log_.offsets[list(log_.user_ids).index("a")], log_.offsets[list(log_.user_ids).index("b")]
    whole = user_cases(log_, np.array(["a", "b"]))
    assert list(whole.history_end) == [a + 4, b + 3]
    cut = user_cases(log_, np.array(["a", "b", "b", "a"]), np.array([30.0, np.nan, 5.0, 1e9]))
    # "a" before t=30 keeps 10 and 20; no time: everything; before all events: nothing; after all: everything
    assert list(cut.history_end) == [a + 2, b + 3, b, a + 4]
