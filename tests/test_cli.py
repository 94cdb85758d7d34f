"""Every stage as a `gts-lum` subcommand, chained on tiny simulated data (in process)."""

import json

import pytest

from gts_lum.cli import main


def test_stages_chain_through_the_cli(tmp_path, capsys):
    assert main(["ingest", "synth:tiny", "--out", str(tmp_path / "data"), "--set", "users=60", "--set", "days=7"]) == 0
    clean = tmp_path / "data" / "clean"
    assert json.loads((clean / "validation_summary.json").read_text())["tables"]["users"]["rows_kept"] == 60
    assert (
        main(["sequences", str(clean), "--out", str(tmp_path / "seq"), "--split", "target_filter=type=ott", "--set", "token_budget=64"])
        == 0
    )
    summary = json.loads((tmp_path / "seq" / "summary.json").read_text())
    assert summary["tokens_per_sequence_max"] <= 64 and summary["timezone"] == "Asia/Shanghai"
    assert main(["train", str(tmp_path / "seq"), "--model", "markov", "--out", str(tmp_path / "markov")]) == 0
    assert main(["train", str(tmp_path / "seq"), "--model", "popularity", "--out", str(tmp_path / "pop")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "seq"), str(tmp_path / "markov"), str(tmp_path / "pop")]) == 0
    table = capsys.readouterr().out
    assert "| markov |" in table and "| popularity |" in table and "Impv.(avg): mean relative gain over `popularity`" in table


def test_bad_input_exits_with_a_message(tmp_path, caplog):
    assert main(["ingest", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a folder" in caplog.text


def test_help_for_every_stage(capsys):
    for stage in (
        "synth",
        "ingest",
        "validate",
        "sequences",
        "semantic-ids",
        "graph",
        "tables",
        "phase1",
        "train",
        "evaluate",
        "bench",
        "table-auc",
        "speed",
    ):
        with pytest.raises(SystemExit) as exit_:
            main([stage, "--help"])
        assert exit_.value.code == 0
        assert "usage: gts-lum " + stage in capsys.readouterr().out


def _contract_folder(root, timestamps: list[str]):
    import pandas as pd

    from gts_lum.data.contract import DatasetManifest

    root.mkdir(parents=True)
    DatasetManifest(name="t", timezone="UTC").write(root)
    pd.DataFrame({"behavior_id": ["a", "b"], "description": ["watch video", "call"]}).to_csv(root / "behaviors.csv", index=False)
    n = len(timestamps)
    pd.DataFrame(
        {"user_id": [f"u{i % 3}" for i in range(n)], "timestamp": timestamps, "behavior_id": ["ab"[i % 2] for i in range(n)]}
    ).to_csv(root / "events.csv", index=False)
    return root


def test_a_stopped_ingest_leaves_a_folder_every_stage_refuses(tmp_path, caplog):
    mostly_bad = _contract_folder(tmp_path / "bad", ["not a time"] * 8 + ["2024-03-01 08:00", "2024-03-01 09:00"])
    assert main(["ingest", str(mostly_bad), "--out", str(tmp_path / "work")]) == 2  # most rows rejected: stopped
    clean = tmp_path / "work" / "clean"
    assert (clean / "validation_summary.json").exists() and not (clean / "VALIDATED").exists()
    caplog.clear()
    assert main(["sequences", str(clean), "--out", str(tmp_path / "seq")]) == 2
    assert "validation stopped before the end" in caplog.text
    assert main(["ingest", str(clean), "--out", str(tmp_path / "again")]) == 2
    # the same folder, validated again from good input, is accepted once the run completes
    good = _contract_folder(tmp_path / "good", [f"2024-03-0{1 + i // 4} 0{i % 4}:00" for i in range(10)])
    assert main(["validate", str(good), "--out", str(clean)]) == 0 and (clean / "VALIDATED").exists()
    assert main(["ingest", str(clean), "--out", str(tmp_path / "again")]) == 0


def test_table_auc_reads_any_table_through_its_mapping(tmp_path, caplog):
    import numpy as np
    import pandas as pd

    src = tmp_path / "bank"
    src.mkdir()
    rng = np.random.default_rng(0)
    age = rng.integers(18, 80, 120)
    plan = rng.choice(["basic", "plus", "pro"], 120)
    pd.DataFrame(
        {"id": [f"c{i}" for i in range(120)], "age": age, "plan": plan, "left": np.where((age < 35) ^ (rng.random(120) < 0.1), "y", "n")}
    ).to_csv(src / "customers.csv", sep=";", index=False)
    mapping = tmp_path / "bank.yaml"
    mapping.write_text(
        "name: bank\ntables:\n  users:\n    files: [customers.csv]\n    read_options: {sep: ';'}\n"
        "    columns: {user_id: id}\n    keep: [age, plan]\n"
        "  labels:\n    files: [customers.csv]\n    read_options: {sep: ';'}\n    columns: {user_id: id, label: left}\n"
        "    constants: {task: leaves}\n    values: {label: {y: 1, n: 0}}\n"
    )
    args = [
        "table-auc",
        "--data",
        str(src),
        "--mapping",
        str(mapping),
        "--no-text",
        "--set",
        "learned.epochs=1",
        "--set",
        "learned.progress=false",
    ]
    assert main([*args, "--task", "leaves", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "table_auc.json").read_text())
    assert (result["rows"]["train"], result["rows"]["test"]) == (96, 24)
    assert result["auc"]["gbt_raw"] > 0.7 and result["config"]["task"] == "leaves"
    assert main([*args, "--out", str(tmp_path / "out2")]) == 2  # the default task, churn, is not in this table
    assert "has label tasks ['leaves']: it needs users and labels of task 'churn'" in caplog.text


def test_a_bench_config_reads_its_data_from_its_own_folder(tmp_path, monkeypatch):
    import yaml

    configs = tmp_path / "project" / "configs"
    configs.mkdir(parents=True)
    stamps = [f"2024-03-0{1 + i // 6} {8 + i % 6}:00" for i in range(36)]
    _contract_folder(configs / "mydata", stamps)
    (configs / "bench.yaml").write_text("name: mine\ndata: mydata\nmodels: [popularity]\nsplit: {min_events: 2}\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert main(["bench", "--config", "project/configs/bench.yaml", "--out", str(tmp_path / "out")]) == 0
    assert "| popularity |" in (tmp_path / "out" / "table.md").read_text()
    from gts_lum.stages.bench_runner import load_bench_config

    # the shipped configs keep their paths from the repository root; so do paths not found beside the file, and overrides
    assert load_bench_config("pkg:bench/movielens.yaml").data == "../shared/data/movielens-latest-small"
    (configs / "other.yaml").write_text(yaml.safe_dump({"data": "elsewhere/data", "mapping": "m.yaml"}))
    assert (load_bench_config(configs / "other.yaml").data, load_bench_config(configs / "other.yaml").mapping) == (
        "elsewhere/data",
        "m.yaml",
    )
    assert load_bench_config(configs / "bench.yaml", ["data=mydata"]).data == "mydata"
