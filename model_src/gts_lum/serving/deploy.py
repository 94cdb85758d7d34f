"""Roll a promoted export out to the KServe InferenceService (manifests/serving/inferenceservice.yaml).

The manifests create the InferenceService (`kubectl apply -k`); a deploy points it at a new export and
sets the canary share: the new Knative revision takes `canary_percent` of the traffic, the previous one
keeps the rest (promote: 100, roll back: 0). The object is read from the API, changed here and written
back whole (a JSON merge patch of the predictor), so every other setting stays the manifests'.

The API is reached as the gts-lum-deployer service account (its Role: get and patch InferenceServices,
nothing else): with its token mounted from a Secret at `token_dir` (the pipeline's deploy step) or the
pod's own service account. Without either nothing is changed, and the result says so.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

log = logging.getLogger(__name__)

CONTAINER = "kserve-container"
STORAGE_ENV = "STORAGE_URI"  # KServe's storage initializer reads the model from it into /mnt/models
IN_CLUSTER = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def serving_uri(uri: str) -> str:
    """The export's address as KServe reads it: KFP's minio:// artifact URIs are S3 buckets (KServe knows
    s3://, its endpoint from the service account's S3 Secret); gs://, s3:// and pvc:// stay as they are."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise ValueError(f"{uri!r}: a local path, which the cluster cannot read; export to object storage or a PVC")
    if scheme == "minio":
        return f"s3://{rest}"
    if scheme not in ("s3", "gs", "pvc", "https"):
        raise ValueError(f"{uri!r}: KServe's storage initializer reads s3://, gs://, pvc:// or https:// URIs")
    return uri


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


def _api(token_dir: Path | None):
    """A CustomObjectsApi as the mounted service-account token, or None without one."""
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
    return client.CustomObjectsApi(client.ApiClient(cfg))


def deploy(name: str, namespace: str, storage_uri: str, canary_percent: int, token_dir: str | Path | None = None) -> dict:
    """Point InferenceService `namespace/name` at `storage_uri` with `canary_percent`; returns the rollout and
    the object written (`applied` False, no object, when no token reaches the API)."""
    api = _api(Path(token_dir) if token_dir else None)
    uri = serving_uri(storage_uri)
    if api is None:
        log.warning("no service-account token: InferenceService %s/%s not changed", namespace, name)
        return {"applied": False, "name": name, "namespace": namespace, "storage_uri": uri, "canary_percent": canary_percent}
    group = dict(group="serving.kserve.io", version="v1beta1", namespace=namespace, plural="inferenceservices", name=name)
    live = api.get_namespaced_custom_object(**group)
    changed = pointed_at(live, uri, canary_percent)
    api.patch_namespaced_custom_object(**group, body={"spec": {"predictor": changed["spec"]["predictor"]}})
    log.info("InferenceService %s/%s now serves %s (canary %d%%)", namespace, name, uri, canary_percent)
    return {"applied": True, "name": name, "namespace": namespace, "storage_uri": uri, "canary_percent": canary_percent, "object": changed}
