"""The speed benchmarks run end to end at smoke sizes and report the figures BENCHMARKS.md quotes."""

from gts_lum.evaluation.speed import run_speed_benchmarks


def test_speed_benchmarks_smoke(tmp_path):
    out = run_speed_benchmarks(["simulator", "validation", "sequences", "tree"], tmp_path, quick=True)
    sim = out["simulator"]
    assert sim["events"] > 0 and sim["events_per_second"] > 0
    pipe = out["validation_and_sequences"]
    assert pipe["events"] > 0 and pipe["tokens"] > 0 and pipe["events_per_s_end_to_end"] > 0
    assert out["spectral_tree"][0]["behaviors"] == 1000
    assert (tmp_path / "speed.json").exists()
