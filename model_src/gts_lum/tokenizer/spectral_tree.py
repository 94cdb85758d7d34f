"""Spectral-clustering tree over behaviour embeddings (paper section 3.2, Figure 2(c)).

"These embeddings are then converted to an adjacency matrix, followed by a standard spectral clustering
algorithm. The clustering result can be formulated as a spectral tree, where the node sequence of the
path from the root to a leaf is defined as the semantic ID of the corresponding behavior."

Steps, at every node of the tree (recursively, breadth first):
  1. Affinity: a sparse symmetric k-nearest-neighbour graph on cosine similarity among the node's
     members (exact kNN by blocked matrix products; never a dense N x N matrix). Edge weights use the
     self-tuning kernel w_ij = exp(-d_ij^2 / (s_i s_j)) (Zelnik-Manor & Perona, 2004), d the chordal
     distance of unit vectors and s_i the distance to i's `scale_neighbor`-th neighbour, so dense and
     sparse regions of the embedding space get comparable contrast.
  2. Disconnected kNN graphs are joined along a minimum spanning tree of their components' centroids,
     one weak edge between component medoids per tree edge. Spectral clustering then cuts the weakest
     joins first and groups nearby components together, instead of seeing an arbitrary basis of a
     degenerate null space.
  3. Spectral embedding: the top `branching` eigenvectors of D^-1/2 W D^-1/2 (= the bottom of the
     normalized Laplacian), by ARPACK on the sparse matrix (dense `eigh` for small nodes); rows scaled to
     unit length (Ng, Jordan & Weiss, 2001), then k-means into `branching` children.
  4. Children are numbered by size (largest first, ties by first member), so code 0 is the main branch.
A node stops early (becomes a leaf above the last level) when it has fewer than `branching` members or
k-means finds a single cluster in it. Every node keeps the centroid of its members, so a behaviour
added later descends the tree by nearest child centroid without rebuilding it (`SpectralTree.descend`).

Determinism: members are processed in input order, and every random choice (ARPACK start vector,
k-means initialisation) is seeded from (seed, node index).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, fields

import numpy as np
import scipy.sparse as sp
import torch
from scipy.linalg import eigh
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree
from scipy.sparse.linalg import eigsh
from sklearn.cluster import KMeans
from threadpoolctl import ThreadpoolController  # a scikit-learn dependency
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

_KNN_BLOCK_FLOATS = 1 << 25  # similarity block budget (128 MiB of fp32) for the exact kNN search
_MIN_WEIGHT = 1e-12  # edge weights stay strictly positive: an underflowed kernel must not drop an edge
# Below this many members a node is clustered on one thread: BLAS/OpenMP start-up and spin-waits cost
# more than the work there (15x slower on a busy 2-core machine), and most nodes of a tree are small.
_SINGLE_THREAD_BELOW = 4096


@dataclass
class SpectralTreeConfig:
    """The tree's shape and the clustering at each node."""

    branching: int = 8  # children per node: the codebook size of every clustered level
    depth: int = 3  # clustered levels; a semantic ID has depth + 1 codes (the last: collision suffix)
    knn: int = 10  # neighbours per behaviour in the affinity graph
    scale_neighbor: int = 7  # local kernel scale: distance to this neighbour (capped at knn)
    kmeans_restarts: int = 4  # k-means runs on the spectral embedding; the best inertia wins
    dense_below: int = 512  # nodes with fewer members use a dense eigensolver (exact and faster there)
    block_rows: int = 2048  # most query rows per block of the exact kNN search
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "seed" else 2 if f.name == "branching" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"spectral tree config {f.name}: expected an integer >= {low}, got {value!r}")


@functools.lru_cache(maxsize=1)
def _threadpools() -> ThreadpoolController:
    """The process's BLAS/OpenMP thread pools, found once (finding them scans the loaded libraries)."""
    return ThreadpoolController()


def unit_rows(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """Rows scaled to unit length, float32 (N, D); zero or non-finite rows are an error naming the row."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (N, D), got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise ValueError(f"{what}: row {bad[0]} has non-finite values ({len(bad)} such rows)")
    norms = np.linalg.norm(x, axis=1)
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise ValueError(f"{what}: row {zero[0]} is all zeros and has no direction ({len(zero)} such rows)")
    return np.ascontiguousarray(x / norms[:, None])


def exact_knn(x: np.ndarray, k: int, block_rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar other rows of each unit row: (sims (N, k) float32 descending, idx (N, k) int64).

    Blocked matrix products keep memory at one (block, N) similarity slab; self-matches are excluded.
    """
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"kNN: need 1 <= k < N, got k={k}, N={n}")
    rows = max(1, min(block_rows, _KNN_BLOCK_FLOATS // n))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = xt[start:stop] @ xt.T  # (B, N)
        block[torch.arange(stop - start), torch.arange(start, stop)] = -torch.inf
        top = torch.topk(block, k, dim=1)
        sims[start:stop], idx[start:stop] = top.values.numpy(), top.indices.numpy()
    return sims, idx


def _kernel(d2: np.ndarray, scale_i: np.ndarray, scale_j: np.ndarray) -> np.ndarray:
    """Self-tuning Gaussian weight of squared distances d2 between points with local scales s_i, s_j."""
    return np.maximum(np.exp(-d2 / np.sqrt(scale_i * scale_j)), _MIN_WEIGHT)


def knn_graph(x: np.ndarray, k: int = 10, scale_neighbor: int = 7, block_rows: int = 2048) -> tuple[sp.csr_matrix, np.ndarray]:
    """Sparse symmetric kNN affinity of unit rows `x`, no self loops: (W (N, N) csr float64, local scales (N,)).

    i and j are joined when either is among the other's k nearest (union), weight by `_kernel`.
    """
    n = len(x)
    k = min(k, n - 1)
    sims, idx = exact_knn(x, k, block_rows)
    d2 = np.clip(2.0 - 2.0 * sims.astype(np.float64), 0.0, None)  # squared chordal distance of unit vectors
    # A floor keeps exact duplicates (distance 0 to the scale neighbour) from dividing by zero.
    scale = np.maximum(d2[:, min(scale_neighbor, k) - 1], 1e-6)
    weights = _kernel(d2, scale[:, None], scale[idx])
    graph = sp.csr_matrix((weights.ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    return graph.maximum(graph.T).tocsr(), scale


def connect_components(graph: sp.csr_matrix, x: np.ndarray, scale: np.ndarray, k: int = 10) -> sp.csr_matrix:
    """Join the connected components of `graph` into one, along a minimum spanning tree of their centroids.

    Each spanning-tree edge adds one edge between the two components' medoids (the members closest to
    their centroids), weighted by the same kernel as the kNN edges: far components get weak joins.
    """
    n_comp, labels = connected_components(graph, directed=False)
    if n_comp == 1:
        return graph
    n = len(x)
    member_of = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(n_comp, n))
    centroids = unit_rows(np.asarray(member_of @ x), "component centroids")
    closeness = np.einsum("nd,nd->n", x, centroids[labels])
    by_comp = np.lexsort((-closeness, labels))
    medoid = by_comp[np.searchsorted(labels[by_comp], np.arange(n_comp))]
    # The centroids' own kNN graph is connected the same way: each of its components has >= 2 members,
    # so every recursion at least halves the number of components.
    cgraph, _ = knn_graph(centroids, k, k)
    cgraph = connect_components(cgraph, centroids, np.ones(n_comp), k)  # only its edges matter, not their weights
    cdist = cgraph.tocoo()
    distance = 1.0 + 1e-9 - np.einsum("ed,ed->e", centroids[cdist.row], centroids[cdist.col])  # > 0: MST skips zeros
    tree = minimum_spanning_tree(sp.csr_matrix((distance, (cdist.row, cdist.col)), shape=cgraph.shape)).tocoo()
    a, b = medoid[tree.row], medoid[tree.col]
    d2 = np.clip(2.0 - 2.0 * np.einsum("ed,ed->e", x[a], x[b]).astype(np.float64), 0.0, None)
    w = _kernel(d2, scale[a], scale[b])
    bridges = sp.csr_matrix((np.concatenate([w, w]), (np.concatenate([a, b]), np.concatenate([b, a]))), shape=graph.shape)
    log.debug("joined %d kNN components with %d bridge edges", n_comp, len(a))
    return (graph + bridges).tocsr()


def spectral_partition(x: np.ndarray, n_clusters: int, cfg: SpectralTreeConfig, seed: int) -> np.ndarray:
    """Cluster unit rows `x` into at most `n_clusters` groups; labels (N,) int64, 0 = largest group."""
    n = len(x)
    graph, scale = knn_graph(x, cfg.knn, cfg.scale_neighbor, cfg.block_rows)
    graph = connect_components(graph, x, scale, cfg.knn)
    inv_sqrt_degree = 1.0 / np.sqrt(np.asarray(graph.sum(axis=1)).ravel())
    affinity = sp.diags(inv_sqrt_degree) @ graph @ sp.diags(inv_sqrt_degree)  # D^-1/2 W D^-1/2, eigenvalues in [-1, 1]
    rng = np.random.default_rng(seed)
    if n < max(cfg.dense_below, 2 * n_clusters + 1):
        _, vectors = eigh(affinity.toarray(), subset_by_index=[n - n_clusters, n - 1])
    else:
        _, vectors = eigsh(affinity, k=n_clusters, which="LA", v0=rng.uniform(-1.0, 1.0, n), tol=1e-6)
    embedding = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    kmeans = KMeans(n_clusters=n_clusters, n_init=cfg.kmeans_restarts, random_state=int(rng.integers(2**31 - 1)))
    labels = kmeans.fit_predict(embedding)
    # Canonical numbering: by size (largest first), then by first member; empty clusters vanish.
    sizes = np.bincount(labels, minlength=n_clusters)
    first = np.full(n_clusters, n)
    np.minimum.at(first, labels, np.arange(n))
    used = np.flatnonzero(sizes)
    order = used[np.lexsort((first[used], -sizes[used]))]
    relabel = np.empty(n_clusters, dtype=np.int64)
    relabel[order] = np.arange(len(order))
    return relabel[labels]


@dataclass
class SpectralTree:
    """The fitted tree, nodes in breadth-first order (root = 0; a node's children are contiguous).

    Arrays over nodes (M,): `parent` (-1 at the root), `level` (root 0), `code` (position among its
    parent's children), `size` (members at build time), `first_child` (-1 at leaves), `num_children`;
    `centroid` (M, D) float32, the mean of the node's unit member vectors.
    """

    parent: np.ndarray
    level: np.ndarray
    code: np.ndarray
    size: np.ndarray
    first_child: np.ndarray
    num_children: np.ndarray
    centroid: np.ndarray
    depth: int
    branching: int

    ARRAYS = ("parent", "level", "code", "size", "first_child", "num_children", "centroid")

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def dimension(self) -> int:
        return int(self.centroid.shape[1])

    def codebook_sizes(self) -> list[int]:
        """Codes used at each clustered level 1..depth (early-stopped branches are padded with code 0)."""
        return [int(self.code[self.level == lvl].max(initial=0)) + 1 for lvl in range(1, self.depth + 1)]

    def ancestors(self, nodes: np.ndarray) -> np.ndarray:
        """Node index at each level 0..depth on the root path of each node; -1 below it. (N, depth + 1)"""
        nodes = np.asarray(nodes, dtype=np.int64)
        out = np.full((len(nodes), self.depth + 1), -1, dtype=np.int64)
        cur = nodes.copy()
        for _ in range(self.depth + 1):  # levels, not behaviours
            live = cur >= 0
            out[live, self.level[cur[live]]] = cur[live]
            cur[live] = self.parent[cur[live]]
        return out

    def path_codes(self, nodes: np.ndarray) -> np.ndarray:
        """Codes of levels 1..depth on the root path of each node, 0 below an early-stopped leaf. (N, depth) int32"""
        anc = self.ancestors(nodes)[:, 1:]
        return np.where(anc >= 0, self.code[np.maximum(anc, 0)], 0).astype(np.int32)

    def descend(self, x: np.ndarray) -> np.ndarray:
        """Leaf reached by each row of `x` (N, D), taking the nearest child centroid at every level. (N,) int64"""
        x = unit_rows(x, "descend embeddings")
        if x.shape[1] != self.dimension:
            raise ValueError(f"descend: embeddings have dimension {x.shape[1]}, the tree {self.dimension}")
        node = np.zeros(len(x), dtype=np.int64)
        for lvl in range(1, self.depth + 1):
            active = np.flatnonzero(self.num_children[node] > 0)
            if not len(active):
                break
            cand = np.flatnonzero(self.level == lvl)  # (C,) every node of this level
            c = self.centroid[cand]
            dist = (c * c).sum(1)[None, :] - 2.0 * (x[active] @ c.T)  # (A, C) squared distance minus |x|^2
            dist[self.parent[cand][None, :] != node[active][:, None]] = np.inf  # only children of the current node
            node[active] = cand[np.argmin(dist, axis=1)]
        return node

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.ARRAYS} | {"shape": np.array([self.depth, self.branching])}

    @classmethod
    def from_arrays(cls, arrays) -> SpectralTree:
        missing = [n for n in (*cls.ARRAYS, "shape") if n not in arrays]
        if missing:
            raise ValueError(f"spectral tree arrays: missing {missing}")
        depth, branching = (int(v) for v in arrays["shape"])
        return cls(**{n: np.asarray(arrays[n]) for n in cls.ARRAYS}, depth=depth, branching=branching)


def build_spectral_tree(
    embeddings: np.ndarray, cfg: SpectralTreeConfig | None = None, progress: bool = True
) -> tuple[SpectralTree, np.ndarray]:
    """Fit the tree on `embeddings` (N, D): (tree, leaf node of each row (N,) int64)."""
    cfg = cfg or SpectralTreeConfig()
    x = unit_rows(embeddings)
    n = len(x)
    if n == 0:
        raise ValueError("spectral tree: no embeddings to cluster")
    parent, level, code, members = [-1], [0], [0], [np.arange(n)]
    first_child: list[int] = []
    num_children: list[int] = []
    leaf = np.full(n, -1, dtype=np.int64)
    t0 = time.perf_counter()
    bar = tqdm(total=n * cfg.depth, desc="spectral tree", unit="row", disable=not progress)
    node = 0
    while node < len(parent):  # breadth first: children are appended in code order, so they are contiguous
        rows = members[node]
        labels = None
        if level[node] < cfg.depth and len(rows) >= cfg.branching:
            seed = int(np.random.SeedSequence([cfg.seed, node]).generate_state(1)[0])
            with _threadpools().limit(limits=1 if len(rows) < _SINGLE_THREAD_BELOW else None):
                labels = spectral_partition(x[rows], cfg.branching, cfg, seed)
            if labels.max() == 0:  # nothing to split (e.g. identical vectors): an early leaf
                labels = None
        if labels is None:
            leaf[rows] = node
            first_child.append(-1)
            num_children.append(0)
            bar.update(len(rows) * (cfg.depth - level[node]))
        else:
            first_child.append(len(parent))
            num_children.append(int(labels.max()) + 1)
            order = np.argsort(labels, kind="stable")
            bounds = np.searchsorted(labels[order], np.arange(num_children[-1] + 1))
            for child in range(num_children[-1]):  # at most `branching` children
                parent.append(node)
                level.append(level[node] + 1)
                code.append(child)
                members.append(rows[order[bounds[child] : bounds[child + 1]]])
            bar.update(len(rows))
        node += 1
    bar.close()
    size = np.array([len(m) for m in members], dtype=np.int64)
    member_of = sp.csr_matrix(
        (np.ones(int(size.sum())), (np.repeat(np.arange(len(members)), size), np.concatenate(members))), shape=(len(members), n)
    )
    centroid = np.asarray(member_of @ x, dtype=np.float64)
    tree = SpectralTree(
        parent=np.array(parent, dtype=np.int64),
        level=np.array(level, dtype=np.int64),
        code=np.array(code, dtype=np.int64),
        size=size,
        first_child=np.array(first_child, dtype=np.int64),
        num_children=np.array(num_children, dtype=np.int64),
        centroid=(centroid / size[:, None]).astype(np.float32),
        depth=cfg.depth,
        branching=cfg.branching,
    )
    log.info(
        "spectral tree: %d rows, %d nodes, %d leaves, codebooks %s, %.1fs",
        n,
        tree.num_nodes,
        int((tree.num_children == 0).sum()),
        tree.codebook_sizes(),
        time.perf_counter() - t0,
    )
    return tree, leaf


def clustered_embeddings(n: int, dim: int = 384, clusters: int = 64, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Synthetic unit vectors around `clusters` random directions (benchmarks and tests). (n, dim) float32"""
    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.standard_normal((clusters, dim)))
    noise = rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    return unit_rows(centers[rng.integers(clusters, size=n)] + noise)


def bench_spectral_tree(
    sizes: tuple[int, ...] = (10_000,), dim: int = 384, clusters: int = 256, cfg: SpectralTreeConfig | None = None
) -> list[dict]:
    """Tree build time on clustered synthetic embeddings (text encoding excluded). Figures, not assertions."""
    cfg = cfg or SpectralTreeConfig()
    out = []
    for n in sizes:
        x = clustered_embeddings(n, dim, clusters)
        t0 = time.perf_counter()
        exact_knn(x, cfg.knn, cfg.block_rows)
        t1 = time.perf_counter()
        tree, _ = build_spectral_tree(x, cfg, progress=False)
        t2 = time.perf_counter()
        out.append(
            {
                "behaviors": n,
                "dim": dim,
                "branching": cfg.branching,
                "depth": cfg.depth,
                "root_knn_s": round(t1 - t0, 2),
                "tree_s": round(t2 - t1, 2),
                "nodes": tree.num_nodes,
                "codebook_sizes": tree.codebook_sizes(),
            }
        )
        log.info("bench spectral tree: %s", out[-1])
    return out
