"""GTS-LUM: the Q-former's behaviour embeddings in a target-aware LLM decoder (paper sections 3.2-3.3).

Decoder input of one case (left to right; `[..]` optional):

    [target c | task t]  [profile]  [compressed history: W windows x Q tokens]  recent history  [target c]
     front placement                                                             end placement

- recent history: the timestamp process's tokens (`TokenSequences`): each behaviour as its fused
  embedding b^F (`adapter.fuse` plus, by default, its semantic-ID code embeddings; computed once per
  unique behaviour of a step), interval descriptors
  ("weekday evening rush hour") as text embeddings projected to the decoder width (sentence encoder
  for the from-config decoder, the LLM's own word embeddings when pretrained), [SEP] as a learned
  vector; the Table 3 variants add time-component embeddings (HLLM-style) or share position IDs.
- compressed history: events older than the token budget, cut into windows of K consecutive
  behaviours (oldest first) and compressed by the Q-former to Q tokens each (`adapter.compress`).
- profile: the user's attribute-table embedding (table encoder), projected; a learned vector when the
  user has no row. One leading token: it conditions everything after it.
- target: a learned placeholder t plus the candidate's b^F (no time, no descriptor) scaled by a learned
  gate g that starts at 0 (`GTSLUMNetConfig.target_gate_init`). For label heads a learned task token
  takes the target's place, so one mechanism serves next behaviour and heterogeneous labels.
- position IDs: consecutive over the real tokens (the "position" variant: shared inside an interval).

Scoring, defined:

    score(user, c) = cosine( h_last([t + g b^F_c, history]), P b^F_c ) / temperature

with h_last the decoder's last hidden state (the user embedding), P a learned projection, and c FIRST
in the sequence. The target-agnostic score is the same with the plain sequence (no target token):
one decoder pass per user ranks the whole catalog, while the target-aware score costs one pass per
(user, candidate). `two_stage_scores` retrieves with the first and re-ranks the top N with the second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from gts_lum.data.events import EventLog, ragged_arange
from gts_lum.modeling.decoder import DecoderConfig, build_decoder, compiled_last_hidden_states, last_hidden_states, word_embedder
from gts_lum.modeling.qformer import BehaviorAdapter
from gts_lum.sequence.tokens import TokenKind, TokenSequences
from gts_lum.tokenizer.semantic_ids import SEMANTIC_ID_TABLES, semantic_id_table_rows

TARGET_PLACEMENTS = ("front", "end", "none")
SEMANTIC_ID_EMBEDDINGS = (*SEMANTIC_ID_TABLES, "none")
PAD_KIND = -1
COMPONENT_SIZES = (64, 13, 32, 24, 60, 60)  # year (mod 64), month, day, hour, minute, second


@dataclass
class CompressorConfig:
    enabled: bool = True  # compress history older than the token budget (Table 4 "w/o compressor": False)
    windows: int = 4  # W: most windows per case (the oldest history beyond W x K events is dropped)
    window_size: int = 16  # K behaviours per window (<= QFormerConfig.max_window)


@dataclass
class GTSLUMNetConfig:
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    target_placement: str = "front"  # front (GTS-LUM) | end | none (Table 5)
    profile_token: bool = True
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    temperature: float = 0.07  # initial; learned (as a log scale, clamped to >= 0.01)
    tasks: list[str] = field(default_factory=list)  # label tasks with a learned front token each
    # False: the Q-former stays as phase I left it and only its decoder projection trains; b^F before
    # the projection is then computed once for the catalog instead of every step (several times faster
    # on CPU). The paper trains the Q-former in phase II: True.
    adapter_trainable: bool = True
    # b^F += a sum of learned semantic-ID embeddings, one per level (`tokenizer.semantic_ids.semantic_id_table_rows`):
    #   prefix: one vector per tree node on the behaviour's root-to-leaf path, the paper's semantic ID; the
    #           last level (the collision suffix) makes the full ID, so every behaviour has a vector of its
    #           own beside those it shares with its subtree;
    #   code:   one vector per (level, code): codes are numbered within their parent, so code 3 of level 2
    #           is one vector under every parent and behaviours cannot be told apart (an ablation);
    #   none:   the paper's Q-former-only b^F (a from-scratch Q-former makes every behaviour look alike at
    #           first, mean cosine ~0.85, and learns slowly on CPU budgets).
    semantic_id_embedding: str = "prefix"
    # The target token is t + gate * b^F_c: a learned placeholder t plus the candidate scaled by a learned
    # scalar gate that starts at `target_gate_init`. The placeholder sets the token's scale, so the
    # decoder's first norm cannot undo a small gate (with the plain gate * b^F_c it did: any gate above
    # ~1e-3 let the whole candidate in); at 0 the target-aware pass is the agnostic one with a constant
    # leading token, and the candidate enters as far as the gate learns it helps. 1.0 with
    # `target_gate_trainable: false`: the candidate at full strength from the start.
    target_gate_init: float = 0.0
    target_gate_trainable: bool = True
    # a frozen adapter's catalog b^F (before its projection) minus the catalog mean (see `_adapter_fuse`)
    center_frozen_features: bool = True
    # dropout on the decoder's input embeddings while training (SASRec's embedding dropout): a from-scratch
    # decoder over a few hundred users' histories overfits them within a few epochs without it
    input_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.target_placement not in TARGET_PLACEMENTS:
            raise ValueError(f"target_placement {self.target_placement!r}: use one of {TARGET_PLACEMENTS}")
        if not 0.0 <= self.input_dropout < 1.0:
            raise ValueError(f"input_dropout must be in [0, 1), got {self.input_dropout}")
        if self.semantic_id_embedding not in SEMANTIC_ID_EMBEDDINGS:
            raise ValueError(f"semantic_id_embedding {self.semantic_id_embedding!r}: use one of {SEMANTIC_ID_EMBEDDINGS}")
        if self.compressor.windows < 0 or self.compressor.window_size < 1:
            raise ValueError(f"compressor: windows >= 0 and window_size >= 1, got {self.compressor}")


@dataclass
class SequenceBatch:
    """Decoder-ready arrays of B cases (numpy, built by `make_batch`; `to(device)` gives tensors)."""

    users: np.ndarray  # (B,) user index (profile lookup)
    kind: np.ndarray  # (B, L) int64 TokenKind, PAD_KIND under left padding
    value: np.ndarray  # (B, L) int64 behaviour index / descriptor id
    position: np.ndarray  # (B, L) int64 position id within the recent history
    components: np.ndarray | None  # (B, L, 6) int64 local time components ("component" variant)
    windows: np.ndarray  # (N_w, K) int64 behaviour index of compressed windows
    window_mask: np.ndarray  # (N_w, K) bool real entries
    window_case: np.ndarray  # (N_w,) int64 case of each window
    window_slot: np.ndarray  # (N_w,) int64 slot 0..W-1, oldest first
    next_event: np.ndarray  # (B, L) int64 behaviour of the log event right after each behaviour token, -1
    # where none inside the case's history (other tokens, the last behaviour): the inner prefixes' targets

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class CatalogCache:
    """What scoring reads of the catalog whatever the request (`GTSLUMNetwork.catalog_cache`): valid while
    the weights do not change (a served model computes it once per load)."""

    behaviors: torch.Tensor  # (N,) int64 every behaviour index, 0..N-1 (sorted)
    fused: torch.Tensor  # (N, H) their b^F
    items: torch.Tensor  # (N, H) their unit vectors P b^F, the scored side
    descriptors: torch.Tensor  # (n_desc, H) the descriptor table projected to the decoder width


@dataclass
class DecoderContext:
    """Everything of B cases that does not depend on the target (`GTSLUMNetwork.context`): computed once,
    reused for every candidate placed in front or at the end."""

    behaviors: torch.Tensor  # (U,) int64 sorted unique behaviour indices whose b^F the context holds
    fused: torch.Tensor  # (U, H) their b^F
    prefix: torch.Tensor  # (B, P, H) the tokens before the recent history: [profile] compressed windows
    prefix_mask: torch.Tensor  # (B, P) bool real prefix tokens
    history: torch.Tensor  # (B, L, H) the recent history's token embeddings (left padded)
    history_mask: torch.Tensor  # (B, L) bool real history tokens
    history_position: torch.Tensor  # (B, L) int64 position id within the recent history
    items: torch.Tensor | None = None  # (U, H) unit vectors P b^F, where the context was read from a `CatalogCache`

    def __len__(self) -> int:
        return len(self.history)

    def index(self, behaviors: torch.Tensor) -> torch.Tensor:
        """Rows of `behaviors` (any shape) in `self.behaviors`; KeyError for one the context does not hold."""
        behaviors = behaviors.contiguous()  # e.g. a column slice of a re-ranking list (searchsorted copies otherwise)
        pos = torch.searchsorted(self.behaviors, behaviors)
        n = len(self.behaviors)
        if bool((pos >= n).any()) or not bool((self.behaviors[pos.clamp(max=n - 1)] == behaviors).all()):
            raise KeyError("behaviour not in the context: pass it as extra_behaviors to context()")
        return pos


@dataclass
class Phase2Objective:
    """The phase II objective's settings (`GTSLUMNetwork.forward`), fixed for a run: built once by
    `training.phase2.Phase2Task` and passed with each step's tensors."""

    hard_negatives: int  # target-aware negatives per case (each one decoder pass); 0: no target-aware term
    agnostic_weight: float = 1.0
    aware_weight: float = 1.0
    allowed_targets: torch.Tensor | None = None  # (num_behaviors,) bool: which behaviours may be targets; None: all
    # the hard negatives come from the agnostic top `hard_negative_pool`; None: every target candidate of
    # the batch (the trainer passes the re-ranking list size)
    hard_negative_pool: int | None = None
    target_frequency: torch.Tensor | None = None  # (num_behaviors,) share of the training targets: logQ correction
    pool_size: int | None = None  # how many behaviours `sampled` is drawn from (uniformly, with replacement)
    in_batch_negatives: int | None = None  # None: every prefix's target is a column; N: N of them drawn


def make_batch(tokens: TokenSequences, log_: EventLog, history_end: np.ndarray, compressor: CompressorConfig) -> SequenceBatch:
    """Left-pad the token sequences of B cases and cut their older history into compressor windows.

    `tokens` must have been built from `log_` (its `source_row`s index it) with `history_end` the
    cases' exclusive history ends. Older history = the user's events before the first behaviour the
    budget kept; its most recent W x K events become W windows of K (a partial window is the oldest).
    """
    b = len(tokens)
    lengths = tokens.lengths()
    width = max(int(lengths.max()) if b else 0, 1)
    rows = np.repeat(np.arange(b), lengths)
    cols = ragged_arange(width - lengths, lengths)
    kind = np.full((b, width), PAD_KIND, np.int64)
    value = np.zeros((b, width), np.int64)
    position = np.zeros((b, width), np.int64)
    kind[rows, cols] = tokens.kind
    value[rows, cols] = np.maximum(tokens.value, 0)
    position[rows, cols] = tokens.position
    components = None
    if tokens.components is not None:
        components = np.zeros((b, width, 6), np.int64)
        comp = tokens.components.astype(np.int64)
        comp[:, 0] %= COMPONENT_SIZES[0]
        components[rows, cols] = comp
    # first log row the budget kept, per case (history_end when no behaviour was kept)
    first_kept = np.asarray(history_end, np.int64).copy()
    is_behavior = tokens.kind == TokenKind.BEHAVIOR
    np.minimum.at(first_kept, rows[is_behavior], tokens.source_row[is_behavior])
    w, k = (compressor.windows, compressor.window_size) if compressor.enabled else (0, compressor.window_size)
    user_start = log_.offsets[tokens.users].astype(np.int64)
    slot = np.arange(w)
    hi = first_kept[:, None] - (w - 1 - slot)[None] * k  # (B, W) exclusive end of each window
    idx = hi[:, :, None] - k + np.arange(k)[None, None]  # (B, W, K)
    mask = idx >= user_start[:, None, None]
    keep = mask.any(-1)  # (B, W)
    case, slot_of = np.nonzero(keep)
    win_idx, win_mask = idx[keep], mask[keep]
    windows = log_.behavior[np.where(win_mask, win_idx, 0)].astype(np.int64) if len(win_idx) else np.zeros((0, k), np.int64)
    # the event that really came next, not the next token: the interval cap and the dedup drop events,
    # and a prefix trained to skip them would learn another task than scoring asks (the next event)
    next_event = np.full((b, width), -1, np.int64)
    nxt = tokens.source_row[is_behavior] + 1
    inside = nxt < np.asarray(history_end, np.int64)[rows[is_behavior]]
    next_event[rows[is_behavior][inside], cols[is_behavior][inside]] = log_.behavior[nxt[inside]]
    return SequenceBatch(
        users=tokens.users.astype(np.int64),
        kind=kind,
        value=value,
        position=position,
        components=components,
        windows=windows,
        window_mask=win_mask,
        window_case=case,
        window_slot=slot_of,
        next_event=next_event,
    )


def inclusion_log_q(frequency: torch.Tensor, draws: int, uniform_draws: int, pool: int) -> torch.Tensor:
    """log q per candidate, q its chance to be among a step's columns: `draws` picks by popularity
    (`frequency`, each behaviour's share of the targets) and `uniform_draws` uniform picks from `pool`."""
    miss = (1.0 - frequency).pow(draws) * (1.0 - 1.0 / pool) ** uniform_draws
    return torch.log1p(-miss).clamp_min(-30.0)


class GTSLUMNetwork(nn.Module):
    """Adapter (Q-former) + projections + the decoder. See the module docstring for the input layout."""

    def __init__(
        self,
        cfg: GTSLUMNetConfig,
        adapter: BehaviorAdapter,
        descriptor_texts: list[str],
        descriptor_embeddings: np.ndarray | None,
        user_vectors: np.ndarray | None,
        semantic_ids: np.ndarray | None = None,
        codebook_sizes: list[int] | None = None,
    ):
        """`descriptor_embeddings`: sentence embeddings of `descriptor_texts` (from-config decoder) or None
        to use the pretrained decoder's word embeddings. `user_vectors`: (num_users, D_u) profile table
        (NaN rows: no profile) or None. `semantic_ids` (num_behaviors, levels) and `codebook_sizes`: the
        catalog's semantic IDs, for `cfg.semantic_id_embedding`."""
        super().__init__()
        self.cfg = cfg
        self.decoder, self.decoder_info = build_decoder(cfg.decoder)
        h = self.decoder_info.hidden_size
        self.hidden_size = h
        if adapter.cfg.decoder_hidden_size != h:
            raise ValueError(
                f"adapter projects to {adapter.cfg.decoder_hidden_size}, the decoder is {h} wide: set qformer.decoder_hidden_size"
            )
        self.adapter = adapter
        if descriptor_embeddings is None:
            embed = word_embedder(cfg.decoder, self.decoder)
            if embed is None:
                raise ValueError("descriptor_embeddings are required with the from-config decoder (it knows no words)")
            table = embed(list(descriptor_texts)).cpu().numpy()
        else:
            table = np.asarray(descriptor_embeddings, np.float32)
        self.register_buffer("descriptor_table", torch.as_tensor(table, dtype=torch.float32))  # (n_desc, D_d)
        self.descriptor_projection = nn.Linear(table.shape[1], h)
        if table.shape[1] == h and cfg.decoder.pretrained:
            with torch.no_grad():  # the LLM's own word space: start from the identity
                self.descriptor_projection.weight.copy_(torch.eye(h))
                self.descriptor_projection.bias.zero_()
        self.sep = nn.Parameter(torch.randn(h) * 0.02)
        self.components = nn.ModuleList(nn.Embedding(n, h) for n in COMPONENT_SIZES)
        for emb in self.components:
            nn.init.normal_(emb.weight, std=0.02)
        self.task_tokens = nn.Embedding(max(len(cfg.tasks), 1), h)
        nn.init.normal_(self.task_tokens.weight, std=0.02)
        # user profile token
        self.profile_dim = 0 if user_vectors is None else int(user_vectors.shape[1])
        if cfg.profile_token and user_vectors is not None:
            vectors = np.asarray(user_vectors, np.float32)
            has = ~np.isnan(vectors).any(1)
            self.register_buffer("user_vectors", torch.as_tensor(np.nan_to_num(vectors)), persistent=False)
            self.register_buffer("user_has_profile", torch.as_tensor(has), persistent=False)
            self.profile_projection = nn.Linear(self.profile_dim, h)
            self.missing_profile = nn.Parameter(torch.randn(h) * 0.02)
        else:
            self.profile_projection = None
        self.semantic_id_embedding = None
        if cfg.semantic_id_embedding != "none":
            if semantic_ids is None or not codebook_sizes:
                raise ValueError("net.semantic_id_embedding needs the catalog's semantic IDs and codebook sizes")
            rows, sizes = semantic_id_table_rows(semantic_ids, codebook_sizes, cfg.semantic_id_embedding)
            self.register_buffer("semantic_ids", torch.as_tensor(rows), persistent=False)  # (N, levels) row of each level's table
            self.semantic_id_embedding = nn.ModuleList(nn.Embedding(int(n), h) for n in sizes)
            for emb in self.semantic_id_embedding:
                nn.init.normal_(emb.weight, std=0.1)
        self.item_projection = nn.Linear(h, h)  # P in the score
        self.target_gate = nn.Parameter(torch.tensor(float(cfg.target_gate_init)), requires_grad=cfg.target_gate_trainable)
        self.target_placeholder = nn.Parameter(torch.randn(h) * 0.1)  # t: the target token's scale (see target_gate_init)
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))
        self._unprojected: torch.Tensor | None = None  # catalog cache of a frozen adapter
        self._compiled_last_states = None
        if not cfg.adapter_trainable:
            for p in adapter.parameters():
                p.requires_grad_(False)
            for p in self._projection_parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> GTSLUMNetwork:
        """A frozen adapter stays in eval mode: its dropout would only add noise to fixed features (and on
        CPU the random masks of its compressor windows cost as much as its matrix products)."""
        super().train(mode)
        if not self.cfg.adapter_trainable:
            self.adapter.eval()
        return self

    def _projection_parameters(self):
        return [p for n, p in self.adapter.named_parameters() if n.startswith(("decoder_projection.", "projection."))]

    def _fuse(self, behaviors: torch.Tensor) -> torch.Tensor:
        """(N,) behaviour indices -> (N, H) b^F (see `GTSLUMNetConfig.semantic_id_embedding`)."""
        fused = self._adapter_fuse(behaviors)
        if self.semantic_id_embedding is not None:
            rows = self.semantic_ids[behaviors]  # (N, levels) row of each level's table
            fused = fused + sum(table(rows[:, i]) for i, table in enumerate(self.semantic_id_embedding))
        return fused

    def _adapter_fuse(self, behaviors: torch.Tensor) -> torch.Tensor:
        if self.cfg.adapter_trainable:
            return self.adapter.fuse(behaviors)
        if self._unprojected is None or self._unprojected.device != self.device:
            # centred on the catalog mean: the direction every behaviour shares (mean cosine ~0.85 from an
            # untrained Q-former) tells none apart and would start every item vector near one point
            unprojected = self.adapter.unprojected_all()
            self._unprojected = unprojected - unprojected.mean(0) if self.cfg.center_frozen_features else unprojected
        return self.adapter.project(self._unprojected[behaviors])

    def _last_states(self, x: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(N, H) the decoder's final state at each row's `last` column (`last_hidden_states`), compiled for
        passes without gradients when `decoder.compile` is set."""
        if not self.cfg.decoder.compile or torch.is_grad_enabled():
            return last_hidden_states(self.decoder, x, mask, position_ids, last)
        if self._compiled_last_states is None:
            # a plain attribute, not a submodule: the state dict keeps one copy of the weights
            object.__setattr__(self, "_compiled_last_states", compiled_last_hidden_states(self.decoder))
        return self._compiled_last_states(x, mask, position_ids, last)

    # -- pieces ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.sep.device

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def set_user_vectors(self, user_vectors: np.ndarray) -> None:
        """Profiles of another user set (a new log): same width as at training."""
        if self.profile_projection is None:
            return
        vectors = np.asarray(user_vectors, np.float32)
        if vectors.shape[1] != self.profile_dim:
            raise ValueError(f"user vectors have {vectors.shape[1]} dims, the model {self.profile_dim}")
        self.register_buffer("user_vectors", torch.as_tensor(np.nan_to_num(vectors)).to(self.device), persistent=False)
        self.register_buffer("user_has_profile", torch.as_tensor(~np.isnan(vectors).any(1)).to(self.device), persistent=False)

    def item_embeddings(self, fused: torch.Tensor) -> torch.Tensor:
        """(N, H) b^F -> unit vectors P b^F, the scored side."""
        return F.normalize(self.item_projection(fused), dim=-1)

    def fuse_unique(self, *index_arrays: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """b^F of each unique behaviour among the arrays, once: (unique (U,), fused (U, H))."""
        flat = torch.cat([a.reshape(-1) for a in index_arrays])
        unique = torch.unique(flat)
        return unique, self._fuse(unique)

    # -- decoder input -------------------------------------------------------------------------------
    def _history(
        self, batch: SequenceBatch, unique: torch.Tensor, fused: torch.Tensor, descriptors: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, H) history embeddings, (B, L) mask, (B, L) positions. `descriptors`: the projected
        descriptor table when cached (`catalog_cache`)."""
        dev = self.device
        kind = torch.as_tensor(batch.kind, device=dev)
        value = torch.as_tensor(batch.value, device=dev)
        emb = torch.zeros(*kind.shape, self.hidden_size, device=dev, dtype=fused.dtype)
        is_b = kind == TokenKind.BEHAVIOR
        emb[is_b] = fused[torch.searchsorted(unique, value[is_b])]
        is_d = (kind == TokenKind.DESCRIPTOR) | (kind == TokenKind.TIME_TEXT)
        if is_d.any():
            projected = self.descriptor_projection(self.descriptor_table[value[is_d]]) if descriptors is None else descriptors[value[is_d]]
            emb[is_d] = projected.to(emb.dtype)
        emb[kind == TokenKind.SEP] = self.sep.to(emb.dtype)
        if batch.components is not None:
            comp = torch.as_tensor(batch.components, device=dev)
            extra = sum(table(comp[..., i]) for i, table in enumerate(self.components))
            emb = emb + extra * is_b[..., None]
        return emb, kind != PAD_KIND, torch.as_tensor(batch.position, device=dev)

    def _compressed(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W * Q, H) compressed-history tokens and their (B, W * Q) mask."""
        w = self.cfg.compressor.windows if self.cfg.compressor.enabled else 0
        q = self.adapter.compressed_tokens
        out = torch.zeros(len(batch), w * q, self.hidden_size, device=self.device)
        mask = torch.zeros(len(batch), w * q, dtype=torch.bool, device=self.device)
        if w and len(batch.windows):
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.adapter_trainable):
                tokens = self.adapter.compress(
                    torch.as_tensor(batch.windows, device=self.device), torch.as_tensor(batch.window_mask, device=self.device)
                )
            case = torch.as_tensor(batch.window_case, device=self.device)
            cols = torch.as_tensor(batch.window_slot, device=self.device)[:, None] * q + torch.arange(q, device=self.device)[None]
            out[case[:, None], cols] = tokens.to(out.dtype)
            mask[case[:, None], cols] = True
        return out, mask

    def _profile(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.profile_projection is None:
            return None
        users = torch.as_tensor(batch.users, device=self.device)
        emb = self.profile_projection(self.user_vectors[users])
        emb = torch.where(self.user_has_profile[users][:, None], emb, self.missing_profile)
        return emb[:, None], torch.ones(len(batch), 1, dtype=torch.bool, device=self.device)

    @torch.no_grad()
    def catalog_cache(self, batch_size: int = 512) -> CatalogCache:
        """What scoring reads of the catalog whatever the request, for the whole catalog: b^F, the unit
        vectors P b^F and the projected descriptor table. Valid while the weights do not change (a served
        model); eval mode."""
        was_training = self.training
        self.eval()
        everything = torch.arange(self.adapter.num_behaviors, device=self.device)
        fused = torch.cat([self._fuse(part) for part in everything.split(batch_size)])
        cache = CatalogCache(
            behaviors=everything,
            fused=fused,
            items=self.item_embeddings(fused),
            descriptors=self.descriptor_projection(self.descriptor_table),
        )
        self.train(was_training)
        return cache

    def context(
        self, batch: SequenceBatch, extra_behaviors: torch.Tensor | None = None, catalog: CatalogCache | None = None
    ) -> DecoderContext:
        """Everything of the B cases that does not depend on the target: computed once, reused per candidate.
        `catalog`: `catalog_cache()`, read instead of fusing the request's behaviours (every behaviour is in it)."""
        if catalog is None:
            hist_values = torch.as_tensor(batch.value[batch.kind == TokenKind.BEHAVIOR], device=self.device)
            parts = [hist_values] + ([extra_behaviors] if extra_behaviors is not None else [])
            unique, fused = self.fuse_unique(*parts)
            hist, hist_mask, hist_pos = self._history(batch, unique, fused)
        else:
            unique, fused = catalog.behaviors, catalog.fused
            hist, hist_mask, hist_pos = self._history(batch, unique, fused, catalog.descriptors)
        comp, comp_mask = self._compressed(batch)
        prefix, prefix_mask = [comp], [comp_mask]
        profile = self._profile(batch)
        if profile is not None:
            prefix, prefix_mask = [profile[0], comp], [profile[1], comp_mask]
        return DecoderContext(
            behaviors=unique,
            fused=fused,
            prefix=torch.cat(prefix, 1),
            prefix_mask=torch.cat(prefix_mask, 1),
            history=hist,
            history_mask=hist_mask,
            history_position=hist_pos,
            items=catalog.items if catalog is not None else None,
        )

    def lookup(self, ctx: DecoderContext, behaviors: torch.Tensor) -> torch.Tensor:
        """b^F of behaviours that were part of the context's unique set (KeyError for any other)."""
        return ctx.fused[ctx.index(behaviors)]

    def item_vectors(self, ctx: DecoderContext, behaviors: torch.Tensor) -> torch.Tensor:
        """Unit vectors P b^F of behaviours of the context: cached where the context read a `CatalogCache`."""
        if ctx.items is not None:
            return ctx.items[ctx.index(behaviors)]
        return self.item_embeddings(self.lookup(ctx, behaviors))

    def user_states(
        self,
        ctx: DecoderContext,
        rows: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        task: torch.Tensor | None = None,
        history_states: bool = False,
    ) -> torch.Tensor:
        """Last hidden states (N, H) for cases `rows` of the context, each with its `target` behaviour (or
        label `task`) placed as configured; no target and no task: the target-agnostic sequence.

        `history_states`: also return the hidden states over the history columns (N, L, H) (no end target)."""
        rows = torch.arange(len(ctx), device=self.device) if rows is None else rows
        n = len(rows)
        front, front_mask, end, end_mask = [], [], [], []
        one = torch.ones(n, 1, dtype=torch.bool, device=self.device)
        if task is not None:
            front, front_mask = [self.task_tokens(task)[:, None]], [one]
        elif target is not None and self.cfg.target_placement != "none":
            tok = (self.target_placeholder + self.target_gate * self.lookup(ctx, target))[:, None]
            if self.cfg.target_placement == "front":
                front, front_mask = [tok], [one]
            else:
                end, end_mask = [tok], [one]
        parts = front + [ctx.prefix[rows], ctx.history[rows]] + end
        masks = front_mask + [ctx.prefix_mask[rows], ctx.history_mask[rows]] + end_mask
        x = self.input_dropout(torch.cat([p.to(ctx.history.dtype) for p in parts], 1))  # (N, T, H)
        mask = torch.cat(masks, 1)
        n_front = sum(m.shape[1] for m in front_mask) + ctx.prefix_mask.shape[1]
        lead = mask[:, :n_front].long()
        lead_pos = lead.cumsum(1) - 1
        hist_pos = lead.sum(1, keepdim=True) + ctx.history_position[rows]
        pos = [lead_pos.clamp_min(0), hist_pos]
        if end:
            last = torch.where(ctx.history_mask[rows], hist_pos, torch.zeros_like(hist_pos)).amax(1, keepdim=True)
            pos.append(last + 1)
        position_ids = torch.cat(pos, 1)
        if not history_states:  # columns no row uses (e.g. empty compressor slots) are left out: positions are explicit
            keep = mask.any(0)
            if not bool(keep.all()):
                x, mask, position_ids = x[:, keep], mask[:, keep], position_ids[:, keep]
        # no padding left (e.g. one user's re-ranking passes): no mask, so attention runs its causal kernel
        attention_mask = None if bool(mask.all()) else mask.long()
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)  # the last real token of each row
        if not history_states:
            return self._last_states(x, attention_mask, position_ids, last).float()
        hidden = self.decoder(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        states = hidden[torch.arange(n, device=self.device), last].float()
        return states, hidden[:, hidden.shape[1] - ctx.history.shape[1] - len(end) :][:, : ctx.history.shape[1]].float()

    # -- scores --------------------------------------------------------------------------------------
    def agnostic_scores(self, ctx: DecoderContext, items: torch.Tensor) -> torch.Tensor:
        """(B, C): cosine(h_last(history), P b^F) * scale against unit item vectors (C, H)."""
        with record_function("gts_lum.agnostic_pass"):
            users = self.user_states(ctx)
        return F.normalize(users, dim=-1) @ items.T * self.scale

    def aware_scores(
        self, ctx: DecoderContext, candidates: torch.Tensor, chunk: int = 256, cases: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C) target-aware scores of candidates (B, C) (behaviour indices, in the context's unique set)
        for the context's cases `cases` (B,) (default: all, in order).

        One decoder pass per (case, candidate), batched `chunk` sequences at a time."""
        b, c = candidates.shape
        cases = torch.arange(b, device=self.device) if cases is None else cases
        rows = cases.repeat_interleave(c)
        flat = candidates.reshape(-1)
        out = []
        for s in range(0, len(flat), chunk):
            r, t = rows[s : s + chunk], flat[s : s + chunk]
            u = F.normalize(self.user_states(ctx, r, target=t), dim=-1)
            items = self.item_vectors(ctx, t)
            out.append((u * items).sum(-1) * self.scale)
        return torch.cat(out).view(b, c)

    # -- phase II objective --------------------------------------------------------------------------
    def forward(
        self,
        batch: SequenceBatch,
        positives: torch.Tensor,  # (B,) next behaviour of each case, -1 where it is no target (inner prefixes only)
        sampled: torch.Tensor,  # (S,) sampled negatives shared by the batch
        objective: Phase2Objective,  # the run's settings of the two terms
    ) -> dict[str, torch.Tensor]:
        """Phase II: two InfoNCE terms, each over ONE scoring path (never mixed in one softmax).

        target-agnostic: the decoder's state after each prefix against the batch's candidates = every
            prefix's next behaviour (the in-batch targets of the other users and positions) + the sampled
            negatives. Prefixes: the case's whole history (target: the case's positive) and every inner
            behaviour token (target: the log event right after it, `SequenceBatch.next_event`, which the
            interval cap or the dedup may have left out of the tokens), so one pass trains as many
            prefixes as the sequence has behaviours. Behaviours are unique columns, so a negative equal
            to the positive (a false negative) cannot occur. With `objective.in_batch_negatives` N, the in-batch
            columns are N prefixes' targets drawn at random and each prefix's positive is scored beside
            them: (P, S + N) logits, linear in the prefixes, where every target as a column is (P, P).
            With `objective.target_frequency`, each candidate's logit is lowered by log q (`inclusion_log_q`): the
            correction of a sampled softmax towards the full one.
        target-aware: the re-ranking stage's situation at scoring time. Cases whose positive the agnostic
            score ranks in its top `objective.hard_negative_pool` (of the batch's target candidates) score the
            positive and `objective.hard_negatives` negatives drawn uniformly from that top list, each a decoder
            pass with the candidate placed as configured; positive at index 0. Drawing negatives from
            the top only while positives come from anywhere taught the shortcut "what the agnostic
            pass likes most is a negative" (training loss near 0, re-ranking worse than none).
        """
        # every history behaviour with a next event inside the history is a training prefix too (the causal
        # decoder's state there has seen exactly that prefix): next-event targets for the agnostic term
        nxt = torch.as_tensor(batch.next_event, device=self.device)  # (B, L), -1 where none
        prefix_ok = nxt >= 0
        own_ok = positives >= 0  # a window whose own next event is no target trains its inner prefixes only
        allowed_targets, target_frequency = objective.allowed_targets, objective.target_frequency
        if allowed_targets is not None:
            prefix_ok &= allowed_targets[nxt.clamp_min(0)]
            own_ok &= allowed_targets[positives.clamp_min(0)]
        own = torch.nonzero(own_ok).squeeze(1)  # (B',) cases with a positive
        positives = positives[own]
        targets = torch.cat([positives, nxt[prefix_ok]])  # (B' + P,) each prefix's next behaviour, the cases' own first
        candidates = torch.unique(torch.cat([targets, sampled]))  # (U,) every behaviour the step touches
        ctx = self.context(batch, extra_behaviors=candidates)
        items = self.item_embeddings(self.lookup(ctx, candidates))  # (U, H)
        last, hist = self.user_states(ctx, history_states=True)  # (B, H), (B, L, H)
        users = F.normalize(torch.cat([last[own], hist[prefix_ok]]), dim=-1)  # (B' + P, H)
        label = torch.searchsorted(candidates, targets)
        draws = len(label) if objective.in_batch_negatives is None else min(objective.in_batch_negatives, len(label))
        log_q = None
        if target_frequency is not None:  # (U,) log q, q = 1 - P(never drawn)
            log_q = inclusion_log_q(target_frequency[candidates], draws, len(sampled), objective.pool_size or len(target_frequency))
        own_scores = None
        if draws == len(label):  # every candidate a column: one softmax over them
            scores = users @ items.T * self.scale  # (B' + P, U)
            own_scores = scores[: len(positives)]
            logits = scores if log_q is None else scores - log_q
            # a batch without any target position (possible where targets are a small subset) trains nothing
            loss_agnostic = F.cross_entropy(logits, label) if len(label) else logits.sum() * 0.0
        else:
            loss_agnostic = self._drawn_columns_loss(users, items, label, candidates, sampled, draws, log_q)
        out = {"agnostic": loss_agnostic.detach(), "scale": self.scale.detach(), "prefixes": torch.tensor(float(len(label)))}
        loss = objective.agnostic_weight * loss_agnostic
        if objective.hard_negatives > 0 and objective.aware_weight > 0 and self.cfg.target_placement != "none" and len(own):
            if own_scores is None:
                own_scores = users[: len(positives)] @ items.T * self.scale  # (B', U)
            aware = self._aware_loss(ctx, own, positives, own_scores, label[: len(positives)], candidates, objective)
            if aware is not None:
                trained, loss_aware = aware
                out["aware_cases"] = torch.tensor(trained / len(positives))
                if trained:
                    out["aware"] = loss_aware.detach() / trained
                    # a mean over the batch (cases outside the top list add 0): a mean over the few eligible
                    # cases gave a step with one of them a full-weight, noisy gradient that set back the agnostic term
                    loss = loss + objective.aware_weight * loss_aware / len(label)
        out["loss"] = loss
        return out

    def _drawn_columns_loss(
        self,
        users: torch.Tensor,  # (P, H) unit states
        items: torch.Tensor,  # (U, H) unit item vectors of `candidates`
        label: torch.Tensor,  # (P,) each state's positive, an index into `candidates`
        candidates: torch.Tensor,  # (U,)
        sampled: torch.Tensor,  # (S,)
        draws: int,
        log_q: torch.Tensor | None,  # (U,)
    ) -> torch.Tensor:
        """InfoNCE of each state's positive against the uniform samples and `draws` in-batch targets drawn
        at random (torch's generator, seeded by the step); a column equal to the row's positive is masked."""
        drawn = label[torch.randint(len(label), (draws,), device=self.device)]
        columns = torch.unique(torch.cat([torch.searchsorted(candidates, sampled), drawn]))  # (C,)
        neg = users @ items[columns].T * self.scale  # (P, C)
        pos = (users * items[label]).sum(-1, keepdim=True) * self.scale  # (P, 1)
        if log_q is not None:
            neg, pos = neg - log_q[columns], pos - log_q[label][:, None]
        neg = neg.masked_fill(columns[None] == label[:, None], -torch.inf)
        logits = torch.cat([pos, neg], 1)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=self.device))

    def _aware_loss(
        self,
        ctx: DecoderContext,
        own: torch.Tensor,  # (B',) the batch rows of the cases with a positive
        positives: torch.Tensor,  # (B',)
        scores: torch.Tensor,  # (B', U) their agnostic scores against `candidates`
        label: torch.Tensor,  # (B',) the positives' columns
        candidates: torch.Tensor,  # (U,)
        objective: Phase2Objective,
    ) -> tuple[int, torch.Tensor | None] | None:
        """(cases trained, their summed loss) of the target-aware term (see `forward`): None when the
        candidates leave no negative to draw, a loss of None when no case's positive made the list."""
        allowed_targets, hard_negative_pool = objective.allowed_targets, objective.hard_negative_pool
        target_ok = allowed_targets[candidates] if allowed_targets is not None else torch.ones_like(candidates, dtype=torch.bool)
        pool = int(target_ok.sum()) - 1 if hard_negative_pool is None else min(hard_negative_pool, int(target_ok.sum()) - 1)
        k = min(objective.hard_negatives, pool)
        if k <= 0:
            return None
        with torch.no_grad():
            rows = torch.arange(len(label), device=self.device)
            masked = scores.detach().masked_fill(~target_ok, -torch.inf)  # competitors at scoring time only
            rank = (masked > masked[rows, label][:, None]).sum(1)  # (B',) the positive's agnostic rank
            masked[rows, label] = -torch.inf
            top = masked.topk(pool, dim=1).indices  # (B', pool) the re-ranking list without the positive
            pick = torch.rand(top.shape, device=self.device).topk(k, dim=1).indices  # k uniform draws
            hard = candidates[top.gather(1, pick)]  # (B', k)
            cases = torch.nonzero(rank < pool).squeeze(1)
        if not len(cases):
            return 0, None
        logits = self.aware_scores(ctx, torch.cat([positives[cases, None], hard[cases]], 1), chunk=len(cases) * (k + 1), cases=own[cases])
        return len(cases), F.cross_entropy(logits, torch.zeros(len(cases), dtype=torch.long, device=self.device), reduction="sum")
