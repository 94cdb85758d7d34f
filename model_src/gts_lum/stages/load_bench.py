"""Load bench of the KServe scorer: a stage-by-stage profile of one request, then latency percentiles and
throughput of real HTTP requests.

    gts-lum load-bench runs/demo/export --requests 100 --concurrency 1 --concurrency 4 [--feature-repo DIR --users U1,U2]

Request shapes (`SHAPES`), each over an inline history of `history_events` events (random catalog
behaviours an hour apart, seeded) unless it reads Feast:
- top10: no candidate list: agnostic retrieval over the export's targets, the top rerank_depth re-ranked
  target-aware, the top 10 returned (the campaign tool's request);
- top10_feast: the same with only a user_id: the history is read from the feature store (`feature_repo`,
  users taken in turn from `users`; the server needs the store's GTS_LUM_PSEUDONYM_KEY). `publish_bench_store`
  (`python -m gts_lum.stages.load_bench --clean CLEAN --out DIR`, which `make load-bench` runs) makes such a
  store from the clean data set: a local SQLite copy of feature_repo/, and the users with the longest histories;
- candidates: `candidates` explicit candidates, all scored target-aware.

The profile (`profile_request`) runs the scorer's own preprocess / predict in this process on one thread
and reads the stage labels (`torch.profiler.record_function`) of the scoring path. The HTTP part starts
`python -m gts_lum.serving.scorer` on a free 127.0.0.1 port (stopped by its PID at the end), and for
each shape and concurrency sends `requests` v1 requests from that many client threads, stopping early at
`seconds_limit`. Warm-up requests go first and are not counted. Client and server share the machine, so
the figures are a floor for a dedicated server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gts_lum.data.validate import load_event_log
from gts_lum.modeling.decoder import runs_last_layer_at_last_token
from gts_lum.serving.export import read_serving_card
from gts_lum.stages.speed import decoder_flops

log = logging.getLogger(__name__)

SHAPES = ("top10", "top10_feast", "candidates")
GOAL_P99_MS = 50.0  # the top-10 request on one core (issue 30)
# stages of one request in scoring order (labels of the scorer and of GTSLUM.score); retrieval holds the
# agnostic pass, which is reported on its own
STAGES = (
    "json_parse",
    "parse",
    "feast_read",
    "history",
    "timestamp_process",
    "fuse",
    "agnostic_pass",
    "retrieval",
    "aware_passes",
    "heads",
    "serialise",
)


def _request_bodies(
    catalog: list[str], n: int, shape: str, candidates: int, history_events: int, seed: int, users: list[str] | None = None
) -> list[bytes]:
    rng = np.random.default_rng(seed)
    if candidates > len(catalog):
        raise ValueError(f"candidates={candidates} but the catalog has {len(catalog)} behaviours")
    if shape == "top10_feast" and not users:
        raise ValueError("the top10_feast shape needs feature-store user ids (users)")
    bodies = []
    for i in range(n):
        if shape == "top10_feast":
            instance = {"user_id": users[i % len(users)], "top_k": 10}
        else:
            start = int(rng.integers(1_700_000_000, 1_710_000_000))
            events = {
                "behavior_ids": [catalog[j] for j in rng.integers(0, len(catalog), history_events)],
                "timestamps": [start + 3600 * t for t in range(history_events)],
            }
            instance = {"events": events, "top_k": 10}
            if shape == "candidates":
                instance["candidates"] = [catalog[j] for j in rng.choice(len(catalog), candidates, replace=False)]
        bodies.append(json.dumps({"instances": [instance]}).encode())
    return bodies


def publish_bench_store(
    clean_dir: str | Path,
    out_dir: str | Path,
    feature_repo: str | Path = "feature_repo",
    semantic_ids_dir: str | Path | None = None,
    users: int = 20,
    last_n: int = 512,
) -> dict:
    """A local Feast store for the top10_feast shape: the definitions of `feature_repo` (its *.py and
    feature_store.yaml: SQLite online store, file registry; paths inside the copy) copied to out_dir/repo,
    the clean data set's feature sources written to out_dir/sources (the latest `last_n` events of each user,
    one snapshot per user) and published there (apply + materialize). Users are keyed by pseudonym under
    GTS_LUM_PSEUDONYM_KEY, which the scorer must share. Returns {"repo", "users", "publish"}: the `users`
    raw ids with the longest histories (the largest Feast reads and Q-former inputs; ties in data-set order),
    also written to out_dir/users.txt, comma-separated, for `gts-lum load-bench --users`."""
    from gts_lum.serving.features import export_feature_sources, publish_features  # feast: imported only when a store is asked for

    out, template = Path(out_dir), Path(feature_repo)
    if not (template / "feature_store.yaml").exists():
        raise FileNotFoundError(f"{template}: no feature_store.yaml (the project's feature_repo/ holds the definitions)")
    repo = out / "repo"
    if repo.exists():
        shutil.rmtree(repo)  # a store left by an earlier run: published afresh
    repo.mkdir(parents=True)
    for path in [*template.glob("*.py"), template / "feature_store.yaml"]:
        shutil.copy(path, repo / path.name)
    export_feature_sources(clean_dir, out / "sources", semantic_ids_dir, last_n=last_n, snapshot_days=None)
    summary = publish_features(repo, out / "sources")
    event_log = load_event_log(clean_dir)
    longest = np.argsort(-event_log.lengths(), kind="stable")[:users]
    chosen = [str(u) for u in event_log.user_ids[longest]]
    (out / "users.txt").write_text(",".join(chosen) + "\n")
    return {"repo": str(repo), "users": chosen, "publish": summary}


def fp32_gflops(seconds: float = 1.0, size: int = 512) -> float:
    """This process's fp32 matrix-product rate (GFLOP/s) at torch's current thread count."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - t0) / 1e9


def profile_request(scorer, bodies: list[bytes], warmup: int = 3) -> dict:
    """Mean milliseconds per request of each stage (`STAGES`) over `bodies`, run through `scorer` (a
    loaded GTSLUMScorer) in this process, plus the decoder FLOPs a request executed, the wall time per
    request without the profiler (its own cost left out) and p50 / p99 of `preprocess` (validation and,
    for user_id-only requests, the Feast read on the scorer's Feast thread, which the profiler does not see)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    net = scorer.serving.model.net
    dec = net.decoder.config
    flops = [0.0]

    def count(_module, args):  # padded tokens included: what the decoder computes
        n, t = args[0].shape[:2]
        last_only = runs_last_layer_at_last_token(net.decoder)
        flops[0] += n * decoder_flops(dec.hidden_size, dec.intermediate_size, dec.num_hidden_layers, t, last_only)

    loop = asyncio.new_event_loop()
    preprocess_s: list[float] = []  # validation + the Feast read on the scorer's own thread, outside the profiler's view

    def one(body: bytes) -> str:
        with record_function("gts_lum.json_parse"):
            payload = json.loads(body)
        t0 = time.perf_counter()
        prepared = loop.run_until_complete(scorer.preprocess(payload))
        preprocess_s.append(time.perf_counter() - t0)
        predictions = scorer._score_all(prepared.cases)
        with record_function("gts_lum.serialise"):
            return json.dumps({"predictions": predictions})

    try:
        for body in bodies[:warmup]:
            one(body)
        counted = bodies[warmup:]
        preprocess_s.clear()
        t0 = time.perf_counter()
        for body in counted:
            one(body)
        wall_ms = (time.perf_counter() - t0) * 1000 / len(counted)
        pre_ms = np.array(preprocess_s) * 1000
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for body in counted:
                one(body)
        # the FLOPs, counted in an eager rerun: a hook inside a compiled graph runs when it is traced, not per pass.
        # Every pass, whole or last-token, normalises its (N, T, H) input to the first layer here
        hook = net.decoder.layers[0].input_layernorm.register_forward_pre_hook(count)
        compiled, net.cfg.decoder.compile = net.cfg.decoder.compile, False
        try:
            for body in counted:
                one(body)
        finally:
            net.cfg.decoder.compile = compiled
            hook.remove()
    finally:
        loop.close()
    totals = {
        e.key.removeprefix("gts_lum."): e.cpu_time_total / 1000 / len(counted) for e in prof.key_averages() if e.key.startswith("gts_lum.")
    }
    if "retrieval" in totals:
        totals["retrieval"] -= totals.get("agnostic_pass", 0.0)
    stages = {k: round(totals[k], 2) for k in STAGES if k in totals}
    return {
        "stages_ms": stages,
        "stages_sum_ms": round(sum(stages.values()), 2),
        "wall_ms": round(wall_ms, 2),
        "preprocess_ms": {f"p{q}": round(float(np.percentile(pre_ms, q)), 2) for q in (50, 99)},
        "decoder_gflop": round(flops[0] / len(counted) / 1e9, 4),
        "torch_threads": torch.get_num_threads(),
    }


def _send(url: str, bodies: list[bytes], warmup: int, concurrency: int, seconds_limit: float) -> tuple[list[tuple[float, int]], float]:
    """Send the bodies from `concurrency` client threads: (latency s, status) per request, wall seconds."""
    import httpx

    headers = {"content-type": "application/json"}
    with httpx.Client(timeout=60) as client:
        for body in bodies[:warmup]:
            client.post(url, content=body, headers=headers).raise_for_status()
    queue = iter(bodies[warmup:])
    lock = threading.Lock()
    results: list[tuple[float, int]] = []
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
    return results, time.perf_counter() - started


def _summary(results: list[tuple[float, int]], wall: float, requests: int) -> dict:
    latency_ms = np.array([r[0] for r in results]) * 1000
    codes: dict[str, int] = {}
    for _, status in results:
        codes[str(status)] = codes.get(str(status), 0) + 1
    return {
        "requests_sent": len(results),
        "stopped_by": "count" if len(results) == requests else "seconds_limit",
        "status_codes": codes,
        "wall_seconds": round(wall, 3),
        "requests_per_second": round(len(results) / wall, 2) if wall > 0 else 0.0,
        "latency_ms": {f"p{q}": round(float(np.percentile(latency_ms, q)), 2) for q in (50, 90, 99)} if len(results) else {},
    }


def _check(requests: int, concurrency: tuple[int, ...], seconds_limit: float, shapes: tuple[str, ...]) -> None:
    if requests < 1 or not concurrency or min(concurrency) < 1 or seconds_limit <= 0:
        raise ValueError(
            f"requests and each concurrency must be >= 1 and seconds_limit > 0, got {requests}, {concurrency}, {seconds_limit}"
        )
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"shapes {unknown}: use {SHAPES}")


def _profiles(export_dir, feature_repo, plan: dict[str, list[bytes]], scorer_cfg) -> tuple[dict, float]:
    """`profile_request` of each shape in this process, and the machine's fp32 rate, on the server's settings (a ScorerConfig)."""
    import torch

    # kserve (the scorer's): imported only when a load bench runs
    from gts_lum.serving.scorer import GTSLUMScorer

    threads = torch.get_num_threads()
    torch.set_num_threads(scorer_cfg.torch_threads)
    try:
        scorer = GTSLUMScorer(export_dir, feature_repo, scorer_cfg)
        scorer.load()
        profiles = {s: profile_request(scorer, bodies[: min(len(bodies), 40)]) for s, bodies in plan.items()}
        return profiles, fp32_gflops()
    finally:
        torch.set_num_threads(threads)


def _bench_shape(url: str, shape: str, bodies: list[bytes], profile: dict, concurrency, machine: float, **send) -> dict:
    """The shape's requests at each concurrency: `_summary` per concurrency, with the goal (top-10 shapes) and
    the candidates' throughput and decoder rate (the candidates shape). `send`: warmup, seconds_limit,
    requests, candidates."""
    row = {"profile": profile, "by_concurrency": {}}
    for c in concurrency:
        results, wall = _send(url, bodies, send["warmup"], c, send["seconds_limit"])
        summary = _summary(results, wall, send["requests"])
        if shape == "candidates":
            summary["candidates_per_second"] = round(summary["requests_per_second"] * send["candidates"], 1)
            gflops = summary["requests_per_second"] * profile["decoder_gflop"]
            summary["decoder_gflops"] = round(gflops, 2)
            summary["share_of_machine_fp32"] = round(gflops / machine, 3)
        if shape.startswith("top10") and summary["latency_ms"]:
            summary["meets_goal"] = summary["latency_ms"]["p99"] <= GOAL_P99_MS
        row["by_concurrency"][str(c)] = summary
        log.info(
            "load bench %s at concurrency %d: p50 %s ms, p99 %s ms, %.1f req/s",
            shape,
            c,
            summary["latency_ms"].get("p50"),
            summary["latency_ms"].get("p99"),
            summary["requests_per_second"],
        )
    return row


def load_bench(
    export_dir: str | Path,
    requests: int = 100,
    concurrency: tuple[int, ...] = (1, 4),
    shapes: tuple[str, ...] = ("top10", "candidates"),
    seconds_limit: float = 60.0,
    candidates: int = 100,
    history_events: int = 100,
    warmup: int = 5,
    torch_threads: int = 1,
    feature_repo: str | Path | None = None,
    users: list[str] | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    rerank_depth: int | None = None,
    compile: bool | None = None,
) -> dict:
    """Run the profile and the bench (see the module docstring); returns, per shape, the profile and per
    concurrency p50 / p90 / p99 latency (ms), requests/s and the status codes; for the candidates shape
    also candidates/s and the decoder's GFLOP/s as a share of this machine's fp32 rate. `out_dir`: also
    write load_bench.json and the server log there. The top10_feast shape needs `feature_repo` and `users`
    (e.g. a store made by `publish_bench_store`). `rerank_depth` and `compile`: the scorer's settings of the
    same names (None: the export's), in the profile and on the server."""
    from gts_lum.serving.scorer import ScorerConfig, launch_server  # kserve: imported only when a load bench runs

    _check(requests, concurrency, seconds_limit, shapes)
    card = read_serving_card(export_dir)
    catalog = card["catalog"]["behavior_ids"]
    plan = {s: _request_bodies(catalog, requests + warmup, s, candidates, history_events, seed, users) for s in shapes}
    max_candidates = max(candidates, 500)
    scorer_cfg = ScorerConfig(max_candidates=max_candidates, torch_threads=torch_threads, rerank_depth=rerank_depth, compile=compile)
    profiles, machine = _profiles(export_dir, feature_repo, plan, scorer_cfg)
    out: dict = {
        "model": card["name"],
        "version": card["version"],
        "torch_threads": torch_threads,
        "rerank_depth": card.get("rerank_depth") if rerank_depth is None else rerank_depth,
        "compile": compile,
        "history_events": history_events,
        "feast_users": len(users) if users and "top10_feast" in shapes else 0,
        "machine_fp32_gflops": round(machine, 1),
        "goal_p99_ms_top10": GOAL_P99_MS,
        "shapes": {},
    }
    send = {"warmup": warmup, "seconds_limit": seconds_limit, "requests": requests, "candidates": candidates}
    with tempfile.TemporaryDirectory(prefix="gts-lum-load-bench-") as tmp:
        workdir = Path(out_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        extra = ["--max-candidates", str(max_candidates)]
        extra += [] if rerank_depth is None else ["--rerank-depth", str(rerank_depth)]
        extra += [] if compile is None else ["--compile" if compile else "--no-compile"]
        server = launch_server(export_dir, workdir / "server.log", feature_repo, extra_args=extra, torch_threads=torch_threads)
        try:
            url = f"{server.url}/v1/models/{server.name}:predict"
            for shape, bodies in plan.items():
                out["shapes"][shape] = _bench_shape(url, shape, bodies, profiles[shape], concurrency, machine, **send)
        finally:
            server.stop()
    if out_dir:
        (Path(out_dir) / "load_bench.json").write_text(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m gts_lum.stages.load_bench --clean CLEAN --out DIR [--semantic-ids IDS] [--feature-repo feature_repo]`:
    `publish_bench_store` (the store `make load-bench` gives the top10_feast shape); prints its users."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m gts_lum.stages.load_bench", description=publish_bench_store.__doc__.splitlines()[0])
    p.add_argument("--clean", required=True, help="the validated data set the export was trained on")
    p.add_argument("--out", required=True, help="folder of the store (repo/, sources/, users.txt)")
    p.add_argument("--feature-repo", default="feature_repo", help="the Feast definitions to copy")
    p.add_argument("--semantic-ids", help="output folder of `gts-lum semantic-ids` (the catalog view's IDs)")
    p.add_argument("--users", type=int, default=20, help="how many users the bench reads (the longest histories)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    store = publish_bench_store(args.clean, args.out, args.feature_repo, args.semantic_ids, users=args.users)
    print(f"feature store {store['repo']}: {len(store['users'])} users in {Path(args.out) / 'users.txt'}")


if __name__ == "__main__":
    main()
