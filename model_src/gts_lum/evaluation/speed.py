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
    if "scoring" in what:
        results["target_aware_scoring"] = [
            bench_target_aware_scoring(hidden, layers, tokens=64 if quick else 256, sequences=64 if quick else 512, compile=compile)
            for hidden, layers in ((128, 2), (512, 4), (1024, 4))
            for compile in (False, True)
        ]
    (out / "speed.json").write_text(json.dumps(results, indent=2))
    return results


def decoder_flops(hidden: int, intermediate: int, layers: int, tokens: int) -> float:
    """Forward FLOPs of one sequence through a Llama decoder (multiply-adds x 2; norms, RoPE and
    softmax left out: they are the memory-bound part this figure does not count)."""
    per_token = 2 * (4 * hidden * hidden + 3 * hidden * intermediate) + 2 * 2 * tokens * hidden  # projections, MLP, QK^T + AV
    return float(layers * tokens * per_token)


def bench_target_aware_scoring(
    hidden: int = 128, layers: int = 2, tokens: int = 256, sequences: int = 512, chunk: int = 128, compile: bool = False
) -> dict:
    """Candidates scored per second by the target-aware path: one decoder pass per (user, candidate)
    over `tokens` input embeddings (target first), batched `chunk` sequences a pass, fp32 on CPU, eager
    or compiled (`DecoderConfig.compile`: the same dynamic-shape compile the scorer uses).

    GFLOP/s against the machine's fp32 matrix-product rate (about 180 on this machine's 2 threads) says
    how much of the hardware the decoder uses; small widths are dominated by element-wise work.
    """
    import torch

    from gts_lum.modeling.decoder import DecoderConfig, build_decoder, compiled_for_inference

    torch.manual_seed(0)
    cfg = DecoderConfig(hidden_size=hidden, num_layers=layers, num_heads=max(hidden // 64, 2), intermediate_size=3 * hidden)
    decoder, _ = build_decoder(cfg)
    decoder.eval()
    x = torch.randn(chunk, tokens, hidden)
    mask = torch.ones(chunk, tokens, dtype=torch.long)
    mask[:, : tokens // 16] = 0  # left padding, as in a real batch (sequences of different lengths)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    run = compiled_for_inference(decoder) if compile else decoder
    with torch.no_grad():
        t0 = time.perf_counter()
        # warm-up; compiled: a first shape, then the dynamic-shape recompile (not counted, as in a
        # long-running scorer)
        run(inputs_embeds=x[:8], attention_mask=mask[:8], position_ids=positions[:8])
        for _ in range(2):
            run(inputs_embeds=x, attention_mask=mask, position_ids=positions)
        warmup_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = 0
        while done < sequences:
            run(inputs_embeds=x, attention_mask=mask, position_ids=positions)
            done += chunk
        seconds = time.perf_counter() - t0
    flops = decoder_flops(hidden, cfg.intermediate_size, layers, tokens) * done
    out = {
        "hidden": hidden,
        "layers": layers,
        "compiled": compile,
        "warmup_seconds": round(warmup_seconds, 1),
        "tokens": tokens,
        "candidates": done,
        "seconds": round(seconds, 2),
        "candidates_per_s": round(done / seconds, 1),
        "gflop_per_s": float(f"{flops / seconds / 1e9:.3g}"),  # significant digits: a tiny decoder's rate is well under 0.1
        "threads": torch.get_num_threads(),
    }
    log.info("target-aware scoring: %s", out)
    return out
