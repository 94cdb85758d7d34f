"""Phase II under torchrun: two CPU processes (gloo), data parallel, rank 0 saves; the model then scores."""

import json
import os
import subprocess
import sys

import numpy as np

from gts_lum.evaluation.protocol import EvalConfig, evaluate
from gts_lum.recommenders.registry import load_model
from gts_lum.training.checkpoint import read_card

TINY = [
    "net.decoder.hidden_size=32",
    "net.decoder.num_layers=1",
    "net.decoder.num_heads=2",
    "net.decoder.intermediate_size=64",
    "net.compressor.windows=2",
    "net.compressor.window_size=4",
    "qformer.num_queries=2",
    "qformer.num_layers=1",
    "qformer.num_heads=2",
    "qformer.hidden_size=32",
    "qformer.intermediate_size=64",
    "qformer.max_window=4",
    "train.batch_size=8",
    "train.lr=0.001",
    "train.epochs=3",
    "train.sampled_negatives=8",
    "train.hard_negatives=2",
    "rerank_depth=3",
]


def test_two_process_ddp_trains_and_saves_once(cycle_data, tmp_path):
    out = tmp_path / "model"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "gts_lum.cli",
        "train",
        str(cycle_data.root),
        "--model",
        "gts_lum",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--checkpoints",
        str(tmp_path / "ckpt"),
    ]
    cmd += [arg for setting in TINY for arg in ("--set", setting)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world 2" in done.stderr  # both ranks joined one process group
    stats = read_card(out)["metadata"]["train_stats"]
    assert stats["world_size"] == 2 and stats["epochs"] == 3
    assert json.loads((tmp_path / "ckpt" / "position.json").read_text())["epoch"] == 3
    model = load_model(out)
    split = cycle_data.split()
    metrics = evaluate(model, split.log, split.test, cfg=EvalConfig(ks=(1, 3)))
    assert np.isfinite(metrics["MRR"]) and metrics["R@3"] > 0.5  # 9 behaviours: chance is 1/3
