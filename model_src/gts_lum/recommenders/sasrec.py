"""SASRec as a recommender: the network (`modeling.sasrec`) with its training config, fit and score
(`recommenders.sequential`).

Run it from its config:

    from gts_lum.recommenders.registry import build_model
    model = build_model("sasrec", "pkg:models/sasrec.yaml", ["train.lr=5e-4"])
    stats = model.fit(split, eval_cfg)          # trains on split.train, picks the epoch on split.valid
    scores = model.score(split.log, split.test, candidates)  # (B, C)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gts_lum.modeling.sasrec import SASRecEncoder, SASRecNetConfig
from gts_lum.recommenders.sequential import SequentialRecommender
from gts_lum.training.sequential import SequentialTrainConfig


@dataclass
class SASRecConfig(SASRecNetConfig):
    train: SequentialTrainConfig = field(default_factory=SequentialTrainConfig)


class SASRec(SequentialRecommender):
    name = "sasrec"

    def __init__(self, cfg: SASRecConfig | None = None):
        super().__init__(cfg or SASRecConfig())

    def build_encoder(self, num_behaviors: int) -> SASRecEncoder:
        return SASRecEncoder(num_behaviors, self.cfg.train.max_len, self.cfg)
