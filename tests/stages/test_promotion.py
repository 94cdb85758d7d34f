"""The promotion gate: the same validation cases for both models, a margin, a registry entry with metrics;
the registry in a bucket of a real S3 server on 127.0.0.1, read back by the next run."""

import json
import shutil

import pytest

from gts_lum.data import storage
from gts_lum.stages.promotion import FileRegistry, PromotionConfig, data_version, promotion_gate
from gts_lum.stages.train import train_model


def test_gate_promotes_only_a_better_model(cycle_data, tmp_path):
    seq = cycle_data.root
    weak, strong = tmp_path / "popularity", tmp_path / "markov"
    train_model(seq, "popularity", None, None, weak)
    train_model(seq, "markov", None, None, strong)
    registry = str(tmp_path / "registry")
    cfg = PromotionConfig(margin=0.05)

    first = promotion_gate(seq, weak, registry, cfg)  # nothing in production: promoted
    assert first["promoted"] and first["registered"]["version"] == "1" and first["production"] is None

    better = promotion_gate(seq, strong, registry, cfg)  # the Markov chain knows the cycle
    assert better["promoted"] and better["candidate"] > better["production"] and better["gain"] >= 0.05

    worse = promotion_gate(seq, weak, registry, cfg)  # the old model again: refused, registry unchanged
    assert not worse["promoted"] and "margin" in worse["reason"]
    entries = json.loads((tmp_path / "registry" / "registry.json").read_text())["versions"]
    assert [e["uri"].endswith("markov") for e in entries] == [False, True]
    prod = FileRegistry(registry).production("gts-lum")
    assert prod["metrics"]["NDCG@10"] == better["candidate"] and prod["data_version"] == data_version(seq)


def test_the_registry_in_a_bucket_outlives_the_run(cycle_data, s3_bucket, tmp_path):
    """As on KFP: each run's candidate is an artifact under minio:// (its local copy gone after the pod);
    the registry file lives in the bucket; the next run's gate reads production back from there."""
    seq = cycle_data.root
    registry = f"minio://{s3_bucket}/gts-lum/registry"
    cfg = PromotionConfig(margin=0.05)

    def run(name: str, kind: str) -> dict:
        pod = tmp_path / name  # the pod's local copy of the artifact, uploaded by the launcher, then gone
        train_model(seq, kind, None, None, pod / "model")
        uri = storage.upload(pod / "model", f"minio://{s3_bucket}/v2/artifacts/{name}/model")
        decision = promotion_gate(seq, pod / "model", registry, cfg, uri=uri)
        shutil.rmtree(pod)
        return decision

    first = run("run-1", "popularity")
    assert first["promoted"] and first["registered"]["uri"] == f"s3://{s3_bucket}/v2/artifacts/run-1/model"  # KServe's name
    second = run("run-2", "markov")  # production comes back from the bucket: scored, then beaten
    assert second["promoted"] and second["production"] == pytest.approx(first["candidate"]) and second["production_version"] == "1"
    third = run("run-3", "popularity")
    assert not third["promoted"] and third["production_version"] == "2"
    state = json.loads(storage.read_bytes(f"s3://{s3_bucket}/gts-lum/registry/registry.json"))
    assert [v["uri"].rsplit("/", 2)[-2] for v in state["versions"]] == ["run-1", "run-2"]

    storage.write_bytes(f"s3://{s3_bucket}/broken/registry.json", b"not json")
    with pytest.raises(ValueError, match=f"s3://{s3_bucket}/broken/registry.json: not a registry file"):
        FileRegistry(f"s3://{s3_bucket}/broken").production("gts-lum")
