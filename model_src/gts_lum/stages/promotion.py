"""The model's life cycle: a promotion gate and the registry that remembers what was promoted.

A newly trained model is compared with the model in production on the SAME validation cases (a fixed
seeded sample of the split's validation users; never the test cases, which stay for reporting). It is
promoted only when its validation metric beats production's by at least `margin` (relative, e.g. 0.01 =
1 %); the first model, with nothing in production, is promoted. A promoted model is registered with its
metrics and the version of the data it was trained on:

- `registry` a folder or an object-store URI (`s3://`, `minio://`, `gs://`; the pipeline's default is a
  prefix in KFP's own bucket, so it outlives every run): `FileRegistry`, one JSON file there;
- `registry` an http(s) address: the Kubeflow Model Registry (`model-registry` on PyPI), the model
  version's custom properties holding the metrics, the data version and the stage.

A registered URI names the serving export, as KServe reads it (`minio://` registered as `s3://`): the
next run's gate downloads it from there to score production, and the deploy step hands it to KServe.

The InferenceService then rolls the promoted export out as a canary (manifests/serving).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gts_lum.data import storage
from gts_lum.data.pseudonym import profiles_by_pseudonym, pseudonymous_log
from gts_lum.evaluation.protocol import EvalConfig, evaluate
from gts_lum.recommenders.registry import load_model
from gts_lum.sequence.candidates import select_candidates
from gts_lum.sequence.dataset import SequenceDataset

log = logging.getLogger(__name__)


@dataclass
class PromotionConfig:
    metric: str = "NDCG@10"
    margin: float = 0.01  # relative gain over production required to promote
    valid_users: int | None = 1000  # fixed seeded sample of validation cases both models are scored on
    seed: int = 0
    model_name: str = "gts-lum"


def data_version(sequences_dir: str | Path) -> str:
    """A content hash of what the model was trained on: the event log and the split settings."""
    root = Path(sequences_dir)
    digest = hashlib.sha256()
    for name in ("event_log.npz", "split.yaml", "sequence_config.yaml"):
        path = root / name
        if path.exists():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


class FileRegistry:
    """Promoted model versions in `<location>/registry.json` (a folder or an object-store prefix); the last
    promoted one is in production. One gate writes at a time (the pipeline's gate never retries); two
    gates finishing together could each append to the state they read, and the later write wins."""

    def __init__(self, location: str | Path):
        self.uri = f"{str(location).rstrip('/')}/registry.json"

    def _read(self) -> dict:
        data = storage.read_bytes(self.uri)
        if data is None:
            return {"versions": []}
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.uri}: not a registry file ({e})") from e

    def production(self, name: str) -> dict | None:
        versions = [v for v in self._read()["versions"] if v["name"] == name]
        return versions[-1] if versions else None

    def register(self, name: str, uri: str, metrics: dict, data: str) -> dict:
        state = self._read()
        entry = {
            "name": name,
            "version": str(sum(v["name"] == name for v in state["versions"]) + 1),
            "uri": uri,
            "metrics": metrics,
            "data_version": data,
            "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        state["versions"].append(entry)
        storage.write_bytes(self.uri, json.dumps(state, indent=2).encode())
        return entry


class KubeflowRegistry:
    """The Kubeflow Model Registry through its Python client; the server address from the pipeline."""

    def __init__(self, address: str, author: str = "gts-lum pipeline"):
        from model_registry import ModelRegistry

        host, _, port = address.rpartition(":")
        self.client = ModelRegistry(host if port.isdigit() else address, int(port) if port.isdigit() else None, author=author)

    def production(self, name: str) -> dict | None:
        model = self.client.get_registered_model(name)
        if model is None:
            return None
        version = (
            self.client.get_model_version(name, model.custom_properties.get("production_version"))
            if model.custom_properties.get("production_version")
            else None
        )
        if version is None:
            return None
        artifact = self.client.get_model_artifact(name, version.name)
        return {
            "name": name,
            "version": version.name,
            "uri": artifact.uri,
            "metrics": json.loads(version.custom_properties.get("metrics", "{}")),
        }

    def register(self, name: str, uri: str, metrics: dict, data: str) -> dict:
        version = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.client.register_model(
            name,
            uri,
            model_format_name="gts-lum-safetensors",
            model_format_version="1",
            version=version,
            metadata={"metrics": json.dumps(metrics), "data_version": data, "stage": "production"},
        )
        model = self.client.get_registered_model(name)
        model.custom_properties = {**(model.custom_properties or {}), "production_version": version}
        self.client.update(model)
        return {"name": name, "version": version, "uri": uri, "metrics": metrics, "data_version": data}


def open_registry(registry: str):
    if registry.startswith(("http://", "https://")):
        return KubeflowRegistry(registry)
    return FileRegistry(registry or "runs/registry")


def promotion_gate(
    sequences_dir: str | Path, candidate_dir: str | Path, registry: str, cfg: PromotionConfig | None = None, uri: str | None = None
) -> dict:
    """Score the candidate and the production model on the same validation cases; promote when better.

    `uri`: the candidate's address for the cluster (on KFP, the export artifact's URI), registered instead
    of the local `candidate_dir`. Returns the decision: promoted, both metrics, the relative gain, the
    reason, and the registry entry.
    """

    cfg = cfg or PromotionConfig()
    data = SequenceDataset.load(sequences_dir)
    split = data.split()
    expr = data.split_cfg.target_filter
    candidates = select_candidates(data.behaviors(), data.event_log.behavior_ids, expr) if expr else None
    eval_cfg = EvalConfig(max_users=cfg.valid_users, seed=cfg.seed)

    def validation_metric(model_dir) -> float:
        if storage.is_remote(model_dir):  # production, registered by an earlier run: read from the bucket
            with tempfile.TemporaryDirectory() as tmp:
                return validation_metric(storage.download(model_dir, tmp))
        model = load_model(model_dir)
        # an export names its profile rows by pseudonym: score the users under the same names
        keyed = profiles_by_pseudonym(Path(model_dir) / "assets" / "users.npz")
        metrics = evaluate(
            model,
            pseudonymous_log(split.log) if keyed else split.log,
            split.valid,
            candidates,
            eval_cfg,
            desc=f"gate {Path(model_dir).name}",
        )
        if cfg.metric not in metrics:
            raise ValueError(f"promotion metric {cfg.metric!r} is not among {sorted(metrics)}")
        return float(metrics[cfg.metric])

    reg = open_registry(registry)
    production = reg.production(cfg.model_name)
    new = validation_metric(candidate_dir)
    decision = {"metric": cfg.metric, "margin": cfg.margin, "candidate": new, "production": None, "gain": None}
    if production is None:
        decision.update(promoted=True, reason="nothing in production yet")
    else:
        old = validation_metric(production["uri"])
        gain = new / old - 1 if old > 0 else float("inf") if new > 0 else 0.0
        decision.update(production=old, gain=gain, production_version=production["version"])
        promoted = gain >= cfg.margin
        decision.update(
            promoted=promoted,
            reason=f"{cfg.metric} {new:.4f} vs production {old:.4f}: {gain:+.1%} {'>=' if promoted else '<'} the {cfg.margin:.1%} margin",
        )
    if decision["promoted"]:
        where = storage.canonical(uri) if uri else str(Path(candidate_dir).resolve())
        decision["registered"] = reg.register(cfg.model_name, where, {cfg.metric: new}, data_version(sequences_dir))
    log.info("promotion gate: %s", decision["reason"])
    return {**decision, "config": asdict(cfg)}
