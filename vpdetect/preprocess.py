"""Input normalisation shared by training and inference.

Every tomogram is brought to zero mean and unit variance before it meets a
network; models record this ("zscore") so inference normalises the same way.
Statistics are accumulated slab by slab so a memory-mapped volume is never
copied whole.
"""

from __future__ import annotations

import numpy as np

from vpdetect.errors import VPDetectError

NORMALISATION = "zscore"


def volume_stats(volume: np.ndarray, slab: int = 32) -> tuple[float, float]:
    """Mean and standard deviation in float64, checking for NaN/Inf slab by slab."""
    total = 0.0
    total_sq = 0.0
    count = 0
    for z0 in range(0, volume.shape[0], slab):
        block = np.asarray(volume[z0 : z0 + slab], dtype=np.float64)
        if not np.all(np.isfinite(block)):
            raise VPDetectError("tomogram contains NaN or infinite values")
        total += float(block.sum())
        total_sq += float(np.square(block).sum())
        count += block.size
    if count == 0:
        raise VPDetectError("tomogram is empty")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    return mean, float(np.sqrt(var))


def zscore_params(volume: np.ndarray) -> tuple[float, float]:
    """(mean, std) for z-score normalisation; a constant volume is refused."""
    mean, std = volume_stats(volume)
    if std <= 1e-12 * max(1.0, abs(mean)):
        raise VPDetectError("tomogram has constant value (zero variance): nothing to detect")
    return mean, std


def normalise(volume: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(volume - mean) / std as float32 (use on crops or slabs, not whole mmaps)."""
    return ((np.asarray(volume, dtype=np.float32) - np.float32(mean)) / np.float32(std)).astype(
        np.float32, copy=False
    )
