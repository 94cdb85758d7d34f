"""The recommender of the ID-based sequence models: `fit` / `score` / save and load around any
`SequenceEncoder` (SASRec, HSTU and HLLM subclass it). Its training is `training.sequential.SequentialTask`
run by `training.loop.train_loop`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gts_lum.data.events import EventLog
from gts_lum.device import device_info, select_device
from gts_lum.evaluation.protocol import EvalConfig
from gts_lum.modeling.sequence_encoder import PAD, SequenceEncoder
from gts_lum.recommenders.baselines import check_catalog
from gts_lum.sequence.splits import EvalSet, Split
from gts_lum.training.loop import train_loop
from gts_lum.training.sequential import SequentialTask, SequentialTrainConfig, left_padded, sampled_softmax_loss


class SequentialRecommender:
    """`fit` / `score` for any `SequenceEncoder`. Subclasses set `name` and implement `build_encoder`.

    The config must carry the encoder fields and a `train: SequentialTrainConfig`.
    """

    name = "sequential"

    def __init__(self, cfg):
        self.cfg = cfg
        self.encoder: SequenceEncoder | None = None
        self.device = torch.device("cpu")
        self.amp_dtype: torch.dtype | None = None

    def build_encoder(self, num_behaviors: int) -> SequenceEncoder:
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        return (
            f"{cls.name}: build_model('{cls.name}', 'pkg:models/{cls.name}.yaml', overrides); "
            "fit(split, eval_cfg) trains on split.train and keeps the best epoch on split.valid; "
            "score(log, cases, candidates) -> (B, C)"
        )

    @property
    def train_cfg(self) -> SequentialTrainConfig:
        return self.cfg.train

    # -- persistence (training.checkpoint) -------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.encoder.state_dict()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], device: str = "cpu") -> None:
        num_behaviors = self.encoder_catalog_size(tensors)
        self.device = select_device(device)
        self.amp_dtype = device_info(self.device).amp_dtype
        self.encoder = self.build_encoder(num_behaviors).to(self.device)
        self.encoder.load_state_dict(tensors)
        self.encoder.eval()

    @staticmethod
    def encoder_catalog_size(tensors: dict[str, torch.Tensor]) -> int:
        """Behaviours in the catalog a saved encoder was built for (its item table has one padding row)."""
        return int(tensors["item_emb.weight"].shape[0]) - 1

    # -- scoring ---------------------------------------------------------------------------------------

    def _output_table(self) -> torch.Tensor:
        table = self.encoder.item_emb.weight
        return F.normalize(table, dim=-1) if self.train_cfg.l2_norm else table

    def _encode_last(self, items: np.ndarray, times: np.ndarray) -> torch.Tensor:
        with self._autocast():
            hidden = self.encoder(torch.from_numpy(items).to(self.device), torch.from_numpy(times).to(self.device))[:, -1]
        hidden = hidden.float()
        return F.normalize(hidden, dim=-1) if self.train_cfg.l2_norm else hidden

    @torch.no_grad()
    def score(self, log_: EventLog, cases: EvalSet, candidates: np.ndarray) -> np.ndarray:
        """(B, C) similarity of each history's last hidden state with each candidate's embedding."""
        check_catalog(log_, None if self.encoder is None else self.encoder.item_emb.num_embeddings - 1, self.name)
        was_training = self.encoder.training
        self.encoder.eval()
        items, times = left_padded(log_, log_.offsets[cases.users], cases.history_end, self.train_cfg.max_len)
        hidden = self._encode_last(items, times)  # (B, D)
        cand = torch.as_tensor(np.asarray(candidates, np.int64) + 1, device=self.device)
        scores = hidden @ self._output_table()[cand].T.float() / self.train_cfg.temperature
        self.encoder.train(was_training)
        return scores.cpu().numpy()

    # -- training --------------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None and self.train_cfg.amp)

    def _log_q(self, train: EventLog, num_tokens: int) -> torch.Tensor | None:
        """Log expected count of each token among one batch's negatives; None when it is a constant."""
        tc = self.train_cfg
        if tc.full_softmax or tc.in_batch_negatives == 0:
            return None  # uniform only: the correction shifts every logit equally
        # In-batch negatives are targets picked uniformly among a batch's positions, so token j is drawn
        # with its training frequency; uniform negatives add num_negatives / num_behaviors to every token.
        counts = np.bincount(train.behavior.astype(np.int64) + 1, minlength=num_tokens).astype(np.float64)
        expected = tc.in_batch_negatives * counts / max(counts.sum(), 1.0)
        expected[1:] += tc.num_negatives / (num_tokens - 1)
        return torch.as_tensor(np.log(np.maximum(expected, 1e-12)), dtype=torch.float32, device=self.device)

    def _negatives(self, targets: torch.Tensor, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
        tc = self.train_cfg
        parts = []
        if tc.num_negatives:
            parts.append(torch.randint(1, num_tokens, (tc.num_negatives,), generator=gen).to(self.device))
        if tc.in_batch_negatives:
            pick = torch.randint(0, len(targets), (tc.in_batch_negatives,), generator=gen).to(self.device)
            parts.append(targets[pick])
        return torch.cat(parts)

    def _weights_changed(self) -> None:
        """Called after every change of the weights: models that cache derived tensors drop them here."""

    def _step_loss(
        self,
        encoder: nn.Module,
        tokens: torch.Tensor,
        times: torch.Tensor,
        num_tokens: int,
        log_q: torch.Tensor | None,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """Loss of one batch of (B, L + 1) left-padded windows (tokens and unix seconds): next event at every
        position. `encoder`: `self.encoder`, or its DistributedDataParallel wrapper under torchrun."""
        tc = self.train_cfg
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with self._autocast():
            hidden = encoder(inputs, times[:, :-1])  # (B, L, D)
        has_target = inputs != PAD  # left padding: a real input always has a real next event
        h = hidden[has_target].float()
        pos = targets[has_target]
        if tc.l2_norm:
            h = F.normalize(h, dim=-1)
        table = self._output_table().float()
        if tc.full_softmax:
            return F.cross_entropy(h @ table[1:].T / tc.temperature, pos - 1)  # (P, V - 1) logits
        return sampled_softmax_loss(h, pos, self._negatives(pos, num_tokens, gen), table, log_q, tc.temperature)

    def fit(
        self,
        split: Split,
        eval_cfg: EvalConfig | None = None,
        candidates: np.ndarray | None = None,
        checkpoint_dir: str | Path | None = None,
    ) -> dict:
        """Train on `split.train`, select the epoch on `split.valid`; returns training statistics."""
        tc = self.train_cfg
        if not tc.full_softmax and tc.num_negatives + tc.in_batch_negatives <= 0:
            raise ValueError("train.num_negatives + train.in_batch_negatives must be positive")
        if tc.max_len < 1 or tc.batch_size < 1:
            raise ValueError(f"train.max_len and train.batch_size must be >= 1, got {tc.max_len}, {tc.batch_size}")
        torch.manual_seed(tc.seed)
        self.device = select_device(tc.device)
        self.amp_dtype = device_info(self.device).amp_dtype
        self.encoder = self.build_encoder(split.train.num_behaviors).to(self.device)
        self._weights_changed()
        stats = train_loop(SequentialTask(self, split, eval_cfg, candidates), tc, checkpoint_dir, self.device)
        stats["device"] = str(self.device)
        return stats
