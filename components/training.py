"""Training and evaluation steps: GTS-LUM (phase II over the encoders' artifacts), baselines, evaluation."""

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_model(
    sequences: Input[Dataset],
    model_name: str,
    model_config: str,
    model_overrides: dict,
    device: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train one registered model on the training split; select on validation; save safetensors + config."""
    from gts_lum.config import struct_parameter
    from gts_lum.stages.train import train_model as train

    stats = train(sequences.path, model_name, model_config or None, struct_parameter(model_overrides), model.path, device=device)
    model.metadata.update({"model": model_name, **{k: v for k, v in stats.items() if isinstance(v, (int, float, str))}})
    for key, value in stats.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_gts_lum(
    sequences: Input[Dataset],
    ids: Input[Dataset],
    graph: Input[Dataset],
    tables: Input[Dataset],
    qformer: Input[Model],
    model_config: str,
    model_overrides: dict,
    device: str,
    model: Output[Model],
    metrics: Output[Metrics],
    curve: Output[HTML],
):
    """Phase II: the target-aware decoder over the phase-I Q-former, the semantic IDs and the business encoders."""
    from gts_lum.config import deep_merge, struct_parameter
    from gts_lum.stages.train import train_model as train

    artifacts = {"artifacts": {"semantic_ids": ids.path, "graph": graph.path, "tables": tables.path, "qformer": qformer.path}}
    overrides = deep_merge(struct_parameter(model_overrides), artifacts)
    from gts_lum.evaluation.plots import training_curve_html

    stats = train(sequences.path, "gts_lum", model_config or None, overrides, model.path, device=device)
    model.metadata.update({"model": "gts_lum", **{k: v for k, v in stats.items() if isinstance(v, (int, float, str))}})
    for key, value in stats.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    with open(curve.path, "w") as f:
        f.write(training_curve_html(stats["history"], "GTS-LUM phase II"))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_models(
    sequences: Input[Dataset],
    model: Input[Model],
    baseline: Input[Model],
    sequence_baseline: Input[Model],
    eval_config: dict,
    metrics: Output[Metrics],
    table: Output[Markdown],
):
    """Leave-one-out full ranking on the test cases: R@K, NDCG@K, MRR for the model and the baselines."""
    from gts_lum.config import struct_parameter
    from gts_lum.stages.evaluate import evaluate_saved_models

    result = evaluate_saved_models(sequences.path, [model.path, sequence_baseline.path, baseline.path], struct_parameter(eval_config))
    for row in result["rows"]:
        for key, value in row.items():
            if isinstance(value, float):
                metrics.log_metric(f"{row['method']}_{key}", value)
    with open(table.path, "w") as f:
        f.write(result["markdown"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def label_tasks(
    model: Input[Model],
    sequences: Input[Dataset],
    clean: Input[Dataset],
    heads_config: str,
    heads_overrides: dict,
    labelled: Output[Model],
    heads: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
    qini: Output[HTML],
    classification: Output[ClassificationMetrics],
    curve_task: str = "churn",
):
    """Label tasks (churn, plan change, campaign uplift): a task token tuned through the frozen decoder and a
    head per task, evaluated on held-out users against the table baselines; the model with its tuned
    tokens and the heads go on to the export. A data set without labels passes the model through.
    `classification`: the ROC curve and confusion matrix of binary task `curve_task` on held-out users
    (the first binary task when the data set has no such task), for the Kubeflow UI."""
    import shutil
    import tempfile
    from pathlib import Path

    from gts_lum.config import load_config, struct_parameter
    from gts_lum.evaluation.plots import as_html
    from gts_lum.modeling.heads import HeadsConfig
    from gts_lum.stages.labels import run_label_stage

    cfg = load_config(HeadsConfig, heads_config, struct_parameter(heads_overrides))
    work = Path(tempfile.mkdtemp())
    results = run_label_stage(model.path, sequences.path, clean.path, work, cfg)
    shutil.copytree(work / "model", labelled.path)
    shutil.copytree(work / "heads", heads.path)
    labelled.metadata.update({"label_tasks": ",".join(results["tasks"])})
    for name, entry in results["tasks"].items():
        for scorer, values in entry["metrics"].items():
            for metric, value in values.items():
                if not metric.endswith("_std"):
                    metrics.log_metric(f"{name}.{scorer}.{metric}", float(value))
    with open(report.path, "w") as f:
        f.write("## Label tasks (held-out users)\n\n" + (work / "labels.md").read_text())
    binary = {name: entry["curves"] for name, entry in results["tasks"].items() if "curves" in entry}
    if binary:
        curves = binary.get(curve_task) or next(iter(binary.values()))
        classification.log_roc_curve(curves["fpr"], curves["tpr"], curves["thresholds"])
        classification.log_confusion_matrix(curves["categories"], curves["confusion_matrix"])
        classification.metadata["task"] = curve_task if curve_task in binary else next(iter(binary))
    pngs = sorted(work.glob("qini_*.png"))
    pages = [as_html(p.read_bytes(), p.stem.removeprefix("qini_")) for p in pngs] or [
        "<html><body>No uplift task in this data set.</body></html>"
    ]
    with open(qini.path, "w") as f:
        f.write("\n".join(pages))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote_model(
    sequences: Input[Dataset], export: Input[Model], registry: str, margin: float, metrics: Output[Metrics], decision: Output[Markdown]
) -> bool:
    """The gate: the new export against production on the same validation users; registered (its artifact
    URI, which KServe and the next run's gate read) when better by `margin`. Returns whether it promoted
    (the deploy step's condition)."""
    from gts_lum.stages.promotion import PromotionConfig, promotion_gate

    result = promotion_gate(sequences.path, export.path, registry, PromotionConfig(margin=margin), uri=export.uri)
    metrics.log_metric("promoted", float(result["promoted"]))
    metrics.log_metric(f"candidate_{result['metric']}", result["candidate"])
    if result["production"] is not None:
        metrics.log_metric(f"production_{result['metric']}", result["production"])
    with open(decision.path, "w") as f:
        f.write(f"## Promotion gate\n\n**{'promoted' if result['promoted'] else 'not promoted'}**: {result['reason']}\n")
    return bool(result["promoted"])
