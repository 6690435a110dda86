"""Gold beads' streaks: the ray model, the tilt series fitted to them, their subtraction. The test
tomograms are reconstructed by another code path (scikit-image's radon / iradon of each x-z plane),
so the streaks are a real filtered back-projection's, not this module's model of one."""

import functools
import logging

import numpy as np
import pytest

from vpdetect.localize.fiducials import find_beads
from vpdetect.localize.gold_streaks import (
    PROFILE_HALF_WIDTH,
    fan,
    fit_tilt_range,
    ray_design,
    remove_gold_streaks,
)
from vpdetect.preprocess import normalisation_params

SIDE, NY = 128, 32  # x-z planes reconstructed as SIDE x SIDE squares, the central half in z kept
BEAD = (64, 16, 50)  # [z, y, x] in the square; radius 3, density 30
PARTICLE = (72, 18, 64)  # on the bead's +60 degree ray, two rows off its y plane; radius 3, density 1
ANGLES = tuple(np.arange(-60.0, 61.0, 3.0))


def ball(centre, radius, edge=0.0):
    """1 inside, 0 outside, over `edge` voxels (a logistic edge: the voxelised sphere then projects
    alike at every tilt, as a real one does)."""
    z, y, x = np.indices((SIDE, NY, SIDE))
    r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    return 1.0 / (1.0 + np.exp((r - radius) / edge)) if edge > 0 else (r <= radius).astype(np.float64)


@functools.lru_cache(maxsize=8)
def reconstructed(what: str, angles: tuple) -> np.ndarray:
    """[z, y, x] ramp-filtered back-projection of the bead or the particle alone, over `angles`."""
    from skimage.transform import iradon, radon

    density = 30.0 * ball(BEAD, 3, edge=0.3) if what == "bead" else ball(PARTICLE, 3, edge=0.3)
    out = np.empty_like(density)
    for y in range(NY):
        sinogram = radon(density[:, y, :], theta=np.array(angles), circle=True)
        out[:, y, :] = iradon(sinogram, theta=np.array(angles), filter_name="ramp", circle=True, output_size=SIDE)
    return out[SIDE // 4 : 3 * SIDE // 4].astype(np.float32)


def tomogram(rng, angles=ANGLES, noise=0.3):
    """(volume, the bead's reconstruction alone, the rest: particle and noise)."""
    bead = reconstructed("bead", angles)
    rest = reconstructed("particle", angles) + rng.normal(0.0, noise, bead.shape).astype(np.float32)
    return bead + rest, bead, rest


def test_ray_design_back_projects_a_profile_along_each_tilts_rays(rng):
    dz, dx = (v.ravel() for v in np.meshgrid(np.arange(-5.0, 6.0), np.arange(-5.0, 6.0), indexing="ij"))
    centre_only = np.zeros(2 * PROFILE_HALF_WIDTH + 1)
    centre_only[PROFILE_HALF_WIDTH] = 1.0
    # Untilted, the beam runs along z: the ray through the bead is its x = 0 column; at 90 degrees its z = 0 row.
    np.testing.assert_allclose(ray_design(dz, dx, [0.0]) @ centre_only, dx == 0, atol=1e-12)
    np.testing.assert_allclose(ray_design(dz, dx, [90.0]) @ centre_only, dz == 0, atol=1e-12)
    # Half a voxel off a knot splits between the two; tilts add up.
    half = ray_design(np.array([0.0]), np.array([0.5]), [0.0, 0.0])[0]
    assert half[PROFILE_HALF_WIDTH] == half[PROFILE_HALF_WIDTH + 1] == 1.0 and half.sum() == 2.0
    # Any profile: the sum over the tilts of its linear interpolation at u = x cos t + z sin t.
    profile = rng.normal(size=centre_only.size)
    angles = np.arange(-57.0, 61.0, 3.5)
    knots = np.arange(-PROFILE_HALF_WIDTH, PROFILE_HALF_WIDTH + 1)
    direct = sum(np.interp(dx * np.cos(t) + dz * np.sin(t), knots, profile, left=0.0, right=0.0)
                 for t in np.deg2rad(angles))
    np.testing.assert_allclose(ray_design(dz, dx, angles) @ profile, direct, atol=1e-9)


@pytest.mark.parametrize("angles", [ANGLES, tuple(np.arange(-50.0, 65.0, 2.0))], ids=["+-60 step 3", "-50..+64 step 2"])
def test_the_tilt_range_is_fitted_to_a_beads_streaks(rng, angles):
    volume, _, _ = tomogram(rng, angles)
    centre, scale = normalisation_params(volume, "robust")
    low, high = fit_tilt_range(volume, find_beads(volume, centre, scale), centre, scale)
    # scikit-image's frame is this module's mirrored: the same range, its signs flipped.
    assert abs(-high - angles[0]) <= 1.0 and abs(-low - angles[-1]) <= 1.0
    assert fan(low, high).tolist() == list(np.arange(low, high + 0.5, 1.0))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_remove_gold_streaks_takes_the_streaks_and_keeps_the_bead_and_the_particle(rng, sign):
    volume, bead, rest = tomogram(rng)
    volume, bead, rest = sign * volume, sign * bead, sign * rest
    centre, scale = normalisation_params(volume, "robust")
    cleaned, beads, tilt_range = remove_gold_streaks(volume, centre, scale)
    assert len(beads) == 1 and max(abs(tilt_range[0] + 60.0), abs(tilt_range[1] - 60.0)) <= 1.0
    assert cleaned.dtype == np.float32 and cleaned.shape == volume.shape
    (found,) = beads
    core = np.zeros(volume.shape, dtype=bool)
    core[found.box] = found.core
    np.testing.assert_array_equal(cleaned[core], volume[core])  # the bead stays for the picker
    # Off the core in the bead's slab, what the subtraction leaves of the bead's reconstruction.
    z, y, x = np.indices(volume.shape)
    slab = (np.abs(y - BEAD[1]) <= 3) & ~core & (np.hypot(z - (BEAD[0] - SIDE // 4), x - BEAD[2]) > 6)
    left = cleaned - rest
    assert np.sqrt(np.mean(left[slab] ** 2)) < 0.25 * np.sqrt(np.mean(bead[slab] ** 2))
    # The particle, on a ray, is no part of the fit: its contrast stays.
    particle = ball(PARTICLE, 2)[SIDE // 4 : 3 * SIDE // 4] > 0
    assert abs(np.mean(left[particle])) < 0.15 * abs(np.mean(rest[particle]))
    outside = np.abs(y - BEAD[1]) > found.radius + 4  # rows outside the bead's slab: untouched
    np.testing.assert_array_equal(cleaned[outside], volume[outside])
    np.testing.assert_array_equal(remove_gold_streaks(volume, centre, scale)[0], cleaned)  # deterministic
    # A range given (this module's frame) is used as it is.
    given = remove_gold_streaks(volume, centre, scale, tilt_range=(-60, 60))
    assert given[2] == (-60.0, 60.0)
    assert np.sqrt(np.mean((given[0] - rest)[slab] ** 2)) < 0.25 * np.sqrt(np.mean(bead[slab] ** 2))


def test_rows_where_the_fit_explains_no_more_than_noise_are_left_alone(rng):
    # A dense ball with no back-projection streaks (as a protein taken for a bead at high SNR,
    # or a bead's outer rows): a fan fitted to noise would draw rays into the tomogram.
    volume = rng.normal(0.0, 1.0, (48, 32, 96)).astype(np.float32)
    z, y, x = np.indices(volume.shape)
    volume[(z - 24) ** 2 + (y - 16) ** 2 + (x - 40) ** 2 <= 9] += 60.0
    cleaned, beads, tilt_range = remove_gold_streaks(volume, 0.0, 1.0)
    assert len(beads) == 1 and tilt_range is not None
    np.testing.assert_array_equal(cleaned, volume)


def test_a_tomogram_without_beads_or_without_room_around_them_is_left_alone(rng, caplog):
    quiet = rng.normal(size=(24, 24, 24)).astype(np.float32)
    cleaned, beads, tilt_range = remove_gold_streaks(quiet, 0.0, 1.0)
    assert cleaned is quiet and beads == [] and tilt_range is None
    cramped = rng.normal(size=(9, 24, 9)).astype(np.float32)  # x-z planes too small to fit a profile in
    cramped[3:6, 10:13, 3:6] += 100.0
    with caplog.at_level(logging.WARNING):
        cleaned, beads, tilt_range = remove_gold_streaks(cramped, 0.0, 1.0)
    assert len(beads) == 1 and tilt_range is None
    np.testing.assert_array_equal(cleaned, cramped)
    assert "leaves room to fit its streaks" in caplog.text


def test_pick_times_the_gold_streaks_as_their_own_phase(tmp_path, rng):
    from typer.testing import CliRunner

    import vpdetect.cli  # noqa: F401  registers the commands
    from tests.test_localize_cli import intensity_localizer
    from vpdetect.cli.app import app
    from vpdetect.io.mrc import write_mrc

    volume, _, _ = tomogram(rng)
    write_mrc(tmp_path / "tomo.mrc", volume, voxel_size=10.0)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    result = CliRunner().invoke(app, ["pick", str(tmp_path / "tomo.mrc"), "--localizer", str(model),
                                      "--remove-gold-streaks", "-o", str(tmp_path / "picks.star")])
    assert result.exit_code == 0, result.output
    assert ", gold " in result.output and "streaks of 1 gold bead(s) subtracted" in result.output
