"""Robust normalisation, contrast detection and voxel-size resampling."""

import numpy as np
import pytest

from vpdetect.errors import VPDetectError
from vpdetect.preprocess import (
    ROBUST_CLIP,
    clip_of,
    contrast_sign,
    detect_contrast,
    normalisation_params,
    normalise,
    robust_params,
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
