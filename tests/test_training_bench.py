"""The training benchmark times three ways of one network and checks they are one network."""

from test_train import _one_thread  # noqa: F401  (autouse: one torch thread)

from benchmarks.bench_training import compare, run


def test_three_ways_give_the_same_gradients_and_positive_rates():
    results = compare(crop=9, batch=2, depth=3, steps=1)
    assert list(results) == ["concat", "buffer, conv3d", "buffer, gemm"]
    for r in results.values():
        assert r["seconds"] > 0 and r["crops_per_s"] == 2 / r["seconds"]
        assert r["gradient_difference"] < 1e-4
    assert results["concat"]["gradient_difference"] == 0.0


def test_run_prints_a_table(capsys):
    run(["--crop", "8", "--batch", "1", "--depth", "2", "--steps", "1"])
    out = capsys.readouterr().out
    assert "| buffer, gemm |" in out and "vs concat" in out
