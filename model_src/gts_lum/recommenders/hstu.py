"""HSTU as a recommender: the network (`modeling.hstu`) with its training config, fit and score
(`recommenders.sequential`).

Run it from its config:

    from gts_lum.recommenders.registry import build_model
    model = build_model("hstu", "pkg:models/hstu.yaml", ["num_layers=4"])
    stats = model.fit(split, eval_cfg)
    scores = model.score(split.log, split.test, candidates)  # (B, C)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gts_lum.modeling.hstu import HSTUEncoder, HSTUNetConfig
from gts_lum.recommenders.sequential import SequentialRecommender
from gts_lum.training.sequential import SequentialTrainConfig


@dataclass
class HSTUConfig(HSTUNetConfig):
    train: SequentialTrainConfig = field(default_factory=SequentialTrainConfig)


class HSTU(SequentialRecommender):
    name = "hstu"

    def __init__(self, cfg: HSTUConfig | None = None):
        super().__init__(cfg or HSTUConfig())

    def build_encoder(self, num_behaviors: int) -> HSTUEncoder:
        return HSTUEncoder(num_behaviors, self.cfg.train.max_len, self.cfg)
