"""Particle tables: one in-memory form, read from and written to STAR, CSV and SHREC text.

Canonical columns of `ParticleTable.data` (see docs/ARCHITECTURE.md):
`x, y, z` (voxels of the tomogram, 0-based, voxel centres at integers), optional
`tomo_name`, `tomo_path`, `class_name`, `class_number` (0 = background/unknown),
`score`, `phi, theta, psi` (ZXZ Euler angles in degrees); other columns are
carried through.

Formats
- `relion4`: STAR, `rlnTomoName`, `rlnCoordinateX/Y/Z` in pixels, an `optics` block
  with `rlnTomoTiltSeriesPixelSize` when the voxel size is known.
- `relion5`: STAR, `rlnCenteredCoordinateX/Y/ZAngst` (Angstrom from the tomogram
  centre), an `optics` block with the pixel size and a `global` block (the layout of
  RELION 5's tomograms.star) with `rlnTomoSizeX/Y/Z` and `rlnTomoTomogramBinning`.
- `csv`: header row, `x,y,z` plus the other columns under their canonical names.
- `shrec`: SHREC `particle_locations.txt`, `CLASS x y z phi theta psi` per line.

Every reader returns a `ParticleTable` or raises `VPDetectError`; nothing else escapes.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import atomic_path, write_text_atomic

FORMATS = ("relion4", "relion5", "csv", "shrec")
ANGLE_COLUMNS = ("phi", "theta", "psi")
# Canonical columns in the order writers put them first.
CANONICAL_ORDER = (
    "x", "y", "z", "tomo_name", "tomo_path", "class_name", "class_number", "score",
    "phi", "theta", "psi",
)
DEFAULT_TOMO_NAME = "tomogram"  # same default as vpdetect.io.mrc.Tomogram.name

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


@dataclass
class ParticleTable:
    """Particles of one or more tomograms: coordinates in voxels plus per-particle columns."""

    data: pd.DataFrame
    voxel_size: float | None = None  # Angstrom
    tomo_size: tuple[int, int, int] | None = None  # (x, y, z) voxels, needed for RELION 5 centring

    def __post_init__(self) -> None:
        missing = [c for c in ("x", "y", "z") if c not in self.data.columns]
        if missing:
            raise VPDetectError(f"particle table lacks coordinate column(s) {', '.join(missing)}")
        if self.tomo_size is not None:
            self.tomo_size = tuple(int(v) for v in self.tomo_size)  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.data)

    def coords_xyz(self) -> np.ndarray:
        """(n, 3) float64 array of x, y, z in voxels."""
        return self.data[["x", "y", "z"]].to_numpy(dtype=np.float64)

    @property
    def has_angles(self) -> bool:
        return all(c in self.data.columns for c in ANGLE_COLUMNS)

    def class_labels(self) -> list[str] | None:
        """Per-particle class as text: `class_name`, else `class_number` as text, else None."""
        if "class_name" in self.data.columns:
            return [str(v) for v in self.data["class_name"]]
        if "class_number" in self.data.columns:
            return [str(int(v)) for v in self.data["class_number"]]
        return None

    def copy(self) -> ParticleTable:
        return ParticleTable(self.data.copy(), self.voxel_size, self.tomo_size)

    @classmethod
    def from_arrays(
        cls,
        coords_xyz,
        *,
        voxel_size: float | None = None,
        tomo_size: tuple[int, int, int] | None = None,
        **columns,
    ) -> ParticleTable:
        """Build a table from an (n, 3) x, y, z array and per-particle columns (None ones skipped)."""
        coords = np.asarray(coords_xyz, dtype=np.float64).reshape(-1, 3)
        data = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2]})
        for name, values in columns.items():
            if values is None:
                continue
            if np.ndim(values) == 0:
                data[name] = [values] * len(data)
            else:
                if len(values) != len(data):
                    raise VPDetectError(
                        f"column {name} has {len(values)} values for {len(data)} particles"
                    )
                data[name] = list(values) if isinstance(values, (list, tuple)) else np.asarray(values)
        return cls(data=data, voxel_size=voxel_size, tomo_size=tomo_size)


# --------------------------------------------------------------------------- Euler angles
# vpdetect's angles (SHREC convention, columns phi/theta/psi) are ZXZ in degrees and
# describe the active rotation R = Rz(phi) Rx(theta) Rz(psi) that turns the reference
# structure into its pose in the tomogram (x, y, z axes of the tomogram, right-handed,
# counter-clockwise positive).
#
# RELION's rot/tilt/psi give A = Euler_angles2matrix(rot, tilt, psi), which equals
# (Rz(rot) Ry(tilt) Rz(psi))^T (RELION's passive form; checked against
# src/jaz/math/Euler_angles_relion.h anglesToMatrix3, the same matrix as
# src/euler.cpp). ParticleSet::getMatrix4x4 (src/jaz/tomography/particle_set.cpp)
# "maps coordinates from particle space to tomogram space" with A, so A is our R.
# Hence Rz(rot) Ry(tilt) Rz(psi) = R^T; conversions go through that matrix.


def _rz(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, i = np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([c, -s, o], -1), np.stack([s, c, o], -1), np.stack([o, o, i], -1)], -2)


def _rx(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, i = np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([i, o, o], -1), np.stack([o, c, -s], -1), np.stack([o, s, c], -1)], -2)


def _ry(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, i = np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([c, o, s], -1), np.stack([o, i, o], -1), np.stack([-s, o, c], -1)], -2)


def zxz_matrix(phi, theta, psi) -> np.ndarray:
    """Active rotation matrices Rz(phi) Rx(theta) Rz(psi) for angles in degrees, shape (..., 3, 3)."""
    p, t, s = (np.radians(np.asarray(v, dtype=np.float64)) for v in (phi, theta, psi))
    return _rz(p) @ _rx(t) @ _rz(s)


def relion_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's A = Euler_angles2matrix(rot, tilt, psi) = (Rz(rot) Ry(tilt) Rz(psi))^T."""
    r, t, s = (np.radians(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi))
    return np.swapaxes(_rz(r) @ _ry(t) @ _rz(s), -1, -2)


# Below this sin(middle angle) the first and last axes coincide (gimbal lock).
_GIMBAL_EPS = 1e-9


def _zxz_angles(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angles (degrees) with Rz(a) Rx(b) Rz(c) = m; b in [0, 180]."""
    b = np.arccos(np.clip(m[..., 2, 2], -1.0, 1.0))
    locked = np.abs(np.sin(b)) < _GIMBAL_EPS
    a = np.where(locked, np.arctan2(m[..., 1, 0], m[..., 0, 0]), np.arctan2(m[..., 0, 2], -m[..., 1, 2]))
    c = np.where(locked, 0.0, np.arctan2(m[..., 2, 0], m[..., 2, 1]))
    return np.degrees(a), np.degrees(b), np.degrees(c)


def _zyz_angles(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angles (degrees) with Rz(a) Ry(b) Rz(c) = m; b in [0, 180]."""
    b = np.arccos(np.clip(m[..., 2, 2], -1.0, 1.0))
    locked = np.abs(np.sin(b)) < _GIMBAL_EPS
    a = np.where(locked, np.arctan2(-m[..., 0, 1], m[..., 1, 1]), np.arctan2(m[..., 1, 2], m[..., 0, 2]))
    c = np.where(locked, 0.0, np.arctan2(m[..., 2, 1], -m[..., 2, 0]))
    return np.degrees(a), np.degrees(b), np.degrees(c)


def zxz_to_relion(phi, theta, psi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vpdetect ZXZ angles -> RELION (rot, tilt, psi) describing the same rotation."""
    active = zxz_matrix(phi, theta, psi)
    return _zyz_angles(np.swapaxes(active, -1, -2))


def relion_to_zxz(rot, tilt, psi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION (rot, tilt, psi) -> vpdetect ZXZ angles describing the same rotation."""
    return _zxz_angles(relion_matrix(rot, tilt, psi))


# --------------------------------------------------------------------------- format choice


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
        by_suffix = {".star": "relion4", ".csv": "csv", ".txt": "shrec"}
        if suffix not in by_suffix:
            raise VPDetectError(
                f"cannot tell the output format of {path.name} from its extension; "
                f"use .star, .csv or .txt, or name one of {', '.join(FORMATS)}"
            )
        return by_suffix[suffix]
    if suffix == ".star":
        return "star"
    if suffix == ".csv":
        return "csv"
    return _sniff_text(path)


def check_format(fmt: str | None) -> str | None:
    """A format name, checked and lower-cased (None stays None)."""
    if fmt is None:
        return None
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise VPDetectError(f"unknown particle format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


# --------------------------------------------------------------------------- reading


def read_particles(
    path: str | os.PathLike,
    fmt: str | None = None,
    voxel_size: float | None = None,
    tomo_size: tuple[int, int, int] | None = None,
) -> ParticleTable:
    """Read a particle table; `fmt` (relion4|relion5|csv|shrec) forces the format.

    `voxel_size` (Angstrom) overrides the file's pixel size (and is what centred
    Angstrom coordinates are divided by). `tomo_size` (x, y, z) is used when the
    file does not carry one; a file whose size differs from it is refused.
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
        table = _read_star(path, prefer=fmt, voxel_size=voxel_size, tomo_size=tomo_size)
    elif kind == "csv":
        table = _read_csv(path)
    else:
        table = _read_shrec(path)
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


def _text(values: pd.Series) -> pd.Series:
    """Values as Python strings, a missing value as "" (pandas 3's astype(str) keeps NaN)."""
    def one(value) -> str:
        missing = value is None or value is pd.NA or (isinstance(value, float | np.floating) and np.isnan(value))
        return "" if missing else str(value)

    return values.map(one)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


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


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VPDetectError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise VPDetectError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_shrec(path: Path) -> ParticleTable:
    names: list[str] = []
    rows: list[list[float]] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if not 4 <= len(fields) <= 7:
            raise VPDetectError(
                f"{path}, line {number}: expected 'CLASS x y z [phi theta psi]', got {len(fields)} fields"
            )
        try:
            numbers = [float(v) for v in fields[1:]]
        except ValueError as exc:
            raise VPDetectError(f"{path}, line {number}: {_one_line(exc)}") from None
        if not np.all(np.isfinite(numbers)):
            raise VPDetectError(f"{path}, line {number}: coordinates and angles must be finite numbers")
        names.append(fields[0])
        rows.append(numbers + [np.nan] * (6 - len(numbers)))
    values = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    data = pd.DataFrame(
        {"x": values[:, 0], "y": values[:, 1], "z": values[:, 2], "class_name": names}
    )
    angles = values[:, 3:]
    if len(values) and np.isfinite(angles).all():
        for i, name in enumerate(ANGLE_COLUMNS):
            data[name] = angles[:, i]
    return ParticleTable(data=data)


def _read_csv(path: Path) -> ParticleTable:
    text = _read_text(path)
    try:
        data = pd.read_csv(io.StringIO(text), comment="#", skipinitialspace=True)
    except Exception as exc:  # noqa: BLE001 - pandas raises many types; all mean "bad CSV"
        raise VPDetectError(f"cannot parse CSV file {path}: {_one_line(exc)}") from None
    _check_csv_header(text, path)
    data.columns = [str(c).strip() for c in data.columns]
    lower = {c.lower(): c for c in data.columns}
    missing = [c for c in ("x", "y", "z") if c not in lower]
    if missing:
        raise VPDetectError(
            f"{path}: CSV header lacks coordinate column(s) {', '.join(missing)} (need x, y, z)"
        )
    data = data.rename(columns={lower[c]: c for c in ("x", "y", "z")})
    for column in ("x", "y", "z", "score", "phi", "theta", "psi"):
        if column in data.columns:
            numeric = pd.to_numeric(data[column], errors="coerce")
            if numeric.isna().any() and column in ("x", "y", "z"):
                row = int(np.argmax(numeric.isna().to_numpy()))
                raise VPDetectError(f"{path}: column {column}, row {row + 1} is not a number")
            data[column] = numeric
    if "class_number" in data.columns:
        numeric = pd.to_numeric(data["class_number"], errors="coerce")
        if numeric.isna().any() or not np.all(numeric == np.round(numeric)):
            raise VPDetectError(f"{path}: column class_number must hold whole numbers")
        data["class_number"] = numeric.astype(np.int64)
    for column in ("class_name", "tomo_name", "tomo_path"):
        if column in data.columns:
            data[column] = _text(data[column])
    return ParticleTable(data=data)


def _check_csv_header(text: str, path: Path) -> None:
    """Refuse a header naming a column twice (pandas would silently rename the second `x.1`)."""
    try:
        header = pd.read_csv(
            io.StringIO(text), comment="#", skipinitialspace=True, header=None, nrows=1, dtype=str,
            keep_default_na=False,
        )
    except Exception as exc:  # noqa: BLE001 - pandas raises many types; all mean "bad CSV"
        raise VPDetectError(f"cannot parse CSV header of {path}: {_one_line(exc)}") from None
    seen: set[str] = set()
    for cell in header.iloc[0] if len(header) else []:
        name = str(cell).strip().lower()
        if name in seen:
            raise VPDetectError(f"{path}: CSV header repeats column {name}")
        seen.add(name)


def _star_blocks(path: Path) -> dict[str, pd.DataFrame]:
    import starfile

    try:
        raw = starfile.read(path, always_dict=True)
    except Exception as exc:  # noqa: BLE001 - starfile/pandas raise many types on bad input
        raise VPDetectError(f"cannot parse STAR file {path}: {_one_line(exc)}") from None
    blocks: dict[str, pd.DataFrame] = {}
    for name, block in raw.items():
        if isinstance(block, pd.DataFrame):
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
        mapping = dict(zip(_text(meta[key]), meta[label], strict=False))
        wanted = _text(keys)
        unknown = sorted(set(wanted) - set(mapping))
        if unknown:
            if len(meta) == 1:
                return np.full(len(keys), meta[label].iloc[0])
            raise VPDetectError(f"{path}: no {label} for {key} {unknown[0]!r}")
        return np.asarray([mapping[k] for k in wanted])
    if len(meta) == 1:
        return np.full(len(keys), meta[label].iloc[0])
    return None


def _read_star(
    path: Path, prefer: str | None, voxel_size: float | None, tomo_size
) -> ParticleTable:
    blocks = _star_blocks(path)
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
        _text(particles["rlnTomoName"]) if "rlnTomoName" in particles.columns
        else pd.Series([DEFAULT_TOMO_NAME] * n)
    )
    groups = (
        _text(particles["rlnOpticsGroup"]) if "rlnOpticsGroup" in particles.columns
        else pd.Series(["1"] * n)
    )
    # Pixel size of the tilt series: optics block (per optics group), else the tomogram block.
    pixel = _lookup(optics, "rlnOpticsGroup", STAR_PIXEL, groups, path)
    if pixel is None:
        pixel = _lookup(tomo_meta, "rlnTomoName", STAR_PIXEL, tomo_names, path)
    binning = _lookup(tomo_meta, "rlnTomoName", STAR_BINNING, tomo_names, path)
    binning = np.ones(n) if binning is None else pd.to_numeric(pd.Series(binning), errors="coerce").to_numpy(float)
    if not np.all(np.isfinite(binning) & (binning > 0)):
        raise VPDetectError(f"{path}: {STAR_BINNING} must be positive numbers")
    if pixel is not None:
        pixel = pd.to_numeric(pd.Series(pixel), errors="coerce").to_numpy(float)
        if not np.all(np.isfinite(pixel) & (pixel > 0)):
            raise VPDetectError(f"{path}: {STAR_PIXEL} must be positive numbers")
        pixel = pixel * binning  # Angstrom per voxel of the (binned) tomogram
    sizes = None
    size_columns = [_lookup(tomo_meta, "rlnTomoName", s, tomo_names, path) for s in STAR_SIZES]
    if all(column is not None for column in size_columns):
        sizes = np.stack(
            [pd.to_numeric(pd.Series(column), errors="coerce").to_numpy(float) for column in size_columns],
            axis=1,
        ).reshape(n, 3)
        if not np.all(np.isfinite(sizes) & (sizes > 0)):
            raise VPDetectError(f"{path}: {'/'.join(STAR_SIZES)} must be positive numbers")
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
        angst = np.stack([_numeric_column(particles, c, path) for c in STAR_COORDS_ANGST], axis=1)
        coords = angst / scale[:, None] + sizes / 2.0
    else:
        coords = np.stack([_numeric_column(particles, c, path) for c in STAR_COORDS_PX], axis=1)
        coords = coords / binning[:, None]

    data = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2]})
    if "rlnTomoName" in particles.columns:
        data["tomo_name"] = tomo_names.to_numpy()
    if STAR_TOMO_PATH in particles.columns:
        data["tomo_path"] = _text(particles[STAR_TOMO_PATH]).to_numpy()
    if STAR_CLASS_NAME in particles.columns:
        data["class_name"] = _text(particles[STAR_CLASS_NAME]).to_numpy()
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
        phi, theta, psi = _zxz_angles(matrix)
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
    return ParticleTable(data=data, voxel_size=voxel, tomo_size=size_xyz)  # type: ignore[arg-type]


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


# --------------------------------------------------------------------------- writing


def class_numbers(table: ParticleTable) -> np.ndarray | None:
    """`class_number`, or numbers 1.. given to class names in order of first appearance."""
    if "class_number" in table.data.columns:
        return table.data["class_number"].to_numpy(dtype=np.int64)
    if "class_name" in table.data.columns:
        names = _text(table.data["class_name"]).tolist()
        order: dict[str, int] = {}
        for name in names:
            order.setdefault(name, len(order) + 1)
        return np.asarray([order[name] for name in names], dtype=np.int64)
    return None


def _check_words(values, what: str) -> None:
    for value in values:
        text = str(value)
        if not text or any(ch.isspace() for ch in text):
            raise VPDetectError(f"{what} {text!r} is empty or contains whitespace; the format needs one word")


def _extra_columns(table: ParticleTable) -> list[str]:
    return [c for c in table.data.columns if c not in CANONICAL_ORDER]


def write_particles(path: str | os.PathLike, table: ParticleTable, fmt: str | None = None) -> str:
    """Write `table` atomically; `fmt` None = from the extension. Returns the format written."""
    path = Path(path)
    fmt = check_format(fmt) or detect_format(path, for_writing=True)
    if fmt == "csv":
        _write_csv(path, table)
    elif fmt == "shrec":
        _write_shrec(path, table)
    else:
        _write_star(path, table, relion5=(fmt == "relion5"))
    return fmt


def _format_number(value: float) -> str:
    # Six decimals are 1e-6 voxel: finer than any picker, short enough to read.
    return np.format_float_positional(float(value), precision=6, trim="-")


def _write_shrec(path: Path, table: ParticleTable) -> None:
    data = table.data
    if "class_name" in data.columns:
        classes = _text(data["class_name"]).tolist()
    elif "class_number" in data.columns:
        classes = [str(int(v)) for v in data["class_number"]]
    else:
        classes = ["particle"] * len(data)  # SHREC lines need a class word
    _check_words(classes, "class name")
    # SHREC lines carry three angles; unknown orientations are written as 0 0 0.
    angles = (
        data[list(ANGLE_COLUMNS)].to_numpy(dtype=np.float64) if table.has_angles
        else np.zeros((len(data), 3))
    )
    coords = table.coords_xyz()
    lines = [
        " ".join([name] + [_format_number(v) for v in (*xyz, *ang)])
        for name, xyz, ang in zip(classes, coords, angles, strict=True)
    ]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def _write_csv(path: Path, table: ParticleTable) -> None:
    columns = [c for c in CANONICAL_ORDER if c in table.data.columns] + _extra_columns(table)
    with atomic_path(path) as tmp:
        table.data[columns].to_csv(tmp, index=False, float_format="%.6f")


def _write_star(path: Path, table: ParticleTable, relion5: bool) -> None:
    import starfile

    data = table.data
    n = len(data)
    tomo_names = (
        _text(data["tomo_name"]).to_numpy() if "tomo_name" in data.columns
        else np.asarray([DEFAULT_TOMO_NAME] * n)
    )
    _check_words(tomo_names, "tomogram name")
    voxel = table.voxel_size
    particles = pd.DataFrame({"rlnTomoName": tomo_names})
    coords = table.coords_xyz()
    blocks: dict[str, pd.DataFrame] = {}
    if relion5:
        if voxel is None or table.tomo_size is None:
            raise VPDetectError(
                "RELION 5 coordinates need the tomogram size and pixel size "
                "(give --tomogram, or --tomo-size and --pixel-size)"
            )
        size = np.asarray(table.tomo_size, dtype=np.float64)
        # Inverse of the reader: centred_A = (x_voxel - size/2) * voxel_size (RELION's centre = size/2).
        centred = (coords - size / 2.0) * voxel
        for i, label in enumerate(STAR_COORDS_ANGST):
            particles[label] = centred[:, i]
        unique_names = list(dict.fromkeys(tomo_names.tolist())) or [DEFAULT_TOMO_NAME]
        blocks["global"] = pd.DataFrame({
            "rlnTomoName": unique_names,
            STAR_PIXEL: [float(voxel)] * len(unique_names),
            STAR_BINNING: [1.0] * len(unique_names),
            **{label: [int(v)] * len(unique_names) for label, v in zip(STAR_SIZES, table.tomo_size, strict=True)},
        })
    else:
        for i, label in enumerate(STAR_COORDS_PX):
            particles[label] = coords[:, i]
    if voxel is not None:
        blocks["optics"] = pd.DataFrame({
            "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], STAR_PIXEL: [float(voxel)],
        })
        particles["rlnOpticsGroup"] = np.ones(n, dtype=np.int64)
    if table.has_angles:
        rot, tilt, psi = zxz_to_relion(*(data[c].to_numpy(dtype=np.float64) for c in ANGLE_COLUMNS))
        particles[STAR_ANGLES[0]], particles[STAR_ANGLES[1]], particles[STAR_ANGLES[2]] = rot, tilt, psi
    if "score" in data.columns:
        particles[STAR_SCORE] = data["score"].to_numpy(dtype=np.float64)
    numbers = class_numbers(table)
    if numbers is not None:
        particles[STAR_CLASS_NUMBER] = numbers
    if "class_name" in data.columns:
        _check_words(data["class_name"], "class name")
        particles[STAR_CLASS_NAME] = _text(data["class_name"]).to_numpy()
    if "tomo_path" in data.columns:
        _check_words(data["tomo_path"], "tomogram path")
        particles[STAR_TOMO_PATH] = _text(data["tomo_path"]).to_numpy()
    for column in _extra_columns(table):
        label = column if column.startswith("rln") else EXTRA_PREFIX + column
        values = data[column]
        if values.dtype == object:
            _check_words(values, f"value of column {column}")
        particles[label] = values.to_numpy()
    blocks["particles"] = particles
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, overwrite=True, float_format="%.6f")
