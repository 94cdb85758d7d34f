"""The behaviour co-occurrence graph (paper section 3.2: "behavior co-appearance graphs", encoded by Node2Vec).

Design
======

Nodes are the behaviours of the catalog (`EventLog.behavior_ids` order). Two behaviours co-occur when one
user does both in the same time interval: the interval is the timestamp process's time ID
(`TimeGrid(SequenceConfig(timezone, interval_minutes)).time_id`, operator local time, 15 minutes in
the paper), so the graph's notion of "together" is exactly the one the token sequences use.

Counting (all vectorized; users are processed in chunks of about `chunk_events` events).
    1. Occurrences: the distinct (user, interval, behaviour) triples of the *training* events. A
       behaviour repeated inside one interval is one occurrence: ten location updates in 15 minutes
       are one thing the user did in that interval, not ten.
    2. Buckets: the occurrences of one (user, interval). A bucket with more than `max_bucket_size`
       behaviours is left out (logged): bulk-stamped records say nothing about co-use and would add
       pairs quadratically.
    3. Pairs: occurrence i of behaviour a in interval t and occurrence j of behaviour b != a of the
       same user in interval t' with |t - t'| <= `window`. With window 0 a pair of behaviours is
       counted once per (user, interval) in which both occur; with window w each pair of intervals
       within w counts once. Every ordered pair (i, j) is generated, so both matrices are symmetric.
    4. Edge data, summed over pairs:
       - `counts[a, b]`: the number of such co-occurrences (an integer; what `min_count` prunes on);
       - `adjacency[a, b]`: the edge weight. `weighting="count"` adds `window_decay ** |t - t'|` per
         pair (1 per shared interval with window 0). `weighting="inverse_size"` also divides by the
         size of the context: each end contributes `1 / n` where n is the number of other occurrences
         in its window (n - 1 for a bucket of n behaviours with window 0; with a window, the same
         behaviour in a neighbouring interval counts too, though it makes no edge) and the pair gets the mean of
         its two ends, so one occurrence spreads about one unit of weight over its context and a busy
         interval cannot dominate the graph.
Reweighting and pruning, in this order:
    - marginals `r_a = sum_b adjacency[a, b]` are taken before any pruning (they describe how often a
      behaviour co-occurs at all);
    - `min_count`: edges with fewer co-occurrences are dropped (noise);
    - `reweight="ppmi"`: the weight becomes max(PMI - ln(ppmi_shift), 0) with
      PMI(a, b) = ln(W_ab * Z_alpha^2 / (T * r_a^alpha * r_b^alpha)), T = sum of all weights and
      Z_alpha = sum_c r_c^alpha: the smoothed marginal (Levy et al. 2015, alpha = 0.75) on *both* ends
      so the matrix stays symmetric. Plain PMI is not offered: its negative weights cannot be random
      walk transition probabilities. Edges whose PPMI is 0 are dropped;
    - `top_k`: per node, its k heaviest edges (ties: lower behaviour index). `top_k_rule="union"` keeps
      an edge that is among the top k of either end (symmetric, no node loses its strongest links);
      `"mutual"` keeps it only when it is among the top k of both ends (degree capped at k for hubs too).
Self loops never exist. Behaviours with no edge left are isolated nodes: node2vec gives them no walks.

Output: `CooccurrenceGraph`, scipy CSR (B, B) matrices with sorted indices, `to_networkx()` for
exploration, saved as `graph.npz` + `graph.yaml` (no pickle).

Learned from data: build it from `Split.train` only (`gts_lum.sequence.splits`), so a validation or test
target never adds an edge.

Speed (2 shared CPU cores, lower bounds; `gts_lum.encoders.node2vec.bench_graph_encoder`): the demo
simulator's 3.1M training events (4.4M pairs) build in ~3.3 s, ~0.95M events/s (window 1: ~0.35M/s);
a 20M-event synthetic log (74M pairs, 2.8M edges) in ~50 s at ~1.1 GB peak memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import yaml
from tqdm.auto import tqdm

from gts_lum.config import from_dict
from gts_lum.data.events import EventLog, ragged_arange
from gts_lum.sequence.timestamp_process import SequenceConfig, TimeGrid

logger = logging.getLogger(__name__)

WEIGHTINGS = ("count", "inverse_size")
REWEIGHTS = ("none", "ppmi")
TOP_K_RULES = ("union", "mutual")


@dataclass
class CooccurrenceConfig:
    """How training events become the co-occurrence graph. Package default: `pkg:encoders/graph.yaml` (`graph:`)."""

    timezone: str | None = None  # operator IANA timezone; None: the data set's (the stage fills it in)
    interval_minutes: int = 15  # the time-ID grid (paper: 15 minutes)
    window: int = 0  # also pair behaviours up to this many intervals apart (0: same interval only)
    window_decay: float = 0.5  # weight of a pair `d` intervals apart is window_decay ** d
    weighting: str = "count"  # one of WEIGHTINGS
    max_bucket_size: int | None = 256  # (user, interval) buckets with more behaviours are skipped
    min_count: int = 1  # edges with fewer co-occurrences are dropped
    reweight: str = "none"  # one of REWEIGHTS
    ppmi_alpha: float = 0.75  # marginal smoothing exponent of PPMI
    ppmi_shift: float = 1.0  # PPMI subtracts ln(shift) (1: plain PPMI)
    top_k: int | None = None  # keep each node's k heaviest edges (None: all)
    top_k_rule: str = "union"  # one of TOP_K_RULES
    chunk_events: int = 2_000_000  # events per user chunk: bounds memory on large logs
    chunk_pairs: int = 5_000_000  # candidate pairs per sub-chunk (~50 bytes each at peak)

    def __post_init__(self) -> None:
        try:
            _grid_config(self.timezone or "UTC", self.interval_minutes)  # validates both
        except ValueError as err:
            raise ValueError(f"CooccurrenceConfig: {err}") from err
        for name, minimum in (("window", 0), ("min_count", 1), ("chunk_events", 1), ("chunk_pairs", 1)):
            _check_int(name, getattr(self, name), minimum)
        for name in ("max_bucket_size", "top_k"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 2 if name == "max_bucket_size" else 1)
        if not 0.0 < float(self.window_decay) <= 1.0:
            raise ValueError(f"CooccurrenceConfig.window_decay={self.window_decay!r}: expected a number in (0, 1]")
        if not 0.0 < float(self.ppmi_alpha) <= 1.0:
            raise ValueError(f"CooccurrenceConfig.ppmi_alpha={self.ppmi_alpha!r}: expected a number in (0, 1]")
        if not float(self.ppmi_shift) >= 1.0:
            raise ValueError(f"CooccurrenceConfig.ppmi_shift={self.ppmi_shift!r}: expected a number >= 1")
        for name, allowed in (("weighting", WEIGHTINGS), ("reweight", REWEIGHTS), ("top_k_rule", TOP_K_RULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"CooccurrenceConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")


def _grid_config(timezone: str, interval_minutes: int) -> SequenceConfig:
    """The timestamp-process settings behind the time IDs. Descriptors play no part in the graph: one
    whole-day part fits any interval length (the default day parts need a 15- or 30-minute grid)."""
    whole_day = [{"name": "day", "start": "00:00", "end": "24:00"}]
    return SequenceConfig(timezone=timezone, interval_minutes=interval_minutes, day_parts=whole_day)


def _check_int(name: str, value, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise ValueError(f"CooccurrenceConfig.{name}={value!r}: expected an integer >= {minimum}")


@dataclass
class CooccurrenceGraph:
    """Weighted, undirected behaviour graph over the whole catalog (isolated nodes included)."""

    behavior_ids: np.ndarray  # (B,) str, catalog order = node index
    adjacency: sp.csr_matrix  # (B, B) float32 symmetric edge weights, sorted indices, no self loops
    counts: sp.csr_matrix  # (B, B) int64 co-occurrence counts on the same edges as `adjacency`
    occurrences: np.ndarray  # (B,) int64 training (user, interval) buckets holding each behaviour
    config: CooccurrenceConfig
    metadata: dict = field(default_factory=dict)  # sizes and timings of the build

    @property
    def num_nodes(self) -> int:
        return len(self.behavior_ids)

    @property
    def num_edges(self) -> int:
        """Undirected edges (each stored twice in the symmetric CSR)."""
        return self.adjacency.nnz // 2

    def degree(self) -> np.ndarray:
        return np.diff(self.adjacency.indptr)

    def connected(self) -> np.ndarray:
        """(B,) bool: nodes with at least one edge (the ones node2vec can walk from)."""
        return self.degree() > 0

    def to_networkx(self, labels: bool = True):
        """A `networkx.Graph` (edge attributes `weight`, `count`; node attribute `occurrences`).

        Nodes are behaviour ids when `labels`, else catalog indices. Meant for exploration and plotting;
        the walks run on the CSR matrix.
        """
        import networkx as nx

        graph = nx.Graph()
        nodes = self.behavior_ids.astype(str) if labels else np.arange(self.num_nodes)
        graph.add_nodes_from((n, {"occurrences": int(c)}) for n, c in zip(nodes.tolist(), self.occurrences.tolist()))
        rows = np.repeat(np.arange(self.num_nodes), self.degree())
        upper = rows < self.adjacency.indices  # each undirected edge once; `counts` shares the CSR structure
        a, b = nodes[rows[upper]].tolist(), nodes[self.adjacency.indices[upper]].tolist()
        weight, count = self.adjacency.data[upper].tolist(), self.counts.data[upper].tolist()
        graph.add_edges_from((x, y, {"weight": w, "count": c}) for x, y, w, c in zip(a, b, weight, count))
        return graph

    def summary(self) -> dict:
        degree = self.degree()
        return {
            "nodes": self.num_nodes,
            "connected_nodes": int((degree > 0).sum()),
            "edges": self.num_edges,
            "max_degree": int(degree.max()) if len(degree) else 0,
            "mean_degree": round(float(degree[degree > 0].mean()), 2) if (degree > 0).any() else 0.0,
            "total_weight": round(float(self.adjacency.sum()) / 2.0, 4),
        }

    def save(self, out_dir: str | Path) -> Path:
        """`graph.npz` (CSR arrays, ids, occurrences) + `graph.yaml` (config, summary, build metadata)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(
            out / "graph.npz",
            behavior_ids=self.behavior_ids.astype(str),
            indptr=self.adjacency.indptr,
            indices=self.adjacency.indices,
            weight=self.adjacency.data,
            count=self.counts.data,
            occurrences=self.occurrences,
        )
        card = {"config": dataclasses.asdict(self.config), "summary": self.summary(), "metadata": self.metadata}
        (out / "graph.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> CooccurrenceGraph:
        root = Path(out_dir)
        if not (root / "graph.npz").exists():
            raise FileNotFoundError(f"{root}: no graph.npz (not a saved co-occurrence graph)")
        card = yaml.safe_load((root / "graph.yaml").read_text())
        with np.load(root / "graph.npz", allow_pickle=False) as z:
            ids, indptr, indices = z["behavior_ids"].astype(object), z["indptr"], z["indices"]
            shape = (len(ids), len(ids))
            return cls(
                behavior_ids=ids,
                adjacency=sp.csr_matrix((z["weight"], indices, indptr), shape=shape),
                counts=sp.csr_matrix((z["count"], indices, indptr), shape=shape),
                occurrences=z["occurrences"],
                config=from_dict(CooccurrenceConfig, card["config"]),
                metadata=card.get("metadata", {}),
            )


def user_chunks(offsets: np.ndarray, chunk_events: int) -> list[tuple[int, int]]:
    """Consecutive user ranges [u0, u1) of about `chunk_events` events each (a bigger user is its own chunk)."""
    num_users = len(offsets) - 1
    if num_users == 0:
        return []
    targets = np.arange(1, int(offsets[-1]) // chunk_events + 1) * chunk_events
    cuts = np.unique(np.searchsorted(offsets, targets, side="right").clip(1, num_users))
    bounds = np.concatenate([[0], cuts[cuts < num_users], [num_users]])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


@dataclass
class _Occurrences:
    """Distinct (user, interval, behaviour) triples of one chunk, sorted by user, interval, behaviour."""

    bucket: np.ndarray  # (M,) int64 user_local * span + interval offset: equal = same (user, interval)
    interval: np.ndarray  # (M,) int64 time ID
    behavior: np.ndarray  # (M,) int64


def _occurrences(log: EventLog, u0: int, u1: int, grid: TimeGrid, window: int, max_bucket: int | None) -> tuple[_Occurrences, int]:
    """The chunk's occurrences and the number of buckets skipped for exceeding `max_bucket`."""
    s, e = int(log.offsets[u0]), int(log.offsets[u1])
    if e == s:
        empty = np.zeros(0, np.int64)
        return _Occurrences(empty, empty, empty), 0
    interval = grid.time_id(log.timestamp[s:e])
    behavior = log.behavior[s:e].astype(np.int64)
    user = np.repeat(np.arange(u1 - u0, dtype=np.int64), np.diff(log.offsets[u0 : u1 + 1]))
    low = interval.min()
    # `window` intervals of padding per user: a window search can never reach the neighbouring user
    span = int(interval.max() - low) + 1 + window
    bucket = user * span + (interval - low)
    # Sort by (bucket, behaviour). Buckets are already in order except where a DST fall-back makes time
    # IDs step back, so two stable argsorts of nearly sorted int64 keys beat a lexsort (~8x here); the
    # second key uses the dense bucket rank (< number of events), so it cannot overflow.
    order = np.argsort(bucket, kind="stable")
    bucket, behavior, interval = bucket[order], behavior[order], interval[order]
    rank = np.cumsum(np.concatenate([[False], bucket[1:] != bucket[:-1]]))
    order = np.argsort(rank * log.num_behaviors + behavior, kind="stable")
    bucket, behavior, interval = bucket[order], behavior[order], interval[order]
    first = np.concatenate([[True], (bucket[1:] != bucket[:-1]) | (behavior[1:] != behavior[:-1])])
    bucket, behavior, interval = bucket[first], behavior[first], interval[first]
    skipped = 0
    if max_bucket is not None:
        starts = np.flatnonzero(np.concatenate([[True], bucket[1:] != bucket[:-1]]))
        sizes = np.diff(np.append(starts, len(bucket)))
        big = sizes > max_bucket
        skipped = int(big.sum())
        if skipped:
            keep = ~np.repeat(big, sizes)
            bucket, behavior, interval = bucket[keep], behavior[keep], interval[keep]
    return _Occurrences(bucket, interval, behavior), skipped


def _pair_block(occ: _Occurrences, lo: np.ndarray, hi: np.ndarray, rows: np.ndarray, cfg: CooccurrenceConfig):
    """Pairs (a, b, weight) whose first end is one of occurrence `rows`; partners are [lo, hi) of each row."""
    src = np.repeat(rows, hi[rows] - lo[rows])
    dst = ragged_arange(lo[rows], hi[rows] - lo[rows])
    a, b = occ.behavior[src], occ.behavior[dst]
    keep = a != b  # no self loops: also drops the occurrence paired with itself
    src, dst, a, b = src[keep], dst[keep], a[keep], b[keep]
    if cfg.window:
        weight = np.power(cfg.window_decay, np.abs(occ.interval[src] - occ.interval[dst]), dtype=np.float64)
    else:
        weight = np.ones(len(a))
    if cfg.weighting == "inverse_size":
        context = (hi - lo - 1).astype(np.float64)  # other occurrences in each occurrence's window
        weight *= 0.5 * (1.0 / context[src] + 1.0 / context[dst])
    return a, b, weight


def _reduce_pairs(a: np.ndarray, b: np.ndarray, weight: np.ndarray, n: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Canonical (n, n) CSR matrices of summed weights and pair counts: one sort of the pair keys serves both."""
    key = a * n + b
    order = np.argsort(key)
    key = key[order]
    first = np.flatnonzero(np.diff(key, prepend=-1))  # start of each run of equal keys (keys are >= 0)
    summed = np.add.reduceat(weight[order], first)
    counts = np.diff(np.append(first, len(key)))
    rows, cols = np.divmod(key[first], n)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sp.csr_matrix((summed, cols, indptr), shape=(n, n)), sp.csr_matrix((counts, cols, indptr), shape=(n, n))


def count_cooccurrences(train: EventLog, cfg: CooccurrenceConfig) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray, dict]:
    """Raw symmetric (weights, counts) matrices, (B,) occurrences per behaviour and build statistics."""
    if cfg.timezone is None:
        raise ValueError("CooccurrenceConfig.timezone is None: set it to the data set's timezone (dataset.yaml)")
    grid = TimeGrid(_grid_config(cfg.timezone, cfg.interval_minutes))
    num_b = train.num_behaviors
    weights = sp.csr_matrix((num_b, num_b), dtype=np.float64)
    counts = sp.csr_matrix((num_b, num_b), dtype=np.int64)
    occurrences = np.zeros(num_b, np.int64)
    stats = {"events": train.num_events, "occurrences": 0, "skipped_buckets": 0, "pairs": 0}
    chunks = user_chunks(train.offsets, cfg.chunk_events)
    for u0, u1 in tqdm(chunks, desc="co-occurrence", unit="chunk", disable=len(chunks) < 2):
        occ, skipped = _occurrences(train, u0, u1, grid, cfg.window, cfg.max_bucket_size)
        occurrences += np.bincount(occ.behavior, minlength=num_b)
        stats["occurrences"] += len(occ.behavior)
        stats["skipped_buckets"] += skipped
        lo = np.searchsorted(occ.bucket, occ.bucket - cfg.window, side="left")
        hi = np.searchsorted(occ.bucket, occ.bucket + cfg.window, side="right")
        # sub-chunks of source occurrences holding about `chunk_pairs` candidate pairs each
        pair_end = np.cumsum(hi - lo)
        cuts = np.searchsorted(pair_end, np.arange(cfg.chunk_pairs, int(pair_end[-1]) if len(pair_end) else 0, cfg.chunk_pairs))
        for rows in np.split(np.arange(len(lo)), np.unique(cuts)):
            a, b, w = _pair_block(occ, lo, hi, rows, cfg)
            stats["pairs"] += len(a)
            block_weights, block_counts = _reduce_pairs(a, b, w, num_b)
            weights, counts = weights + block_weights, counts + block_counts
    # (i, j) and (j, i) were summed in different orders: average with the transpose so that the two
    # halves are bit-identical (float addition commutes), which the symmetric pruning below relies on
    weights = ((weights + weights.T) * 0.5).tocsr()
    weights.sort_indices()
    counts.sort_indices()
    return weights, counts, occurrences, stats


def _keep_edges(matrix: sp.csr_matrix, keep: np.ndarray, data: np.ndarray | None = None) -> sp.csr_matrix:
    """`matrix` restricted to the edges where `keep` (aligned with `matrix.data`), optionally with new data."""
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=matrix.shape[0]))])
    values = (matrix.data if data is None else data)[keep]
    return sp.csr_matrix((values, matrix.indices[keep], indptr), shape=matrix.shape)


def edge_positions(matrix: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Position in `matrix.data` of each edge (rows[i], cols[i]); -1 where absent. Needs sorted indices."""
    n = np.int64(matrix.shape[1])
    edge_row = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
    keys = edge_row * n + matrix.indices  # ascending: CSR with sorted indices is ordered by (row, col)
    wanted = np.asarray(rows, np.int64) * n + np.asarray(cols, np.int64)
    pos = np.searchsorted(keys, wanted).clip(max=max(len(keys) - 1, 0))
    found = (keys[pos] == wanted) if len(keys) else np.zeros(len(wanted), bool)
    return np.where(found, pos, -1)


def ppmi_weights(weights: sp.csr_matrix, marginal: np.ndarray, alpha: float, shift: float) -> np.ndarray:
    """(nnz,) max(PMI - ln shift, 0) of each stored edge, with alpha-smoothed marginals on both ends."""
    rows = np.repeat(np.arange(weights.shape[0]), np.diff(weights.indptr))
    smoothed = np.power(marginal, alpha)
    log_norm = 2.0 * np.log(smoothed.sum()) - np.log(marginal.sum())
    # one sum over both ends (addition commutes): PMI(a, b) and PMI(b, a) are bit-identical
    pmi = np.log(weights.data) + log_norm - (np.log(smoothed[rows]) + np.log(smoothed[weights.indices]))
    return np.maximum(pmi - math.log(shift), 0.0)


def top_k_mask(weights: sp.csr_matrix, k: int, rule: str) -> np.ndarray:
    """(nnz,) bool: edges among the k heaviest of their row (ties: lower column) by `rule` over both ends."""
    rows = np.repeat(np.arange(weights.shape[0]), np.diff(weights.indptr))
    order = np.lexsort((weights.indices, -weights.data, rows))
    rank = np.empty(weights.nnz, np.int64)
    rank[order] = np.arange(weights.nnz) - weights.indptr[rows[order]]
    mine = rank < k
    reverse = edge_positions(weights, weights.indices, rows)  # the same edge seen from its other end
    theirs = np.where(reverse >= 0, mine[reverse], False)
    return mine | theirs if rule == "union" else mine & theirs


def build_cooccurrence_graph(train: EventLog, cfg: CooccurrenceConfig) -> CooccurrenceGraph:
    """The co-occurrence graph of the training events `train` (pass `Split.train`: nothing else may be learned from)."""
    start = time.perf_counter()
    weights, counts, occurrences, stats = count_cooccurrences(train, cfg)
    counted = time.perf_counter()
    stats["raw_edges"] = weights.nnz // 2
    marginal = np.asarray(weights.sum(axis=1)).ravel()
    data = weights.data
    keep = counts.data >= cfg.min_count
    if cfg.reweight == "ppmi":
        data = ppmi_weights(weights, marginal, cfg.ppmi_alpha, cfg.ppmi_shift)
        keep &= data > 0
    weights, counts = _keep_edges(weights, keep, data), _keep_edges(counts, keep)
    if cfg.top_k is not None:
        keep = top_k_mask(weights, cfg.top_k, cfg.top_k_rule)
        weights, counts = _keep_edges(weights, keep), _keep_edges(counts, keep)
    if stats["skipped_buckets"]:
        logger.warning(
            "co-occurrence: %d (user, interval) buckets with more than %d behaviours skipped",
            stats["skipped_buckets"],
            cfg.max_bucket_size,
        )
    stats["count_seconds"] = round(counted - start, 3)
    stats["build_seconds"] = round(time.perf_counter() - start, 3)
    graph = CooccurrenceGraph(
        behavior_ids=np.asarray(train.behavior_ids, dtype=object),
        adjacency=weights.astype(np.float32),
        counts=counts,
        occurrences=occurrences,
        config=cfg,
        metadata=stats,
    )
    logger.info("co-occurrence graph: %s (%s)", graph.summary(), stats)
    return graph
