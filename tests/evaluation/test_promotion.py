"""The promotion gate: the same validation cases for both models, a margin, a registry entry with metrics."""

import json

from gts_lum.evaluation.promotion import LocalRegistry, PromotionConfig, data_version, promotion_gate
from gts_lum.training.train import train_model


def test_gate_promotes_only_a_better_model(cycle_data, tmp_path):
    seq = cycle_data.root
    weak, strong = tmp_path / "popularity", tmp_path / "markov"
    train_model(seq, "popularity", None, None, weak)
    train_model(seq, "markov", None, None, strong)
    registry = str(tmp_path / "registry")
    cfg = PromotionConfig(margin=0.05)

    first = promotion_gate(seq, weak, registry, cfg)  # nothing in production: promoted
    assert first["promoted"] and first["registered"]["version"] == "1" and first["production"] is None

    better = promotion_gate(seq, strong, registry, cfg)  # the Markov chain knows the cycle
    assert better["promoted"] and better["candidate"] > better["production"] and better["gain"] >= 0.05

    worse = promotion_gate(seq, weak, registry, cfg)  # the old model again: refused, registry unchanged
    assert not worse["promoted"] and "margin" in worse["reason"]
    entries = json.loads((tmp_path / "registry" / "registry.json").read_text())["versions"]
    assert [e["uri"].endswith("markov") for e in entries] == [False, True]
    prod = LocalRegistry(registry).production("gts-lum")
    assert prod["metrics"]["NDCG@10"] == better["candidate"] and prod["data_version"] == data_version(seq)
