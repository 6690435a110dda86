"""Run the benchmarks: `python -m benchmarks [NAME ...] [--OPTION ...]` (NAME = bench_NAME.py).

Options (everything from the first argument that starts with "-") go to the
`run(argv)` of the one benchmark named, e.g. `python -m benchmarks generalization --quick`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import platform
import sys
import time
from pathlib import Path


def machine_summary() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"
    )


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    available = sorted(p.stem[len("bench_") :] for p in here.glob("bench_*.py"))
    split = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names, options = argv[:split], argv[split:]
    chosen = names or available
    if options and len(chosen) != 1:
        print(f"error: options {options} need exactly one benchmark named before them", file=sys.stderr)
        return 2
    unknown = [name for name in chosen if name not in available]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    modules = {name: importlib.import_module(f"benchmarks.bench_{name}") for name in chosen}
    if options and "argv" not in inspect.signature(modules[chosen[0]].run).parameters:
        print(f"error: benchmark {chosen[0]} takes no options, got {options}", file=sys.stderr)
        return 2
    print(f"machine: {machine_summary()}")
    for name, module in modules.items():
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        module.run(options) if options else module.run()
        print(f"({name}: {time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
