"""Ingestion and validation steps."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(source: str, mapping: str, synth_overrides: dict, raw: Output[Dataset]):
    """Bring a data set into the contract layout: `synth:NAME` simulates, a folder (+ mapping) is adapted."""
    import shutil
    from pathlib import Path

    from gts_lum.config import struct_parameter
    from gts_lum.data.ingest import bring_in

    where = bring_in(source, raw.path, mapping or None, struct_parameter(synth_overrides), progress=False)
    if Path(where) != Path(raw.path):  # already in the contract layout: copy so the artifact is self-contained
        shutil.copytree(where, raw.path, dirs_exist_ok=True)
    raw.metadata["source"] = source


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(raw: Input[Dataset], validation_overrides: dict, clean: Output[Dataset], metrics: Output[Metrics], report: Output[Markdown]):
    """Typed validation: clean tables, quarantined rows (file, row, field, reason) and a summary."""
    from gts_lum.config import from_dict, struct_parameter
    from gts_lum.data.validate import ValidationConfig, summary_markdown, validate_dataset

    summary = validate_dataset(raw.path, clean.path, from_dict(ValidationConfig, struct_parameter(validation_overrides)), progress=False)
    for table, rep in summary["tables"].items():
        metrics.log_metric(f"{table}_rows_in", rep["rows_in"])
        metrics.log_metric(f"{table}_rows_rejected", rep["rows_in"] - rep["rows_kept"])
    clean.metadata.update({"dataset": summary["dataset"], "timezone": summary["timezone"]})
    with open(report.path, "w") as f:
        f.write(summary_markdown(summary))
