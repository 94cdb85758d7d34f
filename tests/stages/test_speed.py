"""The speed benchmarks run end to end at smoke sizes and report the figures BENCHMARKS.md quotes."""

from gts_lum.stages.speed import run_speed_benchmarks


def test_speed_benchmarks_smoke(tmp_path):
    out = run_speed_benchmarks(["simulator", "validation", "sequences", "tree"], tmp_path, quick=True)
    sim = out["simulator"]
    assert sim["events"] > 0 and sim["events_per_second"] > 0
    pipe = out["validation_and_sequences"]
    assert pipe["events"] > 0 and pipe["tokens"] > 0 and pipe["events_per_s_end_to_end"] > 0
    assert out["spectral_tree"][0]["behaviors"] == 1000
    assert (tmp_path / "speed.json").exists()


def test_scoring_benchmark_counts_flops():
    from gts_lum.stages.speed import bench_target_aware_scoring, decoder_flops

    # one layer, one token: 2 x (4 H^2 + 3 H I) + 4 T H multiply-add FLOPs
    assert decoder_flops(8, 16, 1, 1) == 2 * (4 * 64 + 3 * 128) + 4 * 8
    # the last layer at the last token only: keys and values (2 x 2 H^2 a token) over all T, the rest once
    full_layer = decoder_flops(8, 16, 1, 10)
    assert decoder_flops(8, 16, 2, 10, last_only=True) == full_layer + 10 * 4 * 64 + (full_layer / 10 - 4 * 64)
    assert decoder_flops(8, 16, 2, 1, last_only=True) == decoder_flops(8, 16, 2, 1)
    for compile in (False, True):
        out = bench_target_aware_scoring(hidden=32, layers=1, tokens=16, sequences=32, chunk=16, compile=compile)
        assert out["candidates"] == 32 and out["candidates_per_s"] > 0 and out["gflop_per_s"] > 0 and out["compiled"] is compile


def test_training_throughput_compares_positions_per_second(tmp_path):
    """GTS-LUM's phase II and HSTU's trainer on one data set through the shared loop: positions/s of each,
    and the check a device run must pass (the loss falls)."""
    out = run_speed_benchmarks(["training"], tmp_path, quick=True, data="synth:tiny", device="cpu", width=32, layers=1)[
        "training_throughput"
    ]
    for name in ("GTS-LUM", "GTS-LUM (validated)", "HSTU"):
        row = out["models"][name]
        assert row["positions_per_s"] > 0 and row["cases_per_s"] > 0 and row["loss_last_epoch"] < row["loss_first_epoch"]
    assert out["device"] == "cpu" and out["hstu_over_gts_lum"] > 0 and out["target_aware_candidates_per_s"] > 0
    assert out["hstu_over_gts_lum_validated"] > 0
