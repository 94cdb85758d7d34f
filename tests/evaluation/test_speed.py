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


def test_scoring_benchmark_counts_flops():
    from gts_lum.evaluation.speed import bench_target_aware_scoring, decoder_flops

    # one layer, one token: 2 x (4 H^2 + 3 H I) + 4 T H multiply-add FLOPs
    assert decoder_flops(8, 16, 1, 1) == 2 * (4 * 64 + 3 * 128) + 4 * 8
    for compile in (False, True):
        out = bench_target_aware_scoring(hidden=32, layers=1, tokens=16, sequences=32, chunk=16, compile=compile)
        assert out["candidates"] == 32 and out["candidates_per_s"] > 0 and out["gflop_per_s"] > 0 and out["compiled"] is compile
