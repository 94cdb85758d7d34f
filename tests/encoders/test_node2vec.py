import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from gts_lum.data.contract import DatasetManifest
from gts_lum.data.ingest import prepare_dataset
from gts_lum.data.validate import load_event_log, validate_dataset
from gts_lum.encoders.cooccurrence import CooccurrenceConfig, CooccurrenceGraph, build_cooccurrence_graph
from gts_lum.encoders.node2vec import (
    ORIGINS,
    BiasedWalker,
    GraphEmbeddings,
    Node2VecConfig,
    SkipGramConfig,
    WalkConfig,
    fill_unseen,
    fit_graph_embeddings,
    random_walks,
    run_graph_encoder,
)
from gts_lum.sequence.dataset import build_sequence_dataset
from gts_lum.sequence.splits import leave_one_out

SMALL_SKIPGRAM = SkipGramConfig(dim=16, window=3, epochs=3)


def king_graph(n: int) -> sp.csr_matrix:
    """n x n grid, each cell linked to its (up to) 8 neighbours, unit weights: triangles everywhere."""
    r, c = np.divmod(np.arange(n * n), n)
    rows, cols = [], []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            ok = ((dr, dc) != (0, 0)) & (r + dr >= 0) & (r + dr < n) & (c + dc >= 0) & (c + dc < n)
            rows.append(np.flatnonzero(ok))
            cols.append((r[ok] + dr) * n + c[ok] + dc)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n * n, n * n))


def random_graph(n: int = 30, isolated=(0, 5), seed: int = 0) -> sp.csr_matrix:
    """Symmetric random weighted graph; the `isolated` nodes have no edge."""
    rng = np.random.default_rng(seed)
    dense = np.triu(rng.random((n, n)) < 0.2, k=1) * rng.uniform(0.1, 5.0, (n, n))
    dense[list(isolated), :] = 0.0
    dense[:, list(isolated)] = 0.0
    return sp.csr_matrix(dense + dense.T)


def as_graph(adj: sp.csr_matrix) -> CooccurrenceGraph:
    adj = sp.csr_matrix(adj, dtype=np.float32)
    adj.sort_indices()
    counts = sp.csr_matrix((np.ones(adj.nnz, np.int64), adj.indices, adj.indptr), shape=adj.shape)
    ids = np.array([f"b{i}" for i in range(adj.shape[0])], dtype=object)
    return CooccurrenceGraph(ids, adj, counts, np.diff(adj.indptr).astype(np.int64), CooccurrenceConfig(timezone="UTC"))


@pytest.mark.parametrize("p, q", [(1.0, 1.0), (0.25, 4.0), (4.0, 0.25)])
def test_walks_follow_edges_and_skip_isolated_nodes(p, q):
    adj = random_graph()
    walks = random_walks(adj, WalkConfig(walks_per_node=3, walk_length=15, p=p, q=q), progress=False)
    connected = np.flatnonzero(np.diff(adj.indptr) > 0)
    assert walks.shape == (3 * len(connected), 15) and walks.dtype == np.int32
    assert (walks >= 0).all()  # undirected: no walk gets stuck
    assert np.array_equal(np.sort(walks[:, 0]), np.sort(np.tile(connected, 3)))  # 3 walks from every connected node
    assert not np.isin(walks, [0, 5]).any()
    steps = np.asarray(adj[walks[:, :-1].ravel(), walks[:, 1:].ravel()]).ravel()
    assert (steps > 0).all()  # every step is along an edge


def test_walks_are_deterministic_by_seed():
    adj = random_graph()
    cfg = WalkConfig(walks_per_node=2, walk_length=10, p=0.5, q=2.0, seed=7)
    first = random_walks(adj, cfg, progress=False)
    assert np.array_equal(first, random_walks(adj, cfg, progress=False))
    other = random_walks(adj, WalkConfig(walks_per_node=2, walk_length=10, p=0.5, q=2.0, seed=8), progress=False)
    assert not np.array_equal(first, other)


def test_walk_ends_at_a_sink_of_a_directed_graph():
    adj = sp.csr_matrix((np.ones(2), ([0, 1], [1, 2])), shape=(3, 3))  # 0 -> 1 -> 2, node 2 has no out-edge
    walks = BiasedWalker(adj, p=0.5, q=2.0).walk(np.array([0]), 5, np.random.default_rng(0))
    assert walks.tolist() == [[0, 1, 2, -1, -1]]


def test_first_order_transitions_match_edge_weights():
    adj = random_graph(seed=3)
    walker = BiasedWalker(adj)
    v = int(np.argmax(np.diff(adj.indptr)))
    nbrs, w = adj[v].indices, adj[v].data
    draws = walker.first_step(np.full(200_000, v), np.random.default_rng(0))
    freq = np.bincount(draws, minlength=adj.shape[0])[nbrs] / len(draws)
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.006)  # ~5 sigma at 200k draws
    # the same through whole walks with p = q = 1 (second-order steps included): empirical transition rows
    walks = random_walks(adj, WalkConfig(walks_per_node=300, walk_length=20), progress=False)
    src, dst = walks[:, :-1].ravel(), walks[:, 1:].ravel()
    counts = sp.csr_matrix((np.ones(len(src)), (src, dst)), shape=adj.shape).toarray()
    busy = counts.sum(axis=1) > 5_000
    expected = adj.toarray() / np.maximum(adj.toarray().sum(axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose((counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))[busy], expected[busy], atol=0.03)


# t=0 -- v=1 (w 1); v's other neighbours: 2 (w 2, also a neighbour of t), 3 (w 3) and 4 (w 0.5), not neighbours of t
BIAS_EDGES = [(0, 1, 1.0), (1, 2, 2.0), (0, 2, 1.0), (1, 3, 3.0), (1, 4, 0.5), (4, 5, 1.0)]


@pytest.mark.parametrize("p, q", [(0.25, 4.0), (4.0, 0.25), (0.5, 0.5), (2.0, 2.0), (1.0, 1.0)])
def test_second_order_step_matches_node2vec_bias(p, q):
    a, b, w = (np.array(x) for x in zip(*BIAS_EDGES))
    adj = sp.csr_matrix((np.concatenate([w, w]), (np.concatenate([a, b]), np.concatenate([b, a]))), shape=(6, 6))
    walker = BiasedWalker(adj, p=p, q=q)
    n = 200_000
    nxt = walker.step(np.zeros(n, np.int64), np.ones(n, np.int64), np.random.default_rng(1))
    weight = np.array([1.0 / p, 0.0, 2.0 * 1.0, 3.0 / q, 0.5 / q, 0.0])  # w(v, x) * alpha(t, x)
    np.testing.assert_allclose(np.bincount(nxt, minlength=6) / n, weight / weight.sum(), atol=0.006)


def _return_rate(walks: np.ndarray) -> float:
    return float((walks[:, 2:] == walks[:, :-2]).mean())


def test_small_p_returns_often():
    adj = king_graph(10)
    rates = [_return_rate(random_walks(adj, WalkConfig(walks_per_node=20, walk_length=20, p=p), progress=False)) for p in (0.1, 1.0, 10.0)]
    # interior node, q = 1: return weight 1/p against 7 other neighbours: 10/17 = 0.59, 1/8, 0.1/7.1 = 0.014
    assert rates[0] > 0.5 and 0.1 < rates[1] < 0.2 and rates[2] < 0.03, rates


def test_small_q_explores_outward():
    n = 15
    adj = king_graph(n)
    outward, spread = [], []
    for q in (0.25, 4.0):
        walks = random_walks(adj, WalkConfig(walks_per_node=20, walk_length=20, q=q), progress=False)
        t, x = walks[:, :-2].ravel(), walks[:, 2:].ravel()
        outward.append(float(((t != x) & (np.asarray(adj[t, x]).ravel() == 0)).mean()))  # x not t and not next to t
        (r0, c0), (r1, c1) = np.divmod(walks[:, 0], n), np.divmod(walks[:, -1], n)
        spread.append(float(np.maximum(abs(r1 - r0), abs(c1 - c0)).mean()))
    assert outward[0] > outward[1] + 0.3, outward
    assert spread[0] > 1.5 * spread[1], spread


def test_embeddings_are_deterministic_and_fall_back():
    adj = sp.lil_matrix(king_graph(5))
    adj.resize((27, 27))  # nodes 25 and 26: no edge
    graph = as_graph(adj.tocsr())
    groups = np.array(["a"] * 10 + ["b"] * 15 + ["a", None], dtype=object)
    cfg = Node2VecConfig(walk=WalkConfig(walks_per_node=4, walk_length=10), skipgram=SMALL_SKIPGRAM)
    first = fit_graph_embeddings(graph, cfg, groups, progress=False)
    second = fit_graph_embeddings(graph, cfg, groups, progress=False)
    assert np.array_equal(first.vectors, second.vectors)
    assert first.vectors.shape == (27, 16) and first.vectors.dtype == np.float32
    assert first.seen.tolist() == [True] * 25 + [False, False]
    assert [ORIGINS[o] for o in first.origin[25:]] == ["family_mean", "zeros"]
    np.testing.assert_allclose(first.vectors[25], first.vectors[:10].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not first.vectors[26].any()
    zeros = fit_graph_embeddings(graph, Node2VecConfig(walk=cfg.walk, skipgram=SMALL_SKIPGRAM, fallback="zeros"), groups, progress=False)
    assert not zeros.vectors[25].any() and ORIGINS[zeros.origin[25]] == "zeros"
    assert first.metadata["walks"] == 4 * 25 and first.metadata["walk_steps"] == 4 * 25 * 9


def test_fill_unseen_hand_computed():
    vectors = np.array([[1.0, 0.0], [3.0, 2.0], [9.0, 9.0], [5.0, 5.0], [7.0, 7.0]], np.float32)
    seen = np.array([True, True, False, True, False])
    out, origin = fill_unseen(vectors, seen, np.array(["x", "x", "x", "y", "z"], dtype=object))
    assert out.tolist() == [[1, 0], [3, 2], [2, 1], [5, 5], [0, 0]]  # row 2: mean of x's seen rows; z has none
    assert [ORIGINS[o] for o in origin] == ["node2vec", "node2vec", "family_mean", "node2vec", "zeros"]


_CHILD = textwrap.dedent(
    """
    import hashlib, sys
    sys.path.insert(0, {tests!r})
    from test_node2vec import SMALL_SKIPGRAM, as_graph, king_graph
    from gts_lum.encoders.node2vec import Node2VecConfig, WalkConfig, fit_graph_embeddings
    cfg = Node2VecConfig(walk=WalkConfig(walks_per_node=2, walk_length=8, p=0.5, q=2.0), skipgram=SMALL_SKIPGRAM)
    print(hashlib.sha256(fit_graph_embeddings(as_graph(king_graph(4)), cfg, progress=False).vectors.tobytes()).hexdigest())
    """
)


def test_embeddings_do_not_depend_on_python_hash_seed():
    # a second interpreter with another string-hash seed than this one must train the same vectors
    hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    script = _CHILD.format(tests=os.path.dirname(__file__))
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cfg = Node2VecConfig(walk=WalkConfig(walks_per_node=2, walk_length=8, p=0.5, q=2.0), skipgram=SMALL_SKIPGRAM)
    here = fit_graph_embeddings(as_graph(king_graph(4)), cfg, progress=False).vectors
    assert done.stdout.strip().splitlines()[-1] == hashlib.sha256(here.tobytes()).hexdigest()


def test_save_load_roundtrip(tmp_path):
    graph = as_graph(king_graph(4))
    emb = fit_graph_embeddings(
        graph, Node2VecConfig(walk=WalkConfig(walks_per_node=2, walk_length=6), skipgram=SMALL_SKIPGRAM), progress=False
    )
    emb.save(tmp_path)
    back = GraphEmbeddings.load(tmp_path)
    assert np.array_equal(back.vectors, emb.vectors) and np.array_equal(back.origin, emb.origin)
    assert back.behavior_ids.tolist() == emb.behavior_ids.tolist()
    assert back.config == emb.config and back.metadata == emb.metadata
    card = yaml.safe_load((tmp_path / "embeddings.yaml").read_text())
    assert card["config"]["walk"]["walk_length"] == 6 and card["metadata"]["graph"]["nodes"] == 16
    assert {"walk_seconds", "walk_steps_per_second", "skipgram_seconds"} <= set(card["metadata"])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"edge \(1, 0\) has -2"):
        BiasedWalker(sp.csr_matrix(np.array([[0.0, 1.0], [-2.0, 0.0]])))
    with pytest.raises(ValueError, match="WalkConfig.p"):
        WalkConfig(p=0.0)
    with pytest.raises(ValueError, match="Node2VecConfig.fallback"):
        Node2VecConfig(fallback="nearest")
    with pytest.raises(ValueError, match="groups has 3 entries"):
        fit_graph_embeddings(as_graph(king_graph(2)), Node2VecConfig(), np.array(["a", "b", "c"]), progress=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    clean = prepare_dataset("synth:tiny", tmp_path_factory.mktemp("synth"), progress=False)
    log = load_event_log(clean)
    behaviors = pd.read_parquet(clean / "behaviors.parquet").set_index("behavior_id").loc[log.behavior_ids.astype(str)].reset_index()
    return log, behaviors, DatasetManifest.read(clean).timezone


def test_incident_bundles_embed_closer_than_random_pairs(synth):
    log, behaviors, timezone = synth
    graph = build_cooccurrence_graph(leave_one_out(log).train, CooccurrenceConfig(timezone=timezone))
    cfg = Node2VecConfig(walk=WalkConfig(walks_per_node=10, walk_length=20), skipgram=SkipGramConfig(dim=32, window=3))
    emb = fit_graph_embeddings(graph, cfg, behaviors["family"].to_numpy(), progress=False)
    unit = emb.vectors / np.maximum(np.linalg.norm(emb.vectors, axis=1, keepdims=True), 1e-12)
    # video incident bundles: stall -> resolution drop -> playback failure of one app, in one interval
    video = behaviors[behaviors["family"] == "incident_video"]
    bundles = [g.index.to_numpy() for _, g in video.groupby("app") if len(g) == 3 and emb.seen[g.index].all()]
    assert len(bundles) >= 10
    pairs = np.array([(b[i], b[j]) for b in bundles for i in range(3) for j in range(i + 1, 3)])
    bundle_cos = (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(axis=1)
    rng = np.random.default_rng(0)
    rand = rng.choice(np.flatnonzero(emb.seen), size=(4000, 2))
    rand = rand[rand[:, 0] != rand[:, 1]]
    random_cos = (unit[rand[:, 0]] * unit[rand[:, 1]]).sum(axis=1)
    assert bundle_cos.mean() > random_cos.mean() + 0.3, (bundle_cos.mean(), random_cos.mean())
    assert (bundle_cos > np.quantile(random_cos, 0.9)).mean() >= 0.9


def _write_hand_dataset(raw):
    """Two users; u0's validation and test targets (X, Y) share an interval with its training event R."""
    raw.mkdir()
    DatasetManifest(name="hand", timezone="Asia/Kolkata").write(raw)
    pd.DataFrame(
        {"behavior_id": list("PQRXYZ"), "description": [f"behaviour {b}" for b in "PQRXYZ"], "family": ["f1", "f1", "f2", "f2", "f2", "f1"]}
    ).to_csv(raw / "behaviors.csv", index=False)
    t = 1_709_251_200  # 2024-03-01 00:00 UTC = 05:30 in Asia/Kolkata
    events = [
        ("u0", t, "P"),
        ("u0", t + 10, "Q"),
        ("u0", t + 900, "R"),
        ("u0", t + 905, "X"),
        ("u0", t + 910, "Y"),
        ("u1", t, "P"),
        ("u1", t + 5, "Q"),
        ("u1", t + 20, "R"),
        ("u1", t + 1800, "P"),
        ("u1", t + 1810, "Q"),
    ]
    pd.DataFrame(events, columns=["user_id", "timestamp", "behavior_id"]).assign(timestamp=lambda f: f["timestamp"].astype(str)).to_csv(
        raw / "events.csv", index=False
    )


def test_stage_reads_training_events_only(tmp_path):
    _write_hand_dataset(tmp_path / "raw")
    validate_dataset(tmp_path / "raw", tmp_path / "clean", progress=False)
    build_sequence_dataset(tmp_path / "clean", tmp_path / "seq")
    overrides = {"node2vec": {"walk": {"walks_per_node": 2, "walk_length": 5}, "skipgram": {"dim": 8, "epochs": 1}}}
    summary = run_graph_encoder(tmp_path / "seq", tmp_path / "out", overrides=overrides)
    graph = CooccurrenceGraph.load(tmp_path / "out")
    emb = GraphEmbeddings.load(tmp_path / "out")
    assert graph.config.timezone == "Asia/Kolkata"  # from the data set
    ids = graph.behavior_ids.tolist()
    edges = {(ids[r], ids[c]) for r, c in zip(*sp.triu(graph.adjacency).nonzero())}
    # u0 trains on P, Q, R only (R alone in its interval); u1's last two events are its targets
    assert edges == {("P", "Q"), ("P", "R"), ("Q", "R")}
    assert {ids[i] for i in np.flatnonzero(emb.seen)} == {"P", "Q", "R"}
    # X and Y (family f2, like R) get R's vector; Z (f1) the mean of P and Q
    vec = dict(zip(ids, emb.vectors))
    np.testing.assert_allclose(vec["X"], vec["R"])
    np.testing.assert_allclose(vec["Z"], (vec["P"] + vec["Q"]) / 2, rtol=1e-5, atol=1e-6)
    assert summary["origins"] == {"node2vec": 3, "family_mean": 3, "zeros": 0}
    with pytest.raises(ValueError, match="fallback_column='segment'"):
        run_graph_encoder(tmp_path / "seq", tmp_path / "out2", overrides={"node2vec": {"fallback_column": "segment"}})


def test_auto_fallback_column_works_on_a_catalog_without_families(cycle_data, tmp_path):
    # the cycle catalog has only behavior_id + description: "auto" falls back to zeros instead of failing
    overrides = {"node2vec": {"walk": {"walks_per_node": 2, "walk_length": 5}, "skipgram": {"dim": 8, "epochs": 1}}}
    summary = run_graph_encoder(cycle_data.root, tmp_path / "out", overrides=overrides)
    origins = summary["origins"]  # hourly events never share an interval: no edges, every vector a fallback
    assert origins["family_mean"] == 0 and origins["zeros"] == 9
