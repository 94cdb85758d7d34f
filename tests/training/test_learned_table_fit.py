"""The learned table encoder's fit on the one training loop: its draws, the best epoch, an exact resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from gts_lum.encoders.table import TableEncoderConfig, build_table_encoder, load_table_encoder
from gts_lum.encoders.table_learned import LearnedTableConfig
from gts_lum.training.table_encoder import TableDraws, fit_table_encoder, train_table_encoder


def letters(n: int = 600) -> pd.DataFrame:
    """b and v are readable from a: masked cells can be reconstructed."""
    rng = np.random.default_rng(0)
    a = rng.choice(list("pqrs"), size=n)
    return pd.DataFrame({"a": a, "b": np.char.add(a, "x"), "v": np.searchsorted(list("pqrs"), a) + rng.normal(0, 0.1, n)})


def masked(**learned) -> TableEncoderConfig:
    settings = dict(dim=16, num_layers=1, epochs=4, lr=5e-3, mask_prob=0.3, batch_size=64, progress=False) | learned
    return TableEncoderConfig(kind="learned", learned=LearnedTableConfig(**settings))


def test_draws_replay_the_stream_of_one_generator_from_any_position():
    rows = np.arange(10, 30)
    sequential = TableDraws(rows, seed=3, batch_size=8, cells=5)  # 3 batches an epoch: 8, 8, 4 rows
    drawn = {}
    for epoch in range(3):
        drawn[epoch, -1] = sequential.order(epoch)
        for batch in range(3):
            drawn[epoch, batch] = sequential.cells_of(epoch, batch)
    g = torch.Generator().manual_seed(3)  # the encoder's own loop before train_loop: order, then a mask per batch
    for epoch in range(3):
        np.testing.assert_array_equal(drawn[epoch, -1], rows[torch.randperm(20, generator=g).numpy()])
        for batch, size in enumerate((8, 8, 4)):
            torch.testing.assert_close(drawn[epoch, batch], torch.rand(size, 5, generator=g), rtol=0, atol=0)
    fresh = TableDraws(rows, seed=3, batch_size=8, cells=5)
    torch.testing.assert_close(fresh.cells_of(2, 1), drawn[2, 1], rtol=0, atol=0)  # a resume: replayed
    np.testing.assert_array_equal(fresh.order(1), drawn[1, -1])  # backwards: from the start again
    assert TableDraws(rows, seed=3, batch_size=8, cells=0).cells_of(0, 0) is None  # a label: orders only


def test_learned_fit_trains_on_the_loop_and_keeps_the_best_epoch(one_torch_thread, tmp_path):
    frame = letters()
    enc = build_table_encoder(masked(epochs=6, patience=2, lr=3e-2))
    with pytest.raises(RuntimeError, match="fit_table_encoder"):
        enc.fit(frame)
    stats = train_table_encoder(enc, frame)
    valid = [h["valid_loss"] for h in enc.history]
    assert len(valid) == stats["epochs"] and stats["steps"] == stats["epochs"] * 9  # 540 training rows, batches of 64
    assert stats["best_epoch"] == int(np.argmin(valid)) and stats["valid_neg_loss"] == pytest.approx(-min(valid))
    enc.save(tmp_path / "enc")
    np.testing.assert_array_equal(load_table_encoder(tmp_path / "enc").encode(frame), enc.encode(frame))


def test_a_learned_fit_resumed_from_its_checkpoint_equals_an_uninterrupted_one(one_torch_thread, tmp_path):
    frame = letters()
    whole = fit_table_encoder(build_table_encoder(masked()), frame)  # dropout 0.1: seeded per step
    cut = build_table_encoder(masked())
    stats = train_table_encoder(cut, frame, checkpoint_dir=tmp_path / "ckpt", max_steps=13)  # epoch 1, step 4 of 9
    assert stats["steps"] == 13 and len(stats["history"]) == 1
    resumed = build_table_encoder(masked())
    stats = train_table_encoder(resumed, frame, checkpoint_dir=tmp_path / "ckpt")
    assert stats["steps"] == 4 * 9
    np.testing.assert_array_equal(resumed.encode(frame), whole.encode(frame))
    assert [h["valid_loss"] for h in resumed.history] == [h["valid_loss"] for h in whole.history]
