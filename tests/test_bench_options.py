"""The benchmark runner's options: what `python -m benchmarks NAME --OPTION` does (nothing is timed here)."""

from benchmarks.__main__ import main
from benchmarks.bench_msdnet import CLASSIFIER_SIZE, LOCALIZER_SIZES, TOMOGRAM_SHAPES, parse_args


def test_msdnet_options_choose_what_runs():
    assert parse_args([]) == (LOCALIZER_SIZES, CLASSIFIER_SIZE, TOMOGRAM_SHAPES, False)
    chosen = parse_args(["--localizer-size", "0", "--no-classifier", "--tomogram", "8", "16", "24", "--warm"])
    assert chosen == ((), None, ((8, 16, 24),), True)
    assert parse_args(["--localizer-size", "64", "--localizer-size", "96", "--no-tomograms"])[::2] == ((64, 96), ())


def test_runner_refuses_options_for_a_benchmark_that_takes_none(capsys):
    assert main(["cluster", "--quick"]) == 2
    assert "benchmark cluster takes no options" in capsys.readouterr().err
    assert main(["msdnet", "cluster", "--warm"]) == 2  # options need exactly one benchmark
