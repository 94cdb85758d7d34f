"""Serving steps: publish features to Feast, export the model for KServe, batch scoring."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def publish_features(
    clean: Input[Dataset],
    ids: Input[Dataset],
    feature_repo: str,
    feature_config: str,
    last_n: int,
    sources: Output[Dataset],
    summary: Output[Markdown],
):
    """Feast: export the user profile, last-N behaviour sequences and the catalog's semantic IDs; apply + materialize
    into the store `feature_config` names (a feature_store.yaml relative to the repo; empty: the repo's own).

    User ids are pseudonymised with the key in GTS_LUM_PSEUDONYM_KEY (a Secret on the cluster)."""
    from gts_lum.serving.features import export_feature_sources
    from gts_lum.serving.features import publish_features as publish

    exported = export_feature_sources(clean.path, sources.path, ids.path, last_n=last_n)
    published = publish(feature_repo, sources.path, feature_config or None)
    sources.metadata.update({k: v for k, v in {**exported, **published}.items() if isinstance(v, (int, float, str))})
    with open(summary.path, "w") as f:
        f.write("## Feature store\n\n")
        f.writelines(f"- {k}: {v}\n" for k, v in {**exported, **published}.items() if isinstance(v, (int, float, str)))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export_model(model: Input[Model], heads: Input[Model], sequences: Input[Dataset], export: Output[Model]):
    """The KServe export: safetensors weights + assets + label heads + serving.yaml (catalog, timestamp settings, version)."""
    from gts_lum.serving.export import export_model as export_

    card = export_(model.path, export.path, heads_dir=heads.path, sequences_dir=sequences.path)
    export.metadata.update({"name": card["name"], "version": card["version"], "catalog_size": card["catalog"]["size"]})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def batch_score(export: Input[Model], data: Input[Dataset], users: str, chunk_size: int, top_k: int, scores: Output[Dataset]):
    """Score every user of `data` (or the comma-separated `users`) into parquet chunks; resumes after a kill."""
    import os
    import tempfile

    from gts_lum.data import storage
    from gts_lum.serving.batch import batch_score as score

    model = export.path
    if not os.path.exists(model) and storage.is_remote(export.uri):  # kfp.local imports a bucket's URI without downloading it
        model = str(storage.download(export.uri, tempfile.mkdtemp()))
    summary = score(
        model, data.path, scores.path, users=[u for u in users.split(",") if u] or None, chunk_size=chunk_size, top_k=top_k, progress=False
    )
    scores.metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy_model(
    export: Input[Model],
    promoted: bool,
    inference_service: str,
    namespace: str,
    canary_percent: int,
    token_dir: str,
    rollout: Output[Markdown],
):
    """After the promotion gate: point the InferenceService at the promoted export, the new revision taking
    `canary_percent` of the traffic. Nothing changes when the gate did not promote or `namespace` is empty."""
    from gts_lum.serving.deploy import deploy

    if not promoted or not namespace:
        reason = "the gate did not promote this model" if not promoted else "no namespace given (deploy_namespace)"
        with open(rollout.path, "w") as f:
            f.write(f"## Rollout\n\nNothing deployed: {reason}.\n")
        return
    result = deploy(inference_service, namespace, export.uri, canary_percent, token_dir)
    rollout.metadata.update({k: v for k, v in result.items() if isinstance(v, (bool, int, str))})
    with open(rollout.path, "w") as f:
        f.write("## Rollout\n\n")
        f.writelines(f"- {k}: {v}\n" for k, v in result.items() if k != "object")
