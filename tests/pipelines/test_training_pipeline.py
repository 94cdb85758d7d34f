"""The main job through kfp.local on tiny simulated data, and the compiled YAML kept in the repository."""

import json

import yaml

from pipelines.compile import COMPILED, compile_all
from pipelines.run_local import report, run


def test_compiled_yaml_matches_the_python(tmp_path):
    fresh = compile_all(tmp_path)
    for path in fresh:
        kept = COMPILED / path.name
        assert kept.exists(), f"{kept} missing: run `make compile` and commit it"
        assert yaml.safe_load(kept.read_text()) == yaml.safe_load(path.read_text()), f"{kept} is stale: run `make compile`"


def test_training_pipeline_runs_end_to_end_locally(tmp_path):
    params = {
        "data_source": "synth:tiny",
        "model_name": "sasrec",
        "model_overrides": json.dumps({"train": {"windows_per_epoch": 256, "epochs": 1, "max_len": 20}}),
    }
    run_dir = run("training", tmp_path, params)
    steps = {p.name for p in run_dir.iterdir() if p.is_dir()}
    assert {"ingest", "validate", "build-sequences", "train-model", "train-model-2", "evaluate-models"} <= steps
    table = (run_dir / "evaluate-models" / "table").read_text()
    assert "| sasrec |" in table and "| markov |" in table and "864 candidates" in table
    evaluation = json.loads((run_dir / "evaluate-models" / "executor_output.json").read_text())
    metrics = evaluation["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert 0.0 < metrics["markov_R@200"] <= 1.0 and metrics["sasrec_NDCG@10"] >= 0.0
    # the trained model is a safetensors file with its config beside it, never a pickle
    model_dir = run_dir / "train-model" / "model"
    assert (model_dir / "weights.safetensors").exists() and (model_dir / "model.yaml").exists()
    assert "Validation of" in report(run_dir)
