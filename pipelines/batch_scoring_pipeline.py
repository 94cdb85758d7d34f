"""The batch-scoring pipeline: an exported model (KServe's export) scores every user of a data set.

    ingest -> validate -> batch-score(export)     the export comes in through a dsl.importer (its URI)

The KFP launcher imports only gs://, minio://, s3:// and oci:// URIs: on KFP's MinIO, the URI a training
run registered (s3://mlpipeline/...) is imported as minio://mlpipeline/... (the same object).
"""

from kfp import dsl, kubernetes
from kfp.dsl import Model

from components.ingest import ingest, validate
from components.serving import batch_score
from pipelines.cluster import reads_object_storage, sized


@dsl.pipeline(name="gts-lum-batch-scoring", description="GTS-LUM: score all users (or a list) with an exported model; writes parquet.")
def batch_scoring_pipeline(
    export_uri: str = "minio://mlpipeline/gts-lum/export",  # the exported model (an export-model artifact, or a copy)
    data_source: str = "synth:demo",  # synth:NAME, a folder or an object-store URI, as in training
    mapping: str = "",
    synth_overrides: dict = {},
    validation_overrides: dict = {},
    users: str = "",  # comma-separated user ids; empty: every user
    chunk_size: int = 256,
    top_k: int = 10,
    object_store_secret: str = "gts-lum-object-store",  # endpoint, access_key, secret_key (pipelines/cluster.py)
    pseudonym_secret: str = "gts-lum-pseudonym",  # key: the export names users' profile rows by pseudonym
    # CPU and memory of the tasks (pipelines/cluster.py): data steps, and the scoring itself
    step_cpu_request: str = "500m",
    step_cpu_limit: str = "2",
    step_memory: str = "4Gi",
    score_cpu_request: str = "2",
    score_cpu_limit: str = "4",
    score_memory: str = "8Gi",
):
    export = dsl.importer(artifact_uri=export_uri, artifact_class=Model, reimport=False).set_display_name("exported-model")
    raw = ingest(source=data_source, mapping=mapping, synth_overrides=synth_overrides).set_display_name("ingest")
    clean = validate(raw=raw.outputs["raw"], validation_overrides=validation_overrides).set_display_name("validate")
    score = batch_score(
        export=export.output, data=clean.outputs["clean"], users=users, chunk_size=chunk_size, top_k=top_k
    ).set_display_name("batch-score")
    score.set_caching_options(False)
    kubernetes.use_secret_as_env(score, secret_name=pseudonym_secret, secret_key_to_env={"key": "GTS_LUM_PSEUDONYM_KEY"})
    for task in (raw, score):
        reads_object_storage(task, object_store_secret)
    for task in (raw, clean):
        sized(task, step_cpu_request, step_cpu_limit, step_memory)
    sized(score, score_cpu_request, score_cpu_limit, score_memory)  # resumes from its chunks after a retry
