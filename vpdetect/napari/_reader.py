"""napari reader and writer: particle tables <-> points layers, MRC tomograms -> image layers.

Layers live in voxel units (scale 1): a point at table coordinate (x, y, z) is
napari's [z, y, x], and napari puts voxel centres at integers as vpdetect
does, so picks sit on the voxels they were picked at. The voxel size and the
tomogram size ride in the layer's metadata under "vpdetect", so a saved table
keeps them. copick picks (Angstrom) become voxels of their run's tomogram, as
vpdetect's copick reader gives them. No napari import here: layer data are plain tuples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError

TABLE_SUFFIXES = (".star", ".csv", ".txt")
TOMOGRAM_SUFFIXES = (".mrc", ".rec", ".map")
COPICK_SUFFIX = ".json"  # a copick picks file or project configuration; other JSON is left to other readers
POINT_SIZE = 10.0  # voxels: about a SHREC particle's diameter at 1 nm voxels
RING_WIDTH = 0.15  # border width relative to the point size: rings keep the particle visible
METADATA_KEY = "vpdetect"


def get_reader(path):
    """The reader function for a vpdetect table or an MRC tomogram, else None (napari asks others)."""
    if isinstance(path, list):
        return None if not path or any(get_reader(p) is None for p in path) else _read_all
    suffix = Path(str(path)).suffix.lower()
    if suffix in TABLE_SUFFIXES or suffix in TOMOGRAM_SUFFIXES:
        return _read_all
    if suffix == COPICK_SUFFIX:
        from vpdetect.io.particles.copick_picks import is_copick_config, is_copick_picks_file

        return _read_all if is_copick_picks_file(path) or is_copick_config(path) else None
    return None


def _read_all(path) -> list[tuple]:
    paths = path if isinstance(path, list) else [path]
    return [layer for p in paths for layer in read_layers(p)]


def read_layers(path) -> list[tuple]:
    """Layer data tuples for one file: a points layer for a table or a copick picks file, an
    image layer for a tomogram, a points layer per run and picking session for a copick project."""
    from vpdetect.api import read_table, read_tomogram, to_frame
    from vpdetect.io.particles.copick_picks import is_copick_picks_file, read_copick_picks_file

    path = Path(path)
    if path.suffix.lower() in TOMOGRAM_SUFFIXES:
        tomo = read_tomogram(path)
        return [image_layer_data(tomo.data, tomo.voxel_size, name=path.stem, source=str(path))]
    if path.suffix.lower() == COPICK_SUFFIX:
        if is_copick_picks_file(path):
            return [points_layer_data(to_frame(read_copick_picks_file(path)), name=path.stem, source=str(path))]
        return copick_project_layers(path)
    return [points_layer_data(read_table(path), name=path.stem, source=str(path))]


def copick_project_layers(config) -> list[tuple]:
    """A points layer per run and picking session (user_session: a tool's picks apart from a
    curator's) of a copick project, named "RUN USER_SESSION"."""
    from vpdetect.api import to_frame
    from vpdetect.io.particles.copick_picks import (
        open_copick,
        read_copick_picks,
        run_tomo_size,
        run_voxel_spacing,
    )

    root = open_copick(config)
    layers = []
    for run in root.runs:
        sessions = dict.fromkeys((p.user_id, p.session_id) for p in run.get_picks())
        if not sessions:
            continue
        spacing = run_voxel_spacing(run)  # only runs with picks need one
        tomo_size = run_tomo_size(run, spacing)
        for user, session in sessions:
            table = read_copick_picks(root, spacing, [run.name], user_id=user, session_id=session)
            table.tomo_size = tomo_size
            layers.append(points_layer_data(to_frame(table), name=f"{run.name} {user}_{session}", source=str(config)))
    if not layers:
        raise VPDetectError(f"copick project {config} has no picks")
    return layers


def image_layer_data(volume: np.ndarray, voxel_size: float | None, name: str, source: str = "") -> tuple:
    """(data, kwargs, "image") of a tomogram, with contrast from its 1-99 % range."""
    step = max(1, int(round((volume.size / 2e6) ** (1 / 3))))  # percentiles of a ~2 M voxel subsample
    lo, hi = np.percentile(np.asarray(volume[::step, ::step, ::step], dtype=np.float32), [1, 99])
    meta = {METADATA_KEY: {"voxel_size": voxel_size, "source": source}}
    return (volume, {"name": name, "contrast_limits": [float(lo), float(max(hi, lo + 1e-6))],
                     "metadata": meta}, "image")


def points_layer_data(frame: pd.DataFrame, name: str, source: str = "", size: float = POINT_SIZE) -> tuple:
    """(data [z, y, x], kwargs, "points") of a particle table: rings coloured by class
    (`vpdetect.evaluate.overlay.class_colours`, as in `vpdetect view`), every other
    column (score, class_name, vote_fraction, ...) as a feature."""
    from vpdetect.evaluate.overlay import class_colours, pick_classes

    coords = frame[["z", "y", "x"]].to_numpy(dtype=np.float64).reshape(-1, 3)
    features = frame.drop(columns=["x", "y", "z"]).reset_index(drop=True)
    names = pick_classes(frame)
    colours = class_colours(names)
    ring = np.array([colours[n] for n in names], dtype=np.float32).reshape(-1, 4)
    meta = {METADATA_KEY: {
        "voxel_size": frame.attrs.get("voxel_size"),
        "tomo_size": frame.attrs.get("tomo_size"),
        "source": source,
        "class_colours": {k: list(v) for k, v in colours.items()},
    }}
    kwargs = {
        "name": name,
        "features": features,
        "size": size,
        "face_color": [0.0, 0.0, 0.0, 0.0],
        "border_color": ring if len(ring) else "white",
        "border_width": RING_WIDTH,
        "border_width_is_relative": True,
        "metadata": meta,
    }
    return (coords, kwargs, "points")


def frame_from_points(data: np.ndarray, features: pd.DataFrame | None, metadata: dict | None,
                      rows: np.ndarray | None = None) -> pd.DataFrame:
    """The particle table of a points layer's data [z, y, x], features and metadata
    (only `rows`, a boolean mask, when given)."""
    coords = np.asarray(data, dtype=np.float64).reshape(-1, 3)
    if coords.shape[1] != 3:
        raise VPDetectError(f"expected 3D points (z, y, x), got {coords.shape[1]}D")
    frame = pd.DataFrame({"x": coords[:, 2], "y": coords[:, 1], "z": coords[:, 0]})
    if features is not None and len(features.columns):
        frame = pd.concat([frame, features.reset_index(drop=True)], axis=1)
    if rows is not None:
        frame = frame[np.asarray(rows, dtype=bool)].reset_index(drop=True)
    meta = (metadata or {}).get(METADATA_KEY, {})
    frame.attrs["voxel_size"] = meta.get("voxel_size")
    tomo_size = meta.get("tomo_size")
    frame.attrs["tomo_size"] = tuple(tomo_size) if tomo_size is not None else None
    return frame


def write_points(path: str, data, attributes: dict) -> list[str]:
    """napari's writer for a points layer: the table in the format its suffix names."""
    from vpdetect.api import write_table

    features = attributes.get("features")
    if features is not None and not isinstance(features, pd.DataFrame):
        features = pd.DataFrame(features)
    frame = frame_from_points(data, features, attributes.get("metadata"))
    write_table(os.fspath(path), frame)
    return [os.fspath(path)]
