"""Clustering speed (issue 8 point 3): vpdetect's CC-seeded mean-shift vs scikit-learn MeanShift.

Scene: a simulated 512x512x200 slab segmentation (a SHREC-like crowd of
spheres, radius 3-6 voxels, a tenth of them touching a neighbour, blurred and
noisy like a network's probability map). Baseline: `sklearn.cluster.MeanShift`
(flat kernel, bin seeding) on all foreground voxels after the same threshold
and opening. Both are timed in this run; the particles found are compared
(count, and centre distance after matching).
"""

from __future__ import annotations

import time

import numpy as np

SHAPE = (200, 512, 512)  # [z, y, x]
N_PARTICLES = 2500
RADII = (3.0, 5.0)
BANDWIDTH = 5.0
THRESHOLD = 0.5
OPENING_RADIUS = 1
MIN_SIZE = 10
SEED = 7


def simulate_segmentation(
    shape=SHAPE, n_particles=N_PARTICLES, radii=RADII, touching_fraction=0.1, seed=SEED
) -> tuple[np.ndarray, np.ndarray]:
    """A probability map [z, y, x] (float16) of non-overlapping spheres and their true centres."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    margin = radii[1] + 2
    centres: list[np.ndarray] = []
    sizes: list[float] = []
    attempts = 0
    while len(centres) < n_particles and attempts < 50 * n_particles:
        attempts += 1
        r = rng.uniform(*radii)
        if centres and rng.random() < touching_fraction:
            anchor = rng.integers(len(centres))
            direction = rng.normal(size=3)
            c = centres[anchor] + direction / np.linalg.norm(direction) * (r + sizes[anchor] + 0.5)
        else:
            c = rng.uniform([margin] * 3, np.array(shape) - margin)
        if np.any(c < margin) or np.any(c > np.array(shape) - margin):
            continue
        if centres:
            d = np.linalg.norm(np.array(centres) - c, axis=1)
            if np.any(d < np.array(sizes) + r + 0.4):
                continue
        centres.append(c)
        sizes.append(r)
    centres_arr = np.array(centres)
    occupancy = np.zeros(shape, dtype=np.float32)
    for c, r in zip(centres_arr, sizes, strict=True):
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, shape)
        z, y, x = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        inside = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
        occupancy[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][inside] = 1.0
    prob = ndimage.gaussian_filter(occupancy, 0.7)
    prob += rng.normal(0, 0.08, size=shape).astype(np.float32)
    np.clip(prob, 0, 1, out=prob)
    return prob.astype(np.float16), centres_arr


def sklearn_particles(prob, bandwidth=BANDWIDTH) -> tuple[np.ndarray, np.ndarray, float]:
    """Baseline: MeanShift on every foreground voxel. Returns centres [z, y, x], sizes, seconds."""
    from sklearn.cluster import MeanShift

    from vpdetect.localize.cluster import extract_foreground

    foreground = extract_foreground(prob, THRESHOLD, OPENING_RADIUS)
    points = foreground.coords.astype(np.float64)
    start = time.perf_counter()
    model = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=True).fit(points)
    seconds = time.perf_counter() - start
    sizes = np.bincount(model.labels_, minlength=len(model.cluster_centers_))
    keep = sizes >= MIN_SIZE
    return model.cluster_centers_[keep], sizes[keep], seconds


def match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each centre of `a` to the nearest centre of `b`."""
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(b).query(a, k=1)
    return distance


def compare(shape=SHAPE, n_particles=N_PARTICLES) -> dict:
    from vpdetect.localize.cluster import extract_foreground, find_particles

    prob, truth = simulate_segmentation(shape, n_particles)
    n_foreground = len(extract_foreground(prob, THRESHOLD, OPENING_RADIUS).values)
    start = time.perf_counter()
    table = find_particles(prob, THRESHOLD, OPENING_RADIUS, BANDWIDTH, MIN_SIZE)
    ours_s = time.perf_counter() - start
    ours = table[["z", "y", "x"]].to_numpy()
    reference, _, sklearn_s = sklearn_particles(prob)
    return {
        "shape": shape,
        "n_true": len(truth),
        "n_foreground": n_foreground,
        "n_ours": len(ours),
        "n_sklearn": len(reference),
        "ours_s": ours_s,
        "sklearn_s": sklearn_s,
        "ours_to_sklearn": match(ours, reference),
        "sklearn_to_ours": match(reference, ours),
        "ours_to_truth": match(ours, truth),
        "sklearn_to_truth": match(reference, truth),
    }


def run() -> None:
    r = compare()
    z, y, x = r["shape"]
    count_diff = abs(r["n_ours"] - r["n_sklearn"]) / max(r["n_sklearn"], 1)
    print(
        f"scene: {x}x{y}x{z} slab, {r['n_true']} spheres (radius {RADII[0]:g}-{RADII[1]:g}), "
        f"{r['n_foreground']} foreground voxels; bandwidth {BANDWIDTH:g}, threshold {THRESHOLD}, "
        f"opening {OPENING_RADIUS}, min size {MIN_SIZE}"
    )
    print(
        f"vpdetect find_particles (threshold+opening+CC+mean-shift): {r['ours_s']:.2f} s, "
        f"{r['n_ours']} particles"
    )
    print(f"sklearn MeanShift (fit only, bin seeding): {r['sklearn_s']:.2f} s, {r['n_sklearn']} particles")
    print(f"speed-up: {r['sklearn_s'] / r['ours_s']:.1f}x (target >= 10x)")
    within = np.mean(r["ours_to_sklearn"] <= 1.0)
    print(
        f"agreement: count difference {100 * count_diff:.2f}% (target <= 1%), "
        f"{100 * within:.2f}% of vpdetect centres within 1 voxel of a sklearn centre "
        f"(median {np.median(r['ours_to_sklearn']):.3f} voxel), "
        f"{100 * np.mean(r['sklearn_to_ours'] <= 1.0):.2f}% of sklearn centres within 1 voxel of ours"
    )
    print(
        f"vs truth: {100 * np.mean(r['ours_to_truth'] <= 1.0):.2f}% of vpdetect centres within 1 voxel "
        f"of a true centre (median {np.median(r['ours_to_truth']):.3f}); sklearn "
        f"{100 * np.mean(r['sklearn_to_truth'] <= 1.0):.2f}% (median {np.median(r['sklearn_to_truth']):.3f})"
    )
