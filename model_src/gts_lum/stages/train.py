"""The training stage: one registered model, trained on a sequence data set's split, saved.

gts-lum train runs/demo/sequences --model sasrec --out runs/demo/model
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from gts_lum.evaluation.protocol import EvalConfig
from gts_lum.recommenders.registry import attach_dataset, build_model, model_entry
from gts_lum.sequence.candidates import select_candidates
from gts_lum.sequence.dataset import SequenceDataset
from gts_lum.training.checkpoint import save_model

log = logging.getLogger(__name__)


def train_model(
    sequences_dir: str | Path,
    model_name: str,
    model_config: str | None = None,
    overrides: list[str] | dict | None = None,
    out_dir: str | Path = "model",
    device: str = "auto",
    eval_cfg: EvalConfig | None = None,
    checkpoint_dir: str | Path | None = None,
) -> dict:
    """Fit `model_name` on the training split (model selection on validation) and save it to `out_dir`.

    `checkpoint_dir`: where models that checkpoint (GTS-LUM and the sequential baselines) keep and resume their training state.
    Under torchrun only rank 0 writes the model.
    """
    data = SequenceDataset.load(sequences_dir)
    split = data.split()
    overrides = dict(overrides or {}) if isinstance(overrides, dict) or not overrides else overrides
    trains = model_entry(model_name).trains  # count-based models have no device, seed or checkpoints
    if device != "auto" and isinstance(overrides, dict) and trains:
        overrides.setdefault("train", {}).setdefault("device", device)
    model = build_model(model_name, model_config, overrides)
    attach_dataset(model, data)
    # Validation ranks the same candidates the evaluation will: the split's target subset.
    candidates = (
        select_candidates(data.behaviors(), data.event_log.behavior_ids, data.split_cfg.target_filter)
        if data.split_cfg.target_filter
        else None
    )
    started = time.perf_counter()
    extra = {"checkpoint_dir": checkpoint_dir} if checkpoint_dir and trains else {}
    stats = model.fit(split, eval_cfg or EvalConfig(), candidates, **extra)
    stats = {**stats, "train_seconds": round(time.perf_counter() - started, 2)}
    if int(os.environ.get("RANK", "0")) != 0:
        return stats
    save_model(model, model_name, out_dir, {"sequences": str(sequences_dir), "train_stats": json.loads(json.dumps(stats, default=str))})
    log.info("trained %s in %.1f s -> %s", model_name, stats["train_seconds"], out_dir)
    return stats
