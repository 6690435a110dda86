"""RELION 5 tomograms.star: where each tomogram's voxels sit in RELION's frame.

One row per tomogram in block `global`: rlnTomoName, rlnTomoSizeX/Y/Z (bin-1
pixels), rlnTomoTiltSeriesPixelSize (bin-1 pixel size, Angstrom),
rlnTomoTomogramBinning (tomogram voxel / tilt-series pixel, may be non-integer)
and, once reconstructed, rlnTomoReconstructedTomogram (a path relative to the
RELION project folder).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.particles.table import ParticleTable, TomogramGeometry, text

log = logging.getLogger("vpdetect.io")

SIZE_LABELS = ("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ")
PIXEL_LABEL = "rlnTomoTiltSeriesPixelSize"
BINNING_LABEL = "rlnTomoTomogramBinning"
PATH_LABEL = "rlnTomoReconstructedTomogram"
# How far (relative) a tomogram header's voxel size may be from tomograms.star's.
VOXEL_TOLERANCE = 0.01


@dataclass(frozen=True)
class TomogramSet:
    """The tomograms of one tomograms.star, by rlnTomoName."""

    geometry: dict[str, TomogramGeometry]
    source: Path | None = None
    # Folders a relative rlnTomoReconstructedTomogram may be relative to.
    search_dirs: tuple[Path, ...] = field(default=())

    def names(self) -> list[str]:
        return list(self.geometry)

    def lookup(self, name: str) -> TomogramGeometry:
        if name not in self.geometry:
            raise VPDetectError(
                f"tomogram {name!r} is not in {self.source or 'tomograms.star'} "
                f"(it has {', '.join(self.names()[:5])}{', ...' if len(self.geometry) > 5 else ''})"
            )
        return self.geometry[name]

    def match(self, name: str, tomogram_path: str | os.PathLike | None = None) -> str:
        """The rlnTomoName of a tomogram file: its own name, else the row whose
        rlnTomoReconstructedTomogram is that file."""
        if name in self.geometry:
            return name
        if tomogram_path is not None:
            wanted = Path(tomogram_path)
            for row_name in self.geometry:
                found = self.tomogram_path(row_name)
                if found is not None and found.resolve() == wanted.resolve():
                    return row_name
            same_file_name = [
                row for row, g in self.geometry.items() if g.path and Path(g.path).name == wanted.name
            ]
            if len(same_file_name) == 1:
                return same_file_name[0]
        self.lookup(name)  # raises the one-line error
        return name

    def tomogram_path(self, name: str) -> Path | None:
        """The reconstructed tomogram of `name` where it exists on disk, else None."""
        recorded = self.geometry[name].path if name in self.geometry else None
        if not recorded:
            return None
        path = Path(recorded)
        candidates = [path] if path.is_absolute() else [path, *(d / path for d in self.search_dirs)]
        return next((c for c in candidates if c.is_file()), None)

    def frame(self) -> pd.DataFrame:
        """The set in tomograms.star's layout (block `global`)."""
        rows = list(self.geometry.items())
        frame = pd.DataFrame({
            "rlnTomoName": [name for name, _ in rows],
            PIXEL_LABEL: [g.pixel_size for _, g in rows],
            BINNING_LABEL: [g.binning for _, g in rows],
            **{label: [g.size[i] for _, g in rows] for i, label in enumerate(SIZE_LABELS)},
        })
        if any(g.path for _, g in rows):
            frame[PATH_LABEL] = [g.path or "" for _, g in rows]
        return frame


def geometry_from_frame(frame: pd.DataFrame, where: str) -> dict[str, TomogramGeometry]:
    """Per-tomogram geometry of a block in tomograms.star's layout (refuses bad values)."""
    missing = [c for c in ("rlnTomoName", *SIZE_LABELS, PIXEL_LABEL) if c not in frame.columns]
    if missing:
        raise VPDetectError(f"{where}: tomogram block lacks {', '.join(missing)}")

    def numbers(label: str, default: float | None = None) -> np.ndarray:
        if label not in frame.columns:
            return np.full(len(frame), default, dtype=np.float64)
        values = pd.to_numeric(frame[label], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(values) & (values > 0)):
            raise VPDetectError(f"{where}: {label} must hold positive numbers")
        return values

    names = text(frame["rlnTomoName"]).tolist()
    if any(not n for n in names):
        raise VPDetectError(f"{where}: a row has an empty rlnTomoName")
    if len(set(names)) != len(names):
        raise VPDetectError(f"{where}: rlnTomoName {next(n for n in names if names.count(n) > 1)!r} repeats")
    sizes = np.stack([numbers(label) for label in SIZE_LABELS], axis=1)
    pixel = numbers(PIXEL_LABEL)
    binning = numbers(BINNING_LABEL, 1.0)
    paths = text(frame[PATH_LABEL]).tolist() if PATH_LABEL in frame.columns else [""] * len(frame)
    return {
        name: TomogramGeometry(
            size=tuple(float(v) for v in sizes[i]), pixel_size=float(pixel[i]),  # type: ignore[arg-type]
            binning=float(binning[i]), path=paths[i] or None,
        )
        for i, name in enumerate(names)
    }


def read_tomograms_star(path: str | os.PathLike) -> TomogramSet:
    """A RELION 5 tomograms.star (block `global`, or the one block holding rlnTomoSizeX)."""
    from vpdetect.io.particles.relion import star_blocks

    path = Path(path)
    if not path.is_file():
        raise VPDetectError(f"tomograms.star not found: {path}")
    blocks = star_blocks(path)
    frame = blocks.get("global")
    if frame is None or SIZE_LABELS[0] not in frame.columns:
        frame = next((f for f in blocks.values() if SIZE_LABELS[0] in f.columns), None)
    if frame is None:
        raise VPDetectError(f"{path}: no tomogram table (block global with rlnTomoName, rlnTomoSizeX/Y/Z)")
    if BINNING_LABEL not in frame.columns:
        log.warning("%s has no %s: taking the tomograms as unbinned (binning 1)", path, BINNING_LABEL)
    geometry = geometry_from_frame(frame, str(path))
    if not geometry:
        raise VPDetectError(f"{path}: holds no tomograms")
    # RELION writes paths relative to its project folder, which holds Tomograms/jobNNN/.
    parents = path.resolve().parents
    return TomogramSet(geometry=geometry, source=path, search_dirs=tuple(parents[:4]))


def check_tomogram_header(
    name: str, geometry: TomogramGeometry, shape_xyz, voxel_size: float | None, what: str
) -> None:
    """Refuse a tomogram whose header disagrees with its geometry: its particles would be misplaced."""
    expected = np.asarray(geometry.size, dtype=np.float64) / geometry.binning
    shape = np.asarray(shape_xyz, dtype=np.float64)
    # RELION's reconstructed size is the bin-1 size over the binning, rounded either way.
    if np.any(np.abs(shape - expected) > 1.0):
        raise VPDetectError(
            f"{what}: tomogram {name!r} is {tuple(int(v) for v in shape)} voxels but its "
            f"rlnTomoSizeX/Y/Z {tuple(geometry.size)} / binning {geometry.binning:g} give "
            f"{tuple(round(float(v), 1) for v in expected)}"
        )
    if voxel_size is not None and abs(voxel_size - geometry.voxel_size) > VOXEL_TOLERANCE * geometry.voxel_size:
        raise VPDetectError(
            f"{what}: tomogram {name!r} has {voxel_size:g} A voxels but rlnTomoTiltSeriesPixelSize "
            f"{geometry.pixel_size:g} x binning {geometry.binning:g} = {geometry.voxel_size:g} A"
        )


def assign_tomogram(
    table: ParticleTable, tomograms: TomogramSet, name: str, tomogram_path, shape_xyz, voxel_size
) -> ParticleTable:
    """The particles of one tomogram file, named and placed as tomograms.star says."""
    row = tomograms.match(name, tomogram_path)
    geometry = tomograms.lookup(row)
    check_tomogram_header(row, geometry, shape_xyz, voxel_size, str(tomogram_path or name))
    out = table.copy()
    out.data["tomo_name"] = row
    out.geometry = {row: geometry}
    out.voxel_size = geometry.voxel_size
    return out


def check_table_against_tomogram(
    table: ParticleTable, name: str, shape_xyz, voxel_size: float | None, what: str
) -> None:
    """Refuse a table whose pixel size (or RELION 5 geometry) disagrees with the tomogram's
    header: its voxel coordinates would land in the wrong place."""
    if name in table.geometry:
        check_tomogram_header(name, table.geometry[name], shape_xyz, voxel_size, what)
        return
    if table.voxel_size is not None and voxel_size is not None and (
        abs(table.voxel_size - voxel_size) > VOXEL_TOLERANCE * voxel_size
    ):
        raise VPDetectError(
            f"{what}: the table's pixel size {table.voxel_size:g} A differs from tomogram {name!r}'s "
            f"{voxel_size:g} A; for binned tomograms give --tomograms-star, else --pixel-size"
        )
