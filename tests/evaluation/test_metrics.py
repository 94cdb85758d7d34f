import math

import numpy as np
import pytest

from gts_lum.data.events import EventLog
from gts_lum.evaluation.metrics import ranking_metrics, target_ranks
from gts_lum.evaluation.protocol import EvalConfig, evaluate
from gts_lum.sequence.splits import EvalSet


def test_metrics_against_hand_computed_values():
    ranks = np.array([0, 1, 4, 9, 60, 300])
    m = ranking_metrics(ranks, (5, 10, 50, 200))
    assert m["R@5"] == pytest.approx(3 / 6)
    assert m["R@10"] == pytest.approx(4 / 6)
    assert m["R@50"] == pytest.approx(4 / 6)
    assert m["R@200"] == pytest.approx(5 / 6)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 6)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 6)
    assert m["NDCG@200"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11) + 1 / math.log2(62)) / 6)
    assert m["MRR"] == pytest.approx(np.mean(1 / (ranks + 1)))


def test_ranks_and_ties():
    scores = np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0]])
    r = target_ranks(scores, np.array([2, 0]), np.random.default_rng(0))
    assert r[0] == 1
    # a constant scorer gets a random place among the ties, not the first one
    many = target_ranks(np.ones((2000, 100)), np.zeros(2000, dtype=int), np.random.default_rng(1))
    assert 40 < many.mean() < 60


class _Fixed:
    def __init__(self, s):
        self.s = s

    def score(self, log, cases, candidates):
        return np.tile(self.s[candidates], (len(cases), 1))


def test_protocol_candidate_subset_and_history_filter():
    # one user: history [0, 1], target 2
    log = EventLog(
        np.array(["u"], object), np.array(list("abcd"), object), np.array([0, 3]), np.array([0, 1, 2], np.int32), np.array([1, 2, 3])
    )
    cases = EvalSet(np.array([0]), np.array([2]), np.array([2], np.int32), np.array([3]))
    model = _Fixed(np.array([9.0, 8.0, 7.0, 1.0]))
    assert evaluate(model, log, cases, cfg=EvalConfig(ks=(1, 3)))["R@1"] == 0.0
    filtered = evaluate(model, log, cases, cfg=EvalConfig(ks=(1, 3), history_filter=True))
    assert filtered["R@1"] == 1.0  # a and b were seen, so c comes first
    out = evaluate(model, log, cases, candidates=np.array([0, 1, 3]), cfg=EvalConfig(ks=(1,)))
    assert out["skipped_target_not_candidate"] == 1 and out["n"] == 0
