"""`vpdetect pick`: both stages in one process, each tomogram read once."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.cli.batch import (
    FORMAT_SUFFIX,
    LogSettings,
    device_option,
    devices_option,
    log_file_option,
    output_dir_option,
    overwrite_option,
    parse_devices,
    quiet_option,
    resolve_device,
    run_command_batch,
    setup_logging,
    shard_option,
    verbose_option,
)
from vpdetect.cli.classify import class_summary, load_classifier
from vpdetect.cli.localize import (
    bandwidth_option,
    batch_size_option,
    build_localize_options,
    halo_option,
    load_localizer,
    mask_option,
    min_size_option,
    opening_radius_option,
    particle_diameter_option,
    pixel_size_option,
    precision_option,
    resolve_model_path,
    threshold_option,
    tile_option,
    z_range_option,
)
from vpdetect.errors import VPDetectError

log = logging.getLogger("vpdetect.pick")

CLASS_COLUMNS = {"class_name": object, "class_number": "int64", "vote_fraction": float, "vote_margin": float}


@dataclass(frozen=True)
class PickJob:
    """Everything `pick_task` needs besides the input, output and device (picklable for --devices)."""

    localizer_path: str
    classifier_path: str
    localize_options: object  # LocalizeOptions; device filled in per task
    classify_options: object  # ClassifyOptions
    fmt: str | None
    mask: str | None = None
    pixel_size: float | None = None
    show_progress: bool = True


def _read_roi(mask: str | None, tomo):
    from vpdetect.io.mrc import read_tomogram

    if mask is None:
        return None
    roi = read_tomogram(mask, mmap=True).data
    if tuple(roi.shape) != tuple(tomo.data.shape):
        raise VPDetectError(
            f"mask {Path(mask).name} is {roi.shape[::-1]} (x, y, z) but the tomogram is {tomo.data.shape[::-1]}"
        )
    return roi


def _with_empty_classes(table):
    """A table with no particles still gets the class columns, so every output has one layout."""
    import pandas as pd

    data = table.data.copy()
    for column, dtype in CLASS_COLUMNS.items():
        data[column] = pd.Series([], dtype=dtype)
    return replace(table, data=data)


def pick_task(source: Path, output: Path, device: str, job: PickJob) -> dict:
    """Localize and classify one tomogram file, write its table; returns provenance extras."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vpdetect.classify.pipeline import classify_table
    from vpdetect.io.mrc import read_tomogram
    from vpdetect.io.particles import write_particles
    from vpdetect.localize.pipeline import format_timings, particles_from_map, segment_volume

    start = time.perf_counter()
    tomo = read_tomogram(source, voxel_size=job.pixel_size)
    localizer, localizer_card = load_localizer(job.localizer_path, device)
    classifier, classifier_card = load_classifier(job.classifier_path, device)
    roi = _read_roi(job.mask, tomo)
    opened = time.perf_counter() - start
    options = replace(job.localize_options, device=device)

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not job.show_progress,
    ) as bar:
        tiles = bar.add_task(f"{tomo.name}: localize", total=None)
        prob, timings = segment_volume(
            tomo, localizer, localizer_card, options,
            progress=lambda done, total: bar.update(tiles, completed=done, total=total),
        )
        timings["load"] += opened
        found = particles_from_map(prob, tomo, options, roi, timings)
        del prob  # the map can be large; stage 2 needs only the coordinates
        if len(found):
            boxes = bar.add_task(f"{tomo.name}: classify", total=len(found))
            table = classify_table(
                tomo, found, classifier, classifier_card, job.classify_options,
                progress=lambda n: bar.advance(boxes, n), timings=timings,
            )
        else:
            table = _with_empty_classes(found)

    start = time.perf_counter()
    written = write_particles(output, table, fmt=job.fmt)
    timings["write"] = time.perf_counter() - start
    counts = table.data["class_name"].value_counts().to_dict()
    log.info("%s: %s -> %s (%s)", tomo.name, class_summary(table.data), output, written)
    log.info("%s timings: %s", tomo.name, format_timings(timings))
    return {
        "n_particles": len(table),
        "classes": {str(k): int(v) for k, v in counts.items()},
        "format": written,
        "shape_xyz": list(tomo.shape_xyz),
        "voxel_size": tomo.voxel_size,
        "bandwidth_voxels": options.resolved_bandwidth(tomo.voxel_size),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


@app.command()
@user_errors
def pick(
    tomograms: list[str] = typer.Argument(..., help="Tomograms (MRC/REC) or globs like 'data/*.mrc'."),
    localizer: Path = typer.Option(
        None, "--localizer", help="Localizer model file (.pt); default: the bundled localizer."
    ),
    classifier: Path = typer.Option(
        None, "--classifier", help="Classifier model file (.pt); default: the bundled classifier."
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Output table for a single tomogram (default: <name>.star in --output-dir)."
    ),
    output_dir: Path = output_dir_option(),
    output_format: str = typer.Option(
        None, "--format", help="relion4 (default), relion5, csv or shrec; with -o, default from its extension."
    ),
    mask: Path = mask_option(),
    z_range: tuple[int, int] = z_range_option(),
    threshold: float = threshold_option(),
    opening_radius: int = opening_radius_option(),
    bandwidth: float = bandwidth_option(),
    particle_diameter: float = particle_diameter_option(),
    min_size: int = min_size_option(),
    tile: int = tile_option(),
    halo: int = halo_option(),
    batch_size: int = batch_size_option(),
    search_radius: float = typer.Option(
        3.0, "--search-radius", min=0.0,
        help="Voxels from a box centre to look for the particle when the centre voxel is background.",
    ),
    drop_unknown: bool = typer.Option(
        False, "--drop-unknown", help="Drop particles with no central component instead of class 'unknown'."
    ),
    box_batch_size: int = typer.Option(8, "--box-batch-size", min=1, help="Subtomograms per classifier call."),
    device: str = device_option(),
    devices: str = devices_option(),
    precision: str = precision_option(),
    pixel_size: float = pixel_size_option(),
    overwrite: bool = overwrite_option(),
    shard: str = shard_option(),
    verbose: bool = verbose_option(),
    quiet: bool = quiet_option(),
    log_file: Path = log_file_option(),
) -> None:
    """Localize and classify: coordinates, scores and a class per particle, one table per tomogram."""
    from vpdetect.classify.pipeline import ClassifyOptions
    from vpdetect.nn.checkpoint import load_model

    settings = LogSettings(verbose=verbose, quiet=quiet, log_file=str(log_file) if log_file else None)
    setup_logging(settings)
    if output_format is not None and output_format.lower() not in FORMAT_SUFFIX:
        raise VPDetectError(f"unknown format {output_format!r}; choose relion4, relion5, csv or shrec")
    fmt = output_format.lower() if output_format else (None if output is not None else "relion4")
    parse_devices(devices)  # a CPU-only machine says so before anything else
    resolved_device = resolve_device(device) if devices is None else "cuda"
    localize_options = build_localize_options(
        threshold=threshold, opening_radius=opening_radius, bandwidth=bandwidth,
        particle_diameter=particle_diameter, min_size=min_size, tile=tile, halo=halo,
        batch_size=batch_size, device=resolved_device, precision=precision, z_range=z_range or None,
    )
    classify_options = ClassifyOptions(
        batch_size=box_batch_size, search_radius=search_radius, drop_unknown=drop_unknown,
        precision=precision.lower(),
    )
    localizer_path = resolve_model_path(localizer, "localizer")
    classifier_path = resolve_model_path(classifier, "classifier")
    # A wrong model fails once, before any input.
    if devices is None:
        load_localizer(str(localizer_path), resolved_device)
        load_classifier(str(classifier_path), resolved_device)
    else:
        load_model(localizer_path, stage="localizer", device="cpu")
        load_model(classifier_path, stage="classifier", device="cpu")
    job = PickJob(
        localizer_path=str(localizer_path), classifier_path=str(classifier_path),
        localize_options=localize_options, classify_options=classify_options, fmt=fmt,
        mask=str(mask) if mask is not None else None, pixel_size=pixel_size,
        show_progress=not quiet and devices is None,
    )
    parameters = localize_options.as_dict() | {
        "classify": asdict(classify_options), "format": fmt, "mask": mask, "pixel_size": pixel_size,
    }
    run_command_batch(
        "pick", tomograms, functools.partial(pick_task, job=job),
        output=output, output_dir=output_dir, suffix=FORMAT_SUFFIX[fmt or "relion4"], parameters=parameters,
        models={"localizer": localizer_path, "classifier": classifier_path}, device=resolved_device,
        devices=devices, shard=shard, overwrite=overwrite, log_settings=settings,
    )
