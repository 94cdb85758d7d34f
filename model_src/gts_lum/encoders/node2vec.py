"""node2vec business embeddings of behaviours (paper section 3.2: co-appearance patterns "encoded using Node2Vec").

Design
======

Walks (Grover & Leskovec 2016), vectorized on the CSR co-occurrence graph.
    Every node with an edge starts `walks_per_node` walks of `walk_length` nodes; one round starts one
    walk from each such node, in a shuffled order (the order skip-gram reads them). All walkers of a
    round advance one step together with numpy; the only Python loops run over steps and rejection
    rounds. A walker at v that came from t moves to neighbour x with probability proportional to
    w(v, x) * alpha(t, x), alpha = 1/p if x == t, 1 if x is a neighbour of t, 1/q otherwise.

    First-order draws: edge weights are normalized per row and stored as one ascending array
    `cdf = row + cumulative probability inside the row`; a uniform draw u for a walker at v is looked up
    with one `searchsorted(cdf, v + u)` for all walkers at once (float64 keeps ~1e-10 resolution even
    for a million nodes).

    Second-order draws by rejection sampling, as in the fast node2vec implementations (KnightKing's
    outlier folding): the proposal puts mass pi(v, t) / p on returning to t (exact, always accepted)
    and (1 - pi(v, t)) * M on the other neighbours, M = max(1, 1/q), drawn from the first-order
    distribution with t cut out (one searchsorted, no retry); such a candidate x is accepted with
    probability alpha(t, x) / M. Folding the return edge out keeps a small p from crushing the
    acceptance rate. "Is x a neighbour of t" is a membership test of the key t * N + x in the sorted
    edge keys (`searchsorted`). Rejected walkers draw again, all together, until none is left.
    With p = q = 1 the walk is first order (DeepWalk on weighted edges) and skips the bias entirely.

    Deterministic by seed: round r draws from its own generator, `SeedSequence(seed).spawn(rounds)[r]`.

Skip-gram: gensim `Word2Vec(sg=1, hs=0, negative sampling)` on the walks, tokens are node indices.
    Determinism: gensim 4 initializes vectors from `numpy.random.default_rng(seed)` and draws its
    negative samples and window sizes from its own seeded generator; with `workers=1` jobs are trained
    in order, so the vectors are bit-identical across runs and processes whatever PYTHONHASHSEED is
    (gensim's `hashfxn` is only used by a deprecated helper; tests/encoders/test_node2vec.py runs two
    interpreters with different hash seeds to keep this true). `workers > 1` is faster and not
    reproducible.

Output: `GraphEmbeddings`, (B, D) float32 vectors in catalog order plus an `origin` per behaviour:
    "node2vec" (trained), "family_mean" (not in any walk: the mean of the trained vectors of its
    family, e.g. a stall event of a new video app gets the centre of the video-incident family, where
    its co-occurrences would most likely put it) or "zeros" (no trained family member, or
    `fallback="zeros"`). `seen` is origin == "node2vec", so a consumer may also mask the rest.
    Saved as `embeddings.npz` + `embeddings.yaml` (graph summary, walk and skip-gram settings, timings);
    `run_graph_encoder` writes the graph beside it.

Speed (`bench_graph_encoder`, demo simulator graph: 1,238 nodes, 313k edges; 2 shared CPU cores, lower
bounds): ~0.9M walk steps/s first order (p = q = 1), ~0.16M steps/s with p = 0.5, q = 2; skip-gram on
the 495k walk tokens (5 epochs, 1 worker) takes ~25 s and dominates.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from tqdm.auto import tqdm

from gts_lum.config import from_dict, load_config
from gts_lum.data.contract import DatasetManifest
from gts_lum.data.ingest import prepare_dataset
from gts_lum.data.validate import load_event_log
from gts_lum.encoders.cooccurrence import CooccurrenceConfig, CooccurrenceGraph, build_cooccurrence_graph
from gts_lum.sequence.dataset import SequenceDataset
from gts_lum.sequence.splits import leave_one_out

logger = logging.getLogger(__name__)

AUTO_FALLBACK_COLUMNS = ("family", "category", "type")
FALLBACKS = ("family_mean", "zeros")
ORIGINS = ("node2vec", "family_mean", "zeros")  # `GraphEmbeddings.origin` codes


@dataclass
class WalkConfig:
    walks_per_node: int = 10  # rounds: each round starts one walk from every node with an edge
    walk_length: int = 40  # nodes per walk, the start included
    p: float = 1.0  # return parameter: small p -> walks step back often (local, BFS-like)
    q: float = 1.0  # in-out parameter: small q -> walks move away from where they came from (DFS-like)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("walks_per_node", "walk_length"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"WalkConfig.{name}={value!r}: expected an integer >= 1")
        for name in ("p", "q"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"WalkConfig.{name}={value!r}: expected a number > 0")


@dataclass
class SkipGramConfig:
    """gensim Word2Vec settings (skip-gram with negative sampling)."""

    dim: int = 64
    window: int = 5
    negative: int = 5
    ns_exponent: float = 0.75
    sample: float = 1e-3  # down-sampling of frequent nodes (hubs appear in most walks)
    alpha: float = 0.025
    min_alpha: float = 1e-4
    epochs: int = 5
    workers: int = 1  # 1: reproducible; more threads are faster but not bit-reproducible
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "window", "negative", "epochs", "workers"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"SkipGramConfig.{name}={value!r}: expected an integer >= 1")


@dataclass
class Node2VecConfig:
    walk: WalkConfig = field(default_factory=WalkConfig)
    skipgram: SkipGramConfig = field(default_factory=SkipGramConfig)
    fallback: str = "family_mean"  # vectors of behaviours no walk visits: one of FALLBACKS
    # behaviours-table column whose groups `family_mean` averages over; "auto": the first of
    # AUTO_FALLBACK_COLUMNS the table has (none: zeros), so the default works on any catalog
    fallback_column: str = "auto"

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ValueError(f"Node2VecConfig.fallback={self.fallback!r}: expected one of {FALLBACKS}")


@dataclass
class GraphEncoderConfig:
    """The graph business encoder: co-occurrence graph, then node2vec. Package default: `pkg:encoders/graph.yaml`."""

    graph: CooccurrenceConfig = field(default_factory=CooccurrenceConfig)
    node2vec: Node2VecConfig = field(default_factory=Node2VecConfig)


class BiasedWalker:
    """node2vec transitions on a weighted CSR graph; every method moves a whole array of walkers at once."""

    def __init__(self, adjacency: sp.csr_matrix, p: float = 1.0, q: float = 1.0):
        adj = sp.csr_matrix(adjacency, copy=True)
        if adj.shape[0] != adj.shape[1]:
            raise ValueError(f"adjacency must be square, got shape {adj.shape}")
        invalid = ~np.isfinite(adj.data) | (adj.data < 0)
        if invalid.any():
            bad = int(np.flatnonzero(invalid)[0])
            row = int(np.searchsorted(adj.indptr, bad, side="right") - 1)
            raise ValueError(f"edge weights must be finite and >= 0: edge ({row}, {adj.indices[bad]}) has {adj.data[bad]}")
        adj.eliminate_zeros()  # a zero-weight edge can never be taken; dropping it keeps the cdf strict
        adj.sort_indices()
        self.num_nodes = adj.shape[0]
        self.p, self.q = float(p), float(q)
        self.indptr = adj.indptr.astype(np.int64)
        self.indices = adj.indices.astype(np.int64)
        self.degree = np.diff(self.indptr)
        row = np.repeat(np.arange(self.num_nodes, dtype=np.int64), self.degree)
        self.prob = adj.data.astype(np.float64) / np.bincount(row, adj.data, self.num_nodes)[row]  # (E,)
        cum = np.cumsum(self.prob)
        row_base = np.concatenate([[0.0], cum])[self.indptr[:-1]]
        self.cdf = row + (cum - row_base[row])  # (E,) ascending; row v's entries lie in (v, v + 1]
        self.edge_key = row * self.num_nodes + self.indices  # (E,) ascending: sorted (row, col)

    def edge_position(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Index of edge src -> dst in the CSR arrays, -1 where there is none."""
        wanted = src.astype(np.int64) * self.num_nodes + dst
        pos = np.searchsorted(self.edge_key, wanted).clip(max=max(len(self.edge_key) - 1, 0))
        found = self.edge_key[pos] == wanted if len(self.edge_key) else np.zeros(len(wanted), bool)
        return np.where(found, pos, -1)

    def _draw(self, cur: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Neighbour of each `cur` at within-row cumulative probability `u` in [0, 1)."""
        pos = np.searchsorted(self.cdf, cur + u, side="right")
        return self.indices[pos.clip(self.indptr[cur], self.indptr[cur + 1] - 1)]  # clip: float rounding at row ends

    def first_step(self, cur: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """First-order move of walkers at `cur` (every node must have an edge)."""
        return self._draw(cur, rng.random(len(cur)))

    def step(self, prev: np.ndarray, cur: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Second-order move of walkers at `cur` that arrived from `prev`."""
        if self.p == 1.0 and self.q == 1.0:
            return self.first_step(cur, rng)
        envelope = max(1.0, 1.0 / self.q)
        back = self.edge_position(cur, prev)
        has_back = back >= 0
        pi_back = np.where(has_back, self.prob[back], 0.0)
        # within-row cumulative probability before the edge back to prev: where a draw skips over it
        before_back = np.where(has_back, self.cdf[back] - cur - pi_back, np.inf)
        go_back_share = (pi_back / self.p) / (pi_back / self.p + (1.0 - pi_back) * envelope)
        nxt = np.empty(len(cur), np.int64)
        pending = np.arange(len(cur))
        while pending.size:
            t, v = prev[pending], cur[pending]
            back_now = rng.random(len(pending)) < go_back_share[pending]
            u = rng.random(len(pending)) * (1.0 - pi_back[pending])
            u = np.where(u >= before_back[pending], u + pi_back[pending], u)
            x = self._draw(v, u)
            bias = np.where(self.edge_position(t, x) >= 0, 1.0, 1.0 / self.q)
            accept = back_now | (rng.random(len(pending)) * envelope < bias)
            nxt[pending[accept]] = np.where(back_now, t, x)[accept]
            pending = pending[~accept]
        return nxt

    def walk(self, starts: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
        """(S, length) int32 walks from `starts`; a walk that reaches a node without out-edges ends (-1 after)."""
        walks = np.full((len(starts), length), -1, np.int32)
        walks[:, 0] = starts
        prev, cur = np.array(starts, np.int64), np.array(starts, np.int64)
        alive = np.flatnonzero(self.degree[cur] > 0)
        for k in range(1, length):
            if not alive.size:
                break
            nxt = self.first_step(cur[alive], rng) if k == 1 else self.step(prev[alive], cur[alive], rng)
            walks[alive, k] = nxt
            prev[alive] = cur[alive]
            cur[alive] = nxt
            alive = alive[self.degree[nxt] > 0]
        return walks


def random_walks(adjacency: sp.csr_matrix, cfg: WalkConfig, progress: bool = True) -> np.ndarray:
    """(R * S, walk_length) int32 node2vec walks: `walks_per_node` rounds over the S nodes with an edge."""
    walker = BiasedWalker(adjacency, cfg.p, cfg.q)
    starts = np.flatnonzero(walker.degree > 0)
    generators = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(cfg.walks_per_node)]
    rounds = []
    for rng in tqdm(generators, desc="node2vec walks", unit="round", disable=not progress):
        rounds.append(walker.walk(rng.permutation(starts), cfg.walk_length, rng))
    return np.concatenate(rounds) if rounds else np.zeros((0, cfg.walk_length), np.int32)


def train_skipgram(walks: np.ndarray, num_nodes: int, cfg: SkipGramConfig) -> tuple[np.ndarray, np.ndarray]:
    """(N, dim) float32 skip-gram vectors of the nodes and (N,) bool: which nodes occur in the walks."""
    vectors = np.zeros((num_nodes, cfg.dim), np.float32)
    trained = np.zeros(num_nodes, bool)
    if not walks.size:
        logger.warning("node2vec: no walks (the graph has no edge); every vector falls back")
        return vectors, trained
    from gensim.models import Word2Vec

    tokens = np.arange(num_nodes).astype(str)
    sentences = [tokens[w[w >= 0]].tolist() for w in walks] if (walks < 0).any() else tokens[walks].tolist()
    model = Word2Vec(
        sentences=sentences,
        vector_size=cfg.dim,
        window=cfg.window,
        min_count=1,
        sg=1,
        hs=0,
        negative=cfg.negative,
        ns_exponent=cfg.ns_exponent,
        sample=cfg.sample,
        alpha=cfg.alpha,
        min_alpha=cfg.min_alpha,
        epochs=cfg.epochs,
        workers=cfg.workers,
        seed=cfg.seed,
    )
    nodes = np.asarray(model.wv.index_to_key, dtype=np.int64)
    vectors[nodes] = model.wv.vectors
    trained[nodes] = True
    return vectors, trained


def fill_unseen(vectors: np.ndarray, seen: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Vectors with unseen rows set to their group's mean seen vector (zeros without one), and (B,) int8 origin."""
    out = np.where(seen[:, None], vectors, 0.0).astype(np.float32)
    origin = np.where(seen, ORIGINS.index("node2vec"), ORIGINS.index("zeros")).astype(np.int8)
    if groups is None:
        return out, origin
    codes, uniques = pd.factorize(pd.Series(groups), use_na_sentinel=True)  # missing group: -1
    member = seen & (codes >= 0)
    one_hot = sp.csr_matrix((np.ones(int(member.sum())), (codes[member], np.flatnonzero(member))), shape=(len(uniques), len(seen)))
    size = np.asarray(one_hot.sum(axis=1)).ravel()
    mean = (one_hot @ out.astype(np.float64)) / np.maximum(size, 1)[:, None]  # (G, D)
    fill = ~seen & (codes >= 0)
    fill[fill] = size[codes[fill]] > 0
    out[fill] = mean[codes[fill]]
    origin[fill] = ORIGINS.index("family_mean")
    return out, origin


@dataclass
class GraphEmbeddings:
    """One node2vec vector per behaviour of the catalog."""

    behavior_ids: np.ndarray  # (B,) str, catalog order
    vectors: np.ndarray  # (B, D) float32
    origin: np.ndarray  # (B,) int8 index into ORIGINS
    config: Node2VecConfig
    metadata: dict = field(default_factory=dict)  # graph summary, walk counts, timings

    @property
    def seen(self) -> np.ndarray:
        """(B,) bool: behaviours whose vector was trained on walks."""
        return self.origin == ORIGINS.index("node2vec")

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "embeddings.npz", behavior_ids=self.behavior_ids.astype(str), vectors=self.vectors, origin=self.origin)
        card = {
            "kind": "node2vec",
            "behaviors": len(self.behavior_ids),
            "dim": int(self.vectors.shape[1]),
            "origins": {name: int((self.origin == i).sum()) for i, name in enumerate(ORIGINS)},
            "config": dataclasses.asdict(self.config),
            "metadata": self.metadata,
        }
        (out / "embeddings.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> GraphEmbeddings:
        root = Path(out_dir)
        if not (root / "embeddings.npz").exists():
            raise FileNotFoundError(f"{root}: no embeddings.npz (not saved graph embeddings)")
        card = yaml.safe_load((root / "embeddings.yaml").read_text())
        with np.load(root / "embeddings.npz", allow_pickle=False) as z:
            ids, vectors, origin = z["behavior_ids"].astype(object), z["vectors"], z["origin"]
        if vectors.shape != (len(ids), card["dim"]) or origin.shape != (len(ids),):
            raise ValueError(f"{root}/embeddings.npz: vectors {vectors.shape} / origin {origin.shape} do not match {len(ids)} behaviours")
        return cls(ids, vectors, origin, from_dict(Node2VecConfig, card["config"]), card.get("metadata", {}))


def fit_graph_embeddings(
    graph: CooccurrenceGraph, cfg: Node2VecConfig, groups: np.ndarray | None = None, progress: bool = True
) -> GraphEmbeddings:
    """Walk the graph, train skip-gram, fill unseen behaviours (`groups`: (B,) family labels, catalog order)."""
    if groups is not None and len(groups) != graph.num_nodes:
        raise ValueError(f"groups has {len(groups)} entries, the graph {graph.num_nodes} behaviours")
    t0 = time.perf_counter()
    walks = random_walks(graph.adjacency, cfg.walk, progress=progress)
    t1 = time.perf_counter()
    vectors, trained = train_skipgram(walks, graph.num_nodes, cfg.skipgram)
    t2 = time.perf_counter()
    vectors, origin = fill_unseen(vectors, trained, groups if cfg.fallback == "family_mean" else None)
    steps = int((walks[:, 1:] >= 0).sum())
    metadata = {
        "graph": graph.summary(),
        "graph_build": graph.metadata,
        "walks": len(walks),
        "walk_steps": steps,
        "walk_seconds": round(t1 - t0, 3),
        "walk_steps_per_second": round(steps / max(t1 - t0, 1e-9)),
        "skipgram_seconds": round(t2 - t1, 3),
    }
    logger.info("node2vec: %s", metadata)
    return GraphEmbeddings(np.asarray(graph.behavior_ids, dtype=object), vectors, origin, cfg, metadata)


def run_graph_encoder(
    sequence_dir: str | Path,
    out_dir: str | Path,
    config: str | Path = "pkg:encoders/graph.yaml",
    overrides: list[str] | dict | None = None,
) -> dict:
    """Pipeline stage: the sequence data set's training split -> graph -> node2vec; writes both artifacts.

    The graph's timezone is the data set's (from the sequence stage) unless the config sets one.
    """

    data = SequenceDataset.load(sequence_dir)
    cfg = load_config(GraphEncoderConfig, config, overrides)
    if cfg.graph.timezone is None:
        cfg.graph = dataclasses.replace(cfg.graph, timezone=data.sequence_cfg.timezone)
    groups = None
    if cfg.node2vec.fallback == "family_mean":
        behaviors = data.behaviors()
        column = cfg.node2vec.fallback_column
        if column == "auto":
            column = next((c for c in AUTO_FALLBACK_COLUMNS if c in behaviors), None)
            logger.info(
                "node2vec fallback for unvisited behaviours: %s",
                f"mean of their {column!r} group" if column else "zeros (no family column)",
            )
        if column is not None and column not in behaviors:
            raise ValueError(
                f"node2vec.fallback_column={column!r} is not a column of the behaviours table "
                f"{list(behaviors.columns)}: name another column or set node2vec.fallback=zeros"
            )
        groups = None if column is None else behaviors[column].to_numpy()
    graph = build_cooccurrence_graph(data.split().train, cfg.graph)
    embeddings = fit_graph_embeddings(graph, cfg.node2vec, groups)
    graph.save(out_dir)
    embeddings.save(out_dir)
    return {**embeddings.metadata, "origins": {n: int((embeddings.origin == i).sum()) for i, n in enumerate(ORIGINS)}}


def bench_graph_encoder(synth: str = "synth:demo", workdir: str | Path | None = None, cfg: GraphEncoderConfig | None = None) -> dict:
    """Graph build (events/s) and walk throughput (steps/s) on simulator data (default: the demo operator).

    Figures for BENCHMARKS.md; they are lower bounds on a shared machine.
    """
    import tempfile

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        clean = prepare_dataset(synth, tmp, progress=False)
        train = leave_one_out(load_event_log(clean)).train
        timezone = DatasetManifest.read(clean).timezone
    cfg = cfg or load_config(GraphEncoderConfig, "pkg:encoders/graph.yaml")
    graph_cfg = dataclasses.replace(cfg.graph, timezone=cfg.graph.timezone or timezone)
    t0 = time.perf_counter()
    graph = build_cooccurrence_graph(train, graph_cfg)
    t1 = time.perf_counter()
    embeddings = fit_graph_embeddings(graph, cfg.node2vec, progress=False)
    meta = embeddings.metadata
    out = {
        "data": synth,
        "train_events": train.num_events,
        **graph.summary(),
        "graph_build_s": round(t1 - t0, 3),
        "graph_events_per_s": round(train.num_events / max(t1 - t0, 1e-9)),
        "walk": f"{meta['walks']} walks x {cfg.node2vec.walk.walk_length}, p={cfg.node2vec.walk.p}, q={cfg.node2vec.walk.q}",
        "walk_s": meta["walk_seconds"],
        "walk_steps_per_s": meta["walk_steps_per_second"],
        "skipgram_s": meta["skipgram_seconds"],
    }
    logger.info("bench_graph_encoder: %s", out)
    return out


def graph_summary_markdown(out_dir: str | Path, examples: int = 5, neighbours: int = 4) -> str:
    """The saved graph and embeddings in a few lines for the Kubeflow UI: sizes, timings, and the nearest
    behaviours (cosine of node2vec vectors) of the most frequent ones."""
    graph = CooccurrenceGraph.load(out_dir)
    emb = GraphEmbeddings.load(out_dir)
    s = graph.summary()
    origins = {name: int((emb.origin == i).sum()) for i, name in enumerate(ORIGINS)}
    lines = [
        "## Behaviour co-occurrence graph + node2vec",
        "",
        f"- nodes {s['nodes']:,} ({s['connected_nodes']:,} with an edge), edges {s['edges']:,}, mean degree {s['mean_degree']}",
        f"- embedding dim {emb.vectors.shape[1]}; origins {origins}",
        f"- walks {emb.metadata.get('walks', 0):,} ({emb.metadata.get('walk_steps_per_second', 0):,} steps/s), "
        f"skip-gram {emb.metadata.get('skipgram_seconds', 0)} s",
        "",
        "| behaviour | nearest behaviours (cosine) |",
        "|---|---|",
    ]
    unit = emb.vectors / np.maximum(np.linalg.norm(emb.vectors, axis=1, keepdims=True), 1e-12)
    for b in np.argsort(-graph.occurrences, kind="stable")[:examples]:
        sims = unit @ unit[b]
        sims[b] = -np.inf
        near = np.argsort(-sims, kind="stable")[:neighbours]
        lines.append(f"| {emb.behavior_ids[b]} | " + ", ".join(f"{emb.behavior_ids[n]} ({sims[n]:.2f})" for n in near) + " |")
    return "\n".join(lines) + "\n"
