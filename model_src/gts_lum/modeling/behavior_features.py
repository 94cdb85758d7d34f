"""`BehaviorFeatures`: everything the Q-former knows about the N behaviours of a catalog, as plain arrays.

The Q-former (paper section 3.2, Figure 2(b)) reads, per behaviour:
- its semantic ID b^S (the spectral-tree path: one code per level),
- its business embeddings b^E, one per modality (node2vec of the co-occurrence graph, the table
  encoder, ...), each with a flag saying whether the vector was learned or is a fallback (a behaviour
  never seen in the training graph gets its family's mean, say),
- the sentence embedding and the text of its description.

The bundle is built from plain arrays so that each producer (tokenizer, encoders) stays independent of
the Q-former; `__post_init__` checks shapes, dtypes and ranges and names the field at fault.
Any business modality may be missing: `business` can be an empty dict.

`BusinessCodebook` turns business embeddings into discrete business IDs (k-means codes per modality),
the "biz id" tokens of the Table 4 ablation "w txt emb + biz id".

`stand_in_features` builds a bundle from a behaviours table and text embeddings alone (residual
k-means semantic IDs, an attribute-table business embedding): for tests and the benchmark until the
real semantic IDs and encoders are glued in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gts_lum.encoders.node2vec import GraphEmbeddings
from gts_lum.sequence.dataset import SequenceDataset
from gts_lum.tokenizer.semantic_ids import SemanticIds
from gts_lum.tokenizer.text_encoder import encode


@dataclass
class BehaviorFeatures:
    """Inputs of the Q-former for a catalog of N behaviours (row i = behaviour index i of the EventLog)."""

    semantic_ids: np.ndarray  # (N, L) int64, level l code in [0, codebook_sizes[l])
    codebook_sizes: list[int]  # (L,)
    business: dict[str, np.ndarray]  # modality name -> (N, D_m) float32
    business_seen: dict[str, np.ndarray]  # modality -> (N,) bool, False where the embedding is a fallback
    text_embeddings: np.ndarray  # (N, D_t) float32 sentence embeddings of the descriptions
    descriptions: list[str]  # (N,) the behaviour texts

    def __post_init__(self) -> None:
        n = len(self.descriptions)
        self.descriptions = [str(d) for d in self.descriptions]
        self.semantic_ids = np.asarray(self.semantic_ids)
        if self.semantic_ids.ndim != 2 or self.semantic_ids.shape[0] != n:
            raise ValueError(f"BehaviorFeatures.semantic_ids: expected shape ({n}, L), got {self.semantic_ids.shape}")
        if not np.issubdtype(self.semantic_ids.dtype, np.integer):
            raise ValueError(f"BehaviorFeatures.semantic_ids: expected integers, got {self.semantic_ids.dtype}")
        self.semantic_ids = self.semantic_ids.astype(np.int64)
        self.codebook_sizes = [int(s) for s in self.codebook_sizes]
        if len(self.codebook_sizes) != self.semantic_ids.shape[1]:
            raise ValueError(
                f"BehaviorFeatures.codebook_sizes: {len(self.codebook_sizes)} sizes for {self.semantic_ids.shape[1]} semantic-ID levels"
            )
        for level, size in enumerate(self.codebook_sizes):
            codes = self.semantic_ids[:, level]
            bad = np.flatnonzero((codes < 0) | (codes >= size))
            if len(bad):
                raise ValueError(
                    f"BehaviorFeatures.semantic_ids: behaviour {bad[0]} has level-{level} code {codes[bad[0]]} "
                    f"outside [0, {size}) ({len(bad)} rows at fault)"
                )
        self.text_embeddings = _matrix(self.text_embeddings, n, "text_embeddings")
        if set(self.business) != set(self.business_seen):
            raise ValueError(
                f"BehaviorFeatures.business_seen: modalities {sorted(self.business_seen)} differ from business {sorted(self.business)}"
            )
        self.business = {name: _matrix(emb, n, f"business[{name!r}]") for name, emb in self.business.items()}
        for name, seen in list(self.business_seen.items()):
            seen = np.asarray(seen)
            if seen.shape != (n,) or seen.dtype != np.bool_:
                raise ValueError(f"BehaviorFeatures.business_seen[{name!r}]: expected ({n},) bool, got {seen.shape} {seen.dtype}")
            self.business_seen[name] = seen

    @classmethod
    def build(
        cls,
        descriptions: list[str],
        text_embeddings: np.ndarray,
        semantic_ids: np.ndarray | None = None,
        codebook_sizes: list[int] | None = None,
        business: dict[str, np.ndarray] | None = None,
        business_seen: dict[str, np.ndarray] | None = None,
    ) -> BehaviorFeatures:
        """Fill the optional parts: no semantic IDs (L = 0), sizes = max code + 1, every business vector seen."""
        n = len(descriptions)
        ids = np.zeros((n, 0), np.int64) if semantic_ids is None else np.asarray(semantic_ids)
        sizes = codebook_sizes if codebook_sizes is not None else [int(ids[:, l].max()) + 1 for l in range(ids.shape[1])]
        business = dict(business or {})
        seen = {name: np.ones(n, bool) for name in business} | dict(business_seen or {})
        return cls(ids, sizes, business, seen, text_embeddings, list(descriptions))

    @property
    def num_behaviors(self) -> int:
        return len(self.descriptions)

    @property
    def modalities(self) -> list[str]:
        """Business modality names in a fixed (sorted) order: the order of the Q-former's memory tokens."""
        return sorted(self.business)

    def subset(self, idx: np.ndarray) -> BehaviorFeatures:
        """The features of behaviours `idx`, in that order (same codebooks)."""
        idx = np.asarray(idx, np.int64)
        return BehaviorFeatures(
            self.semantic_ids[idx],
            list(self.codebook_sizes),
            {k: v[idx] for k, v in self.business.items()},
            {k: v[idx] for k, v in self.business_seen.items()},
            self.text_embeddings[idx],
            [self.descriptions[i] for i in idx],
        )

    def save(self, path: str | Path) -> None:
        """One .npz (no pickle): business modality m is stored as `business.m` and `business_seen.m`."""
        arrays = {
            "semantic_ids": self.semantic_ids,
            "codebook_sizes": np.asarray(self.codebook_sizes, np.int64),
            "text_embeddings": self.text_embeddings,
            "descriptions": np.asarray(self.descriptions, dtype=str),
        }
        for name in self.modalities:
            arrays[f"business.{name}"] = self.business[name]
            arrays[f"business_seen.{name}"] = self.business_seen[name]
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> BehaviorFeatures:
        with np.load(path, allow_pickle=False) as z:
            names = [k.split(".", 1)[1] for k in z.files if k.startswith("business.")]
            return cls(
                z["semantic_ids"],
                z["codebook_sizes"].tolist(),
                {n: z[f"business.{n}"] for n in names},
                {n: z[f"business_seen.{n}"] for n in names},
                z["text_embeddings"],
                z["descriptions"].tolist(),
            )


def _matrix(array: np.ndarray, n: int, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[0] != n:
        raise ValueError(f"BehaviorFeatures.{what}: expected shape ({n}, D), got {array.shape}")
    if not np.isfinite(array).all():
        row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise ValueError(f"BehaviorFeatures.{what}: behaviour {row} has a non-finite value")
    return array.astype(np.float32, copy=False)


@dataclass
class BusinessCodebook:
    """Discrete business IDs: per modality, the nearest of `num_codes` k-means centroids of its embeddings.

    Fitted on a catalog's embeddings (no user data is involved: the embeddings are already artifacts of
    the training split), then applied to any catalog with the same modalities and dimensions.
    """

    centroids: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (C_m, D_m) float32

    @classmethod
    def fit(cls, features: BehaviorFeatures, num_codes: int, seed: int = 0, modalities: list[str] | None = None) -> BusinessCodebook:
        from sklearn.cluster import KMeans

        out = {}
        for name in modalities if modalities is not None else features.modalities:
            emb = features.business[name]
            k = min(num_codes, len(np.unique(emb, axis=0)))
            out[name] = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(emb).cluster_centers_.astype(np.float32)
        return cls(out)

    def assign(self, features: BehaviorFeatures) -> np.ndarray:
        """(N, M) int64 code of every behaviour in every modality (modalities in codebook order)."""
        codes = []
        for name, centers in self.centroids.items():
            if name not in features.business:
                raise ValueError(f"BusinessCodebook: features lack business modality {name!r} (have {features.modalities})")
            emb = features.business[name]
            # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is constant per row
            dist = (centers**2).sum(1)[None, :] - 2.0 * emb @ centers.T
            codes.append(dist.argmin(1))
        return np.stack(codes, 1).astype(np.int64) if codes else np.zeros((features.num_behaviors, 0), np.int64)


def residual_codes(vectors: np.ndarray, levels: list[int], seed: int = 0) -> np.ndarray:
    """(N, L) residual k-means codes: level l clusters what the centroids of levels < l left unexplained."""
    from sklearn.cluster import KMeans

    residual = np.asarray(vectors, np.float64)
    codes = []
    for level, k in enumerate(levels):
        km = KMeans(n_clusters=min(k, len(np.unique(residual, axis=0))), n_init=2, random_state=seed + level).fit(residual)
        codes.append(km.labels_)
        residual = residual - km.cluster_centers_[km.labels_]
    return np.stack(codes, 1).astype(np.int64) if codes else np.zeros((len(residual), 0), np.int64)


def stand_in_features(
    behaviors: pd.DataFrame,
    text_embeddings: np.ndarray,
    levels: tuple[int, ...] = (16, 8),
    dim: int = 32,
    max_values: int = 1000,
    seed: int = 0,
) -> BehaviorFeatures:
    """Features from a behaviours table alone, standing in for the real tokenizer and encoders (tests, bench).

    semantic IDs: residual k-means of the text embeddings (not the paper's spectral tree);
    business["table"]: one-hot of every attribute column with at most `max_values` values (missing is a
    value of its own), through a fixed random Gaussian projection to `dim` - behaviours that share
    attributes get close vectors, as a table encoder's would.
    """
    columns = [c for c in behaviors.columns if c not in ("behavior_id", "description") and behaviors[c].nunique(dropna=False) <= max_values]
    business, seen = {}, {}
    if columns:  # a catalog without attribute columns has no table modality
        onehot = pd.get_dummies(behaviors[columns].astype("string").fillna("<none>"), dtype=np.float32).to_numpy()
        rng = np.random.default_rng(seed)
        table = onehot @ rng.normal(size=(onehot.shape[1], dim)).astype(np.float32) / np.sqrt(len(columns))
        business, seen = {"table": table.astype(np.float32)}, {"table": np.ones(len(behaviors), bool)}
    sizes = list(levels)
    ids = residual_codes(text_embeddings, sizes, seed)
    return BehaviorFeatures(
        ids,
        [int(ids[:, l].max()) + 1 if len(ids) else k for l, k in enumerate(sizes)],
        business,
        seen,
        text_embeddings,
        behaviors["description"].astype(str).tolist(),
    )


def features_from_artifacts(
    sequences_dir: str | Path,
    semantic_ids_dir: str | Path | None = None,
    graph_dir: str | Path | None = None,
    table_embeddings: str | Path | None = None,
    text_encoder=None,
) -> BehaviorFeatures:
    """The bundle for the catalog of a sequence data set (row i = behaviour index i of its EventLog),
    from the pipeline's artifacts: semantic IDs (tokenizer), node2vec (graph encoder), and behaviour
    table embeddings (an .npz with `behavior_ids`, `vectors`). Any of them may be absent."""

    data = SequenceDataset.load(sequences_dir)
    ids = data.event_log.behavior_ids.astype(str)
    descriptions = data.behaviors()["description"].astype(str).tolist()
    text = text_encoder(descriptions) if text_encoder is not None else encode(descriptions)
    semantic, sizes = None, None
    if semantic_ids_dir is not None:
        sem = SemanticIds.load(semantic_ids_dir)
        semantic, sizes = sem.lookup(ids), sem.codebook_sizes
    business, seen = {}, {}
    if graph_dir is not None:
        graph = GraphEmbeddings.load(graph_dir)
        rows = pd.Index(graph.behavior_ids.astype(str)).get_indexer(ids)
        if (rows < 0).any():
            raise KeyError(
                f"{graph_dir}: {int((rows < 0).sum())} catalog behaviours have no node2vec vector, e.g. {ids[rows < 0][:3].tolist()}"
            )
        business["graph"], seen["graph"] = graph.vectors[rows], graph.seen[rows]
    if table_embeddings is not None:
        with np.load(table_embeddings, allow_pickle=False) as z:
            rows = pd.Index(z["behavior_ids"].astype(str)).get_indexer(ids)
            if (rows < 0).any():
                raise KeyError(f"{table_embeddings}: {int((rows < 0).sum())} catalog behaviours have no table vector")
            business["table"], seen["table"] = z["vectors"][rows].astype(np.float32), np.ones(len(ids), bool)
    return BehaviorFeatures.build(descriptions, text, semantic, sizes, business, seen)
