import dataclasses

import numpy as np
import pandas as pd
import pytest

from gts_lum.data.events import EventLog
from gts_lum.data.ingest import prepare_dataset
from gts_lum.data.validate import load_event_log
from gts_lum.encoders.cooccurrence import (
    CooccurrenceConfig,
    CooccurrenceGraph,
    build_cooccurrence_graph,
    edge_positions,
    user_chunks,
)
from gts_lum.sequence.splits import leave_one_out

CATALOG = np.array(["A", "B", "C", "D", "E", "F"], dtype=object)
IDX = {b: i for i, b in enumerate(CATALOG)}


def _log(rows: list[tuple[str, int, str]], catalog=CATALOG) -> EventLog:
    frame = pd.DataFrame(rows, columns=["user_id", "timestamp", "behavior_id"])
    return EventLog.from_frame(frame, behavior_ids=catalog)


def _edges(graph: CooccurrenceGraph, matrix: str = "adjacency") -> dict[tuple[str, str], float]:
    """Upper-triangle edges as {(a, b): value} with a < b by catalog index."""
    m = getattr(graph, matrix).tocoo()
    ids = graph.behavior_ids
    return {(ids[r], ids[c]): float(v) for r, c, v in zip(m.row, m.col, m.data) if r < c}


# user 0: interval 0 holds A, B, A (repeat), C; interval 1 holds B, D; interval 20 holds E alone.
# user 1: interval 0 holds A, B; interval 1 holds C. F never occurs. UTC, 15-minute intervals.
HAND = [
    ("u0", 0, "A"),
    ("u0", 10, "B"),
    ("u0", 60, "A"),
    ("u0", 120, "C"),
    ("u0", 900, "B"),
    ("u0", 1000, "D"),
    ("u0", 18_000, "E"),
    ("u1", 0, "A"),
    ("u1", 5, "B"),
    ("u1", 1000, "C"),
]


def _cfg(**kw) -> CooccurrenceConfig:
    return CooccurrenceConfig(timezone="UTC", **kw)


def test_same_interval_counts_exact():
    graph = build_cooccurrence_graph(_log(HAND), _cfg())
    expected = {("A", "B"): 2.0, ("A", "C"): 1.0, ("B", "C"): 1.0, ("B", "D"): 1.0}
    assert _edges(graph) == expected
    assert _edges(graph, "counts") == expected
    assert graph.occurrences.tolist() == [2, 3, 2, 1, 1, 0]  # the repeated A in one interval is one occurrence
    assert graph.connected().tolist() == [True, True, True, True, False, False]  # E (alone) and F (never) isolated
    assert graph.num_edges == 4
    assert graph.metadata["pairs"] == 2 * 5  # ordered pairs: both directions of every co-occurrence


def test_inverse_size_weighting_exact():
    graph = build_cooccurrence_graph(_log(HAND), _cfg(weighting="inverse_size"))
    # u0 interval 0 has 3 behaviours: each pair gets 1/2; the 2-behaviour buckets give their pair 1
    assert _edges(graph) == pytest.approx({("A", "B"): 1.5, ("A", "C"): 0.5, ("B", "C"): 0.5, ("B", "D"): 1.0})
    assert _edges(graph, "counts") == {("A", "B"): 2, ("A", "C"): 1, ("B", "C"): 1, ("B", "D"): 1}


def test_window_pairs_neighbouring_intervals_with_decay():
    graph = build_cooccurrence_graph(_log(HAND), _cfg(window=1, window_decay=0.5))
    # same interval: 1 each; one interval apart: 0.5 each (u0: A@0-B@1, A-D, B@0-D@1, C-B@1, C-D; u1: A-C, B-C)
    assert _edges(graph) == pytest.approx(
        {("A", "B"): 2.5, ("A", "C"): 1.5, ("B", "C"): 2.0, ("B", "D"): 1.5, ("A", "D"): 0.5, ("C", "D"): 0.5}
    )
    assert _edges(graph, "counts") == {("A", "B"): 3, ("A", "C"): 2, ("B", "C"): 3, ("B", "D"): 2, ("A", "D"): 1, ("C", "D"): 1}
    assert not graph.connected()[IDX["E"]]  # interval 20 is far from every other


def test_intervals_are_local_time():
    # 00:20 and 00:40 UTC share a UTC hour; in Asia/Kolkata (+05:30) they are 05:50 and 06:10: different hours
    log = _log([("u", 20 * 60, "A"), ("u", 40 * 60, "B")])
    utc = build_cooccurrence_graph(log, CooccurrenceConfig(timezone="UTC", interval_minutes=60))
    kolkata = build_cooccurrence_graph(log, CooccurrenceConfig(timezone="Asia/Kolkata", interval_minutes=60))
    assert _edges(utc) == {("A", "B"): 1.0}
    assert _edges(kolkata) == {}


def test_dst_fall_back_repeated_hour_shares_intervals():
    # Europe/Berlin 2024-10-27: 02:00-03:00 local happens twice (00:00-01:00 UTC in CEST, 01:00-02:00 UTC in CET)
    t0 = 1729987200  # 2024-10-27 00:00 UTC = 02:00 CEST
    log = _log([("u", t0 + 600, "C"), ("u", t0 + 3000, "A"), ("u", t0 + 3900, "B"), ("u", t0 + 4200, "C")])
    graph = build_cooccurrence_graph(log, CooccurrenceConfig(timezone="Europe/Berlin"))
    # C at 02:10 CEST, B at 02:05 CET and C again at 02:10 CET share the 02:00 interval; A (02:50 CEST) is alone
    assert _edges(graph) == {("B", "C"): 1.0}
    assert graph.occurrences[IDX["C"]] == 1  # both C events are one occurrence though the time IDs went back


def test_min_count_prunes_on_counts():
    graph = build_cooccurrence_graph(_log(HAND), _cfg(min_count=2))
    assert _edges(graph) == {("A", "B"): 2.0}


def test_max_bucket_size_skips_big_buckets():
    graph = build_cooccurrence_graph(_log(HAND), _cfg(max_bucket_size=2))
    assert _edges(graph) == {("A", "B"): 1.0, ("B", "D"): 1.0}  # u0's 3-behaviour interval is skipped
    assert graph.metadata["skipped_buckets"] == 1


def test_ppmi_matches_dense_formula():
    graph_raw = build_cooccurrence_graph(_log(HAND), _cfg(window=1))
    dense = graph_raw.adjacency.toarray().astype(np.float64)
    for alpha in (1.0, 0.75):
        graph = build_cooccurrence_graph(_log(HAND), _cfg(window=1, reweight="ppmi", ppmi_alpha=alpha))
        r = dense.sum(axis=1)
        p_joint = dense / dense.sum()
        p_alpha = r**alpha / (r**alpha).sum()
        with np.errstate(divide="ignore", invalid="ignore"):  # isolated E, F: 0 / 0
            expected = np.maximum(np.log(p_joint / np.outer(p_alpha, p_alpha)), 0.0)
        expected[dense == 0] = 0.0
        np.testing.assert_allclose(graph.adjacency.toarray(), expected, rtol=1e-5, atol=1e-6)
        assert (graph.adjacency.data > 0).all()  # PPMI-zero edges are dropped, not stored
        assert graph.num_edges < graph_raw.num_edges  # the test must be able to see the pruning


# hub H with A (3 intervals), B (2), C (1); A-B once: interval 0 = {H, A, B}, 1-2 = {H, A}, 3 = {H, B}, 4 = {H, C}
STAR = np.array(["H", "A", "B", "C"], dtype=object)
STAR_ROWS = [("u", 900 * i + j, b) for i, bucket in enumerate(["HAB", "HA", "HA", "HB", "HC"]) for j, b in enumerate(bucket)]


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("union", {("H", "A"): 3.0, ("H", "B"): 2.0, ("H", "C"): 1.0}),  # everyone's top-1 is H, H's is A
        ("mutual", {("H", "A"): 3.0}),
    ],
)
def test_top_k_rules(rule, expected):
    graph = build_cooccurrence_graph(_log(STAR_ROWS, STAR), _cfg(top_k=1, top_k_rule=rule))
    assert _edges(graph) == expected
    full = build_cooccurrence_graph(_log(STAR_ROWS, STAR), _cfg())
    assert _edges(full)[("A", "B")] == 1.0  # A-B exists before the cap


def test_validation_and_test_targets_do_not_leak():
    # u0's last two events (validation target X, test target Y) share interval 1 with the training event R
    catalog = np.array(["P", "Q", "R", "X", "Y"], dtype=object)
    rows = [("u0", 0, "P"), ("u0", 10, "Q"), ("u0", 900, "R"), ("u0", 905, "X"), ("u0", 910, "Y")]
    log = _log(rows, catalog)
    split = leave_one_out(log)
    assert catalog[split.valid.target].tolist() == ["X"] and catalog[split.test.target].tolist() == ["Y"]
    leaky = _edges(build_cooccurrence_graph(log, _cfg()))
    clean = _edges(build_cooccurrence_graph(split.train, _cfg()))
    assert {("R", "X"), ("R", "Y"), ("X", "Y")} <= set(leaky)  # built on everything, the targets would add edges
    assert clean == {("P", "Q"): 1.0}
    with_window = _edges(build_cooccurrence_graph(split.train, _cfg(window=2)))
    assert not {k for k in with_window if "X" in k or "Y" in k}


@pytest.fixture(scope="module")
def synth_train(tmp_path_factory):
    clean = prepare_dataset("synth:tiny", tmp_path_factory.mktemp("synth"), progress=False)
    return leave_one_out(load_event_log(clean)).train


def test_chunking_does_not_change_the_graph(synth_train):
    cfg = _cfg(window=1, weighting="inverse_size")
    whole = build_cooccurrence_graph(synth_train, cfg)
    chunked = build_cooccurrence_graph(synth_train, dataclasses.replace(cfg, chunk_events=5_000, chunk_pairs=7_000))
    assert len(user_chunks(synth_train.offsets, 5_000)) > 10
    assert (whole.counts != chunked.counts).nnz == 0
    np.testing.assert_allclose(whole.adjacency.toarray(), chunked.adjacency.toarray(), rtol=1e-6)


def test_graph_invariants_on_simulator(synth_train):
    for cfg in (_cfg(), _cfg(reweight="ppmi", min_count=2, top_k=20), _cfg(top_k=5, top_k_rule="mutual")):
        graph = build_cooccurrence_graph(synth_train, cfg)
        adj = graph.adjacency
        assert (adj != adj.T).nnz == 0  # exactly symmetric
        assert adj.diagonal().sum() == 0  # no self loops
        assert (adj.indptr == graph.counts.indptr).all() and (adj.indices == graph.counts.indices).all()
        assert (adj.data > 0).all() and (graph.counts.data >= cfg.min_count).all()
        if cfg.top_k_rule == "mutual" and cfg.top_k:
            assert graph.degree().max() <= cfg.top_k
    # occurrences are the distinct (user, interval, behaviour) triples
    assert graph.occurrences.sum() == graph.metadata["occurrences"] < synth_train.num_events


def test_save_load_roundtrip_and_networkx(tmp_path):
    graph = build_cooccurrence_graph(_log(HAND), _cfg(window=1))
    graph.save(tmp_path)
    back = CooccurrenceGraph.load(tmp_path)
    assert (back.adjacency != graph.adjacency).nnz == 0 and (back.counts != graph.counts).nnz == 0
    assert back.behavior_ids.tolist() == CATALOG.tolist()
    assert back.occurrences.tolist() == graph.occurrences.tolist()
    assert back.config == graph.config and back.metadata == graph.metadata
    nx_graph = graph.to_networkx()
    assert set(nx_graph.nodes) == set(CATALOG)  # isolated behaviours are nodes too
    assert nx_graph.number_of_edges() == graph.num_edges
    assert nx_graph["A"]["B"] == {"weight": 2.5, "count": 3}
    assert nx_graph.nodes["B"]["occurrences"] == 3


def test_edge_positions_lookup():
    graph = build_cooccurrence_graph(_log(HAND), _cfg())
    pos = edge_positions(graph.adjacency, np.array([0, 1, 4]), np.array([1, 0, 5]))
    assert pos[2] == -1
    assert graph.adjacency.data[pos[0]] == graph.adjacency.data[pos[1]] == 2.0


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="weighting"):
        _cfg(weighting="jaccard")
    with pytest.raises(ValueError, match="window_decay"):
        _cfg(window_decay=0.0)
    with pytest.raises(ValueError, match="timezone"):
        CooccurrenceConfig(timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="CooccurrenceConfig: .*interval_minutes=7 must divide a day"):
        _cfg(interval_minutes=7)
    with pytest.raises(ValueError, match="timezone is None"):
        build_cooccurrence_graph(_log(HAND), CooccurrenceConfig())
