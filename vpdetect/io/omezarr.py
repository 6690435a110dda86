"""OME-Zarr volumes (`.zarr`, the tomograms of copick projects and the CryoET Data
Portal): the first (finest) scale of the first multiscale image, read with `zarr`.

The voxel size is that scale's `coordinateTransformations` scale factor, in Angstrom
when the axes say `angstrom` (nanometre and micrometre are converted; other units
count as unknown).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vpdetect.errors import VPDetectError

UNIT_TO_ANGSTROM = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4}


def _open(path: Path):
    try:
        import zarr
    except ImportError:  # an optional extra
        raise VPDetectError(
            f"{path}: reading OME-Zarr needs the zarr package (pip install 'vpdetect[zarr]')"
        ) from None
    if not path.is_dir():
        raise VPDetectError(f"OME-Zarr folder not found: {path}")
    try:
        group = zarr.open_group(str(path), mode="r")
        multiscale = dict(group.attrs)["multiscales"][0]
        level = multiscale["datasets"][0]
        array = group[level["path"]]
    except Exception as exc:  # noqa: BLE001 - zarr and bad metadata raise many types
        raise VPDetectError(f"{path}: not an OME-Zarr image ({type(exc).__name__}: {exc})") from None
    if array.ndim != 3:
        raise VPDetectError(f"{path}: expected a 3D volume, got {array.ndim}D data of shape {array.shape}")
    return multiscale, level, array


def _voxel_size(multiscale: dict, level: dict) -> float | None:
    scales = [t.get("scale") for t in level.get("coordinateTransformations", []) if t.get("type") == "scale"]
    units = {str(a.get("unit", "")).lower() for a in multiscale.get("axes", []) if a.get("type") == "space"}
    if not scales or len(units) != 1 or units.pop() not in UNIT_TO_ANGSTROM:
        return None
    unit = next(str(a.get("unit")).lower() for a in multiscale["axes"] if a.get("type") == "space")
    value = float(scales[0][-1]) * UNIT_TO_ANGSTROM[unit]  # x, the last axis
    return value if np.isfinite(value) and value > 0 else None


def read_omezarr(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """(float32 volume [z, y, x], voxel size in Angstrom or None) of an OME-Zarr image."""
    multiscale, level, array = _open(Path(path))
    return np.asarray(array[...], dtype=np.float32), _voxel_size(multiscale, level)


def omezarr_header(path: str | os.PathLike) -> dict:
    """Shape (z, y, x) and voxel size of an OME-Zarr image, without reading its data."""
    multiscale, level, array = _open(Path(path))
    return {"shape": tuple(int(v) for v in array.shape), "mode": None, "voxel_size": _voxel_size(multiscale, level)}
