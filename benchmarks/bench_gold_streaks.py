"""Gold streak subtraction (`vpdetect/localize/gold_streaks.py`): its cost and what it leaves.

    python -m benchmarks gold_streaks [--shape Z Y X] [--beads N]

Scene: N gold beads (radius 3-5 voxels, density 30; two of them sharing rows) in a [z, y, x]
volume of unit white noise, each bead's x-z planes reconstructed by scikit-image's radon /
iradon (ramp filter) over -60..+60 degrees in steps of 3 - another code path than the module's
model of a back-projection. Timed in this run, the faster of two calls each: `find_beads`, the
tilt-range fit, the whole `remove_gold_streaks`, and as the baseline the background subtraction
every `localize` runs on the same volume (`vpdetect.preprocess.subtract_background`, the bundled
card's 8 voxels). Accuracy: the share of the beads' streaks (rms, their reconstruction alone)
left 8-20 and 20-45 voxels from a bead in its slab, and the range fitted (in the module's frame,
which is scikit-image's mirrored: +-60 expected).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPE = (128, 384, 384)  # [z, y, x]
N_BEADS = 8
ANGLES = np.arange(-60.0, 61.0, 3.0)
DENSITY = 30.0
BACKGROUND_SIGMA = 8.0
SEED = 5


def bead_scene(shape=SHAPE, n_beads=N_BEADS, seed=SEED):
    """(volume, the beads' reconstruction alone, centres [z, y, x], radii) with unit noise."""
    from skimage.transform import iradon, radon

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    side = max(nz, nx)
    top = (side - nz) // 2
    streaks = np.zeros(shape, dtype=np.float32)
    centres, radii = [], []
    spacing = ny / (n_beads + 1)
    for i in range(n_beads):
        # Beads 0 and 1 share their rows (their fits are joint); the others have rows of their own.
        y = spacing * (1 if i == 1 else i + 1) + rng.uniform(-2, 2)
        radius = rng.uniform(3.0, 5.0)
        z = rng.uniform(nz * 0.3, nz * 0.7)
        x = nx * (0.3 if i == 0 else 0.7 if i == 1 else rng.uniform(0.2, 0.8))
        centres.append((z, y, x))
        radii.append(radius)
        zz, xx = np.meshgrid(np.arange(side) - (z + top), np.arange(side) - x, indexing="ij")
        r = np.hypot(zz, xx)
        for row in range(max(0, int(y - radius - 1)), min(ny, int(y + radius + 2))):
            chord2 = radius**2 - (row - y) ** 2
            if chord2 <= 0:
                continue
            plane = DENSITY / (1.0 + np.exp(np.minimum((r - np.sqrt(chord2)) / 0.3, 60.0)))
            sinogram = radon(plane, theta=ANGLES, circle=True)
            streaks[:, row, :] += iradon(sinogram, theta=ANGLES, filter_name="ramp", circle=True,
                                         output_size=side)[top:top + nz].astype(np.float32)
    volume = streaks + rng.normal(0.0, 1.0, shape).astype(np.float32)
    return volume, streaks, np.array(centres), np.array(radii)


def _fastest(call, repeats: int = 2):
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result


def left_share(cleaned, volume, streaks, centres, radii, distances=((8, 20), (20, 45))) -> list[float]:
    """The rms of the beads' streaks left after the subtraction over their rms before, in the beads'
    slabs, at these x-z distances from the nearest bead."""
    nz, ny, nx = volume.shape
    left = cleaned - (volume - streaks)
    zz, xx = np.meshgrid(np.arange(nz), np.arange(nx), indexing="ij")
    shares = []
    for low, high in distances:
        total_left = total = 0.0
        for (z, y, x), radius in zip(centres, radii, strict=True):
            distance = np.hypot(zz - z, xx - x)
            ring = ((distance >= low) & (distance < high))[:, None, :]
            rows = slice(max(0, int(y - radius)), min(ny, int(y + radius) + 1))
            total_left += float(np.sum(np.where(ring, left[:, rows, :], 0.0) ** 2))
            total += float(np.sum(np.where(ring, streaks[:, rows, :], 0.0) ** 2))
        shares.append(np.sqrt(total_left / max(total, 1e-12)))
    return shares


def run(argv: list[str] | None = None) -> dict:
    from vpdetect.localize.fiducials import find_beads
    from vpdetect.localize.gold_streaks import fit_tilt_range, remove_gold_streaks
    from vpdetect.preprocess import normalisation_params, subtract_background

    parser = argparse.ArgumentParser(prog="python -m benchmarks gold_streaks")
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE, metavar=("Z", "Y", "X"))
    parser.add_argument("--beads", type=int, default=N_BEADS)
    args = parser.parse_args(argv or [])
    start = time.perf_counter()
    volume, streaks, centres, radii = bead_scene(tuple(args.shape), args.beads)
    print(f"scene: {args.beads} beads (radius 3-5) in {args.shape[2]} x {args.shape[1]} x "
          f"{args.shape[0]} voxels of unit noise,")
    print(f"  skimage radon/iradon over +-60 step 3 ({time.perf_counter() - start:.1f} s)")
    centre, scale = normalisation_params(volume, "robust")
    baseline, _ = _fastest(lambda: np.asarray(subtract_background(volume, BACKGROUND_SIGMA)[:]))
    find_s, beads = _fastest(lambda: find_beads(volume, centre, scale))
    range_s, tilt_range = _fastest(lambda: fit_tilt_range(volume, beads, centre, scale))
    remove_s, (cleaned, _, fitted) = _fastest(lambda: remove_gold_streaks(volume, centre, scale, beads))
    shares = left_share(cleaned, volume, streaks, centres, radii)
    print(f"baseline, background subtraction ({BACKGROUND_SIGMA:g} voxels): {baseline:.2f} s")
    print(f"find_beads: {find_s:.2f} s, {find_s / baseline:.1f} x baseline ({len(beads)} beads)")
    per_bead = remove_s / max(len(beads), 1)
    print(f"remove_gold_streaks: {remove_s:.2f} s, {remove_s / baseline:.1f} x baseline "
          f"({per_bead:.2f} s per bead)")
    print(f"  of it the tilt-range fit: {range_s:.2f} s, {fitted[0]:+.0f}..{fitted[1]:+.0f} deg "
          "(skimage's +-60, mirrored)")
    print(f"streaks' rms left: {100 * shares[0]:.0f} % at 8-20 voxels from a bead, "
          f"{100 * shares[1]:.0f} % at 20-45")
    return {"baseline_s": baseline, "find_s": find_s, "range_s": range_s, "remove_s": remove_s,
            "n_beads": len(beads), "tilt_range": tilt_range, "left_share": shares}
