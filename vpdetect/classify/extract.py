"""Subtomogram extraction: a normalised cubic box centred on each coordinate.

Coordinates (x, y, z, voxels, 0-based, voxel centres at integers) are rounded
to the nearest voxel with halves rounding up (floor(c + 0.5)), so the same
table always gives the same boxes. The centre voxel of a box of
size `box` sits at index `box // 2` on every axis; the central-component vote
looks there.

Boxes reaching past the tomogram are padded with 0 *after* z-score
normalisation, i.e. with the tomogram's mean: training sees normalised crops
whose missing context is likewise mean-valued, and a constant pad adds no
structure that the network could mistake for a particle.
"""

from __future__ import annotations

import numpy as np

from vpdetect.preprocess import normalise


def round_to_voxel(coords: np.ndarray) -> np.ndarray:
    """Nearest voxel index of each coordinate (halves round up), as int64."""
    return np.floor(np.asarray(coords, dtype=np.float64) + 0.5).astype(np.int64)


def inside_volume(coords_xyz: np.ndarray, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """Boolean per row: does the rounded coordinate fall on a voxel of the volume?"""
    coords = np.asarray(coords_xyz, dtype=np.float64).reshape(-1, 3)
    finite = np.all(np.isfinite(coords), axis=1)
    voxels = round_to_voxel(np.where(np.isfinite(coords), coords, -1.0))
    size_xyz = np.asarray(shape_zyx[::-1], dtype=np.int64)
    return finite & np.all((voxels >= 0) & (voxels < size_xyz), axis=1)


def extract_boxes(
    volume: np.ndarray,
    coords_xyz: np.ndarray,
    box: int,
    mean: float,
    std: float,
) -> np.ndarray:
    """Normalised boxes (n, box, box, box), indexed [z, y, x], centred on each coordinate.

    `volume` may be a memory map: only each box's window is read and
    normalised. Voxels outside the volume are 0 (the mean in normalised units).
    """
    if box < 1:
        raise ValueError(f"box size must be positive, got {box}")
    centres_zyx = round_to_voxel(np.asarray(coords_xyz).reshape(-1, 3))[:, ::-1]
    shape = np.asarray(volume.shape, dtype=np.int64)
    boxes = np.zeros((len(centres_zyx), box, box, box), dtype=np.float32)
    for i, centre in enumerate(centres_zyx):
        lo = centre - box // 2
        src_lo = np.maximum(lo, 0)
        src_hi = np.minimum(lo + box, shape)
        if np.any(src_hi <= src_lo):
            continue  # entirely outside: all padding
        dst_lo = src_lo - lo
        dst_hi = dst_lo + (src_hi - src_lo)
        window = volume[src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]]
        boxes[i, dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = normalise(
            window, mean, std
        )
    return boxes
