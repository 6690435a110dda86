"""Picks on gold fiducials: far denser than any protein, so far stronger in the tomogram.

Gold (19.3 g/cm^3) differs from ice about fifty times as much as a protein does
(1.35 g/cm^3); in a reconstruction a bead's peak stays many times any
macromolecule's even after the CTF and the resolution blur it. vpdetect's own
training data count beads as particles (SHREC'21's `fiducial` class), so the
localizer picks them; `--drop-gold` removes picks whose peak contrast exceeds
GOLD_CONTRAST_RATIO times the median pick's. Measured on the generalization
benchmark's gold cells (independent simulator, beads 26 times a protein's
contrast): beads 19-34 times the median pick's peak, true particles at most 2.9
times. The ratio is relative to the tomogram's own picks, so it needs no
calibration of grey values, works for either contrast, and needs enough picks
for a median (MIN_PICKS).
"""

from __future__ import annotations

import numpy as np

GOLD_CONTRAST_RATIO = 4.0
MIN_PICKS = 5
# Peak over a cube of this half-edge about the pick (centres may sit a voxel or two off a
# bead's core), after a Gaussian of this sigma (noise); background: the median of a cube
# BACKGROUND_MARGIN voxels larger on every side.
PEAK_RADIUS = 2
SMOOTHING_SIGMA = 1.0
BACKGROUND_MARGIN = 4


def peak_contrast(volume: np.ndarray, centres_zyx: np.ndarray) -> np.ndarray:
    """For each centre [z, y, x] (voxels), the largest |smoothed value - local background|
    within PEAK_RADIUS voxels: a bead's core in either contrast. Reads only small boxes, so a
    memory-mapped tomogram stays on disk."""
    from scipy import ndimage

    centres = np.rint(np.asarray(centres_zyx, dtype=np.float64)).astype(np.int64).reshape(-1, 3)
    shape = np.array(volume.shape)
    reach = PEAK_RADIUS + BACKGROUND_MARGIN
    peaks = np.zeros(len(centres))
    for i, centre in enumerate(np.clip(centres, 0, shape - 1)):
        lo, hi = np.maximum(centre - reach, 0), np.minimum(centre + reach + 1, shape)
        box = np.asarray(volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
        smooth = ndimage.gaussian_filter(box, SMOOTHING_SIGMA, mode="nearest")
        c = centre - lo
        core = smooth[tuple(slice(max(0, v - PEAK_RADIUS), v + PEAK_RADIUS + 1) for v in c)]
        peaks[i] = float(np.max(np.abs(core - np.median(smooth))))
    return peaks


def gold_picks(volume: np.ndarray, centres_zyx: np.ndarray, ratio: float = GOLD_CONTRAST_RATIO) -> np.ndarray:
    """Boolean mask of the centres that sit on gold: peak contrast above `ratio` times the
    median pick's. All False with fewer than MIN_PICKS centres (no median to trust)."""
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    if len(centres) < MIN_PICKS:
        return np.zeros(len(centres), dtype=bool)
    peaks = peak_contrast(volume, centres)
    typical = float(np.median(peaks))
    if typical <= 0:
        return np.zeros(len(centres), dtype=bool)
    return peaks > ratio * typical
