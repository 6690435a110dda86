"""IMOD models (`.mod`) through the `imodmodel` library: one scattered-point object per class.

IMOD's model coordinates put the centre of the first pixel at 0.5 in X and Y, and a
point on section k at Z = k: x_imod = x + 0.5, y_imod = y + 0.5, z_imod = z. Objects
are named after the classes (the object's name, else `objectN` with N from 1). The
model header carries the pixel size in Angstrom (units -10) and the tomogram size.
IMOD models hold no orientations or scores.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import atomic_path
from vpdetect.io.particles.table import ParticleTable, one_line, text

MAGIC = b"IMOD"  # every model file starts with it
OFFSET = np.array([0.5, 0.5, 0.0])  # IMOD coordinate of the first voxel's centre, x y z
ANGSTROM_UNITS = -10  # the model header's `units` code for Angstrom
UNIT_TO_ANGSTROM = {-10: 1.0, -9: 10.0, -6: 1e4}


class _StrictReader(io.BytesIO):
    """Bytes that refuse a short read: imodmodel's parser loops forever past the end of a
    file that is not a whole IMOD model."""

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if size is not None and size > 0 and len(data) < size:
            raise EOFError("the file ends inside a chunk")
        return data


def read_imod(path: Path) -> ParticleTable:
    from imodmodel.dataframe import model_to_dataframe
    from imodmodel.parsers import parse_model

    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise VPDetectError(f"{path}: not an IMOD model (it does not start with {MAGIC.decode()})")
    try:
        model = parse_model(_StrictReader(raw))
        frame = model_to_dataframe(model) if any(o.contours for o in model.objects) else None
    except Exception as exc:  # noqa: BLE001 - the parser raises many types on damaged files
        raise VPDetectError(f"cannot parse IMOD model {path}: {one_line(exc)}") from None
    names = [o.header.name.strip() or f"object{k}" for k, o in enumerate(model.objects, start=1)]
    if frame is None:
        frame = pd.DataFrame({"object_id": [], "x": [], "y": [], "z": []})
    coords = frame[["x", "y", "z"]].to_numpy(dtype=np.float64).reshape(-1, 3) - OFFSET
    ids = frame["object_id"].to_numpy(dtype=np.int64)
    data = pd.DataFrame({
        "x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2],
        "class_name": [names[i] for i in ids],
        "class_number": ids + 1,
    })
    header = model.header
    scale = UNIT_TO_ANGSTROM.get(header.units)
    voxel = float(header.pixelsize * scale) if scale is not None and header.pixelsize > 0 else None
    size = (header.xmax, header.ymax, header.zmax) if min(header.xmax, header.ymax, header.zmax) > 0 else None
    return ParticleTable(data=data, voxel_size=voxel, tomo_size=size)


def write_imod(path: Path, table: ParticleTable) -> None:
    from imodmodel import ImodModel

    if "class_name" in table.data.columns:
        classes = text(table.data["class_name"]).tolist()
    elif "class_number" in table.data.columns:
        classes = [str(int(v)) for v in table.data["class_number"]]
    else:
        classes = ["particle"] * len(table)
    order = {name: k for k, name in enumerate(dict.fromkeys(classes))}
    coords = table.coords_xyz() + OFFSET
    frame = pd.DataFrame({
        "x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2],
        "object_id": [order[name] for name in classes], "contour_id": 0,
    })
    try:
        model = ImodModel.from_dataframe(frame) if len(frame) else ImodModel()
    except Exception as exc:  # noqa: BLE001 - pydantic validation of the points
        raise VPDetectError(f"cannot build an IMOD model: {one_line(exc)}") from None
    for obj, name in zip(model.objects, order, strict=True):
        obj.header.name = name[:64]  # the binary header holds 64 characters
    if table.voxel_size is not None:
        model.header.pixelsize = float(table.voxel_size)
        model.header.units = ANGSTROM_UNITS
    if table.tomo_size is not None:
        model.header.xmax, model.header.ymax, model.header.zmax = (int(v) for v in table.tomo_size)
    with atomic_path(path) as tmp:
        model.to_file(tmp)
