"""Kubeflow pipelines of gts-lum: definitions (Python), compiled YAML (`compiled/`), and the local runner."""

from pipelines.batch_scoring_pipeline import batch_scoring_pipeline
from pipelines.training_pipeline import training_pipeline

PIPELINES = {"training": training_pipeline, "batch_scoring": batch_scoring_pipeline}
