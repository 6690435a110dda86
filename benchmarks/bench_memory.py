"""Peak memory of the three large-input cases (issue 16), each in its own process under
`/usr/bin/time -v` (maximum resident set size):

- meanshift: one mean-shift iteration (what `find_particles` repeats on such a component)
  over a solid foreground region that is not hollow (thick ice, a carbon edge) of
  48 x 200 x 200 voxels, one seed per 2.5-voxel cell (123k seeds), bandwidth 5: ~6e7
  neighbour pairs at once before the fix (a full run takes minutes, so one iteration);
- stats: the tomogram statistics `classify` computes, on a memory-mapped 2048 x 2048 x 48
  float32 tomogram (805 MB);
- int8: opening a memory-mapped 1024 x 1024 x 512 int8 tomogram (537 MB) and computing
  its statistics, as `localize` and `pick` do first.

`python -m benchmarks memory` measures this checkout; `python -m benchmarks.bench_memory
[--code DIR]` measures the vpdetect found in DIR (e.g. an older worktree) for comparison.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("meanshift", "stats", "int8")

# What each case runs, in a fresh interpreter (the same public calls before and after the fix).
CASE_CODE = {
    "meanshift": """
import numpy as np
from vpdetect.localize.cluster import mean_shift
points = np.argwhere(np.ones((48, 200, 200), bool)).astype(np.float64)
_, first = np.unique(np.floor(points / 2.5), axis=0, return_index=True)
seeds = points[np.sort(first)] + 0.3
modes = mean_shift(points, seeds, 5.0, max_iterations=1)
print(len(seeds), "seeds, mean shift", float(np.abs(modes - seeds).mean()))
""",
    "stats": """
from vpdetect import preprocess
from vpdetect.io.mrc import read_tomogram
tomo = read_tomogram(r"{data}/float32.mrc")
stats = getattr(preprocess, "tomogram_stats", None) or preprocess.zscore_params  # what classify calls
print(stats(tomo.data))
""",
    "int8": """
from vpdetect.io.mrc import read_tomogram
from vpdetect.localize.pipeline import tomogram_stats
tomo = read_tomogram(r"{data}/int8.mrc")
print(tomo.data.dtype, tomogram_stats(tomo.data))
""",
}


def prepare(folder: Path) -> None:
    """The three inputs (about 1.35 GB on disk), made once per folder."""
    import numpy as np

    from vpdetect.io.mrc import write_mrc

    rng = np.random.default_rng(0)
    if not (folder / "float32.mrc").exists():
        write_mrc(folder / "float32.mrc", rng.normal(size=(48, 2048, 2048)).astype(np.float32))
    if not (folder / "int8.mrc").exists():
        voxels = np.frombuffer(rng.bytes(512 * 1024 * 1024), np.int8).reshape(512, 1024, 1024)
        write_mrc(folder / "int8.mrc", voxels)


def measure(case: str, data: Path, code_dir: Path) -> tuple[float, float, str]:
    """(peak resident MB, seconds, the case's output) of one case in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(code_dir), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", CASE_CODE[case].format(data=data)],
        capture_output=True, text=True, env=env, timeout=300, cwd=data,
    )
    seconds = time.perf_counter() - start
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0 or peak is None:
        return float("nan"), seconds, done.stderr.strip().splitlines()[-1] if done.stderr else "failed"
    return int(peak.group(1)) / 1024, seconds, done.stdout.strip().splitlines()[-1]


def run(code_dir: Path | None = None) -> None:
    if not Path("/usr/bin/time").exists():
        print("skipped: /usr/bin/time (GNU time) is not installed")
        return
    code_dir = code_dir or Path(__file__).resolve().parent.parent
    data = Path(os.environ.get("VPDETECT_BENCH_DIR", tempfile.gettempdir())) / "vpdetect-bench-memory"
    data.mkdir(parents=True, exist_ok=True)
    prepare(data)
    print(f"vpdetect from {code_dir}; inputs in {data}")
    print(f"{'case':10s} {'peak RSS':>10s} {'time':>8s}  output")
    for case in CASES:
        peak, seconds, output = measure(case, data, code_dir)
        print(f"{case:10s} {peak:8.0f} MB {seconds:6.1f} s  {output[:80]}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    run(Path(args[args.index("--code") + 1]).resolve() if "--code" in args else None)
