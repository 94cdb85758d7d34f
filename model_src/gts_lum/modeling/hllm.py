"""HLLM-style baseline (Chen et al. 2024, "HLLM: Enhancing Sequential Recommendations via Hierarchical
Large Language Models for Item and User Modeling"; a row of the paper's Table 2).

Two causal LLMs, trained end to end, and no behaviour-id embedding anywhere:

- the ITEM LLM reads a behaviour's description (WordPiece over a compact vocabulary, `TextTokenizer`)
  followed by a special [ITEM] token; its last-layer state at [ITEM] is the item embedding;
- the USER LLM reads the item embeddings of a history (causal, left-padded); its state at position t
  predicts the embedding of item t + 1, trained with InfoNCE against uniform and in-batch negatives
  (`training.sequential.sampled_softmax_loss`, logQ-corrected).

So two behaviours with the same text are the same item to HLLM, and a behaviour never seen in training
still gets an embedding from its text. Both LLMs are small Llama-architecture models built from
`LlamaConfig` (offline, from scratch), or local Hugging Face checkpoints (`LLMConfig.path`); for the item
LLM the checkpoint's transformer is kept but its token table is resized to the compact WordPiece
vocabulary and learned anew (those ids are not the checkpoint tokenizer's).

Cost on CPU: a training step runs the item LLM once per DISTINCT item of the batch (inputs, targets and
negatives together) and gathers; scoring encodes the whole catalog once and reuses it until the weights
change. Items are length-sorted into chunks of `item_batch` so little compute goes to padding.

    from gts_lum.recommenders.registry import attach_dataset, build_model
    model = build_model("hllm", "pkg:models/hllm.yaml", ["train.epochs=5"])
    attach_dataset(model, sequence_dataset)   # reads the behaviour descriptions
    stats = model.fit(split, eval_cfg)
    scores = model.score(split.log, split.test, candidates)  # (B, C)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gts_lum.data.events import EventLog
from gts_lum.device import device_info, select_device
from gts_lum.evaluation.protocol import EvalConfig
from gts_lum.modeling.baselines import check_catalog
from gts_lum.modeling.decoder import small_llama
from gts_lum.modeling.qformer import DEFAULT_TOKENIZER, TextTokenizer
from gts_lum.sequence.splits import EvalSet, Split
from gts_lum.training.sequential import (
    PAD,
    SequentialRecommender,
    SequentialTrainConfig,
    left_padded,
    sampled_softmax_loss,
)

log = logging.getLogger(__name__)


@dataclass
class LLMConfig:
    """One of HLLM's two LLMs: a local HF checkpoint, or a fresh Llama of these sizes."""

    path: str = ""  # local checkpoint folder for AutoModel.from_pretrained; empty: LlamaConfig from the sizes below
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128


@dataclass
class HLLMConfig:
    item_llm: LLMConfig = field(default_factory=LLMConfig)
    user_llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: str = DEFAULT_TOKENIZER  # local BERT-family WordPiece folder, or "default" (bundled MiniLM)
    max_text_len: int = 24  # WordPiece tokens per description, [CLS] and [SEP] included; [ITEM] follows
    item_batch: int = 1024  # items per item-LLM forward (bounds activation memory)
    dropout: float = 0.0  # on the item embeddings the user LLM reads
    train: SequentialTrainConfig = field(default_factory=SequentialTrainConfig)

    def __post_init__(self) -> None:
        checks = {
            "max_text_len": self.max_text_len >= 2,
            "item_batch": self.item_batch >= 1,
            "dropout": 0.0 <= self.dropout < 1.0,
        }
        for which in ("item_llm", "user_llm"):
            llm = self.item_llm if which == "item_llm" else self.user_llm
            if not llm.path:
                checks[f"{which}.num_heads"] = llm.num_heads >= 1 and llm.hidden_size % llm.num_heads == 0
                checks[f"{which}.num_layers"] = llm.num_layers >= 1
                checks[f"{which}.intermediate_size"] = llm.intermediate_size >= 1
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"HLLMConfig: invalid {bad} (max_text_len >= 2, item_batch >= 1, 0 <= dropout < 1, "
                f"hidden_size divisible by num_heads, sizes >= 1): {asdict(self)}"
            )


def build_llm(cfg: LLMConfig, vocab_size: int, max_positions: int, which: str, pretrained: bool = True) -> nn.Module:
    """A decoder-only transformer without LM head, its token table sized to `vocab_size`.

    `pretrained=False` builds a checkpoint's architecture without reading its weights (a saved HLLM
    brings its own).
    """
    from transformers import AutoConfig, AutoModel

    if cfg.path:
        folder = Path(cfg.path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"HLLMConfig.{which}.path: {folder} is not a local checkpoint folder (nothing is downloaded)")
        model = AutoModel.from_pretrained(str(folder)) if pretrained else AutoModel.from_config(AutoConfig.from_pretrained(str(folder)))
        if model.get_input_embeddings().num_embeddings != vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    return small_llama(vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, max_positions)


def item_token_rows(ids: torch.Tensor, padding: torch.Tensor, item_token: int) -> torch.Tensor:
    """(N, T) right-padded text ids + (N, T) padding flags -> (N, T + 1) ids with [ITEM] after each text."""
    lengths = (~padding).sum(1)  # (N,)
    rows = torch.cat([ids.masked_fill(padding, PAD), torch.full((len(ids), 1), PAD, dtype=ids.dtype)], dim=1)
    rows[torch.arange(len(ids)), lengths] = item_token
    return rows


class HLLMNetwork(nn.Module):
    """Item LLM + user LLM, with the catalog's tokenized descriptions as buffers (saved with the weights)."""

    def __init__(self, cfg: HLLMConfig, item_tokens: torch.Tensor, text_vocab: torch.Tensor, pretrained: bool = True):
        super().__init__()
        self.register_buffer("item_tokens", item_tokens)  # (num_behaviors, T + 1) compact ids, [ITEM] last, PAD after
        self.register_buffer("text_vocab", text_vocab)  # compact id -> tokenizer id
        self.item_llm = build_llm(cfg.item_llm, len(text_vocab) + 1, item_tokens.shape[1], "item_llm", pretrained)
        self.user_llm = build_llm(cfg.user_llm, 1, cfg.train.max_len, "user_llm", pretrained)  # reads inputs_embeds only
        d_item, d_user = self.item_llm.config.hidden_size, self.user_llm.config.hidden_size
        self.item_to_user = nn.Identity() if d_item == d_user else nn.Linear(d_item, d_user)
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def num_items(self) -> int:
        return self.item_tokens.shape[0]

    def encode_items(self, items: torch.Tensor, chunk: int, progress: bool = False) -> torch.Tensor:
        """(n,) behaviour indices -> (n, D_user) item embeddings: the item LLM's state at [ITEM]."""
        tokens = self.item_tokens[items]  # (n, T + 1)
        lengths = (tokens != PAD).sum(1)  # [ITEM] sits at lengths - 1
        order = torch.argsort(lengths, stable=True)  # similar lengths share a chunk: little padding
        parts = []
        for lo in tqdm(range(0, len(order), chunk), desc="hllm items", leave=False, disable=None if progress else True):
            idx = order[lo : lo + chunk]
            ids = tokens[idx, : int(lengths[idx].max())]  # (c, t)
            hidden = self.item_llm(input_ids=ids, attention_mask=(ids != PAD).long()).last_hidden_state  # (c, t, H)
            parts.append(hidden[torch.arange(len(idx), device=ids.device), lengths[idx] - 1])
        emb = torch.cat(parts)[torch.argsort(order)]  # back to the order of `items`
        return self.item_to_user(emb)

    def encode_users(self, item_emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) item embeddings of left-padded histories + (B, L) validity -> (B, L, D) user states."""
        x = self.drop(item_emb) * valid.unsqueeze(-1)
        return self.user_llm(inputs_embeds=x, attention_mask=valid.long()).last_hidden_state


def gather_histories(table: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(U, D) embeddings, (n,) table row of each valid position (row-major), (B, L) validity -> (B, L, D), zeros elsewhere."""
    out = table.new_zeros(*valid.shape, table.shape[1])
    out[valid] = table[rows]
    return out


class HLLM(SequentialRecommender):
    """`fit` / `score` of the HLLM baseline; `attach(dataset)` first, for the behaviour descriptions."""

    name = "hllm"

    def __init__(self, cfg: HLLMConfig | None = None):
        super().__init__(cfg or HLLMConfig())
        self.item_tokens: torch.Tensor | None = None  # (num_behaviors, T + 1)
        self.text_vocab: torch.Tensor | None = None
        self._catalog: torch.Tensor | None = None  # (num_behaviors, D) for scoring; None whenever weights change

    @classmethod
    def describe(cls) -> str:
        return super().describe() + "; attach(dataset) first: the item LLM reads the behaviour descriptions"

    # -- behaviour texts -------------------------------------------------------------------------------

    def attach(self, dataset) -> None:
        """Tokenize the descriptions of `dataset` (a `SequenceDataset`), in the catalog order of its event log."""
        behaviors = dataset.behaviors()
        if "description" not in behaviors:
            raise ValueError(f"hllm: the behaviours table has no 'description' column (columns: {list(behaviors.columns)})")
        if len(behaviors) != dataset.event_log.num_behaviors:
            raise ValueError(f"hllm: {len(behaviors)} behaviour rows for a catalog of {dataset.event_log.num_behaviors}")
        self.set_texts(behaviors["description"], behaviors["behavior_id"] if "behavior_id" in behaviors else None)

    def set_texts(self, texts: Sequence[str], behavior_ids: Sequence[str] | None = None) -> None:
        """Tokenize one description per behaviour (catalog order) onto a compact vocabulary fitted to them."""
        texts = pd.Series(list(texts), dtype=object)
        missing = np.flatnonzero(texts.isna().to_numpy() | ~texts.map(lambda t: isinstance(t, str)).to_numpy())
        if len(missing):
            names = [behavior_ids[i] for i in missing[:5]] if behavior_ids is not None else missing[:5].tolist()
            raise ValueError(f"hllm: {len(missing)} behaviours have no text description, e.g. rows {missing[:5].tolist()} ({names})")
        tokenizer = TextTokenizer(self.cfg.tokenizer, max_len=self.cfg.max_text_len).fit(texts.tolist())
        ids, padding = tokenizer(texts.tolist())  # (N, T), [CLS] ... [SEP]
        self.text_vocab = torch.as_tensor(tokenizer.vocab, dtype=torch.int64)
        self.item_tokens = item_token_rows(ids, padding, item_token=len(tokenizer))
        log.info(
            "hllm: %d behaviour texts, %d-token compact vocabulary, up to %d tokens each",
            len(texts),
            len(tokenizer),
            self.item_tokens.shape[1],
        )

    def build_encoder(self, num_behaviors: int, pretrained: bool = True) -> HLLMNetwork:
        if self.item_tokens is None:
            raise RuntimeError("hllm: call attach(dataset) before fit: the item LLM reads the behaviour descriptions")
        if self.item_tokens.shape[0] != num_behaviors:
            raise ValueError(f"hllm: {self.item_tokens.shape[0]} behaviour texts attached but the log's catalog has {num_behaviors}")
        return HLLMNetwork(self.cfg, self.item_tokens, self.text_vocab, pretrained)

    # -- persistence (training.checkpoint) -------------------------------------------------------------

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], device: str = "cpu") -> None:
        """Rebuild from saved tensors alone: the item tokens travel with the weights."""
        self.item_tokens, self.text_vocab = tensors["item_tokens"], tensors["text_vocab"]
        self.device = select_device(device)
        self.amp_dtype = device_info(self.device).amp_dtype
        self.encoder = self.build_encoder(self.item_tokens.shape[0], pretrained=False).to(self.device)
        self.encoder.load_state_dict(tensors)
        self.encoder.eval()
        self._catalog = None

    # -- scoring ---------------------------------------------------------------------------------------

    def _catalog_embeddings(self) -> torch.Tensor:
        """(num_behaviors, D) every behaviour's item embedding, computed once per set of weights."""
        if self._catalog is None:
            with torch.no_grad(), self._autocast():
                items = torch.arange(self.encoder.num_items, device=self.device)
                self._catalog = self.encoder.encode_items(items, self.cfg.item_batch, progress=True).float()
        return self._catalog

    def _similarity_inputs(self, hidden: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train_cfg.l2_norm:
            return F.normalize(hidden, dim=-1), F.normalize(table, dim=-1)
        return hidden, table

    @torch.no_grad()
    def score(self, log_: EventLog, cases: EvalSet, candidates: np.ndarray) -> np.ndarray:
        """(B, C) similarity of the user LLM's last state with each candidate's item embedding."""
        check_catalog(log_, None if self.encoder is None else self.encoder.num_items, self.name)
        was_training = self.encoder.training
        self.encoder.eval()
        catalog = self._catalog_embeddings()
        items, _ = left_padded(log_, log_.offsets[cases.users], cases.history_end, self.train_cfg.max_len)
        items = torch.from_numpy(items).to(self.device)
        valid = items != PAD
        with self._autocast():
            hidden = self.encoder.encode_users(gather_histories(catalog, items[valid] - 1, valid), valid)[:, -1].float()  # (B, D)
        cand = torch.as_tensor(np.asarray(candidates, np.int64), device=self.device)
        hidden, table = self._similarity_inputs(hidden, catalog[cand])
        self.encoder.train(was_training)
        return (hidden @ table.T / self.train_cfg.temperature).cpu().numpy()

    # -- training --------------------------------------------------------------------------------------

    def _step_loss(
        self,
        encoder: nn.Module,
        tokens: torch.Tensor,
        times: torch.Tensor,
        num_tokens: int,
        log_q: torch.Tensor | None,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """InfoNCE of one batch of (B, L + 1) windows; the item LLM runs once per distinct item. (Reads
        `self.encoder`'s two towers directly: `fit` refuses data parallel, which goes through forward.)"""
        tc = self.train_cfg
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        valid = inputs != PAD  # left padding: a real input always has a real next event
        positives = targets[valid]  # (P,)
        negatives = self._negatives(positives, num_tokens, gen)  # (N,)
        n_in, n_pos = int(valid.sum()), len(positives)
        uniq, slot = torch.unique(torch.cat([inputs[valid], positives, negatives]), return_inverse=True)
        with self._autocast():
            table = self.encoder.encode_items(uniq - 1, self.cfg.item_batch)  # (U, D)
            hidden = self.encoder.encode_users(gather_histories(table, slot[:n_in], valid), valid)  # (B, L, D)
        h, table = self._similarity_inputs(hidden[valid].float(), table.float())
        return sampled_softmax_loss(
            h, slot[n_in : n_in + n_pos], slot[n_in + n_pos :], table, None if log_q is None else log_q[uniq], tc.temperature
        )

    def _weights_changed(self) -> None:
        self._catalog = None  # the cached catalog embeddings came from the old weights

    def fit(self, split: Split, eval_cfg: EvalConfig | None = None, candidates: np.ndarray | None = None, checkpoint_dir=None) -> dict:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("HLLM trains its two towers outside forward(): data parallel (torchrun) is not supported for it")
        if self.train_cfg.full_softmax:
            raise ValueError("HLLMConfig.train.full_softmax is not supported: every step would run the item LLM over the whole catalog")
        return super().fit(split, eval_cfg, candidates, checkpoint_dir)
