"""The phase-I stage (`gts-lum phase1`, the pipeline's qformer-pretrain step) and its benchmark
(`gts-lum phase1-bench`): the Q-former's alignment training (training.phase1) over a data set's artifacts."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from gts_lum.config import load_config
from gts_lum.data.contract import read_table
from gts_lum.data.ingest import prepare_dataset
from gts_lum.data.validate import load_event_log
from gts_lum.modeling.behavior_features import features_from_artifacts, stand_in_features
from gts_lum.sequence.dataset import SequenceDataset
from gts_lum.sequence.splits import leave_one_out
from gts_lum.tokenizer.text_encoder import TextEncoderConfig, encode
from gts_lum.training.phase1 import Phase1Config, Phase1Trainer, build_windows

log = logging.getLogger(__name__)


def run_phase1(
    sequences_dir: str | Path,
    out_dir: str | Path,
    semantic_ids_dir: str | Path | None = None,
    graph_dir: str | Path | None = None,
    table_embeddings: str | Path | None = None,
    config: str | Path | None = "pkg:qformer/default.yaml",
    overrides: list[str] | dict | None = None,
) -> dict:
    """Pipeline stage: the real artifacts (semantic IDs, node2vec, table vectors) -> phase I -> fused b^F.

    Windows come from the split's training events only; their texts from the scenarios table where
    the data set has one.
    """
    cfg = load_config(Phase1Config, config, overrides)
    data = SequenceDataset.load(sequences_dir)
    features = features_from_artifacts(sequences_dir, semantic_ids_dir, graph_dir, table_embeddings)
    windows = build_windows(data.split().train, data.behaviors(), data.scenarios(), cfg.windows)
    log.info(
        "phase I: %d behaviours, modalities %s, %d semantic-ID levels, %d windows (%s)",
        features.num_behaviors,
        features.modalities,
        len(features.codebook_sizes),
        len(windows),
        windows.source,
    )
    return Phase1Trainer(cfg, features, windows, out_dir).train(resume=True)


# -- benchmark -------------------------------------------------------------------------------------
PAPER_TRAIN_USERS = 193_799  # Table 1
PAPER_AVG_SEQUENCE = 4_832  # Table 1


def bench_phase1(
    dataset: str = "synth:tiny",
    overrides: list[str] | dict | None = None,
    max_steps: int = 20,
    workdir: str | Path | None = None,
    paper_catalog: int = 10_000,
) -> dict:
    """Time phase I at the default sizes on this machine and extrapolate an epoch to the paper's scale.

    Builds `dataset` (synth:tiny by default), stand-in features (`stand_in_features`: MiniLM text
    embeddings, residual k-means semantic IDs, attribute-table business embeddings), trains
    `max_steps` steps of the default config (+ `overrides`) and reports seconds per step, the epoch time
    here, held-out alignment after those steps, and the arithmetic of a paper-scale epoch:

        windows/epoch = 193,799 users x 4,832 events / K           (Table 1; non-overlapping windows)
        steps/epoch   = max(windows / window_batch, catalog / batch)
        epoch time    = steps x seconds per step (this machine; a lower bound of its speed when shared)

    The catalog size of the paper's data set is not published: `paper_catalog` is an assumption.
    """
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        clean = Path(prepare_dataset(dataset, work / "data"))
        behaviors = read_table(clean, "behaviors")
        split = leave_one_out(load_event_log(clean))
        text = encode(behaviors["description"].astype(str).tolist(), TextEncoderConfig(device="cpu"))
        features = stand_in_features(behaviors, text)
        cfg = load_config(Phase1Config, "pkg:qformer/default.yaml", overrides)
        windows = build_windows(split.train, behaviors, read_table(clean, "scenarios"), cfg.windows)
        cfg = dataclasses.replace(cfg, max_steps=max_steps)
        trainer = Phase1Trainer(cfg, features, windows, work / "phase1")
        summary = trainer.train(resume=False)
    sec = summary["seconds_per_step"]
    paper_windows = PAPER_TRAIN_USERS * PAPER_AVG_SEQUENCE // cfg.windows.size
    paper_steps = max(-(-paper_windows // cfg.window_batch_size), -(-paper_catalog // cfg.batch_size))
    return {
        "device": summary["device"],
        "config": {
            "hidden_size": cfg.qformer.hidden_size,
            "num_layers": cfg.qformer.num_layers,
            "num_queries": cfg.qformer.num_queries,
            "batch_size": cfg.batch_size,
            "window_batch_size": cfg.window_batch_size,
            "window_size": cfg.windows.size,
        },
        "catalog": features.num_behaviors,
        "windows": summary["windows"],
        "steps_timed": summary["steps"],
        "seconds_per_step": sec,
        "steps_per_epoch": summary["steps_per_epoch"],
        "seconds_per_epoch": sec * summary["steps_per_epoch"],
        "alignment_after_steps": summary["final"],
        "paper_windows_per_epoch": paper_windows,
        "paper_steps_per_epoch": paper_steps,
        "paper_hours_per_epoch_here": sec * paper_steps / 3600,
        "paper_arithmetic": (
            f"{PAPER_TRAIN_USERS:,} users x {PAPER_AVG_SEQUENCE:,} events / K={cfg.windows.size} = {paper_windows:,} windows; "
            f"/ {cfg.window_batch_size} per step = {paper_steps:,} steps x {sec:.3f} s = {sec * paper_steps / 3600:,.1f} h per epoch here"
        ),
    }
