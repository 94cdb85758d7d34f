"""Spectral tree: exact sparse kNN graph, component joining, cluster recovery, tree invariants, descent."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from gts_lum.tokenizer.spectral_tree import (
    SpectralTree,
    SpectralTreeConfig,
    build_spectral_tree,
    clustered_embeddings,
    connect_components,
    exact_knn,
    knn_graph,
    spectral_partition,
    unit_rows,
)


def blobs(sizes: list[int], dim: int = 32, spread: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in well-separated groups around orthogonal axes: (x, group of each row)."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(len(sizes)), sizes)
    x = np.eye(dim, dtype=np.float32)[group] + rng.standard_normal((len(group), dim)).astype(np.float32) * spread / np.sqrt(dim)
    return unit_rows(x), group


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming of the labels."""
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


# --------------------------------------------------------------------------- kNN graph


def test_exact_knn_matches_brute_force_and_ignores_blocking():
    x = unit_rows(np.random.default_rng(1).standard_normal((57, 16)))
    sims, idx = exact_knn(x, 5, block_rows=7)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    want = np.argsort(-full, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(sims, np.take_along_axis(full, want, 1), rtol=1e-5)
    sims2, idx2 = exact_knn(x, 5, block_rows=4096)
    np.testing.assert_array_equal(idx2, idx)
    with pytest.raises(ValueError, match="1 <= k < N"):
        exact_knn(x, 57)


def test_knn_graph_is_sparse_symmetric_without_self_loops():
    x = unit_rows(np.random.default_rng(2).standard_normal((200, 24)))
    graph, scale = knn_graph(x, k=6, scale_neighbor=4)
    assert sp.issparse(graph) and graph.shape == (200, 200)
    assert graph.nnz <= 2 * 6 * 200  # union of kNN lists, never dense
    assert abs(graph - graph.T).max() == 0
    assert graph.diagonal().max() == 0
    assert (np.diff(graph.indptr) >= 6).all()  # each row keeps at least its own k neighbours
    assert graph.data.min() > 0 and graph.data.max() <= 1
    _, idx = exact_knn(x, 6)
    assert all(graph[i, j] > 0 for i, j in zip(np.repeat(np.arange(200), 6)[::37], idx.ravel()[::37]))
    assert scale.shape == (200,) and (scale > 0).all()


def test_connect_components_joins_along_a_spanning_tree():
    x, group = blobs([30, 30, 30, 30], spread=0.05)
    graph, scale = knn_graph(x, k=5)
    n_before, labels = connected_components(graph, directed=False)
    assert n_before >= 4  # far groups are separate kNN components
    joined = connect_components(graph, x, scale, k=5)
    assert connected_components(joined, directed=False)[0] == 1
    added = (joined - graph).tocoo()
    assert added.nnz == 2 * (n_before - 1)  # one symmetric edge per spanning-tree edge
    assert abs(joined - joined.T).max() == 0 and joined.diagonal().max() == 0
    assert (labels[added.row] != labels[added.col]).all()  # bridges only cross components


# --------------------------------------------------------------------------- clustering


def test_spectral_partition_recovers_separated_groups_largest_first():
    x, group = blobs([80, 50, 35, 20], spread=0.3)
    labels = spectral_partition(x, 4, SpectralTreeConfig(branching=4, dense_below=16), seed=0)  # sparse eigsh path
    assert same_partition(labels, group)
    np.testing.assert_array_equal(labels, group)  # canonical numbering: the largest group is code 0
    dense = spectral_partition(x, 4, SpectralTreeConfig(branching=4), seed=0)  # dense eigh path
    np.testing.assert_array_equal(dense, group)


def test_tree_invariants_and_determinism():
    x = clustered_embeddings(1200, dim=48, clusters=30, seed=3)
    cfg = SpectralTreeConfig(branching=4, depth=3, seed=7)
    tree, leaf = build_spectral_tree(x, cfg, progress=False)
    n = len(x)
    assert tree.parent[0] == -1 and tree.level[0] == 0 and tree.size[0] == n
    internal = np.flatnonzero(tree.num_children > 0)
    for node in internal:  # children contiguous, numbered 0.., sizes add up
        kids = np.arange(tree.first_child[node], tree.first_child[node] + tree.num_children[node])
        assert (tree.parent[kids] == node).all() and (tree.code[kids] == np.arange(len(kids))).all()
        assert tree.size[kids].sum() == tree.size[node] and (np.diff(tree.size[kids]) <= 0).all()
    assert (tree.num_children <= cfg.branching).all() and tree.level.max() == cfg.depth
    assert (tree.num_children[leaf] == 0).all()
    np.testing.assert_array_equal(np.bincount(leaf, minlength=tree.num_nodes), np.where(tree.num_children == 0, tree.size, 0))
    # the centroid of a node is the mean of its members
    members = tree.ancestors(leaf)[:, 2] == tree.first_child[tree.first_child[0]]
    np.testing.assert_allclose(tree.centroid[tree.first_child[tree.first_child[0]]], x[members].mean(0), atol=1e-5)
    codes = tree.path_codes(leaf)
    assert codes.shape == (n, 3) and codes.dtype == np.int32
    assert tree.codebook_sizes() == [4, 4, 4]
    assert (codes.max(0) < np.array(tree.codebook_sizes())).all()
    # determinism: the same seed rebuilds the same tree
    tree2, leaf2 = build_spectral_tree(x, cfg, progress=False)
    np.testing.assert_array_equal(leaf2, leaf)
    for name, array in tree.to_arrays().items():
        np.testing.assert_array_equal(tree2.to_arrays()[name], array)
    # round trip through plain arrays (what the artifact stores)
    again = SpectralTree.from_arrays(tree.to_arrays())
    np.testing.assert_array_equal(again.path_codes(leaf), codes)


def test_small_nodes_stop_early_and_are_padded_with_zero_codes():
    x, group = blobs([6, 6, 2], dim=16)
    tree, leaf = build_spectral_tree(x, SpectralTreeConfig(branching=3, depth=3), progress=False)
    codes = tree.path_codes(leaf)
    assert same_partition(codes[:, 0], group)
    pair = tree.first_child[0] + 2  # the group of 2 (< branching 3), numbered last by size
    assert tree.size[pair] == 2 and tree.num_children[pair] == 0 and tree.level[pair] == 1
    np.testing.assert_array_equal(codes[group == 2], [[2, 0, 0], [2, 0, 0]])
    lone, lone_leaf = build_spectral_tree(x[:2], SpectralTreeConfig(branching=3, depth=2), progress=False)
    assert lone.num_nodes == 1 and (lone_leaf == 0).all() and (lone.path_codes(lone_leaf) == 0).all()
    assert lone.codebook_sizes() == [1, 1]


def test_disconnected_catalogue_groups_nearby_components_together():
    # Six tight groups, each its own kNN component, in three pairs: a pair's groups are near each other.
    # Without joining components the spectral embedding is an arbitrary basis of a 6-dimensional null
    # space and pairs get torn apart; joined along the centroid spanning tree, each pair stays one branch.
    dim, group = 16, np.repeat(np.arange(6), 40)
    centers = np.zeros((6, dim), dtype=np.float32)
    for p in range(3):
        centers[2 * p, p] = centers[2 * p + 1, p] = 1.0
        centers[2 * p, 3 + p], centers[2 * p + 1, 3 + p] = 0.5, -0.5
    noise = np.random.default_rng(0).standard_normal((len(group), dim)).astype(np.float32) * 0.005
    x = unit_rows(centers[group] + noise)
    assert connected_components(knn_graph(x, 10)[0], directed=False)[0] == 6
    for seed in range(3):
        tree, leaf = build_spectral_tree(x, SpectralTreeConfig(branching=3, depth=2, seed=seed), progress=False)
        assert same_partition(tree.path_codes(leaf)[:, 0], group // 2)


def test_descend_places_new_points_with_their_nearest_neighbours():
    x = clustered_embeddings(1500, dim=48, clusters=40, spread=0.5, seed=4)
    train, new = x[:1400], x[1400:]
    tree, leaf = build_spectral_tree(train, SpectralTreeConfig(branching=4, depth=3), progress=False)
    got = tree.descend(new)
    assert (tree.num_children[got] == 0).all()
    nearest = np.argmax(new @ train.T, axis=1)
    want = tree.path_codes(leaf[nearest])
    have = tree.path_codes(got)
    assert (have[:, 0] == want[:, 0]).mean() >= 0.95
    assert (have == want).all(axis=1).mean() >= 0.7
    # a training point descends to its own leaf (its centroid path) in nearly every case
    assert (tree.descend(train[:300]) == leaf[:300]).mean() >= 0.9
    with pytest.raises(ValueError, match="dimension 47"):
        tree.descend(new[:, :47])


def test_bad_embeddings_and_config_are_named():
    x = unit_rows(np.random.default_rng(0).standard_normal((20, 8)))
    x[13] = 0
    with pytest.raises(ValueError, match="row 13 is all zeros"):
        build_spectral_tree(x, progress=False)
    x[13] = np.nan
    with pytest.raises(ValueError, match="row 13 has non-finite"):
        build_spectral_tree(x, progress=False)
    with pytest.raises(ValueError, match="branching: expected an integer >= 2"):
        SpectralTreeConfig(branching=1)
    with pytest.raises(ValueError, match="2-D"):
        build_spectral_tree(np.ones(5), progress=False)
