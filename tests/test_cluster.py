import numpy as np
import pytest
from scipy import ndimage

from vpdetect.errors import VPDetectError
from vpdetect.localize.cluster import (
    PARTICLE_COLUMNS,
    ball,
    binary_opening,
    extract_foreground,
    find_particles,
    mean_shift,
    merge_close,
    threshold_mask,
)


def spheres(shape, centres, radii, value=1.0):
    """A map [z, y, x] with balls of `value` at sub-voxel centres [z, y, x]."""
    z, y, x = np.indices(shape)
    out = np.zeros(shape, np.float32)
    for c, r in zip(centres, np.broadcast_to(radii, len(centres)), strict=True):
        out[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r] = value
    return out


def xyz_to_zyx(table):
    return table[["z", "y", "x"]].to_numpy()


def test_touching_spheres_merged_by_components_are_split():
    centres = [(20.0, 20.0, 14.0), (20.0, 20.0, 24.0)]
    prob = spheres((40, 40, 40), centres, 5)
    _, n_components = ndimage.label(prob > 0.5, structure=np.ones((3, 3, 3)))
    assert n_components == 1
    table = find_particles(prob, threshold=0.5, opening_radius=1, bandwidth=5, min_size=10)
    assert list(table.columns) == PARTICLE_COLUMNS
    assert len(table) == 2
    np.testing.assert_allclose(xyz_to_zyx(table), centres, atol=0.5)
    assert table["cluster_size"].sum() == pytest.approx(np.count_nonzero(binary_opening(prob > 0.5, 1)))


def test_known_subvoxel_centres_are_recovered():
    rng = np.random.default_rng(5)
    centres = [(10.3, 12.6, 11.2), (30.7, 12.2, 33.5), (12.4, 34.9, 30.1), (33.2, 35.5, 12.8), (22.5, 23.1, 22.4)]
    radii = [3.5, 4.0, 5.0, 4.5, 3.0]
    prob = spheres((46, 46, 46), centres, radii, value=0.9) + rng.uniform(0, 0.05, (46, 46, 46)).astype(np.float32)
    table = find_particles(prob, threshold=0.5, opening_radius=1, bandwidth=5, min_size=10)
    assert len(table) == len(centres)
    found = xyz_to_zyx(table)
    for c in centres:
        assert np.min(np.linalg.norm(found - c, axis=1)) < 0.5
    # Score is the mean probability of the cluster's voxels.
    assert np.all((table["score"] > 0.9) & (table["score"] < 0.95))


def test_specks_below_min_size_are_dropped():
    prob = spheres((30, 30, 30), [(15.0, 15.0, 15.0)], 4)
    prob[3:5, 3:5, 3:5] = 1.0  # an 8-voxel speck (no opening here, so only --min-size removes it)
    prob[25, 25, 25] = 1.0
    kept = find_particles(prob, threshold=0.5, opening_radius=0, bandwidth=4, min_size=10)
    assert len(kept) == 1
    np.testing.assert_allclose(xyz_to_zyx(kept)[0], (15, 15, 15), atol=1e-6)
    everything = find_particles(prob, threshold=0.5, opening_radius=0, bandwidth=4, min_size=1)
    assert sorted(everything["cluster_size"]) == [1, 8, int(np.count_nonzero(spheres((30, 30, 30), [(15, 15, 15)], 4)))]


def test_clusters_below_min_score_are_dropped():
    """A weakly segmented blob (mean probability 0.6) goes with min_score 0.8; a confident one stays."""
    prob = spheres((30, 40, 30), [(15.0, 12.0, 15.0)], 4, value=0.95) + spheres((30, 40, 30), [(15.0, 28.0, 15.0)], 4,
                                                                                  value=0.6)
    both = find_particles(prob, threshold=0.5, opening_radius=0, bandwidth=4, min_size=10)
    assert sorted(np.round(both["score"], 3)) == [0.6, 0.95]
    kept = find_particles(prob, threshold=0.5, opening_radius=0, bandwidth=4, min_size=10, min_score=0.8)
    assert len(kept) == 1
    np.testing.assert_allclose(xyz_to_zyx(kept)[0], (15, 12, 15), atol=1e-6)
    # The limit is inclusive: a cluster whose score equals it stays.
    assert len(find_particles(prob, threshold=0.5, opening_radius=0, bandwidth=4, min_size=10, min_score=0.6)) == 2


def test_opening_removes_thin_speckle():
    prob = spheres((30, 30, 30), [(15.0, 15.0, 15.0)], 4)
    prob[2, 2:20, 2] = 1.0  # a one-voxel-thin line
    table = find_particles(prob, threshold=0.5, opening_radius=1, bandwidth=4, min_size=1)
    assert len(table) == 1


def test_results_are_deterministic_and_independent_of_slab_size():
    rng = np.random.default_rng(11)
    prob = ndimage.gaussian_filter(rng.random((36, 40, 38)), 1.5).astype(np.float32)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    first = find_particles(prob, 0.6, 1, 3.0, 2)
    again = find_particles(prob.copy(), 0.6, 1, 3.0, 2)
    slabs = find_particles(prob, 0.6, 1, 3.0, 2, slab_voxels=40 * 38 * 4)
    assert len(first) > 3
    assert first.equals(again)
    np.testing.assert_allclose(first.to_numpy(), slabs.to_numpy(), atol=1e-9)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_slabwise_foreground_equals_whole_volume_opening_and_labels(radius):
    rng = np.random.default_rng(radius)
    prob = ndimage.gaussian_filter(rng.random((30, 25, 27)), 1.2).astype(np.float32)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    mask = prob >= 0.55
    if radius:
        mask = ndimage.binary_opening(mask, structure=ball(radius))
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    fg = extract_foreground(prob, 0.55, radius, slab_voxels=25 * 27 * 3)
    np.testing.assert_array_equal(fg.coords, np.argwhere(mask))
    assert fg.n_components == n
    reference = labels[mask]
    # Same partition: a one-to-one map between the two numberings.
    assert len(set(zip(fg.labels.tolist(), reference.tolist(), strict=True))) == n


def test_roi_and_z_range_restrict_the_search():
    centres = [(8.0, 10.0, 10.0), (22.0, 10.0, 10.0), (22.0, 25.0, 25.0)]
    prob = spheres((32, 36, 36), centres, 4)
    roi = np.zeros(prob.shape, np.int8)
    roi[:, :, :18] = 1
    in_roi = find_particles(prob, 0.5, 1, 4, 10, roi=roi)
    np.testing.assert_allclose(xyz_to_zyx(in_roi), centres[:2], atol=1e-6)
    in_slices = find_particles(prob, 0.5, 1, 4, 10, z_range=(15, 31))
    np.testing.assert_allclose(xyz_to_zyx(in_slices), sorted(centres[1:]), atol=1e-6)
    with pytest.raises(VPDetectError, match="mask shape"):
        find_particles(prob, 0.5, 1, 4, 10, roi=roi[:-1])


def test_empty_map_gives_empty_table():
    table = find_particles(np.zeros((10, 10, 10), np.float16), 0.5, 1, 4, 5)
    assert len(table) == 0 and list(table.columns) == PARTICLE_COLUMNS


def test_float16_threshold_matches_exact_comparison():
    values = np.random.default_rng(2).random((4, 5, 6)).astype(np.float16)
    values[0, 0, :3] = [0.5, np.nextafter(np.float16(0.5), np.float16(0)), 0.0]
    for threshold in (0.0, 0.1, 1 / 3, 0.5, 0.999, 1.0):
        np.testing.assert_array_equal(threshold_mask(values, threshold), values.astype(np.float64) >= threshold)


def test_mean_shift_matches_scikit_learn_on_the_same_seeds():
    from sklearn.cluster import MeanShift

    rng = np.random.default_rng(4)
    points = np.concatenate([rng.normal(c, 1.5, (150, 3)) for c in ((0, 0, 0), (9, 1, 0), (3, 12, 4))])
    seeds = points[::37]
    ours = mean_shift(points, seeds, bandwidth=4.0, tolerance=1e-6)
    reference = MeanShift(bandwidth=4.0, seeds=seeds, cluster_all=True).fit(points).cluster_centers_
    # sklearn keeps one centre per mode (stopping at 1e-3 * bandwidth); every one of our modes is one of them.
    distance = np.min(np.linalg.norm(ours[:, None] - reference[None], axis=2), axis=1)
    assert np.all(distance < 0.05)
    distinct = merge_close(ours, np.ones(len(ours), int), np.zeros(len(ours)), radius=1.0)[0]
    assert len(distinct) == len(reference) == 3


def test_agrees_with_scikit_learn_meanshift_on_all_foreground_voxels():
    from sklearn.cluster import MeanShift

    centres = [(9.5, 10.2, 9.8), (9.7, 10.1, 18.9), (26.0, 11.0, 25.2), (12.3, 28.0, 27.1), (28.0, 28.4, 9.6)]
    prob = spheres((38, 38, 36), centres, [4.0, 4.2, 3.5, 4.5, 3.8])
    table = find_particles(prob, 0.5, 1, 5.0, 10)
    points = extract_foreground(prob, 0.5, 1).coords.astype(float)
    fit = MeanShift(bandwidth=5.0, bin_seeding=True).fit(points)
    sizes = np.bincount(fit.labels_)
    reference = fit.cluster_centers_[sizes >= 10]
    assert len(table) == len(reference) == len(centres)
    distance = np.min(np.linalg.norm(xyz_to_zyx(table)[:, None] - reference[None], axis=2), axis=1)
    assert np.all(distance < 1.0)


def test_merge_close_takes_size_weighted_mean_and_is_order_free():
    centres = np.array([[0.0, 0, 0], [1.0, 0, 0], [10.0, 0, 0]])
    sizes = np.array([30, 10, 5])
    sums = np.array([15.0, 5.0, 2.0])
    merged = merge_close(centres, sizes, sums, radius=2.0)
    np.testing.assert_allclose(merged[0], [[0.25, 0, 0], [10.0, 0, 0]])
    np.testing.assert_array_equal(merged[1], [40, 5])
    shuffled = merge_close(centres[::-1], sizes[::-1], sums[::-1], radius=2.0)
    for a, b in zip(merged, shuffled, strict=True):
        np.testing.assert_allclose(a, b)


def test_nonpositive_bandwidth_is_refused():
    with pytest.raises(VPDetectError, match="bandwidth"):
        find_particles(np.zeros((5, 5, 5)), bandwidth=0)


def test_hollow_shells_are_dropped_and_solid_particles_kept():
    """A vesicle-like shell (centroid in its lumen) is a membrane, not particles; a solid ball
    next to it is one particle. A gap of 0 keeps everything."""
    from vpdetect.localize.cluster import find_particles

    shape = (60, 60, 90)
    z, y, x = np.indices(shape)
    r_shell = np.sqrt((z - 30) ** 2 + (y - 30) ** 2 + (x - 30) ** 2)
    prob = ((r_shell >= 18) & (r_shell <= 21)).astype(np.float32)
    prob[(z - 30) ** 2 + (y - 30) ** 2 + (x - 72) ** 2 <= 16] = 1.0  # a ball of radius 4
    found = find_particles(prob, threshold=0.5, opening_radius=0, bandwidth=6.0, min_size=10)
    assert len(found) == 1
    assert found[["x", "y", "z"]].to_numpy()[0] == pytest.approx([72, 30, 30], abs=0.5)
    kept = find_particles(prob, 0.5, 0, 6.0, 10, max_centre_gap=0)
    assert len(kept) > 2  # mean-shift scatters modes along the shell


# --------------------------------------------------------------------------- bounded memory


def test_mean_shift_in_batches_equals_all_at_once_and_holds_few_pairs(monkeypatch):
    from scipy.spatial import cKDTree

    from vpdetect.localize.cluster import mean_shift, window_capacity

    rng = np.random.default_rng(4)
    # A thick, non-hollow foreground slab: every voxel of a noisy block, many seeds.
    block = np.argwhere(rng.random((12, 30, 30)) < 0.7).astype(np.float64)
    seeds = block[rng.choice(len(block), 400, replace=False)] + rng.random((400, 3))
    whole = mean_shift(block, seeds, 3.0, max_pairs=10**9)
    largest = []

    class Recording(cKDTree):
        def sparse_distance_matrix(self, other, max_distance, *args, **kwargs):
            result = super().sparse_distance_matrix(other, max_distance, *args, **kwargs)
            largest.append(len(result))
            return result

    import scipy.spatial

    monkeypatch.setattr(scipy.spatial, "cKDTree", Recording)
    capacity = window_capacity(3.0)
    batched = mean_shift(block, seeds, 3.0, max_pairs=20 * capacity)
    np.testing.assert_array_equal(batched, whole)
    assert max(largest) <= 20 * capacity


def test_window_capacity_bounds_any_window():
    from scipy.spatial import cKDTree

    from vpdetect.localize.cluster import window_capacity

    lattice = np.argwhere(np.ones((15, 15, 15), bool)).astype(np.float64)
    tree = cKDTree(lattice)
    centres = 7 + np.random.default_rng(0).random((200, 3))
    most = max(len(tree.query_ball_point(c, 4.0)) for c in centres)
    assert most <= window_capacity(4.0) < 2 * most


def test_a_component_with_a_huge_box_is_seeded_on_a_grid():
    from vpdetect.localize.cluster import distance_transform_seeds, grid_seeds

    # A thin diagonal sheet through a large box: its distance transform would fill the box.
    zz, yy = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
    sheet = np.stack([zz.ravel(), yy.ravel(), (zz + yy).ravel()], axis=1)
    seeds = distance_transform_seeds(sheet, 2.5, max_box_voxels=1000)
    np.testing.assert_array_equal(seeds, grid_seeds(sheet, 2.5))
    cells = {tuple(c) for c in np.floor(sheet / 2.5).astype(int)}
    assert len(seeds) == len(cells)
    # every seed is the mean of its cell's voxels, so it lies inside that cell
    assert all(tuple(np.floor(s / 2.5).astype(int)) in cells for s in seeds)


def test_typical_radius_is_the_median_ball_radius_of_the_map():
    from vpdetect.localize.cluster import typical_radius

    centres = [(12.0, 12.0, 12.0), (12.0, 12.0, 36.0), (12.0, 36.0, 12.0), (36.0, 12.0, 12.0), (36.0, 36.0, 36.0)]
    prob = spheres((48, 48, 48), centres, [4, 4, 4, 7, 7])
    prob[2, 2, 2] = 1.0  # a 1-voxel speck is not a particle: left out of the median
    radius = typical_radius(extract_foreground(prob, 0.5, opening_radius=0))
    assert radius == pytest.approx(4.0, abs=0.15)  # the volume of a voxelised ball of radius 4
    assert typical_radius(extract_foreground(np.zeros((8, 8, 8), np.float32), 0.5)) is None


@pytest.mark.parametrize("radius", [2.5, 5.0])
def test_adaptive_bandwidth_follows_the_particle_size(radius):
    # Touching balls 2.2 radii apart, as in a crowded tomogram, at two particle sizes: one
    # fixed bandwidth merges the small pairs or splits nothing, the measured one fits both.
    spacing = 2.2 * radius
    shape = (int(12 * radius) + 8,) * 3
    centre = shape[0] / 2.0
    centres = [(centre, centre, centre - spacing / 2), (centre, centre, centre + spacing / 2),
               (centre, centre - 2 * spacing, centre), (centre + 2 * spacing, centre, centre)]
    prob = spheres(shape, centres, radius)
    table = find_particles(prob, threshold=0.5, opening_radius=0, bandwidth=None, min_size=5,
                           bandwidth_factor=1.0, merge_factor=1.0)
    assert len(table) == len(centres)
    found = xyz_to_zyx(table)
    for c in centres:
        assert np.min(np.linalg.norm(found - c, axis=1)) < 1.0
    assert table.attrs["bandwidth"] == pytest.approx(radius, rel=0.25)
    # A bandwidth fixed for the large particles' spacing merges the small pair.
    if radius == 2.5:
        fixed = find_particles(prob, threshold=0.5, opening_radius=0, bandwidth=11.0, min_size=5, merge_radius=11.0)
        assert len(fixed) < len(centres)


def test_adaptive_bandwidth_without_particles_is_the_fallback():
    from vpdetect.localize.cluster import adaptive_bandwidth

    empty = extract_foreground(np.zeros((8, 8, 8), np.float32), 0.5)
    assert adaptive_bandwidth(empty, 2.0, fallback=6.0) == 6.0
    assert len(find_particles(np.zeros((8, 8, 8), np.float32), bandwidth=None, bandwidth_factor=2.0)) == 0
    with pytest.raises(VPDetectError, match="bandwidth"):
        find_particles(np.zeros((5, 5, 5)), bandwidth=None)


def test_a_centre_between_two_lobes_snaps_onto_the_particle_and_a_ring_keeps_its_centre():
    from vpdetect.cli.localize import DEFAULT_SNAP_DISTANCE as cli_default
    from vpdetect.localize.pipeline import DEFAULT_SNAP_DISTANCE

    assert cli_default == DEFAULT_SNAP_DISTANCE  # the CLI repeats it to keep --help light
    # Two lobes of radius 3 one voxel apart, joined by a thin bridge 3 voxels off their axis
    # into one component: its centroid (the mean-shift mode) falls in the gap between them.
    prob = spheres((32, 32, 32), [(16, 16, 11.0), (16, 16, 19.0)], 3.0)
    prob[16, 19, 11:20] = 1.0
    found = find_particles(prob, opening_radius=0, bandwidth=8.0, min_size=1, snap_distance=0.0)
    centre = xyz_to_zyx(found)[0]
    assert prob[tuple(np.rint(centre).astype(int))] == 0.0  # the plain centroid is in the gap
    snapped = xyz_to_zyx(find_particles(prob, opening_radius=0, bandwidth=8.0, min_size=1, snap_distance=2.0))[0]
    assert prob[tuple(np.rint(snapped).astype(int))] == 1.0
    assert np.linalg.norm(snapped - centre) <= 2.0
    # A ring (torus of tube radius 1.5 around a hole of radius 5): its centre stays in the hole.
    z, y, x = np.indices((32, 32, 32))
    ring = ((np.hypot(y - 16, x - 16) - 6.5) ** 2 + (z - 16) ** 2 <= 1.5**2).astype(np.float32)
    kept = xyz_to_zyx(find_particles(ring, opening_radius=0, bandwidth=10.0, min_size=1, max_centre_gap=0,
                                     snap_distance=2.0))
    np.testing.assert_allclose(kept, [[16.0, 16.0, 16.0]], atol=1e-6)


def test_oversized_components_are_dropped_and_particles_and_clumps_kept():
    """A membrane-like sheet (one long component) becomes a row of false particles unless
    components over `max_component` bandwidth balls are dropped; a ball and a clump of
    two touching balls stay."""
    from vpdetect.localize.cluster import Foreground, drop_components, oversized_components

    shape = (40, 80, 120)
    prob = spheres(shape, [(20, 20, 100), (20, 60, 96), (20, 60, 104)], 4.0)
    prob[18:22, 5:75, 10:70] = 1.0  # a sheet 4 voxels thick, 70 x 60 across
    bandwidth = 6.0
    everything = find_particles(prob, 0.5, 0, bandwidth, 10)
    assert len(everything) > 4  # mean-shift scatters modes over the sheet
    found = find_particles(prob, 0.5, 0, bandwidth, 10, max_component=3.0)
    assert len(found) == 3
    assert np.all(found["x"].to_numpy() > 90)
    # The sheet holds 16,800 voxels = 18.6 balls of radius 6; the clump 2 x 257 = 0.57.
    foreground = extract_foreground(prob, 0.5, 0)
    sizes = np.bincount(foreground.labels)
    big = oversized_components(foreground, bandwidth, 3.0)
    assert big.tolist() == (sizes > 3.0 * 4 / 3 * np.pi * bandwidth**3).tolist() and big.sum() == 1
    assert not oversized_components(foreground, bandwidth, 0.0).any()  # 0: no limit
    kept = drop_components(foreground, big)
    assert isinstance(kept, Foreground) and kept.n_components == foreground.n_components - 1
    assert len(kept.coords) == len(foreground.coords) - sizes[big].sum()
    assert sorted(np.unique(kept.labels)) == list(range(kept.n_components))  # renumbered


def test_a_components_modes_are_not_pulled_onto_a_neighbouring_component():
    # Two parallel rods 8 voxels apart, not touching: each is its own connected component and
    # too long for one bandwidth, so both go through mean-shift. A window around one rod's
    # seeds also covers the other rod; only its own voxels may count, or both rods' modes
    # meet between them and the two particles become one pick.
    prob = np.zeros((40, 48, 64), np.float32)
    z, y, x = np.mgrid[:40, :48, :64]
    for rod_y in (20, 28):
        prob[((z - 20) ** 2 + (y - rod_y) ** 2 <= 4) & (x >= 20) & (x < 44)] = 1.0
    table = find_particles(prob, threshold=0.5, opening_radius=0, bandwidth=10.0, min_size=5, merge_radius=6.0)
    assert len(table) == 2
    np.testing.assert_allclose(np.sort(table["y"].to_numpy()), [20.0, 28.0], atol=0.5)
    np.testing.assert_allclose(table["x"].to_numpy(), [31.5, 31.5], atol=1.0)


def _sheet_scene():
    """A 2-voxel-thick sheet with four small thick spots and a ball sitting on it, and six free balls."""
    prob = np.zeros((64, 64, 64), np.float32)
    prob[30:32, 2:62, 2:62] = 0.9  # thin: the opening erases it
    bumps = [(29, 10, 10), (29, 10, 50), (29, 50, 10), (29, 50, 50)]
    for z, y, x in bumps:
        prob[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = 0.9  # 3^3 spots survive the opening
    zz, yy, xx = np.mgrid[:64, :64, :64]
    attached = (26, 30, 30)  # radius 4, touching the sheet: a particle on a membrane
    prob[(zz - 26) ** 2 + (yy - 30) ** 2 + (xx - 30) ** 2 <= 16] = 0.9
    free = [(10, 12, 12), (10, 12, 50), (10, 50, 30), (50, 12, 12), (50, 50, 50), (50, 30, 30)]
    for c in free:
        prob[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9] = 0.9
    return prob, bumps, attached, free


def test_drop_thin_removes_the_fragments_of_a_thin_sheet_and_keeps_particles_on_it():
    prob, bumps, attached, free = _sheet_scene()
    kept = find_particles(prob, threshold=0.5, opening_radius=1, bandwidth=3.0, min_size=5, drop_thin=True)
    found = kept[["z", "y", "x"]].to_numpy()
    for centre in [attached, *free]:
        assert np.min(np.linalg.norm(found - centre, axis=1)) < 1.5, centre
    assert len(found) == 1 + len(free)
    everything = find_particles(prob, threshold=0.5, opening_radius=1, bandwidth=3.0, min_size=5)
    near_bumps = [np.min(np.linalg.norm(everything[["z", "y", "x"]].to_numpy() - b, axis=1)) for b in bumps]
    assert max(near_bumps) < 1.5 and len(everything) == len(found) + len(bumps)


def test_thin_fragments_needs_an_opening_and_flags_nothing_on_compact_particles():
    from vpdetect.localize.cluster import extract_foreground, particle_foreground, thin_fragments

    prob, _, _, _ = _sheet_scene()
    unopened = extract_foreground(prob, 0.5, 0)
    unchanged = particle_foreground(prob, 0.5, 0, drop_thin=True, spare_small=2.0)  # no opening: nothing to compare
    np.testing.assert_array_equal(unchanged.coords, unopened.coords)
    np.testing.assert_array_equal(unchanged.labels, unopened.labels)
    balls = np.zeros_like(prob)
    balls[:, :32] = prob[:, :32]
    balls[28:33] = 0  # the sheet and its spots gone: only compact particles remain
    opened = extract_foreground(balls, 0.5, 1)
    assert opened.n_components > 0 and not thin_fragments(opened, extract_foreground(balls, 0.5, 0)).any()


def _faint_scene():
    """Six balls of radius 3 and three ragged specks a particle's faint map leaves: 2 x 2 x 5 rods,
    which a ball of radius 1 erases whole, and a 2-voxel-thick sheet on which one ball sits."""
    prob, _, attached, free = _sheet_scene()
    prob[:, :, :] = 0
    zz, yy, xx = np.mgrid[:64, :64, :64]
    for c in free:
        prob[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9] = 0.9
    rods = [(30, 12, 12), (30, 30, 50), (20, 50, 12)]
    for z, y, x in rods:
        prob[z - 2:z + 3, y:y + 2, x:x + 2] = 0.9
    prob[40:42, 2:62, 2:62] = 0.9  # a membrane
    prob[(zz - 36) ** 2 + (yy - 30) ** 2 + (xx - 30) ** 2 <= 16] = 0.9  # a particle on it
    return prob, [np.add(r, (0, 0.5, 0.5)) for r in rods], free


def test_spare_small_puts_erased_small_components_back_whole_and_opens_the_rest():
    from vpdetect.localize.cluster import extract_foreground, particle_foreground

    prob, rods, free = _faint_scene()
    opened = extract_foreground(prob, 0.5, 1)
    same = particle_foreground(prob, 0.5, 1, spare_small=0.0)
    np.testing.assert_array_equal(same.coords, opened.coords)
    spared = particle_foreground(prob, 0.5, 1, drop_thin=True, spare_small=1.5)
    in_spared = {tuple(c) for c in spared.coords}
    for z, y, x in (np.subtract(r, (0, 0.5, 0.5)).astype(int) for r in rods):  # erased by the opening, back whole
        rod = {(z + dz, y + dy, x + dx) for dz in range(-2, 3) for dy in range(2) for dx in range(2)}
        assert not rod & {tuple(c) for c in opened.coords} and rod <= in_spared
    # Free balls are small too: whole again. The membrane stays opened and its fragments dropped.
    zz, yy, xx = np.mgrid[:64, :64, :64]
    for c in free:
        ball_voxels = np.argwhere((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9)
        assert {tuple(v) for v in ball_voxels} <= in_spared
    membrane_far = {(z, y, x) for z in (40, 41) for y in range(2, 62) for x in range(2, 62)
                    if (y - 30) ** 2 + (x - 30) ** 2 > 100}
    assert not membrane_far & in_spared
    assert spared.n_components == len(np.unique(spared.labels)) == len(free) + 1 + len(rods)
    order = np.lexsort(spared.coords.T[::-1])
    np.testing.assert_array_equal(order, np.arange(len(order)))  # raster order, as extract_foreground


def test_spare_small_finds_faint_particles_the_opening_erases():
    prob, rods, free = _faint_scene()
    settings = dict(threshold=0.5, opening_radius=1, bandwidth=3.0, min_size=10, drop_thin=True)
    opened = find_particles(prob, **settings)
    spared = find_particles(prob, spare_small=1.5, **settings)
    assert len(opened) == len(free) + 1
    assert len(spared) == len(free) + 1 + len(rods)
    found = xyz_to_zyx(spared)
    for rod in rods:
        assert np.min(np.linalg.norm(found - rod, axis=1)) < 0.75
