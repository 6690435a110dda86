"""SHREC `particle_locations.txt`: one `CLASS x y z [phi theta psi]` line per particle,
coordinates in voxels, ZXZ angles in degrees (vpdetect's own convention)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import write_text_atomic
from vpdetect.io.particles.table import (
    ANGLE_COLUMNS,
    ParticleTable,
    angles_zxz,
    check_words,
    format_number,
    one_line,
    read_text,
    text,
)


def read_shrec(path: Path) -> ParticleTable:
    names: list[str] = []
    rows: list[list[float]] = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
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
            raise VPDetectError(f"{path}, line {number}: {one_line(exc)}") from None
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


def write_shrec(path: Path, table: ParticleTable) -> None:
    data = table.data
    if "class_name" in data.columns:
        classes = text(data["class_name"]).tolist()
    elif "class_number" in data.columns:
        classes = [str(int(v)) for v in data["class_number"]]
    else:
        classes = ["particle"] * len(data)  # SHREC lines need a class word
    check_words(classes, "class name")
    # SHREC lines carry three angles; unknown orientations are written as 0 0 0.
    angles = angles_zxz(table)
    coords = table.coords_xyz()
    lines = [
        " ".join([name] + [format_number(v) for v in (*xyz, *ang)])
        for name, xyz, ang in zip(classes, coords, angles, strict=True)
    ]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
