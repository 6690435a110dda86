"""CSV particle tables: a header row, `x,y,z` in voxels plus the other columns under
their canonical names."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import atomic_path
from vpdetect.io.particles.table import (
    CANONICAL_ORDER,
    ParticleTable,
    extra_columns,
    one_line,
    read_text,
    text,
)


def read_csv(path: Path) -> ParticleTable:
    content = read_text(path)
    try:
        data = pd.read_csv(io.StringIO(content), comment="#", skipinitialspace=True)
    except Exception as exc:  # noqa: BLE001 - pandas raises many types; all mean "bad CSV"
        raise VPDetectError(f"cannot parse CSV file {path}: {one_line(exc)}") from None
    _check_header(content, path)
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
            data[column] = text(data[column])
    return ParticleTable(data=data)


def _check_header(content: str, path: Path) -> None:
    """Refuse a header naming a column twice (pandas would silently rename the second `x.1`)."""
    try:
        header = pd.read_csv(
            io.StringIO(content), comment="#", skipinitialspace=True, header=None, nrows=1, dtype=str,
            keep_default_na=False,
        )
    except Exception as exc:  # noqa: BLE001 - pandas raises many types; all mean "bad CSV"
        raise VPDetectError(f"cannot parse CSV header of {path}: {one_line(exc)}") from None
    seen: set[str] = set()
    for cell in header.iloc[0] if len(header) else []:
        name = str(cell).strip().lower()
        if name in seen:
            raise VPDetectError(f"{path}: CSV header repeats column {name}")
        seen.add(name)


def write_csv(path: Path, table: ParticleTable) -> None:
    columns = [c for c in CANONICAL_ORDER if c in table.data.columns] + extra_columns(table)
    with atomic_path(path) as tmp:
        table.data[columns].to_csv(tmp, index=False, float_format="%.6f")
