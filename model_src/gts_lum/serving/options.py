"""The scorer's settings and flags, apart from the server: `gts_lum.cli` and `gts_lum.serving.scorer` both
read them, and importing kserve parses sys.argv, so nothing here imports kserve (nor the scorer)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class ScorerConfig:
    """Limits and settings of the scorer (every limit is a 4xx when exceeded, never a crash)."""

    max_candidates: int = 500  # candidates per instance (each costs a target-aware decoder pass)
    max_events: int = 10_000  # inline history events per instance
    max_instances: int = 32  # instances per request
    max_top_k: int = 1000
    max_body_bytes: int = 2_000_000  # request body (413 above it)
    # target-aware candidate scores per request, summed over instances: request candidates count each,
    # a request without candidates its re-ranking depth. Bounds the time one request holds the single
    # scoring thread (32 x 500 candidates held a small request for 24 s on 2 cores): 413 above it.
    max_request_candidates: int = 2000
    # slow clients (uvicorn has no request timeouts of its own): a connection whose request headers are not
    # all in within header_timeout s of its start (or of the request's first byte on a kept-alive connection),
    # or whose body is not within body_timeout s after them, is closed; past max_connections open
    # connections a request gets a 503. 250 connections trickling partial bodies were held for 70 s without them.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 512
    rerank_depth: int | None = None  # None: the model's own
    # torch.compile the decoder at load (None: the export's `decoder.compile`). A top-10 request with 10
    # target-aware passes: p99 30-41 ms compiled against 45-52 eager (BENCHMARKS "A re-ranking model"); it needs
    # a C++ compiler (the serving image carries g++; the InferenceService passes --compile) and ~15 s more start-up.
    compile: bool | None = None
    device: str = "cpu"
    # torch intra-op threads of the one scoring thread. Default 1: a top-10 request (~1.5 GFLOP at decoder
    # width 128) gains little from a second thread, and one core per process is what an operator sizes
    # replicas by; the InferenceService requests that one core (manifests/serving/inferenceservice.yaml).
    torch_threads: int = 1
    # server processes (uvicorn workers), each loading the export and scoring on its own thread. Default 1:
    # one process per replica on the one core the InferenceService requests; scale by replicas first. N
    # workers on one pod need N cores (N x torch_threads) and N times the model's memory.
    workers: int = 1

    def __post_init__(self) -> None:
        for name in (
            "max_candidates",
            "max_events",
            "max_instances",
            "max_top_k",
            "max_body_bytes",
            "max_request_candidates",
            "max_connections",
            "torch_threads",
            "workers",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ScorerConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("header_timeout", "body_timeout"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                raise ValueError(f"ScorerConfig.{name} must be a number of seconds > 0, got {getattr(self, name)!r}")


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The scorer's flags (`gts-lum serve` and `python -m gts_lum.serving.scorer`); limits left unset take
    `ScorerConfig`'s defaults (`scorer_config`)."""
    p.add_argument("--export", required=True, help="a folder written by `gts-lum export`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (a container passes 0.0.0.0)")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--feature-repo", help="Feast repository: histories of requests that carry only a user_id")
    p.add_argument("--name", help="model name on the routes (default: the export's)")
    p.add_argument("--max-candidates", type=int, help="candidates per instance")
    p.add_argument("--max-events", type=int, help="inline history events per instance")
    p.add_argument("--max-instances", type=int, help="instances per request")
    p.add_argument("--max-top-k", type=int)
    p.add_argument("--max-body-bytes", type=int, help="request body size (413 above it)")
    p.add_argument(
        "--max-request-candidates", type=int, help="target-aware candidate scores a request, over all its instances (413 above it)"
    )
    p.add_argument("--header-timeout", type=float, help="seconds a client has to send a request's headers (then the connection is closed)")
    p.add_argument("--body-timeout", type=float, help="seconds a client has to send a request's body after its headers")
    p.add_argument("--max-connections", type=int, help="open connections; past them a request gets a 503")
    p.add_argument("--rerank-depth", type=int, help="target-aware re-ranking depth (default: the model's)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the decoder at load (default: the export's decoder.compile; needs a C++ compiler)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads of the scoring thread (default 1: ScorerConfig.torch_threads)")
    p.add_argument(
        "--workers", type=int, help="server processes, each with the model and one scoring thread (default 1: ScorerConfig.workers)"
    )


CONFIG_FLAGS = (
    "max_candidates",
    "max_events",
    "max_instances",
    "max_top_k",
    "max_body_bytes",
    "max_request_candidates",
    "header_timeout",
    "body_timeout",
    "max_connections",
    "rerank_depth",
    "compile",
    "torch_threads",
    "workers",
)


def scorer_config(args: argparse.Namespace) -> ScorerConfig:
    """The ScorerConfig of parsed `add_server_arguments` flags (those left unset keep its defaults)."""
    return ScorerConfig(device=args.device, **{k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None})
