"""Every stage as a `gts-lum` subcommand, chained on tiny simulated data (in process)."""

import json

import pytest

from gts_lum.cli import main


def test_stages_chain_through_the_cli(tmp_path, capsys):
    assert main(["ingest", "synth:tiny", "--out", str(tmp_path / "data"), "--set", "users=60", "--set", "days=7"]) == 0
    clean = tmp_path / "data" / "clean"
    assert json.loads((clean / "validation_summary.json").read_text())["tables"]["users"]["rows_kept"] == 60
    assert main(["sequences", str(clean), "--out", str(tmp_path / "seq"), "--split", "target_filter=type=ott", "--set", "token_budget=64"]) == 0
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
    for stage in ("synth", "ingest", "validate", "sequences", "semantic-ids", "graph", "tables", "phase1", "train", "evaluate", "bench", "table-auc", "speed"):
        with pytest.raises(SystemExit) as exit_:
            main([stage, "--help"])
        assert exit_.value.code == 0
        assert "usage: gts-lum " + stage in capsys.readouterr().out
