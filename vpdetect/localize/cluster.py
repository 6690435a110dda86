"""From a foreground probability map to particle centres (VP-Detector 2.1.1, steps 2-3).

threshold -> morphological opening -> 26-connected components -> mean-shift
clustering of the foreground voxels seeded inside the components -> drop small
clusters.

Speed (issue 8): mean-shift over every foreground voxel is what the paper
describes, but almost every component holds exactly one particle. A component
whose voxels all lie within one bandwidth of its centroid is a fixed point of
flat-kernel mean-shift started at that centroid, so its centroid is taken
directly. Only components too large for one particle are mean-shifted, seeded
by the local maxima of their distance transform (particle centres are the
points deepest inside touching blobs), with a k-d tree for the windows.

Memory: mean-shift moves its seeds in batches bounded by MAX_PAIRS neighbour
pairs (a window holds at most the voxels of a ball of the bandwidth), and a
component with a huge bounding box is seeded on a grid instead of from a
distance transform of the box. The map is read slab by slab along z (it may be a float16
memmap); only the sparse foreground (coordinates, probabilities, labels) is
kept. The opening is computed per slab with a margin of twice its radius, which
gives exactly the whole-volume result; components are labelled per slab and
joined across slab boundaries with a small union graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Voxels per slab while thresholding/labelling the map (~64 MB of float32).
SLAB_VOXELS = 1 << 24
# Mean-shift stops when every window centre moves less than this (voxels).
SHIFT_TOLERANCE = 1e-2
MAX_SHIFT_ITERATIONS = 50
# (seed, voxel) pairs mean-shift holds at once (~40 bytes each with temporaries: ~0.7 GB).
# A large foreground region that is not hollow (a carbon edge, thick ice) has ~10^6 seeds
# of several hundred voxels each: all at once that was 10^8-10^9 pairs.
MAX_PAIRS = 1 << 24
# A component whose bounding box exceeds this many voxels is seeded on a grid, not from its
# distance transform (~30 bytes per box voxel).
MAX_SEED_BOX_VOXELS = 1 << 24

PARTICLE_COLUMNS = ["x", "y", "z", "cluster_size", "score"]
# Limits (voxels) of a bandwidth measured from the map: below 2 every particle splits into
# specks; above 30 a mean-shift window holds ~10^5 voxels.
AUTO_BANDWIDTH_RANGE = (2.0, 30.0)
# Components this small are specks, not particles: left out of the measured particle size.
RADIUS_MIN_VOXELS = 5


@dataclass
class Foreground:
    """The sparse foreground of a map: voxel coordinates [z, y, x], probabilities, component labels."""

    coords: np.ndarray  # (n, 3) int64, [z, y, x]
    values: np.ndarray  # (n,) float32 probability
    labels: np.ndarray  # (n,) int64 component label, 0..n_components-1
    n_components: int


# Thin extended structures (membranes, filaments) segmented as foreground: the opening erases
# most of such a sheet and leaves a row of small fragments, which mean-shift would report.
THIN_MIN_PARTICLES = 10.0  # before the opening, the structure is larger than this many typical particles
THIN_SURVIVAL = 0.5  # and the opening keeps less than this share of its voxels
THIN_KEEP_PARTICLES = 1.5  # fragments this many typical particles large stay (a particle on a membrane)


def ball(radius: int) -> np.ndarray:
    """Boolean ball of the given radius (voxels) as a structuring element."""
    r = int(radius)
    z, y, x = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (z * z + y * y + x * x) <= r * r + 1e-9


def extract_foreground(
    prob: np.ndarray,
    threshold: float,
    opening_radius: int = 1,
    roi: np.ndarray | None = None,
    z_range: tuple[int, int] | None = None,
    slab_voxels: int = SLAB_VOXELS,
) -> Foreground:
    """Threshold, open and label a probability map [z, y, x] slab by slab.

    `roi` (same shape, nonzero = search here) and `z_range` (first and last
    slice, inclusive) restrict the foreground. Labels are 26-connected and equal
    (up to numbering) to `scipy.ndimage.label` on the whole opened mask.
    """
    from scipy import ndimage
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from vpdetect.localize.tiling import release_pages

    depth, height, width = prob.shape
    if roi is not None and tuple(roi.shape) != tuple(prob.shape):
        from vpdetect.errors import VPDetectError

        raise VPDetectError(
            f"mask shape {tuple(roi.shape)} differs from the tomogram's {tuple(prob.shape)} [z, y, x]"
        )
    z_lo, z_hi = (0, depth) if z_range is None else (max(0, z_range[0]), min(depth, z_range[1] + 1))
    radius = max(0, int(opening_radius))
    structure = ball(radius) if radius > 0 else None
    margin = 2 * radius  # erosion then dilation each reach `radius` voxels
    slab = max(1, int(slab_voxels) // max(1, height * width))
    connectivity = np.ones((3, 3, 3), dtype=bool)

    coords_parts, value_parts, label_parts = [], [], []
    edges_a, edges_b = [], []
    n_labels = 0
    previous_plane = None  # global labels of the last plane of the previous slab
    for core_lo in range(z_lo, z_hi, slab):
        core_hi = min(core_lo + slab, z_hi)
        read_lo, read_hi = max(z_lo, core_lo - margin), min(z_hi, core_hi + margin)
        block = np.asarray(prob[read_lo:read_hi])
        mask = threshold_mask(block, threshold)
        if roi is not None:
            mask &= np.asarray(roi[read_lo:read_hi]) != 0
        if radius > 0 and mask.any():
            mask = binary_opening(mask, radius, structure)
        core = slice(core_lo - read_lo, core_hi - read_lo)
        labels, count = ndimage.label(mask[core], structure=connectivity)
        plane_offset = np.where(labels[[0, -1]] > 0, n_labels, 0)
        if previous_plane is not None:
            _link_planes(previous_plane, labels[0] + plane_offset[0], edges_a, edges_b)
        previous_plane = labels[-1] + plane_offset[1]
        flat = np.flatnonzero(labels)
        if flat.size:
            zyx = np.stack(np.unravel_index(flat, labels.shape), axis=1).astype(np.int64)
            zyx[:, 0] += core_lo
            coords_parts.append(zyx)
            value_parts.append(block[core].reshape(-1)[flat].astype(np.float32))
            label_parts.append(labels.reshape(-1)[flat].astype(np.int64) + (n_labels - 1))  # 0-based
        n_labels += count
        # A disk-backed map (or mask) need not stay resident once its slabs are done.
        release_pages(prob, core_hi - margin)
        if roi is not None:
            release_pages(roi, core_hi - margin)

    if not coords_parts:
        return Foreground(
            np.zeros((0, 3), np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64), 0
        )
    coords = np.concatenate(coords_parts)
    values = np.concatenate(value_parts).astype(np.float32)
    labels = np.concatenate(label_parts)
    if edges_a:
        a = np.concatenate(edges_a) - 1
        b = np.concatenate(edges_b) - 1
        graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n_labels, n_labels))
        n_components, joined = connected_components(graph, directed=False)
        labels = joined[labels].astype(np.int64)
    else:
        n_components = n_labels
    return Foreground(coords, values, labels, int(n_components))


def threshold_mask(block: np.ndarray, threshold: float) -> np.ndarray:
    """block >= threshold; float16 maps are compared through their bit patterns (5x faster).

    For non-negative half floats the unsigned bit patterns sort like the
    values, so the comparison is exact against the smallest float16 >= threshold.
    """
    if block.dtype != np.float16 or threshold < 0:
        return block >= threshold
    limit = np.float16(threshold)
    if float(limit) < threshold:
        limit = np.nextafter(limit, np.float16(np.inf))
    bits = block.view(np.uint16)
    # Bit patterns from 0x8000 up are negative numbers (and NaN above 0x7c00 + sign).
    return (bits >= limit.view(np.uint16)) & (bits <= np.float16(np.inf).view(np.uint16))


def binary_opening(mask: np.ndarray, radius: int, structure: np.ndarray | None = None) -> np.ndarray:
    """Morphological opening by a ball, outside the array counting as background.

    Radius 1 (a 6-connected cross) is done with shifted boolean ANDs/ORs, about
    5x faster than scipy's generic erosion; larger radii use scipy.
    """
    if radius != 1:
        from scipy import ndimage

        return ndimage.binary_opening(mask, structure=ball(radius) if structure is None else structure)
    eroded = mask.copy()
    for axis in range(3):
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        eroded[tuple(lower)] &= mask[tuple(upper)]
        eroded[tuple(upper)] &= mask[tuple(lower)]
        edge = [slice(None)] * 3
        edge[axis] = [0, -1]
        eroded[tuple(edge)] = False
    opened = eroded.copy()
    for axis in range(3):
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        opened[tuple(lower)] |= eroded[tuple(upper)]
        opened[tuple(upper)] |= eroded[tuple(lower)]
    return opened


def _link_planes(lower: np.ndarray, upper: np.ndarray, edges_a: list, edges_b: list) -> None:
    """Record label pairs that touch (26-connected) across two adjacent z planes."""
    height, width = lower.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            a = lower[max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)]
            b = upper[max(0, dy) : height - max(0, -dy), max(0, dx) : width - max(0, -dx)]
            touching = (a > 0) & (b > 0)
            if touching.any():
                edges_a.append(a[touching])
                edges_b.append(b[touching])


def distance_transform_seeds(coords: np.ndarray, spacing: float,
                             max_box_voxels: int = MAX_SEED_BOX_VOXELS) -> np.ndarray:
    """Seeds for mean-shift inside one component: local maxima of its distance transform.

    `coords` are the component's voxels [z, y, x]; maxima on plateaus are
    thinned to one per cube of side `spacing` so that a ridge does not give
    hundreds of seeds. A component whose bounding box exceeds `max_box_voxels`
    (a carbon edge across the tomogram) gets `grid_seeds` instead.
    """
    from scipy import ndimage

    origin = coords.min(axis=0) - 1
    shape = coords.max(axis=0) - origin + 2
    if int(np.prod(shape)) > max_box_voxels:
        return grid_seeds(coords, spacing)
    crop = np.zeros(shape, dtype=bool)
    local = coords - origin
    crop[local[:, 0], local[:, 1], local[:, 2]] = True
    distance = ndimage.distance_transform_edt(crop)
    peaks = (distance == ndimage.maximum_filter(distance, size=3)) & crop
    seeds = np.argwhere(peaks)
    cells = np.floor(seeds / max(spacing, 1.0)).astype(np.int64)
    _, first = np.unique(cells, axis=0, return_index=True)
    return (seeds[np.sort(first)] + origin).astype(np.float64)


def grid_seeds(coords: np.ndarray, spacing: float) -> np.ndarray:
    """One seed per occupied cube of side `spacing`: the mean of its voxels (memory ~ voxels)."""
    cells = np.floor(coords / max(spacing, 1.0)).astype(np.int64)
    _, cell_of = np.unique(cells, axis=0, return_inverse=True)
    cell_of = cell_of.reshape(-1)
    counts = np.bincount(cell_of)
    return np.stack([np.bincount(cell_of, weights=coords[:, a]) for a in range(3)], axis=1) / counts[:, None]


def window_capacity(bandwidth: float) -> int:
    """The most distinct voxels a window of radius `bandwidth` can hold, wherever its centre:
    the lattice points of a ball half a voxel diagonal larger, about a lattice point."""
    r = float(bandwidth) + np.sqrt(3.0) / 2
    n = int(np.ceil(r))
    z, y, x = np.mgrid[-n : n + 1, -n : n + 1, -n : n + 1]
    return int(np.count_nonzero(z * z + y * y + x * x <= r * r))


def mean_shift(
    points: np.ndarray,
    seeds: np.ndarray,
    bandwidth: float,
    tolerance: float = SHIFT_TOLERANCE,
    max_iterations: int = MAX_SHIFT_ITERATIONS,
    max_pairs: int = MAX_PAIRS,
) -> np.ndarray:
    """Flat-kernel mean-shift: move each seed to the mean of the points within `bandwidth` until it stops.

    `points` are distinct voxel positions. Seeds move in batches, each with one sparse
    distance matrix per iteration against one k-d tree over the points; a batch holds at
    most `max_pairs` (seed, point) pairs, because a window holds at most
    `window_capacity(bandwidth)` voxels. Seeds move independently, so the batches give
    exactly the all-at-once result. A seed whose window is empty stays where it is.
    """
    from scipy.spatial import cKDTree

    tree = cKDTree(points)
    modes = np.array(seeds, dtype=np.float64)
    batch = max(1, int(max_pairs) // window_capacity(bandwidth))
    for start in range(0, len(modes), batch):
        active = np.arange(start, min(start + batch, len(modes)))
        for _ in range(max_iterations):
            if active.size == 0:
                break
            pairs = cKDTree(modes[active]).sparse_distance_matrix(
                tree, bandwidth, output_type="ndarray"
            )
            seed_index, point_index = pairs["i"], pairs["j"]
            del pairs
            counts = np.bincount(seed_index, minlength=active.size)
            sums = np.stack(
                [
                    np.bincount(seed_index, weights=points[point_index, axis], minlength=active.size)
                    for axis in range(points.shape[1])
                ],
                axis=1,
            )
            has_points = counts > 0
            new = modes[active].copy()
            new[has_points] = sums[has_points] / counts[has_points, None]
            shift = np.linalg.norm(new - modes[active], axis=1)
            modes[active] = new
            active = active[(shift >= tolerance) & has_points]
    return modes


def typical_radius(foreground: Foreground, min_voxels: int = RADIUS_MIN_VOXELS) -> float | None:
    """Median equivalent-sphere radius (voxels) of the components of at least `min_voxels`
    voxels, None without any. Most components are single particles, so the median is the
    particles' size as the map segments them, robust to clumps, membranes and specks."""
    counts = np.bincount(foreground.labels, minlength=foreground.n_components)
    counts = counts[counts >= max(1, int(min_voxels))]
    if counts.size == 0:
        return None
    return float(np.cbrt(3.0 * np.median(counts) / (4.0 * np.pi)))


def adaptive_bandwidth(foreground: Foreground, factor: float, fallback: float = 5.0) -> float:
    """`factor` times the map's `typical_radius`, within AUTO_BANDWIDTH_RANGE (`fallback`
    when the map has no component). A fixed bandwidth tuned on one particle size merges
    smaller neighbours and splits larger particles; this one follows the data."""
    radius = typical_radius(foreground)
    if radius is None:
        return float(fallback)
    low, high = AUTO_BANDWIDTH_RANGE
    return float(np.clip(factor * radius, low, high))


def find_particles(
    prob: np.ndarray,
    threshold: float = 0.5,
    opening_radius: int = 1,
    bandwidth: float | None = 5.0,
    min_size: int = 10,
    roi: np.ndarray | None = None,
    z_range: tuple[int, int] | None = None,
    merge_radius: float | None = None,
    slab_voxels: int = SLAB_VOXELS,
    max_centre_gap: float | None = None,
    bandwidth_factor: float | None = None,
    merge_factor: float | None = None,
    snap_distance: float = 0.0,
    max_component: float = 0.0,
    min_score: float = 0.0,
    drop_thin: bool = False,
    spare_small: float = 0.0,
):
    """Particle centres from a foreground probability map [z, y, x].

    Returns a DataFrame with columns x, y, z (sub-voxel, 0-based voxel
    centres), cluster_size (voxels) and score (mean probability of the
    cluster's voxels), sorted by z, y, x; `attrs["bandwidth"]` holds the bandwidth used.
    Clusters with fewer than `min_size` voxels, or a score below `min_score`, are dropped; modes closer than
    `merge_radius` (default `merge_factor` x bandwidth if given, else bandwidth/2)
    are merged into their size-weighted mean. Components whose centroid lies more than
    `max_centre_gap` voxels (default: the bandwidth; 0 = keep all) outside them are
    hollow shells (membranes), not particles, and are dropped. `bandwidth` None:
    `bandwidth_factor` x the particles' typical radius measured on the map
    (`adaptive_bandwidth`). A centre off the foreground (between the lobes of a
    particle) moves to the nearest foreground voxel if one lies within `snap_distance`
    (`snap_to_foreground`). Components with more voxels than `max_component` balls of
    the bandwidth (0: no limit) are extended structures, not particles, and are dropped
    (`oversized_components`). `drop_thin`: fragments that the opening left of a thin
    extended structure (a membrane) are dropped (`thin_fragments`). `spare_small`: components of
    at most that many typical particles are not opened (`spare_small_components`).
    """
    import pandas as pd

    from vpdetect.errors import VPDetectError

    size = bandwidth if bandwidth is not None else bandwidth_factor
    if size is None:
        raise VPDetectError("give a bandwidth or a bandwidth factor")
    if size <= 0:
        raise VPDetectError(f"bandwidth must be positive, got {size}")
    foreground = particle_foreground(prob, threshold, opening_radius, drop_thin, spare_small, roi, z_range,
                                     slab_voxels)
    if bandwidth is None:
        bandwidth = adaptive_bandwidth(foreground, bandwidth_factor)
    if merge_radius is None and merge_factor is not None:
        merge_radius = merge_factor * bandwidth
    gap = bandwidth if max_centre_gap is None else max_centre_gap
    foreground = drop_hollow_components(foreground, gap)
    foreground = drop_components(foreground, oversized_components(foreground, bandwidth, max_component))
    centres, sizes, prob_sums = cluster_foreground(foreground, bandwidth, merge_radius)
    keep = keep_clusters(sizes, prob_sums, min_size, min_score)
    centres, sizes, prob_sums = centres[keep], sizes[keep], prob_sums[keep]
    centres = snap_to_foreground(centres, foreground, snap_distance)
    order = np.lexsort((centres[:, 2], centres[:, 1], centres[:, 0]))
    centres, sizes, prob_sums = centres[order], sizes[order], prob_sums[order]
    found = pd.DataFrame(
        {
            "x": centres[:, 2],
            "y": centres[:, 1],
            "z": centres[:, 0],
            "cluster_size": sizes.astype(np.int64),
            "score": (prob_sums / np.maximum(sizes, 1)).astype(np.float64),
        },
        columns=PARTICLE_COLUMNS,
    )
    found.attrs["bandwidth"] = float(bandwidth)
    return found


def keep_clusters(sizes: np.ndarray, prob_sums: np.ndarray, min_size: int, min_score: float) -> np.ndarray:
    """Which clusters to keep: at least `min_size` voxels (and one) and a mean probability
    (`prob_sums / sizes`) of at least `min_score`."""
    mean = prob_sums / np.maximum(sizes, 1)
    return (sizes >= max(1, int(min_size))) & (mean >= min_score)


def snap_to_foreground(centres: np.ndarray, foreground: Foreground, max_distance: float) -> np.ndarray:
    """Centres [z, y, x] whose nearest voxel is not foreground, moved to the nearest foreground
    voxel when it lies within `max_distance` (0: unchanged).

    The mean of a two-lobed or bent particle's voxels can fall in the gap between its lobes,
    off the particle; a coordinate should lie on what it names (SHREC scores a pick by the
    particle mask it falls in, and a box is best centred on density). The bound keeps
    the centre of a ring, whose hole is wider, where it is.
    """
    from scipy.spatial import cKDTree

    if max_distance <= 0 or len(centres) == 0 or len(foreground.coords) == 0:
        return centres
    tree = cKDTree(foreground.coords)
    on_voxel, _ = tree.query(np.rint(centres), k=1)
    off = np.flatnonzero(on_voxel > 0)
    if off.size == 0:
        return centres
    distance, nearest = tree.query(centres[off], k=1, distance_upper_bound=max_distance)
    found = np.isfinite(distance)
    moved = centres.copy()
    moved[off[found]] = foreground.coords[nearest[found]]
    return moved


def drop_hollow_components(foreground: Foreground, max_gap: float) -> Foreground:
    """Remove components whose centroid lies more than `max_gap` voxels from every voxel of
    the component: hollow shells such as vesicle membranes, whose centroid sits in the lumen.

    A particle, or a clump of touching particles, contains (or nearly contains) its own
    centroid; a membrane segmented as foreground does not, and mean-shift would otherwise
    scatter false particles along it.
    """
    from scipy.spatial import cKDTree

    n = foreground.n_components
    if n == 0 or max_gap <= 0:
        return foreground
    coords = foreground.coords.astype(np.float64)
    labels = foreground.labels
    counts = np.bincount(labels, minlength=n)
    centroids = np.stack(
        [np.bincount(labels, weights=coords[:, a], minlength=n) for a in range(3)], axis=1
    ) / np.maximum(counts, 1)[:, None]
    # A 4th coordinate far larger than any distance keeps components apart in one tree.
    separation = 4.0 * (np.abs(coords).max() + max_gap + 1.0)
    tree = cKDTree(np.column_stack([coords, labels * separation]))
    gap, _ = tree.query(np.column_stack([centroids, np.arange(n) * separation]), k=1)
    return drop_components(foreground, gap > max_gap)


def thin_fragments(opened: Foreground, unopened: Foreground) -> np.ndarray:
    """Per component of `opened` (a map's foreground after the opening): True when it is a small
    fragment of a thin extended structure.

    `unopened` is the same thresholded map before the opening. A thin structure is an unopened
    component larger than THIN_MIN_PARTICLES typical particles (the median opened component)
    of which the opening kept less than THIN_SURVIVAL of the voxels: a membrane's bilayer is a
    voxel or two thick, a particle is not. Its fragments smaller than THIN_KEEP_PARTICLES
    typical particles are flagged; larger ones (a particle on the membrane) stay.
    """
    n = opened.n_components
    if n == 0 or unopened.n_components == 0:
        return np.zeros(n, dtype=bool)
    sizes = np.bincount(opened.labels, minlength=n)
    typical = float(np.median(sizes))
    inside, parent = _unopened_parents(opened, unopened)
    unopened_sizes = np.bincount(unopened.labels, minlength=unopened.n_components)
    kept = np.bincount(parent, minlength=unopened.n_components)
    thin = (unopened_sizes > THIN_MIN_PARTICLES * typical) & (kept < THIN_SURVIVAL * unopened_sizes)
    in_thin = np.zeros(n, dtype=bool)
    in_thin[opened.labels[inside]] = thin[parent]
    return in_thin & (sizes < THIN_KEEP_PARTICLES * typical)


def _unopened_parents(opened: Foreground, unopened: Foreground) -> tuple[np.ndarray, np.ndarray]:
    """(which voxels of `opened` are voxels of `unopened`, the unopened component of each of
    those). The opening only removes voxels, so with the same map and threshold all are."""
    extent = np.maximum(unopened.coords.max(axis=0), opened.coords.max(axis=0)) + 1
    unopened_index = np.ravel_multi_index(tuple(unopened.coords.T), extent)
    index = np.ravel_multi_index(tuple(opened.coords.T), extent)
    order = np.argsort(unopened_index, kind="stable")
    at = np.minimum(np.searchsorted(unopened_index, index, sorter=order), len(order) - 1)
    inside = unopened_index[order[at]] == index
    return inside, unopened.labels[order[at]][inside]


def spare_small_components(opened: Foreground, unopened: Foreground, max_particles: float) -> Foreground:
    """`opened` with every component of `unopened` (the same thresholded map before the opening)
    of at most `max_particles` typical particles (the median opened component; 0: none) put
    back whole, as it was before the opening.

    At low SNR the map marks a small particle with a thin, ragged blob that a ball of radius 1
    erases or cuts below the minimum cluster size; the opening is meant for speckle on large
    structures and for thin sheets, which are far larger than a particle. Speckle that is
    put back stays subject to the minimum cluster size.
    """
    if max_particles <= 0 or unopened.n_components == 0:
        return opened
    unopened_sizes = np.bincount(unopened.labels, minlength=unopened.n_components)
    # Where the opening erased everything, the unopened components say what a particle is.
    typical = float(np.median(np.bincount(opened.labels) if opened.n_components else unopened_sizes))
    spared = unopened_sizes <= max_particles * typical
    keep = np.ones(len(opened.coords), dtype=bool)
    if opened.n_components:
        inside, parent = _unopened_parents(opened, unopened)
        keep[np.flatnonzero(inside)[spared[parent]]] = False  # replaced by their whole parent
    back = spared[unopened.labels]
    coords = np.concatenate([opened.coords[keep], unopened.coords[back]])
    values = np.concatenate([opened.values[keep], unopened.values[back]])
    # Opened components keep their numbers, spared ones follow; then 0..m-1 without gaps.
    labels = np.concatenate([opened.labels[keep], opened.n_components + unopened.labels[back]])
    used, labels = np.unique(labels, return_inverse=True)
    order = np.lexsort(coords.T[::-1])  # raster order, as `extract_foreground` gives
    return Foreground(coords[order], values[order], labels[order].astype(np.int64), int(used.size))


def particle_foreground(prob: np.ndarray, threshold: float, opening_radius: int = 1, drop_thin: bool = False,
                        spare_small: float = 0.0, roi: np.ndarray | None = None,
                        z_range: tuple[int, int] | None = None, slab_voxels: int = SLAB_VOXELS) -> Foreground:
    """`extract_foreground` of `prob`, then (`drop_thin`) without the fragments of thin extended
    structures (`thin_fragments`) and with the components of at most `spare_small` typical
    particles put back unopened (`spare_small_components`); both need an opening to act on."""
    opened = extract_foreground(prob, threshold, opening_radius, roi, z_range, slab_voxels)
    if opening_radius <= 0 or not (drop_thin or spare_small > 0):
        return opened
    unopened = extract_foreground(prob, threshold, 0, roi, z_range, slab_voxels)
    if drop_thin and opened.n_components:
        opened = drop_components(opened, thin_fragments(opened, unopened))
    return spare_small_components(opened, unopened, spare_small)


def oversized_components(foreground: Foreground, bandwidth: float, max_balls: float) -> np.ndarray:
    """Per component: True when it has more voxels than `max_balls` balls of radius `bandwidth`
    (0: none is oversized).

    A particle, or a clump of a few touching ones, fits in one or two such balls (the
    bandwidth is a few particle radii); a membrane, a carbon edge or a textured region
    segmented as foreground is one long component that mean-shift would cut into a row
    of false particles.
    """
    n = foreground.n_components
    if n == 0 or max_balls <= 0:
        return np.zeros(n, dtype=bool)
    ball = 4.0 / 3.0 * np.pi * float(bandwidth) ** 3
    return np.bincount(foreground.labels, minlength=n) > max_balls * ball


def drop_components(foreground: Foreground, drop: np.ndarray) -> Foreground:
    """The foreground without the components flagged in `drop` (one bool per component),
    the survivors renumbered 0..m-1."""
    if not drop.any():
        return foreground
    keep_voxel = ~drop[foreground.labels]
    new_id = np.cumsum(~drop) - 1
    return Foreground(
        foreground.coords[keep_voxel],
        foreground.values[keep_voxel],
        new_id[foreground.labels[keep_voxel]].astype(np.int64),
        int((~drop).sum()),
    )


def cluster_foreground(
    foreground: Foreground, bandwidth: float, merge_radius: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster centres [z, y, x], sizes and probability sums of a labelled foreground."""
    from scipy.spatial import cKDTree

    n = foreground.n_components
    if n == 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0)
    coords = foreground.coords.astype(np.float64)
    labels = foreground.labels
    values = foreground.values.astype(np.float64)
    counts = np.bincount(labels, minlength=n)
    centroids = np.stack(
        [np.bincount(labels, weights=coords[:, a], minlength=n) for a in range(3)], axis=1
    ) / counts[:, None]
    spread = np.zeros(n)
    np.maximum.at(spread, labels, np.sum((coords - centroids[labels]) ** 2, axis=1))
    # Every voxel within one bandwidth of the centroid: the centroid is the mean-shift mode.
    compact = spread <= bandwidth * bandwidth

    centres = [centroids[compact]]
    sizes = [counts[compact]]
    prob_sums = [np.bincount(labels, weights=values, minlength=n)[compact]]

    large_ids = np.flatnonzero(~compact)
    if large_ids.size:
        in_large = ~compact[labels]
        points, point_labels, point_values = coords[in_large], labels[in_large], values[in_large]
        order = np.argsort(point_labels, kind="stable")
        points, point_labels, point_values = points[order], point_labels[order], point_values[order]
        starts = np.searchsorted(point_labels, large_ids)
        ends = np.searchsorted(point_labels, large_ids, side="right")
        voxels = foreground.coords[in_large][order]
        seed_parts, seed_labels = [], []
        for label, start, end in zip(large_ids, starts, ends, strict=True):
            seeds = distance_transform_seeds(voxels[start:end], bandwidth / 2)
            seed_parts.append(seeds)
            seed_labels.append(np.full(len(seeds), label))
        seeds = np.concatenate(seed_parts)
        seed_labels = np.concatenate(seed_labels)
        # A 4th coordinate far larger than any distance keeps components apart: a seed's
        # window holds only its own component's voxels (a neighbour within one bandwidth
        # would pull a small particle's modes onto itself), and each voxel joins the
        # nearest mode of its own component.
        separation = 4.0 * (np.abs(coords).max() + bandwidth + 1.0)
        labelled_points = np.column_stack([points, point_labels * separation])
        modes = mean_shift(labelled_points, np.column_stack([seeds, seed_labels * separation]), bandwidth)
        mode_tree = cKDTree(modes)
        _, nearest = mode_tree.query(labelled_points, k=1)
        modes = modes[:, :3]
        mode_sizes = np.bincount(nearest, minlength=len(modes))
        used = mode_sizes > 0
        centres.append(modes[used])
        sizes.append(mode_sizes[used])
        prob_sums.append(np.bincount(nearest, weights=point_values, minlength=len(modes))[used])

    centres = np.concatenate(centres)
    sizes = np.concatenate(sizes).astype(np.int64)
    prob_sums = np.concatenate(prob_sums)
    radius = bandwidth / 2 if merge_radius is None else merge_radius
    return merge_close(centres, sizes, prob_sums, radius)


def merge_close(
    centres: np.ndarray, sizes: np.ndarray, prob_sums: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge clusters whose centres are closer than `radius`, largest first.

    Each surviving cluster absorbs the unclaimed clusters within `radius` of it;
    its centre becomes their size-weighted mean. Ties are broken by position so
    the result does not depend on input order.
    """
    from scipy.spatial import cKDTree

    if len(centres) < 2 or radius <= 0:
        return centres, sizes, prob_sums
    order = np.lexsort((centres[:, 2], centres[:, 1], centres[:, 0], -sizes))
    centres, sizes, prob_sums = centres[order], sizes[order], prob_sums[order]
    tree = cKDTree(centres)
    pairs = tree.query_pairs(radius, output_type="ndarray")
    if pairs.size == 0:
        return centres, sizes, prob_sums
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs:
        neighbours.setdefault(int(a), []).append(int(b))
        neighbours.setdefault(int(b), []).append(int(a))
    owner = np.full(len(centres), -1)
    for index in range(len(centres)):  # largest first
        if owner[index] >= 0:
            continue
        owner[index] = index
        for other in neighbours.get(index, ()):
            if owner[other] < 0:
                owner[other] = index
    groups, group_of = np.unique(owner, return_inverse=True)
    merged_sizes = np.bincount(group_of, weights=sizes).astype(np.int64)
    merged_centres = np.stack(
        [np.bincount(group_of, weights=centres[:, a] * sizes) for a in range(3)], axis=1
    ) / merged_sizes[:, None]
    merged_sums = np.bincount(group_of, weights=prob_sums)
    return merged_centres, merged_sizes, merged_sums
