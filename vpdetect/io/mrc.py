"""Tomogram I/O: MRC/REC files as arrays indexed [z, y, x] (float32, or memory maps).

Large files are memory-mapped; slightly malformed headers are retried in
mrcfile's permissive mode with a warning. A header voxel size of 0 or 1
Angstrom is what most software writes when it does not know, so it is
reported as unknown (None).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import atomic_path

# Files above this size are memory-mapped rather than read into memory.
MMAP_THRESHOLD_BYTES = 256 * 1024**2
# MRC modes vpdetect reads: int8, int16, float32, uint16, float16.
SUPPORTED_MODES = {0, 1, 2, 6, 12}
FIXED_LABEL = b"written by vpdetect".ljust(80)


ZARR_SUFFIX = ".zarr"  # OME-Zarr folders (vpdetect.io.omezarr) are read like MRC files


@dataclass
class Tomogram:
    """A volume indexed [z, y, x] with its voxel size in Angstrom (None if unknown)."""

    data: np.ndarray
    voxel_size: float | None = None
    path: Path | None = None

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        z, y, x = self.data.shape
        return (x, y, z)

    @property
    def name(self) -> str:
        """The tomogram's name as written in particle tables (file name without suffix)."""
        return tomogram_name(self.path) if self.path is not None else "tomogram"


def tomogram_name(path: str | os.PathLike) -> str:
    """File name without its MRC-like suffix: `TS_01.mrc` -> `TS_01`; a copick tomogram
    (`ExperimentRuns/RUN/VoxelSpacing10.000/denoised.zarr`) is named after its run."""
    path = Path(path)
    name = path.name
    if name.lower().endswith(ZARR_SUFFIX):
        if path.parent.name.startswith("VoxelSpacing") and path.parent.parent.parent.name == "ExperimentRuns":
            return path.parent.parent.name
        return name[: -len(ZARR_SUFFIX)]
    for suffix in (".mrc", ".rec", ".map", ".st", ".ali"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def header_voxel_size(voxel_size_record) -> float | None:
    """The x voxel size from an mrcfile voxel_size record; 0 or 1 Angstrom means unknown."""
    value = float(voxel_size_record.x)
    if not np.isfinite(value) or value <= 0 or abs(value - 1.0) < 1e-6:
        return None
    return value


def _open_mrc(path: Path, mmap: bool):
    import mrcfile

    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        return opener(path, mode="r")
    except ValueError as strict_error:
        try:
            # mrcfile warns once per oddity in permissive mode; one line below says it all.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handle = opener(path, mode="r", permissive=True)
        except Exception as exc:  # noqa: BLE001 - report the original problem
            raise VPDetectError(f"cannot read MRC file {path}: {strict_error}") from exc
        if handle.data is None:
            handle.close()
            if "bytes in data block" in str(strict_error):  # mrcfile's words for a short file
                raise VPDetectError(f"MRC file {path} is truncated: {strict_error}") from None
            raise VPDetectError(f"cannot read MRC file {path}: {strict_error}") from None
        warnings.warn(
            f"{path}: malformed MRC header ({strict_error}); read in permissive mode",
            stacklevel=3,
        )
        return handle
    except OSError as exc:
        raise VPDetectError(f"cannot read MRC file {path}: {exc}") from exc


def check_voxel_size(voxel_size: float | None) -> None:
    """A given voxel size must be a positive number: zero or negative would resample to nothing."""
    if voxel_size is not None and not (np.isfinite(voxel_size) and voxel_size > 0):
        raise VPDetectError(f"voxel size (--pixel-size) must be a positive number of Angstrom, got {voxel_size:g}")


def read_tomogram(
    path: str | os.PathLike,
    voxel_size: float | None = None,
    mmap: bool | None = None,
    allow_2d: bool = False,
    keep_dtype: bool = False,
) -> Tomogram:
    """Read an MRC/REC volume [z, y, x]: float32 in memory, or a memory map in the file's dtype.

    `voxel_size` (Angstrom) overrides the header. `mmap=None` memory-maps files
    larger than MMAP_THRESHOLD_BYTES; a memory-mapped file is returned as a
    read-only view in its own dtype (int8, int16, uint16, float16 or float32),
    never copied: a float32 copy of a large int8 tomogram would take four times
    the file's size in memory. Readers convert what they read (tiles, boxes,
    statistics blocks) to float32 themselves (`vpdetect.preprocess`).
    `keep_dtype=True` keeps the file's own dtype when reading into memory too.
    """
    path = Path(path)
    check_voxel_size(voxel_size)
    if path.suffix.lower() == ZARR_SUFFIX:
        from vpdetect.io.omezarr import read_omezarr

        array, header_size = read_omezarr(path)
        return Tomogram(data=array, voxel_size=voxel_size if voxel_size is not None else header_size, path=path)
    if not path.exists():
        raise VPDetectError(f"file not found: {path}")
    if path.is_dir():
        raise VPDetectError(f"expected an MRC file, got a directory: {path}")
    if mmap is None:
        mmap = path.stat().st_size > MMAP_THRESHOLD_BYTES
    handle = _open_mrc(path, mmap)
    try:
        mode = int(handle.header.mode)
        if mode not in SUPPORTED_MODES:
            raise VPDetectError(f"{path}: unsupported MRC mode {mode} (complex or packed data)")
        data = handle.data
        if data is None:
            raise VPDetectError(f"{path}: MRC file holds no data")
        if data.ndim != 3 and not (allow_2d and data.ndim == 2):
            raise VPDetectError(f"{path}: expected a 3D volume, got {data.ndim}D data of shape {data.shape}")
        header_size = header_voxel_size(handle.voxel_size)
        sizes = [float(handle.voxel_size[a]) for a in ("x", "y", "z")]
        if header_size is not None and voxel_size is None and max(sizes) > 1.01 * min(sizes):
            warnings.warn(
                f"{path}: anisotropic voxel size {sizes[0]:g} x {sizes[1]:g} x {sizes[2]:g} A; "
                f"vpdetect uses x ({sizes[0]:g} A) for all axes",
                stacklevel=2,
            )
        if mmap:
            array = data  # zero-copy view of the memory map, in the file's dtype
        else:
            array = np.array(data, dtype=None if keep_dtype else np.float32)
    except VPDetectError:
        handle.close()
        raise
    except ValueError as exc:  # truncated files surface here on mmap/read
        handle.close()
        raise VPDetectError(f"cannot read MRC file {path}: {exc}") from exc
    if array is not data:  # copied: the file (and its memory map) is no longer needed
        handle.close()
    return Tomogram(
        data=array, voxel_size=voxel_size if voxel_size is not None else header_size, path=path
    )


def read_roi(path: str | os.PathLike, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """A search mask (nonzero = search) that must match the tomogram's shape; memory-mapped.

    The mask keeps its own data type: a float32 copy of an int8 mask would cost
    four times the mask's size in memory.
    """
    roi = read_tomogram(path, mmap=True, keep_dtype=True).data
    if tuple(roi.shape) != tuple(shape_zyx):
        raise VPDetectError(
            f"mask {Path(path).name} is {'x'.join(map(str, roi.shape[::-1]))} voxels (x, y, z) but the "
            f"tomogram is {'x'.join(map(str, tuple(shape_zyx)[::-1]))}"
        )
    check_roi_selects(roi, f"mask {Path(path).name}")
    return roi


def check_roi_selects(roi: np.ndarray, name: str = "mask") -> None:
    """A search mask must select some voxel. Slab by slab, stopping at the first nonzero one, so
    a memory-mapped mask is rarely read through."""
    if not any(np.any(roi[z : z + 16]) for z in range(0, roi.shape[0], 16)):
        raise VPDetectError(f"{name} selects no voxel (it is all zero): nothing would be searched")


def read_mrc_header(path: str | os.PathLike) -> dict:
    """Shape (z, y, x), mode and voxel size of an MRC file, read from the header only."""
    import mrcfile

    path = Path(path)
    if path.suffix.lower() == ZARR_SUFFIX:
        from vpdetect.io.omezarr import omezarr_header

        return omezarr_header(path)
    if not path.exists():
        raise VPDetectError(f"file not found: {path}")
    if path.is_dir():
        raise VPDetectError(f"expected an MRC file, got a directory: {path}")
    try:
        # Permissive, as for reading data (odd machine stamps, extended headers), but
        # silent: a file without the MRC map ID is refused below, one line.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as handle:
                header = handle.header
                shape = (int(header.nz), int(header.ny), int(header.nx))
                info = {"shape": shape, "mode": int(header.mode),
                        "voxel_size": header_voxel_size(handle.voxel_size)}
                is_mrc = bytes(header.map) == b"MAP " and min(shape) > 0
    except (ValueError, OSError) as exc:
        raise VPDetectError(f"cannot read MRC header of {path}: {exc}") from exc
    if not is_mrc:
        raise VPDetectError(f"cannot read MRC header of {path}: not an MRC file, or the file is corrupt")
    return info


def write_mrc(
    path: str | os.PathLike, array: np.ndarray, voxel_size: float | None = None
) -> None:
    """Write a volume atomically. float64 is stored as float32, bool as int8.

    Integer masks keep an integer mode (int8, int16 or uint16) so label values
    survive; labels beyond uint16 (an occupancy mask of > 65535 particles) are
    stored as float32, which holds integers up to 2**24 exactly.
    """
    import mrcfile

    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    elif array.dtype == bool:
        array = array.astype(np.int8)
    elif array.dtype.kind in "iu" and array.dtype not in (np.int8, np.int16, np.uint16):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if -32768 <= low and high <= 32767:
            array = array.astype(np.int16)
        elif 0 <= low and high <= 65535:
            array = array.astype(np.uint16)
        elif -(2**24) <= low and high <= 2**24:
            array = array.astype(np.float32)
        else:
            raise VPDetectError(f"labels out of the range MRC stores exactly (+-2**24) cannot be written to {path}")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as handle:
            handle.set_data(np.ascontiguousarray(array))
            if voxel_size is not None:
                handle.voxel_size = float(voxel_size)
            # mrcfile stamps the creation time into label 0; a fixed label keeps
            # files byte-identical for identical inputs.
            handle.header.label[0] = FIXED_LABEL
            handle.header.nlabl = 1
