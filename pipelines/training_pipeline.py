"""The training pipeline: ingest -> validate -> sequences -> encoders (semantic IDs, graph, tables) -> Q-former
phase I -> GTS-LUM phase II; sequences -> baselines (a sequence model and the Markov floor); evaluate all three.

Every setting is a pipeline parameter (config overrides are typed dict parameters, JSON objects in the UI), so a
run from the Kubeflow UI changes data, interval length, model sizes or device without a rebuild.

Cluster settings (kfp-kubernetes; `kfp.local` ignores them, so the local run is unchanged): the GTS-LUM
training task asks for an Ascend NPU, lands on Ascend nodes (node selector + toleration: a dict and a
list parameter), runs the NPU image and mounts the data PVC; deterministic steps are cached, training
steps are not. Every task declares CPU and memory (run parameters, pipelines/cluster.py) and retries
where that is safe; publish-features reads its keys and addresses from Secrets; after the promotion
gate, the deploy step rolls the export out to the InferenceService as the deployer service account.
"""

import os

from kfp import dsl, kubernetes

from components.encoders import encode_graph, encode_tables, qformer_pretrain, semantic_ids
from components.ingest import ingest, validate
from components.sequences import build_sequences
from components.serving import deploy_model, export_model, publish_features
from components.training import evaluate_models, label_tasks, promote_model, train_gts_lum, train_model
from pipelines.cluster import reads_object_storage, sized

# Where the training task runs. Every value is a pipeline parameter's default, so a run on a CPU cluster
# drops them from the UI: train_accelerator="" (no accelerator limit), train_node_selector={},
# train_tolerations=[], train_image=the CPU image (components.IMAGE). For NVIDIA GPUs:
# train_accelerator="nvidia.com/gpu" with that cluster's node label and taint.
ASCEND_RESOURCE = "huawei.com/Ascend910"  # the Ascend device plugin's extended resource
ASCEND_NODE_SELECTOR = {"accelerator": "huawei-Ascend910"}  # the node label of Ascend's cluster tooling
ASCEND_TOLERATIONS = [{"key": ASCEND_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
NPU_IMAGE = os.environ.get("GTS_LUM_NPU_IMAGE", "ghcr.io/gts-lum/gts-lum-npu:0.1.0")  # images/Dockerfile.npu
DEPLOYER_TOKEN = "/var/run/secrets/gts-lum-deployer"  # the deploy step's service-account token (a Secret volume)
# The Ascend driver's device files belong to the host's HwHiAiUser group (1000 by default; set the host's
# gid when compiling). kfp-kubernetes 2.17 sets no supplementalGroups, so the training container runs with
# that group as its primary group (runAsGroup), the image's non-root user keeping its uid.
ASCEND_DEVICE_GID = int(os.environ.get("GTS_LUM_ASCEND_DEVICE_GID", "1000"))
IMAGE_UID = 10001  # images/Dockerfile.npu's user
DATA_MOUNT = "/mnt/gts-lum"  # the data PVC in the training pod: pretrained decoders (net.decoder.pretrained), checkpoints


# One function of ~220 lines, on purpose: KFP compiles the DAG from this body, and its length is the run
# parameters (every setting one, ~70 lines, what the UI shows) and one short block a step; sub-pipelines
# would only hide steps behind a nested node in the UI. (A docstring here would become the pipeline's
# description in the compiled YAML, so the reason is this comment.)
@dsl.pipeline(name="gts-lum-training", description="GTS-LUM: data to an evaluated model (leave-one-out R@K / NDCG@K).")
def training_pipeline(
    data_source: str = "synth:demo",  # synth:NAME, a folder (e.g. on the PVC) or s3:// / minio:// / gs:// URI
    mapping: str = "",
    synth_overrides: dict = {},
    validation_overrides: dict = {},
    sequence_config: str = "pkg:sequence/default.yaml",
    sequence_overrides: dict = {},
    split_config: dict = {"kind": "leave_one_out", "target_filter": "type=ott"},
    gts_lum_config: str = "pkg:models/gts_lum.yaml",
    # CPU-sized phase II for the demo (~6 min on 2 cores): the settings validation chose on the simulator at
    # HSTU's training time (BENCHMARKS.md "Phase II at HSTU's pace"): width 64, the Q-former frozen, 512
    # negatives, every next event a target, 48 epochs of 2,048 windows (16 stopped while validation still
    # rose: BENCHMARKS.md "GTS-LUM in the main job"), 500 validation cases; no interval tokens, compressor,
    # profile token or target-aware term (each cost more than it returned at this budget). The paper's
    # layout: {"sequence": {"variant": "interval"}, "net": {"target_placement": "front", ...}} from the UI
    gts_lum_overrides: dict = {
        "sequence": {"token_budget": 120, "variant": "none"},
        "net": {
            "adapter_trainable": False,
            "decoder": {"hidden_size": 64, "intermediate_size": 192, "num_heads": 2, "dropout": 0.0},
            "input_dropout": 0.0,
            "compressor": {"enabled": False},
            "profile_token": False,
            "target_placement": "none",
        },
        "train": {
            "epochs": 48,
            "patience": 48,
            "max_cases_per_epoch": 2048,
            "valid_cases": 500,
            "lr_schedule": "cosine",
            "warmup_steps": 40,
            "sampled_negatives": 512,
            "targets": "all",
        },
    },
    model_name: str = "sasrec",
    model_config: str = "",
    model_overrides: dict = {"train": {"windows_per_epoch": 8192, "epochs": 10}},
    baseline_name: str = "markov",
    device: str = "auto",
    eval_config: dict = {"history_filter": False, "max_users": 500},  # a fixed seeded sample of test users
    tokenizer_config: str = "pkg:tokenizer/default.yaml",
    tokenizer_overrides: dict = {},
    graph_config: str = "pkg:encoders/graph.yaml",
    graph_overrides: dict = {},
    table_config: str = "pkg:encoders/table.yaml",
    behavior_table_overrides: dict = {},
    user_table_overrides: dict = {"kind": "learned"},
    qformer_config: str = "pkg:qformer/default.yaml",
    qformer_overrides: dict = {"epochs": 5, "qformer": {"hidden_size": 128, "num_layers": 2, "intermediate_size": 256}},
    train_accelerator: str = ASCEND_RESOURCE,
    train_accelerator_count: str = "1",
    train_node_selector: dict = ASCEND_NODE_SELECTOR,
    train_tolerations: list = ASCEND_TOLERATIONS,
    train_image: str = NPU_IMAGE,
    data_pvc: str = "gts-lum-data",  # manifests/base/pvc.yaml
    # label tasks (task tokens + heads on the GTS-LUM user embedding), from the data set's labels table
    heads_config: str = "pkg:heads/default.yaml",
    heads_overrides: dict = {"task_token": {"epochs": 3}},  # CPU-sized for the demo (pkg default: 8)
    # the life cycle: promote the new GTS-LUM when it beats production on validation by `promotion_margin`
    # where promoted models are registered: an object-store prefix (a JSON file there; by default in KFP's
    # own bucket, so it outlives every run), a folder, or the Kubeflow Model Registry's http(s) address
    registry: str = "minio://mlpipeline/gts-lum/registry",
    promotion_margin: float = 0.01,
    # serving: Feast (the local sqlite repo by default; in the image, its copy under the working folder)
    # and the KServe export. On a cluster: feature_config="production/feature_store.yaml" (Redis + the SQL
    # registry), whose addresses come from the Secrets below (optional: the local config needs neither).
    feature_repo: str = "feature_repo",
    feature_config: str = "",
    feature_last_n: int = 512,
    # Secrets of the run's namespace, created by the operator (README, "First run on a cluster")
    pseudonym_secret: str = "gts-lum-pseudonym",  # key: the key of the user-id pseudonyms
    feast_registry_secret: str = "gts-lum-feast-registry",  # url: the SQL registry's SQLAlchemy URL
    redis_secret: str = "gts-lum-redis",  # connection: Feast's Redis connection string
    object_store_secret: str = "gts-lum-object-store",  # endpoint, access_key, secret_key: for data_source and registry URIs
    # the rollout after the gate (gts_lum.serving.deploy): the InferenceService of manifests/serving in
    # `deploy_namespace` (empty: no rollout), as the gts-lum-deployer service account, whose token the
    # operator puts in the Secret `deployer_token_secret` of the run's namespace
    deploy_namespace: str = "",
    inference_service: str = "gts-lum",
    canary_traffic_percent: int = 10,
    deployer_token_secret: str = "gts-lum-deployer-token",
    # CPU and memory of each task, by kind (pipelines/cluster.py): data steps, encoders, training
    step_cpu_request: str = "500m",
    step_cpu_limit: str = "2",
    step_memory: str = "4Gi",
    encoder_cpu_request: str = "2",
    encoder_cpu_limit: str = "4",
    encoder_memory: str = "8Gi",
    train_cpu_request: str = "4",
    train_cpu_limit: str = "8",
    train_memory: str = "16Gi",
):
    raw = ingest(source=data_source, mapping=mapping, synth_overrides=synth_overrides).set_display_name("ingest")
    clean = validate(raw=raw.outputs["raw"], validation_overrides=validation_overrides).set_display_name("validate")
    seqs = build_sequences(
        clean=clean.outputs["clean"],
        sequence_config=sequence_config,
        sequence_overrides=sequence_overrides,
        split_config=split_config,
    ).set_display_name("sequences")
    # Multi-modal encoders: independent of each other, so they run in parallel on a cluster.
    ids = semantic_ids(
        clean=clean.outputs["clean"], tokenizer_config=tokenizer_config, tokenizer_overrides=tokenizer_overrides
    ).set_display_name("semantic-ids")
    graph = encode_graph(sequences=seqs.outputs["sequences"], graph_config=graph_config, graph_overrides=graph_overrides).set_display_name(
        "graph-node2vec"
    )
    tables = encode_tables(
        clean=clean.outputs["clean"],
        table_config=table_config,
        behavior_overrides=behavior_table_overrides,
        user_overrides=user_table_overrides,
    ).set_display_name("table-encoders")
    phase1 = (
        qformer_pretrain(
            sequences=seqs.outputs["sequences"],
            ids=ids.outputs["ids"],
            graph=graph.outputs["graph"],
            tables=tables.outputs["tables"],
            qformer_config=qformer_config,
            qformer_overrides=qformer_overrides,
        )
        .set_display_name("qformer-pretrain")
        .set_caching_options(False)
    )
    lum = train_gts_lum(
        sequences=seqs.outputs["sequences"],
        ids=ids.outputs["ids"],
        graph=graph.outputs["graph"],
        tables=tables.outputs["tables"],
        qformer=phase1.outputs["qformer"],
        model_config=gts_lum_config,
        model_overrides=gts_lum_overrides,
        device=device,
    ).set_display_name("train-gts-lum")
    lum.set_caching_options(False)  # training is not deterministic across devices: always rerun
    lum.set_container_image(train_image).set_accelerator_type(train_accelerator).set_accelerator_limit(train_accelerator_count)
    kubernetes.add_node_selector_json(lum, train_node_selector)
    kubernetes.add_toleration_json(lum, train_tolerations)
    kubernetes.mount_pvc(lum, pvc_name=data_pvc, mount_path=DATA_MOUNT)
    kubernetes.set_security_context(lum, run_as_user=IMAGE_UID, run_as_group=ASCEND_DEVICE_GID, run_as_non_root=True)
    model = train_model(
        sequences=seqs.outputs["sequences"],
        model_name=model_name,
        model_config=model_config,
        model_overrides=model_overrides,
        device=device,
    ).set_display_name("train-sequence-baseline")
    model.set_caching_options(False)
    floor = train_model(
        sequences=seqs.outputs["sequences"], model_name=baseline_name, model_config="", model_overrides={}, device="cpu"
    ).set_display_name("train-baseline")
    evaluation = evaluate_models(
        sequences=seqs.outputs["sequences"],
        model=lum.outputs["model"],
        sequence_baseline=model.outputs["model"],
        baseline=floor.outputs["model"],
        eval_config=eval_config,
    ).set_display_name("evaluate")
    publish = publish_features(
        clean=clean.outputs["clean"],
        ids=ids.outputs["ids"],
        feature_repo=feature_repo,
        feature_config=feature_config,
        last_n=feature_last_n,
    ).set_display_name("publish-features")
    publish.set_caching_options(False)
    kubernetes.add_pod_label(publish, "gts-lum.io/redis-client", "true")  # Redis's NetworkPolicy admits only its clients
    kubernetes.use_secret_as_env(
        publish, secret_name=feast_registry_secret, secret_key_to_env={"url": "GTS_LUM_FEAST_REGISTRY"}, optional=True
    )
    kubernetes.use_secret_as_env(publish, secret_name=redis_secret, secret_key_to_env={"connection": "GTS_LUM_REDIS"}, optional=True)
    labels = label_tasks(
        model=lum.outputs["model"],
        sequences=seqs.outputs["sequences"],
        clean=clean.outputs["clean"],
        heads_config=heads_config,
        heads_overrides=heads_overrides,
    ).set_display_name("label-tasks")
    labels.set_caching_options(False)
    export = export_model(
        model=labels.outputs["labelled"], heads=labels.outputs["heads"], sequences=seqs.outputs["sequences"]
    ).set_display_name("export-model")
    # the gate scores and registers the export itself: what it promotes is what KServe serves
    gate = promote_model(
        sequences=seqs.outputs["sequences"], export=export.outputs["export"], registry=registry, margin=promotion_margin
    ).set_display_name("promotion-gate")
    gate.set_caching_options(False)
    # kfp.local sets the pseudonym key itself (run_local); a cluster's pod gets it only from a Secret. Publishing
    # keys users by pseudonym, the export names profile rows by it, and the gate scores the export so
    for task in (publish, export, gate):
        kubernetes.use_secret_as_env(task, secret_name=pseudonym_secret, secret_key_to_env={"key": "GTS_LUM_PSEUDONYM_KEY"})
    for task in (raw, gate):
        reads_object_storage(task, object_store_secret)
    rollout = deploy_model(
        export=export.outputs["export"],
        promoted=gate.outputs["Output"],
        inference_service=inference_service,
        namespace=deploy_namespace,
        canary_percent=canary_traffic_percent,
        token_dir=DEPLOYER_TOKEN,
    ).set_display_name("deploy")
    rollout.set_caching_options(False)
    kubernetes.use_secret_as_volume(rollout, secret_name=deployer_token_secret, mount_path=DEPLOYER_TOKEN, optional=True)
    for task in (raw, clean, seqs, publish, export, gate, rollout):
        # a second try of the gate could register the model twice
        sized(task, step_cpu_request, step_cpu_limit, step_memory, retry=task is not gate)
    for task in (ids, graph, tables, phase1, evaluation):
        sized(task, encoder_cpu_request, encoder_cpu_limit, encoder_memory)
    for task in (lum, model, floor, labels):
        sized(task, train_cpu_request, train_cpu_limit, train_memory)
    # Deterministic (seeded) steps are cached whatever the cluster's default: the same inputs give the
    # same artifacts. Ingest is keyed by the source's name, so a source whose contents change under the
    # same path needs a run with caching off (or a dated snapshot path).
    for task in (raw, clean, seqs, ids, graph, tables, floor, evaluation):
        task.set_caching_options(True)
