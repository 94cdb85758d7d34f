"""The sequence stage's artifact: everything later stages read about the behaviour sequences.

A folder:
    event_log.npz          the validated events as an `EventLog` (CSR by user, seeded tie-break)
    split.yaml             how to split it (kind, seed, fractions): splits are recomputed, not stored
    sequence_config.yaml   the timestamp-process settings (timezone from the data set)
    behavior_stats.npz     importance + sources fitted on the *training* events of the split
    behaviors.parquet, scenarios.parquet   the catalog and (where the data set has it) scenario texts
    test_sequences.npz     token sequences of the test cases (what the decoder will read)
    summary.json, preview.md
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from gts_lum.config import from_dict, load_config
from gts_lum.data.contract import DatasetManifest
from gts_lum.data.events import EventLog
from gts_lum.data.validate import load_event_log
from gts_lum.sequence.candidates import select_candidates
from gts_lum.sequence.splits import Split, held_out_users, leave_one_out
from gts_lum.sequence.timestamp_process import BehaviorStats, SequenceConfig, build_sequences

log = logging.getLogger(__name__)


@dataclass
class SplitConfig:
    kind: str = "leave_one_out"  # leave_one_out | held_out_users
    test_fraction: float = 0.1  # held_out_users only
    min_events: int = 3  # users with fewer events are not evaluated
    seed: int = 0  # tie-break of equal timestamps, and the held-out draw
    # Targets only among these behaviours (a filter over the behaviours table, e.g. "type=ott" for the
    # paper's OTT-service task); histories keep every behaviour. Empty: any behaviour is a target.
    target_filter: str = ""

    def make(self, event_log: EventLog, behaviors: pd.DataFrame | None = None) -> Split:
        targets = None
        if self.target_filter:
            if behaviors is None:
                raise ValueError(f"split target_filter={self.target_filter!r} needs the behaviours table")
            targets = select_candidates(behaviors, event_log.behavior_ids, self.target_filter)
        if self.kind == "held_out_users":
            return held_out_users(event_log, self.test_fraction, self.seed, self.min_events, targets)
        if self.kind == "leave_one_out":
            return leave_one_out(event_log, self.min_events, targets)
        raise ValueError(f"split kind {self.kind!r}: use leave_one_out or held_out_users")


@dataclass
class SequenceDataset:
    root: Path
    event_log: EventLog
    split_cfg: SplitConfig
    sequence_cfg: SequenceConfig
    stats: BehaviorStats

    @classmethod
    def load(cls, root: str | Path) -> SequenceDataset:
        root = Path(root)
        return cls(
            root,
            EventLog.load(root / "event_log.npz"),
            from_dict(SplitConfig, yaml.safe_load((root / "split.yaml").read_text())),
            from_dict(SequenceConfig, yaml.safe_load((root / "sequence_config.yaml").read_text())),
            BehaviorStats.load(root / "behavior_stats.npz"),
        )

    def split(self) -> Split:
        return self.split_cfg.make(self.event_log, self.behaviors())

    def scenarios(self) -> pd.DataFrame | None:
        """The data set's scenarios table (windows of events described in words), if it has one."""
        path = self.root / "scenarios.parquet"
        return pd.read_parquet(path) if path.exists() else None

    def behaviors(self) -> pd.DataFrame:
        """The clean behaviours table, in catalog order."""
        table = pd.read_parquet(self.root / "behaviors.parquet")
        return table.set_index(table["behavior_id"].astype(str)).loc[self.event_log.behavior_ids.astype(str)].reset_index(drop=True)


def build_sequence_dataset(
    clean_dir: str | Path,
    out_dir: str | Path,
    sequence_config: str | None = None,
    sequence_overrides: list[str] | dict | None = None,
    split: SplitConfig | None = None,
    preview: int = 3,
) -> dict:
    """Load the clean events, fit statistics on the training split, build the test sequences, save all."""
    clean_dir, out = Path(clean_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split_cfg = split or SplitConfig()
    manifest = DatasetManifest.read(clean_dir)
    # The data set's timezone is the default; an explicit override still wins.
    overrides = (
        {"timezone": manifest.timezone, **sequence_overrides}
        if isinstance(sequence_overrides, dict)
        else [f"timezone={manifest.timezone}", *(sequence_overrides or [])]
    )
    cfg = load_config(SequenceConfig, sequence_config or "pkg:sequence/default.yaml", overrides)
    event_log = load_event_log(clean_dir, seed=split_cfg.seed)
    behaviors = pd.read_parquet(clean_dir / "behaviors.parquet")
    data_split = split_cfg.make(event_log, behaviors)
    source = behaviors["type"].astype(str).to_numpy() if cfg.main_sequence not in ("all", "longest") and "type" in behaviors else None
    stats = BehaviorStats.fit(data_split.train, cfg, source=source)
    tokens = build_sequences(event_log, data_split.test, cfg, stats)

    event_log.save(out / "event_log.npz")
    stats.save(out / "behavior_stats.npz")
    tokens.save(out / "test_sequences.npz")
    behaviors.to_parquet(out / "behaviors.parquet", index=False)
    if (clean_dir / "scenarios.parquet").exists():  # phase I's sequence-level texts
        shutil.copyfile(clean_dir / "scenarios.parquet", out / "scenarios.parquet")
    (out / "split.yaml").write_text(yaml.safe_dump(dataclasses.asdict(split_cfg), sort_keys=False))
    (out / "sequence_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    lengths = tokens.lengths()
    summary = {
        "users": event_log.num_users,
        "behaviors": event_log.num_behaviors,
        "events": event_log.num_events,
        "train_events": data_split.train.num_events,
        "valid_cases": len(data_split.valid),
        "test_cases": len(data_split.test),
        "split": split_cfg.kind,
        "variant": cfg.variant,
        "timezone": cfg.timezone,
        "tokens_per_sequence_mean": round(float(lengths.mean()), 1) if len(lengths) else 0.0,
        "tokens_per_sequence_max": int(lengths.max()) if len(lengths) else 0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    names = behaviors.set_index(behaviors["behavior_id"].astype(str))["description"].reindex(event_log.behavior_ids.astype(str)).to_numpy()
    lines = [f"## Behaviour sequences ({cfg.variant}, {cfg.interval_minutes}-minute intervals, {cfg.timezone})", ""]
    lines += [f"- {k.replace('_', ' ')}: {v:,}" if isinstance(v, int) else f"- {k.replace('_', ' ')}: {v}" for k, v in summary.items()]
    lines += ["", "Most recent tokens of the first test sequences:", ""]
    for i in range(min(preview, len(tokens))):
        lines.append(f"**user {event_log.user_ids[tokens.users[i]]}**: {tokens.render(i, names, max_tokens=24)}")
        lines.append("")
    (out / "preview.md").write_text("\n".join(lines))
    log.info("sequence data set written to %s: %s", out, summary)
    return summary
