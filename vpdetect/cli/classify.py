"""`vpdetect classify`: a class for every coordinate of particle tables (stage 2).

Each table (one or many, globs allowed) is one input of the shared batch
flow (`vpdetect.cli.batch`): its output is `<table>_classes<suffix>` beside it
or in --output-dir, with a provenance sidecar; reruns skip finished tables.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from vpdetect.cli.app import app, user_errors
from vpdetect.cli.batch import (
    FORMAT_SUFFIX,
    device_option,
    devices_option,
    file_sha256,
    format_name,
    load_stage_model,
    log_file_option,
    output_dir_option,
    overwrite_option,
    progress_bar,
    quiet_option,
    resolve_model_path,
    run_command_batch,
    shard_option,
    start_run,
    verbose_option,
)
from vpdetect.cli.geometry import coords_pixel_size_option, load_tomograms, tomograms_star_option
from vpdetect.cli.localize import pixel_size_option, precision_option
from vpdetect.errors import VPDetectError

log = logging.getLogger("vpdetect.classify")

TOMOGRAM_SUFFIXES = (".mrc", ".rec", ".st", ".map", ".ali")
# SHREC model folders hold the tomogram beside particle_locations.txt under this name.
SHREC_TOMOGRAM = "reconstruction.mrc"


def resolve_tomogram(
    name: str | None,
    recorded_path: str | None,
    table_path: Path,
    tomo_dir: Path | None,
    tomograms=None,
) -> Path:
    """Where the tomogram of a table's rows lies.

    Looked up by name in --tomo-dir first (users moving data say so there), then
    at tomograms.star's rlnTomoReconstructedTomogram, then at the path localize
    recorded, then by name next to the table; a table without tomogram names
    sitting in a SHREC folder uses its reconstruction.mrc.
    """
    table_dir = table_path.resolve().parent
    looked: list[str] = []
    if tomo_dir is not None and name is not None:
        found = _find_by_name(name, tomo_dir, looked)
        if found is not None:
            return found
    if tomograms is not None and name is not None:
        found = tomograms.tomogram_path(name)
        if found is not None:
            return found
    if recorded_path:
        for candidate in (Path(recorded_path), table_dir / recorded_path):
            looked.append(str(candidate))
            if candidate.is_file():
                return candidate
    if name is not None:
        found = _find_by_name(name, table_dir, looked)
        if found is not None:
            return found
    shrec = table_dir / SHREC_TOMOGRAM
    looked.append(str(shrec))
    if shrec.is_file():
        return shrec
    what = f"tomogram {name!r}" if name is not None else "the tomogram"
    raise VPDetectError(
        f"{what} of {table_path.name} not found (looked for {', '.join(looked[:4])}"
        f"{', ...' if len(looked) > 4 else ''}); give --tomogram or --tomo-dir"
    )


def _find_by_name(name: str, directory: Path, looked: list[str]) -> Path | None:
    candidates = [directory / name, *(directory / f"{name}{s}" for s in TOMOGRAM_SUFFIXES)]
    candidates.append(directory / name / SHREC_TOMOGRAM)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked.append(str(directory / f"{name}.mrc"))
    return None


def search_radius_option():
    return typer.Option(
        3.0, "--search-radius", min=0.0,
        help="Voxels from a box centre to look for the particle when the centre voxel is background.",
    )


def flips_option():
    return typer.Option(
        None, "--test-time-flips", min=1, max=8,
        help="Whole-box classifiers: average over this many of the 8 axis flips of each box "
        "(flips keep the missing wedge in place; 1 = none). Default: the model card's choice.",
    )


def drop_unknown_option():
    return typer.Option(
        False, "--drop-unknown",
        help="Drop particles an MSDNet finds no central component for ('unknown') or a box classifier "
        "calls 'non-particle', instead of labelling them so.",
    )


def class_summary(data) -> str:
    """`small 10, large 4, unknown 2` in order of class number."""
    if len(data) == 0:
        return "no particles"
    counts = data.groupby(["class_number", "class_name"]).size()
    return ", ".join(f"{name} {count}" for (_, name), count in counts.items())


@dataclass(frozen=True)
class ClassifyJob:
    """Everything `classify_task` needs besides the input, output and device (picklable)."""

    model_path: str
    options: object  # ClassifyOptions
    fmt: str | None
    input_format: str | None = None
    tomogram: str | None = None
    tomo_dir: str | None = None
    pixel_size: float | None = None
    show_progress: bool = True
    tomograms_star: str | None = None
    coords_pixel_size: float | None = None


def classify_task(source: Path, output: Path, device: str, job: ClassifyJob) -> dict:
    """Classify the particles of one table in their tomogram(s) and write the result."""
    import pandas as pd

    from vpdetect.classify.pipeline import classify_table, tomogram_groups
    from vpdetect.io.mrc import read_mrc_header, read_tomogram
    from vpdetect.io.particles import (
        ParticleTable,
        check_table_against_tomogram,
        read_particles,
        write_particles,
    )

    start = time.perf_counter()
    tomogram = Path(job.tomogram) if job.tomogram is not None else None
    tomo_size = None
    if tomogram is not None:
        z, y, x = read_mrc_header(tomogram)["shape"]
        tomo_size = (x, y, z)
    tomograms = load_tomograms(job.tomograms_star)
    particles = read_particles(
        source, fmt=job.input_format, voxel_size=job.pixel_size, tomo_size=tomo_size, tomograms=tomograms
    )
    if len(particles) == 0:
        raise VPDetectError(f"{source} holds no particles: nothing to classify")
    groups = tomogram_groups(particles.data)
    if tomogram is not None and len(groups) > 1:
        raise VPDetectError(
            f"{source.name} names {len(groups)} tomograms; --tomogram applies to one (use --tomo-dir)"
        )
    # Find every tomogram before any work, so a missing one fails at once.
    tomo_dir = Path(job.tomo_dir) if job.tomo_dir is not None else None
    paths = [
        tomogram if tomogram is not None else resolve_tomogram(
            name, _recorded_path(particles.data, rows), source, tomo_dir, tomograms
        )
        for name, rows in groups
    ]
    net, card = load_stage_model(job.model_path, "classifier", device)

    results = []
    with progress_bar(job.show_progress) as progress:
        bar = progress.add_task("classifying", total=len(particles))
        for (name, rows), path in zip(groups, paths, strict=True):
            progress.update(bar, description=f"classifying {name or path.stem}")
            tomo = read_tomogram(path, voxel_size=job.pixel_size)
            check_table_against_tomogram(particles, name or tomo.name, tomo.shape_xyz, tomo.voxel_size, source.name)
            data = particles.data.iloc[rows].copy()
            data["_row"] = rows  # restores the input order after grouping
            geometry = particles.geometry.get(name)
            part = ParticleTable(
                data=data,
                voxel_size=geometry.voxel_size if geometry is not None else particles.voxel_size,
                tomo_size=geometry.voxel_shape if geometry is not None else particles.tomo_size,
            )
            results.append(
                classify_table(tomo, part, net, card, job.options, progress=lambda n: progress.advance(bar, n))
            )

    merged = pd.concat([r.data for r in results], ignore_index=True)
    merged = merged.sort_values("_row", kind="stable").drop(columns="_row").reset_index(drop=True)
    sizes = {r.tomo_size for r in results}
    out = ParticleTable(
        data=merged,
        voxel_size=job.pixel_size or particles.voxel_size or results[0].voxel_size,
        tomo_size=sizes.pop() if len(sizes) == 1 else particles.tomo_size,
        geometry=particles.geometry,
    )
    written = write_particles(output, out, fmt=job.fmt, coords_pixel_size=job.coords_pixel_size)
    log.info(
        "%s: classified %d particle(s) in %d tomogram(s): %s -> %s (%s)",
        source.name, len(merged), len(groups), class_summary(merged), output, written,
    )
    counts = merged["class_name"].value_counts().to_dict()
    return {
        "n_particles": len(merged),
        "n_skipped": len(particles) - len(merged),
        "classes": {str(k): int(v) for k, v in counts.items()},
        "format": written,
        # The tomograms are inputs too: their checksums let a result be traced.
        "tomograms": [{"path": str(p.resolve()), "sha256": file_sha256(p)} for p in paths],
        "seconds": round(time.perf_counter() - start, 4),
    }


def classes_naming(fmt: str | None) -> Callable[[Path], str]:
    """Output file name of a table: `<stem>_classes` plus the format's suffix, else the table's own."""

    def name(table: Path) -> str:
        suffix = FORMAT_SUFFIX[fmt] if fmt else table.suffix or ".star"
        return f"{table.stem}_classes{suffix}"

    return name


@app.command()
@user_errors
def classify(
    tables: list[str] = typer.Argument(
        ..., help="Particle tables (.star, .csv or SHREC .txt) or globs, e.g. from `vpdetect localize`."
    ),
    tomogram: Path = typer.Option(
        None, "--tomogram", "-t",
        help="Tomogram to classify in (MRC/REC); default: the one each table names "
        "(rlnTomoName, or the path localize recorded).",
    ),
    tomo_dir: Path = typer.Option(
        None, "--tomo-dir", help="Folder holding the tomograms the tables name (NAME.mrc / NAME.rec)."
    ),
    model: Path = typer.Option(
        None, "--model", "-m", help="Classifier model file (.pt); default: the bundled classifier."
    ),
    output: Path = typer.Option(
        None, "--output", "-o",
        help="Output table for a single input table; default: its name plus _classes, beside it "
        "(or in --output-dir). Format from the extension.",
    ),
    output_dir: Path = output_dir_option(
        "Folder for the outputs, <table>_classes<suffix> each (default: beside each table)."
    ),
    output_format: str = typer.Option(
        None, "--format", help="Output format: relion4, relion5, csv, shrec, dynamo or imod; default: from the extension."
    ),
    input_format: str = typer.Option(
        None, "--input-format", help="Format of the tables (relion4, relion5, csv, shrec, dynamo, imod); default: detected."
    ),
    search_radius: float = search_radius_option(),
    test_time_flips: int = flips_option(),
    drop_unknown: bool = drop_unknown_option(),
    batch_size: int = typer.Option(
        None, "--batch-size", min=1,
        help="Subtomograms per network call (default 8 for an MSDNet, 64 for a whole-box classifier).",
    ),
    device: str = device_option(),
    devices: str = devices_option(),
    precision: str = precision_option(),
    pixel_size: float = pixel_size_option(),
    tomograms_star: Path = tomograms_star_option(),
    coords_pixel_size: float = coords_pixel_size_option(),
    overwrite: bool = overwrite_option(),
    shard: str = shard_option(),
    verbose: bool = verbose_option(),
    quiet: bool = quiet_option(),
    log_file: Path = log_file_option(),
) -> None:
    """Classify each particle: label a subtomogram around it (MSDNet: segment, keep the central particle, vote)."""
    from vpdetect.classify.pipeline import ClassifyOptions
    from vpdetect.io.particles import FORMATS
    from vpdetect.nn.precision import check_precision

    settings, resolved_device = start_run(
        verbose=verbose, quiet=quiet, log_file=log_file, device=device, devices=devices
    )
    fmt = format_name(output_format)
    if input_format is not None and input_format.lower() not in FORMATS:
        raise VPDetectError(f"unknown input format {input_format!r}; choose one of {', '.join(FORMATS)}")
    precision = check_precision(precision)
    model_path = resolve_model_path(model, "classifier")
    # A wrong model fails once, before any input (checked on the CPU when workers take the GPUs).
    load_stage_model(model_path, "classifier", "cpu" if devices else resolved_device)
    options = ClassifyOptions(
        batch_size=batch_size, search_radius=search_radius, drop_unknown=drop_unknown,
        precision=precision.lower(), flips=test_time_flips,
    )
    job = ClassifyJob(
        model_path=str(model_path), options=options, fmt=fmt, input_format=input_format,
        tomogram=str(tomogram) if tomogram is not None else None,
        tomo_dir=str(tomo_dir) if tomo_dir is not None else None,
        pixel_size=pixel_size, show_progress=not quiet and devices is None,
        tomograms_star=str(tomograms_star) if tomograms_star is not None else None,
        coords_pixel_size=coords_pixel_size,
    )
    load_tomograms(tomograms_star)  # a bad tomograms.star fails once, before any input
    parameters = asdict(options) | {
        "format": fmt, "input_format": input_format, "tomogram": tomogram, "tomo_dir": tomo_dir,
        "pixel_size": pixel_size, "model": model_path,
        "tomograms_star": tomograms_star, "coords_pixel_size": coords_pixel_size,
    }
    run_command_batch(
        "classify", tables, functools.partial(classify_task, job=job),
        output=output, output_dir=output_dir, suffix="", naming=classes_naming(fmt),
        beside_inputs=True, parameters=parameters, models={"classifier": model_path},
        device=resolved_device, devices=devices, shard=shard, overwrite=overwrite, log_settings=settings,
    )


def _recorded_path(data, rows) -> str | None:
    if "tomo_path" not in data.columns:
        return None
    values = data["tomo_path"].iloc[rows].dropna().astype(str)
    return values.iloc[0] if len(values) else None
