"""The HLLM baseline as a recommender: the two LLMs (`modeling.hllm`) with their training config, the
behaviour texts they read, fit and score (`recommenders.sequential`).

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
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gts_lum.data.events import EventLog
from gts_lum.device import device_info, select_device
from gts_lum.evaluation.protocol import EvalConfig
from gts_lum.modeling.hllm import HLLMNetConfig, HLLMNetwork, gather_histories, item_token_rows
from gts_lum.modeling.qformer import TextTokenizer
from gts_lum.modeling.sequence_encoder import PAD
from gts_lum.recommenders.baselines import check_catalog
from gts_lum.recommenders.sequential import SequentialRecommender
from gts_lum.sequence.splits import EvalSet, Split
from gts_lum.training.sequential import SequentialTrainConfig, left_padded, sampled_softmax_loss

log = logging.getLogger(__name__)


@dataclass
class HLLMConfig(HLLMNetConfig):
    train: SequentialTrainConfig = field(default_factory=SequentialTrainConfig)


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
        return HLLMNetwork(self.cfg, self.item_tokens, self.text_vocab, self.cfg.train.max_len, pretrained)

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
