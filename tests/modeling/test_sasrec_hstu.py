import numpy as np
import pandas as pd
import pytest
import torch

from gts_lum.config import load_config
from gts_lum.data.events import EventLog
from gts_lum.evaluation.protocol import EvalConfig, evaluate
from gts_lum.modeling.hstu import HSTUEncoder, time_buckets
from gts_lum.modeling.sasrec import SASRecEncoder
from gts_lum.recommenders.hstu import HSTU, HSTUConfig
from gts_lum.recommenders.sasrec import SASRec, SASRecConfig
from gts_lum.sequence.splits import leave_one_out
from gts_lum.training.sequential import left_padded, sampled_softmax_loss, training_windows

TINY_TRAIN = {"max_len": 8, "batch_size": 16, "lr": 0.01, "epochs": 30, "patience": 8, "num_negatives": 6, "device": "cpu"}
MODELS = {
    "sasrec": (SASRecConfig, SASRec, {"dim": 16, "num_layers": 1, "dropout": 0.0}),
    "hstu": (HSTUConfig, HSTU, {"dim": 16, "num_layers": 1, "qk_dim": 8, "v_dim": 8, "dropout": 0.0}),
}


def cyclic_log(num_users=40, period=6, seed=0, last_override=None) -> EventLog:
    """Each user walks the cycle s0 -> s1 -> ... -> s5 -> s0 from a random start, one event an hour."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        start, n = int(rng.integers(period)), int(rng.integers(6, 14))
        seq = [(start + t) % period for t in range(n)]
        if last_override is not None:
            seq[-1] = last_override(seq[-1])
        rows += [(f"u{u:02d}", f"s{b}", 3600 * t) for t, b in enumerate(seq)]
    df = pd.DataFrame(rows, columns=["user_id", "behavior_id", "timestamp"])
    return EventLog.from_frame(df, behavior_ids=np.array([f"s{b}" for b in range(period)], dtype=object))


def build(name, **train):
    config_cls, model_cls, arch = MODELS[name]
    return model_cls(load_config(config_cls, None, {**arch, "train": {**TINY_TRAIN, **train}}))


@pytest.mark.parametrize("full_softmax", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_learns_a_cycle_and_scores_full_shape(name, full_softmax):
    split = leave_one_out(cyclic_log())
    model = build(name, full_softmax=full_softmax)
    stats = model.fit(split, EvalConfig(ks=(1, 10)))
    assert 0 <= stats["best_epoch"] < stats["epochs"] <= TINY_TRAIN["epochs"]
    scores = model.score(split.log, split.test, np.array([0, 2, 4]))
    assert scores.shape == (len(split.test), 3) and np.isfinite(scores).all()
    assert evaluate(model, split.log, split.test, cfg=EvalConfig(ks=(1,)))["R@1"] >= 0.95


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_by_seed_and_blind_to_test_targets(name):
    # The second log differs only in each user's last event (the test target): training must not see it.
    split_a = leave_one_out(cyclic_log())
    split_b = leave_one_out(cyclic_log(last_override=lambda b: (b + 3) % 6))
    assert not np.array_equal(split_a.test.target, split_b.test.target)
    runs = []
    for split in (split_a, split_a, split_b):
        model = build(name, epochs=3)
        stats = model.fit(split, EvalConfig(ks=(1, 10)))
        runs.append(([h["loss"] for h in stats["history"]], model.score(split.log, split.valid, np.arange(6))))
    for losses, scores in runs[1:]:
        assert losses == runs[0][0]
        np.testing.assert_array_equal(scores, runs[0][1])
    other_seed = build(name, epochs=3, seed=1)
    other_seed.fit(split_a, EvalConfig(ks=(1, 10)))
    assert not np.array_equal(other_seed.score(split_a.log, split_a.valid, np.arange(6)), runs[0][1])


def random_inputs(batch=3, length=10, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, vocab + 1, (batch, length), generator=g)
    items[0, :4] = 0  # a left-padded row
    times = torch.cumsum(torch.randint(0, 10**6, (batch, length), generator=g), dim=1)
    return items, times


def encoders():
    torch.manual_seed(0)
    hstu = HSTUEncoder(20, 10, HSTUConfig(dim=16, num_layers=2, qk_dim=8, v_dim=8, dropout=0.0))
    for layer in hstu.layers:  # zero-initialized biases would hide the time path
        torch.nn.init.normal_(layer.rab.time)
        torch.nn.init.normal_(layer.rab.position)
    sasrec = SASRecEncoder(20, 10, SASRecConfig(dim=16, num_layers=2, num_heads=2, dropout=0.0))
    return {"hstu": hstu.eval(), "sasrec": sasrec.eval()}


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_attention_is_causal(name):
    encoder = encoders()[name]
    items, times = random_inputs()
    t = 6
    changed_items, changed_times = items.clone(), times.clone()
    changed_items[:, t] = (items[:, t] % 20) + 1
    changed_times[:, t:] += 12345
    with torch.no_grad():
        before, after = encoder(items, times), encoder(changed_items, changed_times)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=0)
    assert (before[:, t] - after[:, t]).abs().max() > 1e-4


def test_hstu_uses_time_gaps_through_the_time_bias():
    encoder = encoders()["hstu"]
    items, times = random_inputs()
    stretched = times * 7  # same order and positions, different gaps
    with torch.no_grad():
        assert (encoder(items, times) - encoder(items, stretched)).abs().max() > 1e-3
        for layer in encoder.layers:
            layer.rab.time.zero_()
        torch.testing.assert_close(encoder(items, times), encoder(items, stretched))


def test_time_buckets_are_log_scaled_gaps():
    times = torch.tensor([[0, 1, 3, 100]])
    buckets = time_buckets(times, base=2.0, num_buckets=5)
    # gap t_i - t_j: log2(1 + gap) floored, capped at 4; future keys (negative gap) -> bucket 0
    assert buckets[0, 3].tolist() == [4, 4, 4, 0]  # gaps 100, 99, 97, 0: log2(101) = 6.66 -> capped
    assert buckets[0, 2].tolist() == [2, 1, 0, 0]  # gaps 3, 2, 0, -97
    assert buckets[0, 1].tolist() == [1, 0, 0, 0]


def test_left_padded_and_training_windows():
    log = EventLog.from_frame(
        pd.DataFrame({"user_id": ["a"] * 6 + ["b"] * 2 + ["c"], "behavior_id": list("xyzxyzzxy"), "timestamp": [1, 2, 3, 4, 5, 6, 1, 2, 1]})
    )
    starts, ends = training_windows(log, max_len=2)
    # user a (rows 0-5, 5 transitions): windows rows 3:6, 1:4, 0:2; b (rows 6-7): 6:8; c: no transition
    assert list(zip(starts.tolist(), ends.tolist())) == [(3, 6), (1, 4), (0, 2), (6, 8)]
    covered = np.concatenate([np.arange(s + 1, e) for s, e in zip(starts, ends)])  # targets
    assert sorted(covered.tolist()) == [1, 2, 3, 4, 5, 7]
    items, times = left_padded(log, starts, ends, 3)
    x, y, z = (list(log.behavior_ids).index(n) + 1 for n in "xyz")
    assert items.tolist() == [[x, y, z], [y, z, x], [0, x, y], [0, z, x]]
    assert times.tolist() == [[4, 5, 6], [2, 3, 4], [0, 1, 2], [0, 1, 2]]
    items, _ = left_padded(log, np.array([0]), np.array([6]), 2)  # keeps the most recent events
    assert items.tolist() == [[y, z]]


def test_sampled_softmax_loss_by_hand():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    positives = torch.tensor([1, 2])
    negatives = torch.tensor([2, 3, 1])  # token 1 is an accidental hit for row 0, token 2 for row 1
    log_q = torch.log(torch.tensor([1.0, 1.0, 2.0, 4.0]))
    loss = sampled_softmax_loss(hidden, positives, negatives, table, log_q, temperature=0.5)
    # row 0: pos logit 1/0.5 - log1 = 2; negatives 2: 0 - log2, 3: 2 - log4, 1: masked
    # row 1: pos logit 2/0.5 - log2 = 4 - log2; negatives 2: masked, 3: 4 - log4, 1: 0 - log1
    row0 = -2 + np.log(np.exp(2) + np.exp(-np.log(2)) + np.exp(2 - np.log(4)))
    row1 = -(4 - np.log(2)) + np.log(np.exp(4 - np.log(2)) + np.exp(4 - np.log(4)) + np.exp(0))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_bad_training_config_is_named():
    split = leave_one_out(cyclic_log())
    with pytest.raises(ValueError, match="num_negatives"):
        build("sasrec", num_negatives=0).fit(split)
    with pytest.raises(RuntimeError, match="before fit"):
        build("hstu").score(split.log, split.test, np.arange(6))
