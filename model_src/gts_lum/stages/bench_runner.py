"""`gts-lum bench`: a whole benchmark from one YAML file - data, split, models, evaluation.

    gts-lum bench --config movielens --out runs/bench/movielens     # pkg:bench/movielens.yaml
    gts-lum bench --config synth --models markov,sasrec --out runs/bench/synth
    gts-lum bench --config table5_synth --out runs/bench/table5_synth          # an ablation table
    gts-lum bench --config gts_lum_synth --models "Markov,GTS-LUM" --set "seeds=[0,1,2]" --out ...  # mean +- sd

A `models` entry is a registered name, or a mapping {model, label, config, overrides} for variants of
one model (the ablation tables list GTS-LUM several times). With `encoders: true` the bench runs the
pipeline's encoder stages (semantic IDs, graph + node2vec, table encoders) once under `<out>/encoders`
and hands their artifacts to every GTS-LUM entry that names none. With `phase1` set as well, the
Q-former of those entries is pretrained first (phase I: the paper's six alignment tasks + the spread
term of pkg:qformer/default.yaml), once per distinct Q-former config under `<out>/phase1`, as the
pipeline does before phase II.

The data set is prepared (simulated or adapted, then validated) under `<out>/data`, the sequence
artifact under `<out>/sequences`; the table is `<out>/table.md` + `<out>/table.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from gts_lum.config import deep_merge, load_config, parse_overrides, read_yaml, to_dict
from gts_lum.data import storage
from gts_lum.data.ingest import prepare_dataset
from gts_lum.encoders.node2vec import run_graph_encoder
from gts_lum.evaluation.protocol import EvalConfig
from gts_lum.recommenders.gts_lum_model import GTSLUMConfig
from gts_lum.recommenders.registry import default_config_path
from gts_lum.sequence.candidates import select_candidates
from gts_lum.sequence.dataset import SequenceDataset, SplitConfig, build_sequence_dataset
from gts_lum.stages.bench import run_bench
from gts_lum.stages.phase1 import run_phase1
from gts_lum.stages.tables import encode_tables
from gts_lum.tokenizer.semantic_ids import tokenize_dataset

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
    models: list = field(default_factory=lambda: ["popularity", "markov", "sasrec", "hstu"])  # names or {model, label, config, overrides}
    model_configs: dict[str, str] = field(default_factory=dict)  # name -> YAML (default pkg:models/NAME.yaml)
    model_overrides: dict[str, dict] = field(default_factory=dict)  # name -> overrides
    reference: str | None = None  # the Impv.(avg) reference row (default: the first model)
    encoders: bool = False  # run the encoder stages for GTS-LUM entries (see the module docstring)
    encoder_overrides: dict = field(default_factory=dict)  # {tokenizer: {...}, graph: {...}, tables: {...}}
    # Each seeded model (train.seed) once per seed; rows are means with their spread (empty: one run each)
    seeds: list[int] = field(default_factory=list)
    # A row's label (listed first): the models after it train for its mean training time (run_bench)
    equal_time_as: str | None = None
    # Phase I before the GTS-LUM entries (needs encoders): Phase1Config overrides over
    # pkg:qformer/default.yaml, e.g. {epochs: 10}; {} its defaults. None: the Q-formers stay as built.
    phase1: dict | None = None


def load_bench_config(path: str | Path, overrides: list[str] | None = None) -> BenchConfig:
    """A bench config from a YAML file or `pkg:bench/NAME.yaml`, then `overrides` (KEY=VALUE).

    A relative `data:` or `mapping:` path in a config *file* is read from the file's folder where it exists
    there, so a config beside its data runs from any working directory; else it is read as given, from the
    working directory: so are the shipped `pkg:` configs, whose `../shared/data/...` paths are relative to
    the repository root, and every override (typed on the command line, relative to where it is typed).
    """
    data = read_yaml(path)
    folder = None if str(path).startswith("pkg:") else Path(path).parent
    for key in ("data", "mapping"):
        value = data.get(key)
        local = (
            isinstance(value, str)
            and value
            and not value.startswith(("synth:", "pkg:"))
            and not storage.is_remote(value)
            and not Path(value).is_absolute()
        )
        if folder is not None and local and (folder / value).exists():
            data[key] = str(folder / value)
    return load_config(BenchConfig, None, deep_merge(data, parse_overrides(overrides)))


def model_specs(cfg: BenchConfig, artifacts: dict | None = None) -> list[tuple]:
    """(name, config, overrides, label) per `models` entry; GTS-LUM entries get the encoder artifacts."""
    specs = []
    for entry in cfg.models:
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"bench models entry {entry!r}: a model name or a mapping with a 'model' key")
        unknown = set(entry) - {"model", "label", "config", "overrides"}
        if unknown:
            raise ValueError(f"bench models entry {entry['model']!r}: unknown key(s) {sorted(unknown)} (model, label, config, overrides)")
        name = entry["model"]
        overrides = deep_merge(cfg.model_overrides.get(name, {}), entry.get("overrides") or {})
        if name == "gts_lum" and artifacts:
            overrides = deep_merge({"artifacts": artifacts}, overrides)
        specs.append((name, entry.get("config") or cfg.model_configs.get(name), overrides, entry.get("label", name)))
    return specs


def run_encoders(clean: Path, sequences: Path, out: Path, overrides: dict) -> dict:
    """The pipeline's encoder stages, as the bench's GTS-LUM entries read them: {kind: folder}."""

    tokenize_dataset(clean, out / "semantic_ids", "pkg:tokenizer/default.yaml", overrides.get("tokenizer", {}), progress=False)
    run_graph_encoder(sequences, out / "graph", "pkg:encoders/graph.yaml", overrides.get("graph", {}))
    encode_tables(
        clean,
        out / "tables",
        behavior_overrides=overrides.get("tables", {}),
        user_overrides={"kind": "learned", **overrides.get("users", {})},
    )
    return {"semantic_ids": str(out / "semantic_ids"), "graph": str(out / "graph"), "tables": str(out / "tables")}


def run_phase1_stages(specs: list[tuple], sequences: Path, artifacts: dict, out: Path, overrides: dict) -> list[tuple]:
    """Phase I for the GTS-LUM entries that name no trained Q-former: one run per distinct Q-former config
    (the Table 3 and 5 variants share one; each Table 4 variant has its own), under `out/<variant>-<n>`;
    those entries then start from it (`artifacts.qformer`), as phase II does in the pipeline."""
    import json

    table = Path(artifacts["tables"]) / "behavior_table.npz" if artifacts.get("tables") else None
    runs: dict[str, str] = {}
    out_specs = []
    for name, cfg_path, model_overrides, label in specs:
        if name == "gts_lum":
            model_cfg = load_config(GTSLUMConfig, cfg_path or default_config_path(name), model_overrides)
            if not model_cfg.artifacts.qformer:
                qformer = to_dict(model_cfg.qformer)
                key = json.dumps(qformer, sort_keys=True)
                if key not in runs:
                    folder = out / f"{qformer['variant']}-{len(runs)}"
                    log.info("bench: phase I for %s (Q-former %s) -> %s", label, qformer["variant"], folder)
                    summary = run_phase1(
                        sequences,
                        folder,
                        artifacts.get("semantic_ids"),
                        artifacts.get("graph"),
                        table if table is not None and table.exists() else None,
                        "pkg:qformer/default.yaml",
                        deep_merge(overrides, {"qformer": qformer}),
                    )
                    log.info("bench: phase I %s: %d steps, held-out alignment %s", folder.name, summary["steps"], summary["final"])
                    runs[key] = str(folder)
                model_overrides = deep_merge(model_overrides, {"artifacts": {"qformer": runs[key]}})
        out_specs.append((name, cfg_path, model_overrides, label))
    return out_specs


def run_bench_config(cfg: BenchConfig, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    clean = prepare_dataset(cfg.data, out / "data", mapping=cfg.mapping or None, synth_overrides=cfg.synth_overrides)
    build_sequence_dataset(clean, out / "sequences", None, cfg.sequence_overrides, cfg.split)
    data = SequenceDataset.load(out / "sequences")
    split = data.split()
    expr = cfg.candidate_filter or cfg.split.target_filter
    candidates = select_candidates(data.behaviors(), data.event_log.behavior_ids, expr) if expr else None
    artifacts = run_encoders(Path(clean), out / "sequences", out / "encoders", cfg.encoder_overrides) if cfg.encoders else None
    specs = model_specs(cfg, artifacts)
    if cfg.phase1 is not None:
        if artifacts is None:
            raise ValueError("bench phase1 needs encoders: true (phase I aligns the encoders' semantic IDs with the business embeddings)")
        specs = run_phase1_stages(specs, out / "sequences", artifacts, out / "phase1", cfg.phase1)
    log.info(
        "bench %s: %d test cases, %s candidates, models %s",
        cfg.name,
        len(split.test),
        "all" if candidates is None else len(candidates),
        [s[3] for s in specs],
    )
    rows = run_bench(split, specs, out, candidates, cfg.eval, cfg.reference, dataset=data, seeds=cfg.seeds, equal_time_as=cfg.equal_time_as)
    return {"rows": rows, "table_md": (out / "table.md").read_text()}
