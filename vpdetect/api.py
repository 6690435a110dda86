"""vpdetect's Python API: numpy volumes and pandas tables in, pandas tables and dicts out.

For notebooks and scripts that want the pipeline without files::

    import vpdetect.api as vp

    picks = vp.pick(volume, voxel_size=10.0)              # both stages, bundled models
    coords = vp.localize(volume, threshold=0.6)           # stage 1 only
    classes = vp.classify(volume, coords)                 # stage 2 on any coordinates
    scores = vp.evaluate(picks, truth_table, occupancy=mask)

Volumes are arrays indexed [z, y, x] (or a `Tomogram`, or an MRC path);
tables are pandas DataFrames with columns x, y, z in voxels (0-based, voxel
centres at integers) plus score, class_name, class_number, vote_fraction,
vote_margin, ...; their `attrs` carry `voxel_size` (Angstrom) and `tomo_size`
(x, y, z voxels). Options are the fields of
`vpdetect.localize.pipeline.LocalizeOptions` and
`vpdetect.classify.pipeline.ClassifyOptions`, passed by name, so every
setting the command line has is here under its snake_case name. Progress
callbacks are called as ``progress(stage, done, total)`` with stage
"localize" (tiles) or "classify" (boxes).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vpdetect.errors import VPDetectError
from vpdetect.io.mrc import Tomogram, check_roi_selects, check_voxel_size
from vpdetect.io.particles import ParticleTable

Progress = Callable[[str, int, int], None]
# In `pick`, the classifier's batch size goes by the command line's name, as `batch_size`
# there is the localizer's (tiles per network call).
PICK_CLASSIFY_ALIASES = {"box_batch_size": "batch_size"}

__all__ = [
    "classify",
    "evaluate",
    "load_model",
    "localize",
    "pick",
    "read_table",
    "read_tomogram",
    "read_truth",
    "simulate",
    "to_frame",
    "to_particle_table",
    "write_table",
    "write_tomogram",
]


# --------------------------------------------------------------------------- conversions


def to_frame(table: ParticleTable) -> pd.DataFrame:
    """A ParticleTable as a DataFrame whose `attrs` keep its voxel size and tomogram size."""
    frame = table.data.copy()
    frame.attrs = {}  # only the sizes: pipeline notes (e.g. the bandwidth used) stay internal
    frame.attrs["voxel_size"] = table.voxel_size
    frame.attrs["tomo_size"] = tuple(table.tomo_size) if table.tomo_size is not None else None
    return frame


def _result(table: ParticleTable, tomo: Tomogram) -> pd.DataFrame:
    """A stage's output as a DataFrame; an in-memory volume has no path to record."""
    frame = to_frame(table)
    if tomo.path is None and "tomo_path" in frame.columns:
        frame = frame.drop(columns="tomo_path")
    return frame


def to_particle_table(
    table, voxel_size: float | None = None, tomo_size: tuple[int, int, int] | None = None
) -> ParticleTable:
    """A ParticleTable from a DataFrame (x, y, z columns; `attrs` as `to_frame` writes them),
    a ParticleTable, or an (n, 3) array of x, y, z. Given sizes win over the table's own."""
    if isinstance(table, ParticleTable):
        out = table.copy()
    elif isinstance(table, pd.DataFrame):
        out = ParticleTable(
            data=table.reset_index(drop=True).copy(),
            voxel_size=table.attrs.get("voxel_size"),
            tomo_size=table.attrs.get("tomo_size"),
        )
    else:
        coords = np.asarray(table, dtype=np.float64)
        if coords.ndim != 2 or coords.shape[1] != 3:
            raise VPDetectError(
                f"expected a DataFrame with x, y, z columns or an (n, 3) array, got shape {coords.shape}"
            )
        out = ParticleTable.from_arrays(coords)
    out.data.attrs = {}  # sizes live on the ParticleTable, not in pandas' attrs
    if voxel_size is not None:
        out.voxel_size = float(voxel_size)
    if tomo_size is not None:
        out.tomo_size = tuple(int(v) for v in tomo_size)  # type: ignore[assignment]
    return out


def _tomogram(volume, voxel_size: float | None) -> Tomogram:
    """A Tomogram from an array [z, y, x], a Tomogram or an MRC path; `voxel_size` overrides."""
    if isinstance(volume, Tomogram):
        tomo = volume
    elif isinstance(volume, (str, os.PathLike)):
        return read_tomogram(volume, voxel_size=voxel_size)
    else:
        data = np.asarray(volume)
        if data.ndim != 3:
            raise VPDetectError(f"expected a 3D volume indexed [z, y, x], got shape {data.shape}")
        if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
            raise VPDetectError(f"expected a real-valued volume, got dtype {data.dtype}")
        if data.dtype != np.float32:
            data = data.astype(np.float32)
        tomo = Tomogram(data=data)
    if voxel_size is not None:
        check_voxel_size(float(voxel_size))
        tomo = dataclasses.replace(tomo, voxel_size=float(voxel_size))
    return tomo


def _split_options(options: Mapping, cls, aliases: Mapping[str, str] | None = None) -> dict:
    """The entries of `options` that are fields of the dataclass `cls` (after `aliases`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = aliases or {}
    return {aliases.get(k, k): v for k, v in options.items() if aliases.get(k, k) in names}


def _check_known(options: Mapping, *groups: set[str]) -> None:
    known = set().union(*groups)
    unknown = sorted(set(options) - known)
    if unknown:
        raise VPDetectError(
            f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _build(cls, values: dict):
    try:
        return cls(**values)
    except TypeError as exc:  # a field the dataclass does not have, with its own words
        raise VPDetectError(str(exc)) from None


# --------------------------------------------------------------------------- readers and writers


def read_tomogram(path, voxel_size: float | None = None) -> Tomogram:
    """An MRC/REC volume: `.data` float32 [z, y, x], `.voxel_size` Angstrom (or None)."""
    from vpdetect.io.mrc import read_tomogram as _read

    return _read(path, voxel_size=voxel_size)


def write_tomogram(path, volume, voxel_size: float | None = None) -> None:
    """Write an array [z, y, x] (or a Tomogram) as MRC, atomically."""
    from vpdetect.io.mrc import write_mrc

    if isinstance(volume, Tomogram):
        voxel_size = voxel_size if voxel_size is not None else volume.voxel_size
        volume = volume.data
    write_mrc(path, np.asarray(volume), voxel_size=voxel_size)


def read_table(
    path, fmt: str | None = None, voxel_size: float | None = None, tomo_size=None
) -> pd.DataFrame:
    """A particle table (RELION 4/5 STAR, CSV, SHREC txt) as a DataFrame; see `to_frame`."""
    from vpdetect.io.particles import read_particles

    return to_frame(read_particles(path, fmt=fmt, voxel_size=voxel_size, tomo_size=tomo_size))


def write_table(
    path, table, fmt: str | None = None, voxel_size: float | None = None, tomo_size=None
) -> str:
    """Write a table (format from `fmt`, else the suffix), atomically; returns the format written.

    RELION 5 STAR needs the voxel size and the tomogram size (from the
    arguments or the DataFrame's `attrs`)."""
    from vpdetect.io.particles import write_particles

    return write_particles(path, to_particle_table(table, voxel_size, tomo_size), fmt=fmt)


def read_truth(folder) -> tuple[np.ndarray, pd.DataFrame]:
    """(occupancy mask [z, y, x], particle table) of a SHREC-layout folder (e.g. `vpdetect simulate`'s)."""
    from vpdetect.io.shrec import read_truth as _read

    occupancy, truth = _read(folder)
    return occupancy, to_frame(truth)


# --------------------------------------------------------------------------- models


def load_model(model=None, stage: str = "localizer", device: str = "cpu"):
    """(network, card) of a model: None = the bundled one for `stage`, a path, or a
    (network, card) pair already loaded (returned as it is, checked for its stage)."""
    from vpdetect.cli.batch import load_stage_model, resolve_model_path
    from vpdetect.nn.checkpoint import check_inference_card

    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[1], dict):
        check_inference_card(model[1], stage)
        return model
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise VPDetectError(f"model must be a path, None or a (network, card) pair, got {type(model).__name__}")
    path = resolve_model_path(Path(model) if model is not None else None, stage)
    return load_stage_model(path, stage, device)


def _device(options: dict) -> str:
    from vpdetect.devices import resolve_device

    return resolve_device(options.pop("device", "cpu"))


def _tile_progress(progress: Progress | None):
    if progress is None:
        return None
    return lambda done, total: progress("localize", int(done), int(total))


def _box_progress(progress: Progress | None, total: int):
    if progress is None:
        return None
    done = [0]

    def advance(n: int) -> None:
        done[0] += int(n)
        progress("classify", done[0], total)

    return advance


# --------------------------------------------------------------------------- the stages


def localize(
    volume,
    model=None,
    *,
    voxel_size: float | None = None,
    mask: np.ndarray | None = None,
    progress: Progress | None = None,
    **options,
) -> pd.DataFrame:
    """Stage 1: particle coordinates (x, y, z, score, cluster_size, ...) of a volume.

    `model`: None (the bundled localizer), a path or a `load_model` pair.
    `mask`: an array of the volume's shape, nonzero where to search. `options`:
    fields of LocalizeOptions (threshold, bandwidth, particle_diameter,
    min_size, tile, device, z_range, ...); unset post-processing values come
    from the model's card as on the command line.
    """
    from vpdetect.localize.pipeline import LocalizeOptions, localize_volume

    _check_known(options, _fields(LocalizeOptions))
    device = _device(options)
    tomo = _tomogram(volume, voxel_size)
    net, card = load_model(model, "localizer", device)
    net.to(device)
    settings = _build(LocalizeOptions, dict(options, device=device))
    roi = _mask(mask, tomo.data.shape)
    table, _ = localize_volume(tomo, net, card, settings, roi=roi, progress=_tile_progress(progress))
    return _result(table, tomo)


def classify(
    volume,
    table,
    model=None,
    *,
    voxel_size: float | None = None,
    progress: Progress | None = None,
    **options,
) -> pd.DataFrame:
    """Stage 2: the table plus class_name, class_number, vote_fraction and vote_margin.

    `table`: a DataFrame with x, y, z (or an (n, 3) array) in voxels of `volume`.
    `options`: fields of ClassifyOptions (search_radius, drop_unknown,
    batch_size, box_size, precision) and `device`. Rows outside the volume are
    skipped with a warning.
    """
    from vpdetect.classify.pipeline import ClassifyOptions, classify_table

    _check_known(options, _fields(ClassifyOptions) | {"device"})
    device = _device(options)
    tomo = _tomogram(volume, voxel_size)
    particles = to_particle_table(table)
    net, card = load_model(model, "classifier", device)
    net.to(device)
    settings = _build(ClassifyOptions, options)
    out = classify_table(
        tomo, particles, net, card, settings, progress=_box_progress(progress, len(particles))
    )
    return to_frame(out)


def pick(
    volume,
    localizer=None,
    classifier=None,
    *,
    voxel_size: float | None = None,
    mask: np.ndarray | None = None,
    progress: Progress | None = None,
    **options,
) -> pd.DataFrame:
    """Both stages: coordinates, scores and a class per particle.

    `options` go to LocalizeOptions and ClassifyOptions by name (`precision`
    and `device` to both); `batch_size` is the localizer's tiles per call and
    `box_batch_size` the classifier's boxes per call, as on the command line.
    """
    from vpdetect.classify.pipeline import ClassifyOptions, classify_table, with_empty_classes
    from vpdetect.localize.pipeline import LocalizeOptions, localize_volume

    classify_names = _fields(ClassifyOptions) - {"batch_size"} | set(PICK_CLASSIFY_ALIASES)
    _check_known(options, _fields(LocalizeOptions), classify_names)
    device = _device(options)
    tomo = _tomogram(volume, voxel_size)
    loc_net, loc_card = load_model(localizer, "localizer", device)
    cls_net, cls_card = load_model(classifier, "classifier", device)
    loc_net.to(device)
    cls_net.to(device)
    loc_values = _split_options(options, LocalizeOptions)
    cls_values = _split_options(
        {k: v for k, v in options.items() if k in classify_names}, ClassifyOptions, PICK_CLASSIFY_ALIASES
    )
    loc_settings = _build(LocalizeOptions, dict(loc_values, device=device))
    cls_settings = _build(ClassifyOptions, cls_values)
    found, _ = localize_volume(
        tomo, loc_net, loc_card, loc_settings, roi=_mask(mask, tomo.data.shape),
        progress=_tile_progress(progress),
    )
    if len(found) == 0:
        return _result(with_empty_classes(found), tomo)
    out = classify_table(
        tomo, found, cls_net, cls_card, cls_settings, progress=_box_progress(progress, len(found))
    )
    return _result(out, tomo)


def evaluate(
    picks,
    truth,
    occupancy: np.ndarray | None = None,
    size_groups: Mapping | None = None,
    context: Sequence[str] | None = None,
) -> dict:
    """SHREC'21 metrics of `picks` ({"localization": {...}, "classification": {...} or None}).

    `truth`: a SHREC-layout folder (occupancy mask, locations and size groups
    read from it), or a table of the true particles with `occupancy`, the
    mask [z, y, x] whose id k marks row k (1-based) of that table. `context`: classes that
    are context, not targets (default ["vesicle"]; add "fiducial" to score gold beads so).
    """
    from vpdetect.evaluate.shrec import evaluate_picks, read_size_groups

    if isinstance(truth, (str, os.PathLike)):
        if occupancy is not None:
            raise VPDetectError("give either a truth folder or a truth table with its occupancy mask")
        occupancy, truth_frame = read_truth(truth)
        if size_groups is None:
            size_groups = read_size_groups(truth)
        truth = truth_frame
    elif occupancy is None:
        raise VPDetectError("a truth table needs its occupancy mask (occupancy=...)")
    occupancy = np.asarray(occupancy)
    tomo_size = tuple(int(v) for v in occupancy.shape[::-1]) if occupancy.ndim == 3 else None
    pred = to_particle_table(picks)
    if pred.tomo_size is None:
        pred.tomo_size = tomo_size
    return evaluate_picks(pred, occupancy, to_particle_table(truth), size_groups=size_groups, context=context)


def simulate(preset: str = "shrec21", seed: int = 0, **params):
    """One simulated tomogram with its ground truth (`SimulationResult`: `.reconstruction`,
    `.occupancy`, `.class_mask`, `.particles` as a ParticleTable, ...). `params` are
    fields of SimulationParams or MicroscopeParams (shape_xyz, slab_thickness, snr, ...)."""
    from vpdetect.simulate.pipeline import preset_params, simulate_tomogram

    try:
        values = preset_params(preset, **params)
    except TypeError as exc:
        raise VPDetectError(str(exc)) from None
    return simulate_tomogram(values, seed)


def _mask(mask, shape_zyx) -> np.ndarray | None:
    if mask is None:
        return None
    roi = np.asarray(mask)
    if roi.shape != tuple(shape_zyx):
        raise VPDetectError(f"mask has shape {roi.shape}, the volume {tuple(shape_zyx)}")
    check_roi_selects(roi)
    return roi
