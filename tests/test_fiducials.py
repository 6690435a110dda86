"""Gold fiducials: found by their far excess over the noise, the picks on them flagged (their
streaks: tests/test_gold_streaks.py)."""

import numpy as np
import pytest

from vpdetect.localize.fiducials import (
    BEAD_MARGIN,
    GOLD_CONTRAST_RATIO,
    MIN_PICKS,
    Bead,
    find_beads,
    gold_beads,
    peak_contrast,
    picks_on_beads,
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
