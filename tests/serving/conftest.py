"""Serving fixtures, built once per test session: a tiny GTS-LUM trained on synth:tiny, a churn head,
the serving export, and the scorer running in a subprocess on 127.0.0.1 (stopped by its PID)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# Tiny phase II: one short epoch (~15 s on 2 cores); the point is a real trained model, not a good one.
TINY_GTS_LUM = {
    "net": {
        "decoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "compressor": {"windows": 1, "window_size": 8},
    },
    "qformer": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64, "num_heads": 2},
    "train": {"epochs": 1, "max_cases_per_epoch": 64, "hard_negatives": 1, "sampled_negatives": 32, "valid_cases": 20, "device": "cpu"},
    "rerank_depth": 5,
    "select_rerank": False,  # the scorer's two-stage path is under test: keep it whatever validation says
}
# The scorer under test runs with small limits so that the limit tests stay cheap.
SERVER_LIMITS = [
    "--max-candidates",
    "300",
    "--max-events",
    "3000",
    "--max-body-bytes",
    "400000",
    "--max-instances",
    "4",
    "--max-request-candidates",
    "500",
]


@dataclass
class TinyServing:
    clean: Path
    sequences: Path
    model_dir: Path
    heads_dir: Path
    export: Path


@pytest.fixture(scope="session")
def tiny_serving(tmp_path_factory) -> TinyServing:
    """synth:tiny -> sequences (OTT targets) -> a trained tiny GTS-LUM -> a churn head -> the export."""
    import torch

    from gts_lum.data.contract import read_table
    from gts_lum.data.ingest import prepare_dataset
    from gts_lum.evaluation.labels import discover_tasks, label_arrays
    from gts_lum.modeling.heads import HeadsConfig, build_head
    from gts_lum.recommenders.registry import load_model
    from gts_lum.sequence.dataset import SequenceDataset, SplitConfig, build_sequence_dataset
    from gts_lum.sequence.splits import EvalSet
    from gts_lum.serving.export import export_model, head_input_parts, head_inputs, save_head
    from gts_lum.stages.train import train_model
    from gts_lum.training.heads import fit_head

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores; also makes offline scores bitwise comparable with the server's
    try:
        root = tmp_path_factory.mktemp("serving")
        clean = prepare_dataset("synth:tiny", root / "data", progress=False)
        build_sequence_dataset(clean, root / "seq", None, {}, SplitConfig(target_filter="type=ott"))
        train_model(root / "seq", "gts_lum", None, TINY_GTS_LUM, root / "model")

        # a churn head fitted on the (target-agnostic) user embeddings of every user and their history summaries
        model = load_model(root / "model")
        log_ = SequenceDataset.load(root / "seq").event_log
        users = np.arange(log_.num_users)
        ends = log_.offsets[1:].astype(np.int64)
        cases = EvalSet(users, ends, np.zeros(len(users), np.int32), log_.timestamp[ends - 1])
        emb = torch.as_tensor(head_inputs(head_input_parts(model, log_, cases, ["state", "summary"], None))["state+summary"])
        labels = read_table(clean, "labels")
        (churn,) = [t for t in discover_tasks(labels) if t.name == "churn"]
        index, y, _ = label_arrays(labels, log_.user_ids, churn)
        head = build_head(churn, emb.shape[1], HeadsConfig())
        fit_head(head, emb[index], y, epochs=20)
        save_head(root / "heads", churn, head, inputs="state+summary")

        export_model(root / "model", root / "export", heads_dir=root / "heads")
        return TinyServing(clean, root / "seq", root / "model", root / "heads", root / "export")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def scorer_server(tiny_serving, tmp_path_factory):
    """The scorer over the tiny export (no feature store), small limits; stopped by PID at the end."""
    from gts_lum.serving.scorer import launch_server

    server = launch_server(tiny_serving.export, tmp_path_factory.mktemp("scorer") / "server.log", extra_args=SERVER_LIMITS)
    yield server
    server.stop()


class Offline:
    """The offline reference: the exported model loaded in the test process and the training log."""

    def __init__(self, serving, log_):
        self.serving, self.log = serving, log_

    def events(self, u: int) -> dict:
        """User u's whole history as an inline `events` object, in log order."""
        s, e = self.log.offsets[u], self.log.offsets[u + 1]
        return {
            "behavior_ids": [str(b) for b in self.log.behavior_ids[self.log.behavior[s:e]]],
            "timestamps": [int(t) for t in self.log.timestamp[s:e]],
        }

    def case(self, u: int):
        from gts_lum.sequence.splits import EvalSet

        end = int(self.log.offsets[u + 1])
        return EvalSet(np.array([u]), np.array([end]), np.zeros(1, np.int32), np.array([self.log.timestamp[end - 1]]))

    def rerank_margin(self, u: int) -> float:
        """The gap between the agnostic scores just inside and just outside the re-ranked list of user u: a
        near-tie there lets float noise (a padded batch against one case) swap which of the two is re-ranked."""
        model = self.serving.model
        depth, model.cfg.rerank_depth = model.cfg.rerank_depth, 0
        try:
            scores = np.sort(model.score(self.log, self.case(u), self.serving.default_candidates)[0])[::-1]
        finally:
            model.cfg.rerank_depth = depth
        return float(scores[depth - 1] - scores[depth]) if 0 < depth < len(scores) else float("inf")

    def ranking(self, u: int, candidates: list[str] | None, top_k: int) -> pd.DataFrame:
        """GTSLUM.score on user u's whole history in the training log (one case), ranked like the scorer:
        the export's targets two-stage, request candidates all target-aware (re-ranking depth = their number)."""
        serving, model = self.serving, self.serving.model
        cand = serving.default_candidates if candidates is None else np.array([serving.index[c] for c in candidates])
        depth = model.cfg.rerank_depth
        model.cfg.rerank_depth = depth if candidates is None else len(cand)
        try:
            scores = model.score(self.log, self.case(u), cand)[0]
        finally:
            model.cfg.rerank_depth = depth
        order = np.argsort(-scores, kind="stable")[:top_k]
        return pd.DataFrame({"behavior_id": serving.catalog[cand[order]].astype(str), "score": scores[order]})


@pytest.fixture(scope="session")
def offline(tiny_serving):
    import torch

    from gts_lum.sequence.dataset import SequenceDataset
    from gts_lum.serving.export import load_export

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server (--torch-threads 1): bitwise comparable scores
    yield Offline(load_export(tiny_serving.export), SequenceDataset.load(tiny_serving.sequences).event_log)
    torch.set_num_threads(threads)
