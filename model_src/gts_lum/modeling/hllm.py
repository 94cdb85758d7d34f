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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from gts_lum.modeling.decoder import small_llama
from gts_lum.modeling.qformer import DEFAULT_TOKENIZER
from gts_lum.modeling.sequence_encoder import PAD


@dataclass
class LLMConfig:
    """One of HLLM's two LLMs: a local HF checkpoint, or a fresh Llama of these sizes."""

    path: str = ""  # local checkpoint folder for AutoModel.from_pretrained; empty: LlamaConfig from the sizes below
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128


@dataclass
class HLLMNetConfig:
    """The two LLMs' settings; `recommenders.hllm.HLLMConfig` adds the training's (`train`)."""

    item_llm: LLMConfig = field(default_factory=LLMConfig)
    user_llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: str = DEFAULT_TOKENIZER  # local BERT-family WordPiece folder, or "default" (bundled MiniLM)
    max_text_len: int = 24  # WordPiece tokens per description, [CLS] and [SEP] included; [ITEM] follows
    item_batch: int = 1024  # items per item-LLM forward (bounds activation memory)
    dropout: float = 0.0  # on the item embeddings the user LLM reads

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

    def __init__(self, cfg: HLLMNetConfig, item_tokens: torch.Tensor, text_vocab: torch.Tensor, max_len: int, pretrained: bool = True):
        super().__init__()
        self.register_buffer("item_tokens", item_tokens)  # (num_behaviors, T + 1) compact ids, [ITEM] last, PAD after
        self.register_buffer("text_vocab", text_vocab)  # compact id -> tokenizer id
        self.item_llm = build_llm(cfg.item_llm, len(text_vocab) + 1, item_tokens.shape[1], "item_llm", pretrained)
        self.user_llm = build_llm(cfg.user_llm, 1, max_len, "user_llm", pretrained)  # reads inputs_embeds only
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
