"""The Kubernetes manifests (manifests/, kustomize) without a cluster.

Every document is checked against the typed models of the APIs it targets, strictly (an unknown or
misspelt field fails, as the API server's strict validation would): the Kubernetes client's models, KServe's
V1beta1InferenceService, the training SDK's KubeflowOrgV1PyTorchJob and Katib's V1beta1Experiment. The
overlays are rendered by the real kustomize (`kubectl kustomize`) and their output is checked the same way,
with reference integrity (every ConfigMap, PVC, ServiceAccount and Service named is in the render, every
Secret is one the operator creates), plus the policy: non-root, no privilege escalation, all
capabilities dropped, read-only root filesystems, requests and limits, least-privilege RBAC, no
credentials in files, pinned images. Last, the manifests must agree with the code they run: the CLI
flags parse, the config overrides load, the pipeline's Ascend settings and PVC match.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = sorted(p.parent for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))

# (apiVersion, kind) -> typed model class name
KINDS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("batch/v1", "Job"): "V1Job",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("kubeflow.org/v1", "PyTorchJob"): "KubeflowOrgV1PyTorchJob",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("kubeflow.org/v1beta1", "Experiment"): "V1beta1Experiment",  # Katib: checked by check_experiment
}
CLUSTER_SCOPED = {"Namespace"}


# -- strict typed validation ------------------------------------------------------------------------


def _model_modules() -> list:
    import kserve.models
    import kubeflow.training.models
    import kubernetes.client.models

    return [kubernetes.client.models, kserve.models, kubeflow.training.models]


def build_model(data, klass: str, where: str):
    """`data` as an instance of the OpenAPI model `klass` (a Kubernetes-client-style class name): every
    key must be a field of the model, every value of the field's type; required fields are enforced by
    the model's own constructor (client-side validation)."""
    if klass.startswith("list["):
        assert isinstance(data, list), f"{where}: expected a list, got {type(data).__name__}"
        return [build_model(v, klass[5:-1], f"{where}[{i}]") for i, v in enumerate(data)]
    if klass.startswith("dict("):
        assert isinstance(data, dict), f"{where}: expected a mapping, got {type(data).__name__}"
        value_type = klass[5:-1].split(", ", 1)[1]
        return {k: build_model(v, value_type, f"{where}.{k}") for k, v in data.items()}
    if klass == "object":  # int-or-string (ports), raw extensions
        return data
    if klass in ("str", "datetime", "date"):
        # quantities, env values, labels: an unquoted number or boolean is rejected by the API server
        assert isinstance(data, str), f"{where}: expected a string, got {type(data).__name__} {data!r} (quote it)"
        return data
    if klass == "bool":
        assert isinstance(data, bool), f"{where}: expected true/false, got {data!r}"
        return data
    if klass == "int":
        assert isinstance(data, int) and not isinstance(data, bool), f"{where}: expected an integer, got {data!r}"
        return data
    if klass == "float":
        assert isinstance(data, (int, float)) and not isinstance(data, bool), f"{where}: expected a number, got {data!r}"
        return data
    cls = next((getattr(m, klass) for m in _model_modules() if hasattr(m, klass)), None)
    assert cls is not None, f"{where}: no model class {klass}"
    assert isinstance(data, dict), f"{where}: expected a {klass} mapping, got {type(data).__name__}"
    fields = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    kwargs = {}
    for key, value in data.items():
        assert key in fields, f"{where}.{key}: not a field of {klass} (known: {sorted(fields)})"
        kwargs[fields[key]] = build_model(value, cls.openapi_types[fields[key]], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise AssertionError(f"{where}: {klass}: {exc}") from None


def check_experiment(doc: dict, where: str) -> None:
    """Katib's models are pydantic and ignore unknown keys: a round trip must give the document back
    unchanged (nothing unknown dropped, nothing retyped). The trial spec, free-form there, is a Job."""
    from kubeflow_katib_api.models import V1beta1Experiment

    back = V1beta1Experiment.from_dict(doc).to_dict()
    assert back == doc, f"{where}: Katib's V1beta1Experiment does not keep it as written: {_first_difference(doc, back)}"
    trial = copy.deepcopy(doc["spec"]["trialTemplate"]["trialSpec"])
    assert (trial["apiVersion"], trial["kind"]) == ("batch/v1", "Job"), f"{where}: trials are batch/v1 Jobs"
    build_model(json.loads(re.sub(r"\$\{trialParameters\.\w+\}", "1", json.dumps(trial))), "V1Job", f"{where}.spec.trialTemplate.trialSpec")


def _first_difference(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in b:
                return f"{path}.{key} dropped (unknown field?)"
            if key not in a:
                return f"{path}.{key} added"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {a!r} became {b!r}"


def validate(doc: dict, where: str) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in KINDS, f"{where}: unknown apiVersion/kind {key}"
    assert doc.get("metadata", {}).get("name"), f"{where}: metadata.name is required"
    if key[1] == "Experiment":
        check_experiment(doc, where)
    else:
        build_model(doc, KINDS[key], where)


# -- the files and a renderer of the kustomize features used here -----------------------------------


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no document"
    return docs


def kustomizations() -> list[Path]:
    return sorted(MANIFESTS.rglob("kustomization.yaml"))


def listed_files(kustomization: Path) -> dict[str, list[Path]]:
    """What a kustomization names, by role: resources (files and folders), patches, generator inputs,
    kustomize's own configurations."""
    k = yaml.safe_load(kustomization.read_text())
    assert (k.get("apiVersion"), k.get("kind")) == ("kustomize.config.k8s.io/v1beta1", "Kustomization"), kustomization
    here = kustomization.parent
    return {
        "resources": [here / r for r in k.get("resources", [])],
        "patches": [here / p["path"] for p in k.get("patches", [])],
        "generated": [here / f for g in k.get("configMapGenerator", []) for f in g["files"]],
        "configurations": [here / c for c in k.get("configurations", [])],
    }


def kustomize_command() -> list[str]:
    """The real kustomize: a standalone `kustomize`, else kubectl's built-in one (`.ci/run` installs
    kubectl where absent). One before v4 lacks `labels` and targeted patches: skipped, with the reason."""
    for command, version in ((["kustomize"], ["kustomize", "version"]), (["kubectl", "kustomize"], ["kubectl", "version", "--client"])):
        if shutil.which(command[0]):
            out = subprocess.run(version, capture_output=True, text=True).stdout
            found = re.search(r"(?:^|Kustomize Version: )v(\d+)\.", out, re.M)  # kubectl before 1.24 names none
            if found and int(found.group(1)) >= 4:
                return command
    pytest.skip("no kustomize v4 or later (`kustomize`, `kubectl kustomize`) on PATH: .ci/run installs kubectl")


def render(folder: Path) -> list[dict]:
    """The objects `kustomize build folder` makes: what `kubectl apply -k folder` sends to the cluster."""
    done = subprocess.run([*kustomize_command(), str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, f"kustomize {folder.relative_to(REPO)}: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    assert {p.name for p in OVERLAYS} >= {"npu", "gpu"}
    return {p.name: render(p) for p in OVERLAYS}


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod an object makes (KServe's predictor is a pod spec too)."""
    kind, spec, name = obj["kind"], obj.get("spec", {}), obj["metadata"]["name"]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [(f"{kind}/{name}", spec["template"]["spec"])]
    if kind == "PyTorchJob":
        return [(f"{kind}/{name}/{role}", r["template"]["spec"]) for role, r in spec["pytorchReplicaSpecs"].items()]
    if kind == "InferenceService":
        return [(f"{kind}/{name}/predictor", spec["predictor"])]
    if kind == "Experiment":
        return [(f"{kind}/{name}/trial", spec["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"])]
    return []


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


# -- structure ----------------------------------------------------------------------------------------


def test_every_kustomization_lists_what_its_folder_holds():
    for kustomization in kustomizations():
        folder = kustomization.parent
        files = listed_files(kustomization)
        for role, paths in files.items():
            for path in paths:
                assert path.exists(), f"{kustomization}: {role} entry {path.relative_to(MANIFESTS)} does not exist"
                if path.is_dir():
                    assert (path / "kustomization.yaml").exists(), f"{kustomization}: {path} is a folder without a kustomization.yaml"
        named = {p.resolve() for paths in files.values() for p in paths}
        for yml in sorted(folder.glob("*.y*ml")):
            if yml.name != "kustomization.yaml":
                assert yml.resolve() in named, f"{yml.relative_to(REPO)} is in no list of {kustomization.relative_to(REPO)}"
    for yml in MANIFESTS.rglob("*.y*ml"):
        assert (yml.parent / "kustomization.yaml").exists(), f"{yml.relative_to(REPO)}: its folder has no kustomization.yaml"


def test_every_kustomization_is_part_of_an_overlay():
    reached: set[Path] = set()

    def walk(folder: Path) -> None:
        reached.add(folder.resolve())
        for res in listed_files(folder / "kustomization.yaml")["resources"]:
            if res.is_dir():
                walk(res)

    for overlay in OVERLAYS:
        walk(overlay)
    orphans = [k.parent.relative_to(REPO) for k in kustomizations() if k.parent.resolve() not in reached]
    assert not orphans, f"kustomizations no overlay applies: {orphans}"


def test_every_document_validates_against_its_typed_model():
    checked = 0
    for kustomization in kustomizations():
        for path in listed_files(kustomization)["resources"]:
            if path.is_file():
                for i, doc in enumerate(load_docs(path)):
                    validate(doc, f"{path.relative_to(REPO)}#{i}")
                    checked += 1
    assert checked >= 15


def test_the_strict_validation_catches_mistakes():
    job = load_docs(MANIFESTS / "training" / "pytorchjob.yaml")[0]
    typo = copy.deepcopy(job)
    typo["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolice: not a field of V1Container"):
        validate(typo, "typo")
    number = copy.deepcopy(job)
    number["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 16
    with pytest.raises(AssertionError, match="expected a string"):
        validate(number, "number")
    unnamed = copy.deepcopy(job)
    del unnamed["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(AssertionError, match="name"):
        validate(unnamed, "unnamed")
    experiment = load_docs(MANIFESTS / "katib" / "experiment.yaml")[0]
    experiment["spec"]["objective"]["objectiveMetric"] = "x"
    with pytest.raises(AssertionError, match="objectiveMetric dropped"):
        validate(experiment, "katib")


def test_overlays_render_to_valid_objects(rendered):
    for overlay, objects in rendered.items():
        names = [(o["kind"], o["metadata"]["name"]) for o in objects]
        assert len(names) == len(set(names)), f"overlay {overlay}: duplicate objects"
        for obj in objects:
            validate(obj, f"overlay {overlay}: {obj['kind']}/{obj['metadata']['name']}")
            assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gts-lum"
            if obj["kind"] not in CLUSTER_SCOPED:
                assert obj["metadata"]["namespace"] == "gts-lum"
        kinds = {o["kind"] for o in objects}
        assert {"PyTorchJob", "InferenceService", "Experiment", "Deployment", "StatefulSet", "PersistentVolumeClaim"} <= kinds


# Created beside the manifests by the operator, never kept in them (manifests/base/kustomization.yaml).
OPERATOR_SECRETS = {"gts-lum-redis", "gts-lum-feast-registry", "gts-lum-pseudonym"}


def references(obj: dict) -> list[tuple[str, str]]:
    """(kind, name) of every ConfigMap, Secret, PVC, ServiceAccount and Service that an object names."""
    refs: list[tuple[str, str]] = []

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in ("configMap", "configMapKeyRef", "configMapRef"):
                    refs.append(("ConfigMap", value["name"]))
                elif key in ("secretKeyRef", "secretRef"):
                    refs.append(("Secret", value["name"]))
                elif key == "secret" and "secretName" in value:
                    refs.append(("Secret", value["secretName"]))
                elif key == "persistentVolumeClaim" and "claimName" in value:
                    refs.append(("PersistentVolumeClaim", value["claimName"]))
                elif key == "serviceAccountName":
                    refs.append(("ServiceAccount", value))
                walk(value)

    walk(obj.get("spec", {}))
    refs += [("ServiceAccount", s["name"]) for s in obj.get("subjects", []) if s["kind"] == "ServiceAccount"]
    if obj["kind"] == "StatefulSet":
        refs.append(("Service", obj["spec"]["serviceName"]))
    return refs


def test_every_name_an_object_uses_is_rendered_or_an_operator_secret(rendered):
    for overlay, objects in rendered.items():
        have = {(o["kind"], o["metadata"]["name"]) for o in objects}
        used = {(o["kind"], o["metadata"]["name"]): references(o) for o in objects}
        assert sum(map(len, used.values())) >= 15, f"overlay {overlay}: the walk found too few references"
        for (kind, name), refs in used.items():
            for ref in refs:
                if ref[0] == "Secret":
                    assert ref[1] in OPERATOR_SECRETS, (
                        f"overlay {overlay}: {kind}/{name} names Secret {ref[1]}: add it to the base's list of Secrets to create"
                    )
                else:
                    assert ref in have, f"overlay {overlay}: {kind}/{name} names {ref[0]} {ref[1]}, which the render does not hold"
    documented = (MANIFESTS / "base" / "kustomization.yaml").read_text()
    assert all(f"create secret generic {s} " in documented for s in OPERATOR_SECRETS)


def test_the_gpu_overlay_leaves_no_ascend_setting(rendered):
    for kind in ("PyTorchJob", "Experiment"):
        npu, gpu = json.dumps(find(rendered["npu"], kind)), json.dumps(find(rendered["gpu"], kind))
        assert "huawei.com/Ascend910" in npu and "gts-lum-npu" in npu
        for ascend in ("huawei", "Ascend", "HCCL_", "gts-lum-npu", "supplementalGroups"):
            assert ascend not in gpu, f"gpu overlay: {kind} still holds {ascend!r}"
        assert "nvidia.com/gpu" in gpu
        for _, pod in pod_specs(find(rendered["gpu"], kind)):
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert env["GTS_LUM_DEVICE"] == "cuda"
    assert "HCCL_SOCKET_IFNAME" in json.dumps(find(rendered["npu"], "PyTorchJob"))
    assert "NCCL_SOCKET_IFNAME" in json.dumps(find(rendered["gpu"], "PyTorchJob"))


# -- policy -------------------------------------------------------------------------------------------


def _effective(pod: dict, container: dict, key: str):
    """A container's security setting, else the pod's (Kubernetes' own precedence)."""
    value = container.get("securityContext", {}).get(key)
    return pod.get("securityContext", {}).get(key) if value is None else value


def test_pods_run_unprivileged_with_read_only_roots_and_resource_limits(rendered):
    from tests.delivery.test_images import DOCKER, final_user

    our_uid = int(final_user(DOCKER / "Dockerfile.component").split(":")[0])
    for overlay, objects in rendered.items():
        accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
        for obj in objects:
            for where, pod in pod_specs(obj):
                where = f"overlay {overlay}: {where}"
                assert pod.get("serviceAccountName") in accounts, (
                    f"{where}: runs as service account {pod.get('serviceAccountName')!r}, which the manifests do not define"
                )
                assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
                volumes = {v["name"]: v for v in pod.get("volumes", [])}
                assert not any("hostPath" in v for v in volumes.values()), f"{where}: hostPath volume"
                volumes.update({t["metadata"]["name"]: {"persistentVolumeClaim": t} for t in obj["spec"].get("volumeClaimTemplates", [])})
                for c in containers(pod):
                    at = f"{where}/{c['name']}"
                    sc = c.get("securityContext", {})
                    assert _effective(pod, c, "runAsNonRoot") is True, f"{at}: runAsNonRoot is not set"
                    assert _effective(pod, c, "runAsUser") not in (None, 0), f"{at}: runAsUser must be a non-zero UID"
                    assert (_effective(pod, c, "seccompProfile") or {}).get("type") == "RuntimeDefault", (
                        f"{at}: seccompProfile RuntimeDefault"
                    )
                    assert sc.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation must be false"
                    assert not sc.get("privileged"), f"{at}: privileged"
                    assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), (
                        f"{at}: drop ALL capabilities, add none"
                    )
                    assert sc.get("readOnlyRootFilesystem") is True, f"{at}: readOnlyRootFilesystem"
                    for part in ("requests", "limits"):
                        got = c.get("resources", {}).get(part, {})
                        assert {"cpu", "memory"} <= set(got), f"{at}: resources.{part} needs cpu and memory"
                    for mount in c.get("volumeMounts", []):
                        assert mount["name"] in volumes, f"{at}: mounts undeclared volume {mount['name']}"
                    if c["image"].startswith("ghcr.io/gts-lum/"):
                        # our images: a writable /tmp and home (caches) under the read-only root, as the image's user
                        assert _effective(pod, c, "runAsUser") == our_uid, f"{at}: the images' user is {our_uid}"
                        writable = {m["mountPath"] for m in c.get("volumeMounts", []) if "emptyDir" in volumes[m["name"]]}
                        assert {"/tmp", "/home/gts"} <= writable, (
                            f"{at}: emptyDir volumes for /tmp and /home/gts (the text-embedding cache ~/.cache/gts-lum)"
                        )


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|CREDENTIAL", re.I)


def test_no_credentials_in_files(rendered):
    for path in MANIFESTS.rglob("*.y*ml"):
        text = path.read_text()
        for pattern in (r"-----BEGIN [A-Z ]*PRIVATE KEY", r"AKIA[0-9A-Z]{16}"):
            assert not re.search(pattern, text), f"{path.relative_to(REPO)}: looks like a credential ({pattern})"
        # a URL with user:password (comments may show the form with placeholders)
        content = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        assert not re.search(r"://[^/\s:@$]+:[^/\s@$]+@", content), f"{path.relative_to(REPO)}: a URL with a password"
    for overlay, objects in rendered.items():
        for obj in objects:
            assert obj["kind"] != "Secret", (
                f"overlay {overlay}: a Secret is defined in the manifests; create it beside them and reference it by name"
            )
            for where, pod in pod_specs(obj):
                for c in containers(pod):
                    for env in c.get("env", []):
                        if SECRET_NAME.search(env["name"]):
                            assert "secretKeyRef" in env.get("valueFrom", {}), (
                                f"{where}: env {env['name']} must come from a Secret (secretKeyRef)"
                            )
                        value = env.get("value", "")
                        if "password=" in value:
                            assert re.search(r"password=\$\(\w+\)", value), f"{where}: env {env['name']} holds a password inline"


def test_rbac_is_least_privilege(rendered):
    for objects in rendered.values():
        kinds = {o["kind"] for o in objects}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "cluster-wide RBAC: a namespaced Role is enough"
        roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
        accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
        bound = set()
        for role in roles.values():
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], f"Role {role['metadata']['name']}: a wildcard in {field}"
                assert not {"secrets", "pods/exec", "roles", "rolebindings"} & set(rule["resources"]), (
                    f"Role {role['metadata']['name']}: {rule['resources']}"
                )
                assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"]), (
                    f"Role {role['metadata']['name']}: {rule['verbs']}"
                )
        for binding in (o for o in objects if o["kind"] == "RoleBinding"):
            ref = binding["roleRef"]
            assert ref["kind"] == "Role" and ref["name"] in roles, (
                f"RoleBinding {binding['metadata']['name']}: binds {ref}, not a Role of these manifests"
            )
            for subject in binding["subjects"]:
                assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts, (
                    f"RoleBinding {binding['metadata']['name']}: subject {subject}"
                )
                assert subject["namespace"] == binding["metadata"]["namespace"]
                bound.add(subject["name"])
        for name, account in accounts.items():
            if name not in bound:  # no API access: no token to steal
                assert account.get("automountServiceAccountToken") is False, (
                    f"ServiceAccount {name} has no Role: set automountServiceAccountToken false"
                )


def test_images_are_pinned_and_ours_are_built_in_docker(rendered):
    from tests.delivery.test_images import built_tags

    ours = built_tags()
    feast_pin = next(
        d.split("==")[1] for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"] if d.startswith("feast==")
    )
    for objects in rendered.values():
        for obj in objects:
            for where, pod in pod_specs(obj):
                for c in containers(pod):
                    image = c["image"]
                    name, _, tag = image.rpartition(":")
                    assert name and "/" not in tag and tag != "latest", f"{where}: image {image}: pin a tag or digest"
                    if image.startswith("ghcr.io/gts-lum/"):
                        assert image in ours, f"{where}: {image} is built by no Dockerfile in images/ (their `docker build -t` lines)"
                    if "feast" in name:
                        assert tag == feast_pin, f"{where}: {image}: the feature server must match feast=={feast_pin} (pyproject.toml)"


# -- agreement with the code -----------------------------------------------------------------------------


def _gts_lum_config(overrides: list[str]):
    from gts_lum.config import load_config
    from gts_lum.recommenders.gts_lum_model import GTSLUMConfig

    return load_config(GTSLUMConfig, "pkg:models/gts_lum.yaml", overrides)


def _train_args(command: list[str], where: str):
    """The `gts-lum train` arguments of a container command, parsed by the CLI's own parser."""
    from gts_lum.cli import build_parser

    assert "gts_lum.cli" in command, f"{where}: does not run gts_lum.cli"
    argv = command[command.index("gts_lum.cli") + 1 :]
    args = build_parser().parse_args(argv)
    assert args.command == "train"
    return args


def test_the_training_job_runs_the_cli_with_the_pipelines_settings():
    import importlib
    import inspect

    tp = importlib.import_module("pipelines.training_pipeline")  # pipelines/__init__ shadows the module name

    job = load_docs(MANIFESTS / "training" / "pytorchjob.yaml")[0]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    assert replicas["Master"]["template"] == replicas["Worker"]["template"], "the Master's and the Worker's pods drifted apart"
    pod = replicas["Master"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == "pytorch", "the Training Operator configures the container named pytorch"
    assert c["command"][:3] == ["torchrun", "-m", "gts_lum.cli"]
    args = _train_args(c["command"], "PyTorchJob")
    assert args.model == "gts_lum" and args.checkpoints and args.out
    env = {e["name"]: e for e in c["env"]}
    assert args.device == "$(GTS_LUM_DEVICE)" and env["GTS_LUM_DEVICE"]["value"] == "npu"
    assert env["HCCL_IF_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" and "HCCL_SOCKET_IFNAME" in env
    cfg = _gts_lum_config(args.set)
    assert all(getattr(cfg.artifacts, k).startswith(tp.DATA_MOUNT) for k in ("semantic_ids", "graph", "tables", "qformer"))
    # the same Ascend placement, PVC and image as the pipeline's training task
    assert c["resources"]["limits"][tp.ASCEND_RESOURCE] == c["resources"]["requests"][tp.ASCEND_RESOURCE] == "1"
    assert pod["nodeSelector"] == tp.ASCEND_NODE_SELECTOR and pod["tolerations"] == tp.ASCEND_TOLERATIONS
    assert c["image"] == tp.NPU_IMAGE
    defaults = {n: p.default for n, p in inspect.signature(tp.training_pipeline.pipeline_func).parameters.items()}
    volumes = {v["name"]: v for v in pod["volumes"]}
    data = next(m for m in c["volumeMounts"] if m["mountPath"] == tp.DATA_MOUNT)
    assert volumes[data["name"]]["persistentVolumeClaim"]["claimName"] == defaults["data_pvc"]
    pvc = load_docs(MANIFESTS / "base" / "pvc.yaml")[0]
    assert pvc["metadata"]["name"] == defaults["data_pvc"] and "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert defaults["train_accelerator"] == tp.ASCEND_RESOURCE and defaults["train_image"] == tp.NPU_IMAGE
    assert job["spec"]["nprocPerNode"] == "1"  # one process, one NPU per pod (see the manifest)


def test_the_katib_experiment_searches_config_keys_on_the_trainers_metric():
    from gts_lum.training.phase2 import Phase2Config

    exp = load_docs(MANIFESTS / "katib" / "experiment.yaml")[0]["spec"]
    metric = f"valid_{Phase2Config().select_metric}"
    assert exp["objective"]["objectiveMetricName"] == metric and exp["objective"]["type"] == "maximize"
    assert metric == "valid_NDCG@10"
    # the collector's regex reads the trainer's per-epoch log line and the CLI's final JSON alike
    (fmt,) = exp["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"]
    pattern = re.compile(fmt)
    assert pattern.groups == 2
    for line, value in (
        (json.dumps({metric: 0.1234, "epochs": 3}, indent=2), "0.1234"),
        (str({"epoch": 2, metric: 0.05}), "0.05"),
        (f'"{metric}": 1.5e-05', "1.5e-05"),
    ):
        found = pattern.search(line)
        assert found and found.groups() == (metric, value), f"metricsFormat misses {line!r}"
    # parameters -> trial parameters -> placeholders in the command, one to one
    params = {p["name"]: p for p in exp["parameters"]}
    trial_params = {t["name"]: t["reference"] for t in exp["trialTemplate"]["trialParameters"]}
    assert set(trial_params.values()) == set(params)
    trial = exp["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]
    (c,) = trial["containers"]
    assert c["name"] == exp["trialTemplate"]["primaryContainerName"]
    used = set(re.findall(r"\$\{trialParameters\.(\w+)\}", json.dumps(c["command"])))
    assert used == set(trial_params)
    # the searched keys are the hyper-parameters this task names, and every value of the space loads
    sets = [a for a in c["command"] if "${trialParameters." in a]
    assert sorted(s.split("=")[1] for s in sets) == ["net.temperature", "qformer.num_queries", "train.lr"]

    def values(p: dict) -> list[str]:
        space = p["feasibleSpace"]
        return space["list"] if p["parameterType"] == "discrete" else [space["min"], space["max"]]

    firsts = {name: values(params[ref])[0] for name, ref in trial_params.items()}
    for name, ref in trial_params.items():
        for value in values(params[ref]):
            chosen = {**firsts, name: value}
            command = [re.sub(r"\$\{trialParameters\.(\w+)\}", lambda m, chosen=chosen: chosen[m.group(1)], a) for a in c["command"]]
            args = _train_args(command, "Experiment")
            cfg = _gts_lum_config(args.set)
            assert cfg.train.lr > 0 and 0 < cfg.net.temperature < 1 and cfg.qformer.num_queries >= 1
    assert all(m.get("readOnly") for m in c["volumeMounts"] if m["mountPath"] == "/mnt/gts-lum"), "trials only read the data PVC"


def _feature_store_variables() -> set[str]:
    text = "\n".join(l.split("#", 1)[0] for l in (MANIFESTS / "serving" / "feature_store.yaml").read_text().splitlines())
    return set(re.findall(r"\$\{(\w+)\}", text))


def test_the_feast_configmap_is_the_production_feature_store():
    production = REPO / "feature_repo" / "production" / "feature_store.yaml"
    if not production.exists():
        pytest.skip(f"{production} is not there yet")
    assert (MANIFESTS / "serving" / "feature_store.yaml").read_text() == production.read_text(), (
        "manifests/serving/feature_store.yaml: copy feature_repo/production/feature_store.yaml again"
    )
    config = yaml.safe_load(production.read_text())
    assert config["online_store"]["type"] == "redis" and config["registry"]["registry_type"] == "sql"
    assert _feature_store_variables(), "the production config reads its addresses from the environment"


def test_feast_readers_get_the_config_and_every_variable_it_names(rendered):
    objects = rendered["npu"]
    configmap = find(objects, "ConfigMap")
    # kustomize's hash suffix: a new feature_store.yaml is a new name, so the readers roll
    assert configmap["metadata"]["name"].startswith("gts-lum-feast-config-"), configmap["metadata"]["name"]
    assert set(configmap["data"]) == {"feature_store.yaml"}
    redis = find(objects, "Service", "gts-lum-redis")
    policy = find(objects, "NetworkPolicy", "gts-lum-redis")
    client_label = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    feast = find(objects, "Deployment", "gts-lum-feast")["spec"]["template"]
    predictor = find(objects, "InferenceService")["spec"]["predictor"]
    for labels, pod in ((feast["metadata"]["labels"], feast["spec"]), (predictor["labels"], predictor)):
        c = pod["containers"][0]
        env = {e["name"] for e in c["env"]}
        assert _feature_store_variables() <= env, f"{c['name']}: feature_store.yaml needs {sorted(_feature_store_variables() - env)}"
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = [m for m in c["volumeMounts"] if volumes[m["name"]].get("configMap", {}).get("name") == configmap["metadata"]["name"]]
        assert mounts and mounts[0].get("readOnly"), f"{c['name']}: mounts the Feast ConfigMap read-only"
        assert client_label.items() <= labels.items(), f"{c['name']}: the Redis NetworkPolicy would drop its connections"
        redis_env = next(e["value"] for e in c["env"] if e["name"] == "GTS_LUM_REDIS")
        assert redis_env.startswith(f"{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']},")


def test_the_inferenceservice_serves_the_export_with_a_documented_canary(rendered):
    import argparse

    from gts_lum.serving.options import add_server_arguments, scorer_config

    isvc = find(rendered["npu"], "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless", "a canary needs Knative revisions"
    predictor = isvc["spec"]["predictor"]
    assert 0 <= predictor["canaryTrafficPercent"] <= 100
    assert "canaryTrafficPercent" in (MANIFESTS / "serving" / "inferenceservice.yaml").read_text().split("apiVersion")[0], (
        "document the canary in the header"
    )
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container" and c["image"].endswith("gts-lum-serving:0.1.0")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    args = parser.parse_args(c["args"])
    assert args.export == "/mnt/models" and args.host == "0.0.0.0"
    cfg = scorer_config(args)
    if cfg.compile:  # torch.compile on CPU builds C++ kernels at load
        assert "g++" in (REPO / "images" / "Dockerfile.serving").read_text(), "--compile needs a C++ compiler in the serving image"
    cpu = float(c["resources"]["requests"]["cpu"])
    assert cpu == cfg.workers * cfg.torch_threads, "request the cores of the scorer's processes x threads"
    assert {"containerPort": args.http_port, "protocol": "TCP"} in c["ports"]
    configmap_mounts = {m["mountPath"] for m in c["volumeMounts"] if "configMap" in {v["name"]: v for v in predictor["volumes"]}[m["name"]]}
    assert args.feature_repo in configmap_mounts
    env = {e["name"]: e.get("value") for e in c["env"]}
    storage = env["STORAGE_URI"]
    claim, _, folder = storage.removeprefix("pvc://").partition("/")
    assert storage.startswith("pvc://") and folder, f"STORAGE_URI {storage}: pvc://CLAIM/FOLDER of the export"
    find(rendered["npu"], "PersistentVolumeClaim", claim)
    assert "GTS_LUM_PSEUDONYM_KEY" in env, "the scorer pseudonymizes user ids before it asks Feast"


def test_each_service_admits_only_its_callers(rendered):
    """The scorer is cluster-local; every serving pod has a NetworkPolicy that selects it and admits only the
    namespaces that should call it; Redis only its clients; the feature server takes no writes (issue 27)."""
    from gts_lum.serving.feature_server import READ_ROUTES
    from tests.pipelines.test_cluster_settings import compiled, executor

    for overlay, objects in rendered.items():
        isvc = find(objects, "InferenceService")
        labels = isvc["metadata"]["labels"]
        assert (
            labels["networking.knative.dev/visibility"] == "cluster-local" and labels["networking.kserve.io/visibility"] == "cluster-local"
        ), overlay
        # the labels of each serving pod: KServe adds the InferenceService's name to its predictor's
        pods = {
            "scorer": {**isvc["spec"]["predictor"]["labels"], "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]},
            "feast": find(objects, "Deployment", "gts-lum-feast")["spec"]["template"]["metadata"]["labels"],
            "redis": find(objects, "StatefulSet", "gts-lum-redis")["spec"]["template"]["metadata"]["labels"],
        }
        callers = {
            "gts-lum-scorer": (
                "scorer",
                [
                    {"kubernetes.io/metadata.name": "knative-serving"},
                    {"kubernetes.io/metadata.name": "istio-system"},
                    {"gts-lum.io/scorer-client": "true"},
                ],
            ),
            "gts-lum-feast": ("feast", [{"gts-lum.io/feature-client": "true"}]),
            "gts-lum-redis": ("redis", [None, {"gts-lum.io/pipelines": "true"}]),  # None: this namespace
        }
        for name, (pod, namespaces) in callers.items():
            spec = find(objects, "NetworkPolicy", name)["spec"]
            assert spec["podSelector"]["matchLabels"].items() <= pods[pod].items(), f"{overlay}: NetworkPolicy {name} selects no {pod} pod"
            assert spec["policyTypes"] == ["Ingress"] and len(spec["ingress"]) == 1, name
            peers = spec["ingress"][0]["from"]
            assert [p.get("namespaceSelector", {}).get("matchLabels") for p in peers] == namespaces, f"{overlay}: {name} admits {peers}"
        redis_peers = find(objects, "NetworkPolicy", "gts-lum-redis")["spec"]["ingress"][0]["from"]
        client = {"gts-lum.io/redis-client": "true"}
        assert all(p["podSelector"]["matchLabels"] == client for p in redis_peers), "Redis admits only its clients, in any namespace"
        clients = sorted(where for o in objects for where, _ in pod_specs(o) if client.items() <= _pod_labels(o).items())
        assert clients == ["Deployment/gts-lum-feast", "InferenceService/gts-lum/predictor"], f"{overlay}: Redis clients {clients}"

        feast = find(objects, "Deployment", "gts-lum-feast")["spec"]["template"]["spec"]["containers"][0]
        assert feast["command"][:3] == ["python", "-m", "gts_lum.serving.feature_server"], "the read-only feature server, not `feast serve`"
        assert set(READ_ROUTES) == {"/get-online-features", "/health"}
        port = int(feast["command"][feast["command"].index("--port") + 1])
        assert {"name": "http", "containerPort": port, "protocol": "TCP"} in feast["ports"]
        assert find(objects, "NetworkPolicy", "gts-lum-feast")["spec"]["ingress"][0]["ports"] == [{"port": port, "protocol": "TCP"}]
    # the pipeline's publish pods are Redis clients too (in the namespaces labelled gts-lum.io/pipelines=true)
    spec, platform = compiled("training")
    assert platform["executors"][executor(spec, "publish-features")]["podMetadata"]["labels"] == {"gts-lum.io/redis-client": "true"}


def _pod_labels(obj: dict) -> dict:
    """The labels of the pods an object makes (a predictor's `labels`, a template's metadata)."""
    if obj["kind"] == "InferenceService":
        return obj["spec"]["predictor"].get("labels", {})
    template = obj.get("spec", {}).get("template", {})
    return template.get("metadata", {}).get("labels", {}) if obj["kind"] in ("Deployment", "StatefulSet", "Job") else {}
