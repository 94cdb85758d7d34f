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

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from gts_lum.data.events import EventLog
from gts_lum.modeling.decoder import DecoderConfig, build_decoder, compiled_for_inference, word_embedder
from gts_lum.modeling.qformer import BehaviorAdapter, QFormerConfig
from gts_lum.sequence.splits import hold_out_for_validation
from gts_lum.sequence.tokens import TokenKind, TokenSequences
from gts_lum.tokenizer.semantic_ids import SEMANTIC_ID_TABLES, semantic_id_table_rows
from gts_lum.training.phase2 import Phase2Config

log = logging.getLogger(__name__)

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


def make_batch(tokens: TokenSequences, log_: EventLog, history_end: np.ndarray, compressor: CompressorConfig) -> SequenceBatch:
    """Left-pad the token sequences of B cases and cut their older history into compressor windows.

    `tokens` must have been built from `log_` (its `source_row`s index it) with `history_end` the
    cases' exclusive history ends. Older history = the user's events before the first behaviour the
    budget kept; its most recent W x K events become W windows of K (a partial window is the oldest).
    """
    from gts_lum.data.events import ragged_arange

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
    return SequenceBatch(tokens.users.astype(np.int64), kind, value, position, components, windows, win_mask, case, slot_of, next_event)


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
        self._compiled_decoder: nn.Module | None = None
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

    def _decoder_for_pass(self) -> nn.Module:
        """The decoder, compiled for passes without gradients when `decoder.compile` is set."""
        if not self.cfg.decoder.compile or torch.is_grad_enabled():
            return self.decoder
        if self._compiled_decoder is None:
            # a plain attribute, not a submodule: the state dict keeps one copy of the weights
            object.__setattr__(self, "_compiled_decoder", compiled_for_inference(self.decoder))
        return self._compiled_decoder

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
    def catalog_cache(self, batch_size: int = 512) -> dict:
        """What scoring reads of the catalog whatever the request, for the whole catalog: b^F, the unit
        vectors P b^F and the projected descriptor table. Valid while the weights do not change (a served
        model); eval mode."""
        was_training = self.training
        self.eval()
        everything = torch.arange(self.adapter.num_behaviors, device=self.device)
        fused = torch.cat([self._fuse(part) for part in everything.split(batch_size)])
        cache = {
            "unique": everything,
            "fused": fused,
            "items": self.item_embeddings(fused),
            "descriptors": self.descriptor_projection(self.descriptor_table),
        }
        self.train(was_training)
        return cache

    def context(self, batch: SequenceBatch, extra_behaviors: torch.Tensor | None = None, catalog: dict | None = None) -> dict:
        """Everything of the B cases that does not depend on the target: computed once, reused per candidate.
        `catalog`: `catalog_cache()`, read instead of fusing the request's behaviours (every behaviour is in it)."""
        if catalog is None:
            hist_values = torch.as_tensor(batch.value[batch.kind == TokenKind.BEHAVIOR], device=self.device)
            parts = [hist_values] + ([extra_behaviors] if extra_behaviors is not None else [])
            unique, fused = self.fuse_unique(*parts)
            hist, hist_mask, hist_pos = self._history(batch, unique, fused)
        else:
            unique, fused = catalog["unique"], catalog["fused"]
            hist, hist_mask, hist_pos = self._history(batch, unique, fused, catalog["descriptors"])
        comp, comp_mask = self._compressed(batch)
        prefix, prefix_mask = [comp], [comp_mask]
        profile = self._profile(batch)
        if profile is not None:
            prefix, prefix_mask = [profile[0], comp], [profile[1], comp_mask]
        return {
            "unique": unique,
            "fused": fused,
            **({"items": catalog["items"]} if catalog is not None else {}),
            "prefix": torch.cat(prefix, 1),
            "prefix_mask": torch.cat(prefix_mask, 1),
            "hist": hist,
            "hist_mask": hist_mask,
            "hist_pos": hist_pos,
        }

    def lookup(self, ctx: dict, behaviors: torch.Tensor, what: str = "fused") -> torch.Tensor:
        """b^F (`what` "fused") of behaviours that were part of the context's unique set, or their cached
        unit vectors P b^F ("items", a context of `catalog_cache`)."""
        pos = torch.searchsorted(ctx["unique"], behaviors)
        if bool((pos >= len(ctx["unique"])).any()) or not bool((ctx["unique"][pos.clamp(max=len(ctx["unique"]) - 1)] == behaviors).all()):
            raise KeyError("behaviour not in the context: pass it as extra_behaviors to context()")
        return ctx[what][pos]

    def user_states(
        self,
        ctx: dict,
        rows: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        task: torch.Tensor | None = None,
        history_states: bool = False,
    ) -> torch.Tensor:
        """Last hidden states (N, H) for cases `rows` of the context, each with its `target` behaviour (or
        label `task`) placed as configured; no target and no task: the target-agnostic sequence.

        `history_states`: also return the hidden states over the history columns (N, L, H) (no end target)."""
        rows = torch.arange(len(ctx["hist"]), device=self.device) if rows is None else rows
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
        parts = front + [ctx["prefix"][rows], ctx["hist"][rows]] + end
        masks = front_mask + [ctx["prefix_mask"][rows], ctx["hist_mask"][rows]] + end_mask
        x = self.input_dropout(torch.cat([p.to(ctx["hist"].dtype) for p in parts], 1))  # (N, T, H)
        mask = torch.cat(masks, 1)
        n_front = sum(m.shape[1] for m in front_mask) + ctx["prefix_mask"].shape[1]
        lead = mask[:, :n_front].long()
        lead_pos = lead.cumsum(1) - 1
        hist_pos = lead.sum(1, keepdim=True) + ctx["hist_pos"][rows]
        pos = [lead_pos.clamp_min(0), hist_pos]
        if end:
            last = torch.where(ctx["hist_mask"][rows], hist_pos, torch.zeros_like(hist_pos)).amax(1, keepdim=True)
            pos.append(last + 1)
        position_ids = torch.cat(pos, 1)
        hidden = self._decoder_for_pass()(inputs_embeds=x, attention_mask=mask.long(), position_ids=position_ids).last_hidden_state
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)  # the last real token of each row
        states = hidden[torch.arange(n, device=self.device), last].float()
        if history_states:
            return states, hidden[:, hidden.shape[1] - ctx["hist"].shape[1] - len(end) :][:, : ctx["hist"].shape[1]].float()
        return states

    # -- scores --------------------------------------------------------------------------------------
    def agnostic_scores(self, ctx: dict, items: torch.Tensor) -> torch.Tensor:
        """(B, C): cosine(h_last(history), P b^F) * scale against unit item vectors (C, H)."""
        with record_function("gts_lum.agnostic_pass"):
            users = self.user_states(ctx)
        return F.normalize(users, dim=-1) @ items.T * self.scale

    def aware_scores(self, ctx: dict, candidates: torch.Tensor, chunk: int = 256, cases: torch.Tensor | None = None) -> torch.Tensor:
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
            items = self.lookup(ctx, t, "items") if "items" in ctx else self.item_embeddings(self.lookup(ctx, t))
            out.append((u * items).sum(-1) * self.scale)
        return torch.cat(out).view(b, c)

    # -- phase II objective --------------------------------------------------------------------------
    def forward(
        self,
        batch: SequenceBatch,
        positives: torch.Tensor,  # (B,) next behaviour of each case, -1 where it is no target (inner prefixes only)
        sampled: torch.Tensor,  # (S,) sampled negatives shared by the batch
        hard_negatives: int,
        agnostic_weight: float = 1.0,
        aware_weight: float = 1.0,
        allowed_targets: torch.Tensor | None = None,  # (num_behaviors,) bool: which behaviours may be targets
        hard_negative_pool: int | None = None,  # None: every target candidate of the batch (the trainer passes the re-ranking list size)
        target_frequency: torch.Tensor | None = None,  # (num_behaviors,) share of the training targets: logQ correction
        pool_size: int | None = None,  # how many behaviours `sampled` is drawn from (uniformly, with replacement)
    ) -> dict[str, torch.Tensor]:
        """Phase II: two InfoNCE terms, each over ONE scoring path (never mixed in one softmax).

        target-agnostic: the decoder's state after each prefix against the batch's candidates = every
            prefix's next behaviour (the in-batch targets of the other users and positions) + the sampled
            negatives. Prefixes: the case's whole history (target: the case's positive) and every inner
            behaviour token (target: the log event right after it, `SequenceBatch.next_event`, which the
            interval cap or the dedup may have left out of the tokens), so one pass trains as many
            prefixes as the sequence has behaviours. Behaviours are unique columns, so a negative equal
            to the positive (a false negative) cannot occur. With `target_frequency`, each candidate's
            logit is lowered by log q, q its chance to be among a step's candidates (as the target of one
            of the step's prefixes, drawn by popularity, or among the uniform draws): the correction of
            a sampled softmax towards the full one.
        target-aware: the re-ranking stage's situation at scoring time. Cases whose positive the agnostic
            score ranks in its top `hard_negative_pool` (of the batch's target candidates) score the
            positive and `hard_negatives` negatives drawn uniformly from that top list, each a decoder
            pass with the candidate placed as configured; positive at index 0. Drawing negatives from
            the top only while positives come from anywhere taught the shortcut "what the agnostic
            pass likes most is a negative" (training loss near 0, re-ranking worse than none).
        """
        # every history behaviour with a next event inside the history is a training prefix too (the causal
        # decoder's state there has seen exactly that prefix): next-event targets for the agnostic term
        nxt = torch.as_tensor(batch.next_event, device=self.device)  # (B, L), -1 where none
        prefix_ok = nxt >= 0
        own_ok = positives >= 0  # a window whose own next event is no target trains its inner prefixes only
        if allowed_targets is not None:
            prefix_ok &= allowed_targets[nxt.clamp_min(0)]
            own_ok &= allowed_targets[positives.clamp_min(0)]
        own = torch.nonzero(own_ok).squeeze(1)  # (B',) cases with a positive
        positives = positives[own]
        candidates = torch.unique(torch.cat([positives, sampled, nxt[prefix_ok]]))  # (U,)
        ctx = self.context(batch, extra_behaviors=candidates)
        items = self.item_embeddings(self.lookup(ctx, candidates))  # (U, H)
        last, hist = self.user_states(ctx, history_states=True)  # (B, H), (B, L, H)
        states = torch.cat([last[own], hist[prefix_ok]])  # (B' + P, H): the cases' own prefixes first
        scores = F.normalize(states, dim=-1) @ items.T * self.scale  # (B' + P, U)
        label = torch.searchsorted(candidates, torch.cat([positives, nxt[prefix_ok]]))
        logits = scores
        if target_frequency is not None:
            pool = pool_size or len(target_frequency)
            miss = (1.0 - target_frequency[candidates]).pow(len(label)) * (1.0 - 1.0 / pool) ** len(sampled)
            logits = scores - torch.log1p(-miss).clamp_min(-30.0)  # log q, q = 1 - P(never drawn)
        # a batch without any target position (possible where targets are a small subset) trains nothing
        loss_agnostic = F.cross_entropy(logits, label) if len(label) else logits.sum() * 0.0
        out = {"agnostic": loss_agnostic.detach(), "scale": self.scale.detach(), "prefixes": torch.tensor(float(len(label)))}
        loss = agnostic_weight * loss_agnostic
        scores, label = scores[: len(positives)], label[: len(positives)]
        target_ok = allowed_targets[candidates] if allowed_targets is not None else torch.ones_like(candidates, dtype=torch.bool)
        pool = int(target_ok.sum()) - 1 if hard_negative_pool is None else min(hard_negative_pool, int(target_ok.sum()) - 1)
        k = min(hard_negatives, pool)
        if k > 0 and aware_weight > 0 and self.cfg.target_placement != "none" and len(own):
            with torch.no_grad():
                rows = torch.arange(len(label), device=self.device)
                masked = scores.detach().masked_fill(~target_ok, -torch.inf)  # competitors at scoring time only
                rank = (masked > masked[rows, label][:, None]).sum(1)  # (B',) the positive's agnostic rank
                masked[rows, label] = -torch.inf
                top = masked.topk(pool, dim=1).indices  # (B', pool) the re-ranking list without the positive
                pick = torch.rand(top.shape, device=self.device).topk(k, dim=1).indices  # k uniform draws
                hard = candidates[top.gather(1, pick)]  # (B', k)
                cases = torch.nonzero(rank < pool).squeeze(1)
            out["aware_cases"] = torch.tensor(len(cases) / max(len(label), 1))
            if len(cases):
                logits = self.aware_scores(
                    ctx, torch.cat([positives[cases, None], hard[cases]], 1), chunk=len(cases) * (k + 1), cases=own[cases]
                )
                loss_aware = F.cross_entropy(logits, torch.zeros(len(cases), dtype=torch.long, device=self.device), reduction="sum")
                out["aware"] = loss_aware.detach() / len(cases)
                # a mean over the batch (cases outside the top list add 0): a mean over the few eligible
                # cases gave a step with one of them a full-weight, noisy gradient that set back the agnostic term
                loss = loss + aware_weight * loss_aware / len(label)
        out["loss"] = loss
        return out


# -- the model as the bench, the pipeline and the scorer use it -------------------------------------
@dataclass
class ArtifactPaths:
    """Encoder artifacts of the pipeline; any left empty falls back (see `GTSLUM.attach`)."""

    semantic_ids: str = ""  # tokenizer stage folder
    graph: str = ""  # node2vec stage folder
    tables: str = ""  # table stage folder (behavior_table.npz, user_table.npz)
    qformer: str = ""  # phase-I folder (qformer.yaml + qformer.safetensors): the adapter starts from it


def _default_qformer() -> QFormerConfig:
    return QFormerConfig(num_queries=4, num_layers=2, num_heads=4, hidden_size=128, intermediate_size=256, max_window=16)


@dataclass
class GTSLUMConfig:
    net: GTSLUMNetConfig = field(default_factory=GTSLUMNetConfig)
    qformer: QFormerConfig = field(default_factory=_default_qformer)  # used when artifacts.qformer is empty
    artifacts: ArtifactPaths = field(default_factory=ArtifactPaths)
    # timestamp-process overrides for this model (Table 3: {"variant": "none" | "text" | "component" |
    # "position"}); the data set's settings otherwise
    sequence: dict = field(default_factory=dict)
    train: Phase2Config = field(default_factory=Phase2Config)
    rerank_depth: int = 50  # two-stage scoring: re-rank the agnostic top N target-aware (0: agnostic only)
    # choose on validation between agnostic-only scoring (depth 0) and the two-stage `rerank_depth`: a
    # target-aware path that has not learned to beat the agnostic order would only shuffle the top N
    select_rerank: bool = True
    score_chunk: int = 512  # sequences per decoder pass when scoring


class GTSLUM:
    """GTS-LUM for `gts-lum bench`, the training stage and the scorer: attach / fit / score / save.

    model = build_model("gts_lum", "pkg:models/gts_lum.yaml", overrides)
    model.attach(SequenceDataset.load("runs/demo/sequences"))   # catalog, timestamp process, artifacts
    model.fit(split, eval_cfg, candidates)                        # phase II, epoch picked on validation
    scores = model.score(split.log, split.test, candidates)       # two-stage: agnostic, then target-aware
    """

    name = "gts_lum"

    def __init__(self, cfg: GTSLUMConfig | None = None):
        self.cfg = cfg or GTSLUMConfig()
        self.net: GTSLUMNetwork | None = None
        self.device = torch.device("cpu")
        self.amp_dtype = None
        self.history_filter = False
        self._assets: dict = {}

    @classmethod
    def describe(cls) -> str:
        return "gts_lum: attach(dataset), fit(split, eval_cfg, candidates), score(log, cases, candidates) -> (B, C)"

    # -- building --------------------------------------------------------------------------------------
    def attach(self, dataset) -> None:
        """Catalog features (real artifacts where given, stand-ins otherwise), timestamp process, profiles."""
        from gts_lum.modeling.behavior_features import features_from_artifacts, stand_in_features
        from gts_lum.sequence.timestamp_process import TimeGrid
        from gts_lum.tokenizer.text_encoder import encode

        art = self.cfg.artifacts
        behaviors = dataset.behaviors()
        if art.semantic_ids or art.graph or art.tables:
            table = Path(art.tables) / "behavior_table.npz" if art.tables else None
            features = features_from_artifacts(
                dataset.root, art.semantic_ids or None, art.graph or None, table if table is not None and table.exists() else None
            )
        else:
            log.info("gts_lum: no encoder artifacts given; stand-in semantic IDs and table embeddings (stand_in_features)")
            features = stand_in_features(behaviors, encode(behaviors["description"].astype(str).tolist()))
        user_vectors = None
        if art.tables and (Path(art.tables) / "user_table.npz").exists():
            with np.load(Path(art.tables) / "user_table.npz", allow_pickle=False) as z:
                user_vectors = _align_users(dataset.event_log.user_ids, z["user_ids"], z["vectors"])
        sequence_cfg = dataset.sequence_cfg
        if self.cfg.sequence:
            import dataclasses

            from gts_lum.config import from_dict

            sequence_cfg = from_dict(type(sequence_cfg), {**dataclasses.asdict(sequence_cfg), **self.cfg.sequence})
        self._assets = {
            "features": features,
            "sequence_cfg": sequence_cfg,
            "stats": dataset.stats,
            "user_ids": dataset.event_log.user_ids.astype(str),
            "user_vectors": user_vectors,
            "adapter_card": None,
        }
        self._build(descriptor_texts=list(TimeGrid(sequence_cfg).descriptor_texts))

    def _build(self, descriptor_texts: list[str], adapter_state: dict | None = None) -> None:
        from gts_lum.device import device_info, select_device
        from gts_lum.modeling.qformer import adapter_card, adapter_from_card, build_adapter, load_adapter
        from gts_lum.tokenizer.text_encoder import encode

        self.device = select_device(self.cfg.train.device)
        self.amp_dtype = device_info(self.device).amp_dtype
        torch.manual_seed(self.cfg.train.seed)
        features = self._assets["features"]
        hidden = _decoder_width(self.cfg.net.decoder)
        card = self._assets.get("adapter_card")
        if card is not None:  # a saved GTS-LUM model: the adapter exactly as trained
            adapter = adapter_from_card(card)  # its catalog is set once the weights (vocabulary) are in
        elif self.cfg.artifacts.qformer:
            adapter = load_adapter(self.cfg.artifacts.qformer, features)
            if adapter.cfg.decoder_hidden_size != hidden:  # phase I never trains the projection: size it for this decoder
                adapter.resize_projection(hidden)
        else:
            import dataclasses

            adapter = build_adapter(dataclasses.replace(self.cfg.qformer, decoder_hidden_size=hidden), features)
        self._assets["adapter_card"] = adapter_card(adapter)
        descriptors = None if self.cfg.net.decoder.pretrained else encode(descriptor_texts)
        self.net = GTSLUMNetwork(
            self.cfg.net,
            adapter,
            descriptor_texts,
            descriptors,
            self._assets["user_vectors"],
            features.semantic_ids,
            features.codebook_sizes,
        ).to(self.device)
        if adapter_state is not None:
            self.net.load_state_dict(adapter_state)
        self.net.adapter.set_catalog(features)  # buffers onto the device

    # -- data ------------------------------------------------------------------------------------------
    def sequences(self, log_: EventLog, cases) -> TokenSequences:
        from gts_lum.sequence.timestamp_process import build_sequences

        return build_sequences(log_, cases, self._assets["sequence_cfg"], self._assets["stats"])

    def batch(self, tokens: TokenSequences, log_: EventLog, history_end: np.ndarray) -> SequenceBatch:
        self._align_profiles(log_)
        return make_batch(tokens, log_, history_end, self.cfg.net.compressor)

    def _align_profiles(self, log_: EventLog) -> None:
        """Profile rows follow the user order of the log being scored (a serving request's one-user log,
        a held-out log): matched by user id against the profiles the model was trained with."""
        net = self._require()
        if net.profile_projection is None or self._assets.get("profiles_for") is log_:
            return
        known = self._assets["user_ids"].astype(str)
        vectors = self._assets["user_vectors"]
        if len(known) != log_.num_users or not np.array_equal(known, log_.user_ids.astype(str)):
            vectors = _align_users(log_.user_ids, known, vectors)
        net.set_user_vectors(vectors)
        self._assets["profiles_for"] = log_

    def autocast(self):
        enabled = self.amp_dtype is not None and self.cfg.train.amp
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled)

    def _require(self) -> GTSLUMNetwork:
        if self.net is None:
            raise RuntimeError("gts_lum: attach(dataset) (or load the saved model) before fit/score")
        return self.net

    # -- training --------------------------------------------------------------------------------------
    def fit(self, split, eval_cfg=None, candidates: np.ndarray | None = None, checkpoint_dir: str | Path | None = None) -> dict:
        from gts_lum.evaluation.protocol import EvalConfig, evaluate, validation_metric
        from gts_lum.training.loop import train_loop
        from gts_lum.training.phase2 import Phase2Task

        self._require()
        eval_cfg = eval_cfg or EvalConfig()
        self.history_filter = eval_cfg.history_filter
        tc = self.cfg.train
        targets = candidates  # the split's target subset (None: every behaviour)
        split = hold_out_for_validation(split, tc.valid_holdout_events, targets)
        valid_cfg = EvalConfig(
            ks=eval_cfg.ks, batch_size=eval_cfg.batch_size, history_filter=eval_cfg.history_filter, max_users=tc.valid_cases, seed=tc.seed
        )
        configured = self.cfg.rerank_depth
        depths = [0, configured] if self.cfg.select_rerank and configured and self.cfg.net.target_placement != "none" else [configured]

        def valid_by_depth() -> dict[int, float]:
            values = {}
            for depth in depths:
                self.cfg.rerank_depth = depth
                metrics = evaluate(self, split.log, split.valid, candidates, valid_cfg, desc=f"gts_lum valid (re-rank {depth})")
                values[depth] = validation_metric(metrics, tc.select_metric)
            self.cfg.rerank_depth = configured
            return values

        def valid_fn() -> float:
            # epochs are picked on the agnostic ranking (one decoder pass per case; the re-ranking passes
            # cost as much as an epoch of training), the re-ranking depth once, on the picked epoch
            self.cfg.rerank_depth = depths[0]
            try:
                metrics = evaluate(self, split.log, split.valid, candidates, valid_cfg, desc=f"gts_lum valid (re-rank {depths[0]})")
            finally:
                self.cfg.rerank_depth = configured
            return validation_metric(metrics, tc.select_metric)

        trained = targets if tc.targets == "split" else None  # what phase II predicts (validation ranks `targets`)
        stats = train_loop(Phase2Task(self, split, trained, valid_fn), tc, checkpoint_dir, self.device)
        if len(depths) > 1:  # the best epoch's weights are in: pick the scoring on validation
            values = valid_by_depth()
            self.cfg.rerank_depth = max(values, key=lambda d: (values[d], d))
            stats["valid_by_rerank_depth"] = {str(d): v for d, v in values.items()}
            log.info("gts_lum: validation %s by re-rank depth %s: scoring with depth %d", tc.select_metric, values, self.cfg.rerank_depth)
        stats["rerank_depth"] = self.rerank_depth
        stats["device"] = str(self.device)
        return stats

    # -- scoring ---------------------------------------------------------------------------------------
    @property
    def rerank_depth(self) -> int:
        """The re-ranking depth scoring uses: 0 without a target-aware path (target placement none)."""
        return 0 if self.cfg.net.target_placement == "none" else self.cfg.rerank_depth

    @torch.no_grad()
    def score(self, log_: EventLog, cases, candidates: np.ndarray, catalog: dict | None = None) -> np.ndarray:
        """(B, C) scores. Two-stage: agnostic over all candidates, the top `rerank_depth` re-scored
        target-aware and placed above the rest in their new order (the rest keep agnostic order).
        `catalog`: `catalog_cache()` of the current weights (a server computes it once per model load)."""
        from gts_lum.evaluation.protocol import history_mask

        net = self._require()
        was_training = net.training
        net.eval()
        candidates = np.asarray(candidates, np.int64)
        with record_function("gts_lum.timestamp_process"):  # stage labels: `gts-lum load-bench --profile`
            tokens = self.sequences(log_, cases)
            batch = self.batch(tokens, log_, np.asarray(cases.history_end))
        cand = torch.as_tensor(candidates, device=self.device)
        with self.autocast():
            with record_function("gts_lum.fuse"):
                ctx = net.context(batch, extra_behaviors=cand, catalog=catalog)
            with record_function("gts_lum.retrieval"):  # the agnostic pass inside: its own label
                items = catalog["items"][cand] if catalog is not None else net.item_embeddings(net.lookup(ctx, cand))
                scores = net.agnostic_scores(ctx, items)  # (B, C)
                depth = min(self.rerank_depth, len(candidates))
                if depth:
                    masked = scores.clone()
                    if self.history_filter:
                        masked[torch.as_tensor(history_mask(log_, cases, candidates), device=self.device)] = -torch.inf
                    top = masked.topk(depth, dim=1).indices  # (B, N) columns
            if depth:
                with record_function("gts_lum.aware_passes"):
                    aware = net.aware_scores(ctx, cand[top], chunk=self.cfg.score_chunk)  # (B, N)
                # above every agnostic score: cosine * scale lies in [-scale, scale]
                scores.scatter_(1, top, aware + 4 * net.scale)
        net.train(was_training)
        return scores.float().cpu().numpy()

    @torch.no_grad()
    def user_embeddings(self, log_: EventLog, cases, task: int | None = None, catalog: dict | None = None) -> np.ndarray:
        """(B, H) last hidden states: target-agnostic, or with label task `task`'s token in front
        (`catalog`: as in `score`)."""
        net = self._require()
        was_training = net.training
        net.eval()
        tokens = self.sequences(log_, cases)
        ends = np.asarray(cases.history_end)
        out = []
        for s in range(0, len(cases), self.cfg.score_chunk):  # bounded memory on any number of users
            rows = np.arange(s, min(s + self.cfg.score_chunk, len(cases)))
            ctx = net.context(self.batch(tokens.subset(rows), log_, ends[rows]), catalog=catalog)
            task_t = None if task is None else torch.full((len(rows),), task, dtype=torch.long, device=self.device)
            out.append(net.user_states(ctx, task=task_t).cpu().numpy())
        net.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, net.hidden_size), np.float32)

    # -- label tasks (training.task_tokens) ------------------------------------------------------------
    def set_tasks(self, names: list[str]) -> None:
        """One learned front token per label task (`cfg.net.tasks`); tokens of names already there are kept."""
        net = self._require()
        old = {name: net.task_tokens.weight[i].detach().clone() for i, name in enumerate(self.cfg.net.tasks)}
        self.cfg.net.tasks = list(names)
        table = nn.Embedding(max(len(names), 1), net.hidden_size).to(self.device)
        nn.init.normal_(table.weight, std=0.02)
        with torch.no_grad():
            for i, name in enumerate(names):
                if name in old:
                    table.weight[i] = old[name]
        net.task_tokens = table

    def task_index(self, name: str) -> int:
        if name not in self.cfg.net.tasks:
            raise KeyError(f"gts_lum: no task token for {name!r} (tasks: {self.cfg.net.tasks}); set_tasks first")
        return self.cfg.net.tasks.index(name)

    # -- persistence (training.checkpoint) -------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self._require().state_dict()

    def save_assets(self, folder: str | Path) -> None:
        import dataclasses

        import yaml

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        a = self._assets
        a["features"].save(folder / "features.npz")
        a["stats"].save(folder / "behavior_stats.npz")
        users = {"user_ids": np.asarray(a["user_ids"], dtype=str)}
        if a["user_vectors"] is not None:
            users["vectors"] = a["user_vectors"]
        np.savez(folder / "users.npz", **users)
        card = {"sequence_config": dataclasses.asdict(a["sequence_cfg"]), "adapter": a["adapter_card"]}
        (folder / "assets.yaml").write_text(yaml.safe_dump(card, sort_keys=False))

    def load_assets(self, folder: str | Path) -> None:
        import yaml

        from gts_lum.config import from_dict
        from gts_lum.modeling.behavior_features import BehaviorFeatures
        from gts_lum.sequence.timestamp_process import BehaviorStats, SequenceConfig

        folder = Path(folder)
        card = yaml.safe_load((folder / "assets.yaml").read_text())
        with np.load(folder / "users.npz", allow_pickle=False) as z:
            user_ids, vectors = z["user_ids"], (z["vectors"] if "vectors" in z.files else None)
        self._assets = {
            "features": BehaviorFeatures.load(folder / "features.npz"),
            "sequence_cfg": from_dict(SequenceConfig, card["sequence_config"]),
            "stats": BehaviorStats.load(folder / "behavior_stats.npz"),
            "user_ids": user_ids,
            "user_vectors": vectors,
            "adapter_card": card["adapter"],
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], device: str = "cpu") -> None:
        from gts_lum.sequence.timestamp_process import TimeGrid

        if not self._assets:
            raise RuntimeError("gts_lum: load_assets(folder) first (training.checkpoint.load_model does it)")
        self.cfg.train.device = device
        self._build(list(TimeGrid(self._assets["sequence_cfg"]).descriptor_texts), adapter_state=tensors)
        self.net.eval()


def _decoder_width(cfg: DecoderConfig) -> int:
    if not cfg.pretrained:
        return cfg.hidden_size
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(Path(cfg.pretrained).expanduser())).hidden_size)


def _align_users(log_users: np.ndarray, table_users: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Profile rows in the log's user order; NaN rows for users the table lacks."""
    import pandas as pd

    rows = pd.Index(table_users.astype(str)).get_indexer(log_users.astype(str))
    out = np.full((len(log_users), vectors.shape[1]), np.nan, np.float32)
    out[rows >= 0] = vectors[rows[rows >= 0]]
    missing = int((rows < 0).sum())
    if missing:
        log.info("gts_lum: %d of %d users have no profile row (a learned 'missing profile' token stands in)", missing, len(log_users))
    return out
