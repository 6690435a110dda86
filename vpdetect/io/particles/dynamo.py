"""Dynamo tables (`.tbl`) through the `dynamotable` library.

Dynamo is MATLAB-based: positions are 1-based (the first voxel's centre is at 1), so
x_dynamo = x_vpdetect + 1, and a particle sits at x + dx (column 24 plus the shift in
column 4). Angles are (tdrot, tilt, narot) in columns 7-9 (see `euler`); column 10
(cc) holds the score, 20 (tomo) the tomogram index, 22 (class) the class number and
36 (apix) the pixel size. Tomogram names come from the table map `NAME.doc` beside
the table (`index path` per line), which is written with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import atomic_path, write_text_atomic
from vpdetect.io.particles.euler import dynamo_to_zxz, zxz_to_dynamo
from vpdetect.io.particles.table import (
    ANGLE_COLUMNS,
    ParticleTable,
    angles_zxz,
    check_words,
    class_numbers,
    one_line,
    read_text,
    text,
)

ORIGIN = 1.0  # Dynamo's coordinate of the first voxel's centre
MIN_COLUMNS = 26  # up to z


def table_map_path(path: Path) -> Path:
    return path.with_suffix(".doc")


def read_dynamo(path: Path) -> ParticleTable:
    import dynamotable

    map_file = table_map_path(path)
    if not read_text(path).strip():
        return ParticleTable.from_arrays(np.zeros((0, 3)))
    try:
        frame = dynamotable.read(str(path), str(map_file) if map_file.is_file() else None)
    except Exception as exc:  # noqa: BLE001 - pandas raises many types on bad tables
        raise VPDetectError(f"cannot parse Dynamo table {path}: {one_line(exc)}") from None
    if frame.shape[1] < MIN_COLUMNS:
        raise VPDetectError(f"{path}: a Dynamo table needs at least {MIN_COLUMNS} columns, got {frame.shape[1]}")

    def numbers(column: str) -> np.ndarray:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise VPDetectError(f"{path}: Dynamo column {column} holds values that are not finite numbers")
        return values

    coords = np.stack([numbers(a) + numbers(f"d{a}") - ORIGIN for a in "xyz"], axis=1)
    data = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2]})
    tomo = numbers("tomo")
    if "tomo_file" in frame.columns:
        from vpdetect.io.mrc import tomogram_name

        files = text(frame["tomo_file"])
        data["tomo_name"] = [tomogram_name(f) if f else str(int(t)) for f, t in zip(files, tomo, strict=True)]
        if any(f != tomogram_name(f) for f in files):  # paths, not bare names
            data["tomo_path"] = files.to_numpy()
    else:
        data["tomo_name"] = [str(int(t)) for t in tomo]
    classes = numbers("class")
    if np.any(classes != np.round(classes)):
        raise VPDetectError(f"{path}: Dynamo column class must hold whole numbers")
    data["class_number"] = classes.astype(np.int64)
    data["score"] = numbers("cc")
    for name, values in zip(ANGLE_COLUMNS, dynamo_to_zxz(numbers("tdrot"), numbers("tilt"), numbers("narot")),
                            strict=True):
        data[name] = values
    apix = numbers("apix") if "apix" in frame.columns else np.zeros(len(frame))
    voxel = float(apix[0]) if len(apix) and apix[0] > 0 and np.all(apix == apix[0]) else None
    return ParticleTable(data=data, voxel_size=voxel)


def write_dynamo(path: Path, table: ParticleTable) -> None:
    """The table as `.tbl`, and its tomograms as the table map `.doc` beside it."""
    import dynamotable

    names = table.tomo_names()
    check_words(names, "tomogram name")
    order = {name: k for k, name in enumerate(dict.fromkeys(names.tolist()), start=1)}
    coords = table.coords_xyz() + ORIGIN
    tdrot, tilt, narot = zxz_to_dynamo(*angles_zxz(table).T)
    numbers = class_numbers(table)
    frame = pd.DataFrame({
        "x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2],
        "tdrot": tdrot, "tilt": tilt, "narot": narot,
        "tomo": [order[name] for name in names],
        "class": numbers if numbers is not None else np.ones(len(table), dtype=np.int64),
        "cc": table.data["score"].to_numpy(dtype=np.float64) if "score" in table.data.columns else 0.0,
        "apix": float(table.voxel_size or 0.0),
    })
    if "tomo_path" in table.data.columns:
        paths = dict(zip(names, text(table.data["tomo_path"]), strict=True))
    else:
        paths = {name: name for name in order}
    check_words(paths.values(), "tomogram path")
    write_text_atomic(table_map_path(path), "".join(f"{k} {paths[name]}\n" for name, k in order.items()))
    with atomic_path(path) as tmp:
        dynamotable.write(frame, str(tmp))
