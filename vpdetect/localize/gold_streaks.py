"""Gold beads' streaks: fitted as the back-projection of each bead's own projection, and subtracted.

A weighted back-projection turns a point-like object of high contrast into an X of rays: in every
x-z plane (the tilt axis is y), each tilt image adds a line through the bead along that tilt's
beam direction, whose profile across the line is the bead's ramp-filtered projection. A sphere
projects to the same disc at every tilt, so in each y row of a bead's slab the whole artefact is

    streaks(x, z) = sum over tilts t of  p(x cos t + z sin t)          (offsets from the bead)

with ONE 1D profile p per bead and row (2 PROFILE_HALF_WIDTH + 1 knots, hat-interpolated): a
few dozen numbers that every voxel of the row constrains, so the fit averages thousands of
voxels and a particle on a ray is an outlier of a robust fit rather than part of the estimate.
Beads that share a row are fitted jointly (their Xs cross); voxels whose smoothed residual stands
out (a particle) are left out of the fit. Measured against the exact context on two of the
generalization benchmark's design tomograms (bright, SNR 0.1, gold): the subtraction leaves 27-38 %
of the streaks' rms 8-20 voxels from a bead and 42-65 % 20-45 voxels out, where the median of
twelve point-symmetric samples used before left 73-85 % (it averaged twelve voxels and added their
noise); F1 on the 18 design gold tomograms 0.934 -> 0.976.

The tilt angles are not in the tomogram's header, so the range is fitted to the beads too
(`fit_tilt_range`): the ends of the fan of rays, one every RAY_STEP degrees, whose least-squares
profiles fit the brightest beads' central rows best. Found on the benchmark's +-60 degree
series: +-61; on vpdetect's own (misaligned) series, within 1-2 degrees of the truth. Its frame
(u = x cos t + z sin t) may be mirrored with respect to a reconstruction program's. The series'
own step is not needed: rays every degree over the range remove as much (the benchmark's 18
design gold tomograms: F1 0.971 with either).

Kept from the model: the beads' cores (the picker must still see a bead to drop the picks on it);
rows outside a bead's slab (radius + SLAB_MARGIN of its centre in y); voxels over MODEL_RADIUS
from it in x-z, where its rays are weak. The per-tilt misalignment a real series keeps (a voxel
or less after alignment) is not modelled: the fit subtracts the rays' common part.
"""

from __future__ import annotations

import logging

import numpy as np

from vpdetect.localize.fiducials import Bead, find_beads, streak_slab

log = logging.getLogger(__name__)

# A ray's profile across itself: knots at integer offsets within this many voxels (the
# ramp-filtered projection of a 5-15 nm bead at the model's voxel size, with its negative lobes).
PROFILE_HALF_WIDTH = 24
# A row's profiles are fitted on the voxels within FIT_RADIUS voxels of an active bead in x-z,
# outside every active bead's radius + CORE_MARGIN; the model is subtracted within MODEL_RADIUS.
FIT_RADIUS = 48.0
MODEL_RADIUS = 96
CORE_MARGIN = 2.0
# The robust fit: voxels whose residual, smoothed over BLOB_SIGMA voxels, exceeds BLOB_LEVEL robust
# deviations of it (a particle's) are left out of the next of ROBUST_ITERATIONS fits.
BLOB_SIGMA = 1.5
BLOB_LEVEL = 3.0
ROBUST_ITERATIONS = 3
# A row's fit is subtracted only where it explains at least ROW_SIGNIFICANCE times the energy its
# parameters would explain in pure noise: a bead's rows 18-390 times, its slab's outer rows (beyond
# its projection) and a protein taken for a bead at high SNR 1-5, where subtracting a fan fitted to
# noise would draw rays into the tomogram.
ROW_SIGNIFICANCE = 5.0
# The tilt range: its ends searched in [-MAX, -MIN] and [MIN, MAX] degrees on a COARSE_STEP grid, then
# refined by RAY_STEP; on the PROBE_BEADS brightest beads, their central row and its neighbours, at
# most PROBE_PIXELS voxels each (a stride through them). The streaks are modelled with a ray every
# RAY_STEP degrees over the range: as good as the series' own angles (fitted as a lattice to the
# beads' far field, the 18 design gold tomograms score 0.971 either way) and blind to their step.
RANGE_LIMITS = (20.0, 84.0)
COARSE_STEP = 2.0
RAY_STEP = 1.0
PROBE_BEADS = 3
PROBE_PIXELS = 1500


def ray_design(dz: np.ndarray, dx: np.ndarray, angles_deg) -> np.ndarray:
    """[n voxels, 2 PROFILE_HALF_WIDTH + 1]: for voxels at offsets (dz, dx) from a bead (1D arrays),
    the hat weights of each profile knot summed over the tilts: `ray_design(...) @ p` is the
    back-projection of profile p over `angles_deg`."""
    n, knots = dz.size, 2 * PROFILE_HALF_WIDTH + 1
    t = np.deg2rad(np.asarray(angles_deg, dtype=np.float64).ravel())
    u = dx[:, None] * np.cos(t)[None, :] + dz[:, None] * np.sin(t)[None, :]  # [voxel, tilt]
    low = np.floor(u)
    upper_weight = (u - low).ravel()
    low = low.astype(np.int64).ravel() + PROFILE_HALF_WIDTH
    row = np.repeat(np.arange(n) * knots, t.size)
    index = np.concatenate([row + low, row + low + 1])
    knot = np.concatenate([low, low + 1])
    weight = np.concatenate([1.0 - upper_weight, upper_weight])
    inside = (knot >= 0) & (knot < knots)
    return np.bincount(index[inside], weights=weight[inside], minlength=n * knots).reshape(n, knots)


def _offsets(bead: Bead, plane: tuple[int, int], reach: float):
    """The x-z box within `reach` voxels of a bead ((z slice, x slice)) and its voxels' offsets
    (dz, dx) from the bead's centre, flattened in C order."""
    (nz, nx), c = plane, bead.centre
    z0, z1 = max(0, int(np.ceil(c[0] - reach))), min(nz, int(np.floor(c[0] + reach)) + 1)
    x0, x1 = max(0, int(np.ceil(c[2] - reach))), min(nx, int(np.floor(c[2] + reach)) + 1)
    dz, dx = np.meshgrid(np.arange(z0, z1) - c[0], np.arange(x0, x1) - c[2], indexing="ij")
    return (slice(z0, z1), slice(x0, x1)), dz.ravel(), dx.ravel()


def _probes(volume: np.ndarray, beads: list[Bead], centre: float, scale: float):
    """For the PROBE_BEADS beads of highest |volume - centre| at their centres: (dz, dx, values
    [voxel, row]) of the voxels from the bead's radius + CORE_MARGIN to FIT_RADIUS voxels in x-z, in
    its central row and the rows beside it (in robust deviations: (value - centre) / scale), at most
    PROBE_PIXELS voxels (an even stride through them)."""
    nz, ny, nx = volume.shape
    last = np.array(volume.shape) - 1
    peak = [abs(float(volume[tuple(np.clip(np.rint(b.centre).astype(int), 0, last))]) - centre) for b in beads]
    knots = 2 * PROFILE_HALF_WIDTH + 1
    probes = []
    for i in np.argsort(peak, kind="stable")[::-1][:PROBE_BEADS]:
        bead = beads[i]
        box, dz, dx = _offsets(bead, (nz, nx), FIT_RADIUS)
        distance = np.hypot(dz, dx)
        keep = np.flatnonzero((distance >= bead.radius + CORE_MARGIN) & (distance <= FIT_RADIUS))
        keep = keep[:: max(1, int(np.ceil(keep.size / PROBE_PIXELS)))]
        if keep.size < 4 * knots:  # a bead at the volume's edge: too little room to fit a profile
            continue
        y = int(np.rint(bead.centre[1]))
        rows = [r for r in (y - 1, y, y + 1) if 0 <= r < ny]
        values = np.stack([volume[box[0], r, box[1]].ravel()[keep] for r in rows], axis=1).astype(np.float64)
        probes.append((dz[keep], dx[keep], (values - centre) / scale))
    return probes


def _misfit(probes, angles_deg) -> float:
    """Sum over the probes of the share of their energy that least-squares profiles (one per row)
    back-projected over `angles_deg` leave unexplained."""
    total = 0.0
    for dz, dx, values in probes:
        design = ray_design(dz, dx, angles_deg)
        profiles = np.linalg.lstsq(design, values, rcond=None)[0]
        residual = values - design @ profiles
        total += float((residual * residual).sum() / max((values * values).sum(), 1e-12))
    return total


def fit_tilt_range(volume: np.ndarray, beads: list[Bead], centre: float = 0.0,
                   scale: float = 1.0) -> tuple[float, float] | None:
    """(lowest, highest) tilt angle (degrees, this module's frame) of the series `volume` [z, y, x]
    (robust centre `centre`, spread `scale`) was reconstructed from, fitted to its gold `beads`: the
    ends, on a COARSE_STEP grid, of the fan of RAY_STEP rays whose least-squares profiles fit the
    brightest beads' central rows best (every pair of ends tried: a misaligned series can show a
    second, narrower optimum that one-end-at-a-time sweeps fall into), then each end swept by
    RAY_STEP around it. None where no bead leaves room for a fit."""
    probes = _probes(volume, beads, centre, scale)
    if not probes:
        return None
    grid = np.arange(-RANGE_LIMITS[1], RANGE_LIMITS[1] + COARSE_STEP / 2, COARSE_STEP)
    lows, highs = grid[grid <= -RANGE_LIMITS[0]], grid[grid >= RANGE_LIMITS[0]]
    misfit = np.zeros((lows.size, highs.size))
    eye = np.eye(2 * PROFILE_HALF_WIDTH + 1)
    for dz, dx, values in probes:
        # Designs of every range from prefix sums over the angles: range [a, b] = prefix[b + 1] - prefix[a].
        per_angle = np.stack([ray_design(dz, dx, [angle]) for angle in grid])
        prefix = np.concatenate([np.zeros_like(per_angle[:1]), np.cumsum(per_angle, axis=0)])
        energy = max(float((values * values).sum()), 1e-12)
        high_index = np.searchsorted(grid, highs) + 1
        for a, low in enumerate(lows):
            designs = prefix[high_index] - prefix[np.searchsorted(grid, low)]  # [high, voxel, knot]
            transposed = designs.transpose(0, 2, 1)
            gram = transposed @ designs + 1e-9 * eye
            projected = transposed @ values
            profiles = np.linalg.solve(gram, projected)
            misfit[a] += (energy - (projected * profiles).sum(axis=(1, 2))) / energy
    a, b = np.unravel_index(np.argmin(misfit), misfit.shape)
    low, high = float(lows[a]), float(highs[b])
    for _ in range(2):
        low = min(np.arange(low - COARSE_STEP, low + COARSE_STEP + RAY_STEP / 2, RAY_STEP),
                  key=lambda v: _misfit(probes, fan(v, high)))
        high = min(np.arange(high - COARSE_STEP, high + COARSE_STEP + RAY_STEP / 2, RAY_STEP),
                   key=lambda v: _misfit(probes, fan(low, v)))
    return float(low), float(high)


def fan(low: float, high: float) -> np.ndarray:
    """The rays' angles over a tilt range: every RAY_STEP degrees from `low` to `high`."""
    return np.arange(low, high + RAY_STEP / 2, RAY_STEP)


def _robust_profiles(design: np.ndarray, values: np.ndarray, fit: np.ndarray, plane: tuple[int, int]) -> np.ndarray:
    """Least-squares profiles of one row (`values` at the flat x-z indices `fit` of a `plane`), the
    voxels of blob-like residuals left out: a particle on a ray would pull the profile towards
    itself and lose part of its contrast with the streaks. The residual is smoothed over
    BLOB_SIGMA voxels (a particle's residual keeps its value, the noise's shrinks) and voxels
    beyond BLOB_LEVEL robust deviations of it are dropped from the next fit."""
    from scipy import ndimage

    # The smoothing works on the fit's bounding box with a margin past the Gaussian's reach
    # (truncated at 4 sigma), where it equals the whole plane's.
    margin = int(np.ceil(4 * BLOB_SIGMA)) + 1
    zs, xs = np.unravel_index(fit, plane)
    z0, x0 = max(zs.min() - margin, 0), max(xs.min() - margin, 0)
    shape = (min(zs.max() + margin + 1, plane[0]) - z0, min(xs.max() + margin + 1, plane[1]) - x0)
    inside = (zs - z0, xs - x0)
    image = np.zeros(shape)
    fitted = np.zeros(shape)
    fitted[inside] = 1.0
    # Normalised convolution: averages over the fitted voxels only, so the core's gap adds nothing.
    weight = np.maximum(ndimage.gaussian_filter(fitted, BLOB_SIGMA), 1e-6)
    keep = np.ones(values.size, dtype=bool)
    ridge = 1e-6 * np.eye(design.shape[1])
    for _ in range(ROBUST_ITERATIONS):
        kept = design[keep]
        profiles = np.linalg.solve(kept.T @ kept + ridge, kept.T @ values[keep])
        image[inside] = values - design @ profiles
        blob = np.abs((ndimage.gaussian_filter(image, BLOB_SIGMA) / weight)[inside])
        keep = blob <= BLOB_LEVEL * 1.4826 * float(np.median(blob)) + 1e-12
    return profiles


def streak_rows(volume: np.ndarray, centre: float, scale: float, beads: list[Bead], angles_deg: np.ndarray):
    """The beads' streaks in `volume` [z, y, x] (robust centre `centre`, spread `scale`), row by row:
    yields (y, streaks [z, x] in robust deviations, zero on the beads' cores) for every row whose
    fit is significant; in each row one profile per bead whose slab holds it, fitted jointly and
    robustly. Reads one row at a time (no copy of the volume)."""
    nz, ny, nx = volume.shape
    knots = 2 * PROFILE_HALF_WIDTH + 1
    slabs = [streak_slab(bead, ny) for bead in beads]
    models: dict[int, tuple] = {}  # bead -> (flat voxel indices, design, x-z distance), while its slab lasts
    for y in range(ny):
        active = [i for i, (start, stop) in enumerate(slabs) if start <= y < stop]
        for i in list(models):
            if i not in active:
                del models[i]
        if not active:
            continue
        for i in active:
            if i not in models:
                box, dz, dx = _offsets(beads[i], (nz, nx), MODEL_RADIUS)
                flat = (np.arange(box[0].start, box[0].stop)[:, None] * nx
                        + np.arange(box[1].start, box[1].stop)[None, :]).ravel()
                models[i] = (flat, ray_design(dz, dx, angles_deg).astype(np.float32), np.hypot(dz, dx))
        near = np.zeros(nz * nx, dtype=bool)
        core = np.zeros(nz * nx, dtype=bool)
        for i in active:
            flat, _, distance = models[i]
            near[flat[distance <= FIT_RADIUS]] = True
            core[flat[distance < beads[i].radius + CORE_MARGIN]] = True
        fit = np.flatnonzero(near & ~core)
        if fit.size < 4 * knots * len(active):
            continue
        position = np.full(nz * nx, -1)
        position[fit] = np.arange(fit.size)
        design = np.zeros((fit.size, knots * len(active)))
        for n, i in enumerate(active):
            flat, bead_design, _ = models[i]
            rows = position[flat]
            inside = rows >= 0
            design[rows[inside], n * knots:(n + 1) * knots] = bead_design[inside]
        values = (volume[:, y, :].ravel()[fit].astype(np.float64) - centre) / scale
        profiles = _robust_profiles(design, values, fit, (nz, nx))
        explained = design @ profiles
        noise = 1.4826 * float(np.median(np.abs(values - explained)))
        if explained @ explained < ROW_SIGNIFICANCE * profiles.size * noise**2:
            continue
        row = np.zeros(nz * nx)
        for n, i in enumerate(active):
            flat, bead_design, _ = models[i]
            row[flat] += bead_design @ profiles[n * knots:(n + 1) * knots]
        row = row.reshape(nz, nx)
        for bead in beads:  # the cores stay for the picker (and for dropping the picks on them)
            box = bead.box
            if box[1].start <= y < box[1].stop:
                row[box[0], box[2]][bead.core[:, y - box[1].start, :]] = 0.0
        yield y, row


def remove_gold_streaks(volume: np.ndarray, centre: float, scale: float, beads: list[Bead] | None = None,
                        tilt_range: tuple[float, float] | None = None):
    """`volume` [z, y, x] (float32) with its gold beads' streaks subtracted (a new array; the
    input itself where there is no bead); `centre` and `scale` its robust centre and spread;
    `beads` as `find_beads` gives them (None: found here); `tilt_range` (lowest, highest) in
    degrees, this module's frame (None: fitted, `fit_tilt_range`). Returns (volume, beads, the
    tilt range modelled; None where none was)."""
    volume = np.asarray(volume, dtype=np.float32)
    beads = find_beads(volume, centre, scale) if beads is None else beads
    if not beads:
        return volume, beads, None
    if tilt_range is None:
        tilt_range = fit_tilt_range(volume, beads, centre, scale)
    else:
        tilt_range = tuple(float(v) for v in tilt_range)
    if tilt_range is None:
        log.warning("gold beads found, but none leaves room to fit its streaks: kept")
        return volume, beads, None
    cleaned = volume.copy()
    for y, streaks in streak_rows(volume, centre, scale, beads, fan(*tilt_range)):
        # In the volume's own units: voxels the model leaves at zero keep their bytes.
        cleaned[:, y, :] -= (scale * streaks).astype(np.float32)
    return cleaned, beads, tilt_range
