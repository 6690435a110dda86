"""`make demo`: simulate a held-out tomogram, pick it with the bundled models, score it.

Runs the same `vpdetect` commands a user would type (printed as they run), then
draws the picks on a central slice. The last line states the localization F1.
Seed 7 is never used to make training data (see examples/train_default_models.sh).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

SEED = 7
SHAPE = ("256", "256", "128")
SLAB = "100"


def run(args: list[str]) -> None:
    """Run one vpdetect command, echoing it; stop the demo if it fails."""
    vpdetect = Path(sys.executable).with_name("vpdetect")
    print(f"\n$ vpdetect {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run([str(vpdetect), *args])
    if completed.returncode != 0:
        sys.exit(f"demo stopped: `vpdetect {args[0]}` exited with {completed.returncode}")
    print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="Folder for the demo's files.")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    truth = out / "sim" / "model_0"
    run(["simulate", str(out / "sim"), "--preset", "shrec21", "--shape", *SHAPE,
         "--slab-thickness", SLAB, "--seed", str(SEED), "--overwrite"])
    picks = out / "picks.star"
    run(["pick", str(truth / "reconstruction.mrc"), "-o", str(picks), "--overwrite"])
    scores = out / "scores.json"
    run(["evaluate", str(picks), "--truth", str(truth), "--json", str(scores),
         "--plot", str(out / "confusion.png")])

    # The picture: a central slice with the picks coloured by class.
    from vpdetect.evaluate.overlay import plot_picks_on_slice
    from vpdetect.io.mrc import read_tomogram
    from vpdetect.io.particles import read_particles

    tomo = read_tomogram(truth / "reconstruction.mrc")
    table = read_particles(picks)
    truth_table = read_particles(truth / "particle_locations.txt")
    figure = plot_picks_on_slice(tomo.data, table, truth=truth_table,
                                 title=f"held-out shrec21 tomogram (seed {SEED}): vpdetect picks")
    figure.savefig(out / "picks_slice.png", dpi=110)
    # One file a line, so that the summary reads in an 80-column terminal.
    print(f"\npicture of the picks: {out / 'picks_slice.png'}")
    print(f"confusion matrix:     {out / 'confusion.png'}")
    print(f"metrics (JSON):       {scores}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")

    f1 = json.loads(scores.read_text())["localization"]["f1"]
    print(f"localization F1: {f1:.3f}")


if __name__ == "__main__":
    main()
