"""Picks on gold fiducials: flagged by peak contrast against the tomogram's median pick."""

import numpy as np
import pytest

from vpdetect.localize.fiducials import GOLD_CONTRAST_RATIO, MIN_PICKS, gold_picks, peak_contrast

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
def test_gold_picks_flags_the_beads_in_either_contrast(rng, sign):
    volume, centres, is_gold = beads_and_particles(rng)
    # Centres a voxel off still find the bead's core.
    shaken = centres + rng.uniform(-1.0, 1.0, centres.shape)
    np.testing.assert_array_equal(gold_picks(sign * volume, shaken), is_gold)


def test_proteins_alone_and_faint_beads_are_kept(rng):
    volume, centres, _ = beads_and_particles(rng, n_gold=0)
    assert not gold_picks(volume, centres).any()
    # A "bead" only twice a protein's density is no bead.
    volume, centres, _ = beads_and_particles(rng, gold=2.0)
    assert not gold_picks(volume, centres).any()


def test_too_few_picks_for_a_median_flag_nothing(rng):
    volume, centres, is_gold = beads_and_particles(rng, n_particles=MIN_PICKS - 2, n_gold=1)
    assert len(centres) < MIN_PICKS
    assert not gold_picks(volume, centres).any()
    assert gold_picks(volume, np.zeros((0, 3))).shape == (0,)


def test_peak_contrast_at_the_volume_edges_and_against_the_local_background(rng):
    volume = np.full(SHAPE, 5.0, dtype=np.float32)  # a constant offset is background, not contrast
    volume[0:3, 0:3, 0:3] += 10.0
    peaks = peak_contrast(volume, np.array([[0, 0, 0], [39, 63, 63], [-3, 70, 10]]))
    assert peaks[0] > 5.0 and peaks[1] == pytest.approx(0.0, abs=1e-5)
    assert np.isfinite(peaks).all()
    assert GOLD_CONTRAST_RATIO > 2.9  # above the largest true particle measured (module docstring)
