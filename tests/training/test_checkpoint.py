"""Training checkpoints: all-or-nothing writes, a manifest checked on load, a clear error on a bad file."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gts_lum.training.checkpoint import CheckpointError, load_training_state, save_training_state


def groups(value: float) -> dict:
    return {"weights": {"w": torch.full((64, 64), value)}, "optimizer": {}, "best": {"w": torch.zeros(3)}}


def test_round_trip_and_previous_kept(tmp_path):
    folder = tmp_path / "ckpt"
    assert load_training_state(folder) is None  # nothing yet: a fresh run
    save_training_state(folder, groups(1.0), {"epoch": 1})
    save_training_state(folder, groups(2.0), {"epoch": 2})
    loaded, position = load_training_state(folder)
    assert position == {"epoch": 2} and float(loaded["weights"]["w"][0, 0]) == 2.0 and loaded["optimizer"] == {}
    # the checkpoint before stays whole beside it
    again, old = load_training_state(tmp_path / "ckpt.previous")
    assert old == {"epoch": 1} and float(again["weights"]["w"][0, 0]) == 1.0


def test_a_cut_off_swap_resumes_from_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    save_training_state(folder, groups(1.0), {"epoch": 1})
    save_training_state(folder, groups(2.0), {"epoch": 2})
    os.replace(folder, tmp_path / "gone")  # the kill came between the two renames of the swap
    _, position = load_training_state(folder)
    assert position == {"epoch": 1}


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete", "position"])
def test_a_damaged_file_is_named_with_what_to_do(tmp_path, damage):
    folder = tmp_path / "ckpt"
    save_training_state(folder, groups(1.0), {"epoch": 1})
    target = folder / ("position.json" if damage == "position" else "weights.safetensors")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text(json.dumps({"epoch": 7}))
    with pytest.raises(CheckpointError, match=rf"{target.name}.*(previous|afresh)"):
        load_training_state(folder)


def test_a_folder_of_the_older_format_is_refused(tmp_path):
    (tmp_path / "position.json").write_text("{}")
    with pytest.raises(CheckpointError, match="manifest"):
        load_training_state(tmp_path)


WRITER = """
import sys, torch
from gts_lum.training.checkpoint import save_training_state
i = 0
while True:
    i += 1
    save_training_state(sys.argv[1], {"weights": {"w": torch.full((256, 256), float(i))}}, {"step": i})
    print(i, flush=True)
"""


def test_a_real_kill_at_any_moment_leaves_a_whole_checkpoint(tmp_path):
    """SIGKILL a process that writes checkpoints back to back, at several moments: every time, what is on
    disk loads, and its weights agree with its position (never new weights beside an old position)."""
    folder = tmp_path / "ckpt"
    for delay in (0.3, 0.45, 0.6, 0.75):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # at least one checkpoint written
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        tensors, position = load_training_state(folder)
        assert float(tensors["weights"]["w"][0, 0]) == position["step"]


def test_a_saved_model_folder_is_replaced_whole(tmp_path, cycle_data):
    """save_model writes a fresh folder and swaps it in: saving again over a model leaves one whole model,
    no stray files of the old one and no half-written sibling."""
    from gts_lum.recommenders.registry import build_model, load_model
    from gts_lum.training.checkpoint import save_model

    model = build_model("markov", None, {})
    model.fit(cycle_data.split())
    out = tmp_path / "model"
    save_model(model, "markov", out)
    (out / "stray.txt").write_text("from an older save")
    save_model(model, "markov", out, {"again": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and not (out / "stray.txt").exists()
    assert load_model(out) is not None
