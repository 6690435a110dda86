"""Choosing a format, and the two entry points: `read_particles` and `write_particles`.

Every reader returns a `ParticleTable` or raises `VPDetectError`; nothing else escapes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.particles.csv_table import read_csv, write_csv
from vpdetect.io.particles.dynamo import read_dynamo, write_dynamo
from vpdetect.io.particles.imod import read_imod, write_imod
from vpdetect.io.particles.relion import read_star, write_star
from vpdetect.io.particles.shrec_list import read_shrec, write_shrec
from vpdetect.io.particles.table import ParticleTable

FORMATS = ("relion4", "relion5", "csv", "shrec", "dynamo", "imod")
# Formats known by their extension alone (Dynamo tables are text, IMOD models binary).
BINARY_SUFFIXES = {".tbl": "dynamo", ".mod": "imod"}


def _sniff_text(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            head = handle.read(8192).decode("utf-8", errors="replace")
    except OSError as exc:
        raise VPDetectError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if re.search(r"^\s*data_", head, flags=re.MULTILINE):
        return "star"
    first = next((ln for ln in head.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    return "csv" if "," in first else "shrec"


def detect_format(path: str | os.PathLike, for_writing: bool = False) -> str:
    """Format name from the extension (and, when reading, the content).

    `.star` is written RELION 4 style: RELION 5 still reads rlnCoordinateX/Y/Z
    (ParticleSet::getParticleCoordDecenteredPixel falls back to them) and it needs
    no tomogram size; `--to relion5` writes centred Angstrom coordinates.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if for_writing:
        by_suffix = {".star": "relion4", ".csv": "csv", ".txt": "shrec", **BINARY_SUFFIXES}
        if suffix not in by_suffix:
            raise VPDetectError(
                f"cannot tell the output format of {path.name} from its extension; "
                f"use .star, .csv, .txt, .tbl or .mod, or name one of {', '.join(FORMATS)}"
            )
        return by_suffix[suffix]
    if suffix == ".star":
        return "star"
    if suffix == ".csv":
        return "csv"
    if suffix in BINARY_SUFFIXES:
        return BINARY_SUFFIXES[suffix]
    return _sniff_text(path)


def check_format(fmt: str | None) -> str | None:
    """A format name, checked and lower-cased (None stays None)."""
    if fmt is None:
        return None
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise VPDetectError(f"unknown particle format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def read_particles(
    path: str | os.PathLike,
    fmt: str | None = None,
    voxel_size: float | None = None,
    tomo_size: tuple[int, int, int] | None = None,
    tomograms=None,
) -> ParticleTable:
    """Read a particle table; `fmt` (one of FORMATS) forces the format.

    `voxel_size` (Angstrom) overrides the file's pixel size (and is what centred
    Angstrom coordinates are divided by). `tomo_size` (x, y, z) is used when the
    file does not carry one; a file whose size differs from it is refused.
    `tomograms` (a `TomogramSet` read from RELION 5's tomograms.star) gives every
    tomogram's bin-1 size, pixel size and binning.
    """
    path = Path(path)
    fmt = check_format(fmt)
    if not path.exists():
        raise VPDetectError(f"file not found: {path}")
    if path.is_dir():
        raise VPDetectError(f"expected a particle file, got a directory: {path}")
    if voxel_size is not None and not (np.isfinite(voxel_size) and voxel_size > 0):
        raise VPDetectError(f"pixel size must be a positive number, got {voxel_size}")
    kind = fmt if fmt is not None else detect_format(path)
    if kind in ("relion4", "relion5", "star"):
        table = read_star(path, prefer=fmt, voxel_size=voxel_size, tomo_size=tomo_size, tomograms=tomograms)
    elif kind == "csv":
        table = read_csv(path)
    elif kind == "dynamo":
        table = read_dynamo(path)
    elif kind == "imod":
        table = read_imod(path)
    else:
        table = read_shrec(path)
    if voxel_size is not None:
        table.voxel_size = float(voxel_size)
    if tomo_size is not None:
        given = tuple(int(v) for v in tomo_size)
        if table.tomo_size is not None and table.tomo_size != given:
            raise VPDetectError(
                f"{path}: tomogram size in the file {table.tomo_size} differs from the given {given}"
            )
        table.tomo_size = given  # type: ignore[assignment]
    _check_coordinates(table, path)
    return table


def _check_coordinates(table: ParticleTable, path: Path) -> None:
    coords = table.data[["x", "y", "z"]]
    for column in ("x", "y", "z"):
        values = pd.to_numeric(coords[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argmax(bad))
            raise VPDetectError(
                f"{path}: coordinate {column} of particle {row + 1} is not a finite number"
            )
        table.data[column] = values


def write_particles(
    path: str | os.PathLike, table: ParticleTable, fmt: str | None = None,
    coords_pixel_size: float | None = None,
) -> str:
    """Write `table` atomically; `fmt` None = from the extension. Returns the format written.

    `coords_pixel_size` (Angstrom; RELION 4 style only) writes the coordinates at that
    pixel size with rlnMicrographName, for Warp's ts_export_particles.
    """
    path = Path(path)
    fmt = check_format(fmt) or detect_format(path, for_writing=True)
    if coords_pixel_size is not None:
        if not (np.isfinite(coords_pixel_size) and coords_pixel_size > 0):
            raise VPDetectError(f"--coords-pixel-size must be a positive number, got {coords_pixel_size}")
        if fmt != "relion4":
            raise VPDetectError(f"--coords-pixel-size applies to relion4 output, not {fmt}")
    if fmt == "csv":
        write_csv(path, table)
    elif fmt == "shrec":
        write_shrec(path, table)
    elif fmt == "dynamo":
        write_dynamo(path, table)
    elif fmt == "imod":
        write_imod(path, table)
    else:
        write_star(path, table, relion5=(fmt == "relion5"), coords_pixel_size=coords_pixel_size)
    return fmt
