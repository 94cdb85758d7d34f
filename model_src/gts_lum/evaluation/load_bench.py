"""Load bench of the KServe scorer: latency percentiles and throughput of real HTTP requests.

    gts-lum load-bench runs/demo/export --requests 200 --concurrency 4 --seconds-limit 60

Starts `python -m gts_lum.serving.scorer` on a free 127.0.0.1 port (stopped by its PID at the end),
sends `requests` v1 requests from `concurrency` client threads, each scoring `candidates` candidates
for an inline history of `history_events` events (random catalog behaviours an hour apart, seeded),
and stops early when `seconds_limit` is reached. A few warm-up requests go first and are not counted.
Client and server share the machine, so the figures are a floor for a dedicated server.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _request_bodies(catalog: list[str], n: int, candidates: int, history_events: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    if candidates > len(catalog):
        raise ValueError(f"candidates={candidates} but the catalog has {len(catalog)} behaviours")
    bodies = []
    for _ in range(n):
        start = int(rng.integers(1_700_000_000, 1_710_000_000))
        events = {
            "behavior_ids": [catalog[i] for i in rng.integers(0, len(catalog), history_events)],
            "timestamps": [start + 3600 * t for t in range(history_events)],
        }
        cands = [catalog[i] for i in rng.choice(len(catalog), candidates, replace=False)]
        bodies.append(json.dumps({"instances": [{"events": events, "candidates": cands, "top_k": 10}]}).encode())
    return bodies


def _run(export_dir, workdir: Path, bodies: list[bytes], warmup: int, concurrency: int, seconds_limit: float, torch_threads: int) -> tuple[list[tuple[float, int]], float]:
    """Start the server, send the requests, stop the server: (latency s, status) per request, wall seconds."""
    import httpx

    from gts_lum.serving.scorer import launch_server

    server = launch_server(export_dir, workdir / "server.log", torch_threads=torch_threads)
    url = f"{server.url}/v1/models/{server.name}:predict"
    headers = {"content-type": "application/json"}
    try:
        with httpx.Client(timeout=60) as client:
            for body in bodies[:warmup]:
                client.post(url, content=body, headers=headers).raise_for_status()
        queue = iter(bodies[warmup:])
        lock = threading.Lock()
        results: list[tuple[float, int]] = []  # (seconds, status)
        started = time.perf_counter()
        deadline = started + seconds_limit

        def worker() -> None:
            with httpx.Client(timeout=60) as client:
                while time.perf_counter() < deadline:
                    with lock:
                        body = next(queue, None)
                    if body is None:
                        return
                    t0 = time.perf_counter()
                    try:
                        status = client.post(url, content=body, headers=headers).status_code
                    except httpx.TransportError:
                        status = 0
                    with lock:
                        results.append((time.perf_counter() - t0, status))

        with ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(concurrency)]:
                future.result()
        wall = time.perf_counter() - started
    finally:
        server.stop()
    return results, wall


def load_bench(
    export_dir: str | Path,
    requests: int = 200,
    concurrency: int = 4,
    seconds_limit: float = 60.0,
    candidates: int = 100,
    history_events: int = 50,
    warmup: int = 5,
    torch_threads: int = 1,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> dict:
    """Run the bench (see the module docstring); returns p50 / p90 / p99 latency (ms), requests/s and
    the status codes seen. `out_dir`: also write load_bench.json and the server log there."""
    from gts_lum.serving.export import read_serving_card

    if requests < 1 or concurrency < 1 or seconds_limit <= 0:
        raise ValueError(f"requests and concurrency must be >= 1 and seconds_limit > 0, got {requests}, {concurrency}, {seconds_limit}")
    card = read_serving_card(export_dir)
    bodies = _request_bodies(card["catalog"]["behavior_ids"], requests + warmup, candidates, history_events, seed)
    with tempfile.TemporaryDirectory(prefix="gts-lum-load-bench-") as tmp:
        workdir = Path(out_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results, wall = _run(export_dir, workdir, bodies, warmup, concurrency, seconds_limit, torch_threads)
    latency_ms = np.array([r[0] for r in results]) * 1000
    codes: dict[str, int] = {}
    for _, status in results:
        codes[str(status)] = codes.get(str(status), 0) + 1
    summary = {
        "requests_sent": len(results),
        "requests_planned": requests,
        "stopped_by": "count" if len(results) == requests else "seconds_limit",
        "status_codes": codes,
        "concurrency": concurrency,
        "candidates_per_request": candidates,
        "history_events": history_events,
        "torch_threads": torch_threads,
        "wall_seconds": round(wall, 3),
        "requests_per_second": round(len(results) / wall, 2) if wall > 0 else 0.0,
        "latency_ms": {f"p{q}": round(float(np.percentile(latency_ms, q)), 2) for q in (50, 90, 99)} if len(results) else {},
        "model": card["name"],
        "version": card["version"],
    }
    if out_dir:
        (Path(out_dir) / "load_bench.json").write_text(json.dumps(summary, indent=2))
    log.info("load bench: %d requests at concurrency %d: p50 %s ms, p99 %s ms, %.1f req/s", len(results), concurrency,
             summary["latency_ms"].get("p50"), summary["latency_ms"].get("p99"), summary["requests_per_second"])
    return summary
