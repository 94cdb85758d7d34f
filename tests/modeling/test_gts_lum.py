"""GTS-LUM: decoder input layout, target placement, the score's definition, phase II, save/load, resume."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gts_lum.data.events import EventLog
from gts_lum.evaluation.protocol import EvalConfig, evaluate
from gts_lum.modeling.gts_lum_model import PAD_KIND, CompressorConfig, Phase2Objective, make_batch
from gts_lum.recommenders.registry import attach_dataset, build_model, load_model
from gts_lum.sequence.splits import EvalSet
from gts_lum.sequence.timestamp_process import SequenceConfig, build_sequences
from gts_lum.sequence.tokens import TokenKind
from gts_lum.training.checkpoint import save_model

TINY = {
    "net": {
        "decoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "compressor": {"windows": 2, "window_size": 4},
        "adapter_trainable": True,  # the paper's phase II (the package default freezes it on CPU)
    },
    "qformer": {"num_queries": 2, "num_layers": 1, "num_heads": 2, "hidden_size": 32, "intermediate_size": 64, "max_window": 4},
    "train": {
        "batch_size": 16,
        "lr": 0.001,
        "epochs": 6,
        "patience": 6,
        "sampled_negatives": 8,
        "hard_negatives": 2,
        "valid_cases": None,
        "device": "cpu",
    },
    "rerank_depth": 3,
}


def build(data, **overrides):
    cfg = {**TINY, **overrides}
    model = build_model("gts_lum", None, cfg)
    attach_dataset(model, data)
    return model


def test_make_batch_pads_left_and_cuts_old_history_into_windows():
    # one user, 20 events an hour apart; a budget that keeps the last few intervals only
    log_ = EventLog.from_frame(
        __import__("pandas").DataFrame(
            {"user_id": "u", "behavior_id": [f"b{i % 5}" for i in range(20)], "timestamp": 3600 * np.arange(20)}
        ),
        behavior_ids=np.array([f"b{i}" for i in range(5)], dtype=object),
    )
    cases = EvalSet(np.array([0, 0]), np.array([20, 3]), np.array([0, 3], np.int32), np.array([0, 0]))
    tokens = build_sequences(log_, cases, SequenceConfig(token_budget=9))
    batch = make_batch(tokens, log_, cases.history_end, CompressorConfig(windows=2, window_size=4))
    assert batch.kind.shape[0] == 2 and (batch.kind[1, : batch.kind.shape[1] - tokens.lengths()[1]] == PAD_KIND).all()
    assert batch.kind[0, -1] == TokenKind.BEHAVIOR and batch.value[0, -1] == 19 % 5  # newest event last
    kept = tokens.source_row[tokens.offsets[0] : tokens.offsets[1]]
    first_kept = kept[kept >= 0].min()
    # case 0: the 8 events before the first kept one, oldest window first; case 1 kept everything
    assert list(batch.window_case) == [0, 0] and list(batch.window_slot) == [0, 1]
    np.testing.assert_array_equal(batch.windows.ravel(), log_.behavior[first_kept - 8 : first_kept])
    assert batch.window_mask.all()


@pytest.fixture(scope="module")
def trained(cycle_data, one_thread_module):
    split = cycle_data.split()
    model = build(cycle_data)
    return split, model, model.fit(split, EvalConfig(ks=(1, 10)))


def test_learns_the_cycle_and_scores(trained):
    split, model, stats = trained
    assert stats["epochs"] >= 1 and np.isfinite([h["loss"] for h in stats["history"]]).all()
    assert stats["history"][-1]["agnostic"] < stats["history"][0]["agnostic"]
    # the scoring (agnostic only, or two-stage re-ranking the top 3) was picked on validation
    by_depth = {int(d): v for d, v in stats["valid_by_rerank_depth"].items()}
    assert set(by_depth) == {0, 3} and model.cfg.rerank_depth == stats["rerank_depth"] == max(by_depth, key=lambda d: (by_depth[d], d))
    metrics = evaluate(model, split.log, split.test, cfg=EvalConfig(ks=(1, 3)))
    assert metrics["R@3"] >= 0.8  # 9 behaviours: chance is 1/3


def _test_context(trained, n: int):
    """(net, ctx, candidates 0-2): the decoder context of the first n test cases."""
    split, model, _ = trained
    cases = split.test.subset(np.arange(n))
    batch = model.batch(model.sequences(split.log, cases), split.log, cases.history_end)
    cand = torch.tensor([0, 1, 2])
    with torch.no_grad():
        return model.net, model.net.context(batch, extra_behaviors=cand), cand


def test_score_is_the_defined_cosine_with_the_target_in_front(trained):
    net, ctx, cand = _test_context(trained, 3)
    with torch.no_grad():
        aware = net.aware_scores(ctx, cand.repeat(3, 1))
        # by hand: decoder over [c, profile, compressed, history], last hidden state, cosine with P b^F_c
        for i in range(3):
            for j, c in enumerate(cand.tolist()):
                h = net.user_states(ctx, torch.tensor([i]), target=torch.tensor([c]))
                rows = net.semantic_ids[c]  # b^F: the Q-former's output + one semantic-ID embedding per level
                fused = net.adapter.fuse(torch.tensor([c])) + sum(t.weight[rows[k]] for k, t in enumerate(net.semantic_id_embedding))
                item = net.item_projection(fused)
                expected = F.cosine_similarity(h, item) * net.scale
                assert torch.allclose(aware[i, j], expected[0], atol=1e-5)
        # the target changes the user state (it is in front, and attention is causal from it)
        h0 = net.user_states(ctx, torch.tensor([0]), target=torch.tensor([0]))
        h1 = net.user_states(ctx, torch.tensor([0]), target=torch.tensor([1]))
        assert not torch.allclose(h0, h1)


def test_columns_no_row_uses_are_left_out_without_changing_a_state(trained):
    """One user's passes (a server's request) leave out the layout's columns that no row uses (empty
    compressor slots, left padding) and, with no padding left, pass no mask: the states are those of the
    full padded layout (`history_states=True` keeps every column)."""
    net, ctx, cand = _test_context(trained, 4)
    with torch.no_grad():
        for rows, target in ((torch.zeros(3, dtype=torch.long), cand), (torch.tensor([1]), None), (torch.arange(4), None)):
            layout = torch.cat([ctx.prefix_mask[rows], ctx.history_mask[rows]], 1)
            compact = net.user_states(ctx, rows, target=target)
            full, _ = net.user_states(ctx, rows, target=target, history_states=True)
            torch.testing.assert_close(compact, full, atol=1e-5, rtol=1e-5)
        assert not layout.all() and not torch.cat([ctx.prefix_mask[:1], ctx.history_mask[:1]], 1).all()  # columns were left out


def test_placements_end_and_none(cycle_data, one_thread_module):
    for placement in ("end", "none"):
        model = build(cycle_data, net={**TINY["net"], "target_placement": placement})
        split = cycle_data.split()
        scores = model.score(split.log, split.test.subset(np.arange(4)), np.arange(split.log.num_behaviors))
        assert scores.shape == (4, split.log.num_behaviors) and np.isfinite(scores).all()
        assert model.rerank_depth == (0 if placement == "none" else model.cfg.rerank_depth)  # none has no aware path
    with pytest.raises(ValueError, match="target_placement"):
        build(cycle_data, net={**TINY["net"], "target_placement": "middle"})


def test_save_load_scores_identically(trained, tmp_path):
    split, model, _ = trained
    save_model(model, "gts_lum", tmp_path / "m")
    assert not list((tmp_path / "m").rglob("*.pkl")) and (tmp_path / "m" / "weights.safetensors").exists()
    again = load_model(tmp_path / "m")
    cands = np.arange(split.log.num_behaviors)
    np.testing.assert_allclose(again.score(split.log, split.test, cands), model.score(split.log, split.test, cands), atol=1e-5)


def test_compiled_decoder_scores_as_the_eager_one(trained):
    """decoder.compile: passes without gradients run the compiled decoder (same weights, same scores);
    training passes and the state dict are untouched."""
    split, model, _ = trained
    net, cands = model.net, np.arange(split.log.num_behaviors)
    eager = model.score(split.log, split.test, cands)
    keys = set(net.state_dict())
    net.cfg.decoder.compile = True
    try:
        model.score(split.log, split.test.subset(np.arange(5)), cands)  # another batch shape first
        compiled = model.score(split.log, split.test, cands)
        assert net._compiled_last_states is not None
    finally:
        net.cfg.decoder.compile = False
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
    assert set(net.state_dict()) == keys


def test_resume_after_interruption_equals_uninterrupted(cycle_data, one_thread_module, tmp_path):
    split = cycle_data.split()
    short = {**TINY["train"], "epochs": 2, "checkpoint_every": 3}
    full = build(cycle_data, train=short)
    full.fit(split, EvalConfig(ks=(1, 10)), checkpoint_dir=tmp_path / "a")
    # interrupted: one epoch, then a new process-like model resumes from the checkpoint folder
    first = build(cycle_data, train={**short, "epochs": 1})
    first.fit(split, EvalConfig(ks=(1, 10)), checkpoint_dir=tmp_path / "b")
    resumed = build(cycle_data, train=short)
    resumed.fit(split, EvalConfig(ks=(1, 10)), checkpoint_dir=tmp_path / "b")
    a, b = full.state_tensors(), resumed.state_tensors()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_after_a_kill_mid_epoch_equals_uninterrupted(cycle_data, one_thread_module, tmp_path, monkeypatch):
    from gts_lum.training import loop

    split = cycle_data.split()
    # with the cosine schedule and warm-up: the rate at each step comes back with the position
    # 40 one-window users in batches of 4: 10 steps an epoch
    short = {**TINY["train"], "batch_size": 4, "epochs": 2, "checkpoint_every": 3, "lr_schedule": "cosine", "warmup_steps": 4}
    full = build(cycle_data, train=short)
    full.fit(split, EvalConfig(ks=(1, 10)), checkpoint_dir=tmp_path / "a")
    # the process dies right after the step-6 checkpoint of epoch 0 (the epoch has more steps than that)
    save = loop.save_training_state

    def save_then_die(folder, groups, position):
        save(folder, groups, position)
        if position["epoch"] == 0 and position["step"] == 6:
            raise KeyboardInterrupt("killed mid-epoch")

    monkeypatch.setattr(loop, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(cycle_data, train=short).fit(split, EvalConfig(ks=(1, 10)), checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(loop, "save_training_state", save)
    resumed = build(cycle_data, train=short)  # a new process: fresh weights, then the checkpoint
    resumed.fit(split, EvalConfig(ks=(1, 10)), checkpoint_dir=tmp_path / "b")
    a, b = full.state_tensors(), resumed.state_tensors()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_inner_prefix_targets_are_the_next_events_of_the_log_not_the_next_tokens():
    """An interval cap that drops the middle of a burst: an inner prefix's target is the event that came
    right after it in the log, not the next kept token; other tokens and the last behaviour get none."""
    import pandas as pd

    from gts_lum.sequence.timestamp_process import BehaviorStats

    # one user: a burst of 5 events in one interval, then 2 events an hour apart
    log_ = EventLog.from_frame(
        pd.DataFrame({"user_id": "u", "behavior_id": [f"b{i}" for i in range(7)], "timestamp": [0, 10, 20, 30, 40, 3600, 7200]}),
        behavior_ids=np.array([f"b{i}" for i in range(7)], dtype=object),
    )
    cfg = SequenceConfig(max_behaviors_per_interval=2)
    stats = BehaviorStats.fit(log_, cfg, importance=np.array([1, 9, 1, 1, 1, 1, 1], np.float32))  # b1 beats b0, b2, b3
    cases = EvalSet(np.array([0, 0]), np.array([7, 2]), np.array([6, 2], np.int32), np.array([7200, 20]))
    batch = make_batch(build_sequences(log_, cases, cfg, stats), log_, cases.history_end, CompressorConfig(enabled=False))
    is_b = batch.kind == TokenKind.BEHAVIOR
    assert batch.value[0][is_b[0]].tolist() == [1, 4, 5, 6]  # the burst kept its latest (b4) and b1
    assert batch.next_event[0][is_b[0]].tolist() == [2, 5, 6, -1]  # b1 -> b2 (dropped); b6's next is the target
    assert batch.next_event[1][is_b[1]].tolist() == [1, -1]  # history b0 b1: b1 ends it
    assert (batch.next_event[~is_b] == -1).all()


def test_target_aware_term_trains_on_the_reranking_lists(cycle_data, one_thread_module, monkeypatch):
    """Hard negatives are target behaviours from the agnostic top list; only cases whose positive made
    that list are trained (the situation of re-ranking at scoring time)."""
    model = build(cycle_data)
    net, split = model.net, cycle_data.split()
    net.eval()  # no dropout: the ranks recomputed below are the ones the objective sees
    cases = split.test.subset(np.arange(8))
    batch = model.batch(model.sequences(split.log, cases), split.log, cases.history_end)
    positives = torch.as_tensor(cases.target.astype(np.int64))
    allowed = torch.zeros(split.log.num_behaviors, dtype=torch.bool)
    allowed[positives] = True
    allowed[:3] = True  # behaviours 0-2 and the positives may be targets; every other one may not
    seen = []
    real = net.aware_scores
    # a spy, not a mock: it records the arguments and calls the real method
    monkeypatch.setattr(
        net, "aware_scores", lambda ctx, cand, chunk=256, cases=None: seen.append((cand, cases)) or real(ctx, cand, chunk, cases)
    )
    sampled = torch.arange(split.log.num_behaviors)
    # the agnostic ranks among the allowed targets, recomputed: with the widest list (every other allowed
    # behaviour) a case trains the term unless its positive ranks last
    allowed_idx = torch.nonzero(allowed).squeeze(1)
    with torch.no_grad():
        ctx = net.context(batch, extra_behaviors=allowed_idx)
        agnostic = net.agnostic_scores(ctx, net.item_embeddings(net.lookup(ctx, allowed_idx)))  # (B, A)
    own = agnostic[torch.arange(len(positives)), torch.searchsorted(allowed_idx, positives)]
    qualifies = ((agnostic > own[:, None]).sum(1) < len(allowed_idx) - 1).float().mean()
    torch.manual_seed(0)
    wide = net(batch, positives, sampled, Phase2Objective(2, allowed_targets=allowed, hard_negative_pool=100))
    assert float(qualifies) > 0.5 and float(wide["aware_cases"]) == pytest.approx(float(qualifies)) and torch.isfinite(wide["loss"])
    cand, rows = seen[-1]
    assert (cand[:, 0] == positives[rows]).all() and allowed[cand].all() and (cand[:, 1:] != cand[:, :1]).all()
    calls = len(seen)
    narrow = net(batch, positives, sampled, Phase2Objective(2, allowed_targets=allowed, hard_negative_pool=2))
    trained = round(float(narrow["aware_cases"]) * len(positives))
    assert trained < len(positives)  # positives ranked below the top 2 are left to the agnostic term
    assert len(seen) - calls == (1 if trained else 0)  # no decoder pass when no case qualifies
    if trained:
        assert len(seen[-1][1]) == trained


def test_full_softmax_over_the_target_catalog(cycle_data, one_thread_module, monkeypatch):
    """`train.sampled_negatives: null`: every step's agnostic term scores every target behaviour."""
    split = cycle_data.split()
    model = build(cycle_data, train={**TINY["train"], "epochs": 1, "sampled_negatives": None})
    seen = []
    real = model.net.forward
    # a spy, not a mock: it records the negatives the trainer passes and runs the real forward
    monkeypatch.setattr(
        model.net,
        "forward",
        lambda batch, positives, sampled, objective: seen.append(sampled) or real(batch, positives, sampled, objective),
    )
    targets = np.array([1, 2, 3])
    model.fit(split, EvalConfig(ks=(1, 10)), candidates=targets)
    assert seen and all(s.tolist() == targets.tolist() for s in seen)


def test_train_targets_all_predicts_every_next_event(cycle_data, one_thread_module, monkeypatch):
    """`train.targets: all`: phase II predicts every next event against every behaviour (as the sequential
    baselines train) while validation still ranks the split's targets."""
    split = cycle_data.split()
    model = build(cycle_data, train={**TINY["train"], "epochs": 1, "sampled_negatives": None, "targets": "all"})
    seen = []
    real = model.net.forward
    monkeypatch.setattr(
        model.net,
        "forward",
        lambda batch, positives, sampled, objective: (
            seen.append((sampled, objective.allowed_targets)) or real(batch, positives, sampled, objective)
        ),
    )
    model.fit(split, EvalConfig(ks=(1, 10)), candidates=np.array([1, 2, 3]))
    assert seen and all(s.tolist() == list(range(split.log.num_behaviors)) and allowed is None for s, allowed in seen)
    with pytest.raises(ValueError, match="targets"):
        build(cycle_data, train={**TINY["train"], "targets": "some"})


def test_valid_holdout_events_train_without_them_and_validate_on_them(cycle_data, one_thread_module, monkeypatch):
    """`train.valid_holdout_events`: phase II never sees a validated user's last training events; validation scores them."""
    split = cycle_data.split()
    validated = np.unique(split.valid.users)
    model = build(cycle_data, train={**TINY["train"], "epochs": 1, "valid_holdout_events": 2})
    logs = []
    real = model.sequences
    # a spy, not a mock: it records what phase II trains and validates on and runs the real builder
    monkeypatch.setattr(model, "sequences", lambda log_, cases: logs.append((log_, cases)) or real(log_, cases))
    model.fit(split, EvalConfig(ks=(1, 10)))
    trained = [(lg, c) for lg, c in logs if lg is not split.log]
    validated_cases = [c for lg, c in logs if lg is split.log]
    assert trained and validated_cases
    before = split.train.lengths()
    for lg, _cases in trained:
        np.testing.assert_array_equal(lg.lengths()[validated], before[validated] - 2)
    ends = np.concatenate([c.history_end for c in validated_cases])
    u = validated[0]  # of its two moved events (rows of the full log), the second is a validation target
    last_trained = split.log.offsets[u] + before[u]
    assert last_trained - 1 in set(ends.tolist()) and last_trained - 2 not in set(ends.tolist())


def test_logq_correction_shifts_each_candidate_by_its_inclusion_chance(cycle_data, one_thread_module):
    """The sampled agnostic softmax is corrected by log q per candidate: equal frequencies shift every logit
    alike (a softmax ignores that), skewed ones change the loss; the trainer passes training frequencies."""
    model = build(cycle_data)
    net, split = model.net, cycle_data.split()
    net.eval()  # deterministic passes: the losses below differ by the correction alone
    cases = split.test.subset(np.arange(8))
    batch = model.batch(model.sequences(split.log, cases), split.log, cases.history_end)
    positives = torch.as_tensor(cases.target.astype(np.int64))
    sampled = torch.arange(4)
    n = split.log.num_behaviors

    def loss(frequency):
        torch.manual_seed(0)
        with torch.no_grad():
            objective = Phase2Objective(0, aware_weight=0.0, target_frequency=frequency, pool_size=n)
            return float(net(batch, positives, sampled, objective)["agnostic"])

    plain, even = loss(None), loss(torch.full((n,), 1.0 / n))
    skewed = torch.zeros(n)
    skewed[positives[0]] = 1.0  # one behaviour is every step's target: it is always a candidate, the others rarely
    assert abs(even - plain) < 1e-4 and abs(loss(skewed) - plain) > 1e-2


def test_drawn_in_batch_negatives_score_each_positive_beside_n_drawn_targets(cycle_data, one_thread_module):
    """`train.in_batch_negatives: N`: each prefix's positive against the uniform samples and N prefixes'
    targets drawn at random (a column equal to the positive masked), not against every target of the step;
    a cap above the step's prefixes is the uncapped objective."""
    model = build(cycle_data)
    net, split = model.net, cycle_data.split()
    net.eval()
    cases = split.test.subset(np.arange(8))
    batch = model.batch(model.sequences(split.log, cases), split.log, cases.history_end)
    positives = torch.as_tensor(cases.target.astype(np.int64))
    sampled = torch.arange(4)

    def loss(cap):
        torch.manual_seed(0)
        with torch.no_grad():
            return net(batch, positives, sampled, Phase2Objective(0, aware_weight=0.0, in_batch_negatives=cap))

    every, capped = loss(None), loss(3)
    assert float(loss(10**6)["agnostic"]) == float(every["agnostic"])
    assert float(capped["prefixes"]) == float(every["prefixes"]) > 3
    # the objective by hand, from the network's public parts
    nxt = torch.as_tensor(batch.next_event)
    targets = torch.cat([positives, nxt[nxt >= 0]])
    candidates = torch.unique(torch.cat([targets, sampled]))
    with torch.no_grad():
        ctx = net.context(batch, extra_behaviors=candidates)
        items = net.item_embeddings(net.lookup(ctx, candidates))
        last, hist = net.user_states(ctx, history_states=True)
        users = F.normalize(torch.cat([last, hist[nxt >= 0]]), dim=-1)
    label = torch.searchsorted(candidates, targets)
    torch.manual_seed(0)
    drawn = label[torch.randint(len(label), (3,))]
    columns = torch.unique(torch.cat([torch.searchsorted(candidates, sampled), drawn]))
    assert len(columns) < len(candidates)
    pos = (users * items[label]).sum(-1, keepdim=True)
    neg = (users @ items[columns].T).masked_fill(columns[None] == label[:, None], -torch.inf)
    expected = F.cross_entropy(torch.cat([pos, neg], 1) * net.scale.detach(), torch.zeros(len(label), dtype=torch.long))
    assert float(capped["agnostic"]) == pytest.approx(float(expected), abs=1e-5)


def test_semantic_id_prefix_embeddings_give_each_behaviour_its_own_vector(cycle_data, one_thread_module):
    from gts_lum.tokenizer.semantic_ids import semantic_id_prefixes

    # codes are numbered within their parent: (0, 1) and (1, 1) share code 1 at level 2 but no prefix
    codes = np.array([[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1]])
    rows, sizes = semantic_id_prefixes(codes)
    assert sizes == [2, 3, 5]
    assert rows[:, 0].tolist() == [0, 0, 1, 1, 0] and len(set(rows[:, 1].tolist())) == 3
    assert rows[1, 1] == rows[4, 1] != rows[2, 1] == rows[3, 1] and len(set(rows[:, 2].tolist())) == 5
    models = {mode: build(cycle_data, net={**TINY["net"], "semantic_id_embedding": mode}) for mode in ("prefix", "code", "none")}
    assert models["none"].net.semantic_id_embedding is None
    prefix = models["prefix"].net
    features = models["code"]._assets.features
    full = prefix.semantic_id_embedding[-1]  # the full-ID level: one row per distinct ID (per behaviour with real IDs)
    assert full.num_embeddings == len(np.unique(features.semantic_ids, axis=0)) == len(torch.unique(prefix.semantic_ids[:, -1]))
    code_sizes = features.codebook_sizes
    assert [t.num_embeddings for t in models["code"].net.semantic_id_embedding] == code_sizes
    with pytest.raises(ValueError, match="semantic_id_embedding"):
        build(cycle_data, net={**TINY["net"], "semantic_id_embedding": True})


@pytest.mark.parametrize("net", [{"input_dropout": 0.5}, {"decoder": {**TINY["net"]["decoder"], "dropout": 0.3}}], ids=["inputs", "blocks"])
def test_dropout_only_while_training(cycle_data, one_thread_module, net):
    model = build(cycle_data, net={**TINY["net"], **net})
    net, split = model.net, cycle_data.split()
    cases = split.test.subset(np.arange(4))
    batch = model.batch(model.sequences(split.log, cases), split.log, cases.history_end)
    with torch.no_grad():
        ctx = net.context(batch)
        net.train()
        assert not torch.equal(net.user_states(ctx), net.user_states(ctx))
        net.eval()
        torch.testing.assert_close(net.user_states(ctx), net.user_states(ctx), rtol=0, atol=0)
    with pytest.raises(ValueError, match="input_dropout"):
        build(cycle_data, net={**TINY["net"], "input_dropout": 1.0})


def test_learning_rate_schedules():
    from gts_lum.training.loop import learning_rate
    from gts_lum.training.phase2 import Phase2Config

    cosine = Phase2Config(lr=0.01, lr_schedule="cosine", warmup_steps=10)
    rates = [learning_rate(cosine, s, 110) for s in range(110)]
    assert rates[0] == pytest.approx(0.001) and rates[9] == pytest.approx(0.01)  # linear warm-up
    assert rates[10] == pytest.approx(0.01) and rates[60] == pytest.approx(0.005)  # half-way down
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 1e-5
    assert learning_rate(Phase2Config(lr=0.01), 99, 110) == 0.01
    with pytest.raises(ValueError, match="lr_schedule 'linear'"):
        Phase2Config(lr_schedule="linear")
    with pytest.raises(ValueError, match="valid_holdout_events must be >= 0"):
        Phase2Config(valid_holdout_events=-1)


def test_training_windows_train_every_transition_once():
    """Windows cut back from each user's end under a small budget: every event after a user's first is
    the target of exactly one trained position (the window's own positive or an inner next event)."""
    import pandas as pd

    from gts_lum.training.phase2 import training_windows

    rng = np.random.default_rng(3)
    rows = []
    for u, n in enumerate([1, 2, 7, 40]):  # a one-event user has no transition and no window
        rows += [(f"u{u}", f"b{int(rng.integers(5))}", 1_700_000_000 + 1800 * t) for t in range(n)]
    log_ = EventLog.from_frame(
        pd.DataFrame(rows, columns=["user_id", "behavior_id", "timestamp"]),
        behavior_ids=np.array([f"b{i}" for i in range(5)], dtype=object),
    )
    cfg = SequenceConfig(token_budget=9, dedup_within_interval=False)
    windows, tokens = training_windows(log_, lambda lg, cases: build_sequences(lg, cases, cfg))
    assert len(windows) == len(tokens) and (tokens.lengths() <= 9).all()
    batch = make_batch(tokens, log_, windows.history_end, CompressorConfig(enabled=False))
    trained = list(windows.history_end)  # each window's positive: the event at its history end
    # inner targets: the log row right after each kept behaviour, where the window's history holds it
    case, _ = np.nonzero((batch.kind == TokenKind.BEHAVIOR) & (batch.next_event >= 0))
    inner_rows = []
    for i in range(len(windows)):
        seq = tokens.sequence(i)
        rows_i = seq["source_row"][seq["kind"] == TokenKind.BEHAVIOR]
        inner_rows += [int(r) + 1 for r in rows_i if r + 1 < windows.history_end[i]]
    assert len(inner_rows) == len(case)
    every = sorted(trained + inner_rows)
    expected = [r for u in range(log_.num_users) for r in range(log_.offsets[u] + 1, log_.offsets[u + 1])]
    assert every == expected  # each transition once, none missing
    assert (windows.target == log_.behavior[windows.history_end]).all()
    # a positive outside the targets is marked -1; the window still exists for its inner targets
    only = np.array([0])
    restricted, _ = training_windows(log_, lambda lg, cases: build_sequences(lg, cases, cfg), only)
    assert set(restricted.target.tolist()) <= {0, -1} and len(restricted) == len(windows)


def test_bucketed_batches_group_similar_lengths_in_a_seeded_order():
    from gts_lum.training.phase2 import bucketed_batches

    lengths = np.random.default_rng(0).integers(1, 200, 1000)
    a, b, c = (bucketed_batches(lengths, 32, s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # seeded: resume replays the same batches
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))  # every case once
    padded = sum(len(x) * lengths[x].max() for x in a)
    assert padded < 1.05 * lengths.sum()  # random batches pad to ~2x; sorted ones almost not at all


def test_block_dropout_hooks_every_attention_and_mlp():
    from gts_lum.modeling.decoder import DecoderConfig, add_block_dropout, build_decoder

    decoder, _ = build_decoder(DecoderConfig(hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32))
    assert add_block_dropout(decoder, 0.1) == 6  # attention and MLP of each of the 3 blocks
    with pytest.raises(ValueError, match="dropout"):
        DecoderConfig(dropout=1.0)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_last_hidden_states_equal_the_whole_decoders(kv_heads):
    """The last layer run for each row's last token only (keys and values from every position) gives the
    whole decoder's state there: padding inside and at either end, positions that skip (as events
    sharing a time and left-out columns give), grouped-query attention, and no mask at all."""
    from transformers import LlamaConfig, LlamaModel

    from gts_lum.modeling.decoder import last_hidden_states

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=kv_heads, intermediate_size=48
    )
    decoder = LlamaModel(config).eval()
    x = torch.randn(4, 12, 32)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 9:], mask[2, :3], mask[3, 5:7] = 0, 0, 0
    positions = (2 * mask.cumsum(1) - 1).clamp_min(0)  # steps of 2
    rows = torch.arange(4)
    with torch.no_grad():
        for m in (mask, None):
            last = torch.full((4,), 11) if m is None else 11 - m.flip(1).argmax(1)
            whole = decoder(inputs_embeds=x, attention_mask=m, position_ids=positions).last_hidden_state[rows, last]
            torch.testing.assert_close(last_hidden_states(decoder, x, m, positions, last), whole, atol=1e-5, rtol=1e-5)


def test_target_gate_at_zero_lets_no_candidate_in(cycle_data, one_thread_module):
    """The target token is placeholder + gate * b^F_c: at gate 0 every candidate gives the same state (the
    norm cannot blow a small gate up), and a small gate changes the state a little, not fully."""
    model = build(cycle_data)
    net, split = model.net, cycle_data.split()
    net.eval()
    cases = split.test.subset(np.arange(2))
    batch = model.batch(model.sequences(split.log, cases), split.log, cases.history_end)
    cand = torch.tensor([0, 1])
    rows = torch.tensor([0, 0])
    with torch.no_grad():
        ctx = net.context(batch, extra_behaviors=cand)
        net.target_gate.fill_(0.0)
        zero = net.user_states(ctx, rows, target=cand)
        torch.testing.assert_close(zero[0], zero[1])
        net.target_gate.fill_(1e-3)
        small = net.user_states(ctx, rows, target=cand)
        net.target_gate.fill_(1.0)
        full = net.user_states(ctx, rows, target=cand)
    assert 0 < (small[0] - small[1]).norm() < 0.05 * (full[0] - full[1]).norm()


def test_a_frozen_adapter_is_centred_and_stays_in_eval_mode(cycle_data, one_thread_module):
    frozen = build(cycle_data, net={**TINY["net"], "adapter_trainable": False}).net
    frozen.train()
    assert frozen.training and frozen.decoder.training and not frozen.adapter.training  # no dropout on fixed features
    everything = torch.arange(frozen.adapter.num_behaviors)
    with torch.no_grad():
        centred = frozen._adapter_fuse(everything)
        raw = frozen.adapter.unprojected_all()
        # centring happens before the (linear) projection: the projected mean is the projection's bias
        torch.testing.assert_close(centred.mean(0), frozen.adapter.project(torch.zeros(1, raw.shape[1]))[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(centred, frozen.adapter.project(raw - raw.mean(0)))
    trained = build(cycle_data, net={**TINY["net"], "adapter_trainable": True}).net
    trained.train()
    assert trained.adapter.training
