"""Roll a promoted export out to the KServe InferenceService (manifests/serving/inferenceservice.yaml).

A deploy points the InferenceService at a new export and sets the canary share: the new Knative
revision takes `canary_percent` of the traffic, the previous one keeps the rest (promote: 100, roll
back: 0). An existing object is read from the API, changed here and written back (a JSON merge patch of
the predictor), so every other setting stays as it was. Where none exists yet, it is created from the
manifests' own file (`TEMPLATE`, which the components' image carries) as kustomize would render it: in
the namespace, with the overlays' label, its Feast volume on the ConfigMap the manifests generated
(kustomize appends a content hash to its name, so it is found by its label). The serving ConfigMap,
Secrets and service account come from `kubectl apply -k manifests/overlays/...`.

The API is reached as the gts-lum-deployer service account (its Role: get, create and patch
InferenceServices, list ConfigMaps): with its token mounted from a Secret at `token_dir` (the pipeline's
deploy step) or the pod's own service account. Without either nothing is changed, and the result says so.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import yaml

from gts_lum.data.storage import canonical

log = logging.getLogger(__name__)

CONTAINER = "kserve-container"
STORAGE_ENV = "STORAGE_URI"  # KServe's storage initializer reads the model from it into /mnt/models
IN_CLUSTER = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TEMPLATE = Path("manifests/serving/inferenceservice.yaml")  # relative to the image's working folder
FEAST_VOLUME = "feast-config"
FEAST_CONFIG_LABEL = "gts-lum.io/feast-config"  # on the generated ConfigMap (manifests/serving/kustomization.yaml)
PART_OF = {"app.kubernetes.io/part-of": "gts-lum"}  # the overlays' label
ISVC = dict(group="serving.kserve.io", version="v1beta1", plural="inferenceservices")


def serving_uri(uri: str) -> str:
    """The export's address as KServe reads it: KFP's minio:// artifact URIs are S3 buckets (KServe knows
    s3://, its endpoint from the service account's S3 Secret); gs://, s3:// and pvc:// stay as they are."""
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise ValueError(f"{uri!r}: a local path, which the cluster cannot read; export to object storage or a PVC")
    if scheme not in ("minio", "s3", "gs", "pvc", "https"):
        raise ValueError(f"{uri!r}: KServe's storage initializer reads s3://, gs://, pvc:// or https:// URIs")
    return canonical(uri)


def pointed_at(isvc: dict, storage_uri: str, canary_percent: int) -> dict:
    """A copy of the InferenceService `isvc` serving `storage_uri`, the new revision taking `canary_percent`."""
    if not 0 <= canary_percent <= 100:
        raise ValueError(f"canary_percent={canary_percent}: expected 0 to 100")
    out = copy.deepcopy(isvc)
    predictor = out["spec"]["predictor"]
    (container,) = [c for c in predictor["containers"] if c["name"] == CONTAINER]
    env = container.setdefault("env", [])
    found = [e for e in env if e["name"] == STORAGE_ENV]
    if not found:
        raise ValueError(f"InferenceService {isvc['metadata']['name']}: {CONTAINER} has no {STORAGE_ENV} variable to point at the export")
    found[0].clear()
    found[0].update(name=STORAGE_ENV, value=serving_uri(storage_uri))
    predictor["canaryTrafficPercent"] = canary_percent
    return out


def created(template: dict, name: str, namespace: str, storage_uri: str, canary_percent: int, feast_config: str) -> dict:
    """The InferenceService to create where none exists: the manifests' `template` as kustomize renders it
    (`namespace`, the overlays' label, the Feast volume on ConfigMap `feast_config`), serving `storage_uri`."""
    out = pointed_at(template, storage_uri, canary_percent)
    meta = out["metadata"]
    meta.update(name=name, namespace=namespace, labels={**meta.get("labels", {}), **PART_OF})
    (volume,) = [v for v in out["spec"]["predictor"].get("volumes", []) if v["name"] == FEAST_VOLUME]
    volume["configMap"]["name"] = feast_config
    return out


def feast_config_map(core, namespace: str) -> str:
    """The newest ConfigMap the manifests generated for Feast in `namespace` (its name ends in a hash)."""
    found = core.list_namespaced_config_map(namespace, label_selector=f"{FEAST_CONFIG_LABEL}=true").items
    if not found:
        raise RuntimeError(
            f"no ConfigMap labelled {FEAST_CONFIG_LABEL}=true in namespace {namespace}: apply the serving "
            f"manifests there first (kubectl apply -k manifests/overlays/npu)"
        )
    return max(found, key=lambda c: c.metadata.creation_timestamp).metadata.name


def _api(token_dir: Path | None):
    """An ApiClient as the mounted service-account token, or None without one."""
    from kubernetes import client  # only the deploy step talks to the Kubernetes API

    folder = next((d for d in (token_dir, IN_CLUSTER) if d is not None and (d / "token").exists()), None)
    if folder is None:
        return None
    cfg = client.Configuration()
    cfg.host = "https://kubernetes.default.svc"
    cfg.api_key = {"authorization": (folder / "token").read_text().strip()}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    ca = folder / "ca.crt"
    cfg.ssl_ca_cert = str(ca if ca.exists() else IN_CLUSTER / "ca.crt")
    return client.ApiClient(cfg)


def deploy(
    name: str, namespace: str, storage_uri: str, canary_percent: int, token_dir: str | Path | None = None, template: str | Path = TEMPLATE
) -> dict:
    """Point InferenceService `namespace/name` at `storage_uri` with `canary_percent`, creating it from
    `template` where there is none; returns the rollout, whether it `created` the object, and the object
    written (`applied` False, no object, when no token reaches the API)."""
    from kubernetes import client  # only the deploy step talks to the Kubernetes API

    api = _api(Path(token_dir) if token_dir else None)
    uri = serving_uri(storage_uri)
    result = {"applied": False, "name": name, "namespace": namespace, "storage_uri": uri, "canary_percent": canary_percent}
    if api is None:
        log.warning("no service-account token: InferenceService %s/%s not changed", namespace, name)
        return result
    custom = client.CustomObjectsApi(api)
    try:
        live = custom.get_namespaced_custom_object(**ISVC, namespace=namespace, name=name)
    except client.ApiException as e:
        if e.status != 404:
            raise
        live = None
    if live is None:
        body = created(
            yaml.safe_load(Path(template).read_text()),
            name,
            namespace,
            uri,
            canary_percent,
            feast_config_map(client.CoreV1Api(api), namespace),
        )
        custom.create_namespaced_custom_object(**ISVC, namespace=namespace, body=body)
    else:
        body = pointed_at(live, uri, canary_percent)
        custom.patch_namespaced_custom_object(
            **ISVC, namespace=namespace, name=name, body={"spec": {"predictor": body["spec"]["predictor"]}}
        )
    log.info(
        "InferenceService %s/%s %s, serving %s (canary %d%%)",
        namespace,
        name,
        "created" if live is None else "patched",
        uri,
        canary_percent,
    )
    return {**result, "applied": True, "created": live is None, "object": body}
