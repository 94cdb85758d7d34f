"""Speed benchmarks: simulator, validation, sequence building, spectral tree, graph + node2vec.

Figures, not assertions: `gts-lum speed` prints them and writes `speed.json`; `make bench` copies them
into BENCHMARKS.md. The issue's targets: >= 1M events/s for the simulator at 10k users x 90 days, and
>= 1M events/s through validation + sequence building.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)


def bench_validation_and_sequences(out_dir: Path, users: int, days: int) -> dict:
    """Simulate, then time validation, EventLog loading and sequence building on that data."""
    from gts_lum.config import load_config
    from gts_lum.data.simulator import SimulatorConfig, simulate
    from gts_lum.data.validate import load_event_log, validate_dataset
    from gts_lum.sequence.timestamp_process import SequenceConfig, build_sequences

    raw, clean = out_dir / "raw", out_dir / "clean"
    for path in (raw, clean):
        shutil.rmtree(path, ignore_errors=True)
    simulate(load_config(SimulatorConfig, "pkg:synth/bench.yaml", {"users": users, "days": days}), raw, progress=False)
    t0 = time.perf_counter()
    summary = validate_dataset(raw, clean, progress=False)
    t1 = time.perf_counter()
    event_log = load_event_log(clean)
    t2 = time.perf_counter()
    tokens = build_sequences(event_log, None, SequenceConfig(timezone=summary["timezone"]))
    t3 = time.perf_counter()
    n = event_log.num_events
    return {
        "users": users,
        "days": days,
        "events": n,
        "validation_s": round(t1 - t0, 2),
        "load_event_log_s": round(t2 - t1, 2),
        "sequence_building_s": round(t3 - t2, 2),
        "tokens": tokens.num_tokens,
        "events_per_s_validation": round(n / (t1 - t0)),
        "events_per_s_sequences": round(n / (t3 - t2)),
        "events_per_s_end_to_end": round(n / (t3 - t0)),
    }


def run_speed_benchmarks(what: list[str], out_dir: str | Path, quick: bool = False) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    users, days = (500, 14) if quick else (10_000, 90)
    results: dict = {}
    if "simulator" in what:
        from gts_lum.data.simulator import bench_simulator

        results["simulator"] = bench_simulator(users=users, days=days, out_dir=out / "simulator")
        shutil.rmtree(out / "simulator", ignore_errors=True)
    if "validation" in what or "sequences" in what:
        results["validation_and_sequences"] = bench_validation_and_sequences(out / "pipeline", users=users // 2 if not quick else users, days=days)
        shutil.rmtree(out / "pipeline", ignore_errors=True)
    if "tree" in what:
        from gts_lum.tokenizer.spectral_tree import bench_spectral_tree

        results["spectral_tree"] = bench_spectral_tree(sizes=(1_000,) if quick else (10_000,))
    if "graph" in what:
        from gts_lum.encoders.node2vec import bench_graph_encoder

        results["graph_node2vec"] = bench_graph_encoder("synth:tiny" if quick else "synth:demo", workdir=out)
    (out / "speed.json").write_text(json.dumps(results, indent=2))
    return results
