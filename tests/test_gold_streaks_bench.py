"""The gold-streak benchmark on a small scene: its beads are found, the range fitted, the streaks reduced."""

from benchmarks import bench_gold_streaks as bench


def test_benchmark_times_and_scores_the_subtraction_on_reconstructed_beads(capsys):
    result = bench.run(["--shape", "48", "128", "128", "--beads", "3"])
    assert result["n_beads"] == 3
    low, high = result["tilt_range"]
    assert abs(low + 60) <= 1.5 and abs(high - 60) <= 1.5  # skimage's +-60, in the module's mirrored frame
    assert all(share < 0.5 for share in result["left_share"])
    assert min(result["baseline_s"], result["find_s"], result["range_s"], result["remove_s"]) > 0
    printed = capsys.readouterr().out
    assert "x baseline" in printed and max(len(line) for line in printed.splitlines()) <= 80
