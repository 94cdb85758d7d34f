import json

import numpy as np
import pandas as pd
import pytest

from gts_lum.data.events import EventLog
from gts_lum.evaluation.protocol import EvalConfig
from gts_lum.recommenders.baselines import MarkovChain, MarkovConfig, PopularityConfig
from gts_lum.recommenders.hstu import HSTU
from gts_lum.recommenders.registry import MODELS, build_model, register_model
from gts_lum.sequence.splits import leave_one_out
from gts_lum.stages.bench import TABLE2_COLUMNS, format_table, improvements, run_bench


def row(method, values, **extra):
    return {"method": method, **dict(zip(TABLE2_COLUMNS, values)), **extra}


def test_format_table_percent_and_impv_by_hand():
    ref = row("HSTU", [0.02, 0.04, 0.10, 0.20, 0.01, 0.02, 0.05, 0.08])
    double = row("Double", [0.04, 0.08, 0.20, 0.40, 0.02, 0.04, 0.10, 0.16])
    # relative changes +50%, -50%, 0 x 6 -> mean 0; then +100% on one column only -> 12.5%
    mixed = row("Mixed", [0.03, 0.02, 0.10, 0.20, 0.01, 0.02, 0.05, 0.08])
    one = row("One", [0.04, 0.04, 0.10, 0.20, 0.01, 0.02, 0.05, 0.08])
    table = format_table([ref, double, mixed, one])
    lines = table.strip().splitlines()
    assert lines[0] == "| Methods | R@5 | R@10 | R@50 | R@200 | NDCG@5 | NDCG@10 | NDCG@50 | NDCG@200 | Impv.(avg) |"
    assert lines[2] == "| HSTU | 2.00 | 4.00 | 10.00 | 20.00 | 1.00 | 2.00 | 5.00 | 8.00 | 0.00% |"
    assert lines[3].endswith("| 100.00% |")
    assert lines[4].endswith("| 0.00% |")
    assert lines[5].endswith("| 12.50% |")
    # another reference, by name: Double vs itself 0, HSTU vs Double -50%
    assert improvements([ref, double], 1, TABLE2_COLUMNS) == pytest.approx([-0.5, 0.0])
    assert format_table([ref, double], reference="Double").splitlines()[2].endswith("| -50.00% |")


def test_format_table_subset_columns_time_and_zero_reference():
    rows = [
        row("A", [0.0, 0.1, 0, 0, 0.1, 0.2, 0, 0], train_seconds=1.25),
        row("B", [0.1, 0.2, 0, 0, 0.1, 0.1, 0, 0], train_seconds=10.0),
    ]
    cols = ("R@10", "NDCG@10")
    lines = format_table(rows, columns=cols).splitlines()
    assert lines[0] == "| Methods | R@10 | NDCG@10 | Impv.(avg) | Train (s) |"
    assert lines[3] == "| B | 20.00 | 10.00 | 25.00% | 10.0 |"  # (+100% - 50%) / 2
    assert format_table(rows, columns=("R@5",)).splitlines()[3].split(" | ")[2] == "n/a"
    with pytest.raises(ValueError, match="not a method"):
        format_table(rows, reference="C")
    with pytest.raises(ValueError, match="lack"):
        format_table([{"method": "A"}])


def popular_and_sequential_log() -> EventLog:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(30):
        start, n = int(rng.integers(5)), int(rng.integers(5, 10))
        rows += [(f"u{u}", f"s{(start + t) % 5}", 60 * t) for t in range(n)]
    return EventLog.from_frame(pd.DataFrame(rows, columns=["user_id", "behavior_id", "timestamp"]))


def test_run_bench_writes_both_tables_deterministically(tmp_path):
    split = leave_one_out(popular_and_sequential_log())
    models = [
        ("markov", None, []),
        ("popularity", None, None),
        (
            "hstu",
            None,
            [
                "dim=8",
                "qk_dim=4",
                "v_dim=4",
                "num_layers=1",
                "train.epochs=2",
                "train.max_len=6",
                "train.num_negatives=4",
                "train.device=cpu",
            ],
        ),
        ("markov", None, {"smoothing": 1000.0}, "markov-smooth"),
    ]
    cfg = EvalConfig(ks=(5, 10, 50, 200))
    rows = run_bench(split, models, tmp_path / "a", eval_cfg=cfg)
    md = (tmp_path / "a" / "table.md").read_text().splitlines()
    assert md[0].startswith("| Methods | R@5 | R@10 | R@50 | R@200 | NDCG@5 | NDCG@10 | NDCG@50 | NDCG@200 | Impv.(avg) | Train (s) |")
    assert [line.split(" | ")[0] for line in md[2:]] == ["| markov", "| popularity", "| hstu", "| markov-smooth"]
    assert md[2].split(" | ")[9] == "0.00%"  # the reference row is the first
    payload = json.loads((tmp_path / "a" / "table.json").read_text())
    assert payload["reference"] == "markov" and payload["columns"] == list(TABLE2_COLUMNS)
    by_method = {r["method"]: r for r in payload["rows"]}
    assert by_method["markov"]["R@5"] == 1.0  # a 5-cycle: the chain is perfect
    assert by_method["markov-smooth"]["model_config"]["smoothing"] == 1000.0
    for r in payload["rows"]:
        assert {"MRR", "train_seconds", "impv_avg", "fit"} <= set(r)
        expected = np.mean([r[c] / by_method["markov"][c] - 1 for c in TABLE2_COLUMNS])
        assert r["impv_avg"] == pytest.approx(expected)
    again = run_bench(split, models, tmp_path / "b", eval_cfg=cfg, reference="popularity")

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("train_seconds", "fit", "impv_avg")} for r in rs]

    assert strip(again) == strip(rows)
    assert json.loads((tmp_path / "b" / "table.json").read_text())["reference"] == "popularity"


def test_registry_builds_from_name_yaml_and_overrides(tmp_path):
    assert set(MODELS) >= {"popularity", "markov", "sasrec", "hstu"}
    packaged = build_model("hstu")
    assert isinstance(packaged, HSTU) and packaged.cfg.train.max_len > 0
    path = tmp_path / "markov.yaml"
    path.write_text("smoothing: 5.0\npopularity:\n  half_life_days: 30.0\n")
    model = build_model("markov", path, ["popularity.half_life_days=7.0"])
    assert isinstance(model, MarkovChain)
    assert model.cfg == MarkovConfig(smoothing=5.0, popularity=PopularityConfig(half_life_days=7.0))
    with pytest.raises(ValueError, match="unknown model 'gru4rec'"):
        build_model("gru4rec")
    with pytest.raises(ValueError, match="already registered"):
        register_model("markov", MarkovConfig, MarkovChain)
    with pytest.raises(ValueError, match="duplicate method labels"):
        run_bench(leave_one_out(popular_and_sequential_log()), [("markov", None, []), ("markov", None, [])], tmp_path)


def test_run_bench_over_seeds_reports_mean_and_spread(tmp_path):
    split = leave_one_out(popular_and_sequential_log())
    hstu = [
        "dim=8",
        "qk_dim=4",
        "v_dim=4",
        "num_layers=1",
        "train.epochs=2",
        "train.max_len=6",
        "train.num_negatives=4",
        "train.device=cpu",
    ]
    models = [("markov", None, []), ("hstu", None, hstu), ("hstu", None, {"train": {"lr": 0.01}}, "hstu-lr")]
    rows = run_bench(split, models, tmp_path, eval_cfg=EvalConfig(ks=(5, 10, 50, 200)), seeds=[0, 1, 2])
    markov, hstu_row, hstu_lr = rows
    assert "seeds" not in markov and "sd" not in markov  # deterministic: one run
    assert [r["seed"] for r in hstu_row["seeds"]] == [0, 1, 2]
    assert "fit" not in hstu_row and all("fit" in r for r in hstu_row["seeds"])
    single = run_bench(split, [("hstu", None, [*hstu, "train.seed=1"], "one")], tmp_path / "one", eval_cfg=EvalConfig(ks=(5, 10, 50, 200)))[
        0
    ]
    assert hstu_row["seeds"][1]["NDCG@10"] == pytest.approx(single["NDCG@10"])  # seed 1 of the mean is the seed-1 run
    per_seed = np.array([r["NDCG@10"] for r in hstu_row["seeds"]])
    assert hstu_row["NDCG@10"] == pytest.approx(per_seed.mean())
    assert hstu_row["sd"]["NDCG@10"] == pytest.approx(per_seed.std(ddof=1))
    assert hstu_row["R@200"] == pytest.approx(np.mean([r["R@200"] for r in hstu_row["seeds"]]))
    assert len({r["NDCG@10"] for r in hstu_row["seeds"]} | {r["MRR"] for r in hstu_row["seeds"]}) > 2  # the seeds differ
    assert [r["seed"] for r in hstu_lr["seeds"]] == [0, 1, 2]  # dict overrides get the seed too
    md = (tmp_path / "table.md").read_text().splitlines()
    assert "sd NDCG@10" in md[0].split(" | ")
    assert md[2].split(" | ")[-2] == "-" and md[3].split(" | ")[-2] == f"{100 * hstu_row['sd']['NDCG@10']:.2f}"
    assert json.loads((tmp_path / "table.json").read_text())["seeds"] == [0, 1, 2]


def test_bench_phase1_runs_once_per_qformer_config_and_gts_lum_starts_from_it(tmp_path):
    import torch
    from safetensors.torch import load_file

    from gts_lum.data.ingest import prepare_dataset
    from gts_lum.recommenders.registry import attach_dataset
    from gts_lum.sequence.dataset import SequenceDataset, SplitConfig, build_sequence_dataset
    from gts_lum.stages.bench_runner import BenchConfig, model_specs, run_encoders, run_phase1_stages

    clean = prepare_dataset("synth:tiny", tmp_path / "data")
    build_sequence_dataset(clean, tmp_path / "sequences", None, {}, SplitConfig())
    artifacts = run_encoders(clean, tmp_path / "sequences", tmp_path / "encoders", {})
    cfg = BenchConfig(
        models=[
            "markov",
            {"model": "gts_lum", "label": "front"},
            {"model": "gts_lum", "label": "none", "overrides": {"net": {"target_placement": "none"}}},
            {"model": "gts_lum", "label": "biz text", "overrides": {"qformer": {"variant": "biz_text"}}},
            {"model": "gts_lum", "label": "given", "overrides": {"artifacts": {"qformer": "elsewhere"}}},
            {"model": "gts_lum", "label": "w/o Q-former", "overrides": {"qformer": {"variant": "no_qformer"}}},
        ]
    )
    specs = run_phase1_stages(
        model_specs(cfg, artifacts), tmp_path / "sequences", artifacts, tmp_path / "phase1", {"max_steps": 3, "checkpoint_every": 0}
    )
    qformer = {label: overrides.get("artifacts", {}).get("qformer") for _, _, overrides, label in specs}
    assert qformer["markov"] is None
    assert qformer["front"] == qformer["none"] != qformer["biz text"]  # one phase-I run per Q-former config
    assert qformer["given"] == "elsewhere"
    assert sorted(p.name for p in (tmp_path / "phase1").iterdir()) == ["biz_text-1", "no_qformer-2", "qformer-0"]
    assert json.loads((tmp_path / "phase1" / "qformer-0" / "metrics.json").read_text())["steps"] == 3

    model = build_model("gts_lum", None, {**specs[1][2], "train": {"device": "cpu"}})
    attach_dataset(model, SequenceDataset.load(tmp_path / "sequences"))
    trained = load_file(tmp_path / "phase1" / "qformer-0" / "qformer.safetensors")
    state = model.net.adapter.state_dict()
    aligned = [k for k in trained if not k.startswith("decoder_projection.")]
    assert aligned and all(torch.equal(state[k], trained[k]) for k in aligned)
    fresh = build_model("gts_lum", None, {**model_specs(cfg, artifacts)[1][2], "train": {"device": "cpu"}})
    attach_dataset(fresh, SequenceDataset.load(tmp_path / "sequences"))
    assert not all(torch.equal(fresh.net.adapter.state_dict()[k], trained[k]) for k in aligned)  # it did not start as built
    dataset = SequenceDataset.load(tmp_path / "sequences")
    split = dataset.split()
    for spec in (specs[3], specs[5]):  # each variant's saved adapter is resized to the decoder it feeds
        model = build_model("gts_lum", None, {**spec[2], "train": {"device": "cpu"}})
        attach_dataset(model, dataset)
        scores = model.score(split.log, split.test.subset(np.arange(3)), np.arange(split.log.num_behaviors))
        assert scores.shape == (3, split.log.num_behaviors) and np.isfinite(scores).all(), spec[3]


def test_equal_time_as_gives_the_later_models_the_reference_rows_training_time(tmp_path):
    split = leave_one_out(popular_and_sequential_log())
    hstu = [
        "dim=8",
        "qk_dim=4",
        "v_dim=4",
        "num_layers=1",
        "train.epochs=2",
        "train.max_len=6",
        "train.num_negatives=4",
        "train.device=cpu",
    ]
    models = [("hstu", None, hstu, "first"), ("markov", None, []), ("hstu", None, [*hstu, "train.epochs=4"], "later")]
    first, markov, later = run_bench(split, models, tmp_path, eval_cfg=EvalConfig(ks=(5, 10, 50, 200)), equal_time_as="first")
    assert "time_budget_s" not in str(first["overrides"]) and markov["overrides"] == []  # Markov trains no loop
    assert later["model_config"]["train"]["time_budget_s"] == pytest.approx(first["train_seconds"])
    with pytest.raises(ValueError, match="equal_time_as"):
        run_bench(split, models, tmp_path / "x", eval_cfg=EvalConfig(ks=(5, 10, 50, 200)), equal_time_as="nobody")
