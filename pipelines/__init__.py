"""Kubeflow pipelines of gts-lum: definitions (Python), compiled YAML (`compiled/`), and the local runner."""

from pipelines.training_pipeline import training_pipeline

PIPELINES = {"training": training_pipeline}
