"""HLLM baseline on a tiny sequence data set built by the real stages (validate -> sequences)."""

import numpy as np
import pytest
import torch

from gts_lum.config import load_config
from gts_lum.evaluation.protocol import EvalConfig, evaluate
from gts_lum.recommenders.hllm import HLLM, HLLMConfig
from gts_lum.recommenders.registry import MODELS, attach_dataset, build_model, load_model
from gts_lum.sequence.dataset import SequenceDataset
from gts_lum.training.checkpoint import save_model

TINY = {
    "item_llm": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
    "user_llm": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
    "max_text_len": 12,
    "train": {
        "max_len": 8,
        "batch_size": 16,
        "lr": 0.01,
        "epochs": 25,
        "patience": 6,
        "num_negatives": 6,
        "in_batch_negatives": 4,
        "device": "cpu",
    },
}
EVAL = EvalConfig(ks=(1, 10))


def build(data: SequenceDataset, **train) -> HLLM:
    model = build_model("hllm", None, {**TINY, "train": {**TINY["train"], **train}})
    attach_dataset(model, data)
    return model


@pytest.fixture(scope="module")
def trained(cycle_data, one_thread_module):
    split = cycle_data.split()
    model = build(cycle_data)
    return split, model, model.fit(split, EVAL)


def test_registered_and_packaged_config_loads():
    assert MODELS["hllm"] == (HLLMConfig, HLLM)
    cfg = load_config(HLLMConfig, "pkg:models/hllm.yaml")
    assert cfg.item_llm.hidden_size % cfg.item_llm.num_heads == 0 and cfg.max_text_len == 24
    with pytest.raises(ValueError, match="user_llm.num_heads"):
        load_config(HLLMConfig, None, {"user_llm": {"hidden_size": 10, "num_heads": 3}})


def test_learns_the_cycle_through_text_and_scores_full_shape(trained):
    split, model, stats = trained
    assert 0 <= stats["best_epoch"] < stats["epochs"] <= TINY["train"]["epochs"]
    assert stats["num_parameters"] > 0 and stats["device"] == "cpu"
    scores = model.score(split.log, split.test, np.array([0, 2, 4, 7]))
    assert scores.shape == (len(split.test), 4) and np.isfinite(scores).all()
    cycle = np.flatnonzero(np.char.startswith(split.log.behavior_ids.astype(str), "b"))  # the six cycle behaviours
    assert evaluate(model, split.log, split.test, cycle, EvalConfig(ks=(1,)))["R@1"] >= 0.95


def test_items_are_their_texts(trained):
    split, model, _ = trained
    ids = list(split.log.behavior_ids)
    twin_a, twin_b, single = (ids.index(k) for k in ("twin_a", "twin_b", "single"))  # conftest.CYCLE_EXTRA
    scores = model.score(split.log, split.test, np.array([twin_a, twin_b, single]))
    np.testing.assert_array_equal(scores[:, 0], scores[:, 1])  # same text, same item
    assert np.abs(scores[:, 0] - scores[:, 2]).max() > 1e-4
    tokens = model.item_tokens  # [ITEM] right after each text's [SEP]; the twins' rows are equal
    assert (tokens == len(model.text_vocab)).sum(1).eq(1).all()
    assert torch.equal(tokens[twin_a], tokens[twin_b]) and not torch.equal(tokens[twin_a], tokens[single])


def test_save_load_scores_identically_without_the_data_set(trained, tmp_path):
    split, model, _ = trained
    save_model(model, "hllm", tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.item_tokens is not None and torch.equal(loaded.item_tokens, model.item_tokens)
    cand = np.arange(split.log.num_behaviors)
    np.testing.assert_array_equal(loaded.score(split.log, split.test, cand), model.score(split.log, split.test, cand))


def test_deterministic_by_seed(cycle_data, one_thread_module):
    split = cycle_data.split()
    cand = np.arange(split.log.num_behaviors)
    runs = []
    for seed in (0, 0, 1):
        model = build(cycle_data, epochs=2, seed=seed)
        stats = model.fit(split, EVAL)
        runs.append(([h["loss"] for h in stats["history"]], model.score(split.log, split.valid, cand)))
    assert runs[1][0] == runs[0][0]
    np.testing.assert_array_equal(runs[1][1], runs[0][1])
    assert not np.array_equal(runs[2][1], runs[0][1])


def test_clear_errors(cycle_data):
    split = cycle_data.split()
    with pytest.raises(RuntimeError, match="attach"):
        build_model("hllm", None, TINY).fit(split, EVAL)
    with pytest.raises(ValueError, match="full_softmax"):
        build(cycle_data, full_softmax=True).fit(split, EVAL)
    model = build_model("hllm", None, TINY)
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        model.set_texts(["a text", None, "another"], ["x", "y", "z"])
