"""RELION STAR particle tables.

- `relion4`: `rlnTomoName`, `rlnCoordinateX/Y/Z` in pixels, an `optics` block with
  `rlnTomoTiltSeriesPixelSize` when the voxel size is known.
- `relion5`: `rlnCenteredCoordinateX/Y/ZAngst` (Angstrom from the tomogram centre), an
  `optics` block with the pixel size and a `global` block (the layout of RELION 5's
  tomograms.star) with `rlnTomoSizeX/Y/Z` and `rlnTomoTomogramBinning`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import atomic_path
from vpdetect.io.particles.euler import matrix_to_zxz, relion_matrix, zxz_to_relion
from vpdetect.io.particles.table import (
    ANGLE_COLUMNS,
    DEFAULT_TOMO_NAME,
    ParticleTable,
    TomogramGeometry,
    check_words,
    class_numbers,
    extra_columns,
    one_line,
    text,
)

log = logging.getLogger("vpdetect.io")

# STAR labels vpdetect maps onto canonical columns.
STAR_COORDS_PX = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
STAR_COORDS_ANGST = (
    "rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst",
)
STAR_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
STAR_SUBTOMO_ANGLES = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
STAR_SIZES = ("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ")
STAR_PIXEL = "rlnTomoTiltSeriesPixelSize"
STAR_BINNING = "rlnTomoTomogramBinning"
STAR_RECONSTRUCTED = "rlnTomoReconstructedTomogram"
STAR_MICROGRAPH = "rlnMicrographName"
WARP_SUFFIX = ".tomostar"  # Warp names a tilt series' settings NAME.tomostar
STAR_SCORE = "rlnAutopickFigureOfMerit"
STAR_CLASS_NUMBER = "rlnClassNumber"
# RELION has no label for a class's name; a vpd-prefixed label keeps it readable
# without claiming a RELION meaning (RELION keeps unknown labels as they are).
STAR_CLASS_NAME = "vpdClassName"
STAR_TOMO_PATH = "vpdTomoPath"
# Non-canonical, non-RELION columns are written as `vpd_<name>` and read back without the prefix.
EXTRA_PREFIX = "vpd_"
# Structural labels the writers regenerate; read but not carried through.
STAR_CONSUMED = set(STAR_COORDS_PX + STAR_COORDS_ANGST + STAR_ANGLES + STAR_SUBTOMO_ANGLES) | {
    "rlnTomoName", STAR_SCORE, STAR_CLASS_NUMBER, STAR_CLASS_NAME, STAR_TOMO_PATH,
    "rlnOpticsGroup",
}


def star_blocks(path: Path) -> dict[str, pd.DataFrame]:
    import starfile

    try:
        raw = starfile.read(path, always_dict=True)
    except Exception as exc:  # noqa: BLE001 - starfile/pandas raise many types on bad input
        # The parser's own slips (unpacking None, a missing attribute) say nothing to a user.
        internal = isinstance(exc, (TypeError, AttributeError, IndexError))
        reason = f"malformed STAR syntax ({one_line(exc)})" if internal else one_line(exc)
        raise VPDetectError(f"cannot parse STAR file {path}: {reason}") from None
    blocks: dict[str, pd.DataFrame] = {}
    for name, block in raw.items():
        if isinstance(block, pd.DataFrame):
            repeated = sorted(set(block.columns[block.columns.duplicated()].astype(str)))
            if repeated:
                raise VPDetectError(f"{path}: block data_{name} repeats the label(s) {', '.join(repeated)}")
            blocks[str(name)] = block
        elif isinstance(block, dict):  # a single-row block written as key-value pairs
            blocks[str(name)] = pd.DataFrame({k: [v] for k, v in block.items()})
    return blocks


def _numeric_column(frame: pd.DataFrame, label: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(frame[label], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise VPDetectError(f"{path}: {label} holds values that are not finite numbers")
    return values


def _lookup(meta: pd.DataFrame | None, key: str, label: str, keys: pd.Series, path: Path):
    """Per-particle values of `label` from a metadata block, matched on column `key`."""
    if meta is None or label not in meta.columns:
        return None
    if key in meta.columns:
        mapping = dict(zip(text(meta[key]), meta[label], strict=False))
        wanted = text(keys)
        unknown = sorted(set(wanted) - set(mapping))
        if unknown:
            if len(meta) == 1:
                return np.full(len(keys), meta[label].iloc[0])
            raise VPDetectError(f"{path}: no {label} for {key} {unknown[0]!r}")
        return np.asarray([mapping[k] for k in wanted])
    if len(meta) == 1:
        return np.full(len(keys), meta[label].iloc[0])
    return None


def read_star(
    path: Path, prefer: str | None, voxel_size: float | None, tomo_size, tomograms=None
) -> ParticleTable:
    """Particles of a STAR file; `tomograms` (a TomogramSet of tomograms.star) gives
    each tomogram's size, pixel size and binning, overriding the file's own blocks."""
    blocks = star_blocks(path)
    candidates = [
        (name, frame) for name, frame in blocks.items()
        if set(STAR_COORDS_PX) <= set(frame.columns) or set(STAR_COORDS_ANGST) <= set(frame.columns)
    ]
    if not candidates:
        raise VPDetectError(
            f"{path}: no particle coordinates in any STAR block "
            "(need rlnCoordinateX/Y/Z or rlnCenteredCoordinateX/Y/ZAngst)"
        )
    # RELION names the block `particles`; other tools write an unnamed one.
    name, particles = next(((n, f) for n, f in candidates if n == "particles"), candidates[0])
    particles = particles.reset_index(drop=True)
    n = len(particles)
    optics = blocks.get("optics")
    tomo_meta = next(
        (f for n2, f in blocks.items() if n2 != name and set(STAR_SIZES) <= set(f.columns)), None
    )
    if tomo_meta is None:
        tomo_meta = next(
            (f for n2, f in blocks.items() if n2 != name and STAR_PIXEL in f.columns
             and "rlnTomoName" in f.columns),
            None,
        )

    tomo_names = (
        text(particles["rlnTomoName"]) if "rlnTomoName" in particles.columns
        else pd.Series([DEFAULT_TOMO_NAME] * n)
    )
    if tomograms is not None:
        for tomo in dict.fromkeys(tomo_names):
            tomograms.lookup(tomo)  # every particle's tomogram must be there, by name
        tomo_meta = tomograms.frame()
    groups = (
        text(particles["rlnOpticsGroup"]) if "rlnOpticsGroup" in particles.columns
        else pd.Series(["1"] * n)
    )
    # Pixel size of the tilt series: tomograms.star, else the optics block (per optics
    # group), else the file's tomogram block.
    pixel = None if tomograms is not None else _lookup(optics, "rlnOpticsGroup", STAR_PIXEL, groups, path)
    if pixel is None:
        pixel = _lookup(tomo_meta, "rlnTomoName", STAR_PIXEL, tomo_names, path)
    binning = _lookup(tomo_meta, "rlnTomoName", STAR_BINNING, tomo_names, path)
    binning_known = binning is not None
    binning = np.ones(n) if binning is None else pd.to_numeric(pd.Series(binning), errors="coerce").to_numpy(float)
    if not np.all(np.isfinite(binning) & (binning > 0)):
        raise VPDetectError(f"{path}: {STAR_BINNING} must be positive numbers")
    if pixel is not None:
        pixel = pd.to_numeric(pd.Series(pixel), errors="coerce").to_numpy(float)
        if not np.all(np.isfinite(pixel) & (pixel > 0)):
            raise VPDetectError(f"{path}: {STAR_PIXEL} must be positive numbers")
        bin1_pixel = pixel
        pixel = pixel * binning  # Angstrom per voxel of the (binned) tomogram
    sizes = bin1_sizes = None
    size_columns = [_lookup(tomo_meta, "rlnTomoName", s, tomo_names, path) for s in STAR_SIZES]
    if all(column is not None for column in size_columns):
        sizes = np.stack(
            [pd.to_numeric(pd.Series(column), errors="coerce").to_numpy(float) for column in size_columns],
            axis=1,
        ).reshape(n, 3)
        if not np.all(np.isfinite(sizes) & (sizes > 0)):
            raise VPDetectError(f"{path}: {'/'.join(STAR_SIZES)} must be positive numbers")
        bin1_sizes = sizes
        sizes = sizes / binning[:, None]  # voxels of the binned tomogram

    use_centred = set(STAR_COORDS_ANGST) <= set(particles.columns) and not (
        prefer == "relion4" and set(STAR_COORDS_PX) <= set(particles.columns)
    )
    if use_centred:
        # RELION 5 (ParticleSet::getParticleCoordDecenteredPixel, particle_set.cpp):
        # pixel = centred_A / rlnTomoTiltSeriesPixelSize + tomo_centre, with
        # tomo_centre = (rlnTomoSizeX/2.0, /Y/2.0, /Z/2.0) in tilt-series pixels
        # (TomogramSet::loadTomogram, tomogram_set.cpp: `centre = d3Vector(w0/2.0, h0/2.0, d0/2.0)`).
        # In the binned tomogram both terms divide by the binning, i.e.
        # x_voxel = x_A / voxel_size + size_x / 2 with voxel_size and size_x of that tomogram.
        scale = np.full(n, float(voxel_size)) if voxel_size is not None else pixel
        if scale is None:
            raise VPDetectError(
                f"{path}: centred coordinates need the pixel size ({STAR_PIXEL} "
                "in an optics block, or --pixel-size)"
            )
        if sizes is None:
            if tomo_size is None:
                raise VPDetectError(
                    f"{path}: centred coordinates need the tomogram size "
                    f"({'/'.join(STAR_SIZES)} in a tomogram block, or --tomogram / --tomo-size)"
                )
            sizes = np.tile(np.asarray(tomo_size, dtype=np.float64), (n, 1))
        if not binning_known and n:
            log.info(
                "%s: no %s (no --tomograms-star): taking %s as the tomogram's voxel size (binning 1)",
                path.name, STAR_BINNING, STAR_PIXEL,
            )
        angst = np.stack([_numeric_column(particles, c, path) for c in STAR_COORDS_ANGST], axis=1)
        coords = angst / scale[:, None] + sizes / 2.0
    else:
        coords = np.stack([_numeric_column(particles, c, path) for c in STAR_COORDS_PX], axis=1)
        coords = coords / binning[:, None]

    data = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2]})
    if "rlnTomoName" in particles.columns:
        data["tomo_name"] = tomo_names.to_numpy()
    if STAR_TOMO_PATH in particles.columns:
        data["tomo_path"] = text(particles[STAR_TOMO_PATH]).to_numpy()
    if STAR_CLASS_NAME in particles.columns:
        data["class_name"] = text(particles[STAR_CLASS_NAME]).to_numpy()
    if STAR_CLASS_NUMBER in particles.columns:
        numbers = _numeric_column(particles, STAR_CLASS_NUMBER, path)
        if not np.all(numbers == np.round(numbers)):
            raise VPDetectError(f"{path}: {STAR_CLASS_NUMBER} must hold whole numbers")
        data["class_number"] = numbers.astype(np.int64)
    if STAR_SCORE in particles.columns:
        data["score"] = _numeric_column(particles, STAR_SCORE, path)
    if set(STAR_ANGLES) <= set(particles.columns):
        matrix = relion_matrix(*(_numeric_column(particles, c, path) for c in STAR_ANGLES))
        if set(STAR_SUBTOMO_ANGLES) <= set(particles.columns):
            # RELION 5 subtomogram stacks: the full pose is A_subtomogram @ A_particle.
            sub = relion_matrix(*(_numeric_column(particles, c, path) for c in STAR_SUBTOMO_ANGLES))
            matrix = sub @ matrix
        phi, theta, psi = matrix_to_zxz(matrix)
        data["phi"], data["theta"], data["psi"] = phi, theta, psi
    for column in particles.columns:
        if column in STAR_CONSUMED:
            continue
        target = column[len(EXTRA_PREFIX):] if column.startswith(EXTRA_PREFIX) else column
        if target and target not in data.columns:
            data[target] = particles[column].to_numpy()

    voxel = None
    if pixel is not None and len(pixel) and np.allclose(pixel, pixel[0]):
        voxel = float(pixel[0])
    size_xyz = None
    if sizes is not None and len(sizes) and np.all(sizes == sizes[0]):
        size_xyz = tuple(int(round(v)) for v in sizes[0])
    if n == 0:  # no particle to look metadata up for: take single-row blocks as they are
        voxel, size_xyz = _empty_table_geometry(optics, tomo_meta)
    geometry = {}
    if tomograms is not None:
        geometry = {tomo: tomograms.lookup(tomo) for tomo in dict.fromkeys(tomo_names)}
    elif binning_known and bin1_sizes is not None and pixel is not None:
        # The file's own tomogram block (vpdetect writes one): keep it for writing back exactly.
        paths = _lookup(tomo_meta, "rlnTomoName", STAR_RECONSTRUCTED, tomo_names, path)
        for i in {tomo: i for i, tomo in reversed(list(enumerate(tomo_names)))}.values():
            geometry[tomo_names[i]] = TomogramGeometry(
                size=tuple(float(v) for v in bin1_sizes[i]),  # type: ignore[arg-type]
                pixel_size=float(voxel_size / binning[i] if voxel_size is not None else bin1_pixel[i]),
                binning=float(binning[i]),
                path=(str(paths[i]) or None) if paths is not None else None,
            )
    return ParticleTable(data=data, voxel_size=voxel, tomo_size=size_xyz, geometry=geometry)  # type: ignore[arg-type]


def _empty_table_geometry(optics, tomo_meta) -> tuple[float | None, tuple[int, int, int] | None]:
    def single(frame, label):
        if frame is None or label not in frame.columns or len(frame) != 1:
            return None
        value = pd.to_numeric(frame[label], errors="coerce").iloc[0]
        return float(value) if np.isfinite(value) and value > 0 else None

    binning = single(tomo_meta, STAR_BINNING) or 1.0
    pixel = single(optics, STAR_PIXEL) or single(tomo_meta, STAR_PIXEL)
    sizes = [single(tomo_meta, label) for label in STAR_SIZES]
    size_xyz = None if None in sizes else tuple(int(round(v / binning)) for v in sizes)
    return (pixel * binning if pixel else None), size_xyz  # type: ignore[return-value]



def _geometries(table: ParticleTable, names: list[str], need_size: bool) -> dict[str, TomogramGeometry | None]:
    """Each tomogram's geometry: the table's (tomograms.star), else bin 1 at the table's voxel size."""
    fallback = None
    if table.voxel_size is not None and (table.tomo_size is not None or not need_size):
        fallback = TomogramGeometry.unbinned(table.voxel_size, table.tomo_size or (0, 0, 0))
    return {name: table.geometry.get(name, fallback) for name in names}


def _per_particle(values: dict[str, float], tomo_names: np.ndarray) -> np.ndarray:
    return np.asarray([values[name] for name in tomo_names], dtype=np.float64).reshape(-1)


def _number_or_int(value: float):
    return int(value) if float(value).is_integer() else float(value)


def write_star(
    path: Path, table: ParticleTable, relion5: bool, coords_pixel_size: float | None = None
) -> None:
    """STAR in RELION 5 (centred Angstrom) or RELION 4 (bin-1 pixels) style.

    `coords_pixel_size` writes rlnCoordinateX/Y/Z at that pixel size instead, with
    rlnMicrographName = NAME.tomostar: what Warp's ts_export_particles reads
    (`--coords_angpix`, zero at the first voxel's centre).
    """
    import starfile

    data = table.data
    n = len(data)
    tomo_names = table.tomo_names()
    check_words(tomo_names, "tomogram name")
    unique_names = list(dict.fromkeys(tomo_names.tolist())) or [DEFAULT_TOMO_NAME]
    particles = pd.DataFrame({"rlnTomoName": tomo_names})
    coords = table.coords_xyz()
    blocks: dict[str, pd.DataFrame] = {}
    geometries = _geometries(table, unique_names, need_size=relion5)
    if relion5:
        if any(g is None for g in geometries.values()):
            raise VPDetectError(
                "RELION 5 coordinates need the tomogram size and pixel size "
                "(give --tomogram or --tomograms-star, or --tomo-size and --pixel-size)"
            )
        size = np.asarray([geometries[t].size for t in tomo_names], dtype=np.float64).reshape(n, 3)
        binning = _per_particle({t: g.binning for t, g in geometries.items()}, tomo_names)
        pixel = _per_particle({t: g.pixel_size for t, g in geometries.items()}, tomo_names)
        # Inverse of the reader: centred_A = (x_voxel * binning - size_bin1 / 2) * pixel_bin1.
        centred = (coords * binning[:, None] - size / 2.0) * pixel[:, None]
        for i, label in enumerate(STAR_COORDS_ANGST):
            particles[label] = centred[:, i]
    elif coords_pixel_size is not None:
        voxel = {t: (g.voxel_size if g is not None else None) for t, g in geometries.items()}
        if any(v is None for v in voxel.values()):
            raise VPDetectError("--coords-pixel-size needs the tomogram's voxel size (give --pixel-size)")
        scaled = coords * (_per_particle(voxel, tomo_names) / coords_pixel_size)[:, None]
        for i, label in enumerate(STAR_COORDS_PX):
            particles[label] = scaled[:, i]
        particles[STAR_MICROGRAPH] = [f"{t}{WARP_SUFFIX}" for t in tomo_names]
        geometries = {t: TomogramGeometry((0, 0, 0), float(coords_pixel_size)) for t in unique_names}
    else:
        # RELION 4: bin-1 pixels where the binning is known (else the tomogram's voxels).
        binning = _per_particle({t: g.binning if g is not None else 1.0 for t, g in geometries.items()}, tomo_names)
        for i, label in enumerate(STAR_COORDS_PX):
            particles[label] = coords[:, i] * binning
    if relion5 or (table.geometry and coords_pixel_size is None):
        # The tomograms.star layout, so that the file alone places its particles again.
        rows = [(t, geometries[t]) for t in unique_names if geometries[t] is not None]
        blocks["global"] = pd.DataFrame({
            "rlnTomoName": [t for t, _ in rows],
            STAR_PIXEL: [g.pixel_size for _, g in rows],
            STAR_BINNING: [g.binning for _, g in rows],
            **{label: [_number_or_int(g.size[i]) for _, g in rows] for i, label in enumerate(STAR_SIZES)},
        })
        if any(g.path for _, g in rows):
            blocks["global"][STAR_RECONSTRUCTED] = [g.path or "None" for _, g in rows]
    pixels = {t: g.pixel_size for t, g in geometries.items() if g is not None}
    if len(pixels) == len(geometries):
        # One optics group per tilt-series pixel size (RELION reads the pixel size per group).
        groups = {value: k for k, value in enumerate(dict.fromkeys(pixels.values()), start=1)}
        blocks["optics"] = pd.DataFrame({
            "rlnOpticsGroup": list(groups.values()),
            "rlnOpticsGroupName": [f"opticsGroup{k}" for k in groups.values()],
            STAR_PIXEL: [float(v) for v in groups],
        })
        particles["rlnOpticsGroup"] = np.asarray([groups[pixels[t]] for t in tomo_names], dtype=np.int64)
    if table.has_angles:
        rot, tilt, psi = zxz_to_relion(*(data[c].to_numpy(dtype=np.float64) for c in ANGLE_COLUMNS))
        particles[STAR_ANGLES[0]], particles[STAR_ANGLES[1]], particles[STAR_ANGLES[2]] = rot, tilt, psi
    if "score" in data.columns:
        particles[STAR_SCORE] = data["score"].to_numpy(dtype=np.float64)
    numbers = class_numbers(table)
    if numbers is not None:
        particles[STAR_CLASS_NUMBER] = numbers
    if "class_name" in data.columns:
        check_words(data["class_name"], "class name")
        particles[STAR_CLASS_NAME] = text(data["class_name"]).to_numpy()
    if "tomo_path" in data.columns:
        check_words(data["tomo_path"], "tomogram path")
        particles[STAR_TOMO_PATH] = text(data["tomo_path"]).to_numpy()
    for column in extra_columns(table):
        label = column if column.startswith("rln") else EXTRA_PREFIX + column
        values = data[column]
        if values.dtype == object:
            check_words(values, f"value of column {column}")
        particles[label] = values.to_numpy()
    blocks["particles"] = particles
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, overwrite=True, float_format="%.6f")
