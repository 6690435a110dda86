"""Robust normalisation, contrast detection and voxel-size resampling."""

from functools import partial

import numpy as np
import pytest

from vpdetect.errors import VPDetectError
from vpdetect.preprocess import (
    ROBUST_CLIP,
    BackgroundSubtracted,
    binned_mean,
    clip_of,
    contrast_sign,
    detect_contrast,
    normalisation_params,
    normalise,
    robust_params,
    subtract_background,
    zscore_params,
)
from vpdetect.resample import (
    fourier_resample,
    grid_scale,
    linear_resample,
    nearest_resample,
    resampled_shape,
    rescale_factor,
)


def blobs(rng, shape=(48, 64, 64), sign=-1.0, n=40, radius=3.0, noise=1.0):
    """Sparse balls of one sign on Gaussian noise."""
    z, y, x = np.indices(shape)
    volume = rng.normal(0.0, noise, shape).astype(np.float32)
    for c in rng.uniform([radius + 1] * 3, np.array(shape) - radius - 1, size=(n, 3)):
        volume[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius**2] += sign * 2.0
    return volume


def test_robust_statistics_ignore_gold_beads_that_inflate_the_std(rng):
    volume = rng.normal(3.0, 2.0, (40, 40, 40)).astype(np.float32)
    _, std_clean = zscore_params(volume)
    volume[:4, :4, :4] = -400.0  # a gold bead: 0.1 % of the voxels
    _, std = zscore_params(volume)
    median, scale = robust_params(volume)
    assert std > 5 * std_clean
    assert median == pytest.approx(3.0, abs=0.1)
    assert scale == pytest.approx(2.0, rel=0.05)
    out = normalise(volume, median, scale, clip_of("robust"))
    assert out.min() == -ROBUST_CLIP and out.max() <= ROBUST_CLIP
    assert out.dtype == np.float32


def test_robust_scale_falls_back_to_the_std_when_most_voxels_are_equal(rng):
    volume = np.zeros((20, 20, 20), np.float32)
    volume[:5] = rng.normal(size=(5, 20, 20))
    centre, scale = robust_params(volume)
    assert centre == 0.0 and scale == pytest.approx(zscore_params(volume)[1])


def test_normalisation_names_and_refusals(rng):
    volume = rng.normal(size=(8, 8, 8))
    assert normalisation_params(volume, "zscore") == zscore_params(volume)
    assert clip_of("zscore") is None
    with pytest.raises(VPDetectError, match="unknown input normalisation"):
        normalisation_params(volume, "minmax")
    with pytest.raises(VPDetectError, match="constant"):
        robust_params(np.ones((8, 8, 8)))
    nan = volume.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(VPDetectError, match="NaN"):
        robust_params(nan)


@pytest.mark.parametrize("noise", [0.5, 2.0, 4.0])
def test_contrast_is_detected_from_the_sign_of_sparse_blobs(noise):
    rng = np.random.default_rng(7)
    dark = blobs(rng, noise=noise)
    assert detect_contrast(dark)[0] == "dark"
    assert detect_contrast(-dark)[0] == "bright"
    assert detect_contrast(-dark)[1] == pytest.approx(-detect_contrast(dark)[1], rel=1e-4)


def test_contrast_sign():
    assert contrast_sign("dark", "dark") == 1.0
    assert contrast_sign("bright", "dark") == -1.0
    with pytest.raises(VPDetectError, match="dark or bright"):
        contrast_sign("grey", "dark")


def test_rescale_factor_tolerance_and_unknown_sizes():
    assert rescale_factor(10.5, 10.0) is None  # within 10 %
    assert rescale_factor(5.0, 10.0) == 0.5
    assert rescale_factor(None, 10.0) is None and rescale_factor(20.0, None) is None
    assert resampled_shape((100, 64, 63), 0.5) == (50, 32, 32)


def test_fourier_resampling_keeps_the_geometry_and_band_limited_content():
    # A smooth pattern sampled at two spacings over the same periodic field of view:
    # Fourier resampling of the coarse one gives the fine one exactly.
    def field(n):
        t = np.arange(n) / n * 2 * np.pi
        z, y, x = np.meshgrid(t[: n // 2], t, t, indexing="ij")
        return (np.cos(2 * x) + np.sin(3 * y)).astype(np.float32)

    coarse, fine = field(32), field(64)
    up = fourier_resample(coarse, fine.shape)
    assert up.shape == fine.shape == (32, 64, 64)
    assert np.max(np.abs(up - fine)) < 1e-4
    assert np.max(np.abs(up[::2, ::2, ::2] - coarse)) < 1e-4  # voxel i of the new grid at i * n / m
    down = fourier_resample(up, coarse.shape)
    assert np.max(np.abs(down - coarse)) < 1e-4


def test_mask_and_map_resampling_align_with_the_grid():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[10, 4, 6] = 1
    small = nearest_resample(mask, (10, 10, 10))
    assert small.shape == (10, 10, 10) and small[5, 2, 3] == 1 and small.sum() == 1
    assert np.allclose(grid_scale((20, 20, 20), (10, 10, 10)), 2.0)
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32), (10, 10, 10))
    big = linear_resample(ramp, (20, 20, 20))
    assert big[0, 0, 8] == pytest.approx(4.0) and big[0, 0, 9] == pytest.approx(4.5)


def test_background_subtraction_removes_a_gradient_and_keeps_particles(rng):
    """An ice-density ramp across x (as in a thickness gradient) is gone away from the faces;
    particles (radius 3) keep most of their contrast; noise passes unchanged."""
    shape = (48, 64, 64)
    particles = blobs(rng, shape, sign=-1.0, n=20, radius=3.0, noise=0.0)
    noise = rng.normal(0.0, 1.0, shape).astype(np.float32)
    ramp = np.broadcast_to(np.linspace(-3.0, 3.0, shape[2], dtype=np.float32), shape)
    flat = np.asarray(subtract_background(particles + noise + ramp, 8.0))
    inner = (slice(12, -12),) * 3
    residual = flat - (particles + noise)
    assert np.abs(np.median(residual[inner])) < 0.05
    assert np.abs(residual[inner]).mean() < 0.15  # the ramp was 1.5 on average
    inside = particles[inner] < -1.0
    assert -flat[inner][inside].mean() > 0.8 * 2.0  # blob contrast was 2
    assert subtract_background(noise, 0) is noise and subtract_background(noise, None) is noise


def test_background_view_reads_like_the_materialised_volume(rng):
    volume = rng.normal(size=(30, 41, 37)).astype(np.float32) + np.arange(37, dtype=np.float32) * 0.1
    view = BackgroundSubtracted(volume, 6.0)
    # Equal up to float32 rounding: a block's background sums only the bins its planes touch.
    close = partial(np.testing.assert_allclose, rtol=0.0, atol=1e-5)
    whole = np.asarray(view)
    assert whole.shape == volume.shape and whole.dtype == np.float32
    sub = view[4:20]
    assert isinstance(sub, BackgroundSubtracted) and sub.shape == (16, 41, 37)
    close(sub[2:9, ::3, 5], whole[6:13, ::3, 5])
    close(view[::4, 1::5, ::2], whole[::4, 1::5, ::2])
    close(view[7], whole[7])
    close(view[..., 3], whole[:, :, 3])
    assert view[5:5].shape == (0, 41, 37) and np.asarray(view[5:5]).shape == (0, 41, 37)
    with pytest.raises(VPDetectError, match="must be positive"):
        BackgroundSubtracted(volume, 0.0)
    with pytest.raises(TypeError, match="forward slices"):
        view[::-1]


def test_background_of_a_memory_mapped_tomogram_equals_the_in_memory_one(rng, tmp_path):
    from vpdetect.io.mrc import read_tomogram, write_mrc

    volume = rng.normal(size=(20, 24, 28)).astype(np.float32)
    write_mrc(tmp_path / "t.mrc", volume, 10.0)
    mapped = read_tomogram(tmp_path / "t.mrc", mmap=True).data
    np.testing.assert_array_equal(np.asarray(BackgroundSubtracted(mapped, 4.0)),
                                  np.asarray(BackgroundSubtracted(volume, 4.0)))


def test_binned_mean_averages_partial_blocks_at_the_far_faces():
    volume = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    binned = binned_mean(volume, 2)
    assert binned.shape == (3, 2, 2)
    assert binned[0, 0, 0] == pytest.approx(volume[:2, :2, :2].mean())
    assert binned[2, 1, 1] == pytest.approx(volume[4:, 2:, 2:].mean())
