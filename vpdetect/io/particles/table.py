"""The in-memory particle table every format reads into and writes from, and the
small helpers the format modules share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError

ANGLE_COLUMNS = ("phi", "theta", "psi")
# Canonical columns in the order writers put them first.
CANONICAL_ORDER = (
    "x", "y", "z", "tomo_name", "tomo_path", "class_name", "class_number", "score",
    "phi", "theta", "psi",
)
DEFAULT_TOMO_NAME = "tomogram"  # same default as vpdetect.io.mrc.Tomogram.name


@dataclass(frozen=True)
class TomogramGeometry:
    """Where a tomogram's voxels sit in RELION 5's frame (one row of tomograms.star).

    `size` is in bin-1 (tilt-series) pixels, `pixel_size` is the tilt series' pixel
    size in Angstrom and `binning` the tomogram's voxel over that pixel (can be
    non-integer). A voxel coordinate x of the binned tomogram is x * binning bin-1 pixels.
    """

    size: tuple[float, float, float]
    pixel_size: float
    binning: float = 1.0
    path: str | None = None  # rlnTomoReconstructedTomogram

    @property
    def voxel_size(self) -> float:
        """Angstrom per voxel of the binned tomogram."""
        return self.pixel_size * self.binning

    @property
    def voxel_shape(self) -> tuple[int, int, int]:
        """(x, y, z) voxels of the binned tomogram (RELION rounds bin-1 size / binning)."""
        return tuple(int(round(v / self.binning)) for v in self.size)  # type: ignore[return-value]

    @classmethod
    def unbinned(cls, voxel_size: float, tomo_size) -> TomogramGeometry:
        """The geometry vpdetect assumes without tomograms.star: the tomogram is bin 1."""
        return cls(size=tuple(float(v) for v in tomo_size), pixel_size=float(voxel_size))  # type: ignore[arg-type]


@dataclass
class ParticleTable:
    """Particles of one or more tomograms: coordinates in voxels plus per-particle columns.

    `voxel_size` and `tomo_size` describe the tomogram when the table holds one (or
    several alike); `geometry` maps tomogram names to their RELION 5 geometry where
    it is known (tomograms.star, or the global block of a particles.star).
    """

    data: pd.DataFrame
    voxel_size: float | None = None  # Angstrom
    tomo_size: tuple[int, int, int] | None = None  # (x, y, z) voxels, needed for RELION 5 centring
    geometry: dict[str, TomogramGeometry] = field(default_factory=dict)

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

    def tomo_names(self) -> np.ndarray:
        """Per-particle tomogram name (the default name where the table has none)."""
        if "tomo_name" in self.data.columns:
            return text(self.data["tomo_name"]).to_numpy()
        return np.asarray([DEFAULT_TOMO_NAME] * len(self.data), dtype=object)

    def class_labels(self) -> list[str] | None:
        """Per-particle class as text: `class_name`, else `class_number` as text, else None."""
        if "class_name" in self.data.columns:
            return [str(v) for v in self.data["class_name"]]
        if "class_number" in self.data.columns:
            return [str(int(v)) for v in self.data["class_number"]]
        return None

    def copy(self) -> ParticleTable:
        return ParticleTable(self.data.copy(), self.voxel_size, self.tomo_size, dict(self.geometry))

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


def text(values: pd.Series) -> pd.Series:
    """Values as Python strings, a missing value as "" (pandas 3's astype(str) keeps NaN)."""
    def one(value) -> str:
        missing = value is None or value is pd.NA or (isinstance(value, float | np.floating) and np.isnan(value))
        return "" if missing else str(value)

    return values.map(one)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most ~200 characters."""
    message = " ".join(str(exc).split())
    return (message[:200] + "...") if len(message) > 200 else (message or type(exc).__name__)


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VPDetectError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise VPDetectError(f"cannot read {path}: {exc.strerror or exc}") from exc


def check_words(values, what: str) -> None:
    for value in values:
        word = str(value)
        if not word or any(ch.isspace() for ch in word):
            raise VPDetectError(f"{what} {word!r} is empty or contains whitespace; the format needs one word")


def extra_columns(table: ParticleTable) -> list[str]:
    return [c for c in table.data.columns if c not in CANONICAL_ORDER]


def format_number(value: float) -> str:
    # Six decimals are 1e-6 voxel: finer than any picker, short enough to read.
    return np.format_float_positional(float(value), precision=6, trim="-")


def class_numbers(table: ParticleTable) -> np.ndarray | None:
    """`class_number`, or numbers 1.. given to class names in order of first appearance."""
    if "class_number" in table.data.columns:
        return table.data["class_number"].to_numpy(dtype=np.int64)
    if "class_name" in table.data.columns:
        names = text(table.data["class_name"]).tolist()
        order: dict[str, int] = {}
        for name in names:
            order.setdefault(name, len(order) + 1)
        return np.asarray([order[name] for name in names], dtype=np.int64)
    return None


def angles_zxz(table: ParticleTable) -> np.ndarray:
    """(n, 3) phi, theta, psi in degrees; zeros where the table has no orientations."""
    if table.has_angles:
        return table.data[list(ANGLE_COLUMNS)].to_numpy(dtype=np.float64)
    return np.zeros((len(table), 3))
