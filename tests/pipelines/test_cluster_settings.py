"""What the compiled pipelines ask of a cluster (the IR and kfp-kubernetes' platform spec the Kubeflow
backend reads; `kfp.local` ignores all of it): Secrets as environment variables, the image's files."""

from __future__ import annotations

import inspect
from pathlib import Path

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
    assert "--chown=10001:10001 feature_repo" in (DOCKER / "Dockerfile.component").read_text(), "a local-config publish writes data/ beside it"
