"""What the compiled pipelines ask of a cluster (the IR and kfp-kubernetes' platform spec the Kubeflow
backend reads; `kfp.local` ignores all of it): Secrets as environment variables, the image's files."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from pipelines import PIPELINES
from pipelines.compile import COMPILED

REPO = Path(__file__).resolve().parents[2]


def compiled(name: str) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec) of a compiled pipeline kept in the repository; a pipeline
    without kfp-kubernetes settings has no platform document."""
    spec, *platform = yaml.safe_load_all((COMPILED / f"{name}_pipeline.yaml").read_text())
    return spec, platform[0]["platforms"]["kubernetes"]["deploymentSpec"] if platform else {"executors": {}}


def defaults(name: str) -> dict:
    return {n: p.default for n, p in inspect.signature(PIPELINES[name].pipeline_func).parameters.items()}


def executor(spec: dict, task: str) -> str:
    return spec["components"][spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]]["executorLabel"]


def secret_env(platform: dict, exec_label: str) -> dict[str, tuple[str, str, bool]]:
    """env var -> (the pipeline parameter naming the Secret, the Secret's key, optional)."""
    out = {}
    for entry in platform["executors"].get(exec_label, {}).get("secretAsEnv", []):
        for pair in entry["keyToEnv"]:
            out[pair["envVar"]] = (entry["secretNameParameter"]["componentInputParameter"], pair["secretKey"], entry["optional"])
    return out


def test_publish_features_gets_the_pseudonym_key_and_feast_addresses_from_secrets():
    from tests.delivery.test_manifests import OPERATOR_SECRETS

    spec, platform = compiled("training")
    env = secret_env(platform, executor(spec, "publish-features"))
    assert env["GTS_LUM_PSEUDONYM_KEY"][1:] == ("key", False), "publishing pseudonymizes every user: the key is required"
    # the production feature_store.yaml's addresses; optional, as the local config reads neither
    assert env["GTS_LUM_FEAST_REGISTRY"][1:] == ("url", True) and env["GTS_LUM_REDIS"][1:] == ("connection", True)
    names = defaults("training")
    # the export names profile rows by pseudonym; the gate and batch scoring score it under the same names
    for task in ("export-model", "promote-model"):
        assert secret_env(platform, executor(spec, task))["GTS_LUM_PSEUDONYM_KEY"] == ("pseudonym_secret", "key", False), task
    batch_spec, batch_platform = compiled("batch_scoring")
    assert secret_env(batch_platform, executor(batch_spec, "batch-score"))["GTS_LUM_PSEUDONYM_KEY"] == ("pseudonym_secret", "key", False)
    assert defaults("batch_scoring")["pseudonym_secret"] in OPERATOR_SECRETS
    # the same Secrets the manifests' pods read, by default
    assert {names[param] for param, _, _ in env.values()} <= OPERATOR_SECRETS


def test_the_production_feature_config_names_only_variables_publish_gets():
    import re

    from tests.delivery.test_manifests import _feature_store_variables

    spec, platform = compiled("training")
    env = secret_env(platform, executor(spec, "publish-features"))
    production = REPO / "feature_repo" / "production" / "feature_store.yaml"
    text = "\n".join(l.split("#", 1)[0] for l in production.read_text().splitlines())
    assert set(re.findall(r"\$\{(\w+)\}", text)) == _feature_store_variables() <= set(env)


def test_the_components_image_carries_the_feature_repo_where_the_default_points():
    from tests.delivery.test_images import DOCKER, stages

    final = stages(DOCKER / "Dockerfile.component")[-1]["steps"]
    workdir = [rest for word, rest in final if word == "WORKDIR"][-1]
    copies = [rest.split()[-2:] for word, rest in final if word == "COPY" and "--from=" not in rest]
    target = str(Path(workdir) / defaults("training")["feature_repo"])
    assert ["feature_repo", target] in copies, f"the image must COPY feature_repo to {target} (WORKDIR + the pipeline's default)"
    assert "--chown=10001:10001 feature_repo" in (DOCKER / "Dockerfile.component").read_text(), (
        "a local-config publish writes data/ beside it"
    )


@pytest.mark.parametrize("name, tasks", [("training", ("ingest", "promote-model")), ("batch_scoring", ("ingest", "batch-score"))])
def test_steps_that_read_object_storage_get_its_endpoint_and_keys_from_a_secret(name, tasks):
    from pipelines.cluster import OBJECT_STORE_KEYS

    spec, platform = compiled(name)
    for task in tasks:
        env = secret_env(platform, executor(spec, task))
        # the variables gts_lum.data.storage reads; optional: synth: data and a Model Registry need none
        assert {v: env[v] for v in OBJECT_STORE_KEYS.values()} == {
            v: ("object_store_secret", k, True) for k, v in OBJECT_STORE_KEYS.items()
        }
    assert defaults(name)["object_store_secret"] == "gts-lum-object-store"


def test_the_defaults_name_uris_the_launcher_and_the_registry_keep():
    from gts_lum.data.storage import is_remote

    # the KFP launcher imports only gs://, minio://, s3:// (and oci://) URIs; a folder in the pod would vanish
    assert defaults("batch_scoring")["export_uri"].startswith(("gs://", "minio://", "s3://"))
    assert is_remote(defaults("training")["registry"]), "the gate's default registry must outlive the pod"


RESOURCES = ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit")
NOT_RETRIED = {"promote-model"}  # a second try could register the same model twice


def parameter_default(value: str, names: dict) -> str:
    """A resource value of the IR: a pipeline parameter's placeholder, resolved to the parameter's default."""
    import re

    found = re.fullmatch(r"\{\{\$\.inputs\.parameters\['pipelinechannel--(\w+)'\]\}\}", value)
    assert found, f"{value!r}: not a pipeline parameter, so the run form cannot change it"
    return names[found.group(1)]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_task_declares_cpu_and_memory_from_parameters(name):
    from kubernetes.utils.quantity import parse_quantity

    spec, _ = compiled(name)
    names = defaults(name)
    executors = spec["deploymentSpec"]["executors"]
    containers = {label: e["container"] for label, e in executors.items() if "container" in e}  # importers run no container
    assert len(containers) >= (15 if name == "training" else 3)
    for label, container in containers.items():
        resources = container.get("resources", {})
        assert set(RESOURCES) <= set(resources), f"{name}: {label} lacks {sorted(set(RESOURCES) - set(resources))}"
        value = {k: parse_quantity(parameter_default(resources[k], names)) for k in RESOURCES}
        assert 0 < value["resourceCpuRequest"] <= value["resourceCpuLimit"], f"{name}: {label}: CPU request above its limit"
        assert value["resourceMemoryRequest"] == value["resourceMemoryLimit"] >= 2**30, (
            f"{name}: {label}: memory request = limit, 1Gi or more"
        )


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_tasks_retry_where_a_retry_is_safe(name):
    spec, _ = compiled(name)
    for task, body in spec["root"]["dag"]["tasks"].items():
        if "importer" in executor(spec, task) or task.startswith("importer"):
            continue
        policy = body.get("retryPolicy")
        if task in NOT_RETRIED:
            assert policy is None, f"{name}: {task} must not retry"
        else:
            assert policy and policy["maxRetryCount"] >= 1 and policy["backoffDuration"], f"{name}: {task} has no retry policy"


def test_the_npu_training_step_gets_the_device_files_group():
    """The PyTorchJob adds the Ascend driver's group as a supplemental group; kfp-kubernetes 2.17 has no
    supplementalGroups, so the KFP training step runs with that group as its primary group."""
    from pipelines.training_pipeline import ASCEND_DEVICE_GID, IMAGE_UID
    from tests.delivery.test_manifests import MANIFESTS, find, render

    spec, platform = compiled("training")
    context = platform["executors"][executor(spec, "train-gts-lum")]["securityContext"]
    assert context == {"runAsGroup": str(ASCEND_DEVICE_GID), "runAsUser": str(IMAGE_UID), "runAsNonRoot": True}
    job = find(render(MANIFESTS / "overlays" / "npu"), "PyTorchJob")
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["securityContext"]["supplementalGroups"] == [ASCEND_DEVICE_GID] and pod["securityContext"]["runAsUser"] == IMAGE_UID
