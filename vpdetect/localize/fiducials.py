"""Gold fiducials: finding the beads, subtracting their streaks, dropping the picks on them.

Gold (19.3 g/cm^3) differs from ice about fifty times as much as a protein does
(1.35 g/cm^3); in a reconstruction a bead's peak stays many times any
macromolecule's even after the CTF and the resolution blur it. `find_beads` takes
every object whose Gaussian-smoothed robust |z| exceeds STREAK_Z as a bead (its
centre and radius from its half-maximum body), one per maximum of a wider smoothing,
so that touching beads (clusters are common) are told apart and each keeps its own
body and core.

Beads are context, not targets: vpdetect picks macromolecules, and a pick on a bead
is a false particle for every downstream step. `localize` / `pick` drop the picks within
a gold bead's radius + BEAD_MARGIN (`picks_on_beads`) when the model card says
`drop_gold` (the bundled localizer does; `--keep-gold` keeps them, as SHREC'21's
protocol wants, which scores beads as its class `fiducial`). At high SNR a protein's
smoothed |z| passes STREAK_Z too (the benchmark's snr=4 cell: three of them, 20-21), so a bead
also needs a peak contrast over GOLD_CONTRAST_RATIO times the median pick's
(`gold_beads`): gold's is 19-34 times on the benchmark's gold cells, true particles' at
most 2.9 times on all its cells. Testing the beads found this way rather than every
pick (the rule of 2026-12-05) keeps the particles beside a bead, whose own peak cube
reaches into it (validation gold cell of seed 9200: 0.952 against 0.961); vpdetect's
weak simulated fiducials (robust |z| 13-27) mostly stay picks.

A bead also throws streaks across the tomogram: the back-projection of a point
over a limited tilt range is an X of rays through it in each x-z plane, tens of
voxels long and many times a protein's contrast, and particles in those planes
are lost (the generalization benchmark's gold cells: with the beads' context
subtracted exactly, the bundled localizer scores 1.00 instead of 0.87).
`vpdetect.localize.gold_streaks` fits and subtracts them (in the slab `streak_slab`
names, outside the core a `Bead` carries); on by default for the bundled localizer
(`--keep-gold-streaks` turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Smoothing (noise) before the |z| that finds a bead and before a peak contrast.
SMOOTHING_SIGMA = 1.0
# A bead's peak contrast exceeds this many times the median pick's; fewer picks than MIN_PICKS
# give no median, and the smoothed |z| alone decides.
GOLD_CONTRAST_RATIO = 4.0
MIN_PICKS = 5
# Peak contrast: the largest |smoothed value - local background| within PEAK_RADIUS voxels of
# a centre; the background is the median of a cube BACKGROUND_MARGIN voxels larger on every side.
PEAK_RADIUS = 2
BACKGROUND_MARGIN = 4
# A pick this many voxels beyond a bead's radius from its centre is on the bead (a pick's
# centre may sit a voxel or two off the core, towards the halo the CTF draws around it).
BEAD_MARGIN = 2.0

# Objects whose Gaussian-smoothed (SMOOTHING_SIGMA) robust |z| exceeds this are treated as beads
# (after the card's background subtraction: the benchmark's gold cell's beads 24-106 at their
# centres, its snr=4 cell's proteins up to 21 - hence `gold_beads` - and vpdetect's `shrec21`
# fiducials 13-27).
STREAK_Z = 20.0
# Each bead is one maximum of the deviation smoothed by this many voxels (at the model's voxel
# size, beads of 5-15 nm): fewer would split a large bead's bright rim, more would merge touching beads.
PEAK_SMOOTHING_SIGMA = 3.0
# A bead's own peak (the smoothed |z| over STREAK_Z) lies within this many voxels of that maximum
# (its wide hill may peak in a darker centre: the reconstruction enhances a large bead's rim).
BEAD_SEARCH = 4
# A bead's core: voxels above this share of its smoothed peak (grown by one voxel) within
# CORE_BOX voxels of it; its streaks are estimated in the slab of y within its radius + SLAB_MARGIN.
CORE_SHARE = 0.25
CORE_BOX = 8
SLAB_MARGIN = 3


@dataclass(frozen=True)
class Bead:
    """A gold bead found in a volume: its centre [z, y, x] (voxels, on the half-voxel grid), its
    radius (voxels: the ball of its half-maximum body's volume) and its core (voxels above
    CORE_SHARE of its peak, grown by one) as a mask over the box `box` of the volume."""

    centre: np.ndarray
    radius: float
    box: tuple[slice, slice, slice]
    core: np.ndarray


def find_beads(volume: np.ndarray, centre: float, scale: float) -> list[Bead]:
    """The gold beads of `volume` [z, y, x]: objects whose Gaussian-smoothed (SMOOTHING_SIGMA)
    |volume - centre| / scale exceeds STREAK_Z (`centre`, `scale`: the volume's robust centre and
    spread). Either contrast; none (and no copy of the volume) where no voxel exceeds it."""
    from scipy import ndimage

    volume = np.asarray(volume, dtype=np.float32)
    # Smoothing cannot raise the largest |z|: without a voxel over the level there is no bead
    # (most tomograms), and nothing more is computed.
    if not max(float(volume.max()) - centre, centre - float(volume.min())) > STREAK_Z * abs(scale):
        return []
    deviation = np.abs((volume - centre) / scale)
    smoothed = ndimage.gaussian_filter(deviation, SMOOTHING_SIGMA)
    # One peak per bead: maxima of a wider smoothing, under which a large bead's rim (the
    # reconstruction enhances its edge, leaving several maxima on it) becomes one hill, while
    # touching beads stay two. Computed only in boxes around the voxels over the level.
    labels, _ = ndimage.label(smoothed > STREAK_Z)
    reach = int(np.ceil(4 * PEAK_SMOOTHING_SIGMA)) + BEAD_SEARCH + PEAK_RADIUS
    candidates: dict[tuple[int, ...], float] = {}  # peak -> its wide value
    for found in ndimage.find_objects(labels):
        lo = np.maximum([s.start - reach for s in found], 0)
        hi = np.minimum([s.stop + reach for s in found], volume.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        wide = ndimage.gaussian_filter(deviation[box], PEAK_SMOOTHING_SIGMA)
        near_level = ndimage.maximum_filter(smoothed[box], size=2 * BEAD_SEARCH + 1) > STREAK_Z
        # Maxima near this object only, where the box's smoothing is the volume's (boxes may overlap).
        inner = np.zeros(wide.shape, dtype=bool)
        inner[tuple(slice(max(s.start - BEAD_SEARCH, 0) - a, s.stop + BEAD_SEARCH - a)
                    for s, a in zip(found, lo, strict=True))] = True
        is_peak = near_level & inner & (wide == ndimage.maximum_filter(wide, size=2 * PEAK_RADIUS + 1))
        for voxel in np.argwhere(is_peak):
            candidates[tuple(int(v) for v in voxel + lo)] = float(wide[tuple(voxel)])
    # Equal neighbours (a symmetric or saturated bead) are one maximum: the maximum filter leaves
    # two within PEAK_RADIUS of each other only when they tie, so the first of them stands for all.
    peaks: list[np.ndarray] = []
    for voxel in sorted(candidates, key=lambda v: (-candidates[v], v)):
        if all(np.abs(np.subtract(voxel, kept)).max() > PEAK_RADIUS for kept in peaks):
            peaks.append(np.array(voxel))
    peaks.sort(key=tuple)  # in scan order
    return [_bead(smoothed, peak, peaks) for peak in peaks]


def picks_on_beads(centres_zyx: np.ndarray, beads: list[Bead], margin: float = BEAD_MARGIN) -> np.ndarray:
    """Boolean mask of the centres [z, y, x] within a bead's radius + `margin` voxels of its centre."""
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    on_bead = np.zeros(len(centres), dtype=bool)
    for bead in beads:
        on_bead |= np.linalg.norm(centres - bead.centre, axis=1) <= bead.radius + margin
    return on_bead


def peak_contrast(volume: np.ndarray, centres_zyx: np.ndarray) -> np.ndarray:
    """For each centre [z, y, x] (voxels), the largest |smoothed value - local background|
    within PEAK_RADIUS voxels. Reads only small boxes, so a memory-mapped tomogram stays on disk."""
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


def gold_beads(volume: np.ndarray, beads_zyx: np.ndarray, picks_zyx: np.ndarray,
               ratio: float = GOLD_CONTRAST_RATIO) -> np.ndarray:
    """Boolean mask of the beads (centres [z, y, x] in `volume`'s voxels, found by `find_beads`)
    that are gold: peak contrast over `ratio` times the median of the picks' (`picks_zyx`, the
    same grid). All True with fewer than MIN_PICKS picks (no median to trust)."""
    beads_zyx = np.asarray(beads_zyx, dtype=np.float64).reshape(-1, 3)
    picks_zyx = np.asarray(picks_zyx, dtype=np.float64).reshape(-1, 3)
    if len(picks_zyx) < MIN_PICKS or len(beads_zyx) == 0:
        return np.ones(len(beads_zyx), dtype=bool)
    typical = float(np.median(peak_contrast(volume, picks_zyx)))
    return peak_contrast(volume, beads_zyx) > ratio * typical


def _bead(smoothed: np.ndarray, peak_zyx, other_peaks=()) -> Bead:
    """The bead whose smoothed |z| peaks near `peak_zyx`; voxels nearer to another of
    `other_peaks` (a touching bead) are not its."""
    from scipy import ndimage

    peak = np.asarray(peak_zyx)
    lo = np.maximum(peak - CORE_BOX, 0)
    hi = np.minimum(peak + CORE_BOX + 1, smoothed.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sub = smoothed[box]
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij"), axis=-1)
    own = np.ones(sub.shape, dtype=bool)
    distance = np.linalg.norm(grid - peak, axis=-1)
    for other in other_peaks:
        if 0 < np.abs(np.asarray(other) - peak).max() <= 2 * CORE_BOX:
            own &= distance <= np.linalg.norm(grid - np.asarray(other), axis=-1)
    top = np.unravel_index(np.argmax(np.where(own & (distance <= BEAD_SEARCH), sub, -np.inf)), sub.shape)
    labels, _ = ndimage.label((sub > 0.5 * sub[top]) & own)
    body = labels == labels[top]
    centre = np.array(ndimage.center_of_mass(np.where(body, sub, 0.0))) + lo
    radius = float((3.0 * body.sum() / (4.0 * np.pi)) ** (1.0 / 3.0))
    labels, _ = ndimage.label(ndimage.binary_dilation(sub > CORE_SHARE * sub[top]) & own)
    return Bead(np.rint(2.0 * centre) / 2.0, radius, box, labels == labels[top])


def streak_slab(bead: Bead, ny: int) -> tuple[int, int]:
    """The y rows [start, stop) in which a bead's streaks are estimated: its radius + SLAB_MARGIN
    either side of its centre, within a volume of `ny` rows."""
    half = int(np.ceil(bead.radius + SLAB_MARGIN))
    return max(0, int(np.floor(bead.centre[1])) - half), min(ny, int(np.ceil(bead.centre[1])) + half + 1)
