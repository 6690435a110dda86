"""SHREC model folders: the label masks, particle list and simulation record that
`evaluate`, `train` and `tune` read (`reconstruction.mrc`, `occupancy_mask.mrc`,
`class_mask.mrc`, `particle_locations.txt`, `simulation.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vpdetect.errors import VPDetectError

SIMULATION_FILE = "simulation.json"
LOCATIONS_FILE = "particle_locations.txt"
OCCUPANCY_FILE = "occupancy_mask.mrc"


def read_label_mask(path: str | os.PathLike) -> np.ndarray:
    """A label mask (occupancy or class mask) as int32 [z, y, x]; refuses non-integer or
    negative values (labels may be stored as floats, as large masks are)."""
    from vpdetect.io.mrc import read_tomogram

    data = read_tomogram(path, mmap=False).data
    if not np.all(np.isfinite(data)) or np.any(data != np.round(data)) or np.any(data < 0):
        raise VPDetectError(f"{path}: label mask must hold non-negative integers")
    return data.astype(np.int32)


def read_simulation_record(folder: str | os.PathLike) -> dict | None:
    """The folder's simulation.json as a dict, or None if it has none."""
    path = Path(folder) / SIMULATION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VPDetectError(f"cannot read {path}: {exc}") from None
    if not isinstance(record, dict):
        raise VPDetectError(f"{path}: expected a JSON object")
    classes = record.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, dict) and "name" in c for c in classes):
        raise VPDetectError(f"{path}: 'classes' must be a list of {{name, label, ...}} records")
    return record


def is_shrec_folder(path: str | os.PathLike) -> bool:
    """A SHREC model folder: a directory holding particle_locations.txt or occupancy_mask.mrc."""
    folder = Path(path)
    return folder.is_dir() and any((folder / name).is_file() for name in (LOCATIONS_FILE, OCCUPANCY_FILE))


def shrec_folders(path: str | os.PathLike) -> list[Path]:
    """`path` itself when it is a SHREC model folder, else its model folders (sorted by name)."""
    folder = Path(path)
    if not folder.is_dir():
        raise VPDetectError(f"truth folder not found: {folder}")
    if is_shrec_folder(folder):
        return [folder]
    found = sorted(p for p in folder.iterdir() if is_shrec_folder(p))
    if not found:
        raise VPDetectError(
            f"truth folder {folder} is neither a SHREC model folder ({LOCATIONS_FILE}, "
            f"{OCCUPANCY_FILE}) nor a folder of them"
        )
    return found


def read_truth_table(model_dir: str | os.PathLike):
    """ParticleTable of a SHREC folder's particle_locations.txt, with the tomogram's size and
    voxel size from the header of occupancy_mask.mrc (or reconstruction.mrc when it has none)."""
    from vpdetect.io.mrc import read_mrc_header
    from vpdetect.io.particles import read_particles

    folder = Path(model_dir)
    if not folder.is_dir():
        raise VPDetectError(f"truth folder not found: {folder}")
    list_path = folder / LOCATIONS_FILE
    if not list_path.is_file():
        raise VPDetectError(f"truth folder {folder} has no {LOCATIONS_FILE}")
    truth = read_particles(list_path, fmt="shrec")
    for name in (OCCUPANCY_FILE, "reconstruction.mrc"):
        if (folder / name).is_file():
            header = read_mrc_header(folder / name)
            truth.tomo_size = tuple(int(v) for v in header["shape"][::-1])
            truth.voxel_size = header["voxel_size"]
            break
    return truth


def read_truth(model_dir: str | os.PathLike):
    """(occupancy mask [z, y, x] int32, ParticleTable of particle_locations.txt) of a SHREC folder."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise VPDetectError(f"truth folder not found: {folder}")
    mask_path = folder / OCCUPANCY_FILE
    for needed in (mask_path, folder / LOCATIONS_FILE):
        if not needed.is_file():
            raise VPDetectError(f"truth folder {folder} has no {needed.name}")
    occupancy = read_label_mask(mask_path)
    truth = read_truth_table(folder)
    truth.tomo_size = tuple(int(v) for v in occupancy.shape[::-1])
    return occupancy, truth
