"""`gts-lum bench`: a whole benchmark from one YAML file - data, split, models, evaluation.

    gts-lum bench --config movielens --out runs/bench/movielens     # pkg:bench/movielens.yaml
    gts-lum bench --config synth --models markov,sasrec --out runs/bench/synth

The data set is prepared (simulated or adapted, then validated) under `<out>/data`, the sequence
artifact under `<out>/sequences`; the table is `<out>/table.md` + `<out>/table.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from gts_lum.data.ingest import prepare_dataset
from gts_lum.evaluation.bench import run_bench
from gts_lum.evaluation.candidates import select_candidates
from gts_lum.evaluation.protocol import EvalConfig
from gts_lum.sequence.dataset import SequenceDataset, SplitConfig, build_sequence_dataset

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    name: str = "bench"
    data: str = "synth:demo"  # synth:NAME or a data set folder
    mapping: str = ""  # column mapping for a folder in another layout
    synth_overrides: dict = field(default_factory=dict)
    split: SplitConfig = field(default_factory=SplitConfig)
    sequence_overrides: dict = field(default_factory=dict)
    candidate_filter: str = ""  # what to rank; default: the split's target subset
    eval: EvalConfig = field(default_factory=EvalConfig)
    models: list[str] = field(default_factory=lambda: ["popularity", "markov", "sasrec", "hstu"])
    model_configs: dict[str, str] = field(default_factory=dict)  # name -> YAML (default pkg:models/NAME.yaml)
    model_overrides: dict[str, dict] = field(default_factory=dict)  # name -> overrides
    reference: str | None = None  # the Impv.(avg) reference row (default: the first model)


def run_bench_config(cfg: BenchConfig, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    clean = prepare_dataset(cfg.data, out / "data", mapping=cfg.mapping or None, synth_overrides=cfg.synth_overrides)
    build_sequence_dataset(clean, out / "sequences", None, cfg.sequence_overrides, cfg.split)
    data = SequenceDataset.load(out / "sequences")
    split = data.split()
    expr = cfg.candidate_filter or cfg.split.target_filter
    candidates = select_candidates(data.behaviors(), data.event_log.behavior_ids, expr) if expr else None
    specs = [(name, cfg.model_configs.get(name), cfg.model_overrides.get(name, {})) for name in cfg.models]
    log.info("bench %s: %d test cases, %s candidates, models %s", cfg.name, len(split.test), "all" if candidates is None else len(candidates), cfg.models)
    rows = run_bench(split, specs, out, candidates, cfg.eval, cfg.reference, dataset=data)
    return {"rows": rows, "table_md": (out / "table.md").read_text()}
