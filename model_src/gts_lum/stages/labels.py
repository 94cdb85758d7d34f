"""The label stage (`gts-lum labels`, the pipeline's label-tasks step): every task of the data set's labels
table gets a task token tuned through the frozen GTS-LUM decoder and a head (training.task_tokens), evaluated
on held-out users against the table baselines (training.label_tasks); the heads go to the export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from gts_lum.data.contract import read_table
from gts_lum.evaluation.labels import discover_tasks, format_label_table
from gts_lum.evaluation.plots import qini_png
from gts_lum.modeling.heads import HeadsConfig, build_head
from gts_lum.recommenders.registry import load_model
from gts_lum.sequence.dataset import SequenceDataset
from gts_lum.sequence.splits import EvalSet

# upward (layer 8): the heads' export format lives in serving/export.py, edited in parallel; moves down in a follow-up
from gts_lum.serving.export import HEADS_CARD, head_input_parts, head_inputs, save_head
from gts_lum.training.checkpoint import read_card, save_model
from gts_lum.training.label_tasks import evaluate_label_tasks
from gts_lum.training.task_tokens import tune_task_token, user_cases

log = logging.getLogger(__name__)


def run_label_stage(model_dir: str | Path, sequences_dir: str | Path, clean_dir: str | Path, out_dir: str | Path, cfg: HeadsConfig) -> dict:
    """Tune a task token and fit a head per label task of a saved GTS-LUM model; evaluate and save.

    Writes under `out_dir`: labels.md / labels.json (head vs table baselines vs random, held-out users),
    qini_<task>.png per uplift task, heads/ (`serving.export.save_head`, each with its task token) and
    model/ (the GTS-LUM model with its tuned task tokens; everything else unchanged).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = read_card(model_dir)
    if card["name"] != "gts_lum":
        raise ValueError(f"{model_dir}: a {card['name']!r} model; label task tokens need a GTS-LUM model")
    model = load_model(model_dir)
    log_ = SequenceDataset.load(sequences_dir).event_log
    labels = read_table(Path(clean_dir), "labels")
    if labels is None:  # a data set without labels (e.g. MovieLens): the model passes through, no heads
        log.warning("%s: the data set has no labels table; no label tasks, the model is saved unchanged", clean_dir)
        (out / "heads").mkdir(exist_ok=True)
        (out / "heads" / HEADS_CARD).write_text("{}\n")
        save_model(model, "gts_lum", out / "model", metadata=card.get("metadata", {}))
        (out / "labels.md").write_text("No labels table in this data set: no label tasks.\n")
        return {"tasks": {}, "users": {"labelled": 0}}
    tasks = discover_tasks(labels, cfg.max_classes)
    model.set_tasks([t.name for t in tasks])

    def cases(ids, task) -> EvalSet:  # histories end at the label's time (the latest row's, as label_arrays keeps)
        if "time" not in labels.columns:
            return user_cases(log_, ids)
        rows = labels[labels["task"].astype(str) == task.name]
        at = rows.groupby(rows["user_id"].astype(str))["time"].max()
        at = pd.to_datetime(at.reindex(np.asarray(ids).astype(str)), utc=True).dt.tz_convert(None).to_numpy()
        seconds = np.where(np.isnat(at), np.nan, at.astype("datetime64[s]").astype(np.int64).astype(np.float64))
        return user_cases(log_, ids, seconds)

    catalog = model.net.catalog_cache()  # the frozen network's b^F, read by every history summary

    def tune(task, ids, y, t) -> dict:
        summary = model.history_summary(log_, cases(ids, task), catalog) if cfg.history_summary else None
        width = model.net.hidden_size + (0 if summary is None else summary.shape[1])
        head = build_head(task, width, cfg)
        return tune_task_token(model, log_, cases(ids, task), y, t, model.task_index(task.name), head, cfg.task_token, summary)

    parts = [p for p, on in (("state", True), ("summary", cfg.history_summary), ("profile", cfg.profile)) if on]

    def embed(ids, task) -> np.ndarray | dict[str, np.ndarray]:
        # each task keeps the input with the lowest held-out loss (over `cfg.select_folds` folds)
        return head_inputs(head_input_parts(model, log_, cases(ids, task), parts, model.task_index(task.name), catalog))

    def keep(task, head, scores) -> None:
        save_head(out / "heads", task, head, task_token=model.task_index(task.name), inputs=scores["input"])
        if task.kind == "uplift":
            curves = {"GTS-LUM (task token + head)": scores["head"]}
            if "table_gbt" in scores:
                curves["T-learner (GBT on the users table)"] = scores["table_gbt"]
                curves["T-learner (GBT on the table + user embedding)"] = scores["table_gbt_embedding"]
            png = qini_png(curves, scores["y"], scores["treatment"], f"{task.name}: Qini curves, held-out users")
            (out / f"qini_{task.name}.png").write_bytes(png)

    results = evaluate_label_tasks(embed, clean_dir, cfg, seed=cfg.task_token.seed, tune=tune, known_users=log_.user_ids, on_head=keep)
    save_model(model, "gts_lum", out / "model", metadata={**card.get("metadata", {}), "label_tasks": model.cfg.net.tasks})
    (out / "labels.json").write_text(json.dumps(results, indent=2, default=float))
    table = format_label_table(results)
    (out / "labels.md").write_text(table + "\n")
    log.info("label tasks:\n%s", table)
    return results
