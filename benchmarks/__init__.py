"""Benchmarks: each `bench_*.py` module has `run()` that prints its figures as ratios
against a baseline measured in the same process. Run all with `make bench`
(`python -m benchmarks`), or some with `python -m benchmarks cluster msdnet`."""

import vpdetect  # noqa: F401  (first: it enables torch's huge-page allocations, as `vpdetect` does)
