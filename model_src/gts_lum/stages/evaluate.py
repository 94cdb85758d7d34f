"""The evaluation stage: saved models ranked on the test cases of a sequence data set.

Full ranking over the candidate catalog (the split's target subset unless `candidate_filter` says
otherwise), Recall@K / NDCG@K for K = 5, 10, 50, 200 and MRR, in the paper's Table 2 format.
"""

from __future__ import annotations

import json
from pathlib import Path

from gts_lum.config import from_dict
from gts_lum.evaluation.protocol import EvalConfig, evaluate
from gts_lum.recommenders.registry import load_model
from gts_lum.sequence.candidates import select_candidates
from gts_lum.sequence.dataset import SequenceDataset
from gts_lum.stages.bench import format_table
from gts_lum.training.checkpoint import read_card


def evaluate_saved_models(sequences_dir: str | Path, model_dirs: list[str | Path], settings: dict | None = None) -> dict:
    """`settings`: EvalConfig fields plus `candidate_filter` (a filter over the behaviours table)."""
    settings = dict(settings or {})
    data = SequenceDataset.load(sequences_dir)
    expr = settings.pop("candidate_filter", "") or data.split_cfg.target_filter
    eval_cfg = from_dict(EvalConfig, settings)
    split = data.split()
    candidates = select_candidates(data.behaviors(), data.event_log.behavior_ids, expr) if expr else None
    rows = []
    for model_dir in model_dirs:
        card = read_card(model_dir)
        model = load_model(model_dir)
        if hasattr(model, "history_filter"):  # two-stage scorers re-rank only what the filter leaves
            model.history_filter = eval_cfg.history_filter
        metrics = evaluate(model, split.log, split.test, candidates, eval_cfg, desc=f"test {card['name']}")
        rows.append({"method": card["name"], **metrics, "train_seconds": card["metadata"].get("train_stats", {}).get("train_seconds", 0.0)})
    ref = len(rows) - 1 if len(rows) > 1 else 0  # the last model given is the floor the others are compared with
    header = (
        f"## Test ranking ({split.kind}, {rows[0]['n']:,} cases, {rows[0]['num_candidates']:,} candidates"
        f"{', history filtered' if eval_cfg.history_filter else ''})\n\n"
    )
    markdown = header + format_table(rows, reference=ref) + f"\nImpv.(avg): mean relative gain over `{rows[ref]['method']}`.\n"
    return {"rows": json.loads(json.dumps(rows, default=float)), "markdown": markdown}
