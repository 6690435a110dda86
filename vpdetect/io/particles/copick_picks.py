"""copick projects (the layout of the CryoET Data Portal and the CZII challenge) through
the copick library, an optional extra (`pip install 'vpdetect[copick]'`).

Picks are per run and pickable object; their locations (plus each transform's
translation) are Angstrom from the first voxel's centre, so x_voxel = x_A / voxel
spacing. The transform's 3x3 part is taken as vpdetect's active rotation (particle
frame into tomogram frame). A run's tomogram is
`ExperimentRuns/RUN/VoxelSpacingS/TYPE.zarr`, an OME-Zarr image, and a run's picks
`ExperimentRuns/RUN/Picks/USER_SESSION_OBJECT.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.particles.euler import matrix_to_zxz, zxz_matrix
from vpdetect.io.particles.table import ANGLE_COLUMNS, ParticleTable, angles_zxz, one_line, text

PICKS_LAYOUT = "ExperimentRuns/RUN/Picks/USER_SESSION_OBJECT.json"


def _import_copick():
    try:
        import copick
    except ImportError:
        raise VPDetectError("copick projects need the copick package (pip install 'vpdetect[copick]')") from None
    return copick


def open_copick(config: str | os.PathLike):
    """The copick root of a project configuration file."""
    copick = _import_copick()
    if not Path(config).is_file():
        raise VPDetectError(f"copick configuration not found: {config}")
    try:
        return copick.from_file(str(config))
    except Exception as exc:  # noqa: BLE001 - pydantic/fsspec raise many types
        raise VPDetectError(f"cannot open copick project {config}: {one_line(exc)}") from None


def _runs(root, names: list[str] | None):
    runs = {run.name: run for run in root.runs}
    if not names:
        return list(runs.values())
    missing = [n for n in names if n not in runs]
    if missing:
        raise VPDetectError(f"copick project has no run {missing[0]!r} (it has {', '.join(list(runs)[:5])})")
    return [runs[n] for n in names]


def copick_tomograms(root, runs: list[str] | None, voxel_spacing: float, tomo_type: str) -> list[Path]:
    """The OME-Zarr folder of each run's tomogram at that voxel spacing and type."""
    paths = []
    for run in _runs(root, runs):
        spacing = run.get_voxel_spacing(voxel_spacing)
        tomograms = spacing.get_tomograms(tomo_type) if spacing is not None else []
        if not tomograms:
            raise VPDetectError(f"copick run {run.name!r} has no {tomo_type!r} tomogram at {voxel_spacing:g} A")
        store = tomograms[0].zarr()
        path = Path(getattr(store, "path", ""))
        if not path.is_dir():
            raise VPDetectError(f"copick run {run.name!r}: tomogram {tomo_type!r} is not on a local disk")
        paths.append(path)
    return paths


def read_copick_picks(
    root, voxel_spacing: float, runs: list[str] | None = None, objects: list[str] | None = None,
    user_id: str | None = None, session_id: str | None = None,
) -> ParticleTable:
    """Every pick of the runs (all by default), one class per pickable object, in voxels."""
    frames = []
    for run in _runs(root, runs):
        for picks in run.get_picks(object_name=objects, user_id=user_id, session_id=session_id):
            positions = picks.full_positions() / voxel_spacing
            if not len(positions):
                continue
            _, transforms = picks.numpy()
            phi, theta, psi = matrix_to_zxz(transforms[:, :3, :3])
            frames.append(pd.DataFrame({
                "x": positions[:, 0], "y": positions[:, 1], "z": positions[:, 2],
                "tomo_name": run.name, "class_name": picks.pickable_object_name, "score": picks.scores(),
                "phi": phi, "theta": theta, "psi": psi,
            }))
    columns = ["x", "y", "z", "tomo_name", "class_name", "score", *ANGLE_COLUMNS]
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in columns})
    return ParticleTable(data=data, voxel_size=float(voxel_spacing))


def write_copick_picks(root, table: ParticleTable, user_id: str, session_id: str) -> int:
    """Store the table as copick picks: one picks file per run and class (the class must be a
    pickable object of the project; unclassified picks need a one-object project; class 0,
    unknown, is left out). Returns
    how many picks files were written."""
    if table.voxel_size is None:
        raise VPDetectError("copick picks are in Angstrom: the voxel size must be known (give --pixel-size)")
    objects = {o.name for o in root.config.pickable_objects}
    if "class_number" in table.data.columns:  # class 0 (unknown: no particle at the centre) is no pick
        table = ParticleTable(
            table.data[table.data["class_number"].to_numpy() != 0].reset_index(drop=True), table.voxel_size,
            table.tomo_size,
        )
    if "class_name" in table.data.columns:
        classes = text(table.data["class_name"]).to_numpy()
    elif len(objects) == 1:  # unclassified picks of a one-object project are that object
        classes = np.asarray([next(iter(objects))] * len(table), dtype=object)
    else:
        raise VPDetectError(
            f"the picks have no classes and the copick project has {len(objects)} pickable objects: "
            "store classified picks (vpdetect pick)"
        )
    unknown = sorted(set(classes) - objects)
    if unknown:
        raise VPDetectError(
            f"class {unknown[0]!r} is not a pickable object of the copick project ({', '.join(sorted(objects))})"
        )
    runs = {run.name: run for run in root.runs}
    names = table.tomo_names()
    positions = table.coords_xyz() * table.voxel_size
    matrices = zxz_matrix(*angles_zxz(table).T).reshape(-1, 3, 3)
    scores = table.data["score"].to_numpy(dtype=np.float64) if "score" in table.data.columns else None
    written = 0
    for run_name in dict.fromkeys(names):
        run = runs.get(run_name) or root.new_run(run_name)
        for obj in dict.fromkeys(classes[names == run_name]):
            rows = np.flatnonzero((names == run_name) & (classes == obj))
            transforms = np.tile(np.eye(4), (len(rows), 1, 1))
            transforms[:, :3, :3] = matrices[rows]
            try:
                picks = run.new_picks(obj, session_id, user_id, exist_ok=True)
                picks.from_numpy(positions[rows], transforms, scores=None if scores is None else scores[rows])
                picks.store()
            except ValueError as exc:
                raise VPDetectError(f"copick run {run_name!r}: {one_line(exc)}") from None
            written += 1
    return written


def is_copick_picks_file(path: str | os.PathLike) -> bool:
    """Whether a path sits where copick keeps a run's picks (`PICKS_LAYOUT`)."""
    path = Path(path)
    return (path.suffix.lower() == ".json" and path.parent.name == "Picks" and len(path.parents) >= 4
            and path.parents[2].name == "ExperimentRuns")


def is_copick_config(path: str | os.PathLike) -> bool:
    """Whether a path is a copick project configuration (a JSON object naming pickable objects)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file() or path.stat().st_size > 10_000_000:
        return False  # configurations are small: a large JSON file is something else, left unread
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and "pickable_objects" in data


def run_voxel_spacing(run) -> float:
    """A run's only voxel spacing: picks are Angstrom and the tomogram to draw them on fixes the voxels."""
    spacings = sorted({float(vs.voxel_size) for vs in run.voxel_spacings})
    if len(spacings) != 1:
        found = f"voxel spacings {', '.join(f'{s:g}' for s in spacings)} A" if spacings else "no tomogram"
        raise VPDetectError(
            f"copick run {run.name!r} has {found}: the picks' voxel spacing is unknown "
            "(read them with vpdetect.io.particles.copick_picks.read_copick_picks(root, VOXEL_SPACING))"
        )
    return spacings[0]


def run_tomo_size(run, voxel_spacing: float) -> tuple[int, int, int] | None:
    """(x, y, z) voxels of the run's first tomogram at that spacing, None if it has none on a local disk."""
    from vpdetect.io.mrc import read_mrc_header

    spacing = run.get_voxel_spacing(voxel_spacing)
    for tomogram in spacing.tomograms if spacing is not None else []:
        path = Path(getattr(tomogram.zarr(), "path", ""))
        if path.is_dir():
            z, y, x = read_mrc_header(path)["shape"]
            return int(x), int(y), int(z)
    return None


def read_copick_picks_file(path: str | os.PathLike, voxel_spacing: float | None = None) -> ParticleTable:
    """The picks of one copick picks file (`PICKS_LAYOUT`), in voxels, without the project's
    configuration: the project is the folder above ExperimentRuns. The voxel spacing is the
    argument, else the file's own `voxel_spacing`, else its run's only one."""
    path = Path(path)
    if not is_copick_picks_file(path):
        raise VPDetectError(f"not a copick picks file: {path} (expected {PICKS_LAYOUT})")
    copick = _import_copick()
    from copick.models import CopickPicksFile

    try:
        meta = CopickPicksFile.model_validate_json(path.read_bytes())
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise VPDetectError(f"cannot read copick picks {path}: {one_line(exc)}") from None
    if meta.unit.lower() != "angstrom":
        raise VPDetectError(f"copick picks {path}: unit {meta.unit!r}, expected angstrom")
    # The project's own layout, read by copick itself: a configuration naming just this object.
    root = copick.from_string(json.dumps({
        "config_type": "filesystem", "overlay_root": str(path.resolve().parents[3]),
        "pickable_objects": [{"name": meta.pickable_object_name, "is_particle": True}],
    }))
    run = root.get_run(path.parents[1].name)
    spacing = voxel_spacing or meta.voxel_spacing or run_voxel_spacing(run)
    table = read_copick_picks(root, spacing, [run.name], [meta.pickable_object_name], meta.user_id, meta.session_id)
    if len(table) != len(meta.points or []):  # copick splits file names at "_": one inside a part misleads it
        raise VPDetectError(
            f"copick does not find the picks of {path.name} under that name: copick names picks "
            f"{meta.user_id}_{meta.session_id}_{meta.pickable_object_name}.json and needs no '_' inside the parts"
        )
    table.tomo_size = run_tomo_size(run, spacing)
    return table
