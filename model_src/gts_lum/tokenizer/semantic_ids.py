"""Semantic IDs: behaviour_id -> fixed-length code tuple from the spectral tree (paper section 3.2, b_j^S).

A behaviour's semantic ID is the root-to-leaf path of its description's embedding in the spectral
tree, plus a collision suffix that numbers the behaviours sharing a leaf (the most central first), so
IDs are unique and all have `depth + 1` codes. Semantically close behaviours share ID prefixes.

The artifact (`SemanticIds.save`) is a folder, no pickle:

    tokenizer.yaml     version, encoder identity, codebook sizes per level, tree config, counts
    semantic_ids.npz   behavior_ids (U), codes (N, depth + 1) int32, leaf (N,) tree node of each behaviour
    tree.npz           the spectral tree: node arrays and centroids (gts_lum.tokenizer.spectral_tree)
    summary.md         the top levels of the tree with example descriptions (Kubeflow UI)

`version` is a content hash of ids, codes, tree and encoder identity: Feast features and the scorer
record it and refuse to mix artifacts. A behaviour that appears after training gets an ID without a
rebuild (`SemanticIds.extend`): it descends the tree by nearest child centroid and takes the next free
suffix of its leaf; the existing IDs never change (the version does).

    ids = build_semantic_ids(behaviors_frame, load_config(TokenizerConfig, "pkg:tokenizer/default.yaml"))
    ids.lookup(["ott.video.cinebox.film.5g"])  # (1, depth + 1) int32, e.g. [[1, 0, 3, 2]]
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from gts_lum.config import load_config, to_dict
from gts_lum.data.contract import read_table
from gts_lum.tokenizer.spectral_tree import SpectralTree, SpectralTreeConfig, build_spectral_tree, unit_rows
from gts_lum.tokenizer.text_encoder import TextEncoder, TextEncoderConfig, get_encoder

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1


@dataclass
class TokenizerConfig:
    """The semantic tokenizer: text encoder + spectral tree + the UI summary."""

    encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    tree: SpectralTreeConfig = field(default_factory=SpectralTreeConfig)
    summary_levels: int = 2  # tree levels shown in summary.md
    summary_examples: int = 3  # example descriptions per branch


def leaf_suffixes(x: np.ndarray, leaf: np.ndarray, tree: SpectralTree) -> np.ndarray:
    """Collision suffix of each row: its rank within its leaf by distance to the leaf centroid. (N,) int32"""
    dist = ((unit_rows(x) - tree.centroid[leaf]) ** 2).sum(axis=1)
    order = np.lexsort((np.arange(len(leaf)), dist, leaf))
    starts = np.searchsorted(leaf[order], leaf[order], side="left")  # first position of each row's leaf group
    suffix = np.empty(len(leaf), dtype=np.int32)
    suffix[order] = np.arange(len(leaf)) - starts
    return suffix


def _ids_array(behavior_ids: Sequence, what: str) -> np.ndarray:
    ids = np.asarray([str(b) for b in behavior_ids], dtype=str)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{what}: behaviour id {str(uniq[counts > 1][0])!r} appears {int(counts[counts > 1][0])} times")
    return ids


def semantic_id_prefixes(codes: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(N, levels) semantic IDs -> (N, levels) index of each row's level-l prefix codes[:, :l+1] among the
    catalog's distinct prefixes of that length, and the number of those per level. (Depends on the
    catalog only: a saved model rebuilds the same tables from its saved features.)"""
    index = np.zeros(codes.shape, np.int64)
    sizes = []
    for level in range(codes.shape[1]):
        uniq, inverse = np.unique(codes[:, : level + 1], axis=0, return_inverse=True)
        index[:, level] = inverse.reshape(-1)
        sizes.append(len(uniq))
    return index, sizes


SEMANTIC_ID_TABLES = ("prefix", "code")


def semantic_id_table_rows(semantic_ids: np.ndarray, codebook_sizes: Sequence[int], mode: str) -> tuple[np.ndarray, list[int]]:
    """The row of each behaviour in each level's embedding table, and the tables' sizes.

    prefix (the paper's semantic ID: the tree nodes on the root-to-leaf path): one row per distinct prefix
        of each length, so the last level is the behaviour's own (`semantic_id_prefixes`);
    code: one row per (level, code); codes are numbered within their parent, so a row is shared by every
        node of that level with that number (an ablation).
    """
    if mode not in SEMANTIC_ID_TABLES:
        raise ValueError(f"semantic-ID tables {mode!r}: use one of {SEMANTIC_ID_TABLES}")
    codes = np.asarray(semantic_ids, np.int64)
    return semantic_id_prefixes(codes) if mode == "prefix" else (codes, [int(n) for n in codebook_sizes])


@dataclass
class SemanticIds:
    """The tokenizer artifact: one semantic ID per behaviour, and the tree that made them."""

    behavior_ids: np.ndarray  # (N,) str
    codes: np.ndarray  # (N, depth + 1) int32: tree path, then the collision suffix
    leaf: np.ndarray  # (N,) int64: tree node of each behaviour
    tree: SpectralTree
    encoder_identity: str
    tree_config: dict = field(default_factory=dict)
    _row: dict | None = field(default=None, repr=False, compare=False)

    @property
    def id_length(self) -> int:
        return self.tree.depth + 1

    @property
    def codebook_sizes(self) -> list[int]:
        """Distinct codes each position can take: tree levels 1..depth, then the suffix."""
        return self.tree.codebook_sizes() + [int(self.codes[:, -1].max(initial=0)) + 1]

    @property
    def version(self) -> str:
        """Content hash (16 hex): equal versions mean the same IDs, tree and text encoder."""
        digest = hashlib.sha256(f"gts-lum semantic ids v{ARTIFACT_FORMAT}\0{self.encoder_identity}\0".encode())
        digest.update("\n".join(self.behavior_ids.tolist()).encode())
        for array in (self.codes.astype(np.int32), self.leaf.astype(np.int64), *self.tree.to_arrays().values()):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def rows(self, behavior_ids: Sequence) -> np.ndarray:
        """Row of each behaviour id; KeyError naming the first unknown ids. (N,) int64"""
        if self._row is None:
            self._row = {b: i for i, b in enumerate(self.behavior_ids.tolist())}
        keys = [str(b) for b in behavior_ids]
        rows = np.fromiter((self._row.get(b, -1) for b in keys), dtype=np.int64, count=len(keys))
        if (rows < 0).any():
            unknown = [keys[i] for i in np.flatnonzero(rows < 0)[:5]]
            raise KeyError(
                f"semantic ids {self.version}: {int((rows < 0).sum())} unknown behaviour id(s), e.g. {unknown}; add them with extend()"
            )
        return rows

    def lookup(self, behavior_ids: Sequence) -> np.ndarray:
        """Semantic IDs of `behavior_ids`. (N, depth + 1) int32"""
        return self.codes[self.rows(behavior_ids)]

    def extend(self, behavior_ids: Sequence, embeddings: np.ndarray) -> SemanticIds:
        """A new artifact with IDs for behaviours not seen at build time; known ids keep their IDs.

        `embeddings` (N, D) must come from the same text encoder (`extend_texts` checks that).
        New behaviours sharing a leaf take its next free suffixes in input order.
        """
        ids = _ids_array(behavior_ids, "extend")
        if len(embeddings) != len(ids):
            raise ValueError(f"extend: {len(ids)} behaviour ids but {len(embeddings)} embeddings")
        known = np.isin(ids, self.behavior_ids)
        new_ids, x = ids[~known], np.asarray(embeddings)[~known]
        if not len(new_ids):
            return self
        leaf = self.tree.descend(x)
        next_free = np.zeros(self.tree.num_nodes, dtype=np.int64)
        np.maximum.at(next_free, self.leaf, self.codes[:, -1].astype(np.int64) + 1)
        order = np.lexsort((np.arange(len(leaf)), leaf))
        rank = np.empty(len(leaf), dtype=np.int64)
        rank[order] = np.arange(len(leaf)) - np.searchsorted(leaf[order], leaf[order], side="left")
        codes = np.concatenate([self.tree.path_codes(leaf), (next_free[leaf] + rank)[:, None]], axis=1).astype(np.int32)
        log.info("semantic ids: %d new behaviours placed in %d leaves", len(new_ids), len(np.unique(leaf)))
        return dataclasses.replace(
            self,
            behavior_ids=np.concatenate([self.behavior_ids, new_ids]),
            codes=np.concatenate([self.codes, codes]),
            leaf=np.concatenate([self.leaf, leaf]),
            _row=None,
        )

    def extend_texts(self, behavior_ids: Sequence, texts: Sequence[str], encoder: TextEncoder) -> SemanticIds:
        """`extend` from descriptions, encoded by `encoder`, which must be the one the tree was built with."""
        if encoder.identity != self.encoder_identity:
            raise ValueError(f"extend_texts: encoder {encoder.identity!r} differs from the tree's {self.encoder_identity!r}")
        return self.extend(behavior_ids, encoder.encode(texts))

    def card(self) -> dict:
        return {
            "format": ARTIFACT_FORMAT,
            "version": self.version,
            "encoder_identity": self.encoder_identity,
            "num_behaviors": len(self.behavior_ids),
            "id_length": self.id_length,
            "codebook_sizes": self.codebook_sizes,
            "num_nodes": self.tree.num_nodes,
            "num_leaves": int((self.tree.num_children == 0).sum()),
            "tree_config": self.tree_config,
        }

    def save(self, out_dir: str | Path, summary: str | None = None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "semantic_ids.npz", behavior_ids=self.behavior_ids, codes=self.codes, leaf=self.leaf)
        np.savez(out / "tree.npz", **self.tree.to_arrays())
        if summary is not None:
            (out / "summary.md").write_text(summary)
        (out / "tokenizer.yaml").write_text(yaml.safe_dump(self.card(), sort_keys=False))
        return out

    @classmethod
    def load(cls, path: str | Path) -> SemanticIds:
        """Read a saved artifact and check its content against the recorded version."""
        root = Path(path)
        card_path = root / "tokenizer.yaml"
        if not card_path.exists():
            raise FileNotFoundError(f"{root}: no tokenizer.yaml (not a semantic-ids artifact)")
        card = yaml.safe_load(card_path.read_text())
        if card.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{card_path}: format {card.get('format')!r}, this code reads format {ARTIFACT_FORMAT}")
        with np.load(root / "semantic_ids.npz", allow_pickle=False) as ids, np.load(root / "tree.npz", allow_pickle=False) as tree:
            out = cls(
                behavior_ids=ids["behavior_ids"],
                codes=ids["codes"],
                leaf=ids["leaf"],
                tree=SpectralTree.from_arrays(dict(tree)),
                encoder_identity=card["encoder_identity"],
                tree_config=card.get("tree_config", {}),
            )
        if out.version != card["version"]:
            raise ValueError(
                f"{root}: content hash {out.version} does not match the recorded version {card['version']} (files edited or mixed)"
            )
        return out

    def summary_markdown(
        self, descriptions: Sequence[str], embeddings: np.ndarray | None = None, levels: int = 2, examples: int = 3
    ) -> str:
        """The top `levels` levels of the tree as Markdown, with example descriptions per branch.

        Examples are the members closest to the branch centroid when `embeddings` (aligned with
        `behavior_ids`) are given, else the most central member of each of the branch's largest leaves.
        """
        texts = np.asarray([str(d) for d in descriptions], dtype=object)
        if len(texts) != len(self.behavior_ids):
            raise ValueError(f"summary: {len(texts)} descriptions for {len(self.behavior_ids)} behaviours")
        anc = self.tree.ancestors(self.leaf)  # (N, depth + 1)
        lines = [
            f"# Semantic IDs `{self.version}`",
            "",
            f"- behaviours: {len(self.behavior_ids)}; ID length: {self.id_length} (tree depth {self.tree.depth} + collision suffix)",
            f"- codebook sizes per level: {self.codebook_sizes}",
            f"- text encoder: `{self.encoder_identity}`",
            f"- tree: {self.tree.num_nodes} nodes, {int((self.tree.num_children == 0).sum())} leaves",
            "",
        ]

        def examples_of(node: int) -> str:
            members = np.flatnonzero(anc[:, self.tree.level[node]] == node)
            if embeddings is not None:
                dist = ((unit_rows(embeddings[members]) - self.tree.centroid[node]) ** 2).sum(1)
                pick = members[np.argsort(dist, kind="stable")[:examples]]
            else:
                leaf_size = self.tree.size[self.leaf[members]]
                pick = members[np.lexsort((members, -leaf_size, self.codes[members, -1]))[:examples]]
            return "; ".join(d.replace("|", "/").replace("\n", " ") for d in texts[pick])

        def prefix(node: int) -> str:
            return "-".join(map(str, self.tree.path_codes(np.array([node]))[0, : self.tree.level[node]]))

        frontier = [0]
        for lvl in range(1, min(levels, self.tree.depth) + 1):
            lines += [f"## Level {lvl}", "", "| ID prefix | behaviours | examples |", "|---|---:|---|"]
            nxt = []
            for node in frontier:
                children = range(self.tree.first_child[node], self.tree.first_child[node] + self.tree.num_children[node])
                for child in children:
                    lines.append(f"| `{prefix(child)}` | {self.tree.size[child]} | {examples_of(child)} |")
                nxt += list(children)
            lines.append("")
            frontier = nxt
        return "\n".join(lines)


def build_semantic_ids(
    behaviors: pd.DataFrame, cfg: TokenizerConfig | None = None, encoder: TextEncoder | None = None, progress: bool = True
) -> tuple[SemanticIds, np.ndarray]:
    """Semantic IDs of a behaviours table (behavior_id, description): (artifact, embeddings (N, D) in its row order).

    Rows are sorted by behaviour id first, so the result does not depend on the table's row order.
    """
    cfg = cfg or TokenizerConfig()
    for column in ("behavior_id", "description"):
        if column not in behaviors.columns:
            raise ValueError(f"behaviours table: missing column {column!r} (have {list(behaviors.columns)})")
    table = behaviors.assign(behavior_id=behaviors["behavior_id"].astype(str)).sort_values("behavior_id", kind="stable")
    missing = table["description"].isna() | (table["description"].astype(str).str.strip() == "")
    if missing.any():
        raise ValueError(
            f"behaviours table: behaviour {table['behavior_id'][missing].iloc[0]!r} has no description ({int(missing.sum())} such rows)"
        )
    ids = _ids_array(table["behavior_id"], "behaviours table")
    encoder = encoder or get_encoder(cfg.encoder)
    x = encoder.encode(table["description"].astype(str).tolist())
    tree, leaf = build_spectral_tree(x, cfg.tree, progress=progress)
    codes = np.concatenate([tree.path_codes(leaf), leaf_suffixes(x, leaf, tree)[:, None]], axis=1).astype(np.int32)
    out = SemanticIds(behavior_ids=ids, codes=codes, leaf=leaf, tree=tree, encoder_identity=encoder.identity, tree_config=to_dict(cfg.tree))
    return out, x


def tokenize_dataset(
    dataset_dir: str | Path,
    out_dir: str | Path,
    config: str | None = "pkg:tokenizer/default.yaml",
    overrides: list[str] | dict | None = None,
    progress: bool = True,
) -> dict:
    """Pipeline stage: the clean data set's behaviours table -> the semantic-ids artifact in `out_dir`."""

    cfg = load_config(TokenizerConfig, config, overrides)
    behaviors = read_table(dataset_dir, "behaviors", columns=["behavior_id", "description"])
    if behaviors is None:
        raise FileNotFoundError(f"{dataset_dir}: no behaviors table")
    encoder = get_encoder(cfg.encoder)
    hits_before, t0 = encoder.stats.hits, time.perf_counter()
    ids, x = build_semantic_ids(behaviors, cfg, encoder, progress)
    descriptions = behaviors.set_index(behaviors["behavior_id"].astype(str))["description"].loc[ids.behavior_ids]
    summary = ids.summary_markdown(descriptions.tolist(), x, cfg.summary_levels, cfg.summary_examples)
    ids.save(out_dir, summary)
    card = ids.card() | {"cache_hits": encoder.stats.hits - hits_before, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("semantic ids %s: %d behaviours, codebooks %s -> %s", card["version"], card["num_behaviors"], card["codebook_sizes"], out_dir)
    return card
