"""copick projects (the layout of the CryoET Data Portal and the CZII challenge) through
the copick library, an optional extra (`pip install 'vpdetect[copick]'`).

Picks are per run and pickable object; their locations (plus each transform's
translation) are Angstrom from the first voxel's centre, so x_voxel = x_A / voxel
spacing. The transform's 3x3 part is taken as vpdetect's active rotation (particle
frame into tomogram frame). A run's tomogram is
`ExperimentRuns/RUN/VoxelSpacingS/TYPE.zarr`, an OME-Zarr image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.particles.euler import matrix_to_zxz, zxz_matrix
from vpdetect.io.particles.table import ANGLE_COLUMNS, ParticleTable, angles_zxz, one_line, text


def open_copick(config: str | os.PathLike):
    """The copick root of a project configuration file."""
    try:
        import copick
    except ImportError:
        raise VPDetectError("copick projects need the copick package (pip install 'vpdetect[copick]')") from None
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
