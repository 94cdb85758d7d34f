"""Task heads on frozen user embeddings: label heads (binary, multi-class), the uplift head, and their
training (training.heads.fit_head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from gts_lum.config import load_config
from gts_lum.evaluation.labels import LabelTask
from gts_lum.evaluation.uplift import qini_coefficient
from gts_lum.modeling.heads import HeadsConfig, LabelHead, UpliftHead, build_head
from gts_lum.training.heads import fit_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BINARY = LabelTask("churn_like", "binary")
FAST = dict(epochs=150, lr=3e-2, patience=20)


def linear_data(n: int = 600, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Embeddings (n, d), a logit linear in them, and a 0/1 label drawn from it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    logit = 2.5 * x[:, 0] - 2.0 * x[:, 1]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return torch.from_numpy(x), y, logit


def test_config_loads_from_package_yaml_with_overrides():
    cfg = load_config(HeadsConfig, "pkg:heads/default.yaml", ["mlp_hidden=32", "train.lr=3e-3"])
    assert cfg.mlp_hidden == 32 and cfg.train.lr == pytest.approx(3e-3) and cfg.train.epochs >= 1
    with pytest.raises(ValueError, match="test_fraction"):
        load_config(HeadsConfig, "pkg:heads/default.yaml", {"test_fraction": 1.5})
    with pytest.raises(ValueError, match="unknown key"):
        load_config(HeadsConfig, "pkg:heads/default.yaml", {"train": {"epoch": 3}})


def test_binary_head_learns_a_linear_label():
    x, y, logit = linear_data()
    head = LabelHead(x.shape[1], BINARY)
    stats = fit_head(head, x[:400], y[:400], seed=0, **FAST)
    proba = head.predict_proba(x[400:])
    assert proba.shape == (200,) and float(proba.min()) >= 0 and float(proba.max()) <= 1
    assert roc_auc_score(y[400:], proba.numpy()) > 0.85
    assert stats["n_train"] + stats["n_valid"] == 400 and stats["best_epoch"] < stats["epochs_run"]
    assert np.isfinite(stats["valid_loss"]) and stats["valid_loss"] < 0.69  # better than a constant 0.5


def test_multiclass_head_with_mlp():
    rng = np.random.default_rng(1)
    centers = rng.normal(scale=3.0, size=(4, 6))
    y = rng.integers(0, 4, 500)
    x = torch.from_numpy((centers[y] + rng.normal(size=(500, 6))).astype(np.float32))
    task = LabelTask("tier", "multiclass", 4, (0.0, 1.0, 2.0, 3.0))
    head = build_head(task, 6, HeadsConfig(mlp_hidden=16))
    assert isinstance(head.net, torch.nn.Sequential)
    fit_head(head, x[:350], y[:350], seed=0, **FAST)
    proba = head.predict_proba(x[350:])
    assert proba.shape == (150, 4)
    torch.testing.assert_close(proba.sum(1), torch.ones(150))
    assert (proba.argmax(1).numpy() == y[350:]).mean() > 0.8


def test_uplift_head_ranks_by_the_true_effect():
    # Outcome rate 0.2 for control; treatment adds 0.5 where x0 > 0 and nothing elsewhere.
    rng = np.random.default_rng(2)
    n = 3000
    x = rng.normal(size=(n, 4)).astype(np.float32)
    t = (rng.random(n) < 0.5).astype(np.float32)
    tau = 0.5 * (x[:, 0] > 0)
    y = (rng.random(n) < 0.2 + t * tau).astype(np.float32)
    emb = torch.from_numpy(x)
    # Even the true effect scores far below 1: the perfect curve ranks by realized outcomes.
    oracle = qini_coefficient(tau[2000:], y[2000:], t[2000:])
    for weight in (0.0, 0.1):
        head = UpliftHead(4, mlp_hidden=16, transformed_outcome_weight=weight)
        fit_head(head, emb[:2000], y[:2000], t[:2000], seed=0, **FAST)
        assert 0.4 < float(head.propensity) < 0.6
        uplift = head.uplift(emb[2000:])
        assert uplift.shape == (1000,) and float(uplift.abs().max()) <= 1
        assert np.corrcoef(uplift.numpy(), tau[2000:])[0, 1] > 0.7
        assert qini_coefficient(uplift.numpy(), y[2000:], t[2000:]) > 0.8 * oracle > 0.1
        assert head.predict_proba(emb[:5]).shape == (5, 2)


def test_received_arm_loss_ignores_the_other_arm():
    head = UpliftHead(3)
    logits = torch.tensor([[0.0, 5.0], [-2.0, 100.0]])
    y, t = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # Control users: only column 0 counts -> BCE(0, y=1) = log 2, BCE(-2, y=0) = log(1 + e^-2).
    expected = (np.log(2.0) + np.log1p(np.exp(-2.0))) / 2
    assert head.loss(logits, y, t).item() == pytest.approx(expected, rel=1e-5)


def test_fit_head_is_deterministic_and_leaves_the_global_rng():
    x, y, _ = linear_data(300)
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        head = LabelHead(x.shape[1], BINARY, mlp_hidden=8, dropout=0.2)
        fit_head(head, x, y, seed=5, epochs=20, batch_size=64)
        states.append(head.state_dict())
        after = torch.rand(1)
    torch.manual_seed(123)
    LabelHead(x.shape[1], BINARY, mlp_hidden=8, dropout=0.2)
    assert torch.equal(torch.rand(1), after)  # fit_head drew nothing from the global generator
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)
    other = LabelHead(x.shape[1], BINARY, mlp_hidden=8, dropout=0.2)
    fit_head(other, x, y, seed=6, epochs=20, batch_size=64)
    assert not torch.equal(other.state_dict()["net.0.weight"], states[0]["net.0.weight"])


def test_fit_head_resumes_from_its_checkpoint_exactly(tmp_path):
    """A fit stopped after 10 epochs and rerun for 25 on its checkpoint (the training loop's) ends where an
    uninterrupted fit of 25 ends: batch orders and dropout are replayed from (seed, epoch, step)."""
    x, y, _ = linear_data(300)
    fit = dict(seed=2, batch_size=64, patience=100)
    whole = LabelHead(x.shape[1], BINARY, mlp_hidden=8, dropout=0.2)
    expected = fit_head(whole, x, y, epochs=25, **fit)
    fit_head(LabelHead(x.shape[1], BINARY, mlp_hidden=8, dropout=0.2), x, y, epochs=10, checkpoint_dir=tmp_path / "head", **fit)
    resumed = LabelHead(x.shape[1], BINARY, mlp_hidden=8, dropout=0.2)
    stats = fit_head(resumed, x, y, epochs=25, checkpoint_dir=tmp_path / "head", **fit)
    assert (stats["epochs_run"], stats["best_epoch"], stats["valid_loss"]) == (25, expected["best_epoch"], expected["valid_loss"])
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_standardized_inputs_make_the_head_scale_free():
    x, y, _ = linear_data(300)
    probas = []
    for emb in (x, 1000.0 * x + 50.0):
        head = LabelHead(x.shape[1], BINARY)
        fit_head(head, emb, y, seed=0, epochs=30)
        probas.append(head.predict_proba(emb))
    torch.testing.assert_close(probas[0], probas[1], rtol=1e-3, atol=1e-4)


def test_no_validation_slice_trains_every_epoch():
    x, y, _ = linear_data(100)
    stats = fit_head(LabelHead(x.shape[1], BINARY), x, y, epochs=7, valid_fraction=0.0)
    assert stats["n_valid"] == 0 and stats["epochs_run"] == 7 and np.isnan(stats["valid_loss"])


def test_bad_input_is_named():
    x, y, _ = linear_data(50)
    with pytest.raises(ValueError, match="UpliftHead"):
        LabelHead(8, LabelTask("offer", "uplift"))
    with pytest.raises(ValueError, match="treatment"):
        fit_head(UpliftHead(8), x, y)
    bad = y.copy()
    bad[7] = 3
    with pytest.raises(ValueError, match="row 7 holds 3"):
        fit_head(LabelHead(8, BINARY), x, bad)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        LabelHead(8, BINARY)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"shape \(50,\)"):
        fit_head(LabelHead(8, BINARY), x, y[:10])
