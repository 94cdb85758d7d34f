"""The rollout after the promotion gate: the InferenceService the manifests create (rendered by the real
kustomize), pointed at a new export, must still be a valid KServe object; the pipeline wires the step
after the gate with the deployer's token. Applying it needs a live cluster (README, "First run on a cluster")."""

from __future__ import annotations

import pytest
import yaml

from gts_lum.serving.deploy import FEAST_CONFIG_LABEL, STORAGE_ENV, TEMPLATE, created, deploy, pointed_at, serving_uri
from tests.delivery.test_manifests import MANIFESTS, REPO, find, render, validate
from tests.pipelines.test_cluster_settings import compiled, defaults, executor


@pytest.fixture(scope="module")
def isvc() -> dict:
    return find(render(MANIFESTS / "overlays" / "npu"), "InferenceService")


def test_uris_become_what_kserve_reads():
    assert serving_uri("minio://mlpipeline/v2/artifacts/run/export") == "s3://mlpipeline/v2/artifacts/run/export"
    for uri in ("s3://b/exports/gts-lum/2", "gs://b/x", "pvc://gts-lum-data/exports/gts-lum/1"):
        assert serving_uri(uri) == uri
    for bad in ("runs/export", "/tmp/export", "file:///tmp/export"):
        with pytest.raises(ValueError):
            serving_uri(bad)


def test_the_pointed_inferenceservice_validates_and_changes_only_the_export_and_canary(isvc):
    new = pointed_at(isvc, "minio://mlpipeline/v2/artifacts/gts-lum-training/run-7/export-model/export", 25)
    validate(new, "deployed InferenceService")  # KServe's typed model, strictly
    predictor = new["spec"]["predictor"]
    (container,) = predictor["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[STORAGE_ENV] == {"name": STORAGE_ENV, "value": "s3://mlpipeline/v2/artifacts/gts-lum-training/run-7/export-model/export"}
    assert predictor["canaryTrafficPercent"] == 25
    # everything else is the manifests' (service account, volumes, the Feast ConfigMap's hashed name)
    before = isvc["spec"]["predictor"]
    assert {k: v for k, v in predictor.items() if k not in ("containers", "canaryTrafficPercent")} == {
        k: v for k, v in before.items() if k not in ("containers", "canaryTrafficPercent")
    }
    assert [e for e in container["env"] if e["name"] != STORAGE_ENV] == [
        e for e in before["containers"][0]["env"] if e["name"] != STORAGE_ENV
    ]
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10, "the template is left alone"
    with pytest.raises(ValueError, match="0 to 100"):
        pointed_at(isvc, "s3://b/x", 101)


@pytest.mark.parametrize("overlay", ["npu", "gpu"])
def test_the_created_inferenceservice_is_the_manifests_own(overlay):
    """Where none exists, the step creates what `kubectl apply -k` would have: the same object, pointed at
    the export, on the Feast ConfigMap the manifests generated (found by its label under its hashed name)."""
    objects = render(MANIFESTS / "overlays" / overlay)
    rendered = find(objects, "InferenceService")
    (feast,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get(FEAST_CONFIG_LABEL) == "true"]
    template = yaml.safe_load((REPO / TEMPLATE).read_text())  # the file the components' image carries
    uri = "minio://mlpipeline/v2/artifacts/gts-lum-training/run-8/export-model/export"
    new = created(template, "gts-lum", rendered["metadata"]["namespace"], uri, 10, feast["metadata"]["name"])
    validate(new, "created InferenceService")  # KServe's typed model, strictly
    assert new == pointed_at(rendered, uri, 10)
    role = find(objects, "Role", "gts-lum-deployer")
    verbs = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("inferenceservices", "get"), ("inferenceservices", "create"), ("inferenceservices", "patch"), ("configmaps", "list")} <= verbs


def test_the_components_image_carries_the_template():
    from tests.delivery.test_images import DOCKER, stages
    from tests.pipelines.test_cluster_settings import REPO as ROOT

    final = stages(DOCKER / "Dockerfile.component")[-1]["steps"]
    workdir = [rest for word, rest in final if word == "WORKDIR"][-1]
    copies = [rest.split()[-2:] for word, rest in final if word == "COPY" and "--from=" not in rest]
    assert [str(TEMPLATE), f"{workdir}/{TEMPLATE}"] in copies and (ROOT / TEMPLATE).exists()


def test_without_a_token_nothing_is_applied(tmp_path):
    result = deploy("gts-lum", "team-a", "minio://mlpipeline/x", 10, token_dir=tmp_path)
    assert result == {"applied": False, "name": "gts-lum", "namespace": "team-a", "storage_uri": "s3://mlpipeline/x", "canary_percent": 10}


def test_the_pipeline_deploys_the_export_after_the_gate_as_the_deployer():
    import importlib

    tp = importlib.import_module("pipelines.training_pipeline")
    spec, platform = compiled("training")
    task = spec["root"]["dag"]["tasks"]["deploy-model"]
    assert {"promote-model", "export-model"} <= set(task["dependentTasks"])
    inputs = task["inputs"]
    assert inputs["parameters"]["promoted"]["taskOutputParameter"] == {"producerTask": "promote-model", "outputParameterKey": "Output"}
    assert inputs["artifacts"]["export"]["taskOutputArtifact"]["producerTask"] == "export-model"
    (volume,) = platform["executors"][executor(spec, "deploy-model")]["secretAsVolume"]
    assert volume["mountPath"] == tp.DEPLOYER_TOKEN and volume["optional"] is True
    names = defaults("training")
    assert names[volume["secretNameParameter"]["componentInputParameter"]] == "gts-lum-deployer-token"
    assert names["deploy_namespace"] == "" and 0 <= names["canary_traffic_percent"] <= 100
