import numpy as np
import pandas as pd
import pytest

from gts_lum.data.events import EventLog
from gts_lum.evaluation.protocol import EvalConfig, evaluate
from gts_lum.recommenders.baselines import MarkovChain, MarkovConfig, Popularity, PopularityConfig
from gts_lum.sequence.splits import leave_one_out

DAY = 86400


def make_log(sequences: dict[str, list[str]], catalog: list[str] | None = None) -> EventLog:
    rows = [(u, b, DAY * t) for u, seq in sequences.items() for t, b in enumerate(seq)]
    df = pd.DataFrame(rows, columns=["user_id", "behavior_id", "timestamp"])
    return EventLog.from_frame(df, behavior_ids=None if catalog is None else np.array(catalog, dtype=object))


def index(log: EventLog, names: str) -> list[int]:
    return [list(log.behavior_ids).index(n) for n in names]


def test_popularity_counts_training_events_only():
    # "z" occurs only as test targets (last events): it must not count.
    split = leave_one_out(make_log({"u1": list("aabxz"), "u2": list("abaxz"), "u3": list("acbyz")}))
    model = Popularity()
    model.fit(split)
    candidates = np.arange(split.log.num_behaviors)
    scores = model.score(split.log, split.test, candidates)
    assert scores.shape == (3, split.log.num_behaviors)
    a, b, c, x, y, z = index(split.log, "abcxyz")
    # training events: aab, aba, acb -> a:5, b:3, c:1; x, y are validation targets, z test targets
    assert scores[0, [a, b, c, x, y, z]].tolist() == [5, 3, 1, 0, 0, 0]
    assert np.all(scores == scores[0])


def test_popularity_half_life_weights_by_age():
    split = leave_one_out(make_log({"u1": list("abbvt")}))  # train a (day 0), b (day 1), b (day 2)
    model = Popularity(PopularityConfig(half_life_days=1.0))
    model.fit(split)
    a, b = index(split.log, "ab")
    np.testing.assert_allclose(model.counts[[a, b]], [0.25, 0.5 + 1.0])


def test_popularity_wins_on_popularity_driven_data():
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 31) ** 1.5
    seqs = {f"u{i}": [f"i{j:02d}" for j in rng.choice(30, size=12, p=weights / weights.sum())] for i in range(200)}
    split = leave_one_out(make_log(seqs))
    pop, markov = Popularity(), MarkovChain(MarkovConfig(smoothing=0.0))
    for m in (pop, markov):
        m.fit(split)
    cfg = EvalConfig(ks=(5,))
    assert evaluate(pop, split.log, split.test, cfg=cfg)["NDCG@5"] > evaluate(markov, split.log, split.test, cfg=cfg)["NDCG@5"]


def test_markov_transition_counts_and_smoothed_scores_by_hand():
    # train: u1 a b a c, u2 a b; last two events of each user are held out.
    split = leave_one_out(make_log({"u1": list("abacxy"), "u2": list("abxy")}))
    model = MarkovChain(MarkovConfig(smoothing=2.0))
    stats = model.fit(split)
    a, b, c, x, y = index(split.log, "abcxy")
    t = model.transitions.toarray()
    assert stats["transitions"] == 4  # a->b, b->a, a->c (u1), a->b (u2); nothing crosses users
    assert t[a, b] == 2 and t[b, a] == 1 and t[a, c] == 1 and t.sum() == 4
    # test case of u1: history ends with x, which has no training transition -> pure popularity prior
    # validation case of u1: history ends with c (no outgoing transition) -> prior; of u2: ends with b.
    prior = np.zeros(5)
    prior[[a, b, c]] = [3 / 6, 2 / 6, 1 / 6]
    cand = np.array([a, b, c, x, y])
    scores = model.score(split.log, split.valid, cand)
    u2 = list(split.log.user_ids[split.valid.users]).index("u2")
    # from b: one transition (to a); P(j | b) = (C[b, j] + 2 * prior_j) / (1 + 2)
    expected = (np.array([1, 0, 0, 0, 0]) + 2.0 * prior[cand]) / 3.0
    np.testing.assert_allclose(scores[u2], expected)
    np.testing.assert_allclose(model.score(split.log, split.test, cand)[0], prior[cand])


def test_markov_learns_a_cycle_and_selects_smoothing_on_validation():
    names = [f"s{k}" for k in range(8)]
    rng = np.random.default_rng(1)
    seqs = {}
    for u in range(40):
        start = int(rng.integers(8))
        seqs[f"u{u}"] = [names[(start + t) % 8] for t in range(int(rng.integers(6, 15)))]
    split = leave_one_out(make_log(seqs))
    cfg = EvalConfig(ks=(1, 10))
    model = MarkovChain(MarkovConfig(smoothing_grid=[1.0, 1e6], select_metric="NDCG@10"))
    stats = model.fit(split, cfg)
    assert stats["smoothing"] == 1.0  # the huge smoothing is plain popularity, worse on validation
    assert set(stats["grid"]) == {1.0, 1e6}
    assert evaluate(model, split.log, split.test, cfg=cfg)["R@1"] == 1.0


def test_fit_ignores_test_targets():
    # Two logs that differ only in each user's last event (the test target) give identical models.
    base = {"u1": list("abcabcab"), "u2": list("bcabca"), "u3": list("cabcab")}
    other = {u: s[:-1] + ["c" if s[-1] != "c" else "a"] for u, s in base.items()}
    catalog = list("abc")
    fitted = []
    for seqs in (base, other):
        split = leave_one_out(make_log(seqs, catalog))
        model = MarkovChain()
        stats = model.fit(split, EvalConfig(ks=(1, 10)))
        fitted.append(
            (model.transitions.toarray(), model.popularity.counts, stats["grid"], model.score(split.log, split.valid, np.arange(3)))
        )
    for left, right in zip(*fitted):
        if isinstance(left, dict):
            assert left == right
        else:
            np.testing.assert_array_equal(left, right)


def test_scoring_errors_are_clear():
    split = leave_one_out(make_log({"u1": list("abcd")}))
    with pytest.raises(RuntimeError, match="before fit"):
        MarkovChain().score(split.log, split.test, np.arange(4))
    model = Popularity()
    model.fit(split)
    other = make_log({"u1": list("abcde")})
    with pytest.raises(ValueError, match="5 behaviours but the model was fit on 4"):
        model.score(other, split.test, np.arange(4))
    with pytest.raises(ValueError, match="half_life_days"):
        Popularity(PopularityConfig(half_life_days=0.0)).fit(split)
    with pytest.raises(ValueError, match="select_metric 'NDCG@10'"):
        MarkovChain().fit(split, EvalConfig(ks=(5,)))
