"""The main job through kfp.local on tiny simulated data, and the compiled YAML kept in the repository."""

import json
from pathlib import Path

import yaml

from pipelines.compile import COMPILED, compile_all
from pipelines.run_local import report, run

REPO = Path(__file__).resolve().parents[2]


def test_compiled_yaml_matches_the_python(tmp_path):
    fresh = compile_all(tmp_path)
    for path in fresh:
        kept = COMPILED / path.name
        assert kept.exists(), f"{kept} missing: run `make compile` and commit it"
        # pipeline spec + platform spec (kfp-kubernetes settings): two YAML documents
        assert list(yaml.safe_load_all(kept.read_text())) == list(yaml.safe_load_all(path.read_text())), (
            f"{kept} is stale: run `make compile`"
        )


def test_training_pipeline_runs_end_to_end_locally(tmp_path, request, monkeypatch, s3_bucket):
    import shutil

    monkeypatch.setenv("GTS_LUM_PSEUDONYM_KEY", "pipeline-test-key-of-at-least-32-bytes")
    repo = tmp_path / "feature_repo"
    shutil.copytree(REPO / "feature_repo", repo, ignore=shutil.ignore_patterns("data"))
    params = {
        "data_source": "synth:tiny",
        "model_name": "sasrec",
        "model_overrides": {"train": {"windows_per_epoch": 256, "epochs": 1, "max_len": 20}},
        "gts_lum_overrides": {
            "net": {
                "decoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                "compressor": {"windows": 1, "window_size": 8},
            },
            "train": {
                "epochs": 1,
                "max_cases_per_epoch": 64,
                "hard_negatives": 1,
                "sampled_negatives": 32,
                "valid_cases": 20,
                "device": "cpu",
            },
            "rerank_depth": 3,
        },
        # the tokenizer tests' embedding cache: the catalog's texts are encoded once per test session
        "tokenizer_overrides": {"encoder": {"cache_dir": str(request.config.cache.mkdir("gts-lum-text-embeddings"))}},
        "graph_overrides": {"node2vec": {"walk": {"walks_per_node": 2, "walk_length": 10}, "skipgram": {"epochs": 1, "dim": 16}}},
        "behavior_table_overrides": {"kind": "learned", "learned": {"epochs": 2, "progress": False}},
        "user_table_overrides": {"kind": "learned", "learned": {"epochs": 2, "progress": False}},
        "heads_overrides": {"task_token": {"epochs": 2}, "train": {"epochs": 40}},
        "qformer_overrides": {
            "max_steps": 2,
            "batch_size": 16,
            "window_batch_size": 8,
            "qformer": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64, "num_heads": 2},
        },
    }
    # the registry in a bucket of the local S3 server, as the cluster's default keeps it in KFP's bucket
    params["registry"] = f"minio://{s3_bucket}/gts-lum/registry"
    params["feature_repo"] = str(repo)
    run_dir = run("training", tmp_path, params)
    steps = {p.name for p in run_dir.iterdir() if p.is_dir()}
    assert {
        "ingest",
        "validate",
        "build-sequences",
        "semantic-ids",
        "encode-graph",
        "encode-tables",
        "qformer-pretrain",
        "train-gts-lum",
        "train-model",
        "train-model-2",
        "evaluate-models",
        "promote-model",
        "publish-features",
        "label-tasks",
        "export-model",
    } <= steps
    table = (run_dir / "evaluate-models" / "table").read_text()
    assert "| gts_lum |" in table and "| sasrec |" in table and "| markov |" in table and "864 candidates" in table
    evaluation = json.loads((run_dir / "evaluate-models" / "executor_output.json").read_text())
    metrics = evaluation["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert 0.0 < metrics["markov_R@200"] <= 1.0 and metrics["sasrec_NDCG@10"] >= 0.0 and metrics["gts_lum_R@200"] > 0.0
    # GTS-LUM was trained over the real artifacts: its saved assets carry the semantic IDs' codebooks
    assert "data:image/png;base64," in (run_dir / "train-gts-lum" / "curve").read_text()  # the training curve for the UI
    lum_card = yaml.safe_load((run_dir / "train-gts-lum" / "model" / "model.yaml").read_text())
    assert lum_card["config"]["artifacts"]["qformer"].endswith("qformer")
    # the trained model is a safetensors file with its config beside it, never a pickle
    model_dir = run_dir / "train-model" / "model"
    assert (model_dir / "weights.safetensors").exists() and (model_dir / "model.yaml").exists()
    assert "Validation of" in report(run_dir)
    # the run ends serving-ready: features in Feast (online), the model exported for KServe
    from gts_lum.serving.export import read_serving_card
    from gts_lum.serving.features import FeatureClient

    card = read_serving_card(run_dir / "export-model" / "export")
    assert card["name"] == "gts_lum" and len(card["catalog"]["behavior_ids"]) == 1267
    # the label tasks' heads, each on its tuned task token, travel with the export
    assert {"churn", "campaign_response"} <= set(card["heads"])
    assert "| churn | binary |" in (run_dir / "label-tasks" / "report").read_text()
    assert "data:image/png;base64," in (run_dir / "label-tasks" / "qini").read_text()
    labels = json.loads((run_dir / "label-tasks" / "executor_output.json").read_text())
    roc = labels["artifacts"]["classification"]["artifacts"][0]["metadata"]  # the UI's ROC curve + confusion matrix
    assert roc["task"] == "churn" and roc["confidenceMetrics"] and roc["confusionMatrix"]["rows"]
    history = FeatureClient(repo).get_history("U000000")
    assert history["behavior_ids"] and history["timestamps"] == sorted(history["timestamps"])
    # the first model meets an empty registry: promoted and registered with its metric and data version
    assert "**promoted**" in (run_dir / "promote-model" / "decision").read_text()
    from gts_lum.data.storage import read_bytes

    entry = json.loads(read_bytes(f"s3://{s3_bucket}/gts-lum/registry/registry.json"))["versions"][0]
    assert entry["name"] == "gts-lum" and "NDCG@10" in entry["metrics"] and entry["data_version"]
    assert entry["uri"] == str(run_dir / "export-model" / "export"), "the gate registers the export: what KServe serves"
    # the encoders' artifacts: a semantic ID per behaviour and a node2vec vector per behaviour
    from gts_lum.encoders.node2vec import GraphEmbeddings
    from gts_lum.tokenizer.semantic_ids import SemanticIds

    ids = SemanticIds.load(run_dir / "semantic-ids" / "ids")
    vectors = GraphEmbeddings.load(run_dir / "encode-graph" / "graph")
    assert len(ids.behavior_ids) == len(vectors.behavior_ids) == 1267
    assert len({tuple(c) for c in ids.codes}) == 1267  # unique IDs
    assert "semantic" in (run_dir / "semantic-ids" / "summary").read_text().lower()
    # phase I wrote a fused embedding for every behaviour, from the real semantic IDs and node2vec vectors
    import numpy as np

    fused = np.load(run_dir / "qformer-pretrain" / "qformer" / "fused_embeddings.npy")
    assert fused.shape[0] == 1267 and np.isfinite(fused).all()
    card = yaml.safe_load((run_dir / "qformer-pretrain" / "qformer" / "qformer.yaml").read_text())
    assert "graph" in str(card) and "table" in str(card)  # both business modalities reached the Q-former
    with np.load(run_dir / "encode-tables" / "tables" / "user_table.npz") as users:
        assert users["vectors"].shape[0] == 200
