"""Bringing a tomogram to a model's voxel size, and coordinates back.

A network learns particles at the voxel size it was trained at: the same
ribosome at 5 A/voxel is twice as many voxels across as at 10 A. When a
tomogram's voxel size differs from the model's by more than
RESCALE_TOLERANCE, it is resampled in Fourier space (cropping or zero-padding
the spectrum, axis by axis, with `scipy.signal.resample`): the exact
band-limited interpolation, which neither aliases when shrinking nor blurs
when enlarging (the way membrain-seg matches pixel sizes).

Geometry: an axis of n voxels resampled to m keeps its first voxel's centre
and spans the same length, so voxel i of the new grid sits at i * n / m in the
old one. Coordinates found on the new grid map back by that factor per axis.
"""

from __future__ import annotations

import numpy as np

from vpdetect.errors import VPDetectError

# Relative voxel-size difference (model vs tomogram) below which nothing is resampled.
RESCALE_TOLERANCE = 0.10


def rescale_factor(tomogram_voxel: float | None, model_voxel: float | None) -> float | None:
    """tomogram / model voxel size when they differ by more than the tolerance, else None
    (also None when either is unknown)."""
    if not tomogram_voxel or not model_voxel:
        return None
    factor = float(tomogram_voxel) / float(model_voxel)
    return factor if abs(factor - 1.0) > RESCALE_TOLERANCE else None


def resampled_shape(shape: tuple[int, ...], factor: float) -> tuple[int, ...]:
    """Each edge times `factor` (tomogram voxels per model voxel, inverted), at least 1."""
    return tuple(max(1, int(round(n * factor))) for n in shape)


def fourier_resample(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """`volume` [z, y, x] resampled to `shape` by Fourier cropping / zero-padding (float32).

    Axes are done one at a time, the shrinking ones first, so the working
    copy is never larger than it must be.
    """
    from scipy.signal import resample

    if len(shape) != volume.ndim or any(int(m) < 1 for m in shape):
        raise VPDetectError(f"cannot resample a {volume.shape} volume to {shape}")
    out = np.asarray(volume, dtype=np.float32)
    order = sorted(range(volume.ndim), key=lambda axis: shape[axis] / volume.shape[axis])
    for axis in order:
        if out.shape[axis] != shape[axis]:
            out = resample(out, int(shape[axis]), axis=axis).astype(np.float32, copy=False)
    return out


def grid_scale(original_shape: tuple[int, ...], resampled: tuple[int, ...]) -> np.ndarray:
    """Original voxels per resampled voxel along (z, y, x)."""
    return np.asarray(original_shape, dtype=np.float64) / np.asarray(resampled, dtype=np.float64)


def nearest_resample(mask: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A label or mask volume on the resampled grid: the nearest original voxel of each new one."""
    scale = grid_scale(mask.shape, shape)
    index = [np.minimum(np.rint(np.arange(m) * s).astype(np.int64), n - 1)
             for m, s, n in zip(shape, scale, mask.shape, strict=True)]
    return np.asarray(mask)[np.ix_(*index)]


def linear_resample(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A map (probabilities) on another grid of the same geometry by trilinear interpolation,
    float32; values stay within the input's range (no Fourier ringing)."""
    from scipy import ndimage

    scale = grid_scale(volume.shape, shape)
    return ndimage.affine_transform(
        np.asarray(volume, dtype=np.float32), scale, output_shape=tuple(shape), order=1, mode="nearest"
    )
