"""The KServe model server of a GTS-LUM export: next-behaviour ranking and label heads for one user a request.

    python -m gts_lum.serving.scorer --export runs/demo/export --host 127.0.0.1 --http-port 8080 [--feature-repo DIR]

A request instance (JSON object):

    {"user_id": "U000001",                                    # the history comes from Feast ...
     "events": {"behavior_ids": [...], "timestamps": [...]},   # ... unless given inline (unix s)
     "candidates": ["ott.video...", ...],                      # optional; absent: the export's targets
     "top_k": 10,                                              # optional; default 10 (targets) / all candidates
     "heads": ["churn"]}                                       # optional label heads of the export

Its prediction: {"user_id", "model", "version", "history": {"source", "events", "dropped_unknown"},
"ranking": [{"behavior_id", "score", "target_aware"}, ...] best first, "heads": {name: {...}}}.
Request candidates are all scored target-aware (one decoder pass per candidate, hence --max-candidates);
without candidates the export's target behaviours (what the model was trained to predict: the training
split's target filter, e.g. OTT services; the whole catalog without one) go through the model's two-stage
retrieval (agnostic over all of them, the top rerank_depth re-scored target-aware). Scores are `GTSLUM.score`'s: target-aware ones sit above
the agnostic ones (`target_aware` marks them), and they equal offline scoring of the same history.

Protocols (kserve's own routes):
- v1: POST /v1/models/NAME:predict {"instances": [instance, ...]} -> {"predictions": [prediction, ...]}
- v2 / Open Inference: POST /v2/models/NAME/infer with one input tensor, datatype BYTES (each element a
  JSON-encoded instance) or JSON (each element an instance object); the output tensor "response" is
  BYTES, each element a JSON-encoded prediction.
- health: GET /v2/health/live, /v2/health/ready, /v1/models/NAME, /v2/models/NAME/ready; metrics: GET /metrics
  (kserve's latency histograms plus gts_lum_requests_total / gts_lum_request_errors_total /
  gts_lum_request_seconds by endpoint and status code; kserve counts no errors).

Bad input is a 4xx naming the problem, and the connection stays usable: 400 for malformed JSON (nested
too deep included), wrong types, unknown behaviour ids or heads, empty histories, too many candidates /
events / instances, a binary v2 body whose sizes, length prefixes, shape or UTF-8 do not hold; 404 for a
user the feature store does not know; 413 for a body over the size limit or a request asking for more
target-aware candidate scores (instances x candidates) than --max-request-candidates; 415 for a body
that is not JSON (send `Content-Type: application/json`; parameters such as `; charset=utf-8` are
accepted); 422 for a v2 body that is not an inference request. No raw user id reaches a log line or an
error body (a user is named by the request path, e.g. `instances[0].user_id`).
Slow clients: the request headers must arrive within --header-timeout s (a 408 and the connection closed
otherwise), the body within --body-timeout s after them; past --max-connections a request gets a 503.
A server started with --feature-repo checks the pseudonym key at start-up, and warns (once, without ids)
when nearly every feature-store user of a window is unknown: the sign of a key other than the store's.
kserve's own server binds 0.0.0.0 and cannot be told otherwise, so this one runs kserve's app (its routes,
data plane and middlewares, built through its public API: `create_app`) under uvicorn, bound to `--host`
(127.0.0.1 by default; a container passes 0.0.0.0). gRPC is off.
Processes: --workers (default 1) server processes, each loading the export and scoring on one thread with
--torch-threads torch threads (default 1): a pod needs workers x torch-threads cores, and
manifests/serving/inferenceservice.yaml requests the 1 core of the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import kserve
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InvalidInput
from kserve.model_server import app
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer
from prometheus_client import Counter, Histogram
from torch.profiler import record_function
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from gts_lum.data.pseudonym import pseudonym_key
from gts_lum.serving.export import ServingModel, history_log, read_serving_card
from gts_lum.serving.features import FeatureClient
from gts_lum.serving.options import ScorerConfig, add_server_arguments, scorer_config

log = logging.getLogger(__name__)

INSTANCE_KEYS = ("user_id", "events", "candidates", "top_k", "heads")
EVENT_KEYS = ("behavior_ids", "timestamps")
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01: beyond it a timestamp is a unit mistake (ms, ns)
MAX_USER_ID_CHARS = 256
SERVER_ENV = "GTS_LUM_SCORER_SERVER"  # the settings a spawned worker process loads the export with (JSON)
KEEP_ALIVE_S, GRACE_PERIOD_S = 65, 30  # kserve's defaults: keep-alive longer than a proxy's idle timeout; shutdown grace
# seconds a worker process may not answer uvicorn's health ping before it is restarted; a spawned worker first
# imports torch, kserve and Feast (>5 s, uvicorn's default, on a busy core) before it can answer
WORKER_HEALTHCHECK_S = 60
UNKNOWN_USER_WINDOW, UNKNOWN_USER_SHARE = 200, 0.9  # feature-store lookups watched; share of unknown users that warns

REQUESTS = Counter("gts_lum_requests_total", "HTTP requests by endpoint and status code", ["endpoint", "code"])
ERRORS = Counter("gts_lum_request_errors_total", "HTTP responses with status >= 400 by endpoint and status code", ["endpoint", "code"])
LATENCY = Histogram("gts_lum_request_seconds", "HTTP request latency by endpoint", ["endpoint"])
SLOW_CLIENTS = Counter("gts_lum_slow_clients_total", "connections closed for sending a request too slowly, by what was late", ["late"])


class UnknownUser(InvalidInput):
    """The feature store has no history for the user: a 404 naming the instance, never the id."""

    status = 404

    def __init__(self, where: str):
        super().__init__(f"{where}.user_id: this user is not in the feature store")


class TooMuchWork(InvalidInput):
    """A request asking for more scoring than one request may (`ScorerConfig.max_request_candidates`): a 413."""

    status = 413


@dataclass
class ScoreCase:
    """One validated instance; `behaviors` / `timestamps` are filled from Feast when not inline."""

    user_id: str | None
    behaviors: np.ndarray | None  # (n,) catalog indices
    timestamps: np.ndarray | None  # (n,) unix seconds
    candidates: np.ndarray | None  # (C,) catalog indices; None: the export's targets (`ServingModel.default_candidates`)
    top_k: int
    heads: list[str]
    source: str = "inline"
    dropped_unknown: int = 0


@dataclass
class Prepared:
    """What preprocess hands to predict: the validated cases and how to answer (v1 dict or v2 tensors)."""

    protocol: str  # v1 | v2
    cases: list[ScoreCase]
    request_id: str | None = None


# -- request validation --------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string_list(value, where: str, limit: int, limit_flag: str) -> list[str]:
    if not isinstance(value, list):
        raise InvalidInput(f"{where}: expected a list of strings, got {type(value).__name__}")
    if not value:
        raise InvalidInput(f"{where}: empty list")
    if len(value) > limit:
        raise InvalidInput(f"{where}: {len(value)} items, more than the limit of {limit} ({limit_flag})")
    bad = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
    if bad is not None:
        raise InvalidInput(f"{where}[{bad}]: expected a string, got {type(value[bad]).__name__}")
    return value


def _catalog_indices(ids: list[str], serving: ServingModel, where: str) -> np.ndarray:
    index = serving.index
    unknown = [i for i, b in enumerate(ids) if b not in index]
    if unknown:
        first = unknown[0]
        raise InvalidInput(
            f"{where}: {len(unknown)} unknown behaviour id(s) not in the model's catalog, e.g. {where}[{first}]={ids[first]!r:.80}"
        )
    return np.fromiter((index[b] for b in ids), np.int64, len(ids))


def parse_instance(obj, where: str, serving: ServingModel, cfg: ScorerConfig, has_feature_store: bool) -> ScoreCase:
    """Validate one instance (see the module docstring); InvalidInput naming the field otherwise."""
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(str(k)[:40] for k in set(obj) - set(INSTANCE_KEYS))
    if unknown:
        raise InvalidInput(f"{where}: unknown field(s) {unknown}; known: {list(INSTANCE_KEYS)}")
    user_id = obj.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or not user_id or len(user_id) > MAX_USER_ID_CHARS):
        raise InvalidInput(
            f"{where}.user_id: expected a non-empty string of at most {MAX_USER_ID_CHARS} characters, got {type(user_id).__name__}"
        )
    behaviors = timestamps = None
    events = obj.get("events")
    if events is not None:
        if not isinstance(events, dict):
            raise InvalidInput(f"{where}.events: expected an object with behavior_ids and timestamps, got {type(events).__name__}")
        extra = sorted(str(k)[:40] for k in set(events) - set(EVENT_KEYS))
        if extra or any(k not in events for k in EVENT_KEYS):
            raise InvalidInput(f"{where}.events: expected exactly the fields {list(EVENT_KEYS)}, got {sorted(str(k)[:40] for k in events)}")
        ids = events["behavior_ids"]
        if isinstance(ids, list) and not ids:
            raise InvalidInput(f"{where}.events: empty history (no events to score)")
        ids = _string_list(ids, f"{where}.events.behavior_ids", cfg.max_events, "--max-events")
        ts = events["timestamps"]
        if not isinstance(ts, list) or len(ts) != len(ids):
            got = f"{len(ts)} items" if isinstance(ts, list) else type(ts).__name__
            raise InvalidInput(f"{where}.events.timestamps: expected a list of {len(ids)} integers (one per behaviour id), got {got}")
        bad = next((i for i, t in enumerate(ts) if not _is_int(t) or not 0 <= t < MAX_TIMESTAMP), None)
        if bad is not None:
            raise InvalidInput(
                f"{where}.events.timestamps[{bad}]: expected unix seconds as an integer in [0, {MAX_TIMESTAMP}), got {ts[bad]!r:.40}"
            )
        behaviors = _catalog_indices(ids, serving, f"{where}.events.behavior_ids")
        timestamps = np.asarray(ts, np.int64)
    elif user_id is None:
        raise InvalidInput(f"{where}: give a user_id (history from the feature store) or inline events")
    elif not has_feature_store:
        raise InvalidInput(
            f"{where}: no inline events and this server has no feature store (--feature-repo) to read the user's history from"
        )
    candidates = None
    if "candidates" in obj:
        cand_ids = _string_list(obj["candidates"], f"{where}.candidates", cfg.max_candidates, "--max-candidates")
        if len(set(cand_ids)) != len(cand_ids):
            seen: set[str] = set()
            dup = next(i for i, c in enumerate(cand_ids) if c in seen or seen.add(c))
            raise InvalidInput(f"{where}.candidates[{dup}]: duplicate candidate {cand_ids[dup]!r:.80}")
        candidates = _catalog_indices(cand_ids, serving, f"{where}.candidates")
    pool = len(serving.default_candidates) if candidates is None else len(candidates)
    top_k = obj.get("top_k", 10 if candidates is None else pool)  # default: 10 of the targets, every candidate
    if "top_k" in obj and (not _is_int(top_k) or not 1 <= top_k <= cfg.max_top_k):
        raise InvalidInput(f"{where}.top_k: expected an integer in [1, {cfg.max_top_k}], got {top_k!r:.40}")
    heads = obj.get("heads", [])
    if heads:
        heads = _string_list(heads, f"{where}.heads", 64, "at most 64 heads")
        missing = [h for h in heads if h not in serving.heads]
        if missing:
            raise InvalidInput(
                f"{where}.heads: head {missing[0]!r:.80} is not in this export (it has {sorted(serving.heads) or 'no heads'})"
            )
        heads = list(dict.fromkeys(heads))
    elif heads != []:
        raise InvalidInput(f"{where}.heads: expected a list of head names, got {heads!r:.40}")
    return ScoreCase(user_id, behaviors, timestamps, candidates, min(top_k, pool), heads)


def _v2_instances(request: InferRequest) -> list:
    """The instances carried by the one input tensor of a v2 request (BYTES: JSON strings; JSON: objects)."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"inputs: expected exactly one input tensor carrying the request JSON, got {len(request.inputs)}")
    tensor = request.inputs[0]
    where = f"inputs[0] ({str(tensor.name)[:40]!r})"
    if tensor.datatype == "JSON":
        if "binary_data_size" in (tensor.parameters or {}) or not isinstance(tensor.data, list):
            raise InvalidInput(f"{where}: a JSON tensor carries its objects in 'data'")
        items = tensor.data
    elif tensor.datatype == "BYTES":
        try:
            items = tensor.as_numpy().ravel().tolist()
        except Exception as err:  # shape / data mismatch, undecodable binary data
            raise InvalidInput(f"{where}: cannot read the BYTES tensor: {err}") from None
    else:
        raise InvalidInput(f"{where}: datatype {tensor.datatype!r:.20}; send the request JSON as BYTES or JSON")
    instances = []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, str)):
            try:
                item = json.loads(item)
            except (UnicodeDecodeError, ValueError) as err:
                raise InvalidInput(f"{where}.data[{i}]: not valid JSON ({err})") from None
            except RecursionError:  # Python's parser recurses once a level: thousands of [ or { exhaust the stack
                raise InvalidInput(f"{where}.data[{i}]: JSON nested too deep") from None
        instances.append(item)
    return instances


# -- the KServe model ------------------------------------------------------------------------------


class GTSLUMScorer(kserve.Model):
    """kserve.Model over a serving export: preprocess validates and fetches histories, predict ranks."""

    def __init__(
        self, export_dir: str | Path, feature_repo: str | Path | None = None, cfg: ScorerConfig | None = None, name: str | None = None
    ):
        self.export_dir = Path(export_dir)
        self.cfg = cfg or ScorerConfig()
        super().__init__(name or read_serving_card(self.export_dir)["name"])
        self.feature_repo = feature_repo
        self.serving: ServingModel | None = None
        self.features = None
        self._executor: ThreadPoolExecutor | None = None
        self._feast: ThreadPoolExecutor | None = None
        self._lookups: deque[bool] = deque(maxlen=UNKNOWN_USER_WINDOW)  # True: the feature store knew the user
        self._warned_unknown = False

    def load(self) -> bool:
        started = time.perf_counter()
        self.serving = ServingModel(self.export_dir, self.cfg.device, self.cfg.rerank_depth, self.cfg.compile)
        if self.feature_repo:
            self.features = FeatureClient(self.feature_repo)
            # one Feast thread, its FeatureStore opened and read once here: a request pays neither a store's
            # set-up on a new thread of the loop's pool (~12 ms) nor Feast's first read (~100 ms)
            self._feast = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gts-lum-feast")
            self._feast.submit(self.features.warm_up).result()
        # one scoring thread: the event loop stays free for health checks, and the model is not re-entrant
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gts-lum-score")
        self.ready = True
        log.info(
            "loaded %s version %s: %d behaviours, heads %s, feature store %s (%.1f s)",
            self.serving.name,
            self.serving.version,
            len(self.serving.catalog),
            sorted(self.serving.heads) or "none",
            self.feature_repo or "none",
            time.perf_counter() - started,
        )
        return self.ready

    def validate(self, payload):
        return payload  # preprocess validated it (kserve's own check assumes a dict)

    def get_input_types(self) -> list[dict]:
        return [{"name": "request", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "response", "datatype": "BYTES", "shape": [-1]}]

    async def preprocess(self, payload, headers: dict | None = None) -> Prepared:
        if isinstance(payload, InferRequest):
            protocol, request_id, instances, where = "v2", payload.id, _v2_instances(payload), "inputs[0].data"
        elif isinstance(payload, dict):
            unknown = sorted(str(k)[:40] for k in set(payload) - {"instances"})
            if unknown or "instances" not in payload:
                raise InvalidInput(
                    f'request: expected {{"instances": [...]}} (v1), got the field(s) {sorted(str(k)[:40] for k in payload)}'
                )
            protocol, request_id, instances, where = "v1", None, payload["instances"], "instances"
            if not isinstance(instances, list):
                raise InvalidInput(f"instances: expected a list, got {type(instances).__name__}")
        else:
            raise InvalidInput(f"request: expected a JSON object, got {type(payload).__name__} (is the content-type application/json?)")
        if not instances:
            raise InvalidInput(f"{where}: no instances")
        if len(instances) > self.cfg.max_instances:
            raise InvalidInput(f"{where}: {len(instances)} instances, more than the limit of {self.cfg.max_instances} (--max-instances)")
        has_store = self.features is not None
        with record_function("gts_lum.parse"):  # stage labels: `gts-lum load-bench --profile`
            cases = [parse_instance(obj, f"{where}[{i}]", self.serving, self.cfg, has_store) for i, obj in enumerate(instances)]
        depth = min(self.serving.model.cfg.rerank_depth, len(self.serving.default_candidates))
        work = sum(depth if c.candidates is None else len(c.candidates) for c in cases)
        if work > self.cfg.max_request_candidates:
            raise TooMuchWork(
                f"{where}: {len(cases)} instances ask for {work} target-aware candidate scores, more than the limit of "
                f"{self.cfg.max_request_candidates} a request (--max-request-candidates): send fewer instances or candidates a request"
            )
        loop = asyncio.get_running_loop()
        for i, case in enumerate(cases):
            if case.behaviors is None:
                await loop.run_in_executor(self._feast, self._fetch_history, case, f"{where}[{i}]")
        return Prepared(protocol, cases, request_id)

    @record_function("gts_lum.feast_read")
    def _fetch_history(self, case: ScoreCase, where: str) -> None:
        try:
            history = self.features.get_history(case.user_id)
        except KeyError:
            self._count_lookup(False)
            raise UnknownUser(where) from None
        self._count_lookup(True)
        ids = [str(b) for b in history["behavior_ids"]]
        known = np.fromiter((b in self.serving.index for b in ids), bool, len(ids))
        case.dropped_unknown = int((~known).sum())
        if case.dropped_unknown:
            log.warning("%s: %d feature-store events name behaviours outside the model's catalog; dropped", where, case.dropped_unknown)
        if not known.any():
            raise InvalidInput(f"{where}.user_id: this user has no events the model knows in the feature store (empty history)")
        case.behaviors = np.fromiter((self.serving.index[b] for b, k in zip(ids, known) if k), np.int64)
        case.timestamps = np.asarray(history["timestamps"], np.int64)[known]
        case.source = "feature_store"

    def _count_lookup(self, known: bool) -> None:
        """One warning, without ids, when nearly every user of a full window is unknown (a wrong pseudonym key
        makes every user unknown); another only after the share has been normal again."""
        self._lookups.append(known)
        if len(self._lookups) < UNKNOWN_USER_WINDOW:
            return
        unknown = self._lookups.count(False)
        if unknown >= UNKNOWN_USER_SHARE * UNKNOWN_USER_WINDOW and not self._warned_unknown:
            log.warning(
                "%d of the last %d feature-store users were unknown: is GTS_LUM_PSEUDONYM_KEY the key the store was published with?",
                unknown,
                UNKNOWN_USER_WINDOW,
            )
        self._warned_unknown = unknown >= UNKNOWN_USER_SHARE * UNKNOWN_USER_WINDOW

    async def predict(self, payload: Prepared, headers: dict | None = None):
        loop = asyncio.get_running_loop()
        predictions = await loop.run_in_executor(self._executor, self._score_all, payload.cases)
        if payload.protocol == "v1":
            return {"predictions": predictions}
        data = [json.dumps(p) for p in predictions]
        output = InferOutput(name="response", shape=[len(data)], datatype="BYTES", data=data)
        return InferResponse(payload.request_id or str(uuid.uuid4()), self.name, [output], model_version=self.serving.version)

    def _score_all(self, cases: list[ScoreCase]) -> list[dict]:
        return [self._score(case) for case in cases]

    def _score(self, case: ScoreCase) -> dict:
        s = self.serving
        with record_function("gts_lum.history"):
            log_, cases = history_log(case.user_id or "", case.behaviors, case.timestamps, s.catalog)
        idx, scores = s.rank(log_, cases, case.candidates, case.top_k)
        threshold = s.aware_threshold()
        prediction = {
            "user_id": case.user_id,
            "model": s.name,
            "version": s.version,
            "history": {"source": case.source, "events": int(len(case.behaviors)), "dropped_unknown": case.dropped_unknown},
            "ranking": [
                {"behavior_id": str(s.catalog[i]), "score": float(v), "target_aware": bool(v > threshold)}
                for i, v in zip(idx[0], scores[0])
            ],
        }
        if case.heads:
            with record_function("gts_lum.heads"):
                prediction["heads"] = s.head_outputs(log_, cases, case.heads)[0]
        return prediction


# -- the HTTP server -----------------------------------------------------------------------------


def _endpoint(path: str) -> str:
    if path.startswith("/v1/models/") and path.endswith(":predict"):
        return "v1_predict"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2_infer"
    if path.startswith(("/v2/health", "/v1/models", "/v2/models")) or path == "/":
        return "health"
    return "metrics" if path == "/metrics" else "other"


def _content_type_problem(headers: dict) -> tuple[int, str] | None:
    """A 415 for a predict / infer body that is not JSON (curl -d sends form encoding); None for JSON,
    whatever its parameters, or a binary v2 body (any type, told by its JSON-length header)."""
    given = headers.get("content-type")
    if given is None or INFERENCE_CONTENT_LENGTH_HEADER in headers:
        return None
    media, _, params = given.partition(";")
    send = "send the body as JSON with the header 'Content-Type: application/json' (curl: -H 'Content-Type: application/json')"
    if media.strip().lower() != "application/json":
        return 415, f"Content-Type {given[:60]!r}: {send}"
    charsets = [v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params.split(";")) if k.strip().lower() == "charset"]
    if any(c not in ("utf-8", "utf8") for c in charsets):
        return 415, f"Content-Type {given[:60]!r}: JSON is UTF-8; {send}"
    return None


def _binary_problem(body: bytes, json_length: int) -> str | None:
    """What does not hold in a binary v2 body (JSON header, then each tensor's `binary_data_size` bytes; a BYTES
    element is a 4-byte little-endian length and that many UTF-8 bytes); None when it holds or kserve's own
    JSON checks answer (a 4xx). kserve's decoder would fail on any of these with a 500."""
    try:
        header = json.loads(body[:json_length])
    except (ValueError, RecursionError):
        return None
    tensors = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(tensors, list):
        return None
    offset = json_length
    for i, tensor in enumerate(tensors):
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params or "data" in tensor:
            continue
        where, size, shape = f"inputs[{i}]", params["binary_data_size"], tensor.get("shape")
        if not _is_int(size) or size < 0:
            return f"{where}.parameters.binary_data_size: expected a byte count, got {size!r:.40}"
        if offset + size > len(body):
            return f"{where}.parameters.binary_data_size={size}: past the end of the body ({len(body) - offset} bytes left)"
        if tensor.get("datatype") != "BYTES":
            return f"{where}: datatype {str(tensor.get('datatype'))[:20]!r}; send the request JSON as BYTES or JSON"
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            return f"{where}.shape: expected a list of non-negative integers, got {shape!r:.40}"
        raw, offset, count = body[offset : offset + size], offset + size, 0
        pos = 0
        while pos < len(raw):
            length = int.from_bytes(raw[pos : pos + 4], "little") if pos + 4 <= len(raw) else -1
            if length < 0 or pos + 4 + length > len(raw):
                return f"{where}: element {count}'s length prefix runs past the tensor's {size} bytes"
            try:
                raw[pos + 4 : pos + 4 + length].decode("utf-8")
            except UnicodeDecodeError:
                return f"{where}: element {count} is not UTF-8"
            pos, count = pos + 4 + length, count + 1
        if count != int(np.prod(shape)):
            return f"{where}: shape {shape} holds {int(np.prod(shape))} elements, the binary data {count}"
    if offset != len(body):
        return f"binary data: {len(body) - offset} bytes beyond the tensors' binary_data_size (a wrong byte count?)"
    return None


class ServingMiddleware:
    """ASGI middleware: counts every response (errors included), caps the request body size and checks what
    kserve would answer with a 500 or a confusing 400.

    The body is read here, at most `max_body_bytes` of it, and replayed to the app; a larger one is a
    413 before kserve reads anything. A predict / infer body must be JSON (415 otherwise); a JSON
    content type with parameters is passed on as plain `application/json`, the only form kserve reads as
    JSON. A binary v2 request's JSON-length header must be a number that fits the body, and the binary
    part must be what its JSON header says (`_binary_problem`)."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint, started, status = _endpoint(scope.get("path", "")), time.perf_counter(), [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
                body, problem = await self._read_body(headers, receive)  # read first: the connection stays usable after a 4xx
                if problem is None and endpoint in ("v1_predict", "v2_infer"):
                    problem = _content_type_problem(headers)
                    if problem is None and "content-type" in headers and INFERENCE_CONTENT_LENGTH_HEADER not in headers:
                        plain = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                        scope = dict(scope, headers=[*plain, (b"content-type", b"application/json")])
                if problem is not None:
                    return await self._reply(counted_send, *problem)
                replayed = False

                async def replay():
                    nonlocal replayed
                    if replayed:
                        return await receive()
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}

                return await self.app(scope, replay, counted_send)
            return await self.app(scope, receive, counted_send)
        finally:
            code = str(status[0])
            REQUESTS.labels(endpoint, code).inc()
            if status[0] >= 400:
                ERRORS.labels(endpoint, code).inc()
            LATENCY.labels(endpoint).observe(time.perf_counter() - started)

    async def _read_body(self, headers: dict, receive) -> tuple[bytes, tuple[int, str] | None]:
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return b"", (413, f"request body of {declared[:20]} bytes exceeds the limit of {limit} bytes (--max-body-bytes)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", (413, f"request body exceeds the limit of {limit} bytes (--max-body-bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        json_length = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
        if json_length is not None and (not json_length.isdigit() or int(json_length) > len(body)):
            return body, (
                400,
                f"header {INFERENCE_CONTENT_LENGTH_HEADER}={json_length[:20]!r}: "
                f"expected the byte length of the JSON part (<= {len(body)})",
            )
        problem = _binary_problem(body, int(json_length)) if json_length is not None else None
        return body, None if problem is None else (400, problem)

    @staticmethod
    async def _reply(send, code: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class RequestDeadlines(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for receiving a request, which uvicorn lacks (its keep-alive
    timeout is reset by every byte, so a client trickling a request holds the connection for ever).

    Armed through asyncio's and httptools' callbacks: at the connection's start and at a request's first byte
    for the headers (`header_timeout`), at the end of the headers for the body (`body_timeout`); disarmed when
    the request is complete. A late client's connection is closed (a late header gets a 408 first: nothing
    has answered yet). The timeouts are the server's (`ServerConfig`)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.header_timeout, self.body_timeout = self.config.header_timeout, self.config.body_timeout
        self._deadline = None
        self._deadline_transport = transport
        self._arm("headers", self.header_timeout)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm("headers", self.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm("body", self.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def _arm(self, late: str, seconds: float) -> None:
        self._disarm()
        self._deadline = asyncio.get_running_loop().call_later(seconds, self._expire, late, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, late: str, seconds: float) -> None:
        self._deadline = None
        transport = self._deadline_transport
        if transport.is_closing():
            return
        SLOW_CLIENTS.labels(late).inc()
        log.warning(
            "a client sent no complete request %s within %g s (--%s-timeout): connection closed",
            late,
            seconds,
            "header" if late == "headers" else "body",
        )
        if late == "headers":
            transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        transport.close()


async def _client_error(request, exc: InvalidInput) -> JSONResponse:
    """A 4xx with the reason, logged as one line (kserve logs a traceback for each)."""
    code = getattr(exc, "status", 400)
    log.warning("%d %s %s: %s", code, request.method, request.url.path, exc)
    return JSONResponse(status_code=code, content={"error": str(exc)})


class ServerConfig(uvicorn.Config):
    """uvicorn's settings for the scorer: `host` (kserve's own server binds 0.0.0.0), the request deadlines
    (`RequestDeadlines`, which reads header_timeout / body_timeout from here) and uvicorn's connection cap
    (`limit_concurrency`: a 503 past it). A module-level class: `workers` > 1 sends it to spawned processes."""

    def __init__(self, app, host: str, http_port: int, cfg: ScorerConfig, **kwargs):
        super().__init__(
            app,
            host=host,
            port=http_port,
            http=RequestDeadlines,
            limit_concurrency=cfg.max_connections,
            workers=cfg.workers,
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=GRACE_PERIOD_S,
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
            log_config=None,  # kserve.ModelServer configures logging (as kserve's own server does)
            **kwargs,
        )
        self.header_timeout, self.body_timeout = cfg.header_timeout, cfg.body_timeout


def create_app(
    export_dir: str | Path, feature_repo: str | Path | None = None, cfg: ScorerConfig | None = None, name: str | None = None
) -> FastAPI:
    """Load the export and return kserve's FastAPI app serving it, through kserve's public API: the model
    registered on a `kserve.ModelServer` (its data plane, v1 / v2 routes, health, /metrics and kserve's
    middlewares, via `RESTServer.create_application`), then `ServingMiddleware` (outermost: it sees every
    response) and the one-line 4xx handler for InvalidInput (UnknownUser and TooMuchWork resolve there too)
    added with FastAPI's own `add_middleware` / `add_exception_handler`, as kserve's examples add theirs."""
    cfg = cfg or ScorerConfig()
    torch.set_num_threads(cfg.torch_threads)
    model = GTSLUMScorer(export_dir, feature_repo, cfg, name)
    if not model.load():
        raise ValueError(f"{export_dir}: the model did not load")
    server = kserve.ModelServer(enable_grpc=False, workers=1)  # one per process: workers are uvicorn's (`serve`)
    server.register_model(model)
    model.enable_latency_logging = server.enable_latency_logging  # kserve's per-request latency line, as ModelServer.start sets it
    # kserve's routes, middlewares and handlers on kserve.model_server.app; its port is unused (`ServerConfig` binds)
    RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, 0).create_application()
    app.add_middleware(ServingMiddleware, max_body_bytes=cfg.max_body_bytes)
    app.add_exception_handler(InvalidInput, _client_error)
    return app


def app_from_environment() -> FastAPI:
    """`create_app` in a worker process spawned by uvicorn (`workers` > 1): the settings come in SERVER_ENV."""
    settings = json.loads(os.environ[SERVER_ENV])
    configure_logging()
    return create_app(settings["export"], settings["feature_repo"], ScorerConfig(**settings["cfg"]), settings["name"])


def serve(
    export_dir: str | Path,
    host: str = "127.0.0.1",
    http_port: int = 8080,
    feature_repo: str | Path | None = None,
    cfg: ScorerConfig | None = None,
    name: str | None = None,
) -> None:
    """Serve the export on `host`:`http_port` until SIGTERM / SIGINT (blocks). One process (`cfg.workers` = 1)
    loads the model and serves; with N workers uvicorn binds the port once and spawns N processes, each
    loading the model (`app_from_environment`) and scoring on its own thread, restarted if one dies."""
    cfg = cfg or ScorerConfig()
    if cfg.workers == 1:
        uvicorn.Server(ServerConfig(create_app(export_dir, feature_repo, cfg, name), host, http_port, cfg)).run()
        return
    read_serving_card(export_dir)  # a bad export or key fails here, once, not in every worker that uvicorn restarts
    if feature_repo:
        pseudonym_key()
    repo = None if feature_repo is None else str(feature_repo)
    settings = {"export": str(export_dir), "feature_repo": repo, "cfg": dataclasses.asdict(cfg), "name": name}
    os.environ[SERVER_ENV] = json.dumps(settings)
    # this module by the name it has here: under `python -m gts_lum.serving.scorer` that is __main__, which a spawned
    # worker re-creates (importing it a second time by its package name would register its metrics twice)
    config = ServerConfig(f"{__name__}:app_from_environment", host, http_port, cfg, factory=True)
    Multiprocess(config, sockets=[config.bind_socket()]).run()


# -- a server in a subprocess (tests, load bench) --------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m gts_lum.serving.scorer` started on 127.0.0.1; `stop()` ends it by its PID."""

    def __init__(
        self,
        export_dir: str | Path,
        log_path: str | Path,
        feature_repo: str | Path | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
        torch_threads: int = 1,
    ):
        self.host, self.port = "127.0.0.1", port or free_port()
        self.name = read_serving_card(export_dir)["name"]
        self.log_path = Path(log_path)
        cmd = [
            sys.executable,
            "-m",
            "gts_lum.serving.scorer",
            "--export",
            str(export_dir),
            "--host",
            self.host,
            "--http-port",
            str(self.port),
            "--torch-threads",
            str(torch_threads),
        ]
        if feature_repo:
            cmd += ["--feature-repo", str(feature_repo)]
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd + list(extra_args or []), stdout=self._log_file, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll GET /v2/health/ready and /v1/models/NAME until both answer 200 (bounded by `timeout`)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"scorer exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            try:
                ready = httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200
                if ready and httpx.get(f"{self.url}/v1/models/{self.name}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"scorer not ready within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self._log_file.close()


def launch_server(
    export_dir: str | Path,
    log_path: str | Path,
    feature_repo: str | Path | None = None,
    extra_args: list[str] | None = None,
    ready_timeout: float = 120.0,
    torch_threads: int = 1,
) -> ServerProcess:
    """Start the scorer in a subprocess on a free 127.0.0.1 port and wait until it is ready."""
    server = ServerProcess(export_dir, log_path, feature_repo, extra_args=extra_args, torch_threads=torch_threads)
    server.wait_ready(ready_timeout)
    return server


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gts_lum.serving.scorer", description="Serve a GTS-LUM export with KServe (v1 and v2 REST).")
    add_server_arguments(p)
    return p


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # per-request INFO lines of the sequence builder and profile alignment would drown the access log
    logging.getLogger("gts_lum.sequence.timestamp_process").setLevel(logging.WARNING)
    logging.getLogger("gts_lum.recommenders.gts_lum_model").setLevel(logging.WARNING)


def run_from_args(args: argparse.Namespace) -> None:
    configure_logging()
    serve(args.export, args.host, args.http_port, args.feature_repo, scorer_config(args), args.name)


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    try:
        run_from_args(build_parser().parse_args(argv))
    except (ValueError, FileNotFoundError) as err:  # a bad export, flag or key: say so and exit, never serve half-ready
        log.error("cannot start the scorer: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
