"""Benchmark: train a list of models on one split, evaluate them on its test cases, write the table.

The table follows the paper's Table 2: one row per method, Recall and NDCG at 5/10/50/200 in percent
with two decimals, and "Impv.(avg)", the mean over those columns of the relative improvement over a
reference row (the paper's reference is HSTU, its first row; here the first model unless named).

    from gts_lum.stages.bench import run_bench
    rows = run_bench(
        split,
        [("hstu", None, []), ("sasrec", None, []), ("markov", None, []), ("popularity", None, [])],
        out_dir="bench_out",
        eval_cfg=EvalConfig(history_filter=True),
    )  # writes bench_out/table.md and bench_out/table.json

A model spec is (name, config path or None for the packaged `pkg:models/<name>.yaml`, overrides such
as ["train.lr=0.001"]), optionally with a fourth element, the label shown in the table.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gts_lum.config import deep_merge, to_dict
from gts_lum.evaluation.protocol import EvalConfig, evaluate
from gts_lum.recommenders.registry import attach_dataset, build_model, default_config_path, model_entry
from gts_lum.sequence.splits import Split

log = logging.getLogger(__name__)

TABLE2_COLUMNS = ("R@5", "R@10", "R@50", "R@200", "NDCG@5", "NDCG@10", "NDCG@50", "NDCG@200")


def improvements(rows: Sequence[dict], reference: int, columns: Sequence[str]) -> list[float]:
    """Mean over `columns` of row / reference - 1, per row; NaN where the reference has a zero."""
    ref = np.array([rows[reference][c] for c in columns], dtype=np.float64)
    out = []
    for row in rows:
        values = np.array([row[c] for c in columns], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = values / ref - 1.0
        out.append(float(rel.mean()) if np.all(ref > 0) else math.nan)
    return out


def _reference_index(rows: Sequence[dict], reference: str | int | None) -> int:
    if not rows:
        raise ValueError("no rows to tabulate")
    if reference is None:
        return 0
    if isinstance(reference, int):
        if not -len(rows) <= reference < len(rows):
            raise ValueError(f"reference row {reference} out of range for {len(rows)} rows")
        return reference % len(rows)
    methods = [r["method"] for r in rows]
    if reference not in methods:
        raise ValueError(f"reference {reference!r} is not a method of the table: {methods}")
    return methods.index(reference)


def format_table(rows: Sequence[dict], reference: str | int | None = None, columns: Sequence[str] = TABLE2_COLUMNS) -> str:
    """A Markdown table in the paper's format: metrics in % (2 decimals), Impv.(avg) vs `reference`.

    `rows` are dicts with "method" and the metric values as fractions; `reference` is a method name or
    row index (default: the first row). A "Train (s)" column is added when every row has
    "train_seconds"; an "sd NDCG@10" column (standard deviation across seeds, in points) when a row
    is a mean over seeds (it has "sd").
    """
    ref = _reference_index(rows, reference)
    missing = [(r.get("method"), c) for r in rows for c in ("method", *columns) if c not in r]
    if missing:
        raise ValueError(f"rows lack (method, column) {missing[:5]}")
    impv = improvements(rows, ref, columns)
    with_time = all("train_seconds" in r for r in rows)
    with_sd = any("sd" in r for r in rows)
    header = ["Methods", *columns, "Impv.(avg)"] + (["sd NDCG@10"] if with_sd else []) + (["Train (s)"] if with_time else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for row, gain in zip(rows, impv):
        cells = [str(row["method"]), *(f"{100.0 * row[c]:.2f}" for c in columns)]
        cells.append("n/a" if math.isnan(gain) else f"{100.0 * gain:.2f}%")
        if with_sd:
            cells.append(f"{100.0 * row['sd']['NDCG@10']:.2f}" if "sd" in row else "-")
        if with_time:
            cells.append(f"{row['train_seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _spec(spec: Sequence) -> tuple[str, str | None, list | dict, str]:
    if not 3 <= len(spec) <= 4:
        raise ValueError(f"model spec {spec!r}: expected (name, config path or None, overrides[, label])")
    name, cfg_path, overrides = spec[0], spec[1], spec[2] or []
    return name, cfg_path, overrides, spec[3] if len(spec) == 4 else name


def _jsonable(obj: Any) -> Any:
    """numpy scalars and NaN made JSON-safe (NaN -> null)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def write_tables(rows: list[dict], out_dir: str | Path, reference: str | int | None = None, meta: dict | None = None) -> None:
    """`table.md` (format_table) and `table.json` (rows with raw fractions, MRR, impv_avg, fit stats)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = _reference_index(rows, reference)
    for row, gain in zip(rows, improvements(rows, ref, TABLE2_COLUMNS)):
        row["impv_avg"] = gain
    (out / "table.md").write_text(format_table(rows, ref))
    payload = {"reference": rows[ref]["method"], "columns": list(TABLE2_COLUMNS), **(meta or {}), "rows": rows}
    (out / "table.json").write_text(json.dumps(_jsonable(payload), indent=2) + "\n")


def _with_time_budget(overrides: list | dict, seconds: float) -> list | dict:
    if isinstance(overrides, dict):
        return deep_merge(overrides, {"train": {"time_budget_s": seconds}})
    return [*overrides, f"train.time_budget_s={seconds}"]


def _with_seed(overrides: list | dict, seed: int | None) -> list | dict:
    if seed is None:
        return overrides
    if isinstance(overrides, dict):
        return deep_merge(overrides, {"train": {"seed": seed}})
    return [*overrides, f"train.seed={seed}"]


def _fit_and_test(name, cfg_path, overrides, label, split, candidates, eval_cfg, dataset) -> dict:
    """One model fitted on `split` and evaluated on its test cases: metrics, timing, fit statistics."""
    model = build_model(name, cfg_path, overrides)
    attach_dataset(model, dataset)
    log.info("bench: fitting %s (%s)", label, cfg_path or default_config_path(name) or "defaults")
    t0 = time.perf_counter()
    stats = model.fit(split, eval_cfg, candidates)
    train_seconds = time.perf_counter() - t0
    metrics = evaluate(model, split.log, split.test, candidates, eval_cfg, desc=f"{label} test")
    log.info("bench: %s test NDCG@10 %.4f R@10 %.4f (%.1f s)", label, metrics["NDCG@10"], metrics["R@10"], train_seconds)
    return {"model_config": to_dict(model.cfg), **metrics, "train_seconds": train_seconds, "fit": stats}


def run_bench(
    split: Split,
    models: Sequence[Sequence],
    out_dir: str | Path,
    candidates: np.ndarray | None = None,
    eval_cfg: EvalConfig | None = None,
    reference: str | int | None = None,
    dataset: Any = None,
    seeds: Sequence[int] | None = None,
    equal_time_as: str | None = None,
) -> list[dict]:
    """Fit each model on `split` (train / valid), evaluate on `split.test`, write table.md + table.json.

    `dataset`: the `SequenceDataset` the split comes from, for models that read more than the log.
    `seeds`: each model that trains from a seed (`train.seed`) runs once per seed; its row holds the
    mean, the standard deviation across seeds under "sd" and each run (with its fit statistics) under
    "seeds". Deterministic models (Markov, popularity) run once.
    `equal_time_as`: the label of a row listed before the others it governs; once it has run, every
    later model whose training takes a wall-time budget gets that row's mean training time as its
    `train.time_budget_s` (models compared at equal training time on the same machine).

    Returns one dict per model: method, model, config, overrides, the metrics (fractions), MRR, n,
    train_seconds, impv_avg and the model's fit statistics under "fit" (one run) or "seeds".
    """
    eval_cfg = eval_cfg or EvalConfig()
    specs = [_spec(s) for s in models]
    labels = [s[3] for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate method labels {labels}: give repeated models a fourth element, the label")
    if equal_time_as is not None and equal_time_as not in labels:
        raise ValueError(f"equal_time_as {equal_time_as!r} is not a method of the bench: {labels}")
    rows = []
    budget = None
    for name, cfg_path, overrides, label in specs:
        # models that train (train.seed, train.time_budget_s) run per seed and under the time budget;
        # deterministic ones (Markov, popularity) run once
        trains = model_entry(name).trains
        if budget is not None and trains:
            overrides = _with_time_budget(overrides, budget)
        runs = [
            _fit_and_test(
                name,
                cfg_path,
                _with_seed(overrides, seed),
                label if seed is None else f"{label} (seed {seed})",
                split,
                candidates,
                eval_cfg,
                dataset,
            )
            for seed in (seeds if seeds and trains else [None])
        ]
        row = {"method": label, "model": name, "config": str(cfg_path or default_config_path(name)), "overrides": overrides, **runs[0]}
        if len(runs) > 1:
            # the mean over seeds; the spread says which gaps between rows one seed could not resolve
            averaged = [k for k, v in runs[0].items() if isinstance(v, float)]  # metrics and train_seconds
            values = np.array([[r[k] for k in averaged] for r in runs], dtype=np.float64)  # (seeds, keys)
            row.update(zip(averaged, values.mean(0).tolist()))
            row["sd"] = dict(zip(averaged, values.std(0, ddof=1).tolist()))
            row["seeds"] = [{"seed": s, **{k: r[k] for k in (*averaged, "fit")}} for s, r in zip(seeds, runs)]
            del row["fit"]  # per seed, under "seeds"
            log.info("bench: %s over seeds %s: NDCG@10 %.4f +- %.4f", label, list(seeds), row["NDCG@10"], row["sd"]["NDCG@10"])
        rows.append(row)
        if label == equal_time_as:
            budget = float(row["train_seconds"])
            log.info("bench: the models after %s train for at most %.0f s each (its mean training time)", label, budget)
        # after every row: a long bench (hours on CPU) leaves a readable partial table if it is stopped
        done = [r["method"] for r in rows]
        partial_ref = reference if reference in done or (isinstance(reference, int) and -len(rows) <= reference < len(rows)) else None
        meta = {"split": split.kind, "eval": asdict(eval_cfg), "seeds": list(seeds or []), "rows_done": f"{len(rows)} of {len(specs)}"}
        write_tables(rows, out_dir, partial_ref, meta=meta)
    return rows
