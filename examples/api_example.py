"""The Python API end to end, in memory: simulate, pick, score, write, read back.

    python examples/api_example.py [--out DIR]

Nothing is read from disk but the bundled models; with --out the picks are
also written as RELION 5 STAR and read back. The tests run this script.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import vpdetect.api as vp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="Folder to write the picks to.")
    args = parser.parse_args()

    # A small held-out tomogram (1 nm voxels) with its ground truth, as numpy arrays.
    sim = vp.simulate("shrec21", seed=7, shape_xyz=(96, 96, 64), slab_thickness=48)
    volume = sim.reconstruction  # float32 [z, y, x]
    truth = vp.to_frame(sim.particles)
    print(f"volume {volume.shape[::-1]} (x, y, z), {len(truth)} true particles")

    # Both stages with the bundled models; options are LocalizeOptions / ClassifyOptions fields.
    picks = vp.pick(volume, voxel_size=10.0, search_radius=3.0)
    print(picks[["x", "y", "z", "score", "class_name", "vote_fraction"]].head().to_string())

    # Stage 2 alone, on the true coordinates (any table or (n, 3) array of x, y, z).
    proteins = truth[~truth["class_name"].isin(["vesicle", "fiducial"])]
    classes = vp.classify(volume, proteins[["x", "y", "z"]], voxel_size=10.0)
    right = (classes["class_name"].to_numpy() == proteins["class_name"].to_numpy()).mean()
    print(f"classes of the {len(proteins)} true protein positions: {right:.0%} right")

    scores = vp.evaluate(picks, truth, occupancy=sim.occupancy)
    loc = scores["localization"]
    print(f"{loc['RR']} picks, {loc['TP']} of {loc['n_particles']} particles found, F1 {loc['f1']:.3f}")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "picks.star"
        vp.write_table(path, picks, fmt="relion5")  # voxel and tomogram size ride in picks.attrs
        back = vp.read_table(path)
        assert len(back) == len(picks) and (back["class_name"] == picks["class_name"]).all()
        print(f"wrote {path} and read {len(back)} particles back")


if __name__ == "__main__":
    main()
