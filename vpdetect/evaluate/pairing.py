"""Which predictions belong to which ground-truth tomogram, by tomogram name.

A table is split into tomograms by `tomo_name` (and `tomo_path`, so that picks of
several SHREC folders' `reconstruction.mrc` stay apart). Each part is known by names,
most telling first: its `tomo_name`, the folder of its `tomo_path` (a SHREC folder's
name), and for a table without tomogram names (or without rows) the file's name and
folder (a SHREC `particle_locations.txt`: its folder's name only). A truth tomogram
has a primary name (the SHREC folder's name, or the table's `tomo_name`, or the
file's name) and aliases (the table file's folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from vpdetect.errors import VPDetectError
from vpdetect.io.particles import ParticleTable
from vpdetect.io.shrec import LOCATIONS_FILE


@dataclass
class Tomogram:
    """One tomogram's particles and the names it goes by (primary name first)."""

    table: ParticleTable
    names: tuple[str, ...]
    source: str  # the file, for messages

    @property
    def name(self) -> str:
        return self.names[0]


def _unique(names) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for n in names if n))


def split_by_tomogram(table: ParticleTable, path: str | PurePath) -> list[Tomogram]:
    """The tomograms of one table read from `path` (only its name is used)."""
    path = PurePath(path)
    # A SHREC particle list is named after its model folder.
    file_names = (path.parent.name,) if path.name == LOCATIONS_FILE else (path.stem, path.parent.name)
    data = table.data
    if "tomo_name" not in data.columns or len(data) == 0:
        return [Tomogram(table, _unique(file_names), str(path))]
    keys = [data["tomo_name"].astype(str)]
    if "tomo_path" in data.columns:
        keys.append(data["tomo_path"].fillna("").astype(str))
    parts = []
    for key, rows in data.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        folder = Path(key[1]).parent.name if len(key) > 1 and key[1] else ""
        part = ParticleTable(rows.reset_index(drop=True), table.voxel_size, table.tomo_size)
        parts.append(Tomogram(part, _unique((key[0], folder)), str(path)))
    return parts


def pair_by_name(predictions: Sequence[Tomogram], truths: Sequence[Tomogram]) -> list[Tomogram | None]:
    """For each truth tomogram, its predictions (None when there are none).

    One set of predictions and one truth tomogram are paired whatever their names. Otherwise
    each set of predictions must name exactly one truth tomogram (by its primary name, else
    by an alias), and no truth tomogram may get two; empty sets that match nothing are dropped.
    """
    primary = [t.name for t in truths]
    duplicated = sorted({n for n in primary if primary.count(n) > 1})
    if duplicated:
        raise VPDetectError(
            f"several truth tomograms are named {', '.join(duplicated)}: evaluate them in separate runs"
        )
    if len(predictions) == 1 and len(truths) == 1:
        return [predictions[0]]
    paired: list[Tomogram | None] = [None] * len(truths)
    for pred in predictions:
        matches = [j for j, t in enumerate(truths) if t.name in pred.names]
        if not matches:
            matches = [j for j, t in enumerate(truths) if set(t.names[1:]) & set(pred.names)]
        if not matches:
            if len(pred.table) == 0:
                continue
            shown = ", ".join(primary[:6]) + (", ..." if len(primary) > 6 else "")
            raise VPDetectError(
                f"predictions for tomogram {pred.name} ({pred.source}) match no truth tomogram "
                f"(truth: {shown})"
            )
        if len(matches) > 1:
            raise VPDetectError(
                f"predictions for tomogram {pred.name} ({pred.source}) match several truth tomograms: "
                + ", ".join(primary[j] for j in matches)
            )
        j = matches[0]
        if paired[j] is not None:
            raise VPDetectError(
                f"two sets of predictions for truth tomogram {primary[j]}: "
                f"{paired[j].name} ({paired[j].source}) and {pred.name} ({pred.source})"
            )
        paired[j] = pred
    return paired
