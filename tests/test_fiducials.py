"""Gold fiducials: found by their far excess over the noise, their streaks subtracted, the picks on
them flagged."""

import numpy as np
import pytest
from scipy import ndimage

from vpdetect.localize.fiducials import (
    BEAD_MARGIN,
    GOLD_CONTRAST_RATIO,
    MIN_PICKS,
    SYMMETRY_GAIN,
    Bead,
    _nan_median,
    find_beads,
    gold_beads,
    peak_contrast,
    picks_on_beads,
    remove_gold_streaks,
    streak_slab,
    symmetry_gain,
)

SHAPE = (40, 64, 64)


def beads_and_particles(rng, n_particles=12, n_gold=2, gold=20.0):
    """Noise with `n_particles` balls of density 1 (radius 4) and `n_gold` of `gold` (radius 2),
    on a gentle gradient (thicker ice); returns (volume, centres [z, y, x], is_gold)."""
    z, y, x = np.indices(SHAPE)
    volume = rng.normal(0.0, 0.3, SHAPE).astype(np.float32) + (x / SHAPE[2]).astype(np.float32)
    grid = [(zc, yc, xc) for zc in (10, 29) for yc in (9, 23, 37, 51) for xc in (9, 23, 37, 51)]
    picked = rng.choice(len(grid), n_particles + n_gold, replace=False)
    centres = np.array([grid[i] for i in picked], dtype=float)
    is_gold = np.arange(len(centres)) >= n_particles
    for c, on_gold in zip(centres, is_gold, strict=True):
        radius, value = (2.0, gold) if on_gold else (4.0, 1.0)
        volume[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius**2] += value
    return volume, centres, is_gold


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_find_beads_finds_each_bead_in_either_contrast_and_no_particle(rng, sign):
    volume, centres, is_gold = beads_and_particles(rng)
    beads = find_beads(sign * volume, 0.0, 0.3)
    assert len(beads) == is_gold.sum()
    found = sorted(tuple(b.centre) for b in beads)
    np.testing.assert_allclose(found, sorted(map(tuple, centres[is_gold])), atol=0.5)
    for bead in beads:  # a radius-2 ball: the half-maximum body of the blurred bead is about as large
        assert 1.5 <= bead.radius <= 3.5 and bead.core.shape == tuple(s.stop - s.start for s in bead.box)
    # Centres a voxel off still sit on their bead; particles do not.
    shaken = centres + rng.uniform(-1.0, 1.0, centres.shape)
    np.testing.assert_array_equal(picks_on_beads(shaken, beads), is_gold)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_touching_beads_are_two_and_a_bright_rimmed_bead_is_one(rng, sign):
    z, y, x = np.indices(SHAPE)
    volume = rng.normal(0.0, 0.3, SHAPE).astype(np.float32)
    # Two radius-3 beads whose surfaces are a voxel apart: one connected body over the level.
    pair = np.array([[20.0, 20.0, 16.0], [20.0, 20.0, 23.0]])
    for c in pair:
        volume[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 9.0] += 20.0
    # A radius-6 bead whose rim is brighter than its centre, as a reconstruction draws a large bead:
    # its smoothed top has several maxima, and it is still one bead.
    lone = np.array([20.0, 44.0, 40.0])
    distance = np.sqrt((z - lone[0]) ** 2 + (y - lone[1]) ** 2 + (x - lone[2]) ** 2)
    volume[distance <= 6.0] += 10.0
    volume[(distance > 4.5) & (distance <= 6.0)] += 12.0
    beads = find_beads(sign * volume, 0.0, 0.3)
    assert len(beads) == 3
    found = np.array(sorted(tuple(b.centre) for b in beads))
    np.testing.assert_allclose(found, sorted(map(tuple, [*pair, lone])), atol=1.0)
    by_centre = sorted(beads, key=lambda b: tuple(b.centre))
    assert all(2.0 <= b.radius <= 4.0 for b in by_centre[:2])  # each its own body, not the pair's
    # Each bead's core is its own: the pair's cores do not reach past the plane between them.
    for bead, other in zip(by_centre[:2], by_centre[1::-1], strict=True):
        core = np.argwhere(bead.core) + [s.start for s in bead.box]
        assert np.all(np.linalg.norm(core - bead.centre, axis=1) <= np.linalg.norm(core - other.centre, axis=1) + 1.0)


def test_a_saturated_bead_between_voxels_is_one_bead():
    # Clipped (8-bit) data and a centre between voxels give equal maxima on 8 voxels: still one bead.
    z, y, x = np.indices(SHAPE)
    centre = np.array([20.5, 30.5, 30.5])
    volume = np.where((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 12.0, 30.0, 0.0)
    beads = find_beads(volume.astype(np.float32), 0.0, 1.0)
    assert len(beads) == 1
    np.testing.assert_allclose(beads[0].centre, centre, atol=0.5)


def test_proteins_alone_and_faint_beads_are_no_beads(rng):
    volume, _, _ = beads_and_particles(rng, n_gold=0)
    assert find_beads(volume, 0.0, 0.3) == []
    # A "bead" only twice a protein's density is no bead.
    volume, _, _ = beads_and_particles(rng, gold=2.0)
    assert find_beads(volume, 0.0, 0.3) == []


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gold_beads_are_far_stronger_than_the_median_pick(rng, sign):
    volume, centres, is_gold = beads_and_particles(rng, gold=20.0)
    # Given every object as a "bead" (as at high SNR, where proteins pass the |z| level too),
    # only the gold is gold.
    np.testing.assert_array_equal(gold_beads(sign * volume, centres, centres), is_gold)
    # A "bead" only three times a protein's density is no gold; too few picks: the |z| decides.
    volume, centres, is_gold = beads_and_particles(rng, gold=3.0)
    assert not gold_beads(volume, centres[is_gold], centres).any()
    assert gold_beads(volume, centres[is_gold], centres[: MIN_PICKS - 1]).all()


def test_peak_contrast_at_the_volume_edges_and_against_the_local_background():
    volume = np.full(SHAPE, 5.0, dtype=np.float32)  # a constant offset is background, not contrast
    volume[0:3, 0:3, 0:3] += 10.0
    peaks = peak_contrast(volume, np.array([[0, 0, 0], [39, 63, 63], [-3, 70, 10]]))
    assert peaks[0] > 5.0 and peaks[1] == pytest.approx(0.0, abs=1e-5)
    assert np.isfinite(peaks).all()
    assert GOLD_CONTRAST_RATIO > 2.9  # above the largest true particle measured (module docstring)


def test_picks_on_beads_reach_the_radius_and_margin():
    bead = Bead(np.array([10.0, 10.0, 10.0]), 3.0, (slice(0, 1),) * 3, np.ones((1, 1, 1), dtype=bool))
    reach = 3.0 + BEAD_MARGIN
    centres = np.array([[10.0, 10.0, 10.0 + reach - 0.01], [10.0, 10.0 + reach + 0.01, 10.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(picks_on_beads(centres, [bead]), [True, False, False])
    assert picks_on_beads(centres, []).tolist() == [False] * 3
    assert picks_on_beads(np.zeros((0, 3)), [bead]).shape == (0,)


def bead_with_streaks(rng, sign=1.0, particle_at=None, tilts=(-60.0, 60.0), ray_shift=0.0):
    """Unit noise [z, y, x] with a bead (radius 3, -60) at BEAD, its streaks (an X of +8 rays at the
    extreme `tilts` in degrees from z in the x-z planes of the bead's slab, y within 3, about as wide as
    the bead whose projection they back-project) and a particle (radius 2, -5) at `particle_at` (default
    PARTICLE: on the +60 degree ray, off the bead's y plane); `ray_shift` moves each ray sideways by
    that many voxels, as a misaligned tilt image does (no longer point-symmetric about the bead).
    Returns (volume, bead core, streak voxels off the core and the particle, particle)."""
    shape = (48, 40, 64)
    z, y, x = np.indices(shape)
    volume = rng.normal(0.0, 1.0, shape).astype(np.float32)
    bz, by, bx = BEAD
    dz, dx = z - bz, x - bx
    ray = np.zeros(shape, dtype=bool)
    for tilt in np.radians(tilts):
        ray |= np.abs(dx * np.cos(tilt) - dz * np.sin(tilt) - ray_shift) < 2.0
    streaks = ray & (np.abs(y - by) <= 3) & (dz**2 + dx**2 > 36)
    core = (z - bz) ** 2 + (y - by) ** 2 + (x - bx) ** 2 <= 9
    particle = np.sum((np.indices(shape).T - (PARTICLE if particle_at is None else particle_at)).T ** 2, axis=0) <= 4
    volume[streaks] += 8.0
    volume[core] -= 60.0
    volume[particle] -= 5.0
    return sign * volume, core, streaks & ~particle, particle


BEAD = (24, 20, 32)
PARTICLE = (24 + 8, 22, 32 + 14)  # on a ray (dx = 14, dz = 8: about 60 degrees from z), 2 voxels off y = 20


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_remove_gold_streaks_subtracts_the_symmetric_streaks_and_keeps_bead_and_particle(rng, sign):
    volume, core, streaks, particle = bead_with_streaks(rng, sign)
    cleaned, beads = remove_gold_streaks(volume, 0.0, 1.0)
    assert len(beads) == 1 and cleaned.dtype == np.float32 and cleaned.shape == volume.shape
    before, after = np.abs(volume[streaks]).mean(), np.abs(cleaned[streaks]).mean()
    assert before > 7.0 and after < 1.0  # streaks down to noise
    np.testing.assert_array_equal(cleaned[core], volume[core])  # the bead stays for the picker
    # The particle sits on a ray (+8) but has no mirror image: the ray goes, the particle keeps its
    # contrast against the cleaned ray beside it.
    beside = streaks & (ndimage.distance_transform_edt(~particle) <= 6)
    assert sign * (cleaned[particle].mean() - cleaned[beside].mean()) == pytest.approx(-5.0, abs=1.0)
    far = np.zeros(volume.shape, dtype=bool)
    far[:, :12] = True  # y far outside the bead's slab: untouched
    np.testing.assert_array_equal(cleaned[far], volume[far])
    np.testing.assert_array_equal(remove_gold_streaks(volume, 0.0, 1.0)[0], cleaned)  # deterministic


def test_point_symmetric_streaks_are_subtracted_in_full_and_misaligned_ones_shrunk(rng, monkeypatch):
    import vpdetect.localize.fiducials as fiducials

    def cleaned_with(volume, gain):
        monkeypatch.setattr(fiducials, "SYMMETRY_GAIN", gain)
        return remove_gold_streaks(volume, 0.0, 1.0)[0]

    # Aligned: the samples away from each voxel predict its streaks (gain about 1), so the median
    # goes in full and the streaks leave no bias (the shrunk estimate would leave about +1 on them).
    volume, _, streaks, _ = bead_with_streaks(rng)
    (bead,) = find_beads(volume, 0.0, 1.0)
    assert symmetry_gain(volume, bead.centre, streak_slab(bead, volume.shape[1])) > SYMMETRY_GAIN
    cleaned = remove_gold_streaks(volume, 0.0, 1.0)[0]
    np.testing.assert_array_equal(cleaned, cleaned_with(volume, -np.inf))
    assert abs(cleaned[streaks].mean()) < 0.4 < cleaned_with(volume, np.inf)[streaks].mean()
    # Misaligned by 2 voxels: a ray's mirror misses it, the gain collapses, the estimate is shrunk.
    monkeypatch.undo()
    volume, _, _, _ = bead_with_streaks(rng, ray_shift=2.0)
    (bead,) = find_beads(volume, 0.0, 1.0)
    assert symmetry_gain(volume, bead.centre, streak_slab(bead, volume.shape[1])) < 0.2
    cleaned = remove_gold_streaks(volume, 0.0, 1.0)[0]
    np.testing.assert_array_equal(cleaned, cleaned_with(volume, np.inf))
    assert not np.array_equal(cleaned, cleaned_with(volume, -np.inf))


def test_streaks_of_an_off_centre_tilt_range_go_too(rng):
    # A lamella milled at a pre-tilt is imaged over, e.g., -50..+66 degrees: the X loses its mirror
    # symmetry across the beam axis but keeps the point reflection through the bead.
    volume, core, streaks, _ = bead_with_streaks(rng, particle_at=(0, 0, 0), tilts=(-50.0, 66.0))
    cleaned, beads = remove_gold_streaks(volume, 0.0, 1.0)
    assert len(beads) == 1
    assert np.abs(volume[streaks]).mean() > 7.0 and np.abs(cleaned[streaks]).mean() < 1.5
    np.testing.assert_array_equal(cleaned[core], volume[core])


def test_a_particle_on_the_beads_y_plane_keeps_its_contrast(rng):
    # There the y mirror sample is the particle itself; the samples along the ray (32 voxels out on
    # it, scaled offsets move 3 voxels) outvote it.
    volume, _, streaks, particle = bead_with_streaks(rng, particle_at=(24 + 16, 20, 32 + 28))
    cleaned, _ = remove_gold_streaks(volume, 0.0, 1.0)
    beside = streaks & (ndimage.distance_transform_edt(~particle) <= 6)
    assert cleaned[particle].mean() - cleaned[beside].mean() == pytest.approx(-5.0, abs=1.0)


def test_remove_gold_streaks_leaves_a_tomogram_without_beads_alone(rng):
    volume, centres, _ = beads_and_particles(rng, n_gold=0)
    cleaned, beads = remove_gold_streaks(volume, 0.0, 0.3)
    assert beads == []
    np.testing.assert_array_equal(cleaned, volume)


def test_pick_times_the_gold_streaks_as_their_own_phase(tmp_path, rng):
    from typer.testing import CliRunner

    import vpdetect.cli  # noqa: F401  registers the commands
    from tests.test_localize_cli import intensity_localizer
    from vpdetect.cli.app import app
    from vpdetect.io.mrc import write_mrc

    volume, _, _, _ = bead_with_streaks(rng)
    write_mrc(tmp_path / "tomo.mrc", volume, voxel_size=10.0)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    result = CliRunner().invoke(app, ["pick", str(tmp_path / "tomo.mrc"), "--localizer", str(model),
                                      "--remove-gold-streaks", "-o", str(tmp_path / "picks.star")])
    assert result.exit_code == 0, result.output
    assert ", gold " in result.output and "streaks of 1 gold bead(s) subtracted" in result.output


def test_nan_median_matches_numpy(rng):
    import warnings

    stack = rng.normal(size=(12, 30, 7)).astype(np.float32)
    stack[rng.random(stack.shape) < 0.4] = np.nan
    stack[:, 0, 0] = np.nan  # no sample at all: 0
    stack[:, 1, 1] = np.nan
    stack[3, 1, 1] = 2.5  # one sample: itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nan_to_num(np.nanmedian(stack, axis=0))
    np.testing.assert_allclose(_nan_median(stack), expected, rtol=0, atol=1e-6)
    assert _nan_median(stack)[1, 1] == 2.5

